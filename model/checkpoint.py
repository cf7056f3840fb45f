"""Checkpoints: a directory with ``config.json`` and ``model.safetensors`` (plus optional
``metrics.json`` and one ``<key>.json`` per extra entry).

Weights are only ever written and read as safetensors, never pickled: a checkpoint is data a
service may receive from elsewhere, and loading it must not run code. Before safetensors sees
the file, its header is parsed here so that a truncated copy, a ``torch.save`` file renamed to
``.safetensors`` or a file that belongs to another config gives a one-line error naming the
file, the tensor and the fix, instead of a Rust panic message or a ``load_state_dict`` dump.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from astro_trt import __version__
from astro_trt.artifacts import as_path, copy_regular_file, sha256_file, staged_directory
from astro_trt.config import ASTROConfig
from astro_trt.errors import ArtifactError, CheckpointError, ConfigError, one_line
from astro_trt.model.astro import ASTRO
from astro_trt.model.item_table import ItemTable
from astro_trt.model.resources import check_fits
from astro_trt.precision import by_torch

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"
# Checkpoints written before the weights recorded their documents hold these (train writes data.json).
_LEGACY_DOCUMENTS = (CONFIG_FILE, METRICS_FILE, "data.json")
_META_CONFIG = "astro_trt_config"
_META_DOCUMENTS = "astro_trt_documents"
_META_DIGEST = "astro_trt_sha256"
# A JSON document of a checkpoint (config, metrics with the training history, data fingerprint) is
# a few KB; anything near this is not one.
MAX_DOCUMENT_BYTES = 16_000_000
_RESERVED_KEYS = {"config", "model", "metrics"}
_EXTRA_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# safetensors itself refuses headers above 100 MB; anything larger is not a safetensors file.
_MAX_HEADER_BYTES = 100_000_000
_DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: the model is in eval mode with the reference attention ops."""

    config: ASTROConfig
    model: ASTRO
    sha256: str  # of model.safetensors; bundle manifests record it
    directory: Path


# ---------------------------------------------------------------------------- saving
def save_checkpoint(
    out_dir: str | Path,
    model: torch.nn.Module,
    cfg: ASTROConfig,
    *,
    metrics: dict | None = None,
    extra: dict[str, dict] | None = None,
) -> Path:
    """Write a checkpoint directory atomically and return its path.

    Everything is written into a temporary directory next to ``out_dir`` and renamed into
    place at the end, so a crash or a bad argument never leaves a half-written checkpoint and
    an existing ``out_dir`` is replaced only once the new one is complete.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir}: exists and is not a directory; choose another --out path")
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    # Refuse to write what load_checkpoint would refuse to read.
    _check_against_config(_header_of(tensors), cfg, out_dir / WEIGHTS_FILE)
    documents = _json_documents(cfg, metrics, extra)

    with staged_directory(out_dir) as staging:
        # The training config and the list of documents travel inside the weights file: fields
        # the weights cannot reveal (max_len, time_bucket_max, layer_norm_eps, ...) are checked
        # against it on load, and export copies exactly these documents.
        metadata = {"format": "pt", "astro_trt_version": __version__, "config_name": cfg.name,
                    _META_CONFIG: json.dumps(cfg.to_dict(), sort_keys=True),
                    _META_DOCUMENTS: json.dumps(sorted(documents))}
        metadata[_META_DIGEST] = _content_digest(tensors, metadata)
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata=metadata)
        for filename, text in documents.items():
            (staging / filename).write_text(text)
    return out_dir


def _json_documents(cfg: ASTROConfig, metrics: dict | None, extra: dict[str, dict] | None) -> dict[str, str]:
    """Serialise every JSON file up front, so that a value JSON cannot hold fails before any write."""
    documents = {CONFIG_FILE: cfg.to_json() + "\n"}
    named: dict[str, Any] = {}
    if metrics is not None:
        named[METRICS_FILE] = metrics
    for key, value in (extra or {}).items():
        if not isinstance(key, str) or not _EXTRA_KEY.match(key) or key in _RESERVED_KEYS:
            raise CheckpointError(
                f"extra key {key!r} cannot name a checkpoint file; use letters, digits, '_', '-', '.' "
                f"and none of {sorted(_RESERVED_KEYS)}"
            )
        named[f"{key}.json"] = value
    for filename, value in named.items():
        try:
            documents[filename] = json.dumps(value, indent=2, sort_keys=True) + "\n"
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{filename}: cannot be written as JSON ({exc}); pass plain numbers, "
                                  "strings, lists and dicts") from None
    return documents


# ---------------------------------------------------------------------------- loading
def read_checkpoint_config(path: str | Path) -> ASTROConfig:
    """The config of the checkpoint at ``path`` (directory or weights file), without its weights."""
    directory, _ = _resolve(path)
    config_path = directory / CONFIG_FILE
    try:
        # A checkpoint's files are the files themselves: a link could make loading read any file.
        return ASTROConfig.load(config_path, follow_symlinks=False)
    except ConfigError as exc:
        message = str(exc)
        if str(config_path) not in message:
            message = f"{config_path}: {message}"
        raise ConfigError(message) from None


ITEM_TABLE_KEY = "item_embedding.weight"


def table_chunks(path: str | Path, chunk_rows: int = 65536):  # STAND-IN
    tensors = load_file(str(_resolve(path)[1]))
    table = tensors[ITEM_TABLE_KEY].numpy()
    for start in range(0, len(table), chunk_rows):
        yield table[start:start + chunk_rows]


def write_dense_checkpoint(src: str | Path, dest: str | Path) -> None:  # STAND-IN
    directory, weights = _resolve(src)
    header, metadata, _ = _read_header(weights)
    tensors = load_file(str(weights))
    tensors.pop(ITEM_TABLE_KEY)
    dest = Path(dest)
    save_file(tensors, str(dest / WEIGHTS_FILE), metadata={"astro_trt_item_table": "external"})
    for name in _documents(directory, weights, metadata):
        if name != WEIGHTS_FILE:
            copy_regular_file(directory / name, dest / name, max_bytes=MAX_DOCUMENT_BYTES)


def load_checkpoint(path: str | Path, *, item_table: object = None) -> Checkpoint:
    """Load a checkpoint from its directory or its ``model.safetensors`` file.

    Raises CheckpointError (weights) or ConfigError (config.json) with a one-line message.
    """
    cfg = read_checkpoint_config(path)
    directory, weights = _resolve(path)
    config_path = directory / CONFIG_FILE
    header, metadata, _ = _read_header(weights)
    if item_table is None:
        _check_against_config(header, cfg, weights)
        _check_recorded_config(metadata, cfg, config_path, weights)
    # The smallest work any command does with a checkpoint: the exporter's 2-user, 5-candidate check.
    try:
        check_fits(cfg, users=2, candidates=5, purpose="running one request")
    except ConfigError as exc:
        raise ConfigError(f"{config_path}: {exc}") from None

    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights}: safetensors could not read it ({one_line(exc)}); "
                              "re-copy or re-save the checkpoint") from None
    recorded = metadata.get(_META_DIGEST)
    if recorded is None and (_META_CONFIG in metadata or _META_DOCUMENTS in metadata):
        # Written with a digest (it records the config and documents alongside), which is gone.
        raise CheckpointError(f"{weights}: its metadata lacks the digest recorded when it was saved; the file is "
                              "corrupt or was edited, re-copy or re-save the checkpoint")
    if recorded is not None and recorded != _content_digest(tensors, metadata):
        raise CheckpointError(f"{weights}: its tensors or metadata do not match the digest recorded when it was "
                              "saved; the file is corrupt or was edited, re-copy or re-save the checkpoint")
    if item_table is None:
        item_table = ItemTable.from_array(tensors.pop(ITEM_TABLE_KEY).numpy())
    model = ASTRO(cfg, item_table=item_table)
    model.load_state_dict(tensors, strict=True)
    model.eval()
    return Checkpoint(config=cfg, model=model, sha256=checkpoint_sha256(weights), directory=directory)


def _content_digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """sha256 over the metadata (but this digest) and every tensor's name, dtype, shape and bytes,
    independent of how safetensors lays the file out. It catches a flipped or truncated byte
    anywhere a reader would use, which the header checks alone cannot (a flipped weight still
    parses). Checkpoints written before it was recorded carry none and are read without it."""
    digest = hashlib.sha256()
    digest.update(json.dumps({k: v for k, v in metadata.items() if k != _META_DIGEST}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def checkpoint_sha256(path: str | Path) -> str:
    """sha256 (hex) of a checkpoint's model.safetensors; ``path`` is the directory or the file."""
    return sha256_file(_resolve(path)[1])


def _resolve(path: str | Path) -> tuple[Path, Path]:
    """-> (checkpoint directory, its weights file), or a CheckpointError naming what is missing."""
    path = as_path(path, "checkpoint", CheckpointError)
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    if weights.is_symlink():
        raise CheckpointError(f"{weights}: is a symbolic link; a checkpoint holds its weights file itself "
                              "(copy the target there)")
    if path.is_dir():
        if weights.exists() and not weights.is_file():
            raise CheckpointError(f"{weights}: not a regular file; put the weights file written by "
                                  "`astro-trt train` there")
        if not weights.is_file():
            raise CheckpointError(f"{weights}: not found; a checkpoint directory holds {CONFIG_FILE} and "
                                  f"{WEIGHTS_FILE} (written by `astro-trt train`)")
        return path, weights
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: not a .safetensors file; pass the checkpoint directory or its "
                                  f"{WEIGHTS_FILE}")
        return path.parent, path
    raise CheckpointError(f"{path}: no such checkpoint directory or file; pass the directory written by "
                          "`astro-trt train` or its model.safetensors")


class _Header(NamedTuple):
    tensors: dict[str, dict]  # tensor name -> {"dtype", "shape", "data_offsets"}
    metadata: dict[str, str]  # the header's __metadata__
    declared_bytes: int  # the file's size as the header declares it: length, header, then the data


def _read_header(weights: Path) -> _Header:
    """Parse the safetensors header (8-byte little-endian length + JSON) and check that every
    tensor's data lies inside the file."""
    size = weights.stat().st_size
    with weights.open("rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{weights}: truncated ({size} bytes, shorter than a safetensors header); "
                                  "re-copy or re-save the checkpoint")
        (header_len,) = struct.unpack("<Q", prefix)
        first = fh.read(1)
        if header_len < 2 or header_len > _MAX_HEADER_BYTES or first != b"{":
            raise CheckpointError(f"{weights}: not a safetensors file ({_sniff(prefix)}); save weights with "
                                  "astro_trt.model.checkpoint.save_checkpoint (pickled torch files are refused)")
        if 8 + header_len > size:
            raise CheckpointError(f"{weights}: truncated inside its header ({size} bytes, header alone needs "
                                  f"{8 + header_len}); re-copy or re-save the checkpoint")
        raw = first + fh.read(header_len - 1)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{weights}: safetensors header is not valid JSON; the file is corrupt, "
                              "re-copy or re-save the checkpoint") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{weights}: safetensors header is not a JSON object; re-save the checkpoint")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{weights}: safetensors __metadata__ is not a map of strings; re-save the checkpoint")
    data_size = size - 8 - header_len
    for name, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], list(entry["shape"]), entry["data_offsets"]
            if not all(type(v) is int and v >= 0 for v in (*shape, start, end)):
                raise ValueError("shape and offsets are non-negative integers")
            expected_bytes = math.prod(shape) * _DTYPE_SIZES[dtype]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{weights}: tensor '{name}' has a malformed header entry; "
                                  "re-save the checkpoint") from None
        if end > data_size:
            raise CheckpointError(f"{weights}: truncated: tensor '{name}' needs bytes up to {8 + header_len + end} "
                                  f"but the file has {size}; re-copy or re-save the checkpoint")
        if end - start != expected_bytes or start < 0:
            raise CheckpointError(f"{weights}: tensor '{name}' has data offsets that do not match its shape; "
                                  "the file is corrupt, re-save the checkpoint")
    declared = 8 + header_len + max((e["data_offsets"][1] for e in header.values()), default=0)
    return _Header(header, metadata, declared)


def _check_recorded_config(metadata: dict[str, str], cfg: ASTROConfig, config_path: Path, weights: Path) -> None:
    """config.json against the training config recorded in the weights: the shapes cannot reveal
    max_len, time_bucket_max, layer_norm_eps and the like. Checkpoints written before the config
    was recorded have none; their config.json is taken as it is (the shapes were still checked)."""
    if _META_CONFIG not in metadata:
        return
    try:
        recorded = ASTROConfig.from_dict(json.loads(metadata[_META_CONFIG]), source="recorded config")
    except (ValueError, RecursionError, ConfigError) as exc:
        raise CheckpointError(f"{weights}: the training config recorded in its metadata is unusable "
                              f"({one_line(exc)}); re-save the checkpoint") from None
    trained, given = recorded.to_dict(), cfg.to_dict()
    differ = [key for key in trained if trained[key] != given[key]]
    if differ:
        shown = ", ".join(f"{k}={given[k]!r} (trained with {trained[k]!r})" for k in differ[:4])
        raise ConfigError(f"{config_path}: {shown} differs from the config recorded in {weights.name} at training; "
                          "restore the config.json the weights were trained with")


def checkpoint_documents(path: str | Path) -> list[str]:
    """The files a checkpoint consists of: its weights and the JSON documents save_checkpoint
    wrote (recorded in the weights' metadata; older checkpoints: config, metrics and data)."""
    directory, weights = _resolve(path)
    return _documents(directory, weights, _read_header(weights).metadata)


def _documents(directory: Path, weights: Path, metadata: dict[str, str]) -> list[str]:
    names: list[str] = list(_LEGACY_DOCUMENTS)
    if _META_DOCUMENTS in metadata:
        try:
            names = json.loads(metadata[_META_DOCUMENTS])
        except ValueError:
            names = None  # type: ignore[assignment]
        if not isinstance(names, list) or not all(
            isinstance(n, str) and n.endswith(".json") and _EXTRA_KEY.match(n[:-5]) for n in names
        ):
            raise CheckpointError(f"{weights}: its metadata lists documents that are not plain .json names; "
                                  "re-save the checkpoint")
    present = [n for n in names if n == CONFIG_FILE or (directory / n).exists() or (directory / n).is_symlink()]
    return [WEIGHTS_FILE, *sorted(set(present))]


def copy_checkpoint(path: str | Path, target: str | Path) -> list[str]:
    """Copy a checkpoint's own files (``checkpoint_documents``) into the directory ``target`` and
    return their names. Only regular files are copied, never through a symlink, and each within a
    size bound (the weights: exactly the size their header declares), so a checkpoint directory
    cannot pull host files (a link to /etc/passwd, /dev/zero, a FIFO) into a bundle."""
    directory, weights = _resolve(path)
    header = _read_header(weights)  # once: the documents it lists and the weights' size bound
    names = _documents(directory, weights, header.metadata)
    target = Path(target)
    for name in names:
        # The weights copied are the file whose header was read (directory / WEIGHTS_FILE when
        # ``path`` is the directory), bounded by the size that header declares.
        if name == WEIGHTS_FILE:
            source, bound = weights, header.declared_bytes
        else:
            source, bound = directory / name, MAX_DOCUMENT_BYTES
        try:
            copy_regular_file(source, target / name, max_bytes=bound)
        except ArtifactError as exc:
            raise CheckpointError(str(exc)) from None
    return names


def _sniff(prefix: bytes) -> str:
    if prefix.startswith(b"PK\x03\x04"):
        return "it is a zip archive, as torch.save writes"
    if prefix[:1] == b"\x80":
        return "it is a Python pickle"
    return "its first 8 bytes are not a plausible header length"


def _header_of(tensors: dict[str, torch.Tensor]) -> dict[str, dict]:
    def label(t: torch.Tensor) -> str:
        known = by_torch(t.dtype)
        return known.safetensors if known else str(t.dtype)

    return {name: {"dtype": label(t), "shape": list(t.shape)} for name, t in tensors.items()}


# ---------------------------------------------------------------------------- config agreement
def _expected_shapes(cfg: ASTROConfig) -> dict[str, tuple[int, ...]]:
    # The meta device gives the parameter shapes without allocating or initialising them.
    with torch.device("meta"):
        model = ASTRO(cfg)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _check_against_config(header: dict[str, dict], cfg: ASTROConfig, weights: Path) -> None:
    expected = _expected_shapes(cfg)
    missing = sorted(set(expected) - set(header))
    unexpected = sorted(set(header) - set(expected))
    if missing or unexpected:
        raise CheckpointError(_name_mismatch(weights, cfg, header, missing, unexpected))
    for name, shape in expected.items():
        got = tuple(header[name]["shape"])
        if got != shape:
            raise CheckpointError(
                f"{weights}: tensor '{name}' has shape {list(got)} but config '{cfg.name}' implies {list(shape)}"
                f"{_likely_field(cfg, got, shape)}; use the config.json the weights were trained with"
            )
        if header[name]["dtype"] != "F32":
            raise CheckpointError(
                f"{weights}: tensor '{name}' is {header[name]['dtype']}, checkpoints hold float32 (F32); "
                "save the float32 weights (model.float()) and choose precision at export"
            )


def _name_mismatch(weights: Path, cfg: ASTROConfig, header: dict, missing: list[str], unexpected: list[str]) -> str:
    layers_in_file = {int(m.group(1)) for n in header if (m := re.match(r"layers\.(\d+)\.", n))}
    hint = ""
    if layers_in_file and len(layers_in_file) != cfg.num_layers:
        hint = f" (the weights have {len(layers_in_file)} layers, config num_layers={cfg.num_layers})"
    parts = []
    if missing:
        parts.append(f"lacks tensors {_few(missing)}")
    if unexpected:
        parts.append(f"has unexpected tensors {_few(unexpected)}")
    return (f"{weights}: {' and '.join(parts)} for config '{cfg.name}'{hint}; the weights come from another "
            "model or config: use the config.json they were trained with")


def _few(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return f"[{shown}{f', ... {len(names) - limit} more' if len(names) > limit else ''}]"


def _likely_field(cfg: ASTROConfig, got: tuple[int, ...], want: tuple[int, ...]) -> str:
    """Name the config field(s) whose value explains each differing dimension."""
    if len(got) != len(want):
        return ""
    sizes = {
        "num_items": (cfg.num_items + 1, 1), "num_behaviors": (cfg.num_behaviors + 1, 1),
        "d_model": (cfg.d_model, 0), "num_heads": (cfg.num_heads, 0), "num_blocks": (cfg.num_blocks, 0),
        "num_scenarios": (cfg.num_scenarios, 0), "ffn_dim": (cfg.ffn_dim, 0), "num_tasks": (cfg.num_tasks, 0),
        "num_pos_buckets": (cfg.num_pos_buckets, 0), "num_time_buckets": (cfg.num_time_buckets, 0),
    }
    notes = []
    for axis, (g, w) in enumerate(zip(got, want, strict=True)):
        if g == w:
            continue
        fields = [f"{field} (config {size - offset}, weights imply {g - offset})"
                  for field, (size, offset) in sizes.items() if size == w]
        notes.append(f"axis {axis}: likely {' or '.join(fields)}" if fields else f"axis {axis}")
    return f" ({'; '.join(notes)})"


__all__ = [
    "CONFIG_FILE", "WEIGHTS_FILE", "Checkpoint", "checkpoint_documents", "checkpoint_sha256", "copy_checkpoint",
    "load_checkpoint", "read_checkpoint_config", "save_checkpoint",
]
