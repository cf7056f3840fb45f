"""Checkpoints: a directory with ``config.json`` and ``model.safetensors`` (plus optional
``metrics.json`` and one ``<key>.json`` per extra entry).

Weights are only ever written and read as safetensors, never pickled: a checkpoint is data a
service may receive from elsewhere, and loading it must not run code. Before safetensors sees
the file, its header is parsed here so that a truncated copy, a ``torch.save`` file renamed to
``.safetensors`` or a file that belongs to another config gives a one-line error naming the
file, the tensor and the fix, instead of a Rust panic message or a ``load_state_dict`` dump.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from astro_trt import __version__
from astro_trt.artifacts import sha256_file, staged_directory
from astro_trt.config import ASTROConfig
from astro_trt.errors import CheckpointError, ConfigError
from astro_trt.model.astro import ASTRO
from astro_trt.precision import by_torch

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"
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

    from safetensors.torch import save_file

    with staged_directory(out_dir) as staging:
        metadata = {"format": "pt", "astro_trt_version": __version__, "config_name": cfg.name}
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
def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a checkpoint from its directory or its ``model.safetensors`` file.

    Raises CheckpointError (weights) or ConfigError (config.json) with a one-line message.
    """
    directory, weights = _resolve(path)
    config_path = directory / CONFIG_FILE
    try:
        cfg = ASTROConfig.load(config_path)
    except ConfigError as exc:
        message = str(exc)
        if str(config_path) not in message:
            message = f"{config_path}: {message}"
        raise ConfigError(message) from None

    header = _read_header(weights)
    _check_against_config(header, cfg, weights)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights}: safetensors could not read it ({_one_line(exc)}); "
                              "re-copy or re-save the checkpoint") from None
    model = ASTRO(cfg)
    model.load_state_dict(tensors, strict=True)
    model.eval()
    return Checkpoint(config=cfg, model=model, sha256=checkpoint_sha256(weights), directory=directory)


def checkpoint_sha256(path: str | Path) -> str:
    """sha256 (hex) of a checkpoint's model.safetensors; ``path`` is the directory or the file."""
    return sha256_file(_resolve(path)[1])


def _resolve(path: str | Path) -> tuple[Path, Path]:
    """-> (checkpoint directory, its weights file), or a CheckpointError naming what is missing."""
    path = Path(path)
    if path.is_dir():
        weights = path / WEIGHTS_FILE
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


def _read_header(weights: Path) -> dict[str, dict]:
    """Parse the safetensors header (8-byte little-endian length + JSON) and check that every
    tensor's data lies inside the file. Returns {tensor name: {"dtype", "shape", "data_offsets"}}."""
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
    header.pop("__metadata__", None)
    data_size = size - 8 - header_len
    for name, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], list(entry["shape"]), entry["data_offsets"]
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
    return header


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


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


__all__ = ["Checkpoint", "save_checkpoint", "load_checkpoint", "checkpoint_sha256", "CONFIG_FILE", "WEIGHTS_FILE"]
