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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from astro_trt import __version__
from astro_trt.artifacts import as_path, check_free_space, copy_regular_file, sha256_file, staged_directory
from astro_trt.config import ASTROConfig
from astro_trt.errors import ArtifactError, CheckpointError, ConfigError, one_line
from astro_trt.model.astro import ASTRO
from astro_trt.model.item_table import ItemTable, table_shape
from astro_trt.model.resources import check_fits
from astro_trt.precision import DTYPES, by_torch

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"
# Checkpoints written before the weights recorded their documents hold these (train writes data.json).
_LEGACY_DOCUMENTS = (CONFIG_FILE, METRICS_FILE, "data.json")
_META_CONFIG = "astro_trt_config"
_META_DOCUMENTS = "astro_trt_documents"
_META_DIGEST = "astro_trt_sha256"
# A bundle's dense-only copy: the item table lives in the bundle's tables/ (model/item_table.py).
_META_TABLE = "astro_trt_item_table"
_EXTERNAL = "external"
_META_SOURCE = "astro_trt_source_sha256"  # sha256 of the full checkpoint the dense copy was made from
ITEM_TABLE_TENSOR = "item_embedding.weight"
# Bytes per read when hashing or streaming a tensor from the file: bounded, whatever its size.
_READ_BYTES = 16 << 20
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
    # The rows the model looks up: mapped from the checkpoint's own file, or the table it was loaded with.
    item_table: ItemTable | None = None
    # A bundle's dense-only copy: the sha256 of the full checkpoint it was made from (its metadata's record).
    source_sha256: str | None = None


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
    # A 10^7-item table is GBs: a disk that cannot hold it is named before the write, not halfway.
    check_free_space(out_dir, sum(t.numel() * t.element_size() for t in tensors.values())
                     + sum(len(text.encode()) for text in documents.values()), "checkpoint", CheckpointError)

    with staged_directory(out_dir) as staging:
        # The training config and the list of documents travel inside the weights file: fields
        # the weights cannot reveal (max_len, time_bucket_max, layer_norm_eps, ...) are checked
        # against it on load, and export copies exactly these documents.
        metadata = {"format": "pt", "astro_trt_version": __version__, "config_name": cfg.name,
                    _META_CONFIG: json.dumps(cfg.to_dict(), sort_keys=True),
                    _META_DOCUMENTS: json.dumps(sorted(documents))}
        metadata[_META_DIGEST] = _tensor_digest(tensors, metadata)
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


def load_checkpoint(path: str | Path, item_table: ItemTable | None = None) -> Checkpoint:
    """Load a checkpoint from its directory or its ``model.safetensors`` file.

    The dense weights are read (a few MB); the item table is never read whole: the model looks
    its rows up in ``item_table`` when given (a bundle's table, whose shape must be the config's),
    else in a read-only map of the checkpoint's own table inside the weights file. A bundle's
    dense-only copy of a checkpoint has no table of its own and needs ``item_table``.

    Raises CheckpointError (weights) or ConfigError (config.json) with a one-line message.
    """
    cfg = read_checkpoint_config(path)
    directory, weights = _resolve(path)
    config_path = directory / CONFIG_FILE
    header = _read_header(weights)
    dense_only = _is_dense_only(header.metadata, weights)
    _check_against_config(header.tensors, cfg, weights, dense_only=dense_only)
    _check_recorded_config(header.metadata, cfg, config_path, weights)
    # The smallest work any command does with a checkpoint: the exporter's 2-user, 5-candidate check.
    try:
        check_fits(cfg, users=2, candidates=5, purpose="running one request")
    except ConfigError as exc:
        raise ConfigError(f"{config_path}: {exc}") from None
    if dense_only and item_table is None:
        raise CheckpointError(f"{weights}: a bundle's dense-only checkpoint (its item table is in the bundle's "
                              "tables/); load it through its bundle (astro-trt validate BUNDLE), or load the "
                              "original checkpoint")
    if item_table is not None:
        if not isinstance(item_table, ItemTable):
            raise CheckpointError(f"item_table is a {type(item_table).__name__}, not an ItemTable; open the bundle's "
                                  "table with astro_trt.model.item_table.ItemTable.open (or from_array)")
        _check_table_shape(item_table, cfg, weights)

    metadata = header.metadata
    recorded = metadata.get(_META_DIGEST)
    if recorded is None and (_META_CONFIG in metadata or _META_DOCUMENTS in metadata):
        # Written with a digest (it records the config and documents alongside), which is gone.
        raise CheckpointError(f"{weights}: its metadata lacks the digest recorded when it was saved; the file is "
                              "corrupt or was edited, re-copy or re-save the checkpoint")
    content, sha256 = _file_digests(weights, header)
    if recorded is not None and recorded != content:
        raise CheckpointError(f"{weights}: its tensors or metadata do not match the digest recorded when it was "
                              "saved; the file is corrupt or was edited, re-copy or re-save the checkpoint")
    dense = _read_dense(weights, header)
    table = item_table if item_table is not None else _mapped_table(weights, header)
    model = ASTRO(cfg, item_table=table)
    model.load_state_dict(dense, strict=True)
    model.eval()
    return Checkpoint(config=cfg, model=model, sha256=sha256, directory=directory,
                      item_table=table, source_sha256=metadata.get(_META_SOURCE))


def _is_dense_only(metadata: dict[str, str], weights: Path) -> bool:
    mode = metadata.get(_META_TABLE)
    if mode not in (None, _EXTERNAL):
        raise CheckpointError(f"{weights}: its metadata names item table mode {mode!r}, not {_EXTERNAL!r}; "
                              "re-export the bundle or re-save the checkpoint")
    return mode == _EXTERNAL


def _check_table_shape(table: ItemTable, cfg: ASTROConfig, weights: Path) -> None:
    want = list(table_shape(cfg))
    if [table.rows, table.dim] != want:
        raise CheckpointError(f"{weights}: the item table has shape {[table.rows, table.dim]} but config "
                              f"'{cfg.name}' implies {want} (num_items + 1, d_model); use the table exported "
                              "with this checkpoint (re-export the bundle)")


def _read_dense(weights: Path, header: _Header) -> dict[str, torch.Tensor]:
    """Every tensor but the item table (a few MB), by plain reads at the offsets of the header
    (checked against the file by _read_header; their dtype, float32, by _check_against_config).
    The file is not mapped: a 10^7-row table would fill an address-space limit (ulimit -v)."""
    out: dict[str, torch.Tensor] = {}
    with weights.open("rb") as fh:
        for name, entry in header.tensors.items():
            if name == ITEM_TABLE_TENSOR:
                continue
            start, end = entry["data_offsets"]
            data = bytearray(end - start)
            fh.seek(header.data_start + start)
            if fh.readinto(data) != len(data):
                raise CheckpointError(f"{weights}: ends inside tensor '{name}'; re-copy or re-save the checkpoint")
            out[name] = torch.from_numpy(np.frombuffer(data, dtype="<f4").reshape(entry["shape"]))
    return out


def _mapped_table(weights: Path, header: _Header) -> ItemTable:
    """The checkpoint's own item table, mapped read-only where it lies in the weights file."""
    entry = header.tensors[ITEM_TABLE_TENSOR]
    rows, dim = entry["shape"]
    return ItemTable.mapped_view(weights, header.data_start + entry["data_offsets"][0], rows, dim)


def _digest_start(metadata: dict[str, str]) -> Any:
    digest = hashlib.sha256()
    digest.update(json.dumps({k: v for k, v in metadata.items() if k != _META_DIGEST}, sort_keys=True).encode())
    return digest


def _tensor_digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """sha256 over the metadata (but this digest) and every tensor's name, dtype, shape and bytes,
    independent of how safetensors lays the file out. It catches a flipped or truncated byte
    anywhere a reader would use, which the header checks alone cannot (a flipped weight still
    parses). Checkpoints written before it was recorded carry none and are read without it.
    The bytes are handed to sha256 as a view: a 5 GB table is not copied to be hashed."""
    digest = _digest_start(metadata)
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _file_digests(weights: Path, header: _Header) -> tuple[str, str]:
    """(_tensor_digest of the tensors as stored in ``weights``, sha256 of the whole file), in one
    pass of plain reads of at most _READ_BYTES when the tensors lie in name order, as safetensors
    writes them (else two passes). Plain reads, not a map of the file: every mapped page read
    would count in the process's RSS, and a 5 GB table would."""
    names = sorted(header.tensors)
    by_offset = sorted(names, key=lambda n: tuple(header.tensors[n]["data_offsets"]))
    if names != by_offset:
        return _tensor_digest_of_file(weights, header), sha256_file(weights)
    content, whole = _digest_start(header.metadata), hashlib.sha256()
    # sha256 runs at ~0.75 GB/s here and releases the GIL: the two digests of a block run side by side.
    with weights.open("rb") as fh, ThreadPoolExecutor(1) as pool:
        _feed(fh, header.data_start, weights, "its header", whole)
        done = 0  # bytes of data read so far
        for name in names:
            entry = header.tensors[name]
            content.update(_describe(name, entry))
            start, end = entry["data_offsets"]
            _feed(fh, start - done, weights, "its data", whole)  # a gap between tensors: the file's only
            _feed(fh, end - start, weights, f"tensor '{name}'", content, beside=(pool, whole))
            done = end
        while block := fh.read(_READ_BYTES):
            whole.update(block)
    return content.hexdigest(), whole.hexdigest()


def _tensor_digest_of_file(weights: Path, header: _Header) -> str:
    content = _digest_start(header.metadata)
    with weights.open("rb") as fh:
        for name in sorted(header.tensors):
            entry = header.tensors[name]
            content.update(_describe(name, entry))
            start, end = entry["data_offsets"]
            fh.seek(header.data_start + start)
            _feed(fh, end - start, weights, f"tensor '{name}'", content)
    return content.hexdigest()


def _describe(name: str, entry: dict) -> bytes:
    """What _tensor_digest hashes before a tensor's bytes, from its header entry."""
    known = next((d for d in DTYPES.values() if d.safetensors == entry["dtype"]), None)
    label = f"torch.{known.name}" if known else entry["dtype"]
    return json.dumps([name, label, list(entry["shape"])]).encode()


def _feed(fh: Any, count: int, weights: Path, where: str, digest: Any,
          beside: tuple[ThreadPoolExecutor, Any] | None = None) -> None:
    """Read ``count`` bytes from ``fh`` in blocks into ``digest`` (and the digest of ``beside``,
    updated on its pool's thread meanwhile)."""
    while count > 0:
        block = fh.read(min(count, _READ_BYTES))
        if not block:
            raise CheckpointError(f"{weights}: ends inside {where}; re-copy or re-save the checkpoint")
        other = beside[0].submit(beside[1].update, block) if beside else None
        digest.update(block)
        if other is not None:
            other.result()
        count -= len(block)


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
    data_start: int  # where the data begins: data_offsets count from here


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
    return _Header(header, metadata, declared, 8 + header_len)


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
    # The weights copied are the file whose header was read (directory / WEIGHTS_FILE when
    # ``path`` is the directory), bounded by the size that header declares.
    _copy_bounded(weights, Path(target) / WEIGHTS_FILE, header.declared_bytes)
    _copy_documents(directory, names, Path(target))
    return names


def write_dense_checkpoint(src_dir: str | Path, dest_dir: str | Path, *, source_sha256: str | None = None) -> list[str]:
    """A bundle's copy of a checkpoint without its item table: ``dest_dir/model.safetensors``
    holds the dense tensors (a few MB) and records that the table is external (the bundle's
    tables/ holds its rows once), the source's sha256 (``source_sha256`` when the caller has it,
    else computed) and its own digest; the documents are copied as ``copy_checkpoint`` does.
    Returns the names written. load_checkpoint reads it back with the bundle's table."""
    directory, weights = _resolve(src_dir)
    header = _read_header(weights)
    if _is_dense_only(header.metadata, weights):
        raise CheckpointError(f"{weights}: already a dense-only copy (its item table is in a bundle); "
                              "export from the original checkpoint")
    _check_against_config(header.tensors, read_checkpoint_config(directory), weights)
    names = _documents(directory, weights, header.metadata)
    dense = _read_dense(weights, header)
    metadata = {k: v for k, v in header.metadata.items() if k != _META_DIGEST}
    metadata[_META_TABLE] = _EXTERNAL
    metadata[_META_SOURCE] = source_sha256 or checkpoint_sha256(weights)
    metadata[_META_DIGEST] = _tensor_digest(dense, metadata)
    target = Path(dest_dir)
    target.mkdir(parents=True, exist_ok=True)
    try:
        save_file(dense, str(target / WEIGHTS_FILE), metadata=metadata)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{target}: the dense checkpoint could not be written ({one_line(exc)}); "
                              "check the output folder") from None
    _copy_documents(directory, names, target)
    return names


def _copy_documents(directory: Path, names: list[str], target: Path) -> None:
    for name in names:
        if name != WEIGHTS_FILE:
            _copy_bounded(directory / name, target / name, MAX_DOCUMENT_BYTES)


def _copy_bounded(source: Path, target: Path, bound: int) -> None:
    try:
        copy_regular_file(source, target, max_bytes=bound)
    except ArtifactError as exc:
        raise CheckpointError(str(exc)) from None


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


def _check_against_config(header: dict[str, dict], cfg: ASTROConfig, weights: Path, *,
                          dense_only: bool = False) -> None:
    expected = _expected_shapes(cfg)
    if dense_only:
        del expected[ITEM_TABLE_TENSOR]
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
    "CONFIG_FILE", "ITEM_TABLE_TENSOR", "WEIGHTS_FILE", "Checkpoint", "checkpoint_documents", "checkpoint_sha256",
    "copy_checkpoint", "load_checkpoint", "read_checkpoint_config", "save_checkpoint",
    "write_dense_checkpoint",
]
