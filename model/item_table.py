"""The item embedding table, stored once per storage precision outside every graph and engine
(ARCHITECTURE.md decision 8), and the one way anything reads its rows.

A bundle keeps it in ``tables/``: ``item_table.<storage>.bin`` is the raw row-major [rows, dim]
array of the storage's dtype, little-endian, no header (rows = num_items + 1, row 0 the padding
row); a scaled storage (int8) adds ``item_table.<storage>.scales.bin``, float32 [rows], one
symmetric scale per row (astro_trt/precision.py's ``Storage.encode`` with ``axes=(1,)``). A raw
file maps with ``np.memmap`` as it is and costs no memory until read; a lookup reads only the rows
it asks for (through the map for a small table, by positioned reads for a large one: MAP_BYTES).
The manifest records and hashes the files like every other.

Writing streams float32 row chunks into every requested storage at once (the table is never
whole in memory); reading checks each file's size against the shape first, so a truncated or
padded file never maps.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from astro_trt import precision
from astro_trt.artifacts import check_free_space
from astro_trt.config import ASTROConfig
from astro_trt.errors import AstroError, BundleError, CheckpointError, DataError
from astro_trt.lazy import lazy_import
from astro_trt.manifest import inside
from astro_trt.precision import STORAGE, Storage

# The oracle's lookup hands torch tensors to the model; nothing else here needs torch.
torch = lazy_import("torch")

TABLE_DIR = "tables"
# The storage that holds the checkpoint's own rows: the oracle's, and what the others are judged against.
REFERENCE_TABLE = "fp32"
# Rows per streamed chunk are sized by bytes: 64 MiB of float32 rows (131,072 rows at d_model 128)
# keeps the writer's buffers (the chunk and one encoded copy per storage) well under 0.5 GiB.
CHUNK_BYTES = 64 << 20
# A file-backed table larger than this is read with positioned reads of the rows looked up, not
# through its map. On this project's Linux (6.18) the page cache holds a file in large folios (up to
# 2 MiB) and a fault maps the whole folio, so every random row read through a map added ~2 MiB to
# the process's RSS: 400 random rows of the 10M-item table (5.1 GB) mapped 747 MiB, 10,400 rows
# 4.7 GiB (2026-12-03, /proc/self/status RssFile; MADV_RANDOM and MADV_NOHUGEPAGE changed nothing).
# Positioned reads copy only the rows (~3 us a row on this 2-core machine, shared); a table up to
# this size may as well become resident whole, and is gathered through its map.
MAP_BYTES = 256 << 20
# float16's largest finite value: a row beyond it would be stored as inf.
_FP16_MAX = float(np.finfo(np.float16).max)


def table_relpath(name: str) -> str:
    """Where a storage's rows live in a bundle, relative to it."""
    return f"{TABLE_DIR}/item_table.{name}.bin"


def scales_relpath(name: str) -> str:
    """Where a scaled storage's per-row scales live in a bundle, relative to it."""
    return f"{TABLE_DIR}/item_table.{name}.scales.bin"


def chunk_rows(dim: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows of ``dim`` float32 values in one streamed chunk."""
    return max(1, chunk_bytes // (4 * dim))


def _file_dtype(record: Storage) -> np.dtype:
    """The stored element type as written to disk: little-endian whatever the host."""
    return record.dtype.numpy().newbyteorder("<")


_SCALE_DTYPE = np.dtype("<f4")


def table_shape(cfg: ASTROConfig) -> tuple[int, int]:
    """[rows, dim] of ``cfg``'s item table: one row per item id and row 0 for padding."""
    return cfg.num_items + 1, cfg.d_model


def planned_table_bytes(cfg: ASTROConfig, storages: Sequence[str]) -> int:
    """Bytes the table files of ``storages`` take on disk for ``cfg`` (what a free-space check plans)."""
    rows, dim = table_shape(cfg)
    return sum(precision.storage(name).bytes_for(rows * dim, groups=rows) for name in dict.fromkeys(storages))


@dataclass(frozen=True)
class TableFiles:
    """A manifest entry: one storage's table files in a bundle."""

    storage: str  # fp32, fp16, int8 (astro_trt/precision.py STORAGE)
    rows: int  # num_items + 1
    dim: int  # d_model
    path: str  # of the rows, relative to the bundle
    scales: str | None  # of the per-row scales (scaled storages only), relative to the bundle

    def to_dict(self) -> dict[str, Any]:
        return {"storage": self.storage, "rows": self.rows, "dim": self.dim, "path": self.path,
                "scales": self.scales}

    @classmethod
    def from_dict(cls, d: object, source: str) -> TableFiles:
        """Read a manifest entry; anything malformed is one BundleError naming ``source`` and the field."""
        def bad(problem: str) -> BundleError:
            return BundleError(f"{source}: item table entry {problem}; re-export the bundle")

        if not isinstance(d, dict):
            raise bad(f"is a {type(d).__name__}, not an object")
        fields = ("storage", "rows", "dim", "path", "scales")
        if set(d) != set(fields):
            raise bad(f"has fields {sorted(d)}, expected {sorted(fields)}")
        name = d["storage"]
        if not isinstance(name, str) or name not in STORAGE:
            raise bad(f"storage {name!r} is not one of {list(STORAGE)}")
        for key in ("rows", "dim"):
            if type(d[key]) is not int or d[key] < 1:
                raise bad(f"{key} {d[key]!r} is not a positive integer")
        if not isinstance(d["path"], str) or not d["path"]:
            raise bad(f"path {d['path']!r} is not a file name")
        scaled = STORAGE[name].scaled
        if scaled != isinstance(d["scales"], str) or (scaled and not d["scales"]):
            raise bad(f"scales {d['scales']!r}: storage {name} {'needs' if scaled else 'has no'} scales file")
        return cls(name, d["rows"], d["dim"], d["path"], d["scales"])


class ItemTable:
    """The item rows in one storage: mapped from a bundle's file, a view into a checkpoint's
    safetensors file, or in memory. ``lookup`` returns float32 rows (dequantized when scaled)."""

    def __init__(self, record: Storage, stored: np.ndarray | _RowReader, scales: np.ndarray | _RowReader | None = None
                 ) -> None:
        if len(stored.shape) != 2 or (scales is None) == record.scaled:
            raise ValueError("stored must be [rows, dim] and scales given exactly for a scaled storage")
        self.storage = record
        self._stored = stored
        self._scales = scales
        # A large file-backed table is not mapped but read row by row (MAP_BYTES).
        self._reader = stored if isinstance(stored, _RowReader) else None
        self._scale_reader = scales if isinstance(scales, _RowReader) else None

    @property
    def rows(self) -> int:
        return int(self._stored.shape[0])

    @property
    def dim(self) -> int:
        return int(self._stored.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes of the stored rows and scales (mapped, not necessarily resident)."""
        return int(self._stored.nbytes) + (int(self._scales.nbytes) if self._scales is not None else 0)

    def __repr__(self) -> str:
        return f"ItemTable({self.storage.name}, rows={self.rows}, dim={self.dim})"

    # ------------------------------------------------------------------ reading rows
    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """ids (any shape, integers in 0..rows-1) -> float32 [*ids.shape, dim]. Only the rows
        asked for are read. The input gate has already checked the ids; this check is the last
        line (one min and max): numpy would wrap a negative id to another row."""
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iu":
            raise DataError(f"item ids are {ids.dtype}, not integers; pass int64 item ids")
        if ids.size:
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= self.rows:
                raise DataError(f"item ids span {low}..{high} but the item table has rows 0..{self.rows - 1} "
                                "(0 is padding); pass ids the model was trained with (its config's num_items)")
        flat = ids.reshape(-1)
        # Each distinct row once (padding and popular items repeat), in file order.
        unique, inverse = np.unique(flat, return_inverse=True) if self._reader is not None else (None, None)
        if self._reader is not None:
            stored = self._reader.read(unique)[inverse]
        else:
            stored = self._stored[flat]  # fancy indexing: a memmap reads just these rows
        scale = None
        if self._scale_reader is not None:
            scale = self._scale_reader.read(unique)[inverse]
        elif self._scales is not None:
            scale = np.asarray(self._scales[flat])[:, None]
        return self.storage.decode(stored, scale).reshape(*ids.shape, self.dim)

    def stored_rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Rows start..stop-1 as stored (and their scales when scaled), for copying the table in
        chunks (to a device): a large file-backed table is read, not faulted in through its map."""
        if not 0 <= start <= stop <= self.rows:
            raise DataError(f"rows {start}..{stop - 1} are not inside the item table's 0..{self.rows - 1}; "
                            "ask for a range of its rows")
        stored = self._reader.read_range(start, stop) if self._reader is not None else self._stored[start:stop]
        if self._scales is None:
            return stored, None
        if self._scale_reader is not None:
            return stored, self._scale_reader.read_range(start, stop).reshape(-1)
        return stored, self._scales[start:stop]

    def float_chunks(self, rows_per_chunk: int | None = None) -> Iterator[np.ndarray]:
        """Every row in order as float32 chunks [k, dim] (dequantized), one chunk in memory at a
        time (``rows_per_chunk`` defaults to CHUNK_BYTES worth): what ``write_tables`` streams from a
        checkpoint's own table or a bundle's."""
        step = rows_per_chunk or chunk_rows(self.dim)
        for start in range(0, self.rows, step):
            stored, scales = self.stored_rows(start, min(self.rows, start + step))
            yield self.storage.decode(stored, None if scales is None else np.asarray(scales)[:, None])

    def lookup_torch(self, ids: Any) -> Any:
        """The PyTorch oracle's lookup: a CPU int tensor -> float32 CPU tensor [*ids.shape, dim]."""
        return torch.from_numpy(self.lookup(ids.detach().cpu().numpy()))

    # ------------------------------------------------------------------ construction
    @classmethod
    def open(cls, directory: Path, files: TableFiles) -> ItemTable:
        """Map a bundle's table files read-only. A file whose size is not what the shape needs is
        refused before it maps (a truncated table must never be read as a shorter one)."""
        record = precision.storage(files.storage)
        stored = _open_exact(inside(directory, files.path), _file_dtype(record), (files.rows, files.dim))
        scales = None
        if record.scaled:
            if files.scales is None:
                raise BundleError(f"{directory}: item table {files.storage} lists no scales file; re-export the bundle")
            scales = _open_exact(inside(directory, files.scales), _SCALE_DTYPE, (files.rows,))
        return cls(record, stored, scales)

    @classmethod
    def from_array(cls, weight: np.ndarray, storage: str = "fp32") -> ItemTable:
        """An in-memory table from float32 rows [rows, dim], encoded in ``storage``."""
        weight = np.asarray(weight)
        if weight.ndim != 2 or weight.dtype != np.float32:
            raise DataError(f"an item table is float32 [rows, dim], got {weight.dtype} {list(weight.shape)}; "
                            "pass the float32 embedding weight")
        record = precision.storage(storage)
        stored, scale = record.encode(weight, axes=(1,))
        return cls(record, stored, None if scale is None else scale.reshape(-1))

    @classmethod
    def mapped_view(cls, path: Path, offset: int, rows: int, dim: int, dtype: str = "float32") -> ItemTable:
        """The float32 rows stored at ``offset`` of ``path`` (a checkpoint's own table inside its
        safetensors file), mapped without a copy (read by position when large: MAP_BYTES). The
        caller has checked the offsets against the file's header; the size is checked again here,
        as the file may have changed since."""
        record = next((s for s in STORAGE.values() if s.dtype.name == dtype and not s.scaled), None)
        if record is None:
            raise CheckpointError(f"{path}: an item table stored as {dtype} cannot be mapped; "
                                  "save the float32 weights")
        need = offset + rows * dim * record.dtype.bytes
        size = Path(path).stat().st_size
        if size < need:
            raise CheckpointError(f"{path}: {size} bytes, but its item table needs bytes up to {need}; "
                                  "re-copy or re-save the checkpoint")
        return cls(record, _rows_of(Path(path), offset, _file_dtype(record), (rows, dim), CheckpointError))


def _rows_of(path: Path, offset: int, dtype: np.dtype, shape: tuple[int, ...],
             error: type[AstroError]) -> np.ndarray | _RowReader:
    """The array stored at ``offset`` of ``path``: mapped when small, else a reader of its rows
    (not mapped at all: neither its pages nor its address space count against the process)."""
    if int(np.prod(shape)) * dtype.itemsize > MAP_BYTES:
        return _RowReader(path, offset, dtype, shape, error)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


class _RowReader:
    """Positioned reads of whole rows of an array stored in a file, opened once (a file replaced
    at the path later is not read). Runs of consecutive rows are one read."""

    def __init__(self, path: Path, offset: int, dtype: np.dtype, shape: tuple[int, ...],
                 error: type[AstroError]) -> None:
        self._error = error
        self._path = path
        self._file = open(path, "rb", buffering=0)  # lives as long as the table
        self._offset = offset
        self._dtype = dtype
        self.shape = shape
        self._dim = int(np.prod(shape[1:]))  # 1 for the per-row scales
        self._row_bytes = self._dim * dtype.itemsize
        self.nbytes = shape[0] * self._row_bytes

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Sorted distinct row numbers -> their stored rows [len(rows), dim]."""
        out = np.empty((len(rows), self._dim), self._dtype)
        if not out.size:
            return out
        view = memoryview(out).cast("B")
        cuts = (np.flatnonzero(np.diff(rows) != 1) + 1).tolist()
        for start, end in zip([0, *cuts], [*cuts, len(rows)], strict=True):
            self._read_run(view[start * self._row_bytes:end * self._row_bytes], int(rows[start]))
        return out

    def read_range(self, start: int, stop: int) -> np.ndarray:
        """Stored rows start..stop-1 [stop - start, dim], in one run of reads."""
        out = np.empty((stop - start, self._dim), self._dtype)
        if out.size:
            self._read_run(memoryview(out).cast("B"), start)
        return out

    def _read_run(self, view: memoryview, first: int) -> None:
        done, want = 0, len(view)
        while done < want:  # a read stops at 2 GiB: long runs take several
            got = os.preadv(self._file.fileno(), [view[done:]], self._offset + first * self._row_bytes + done)
            if got <= 0:
                raise self._error(f"{self._path}: ends before row {first + want // self._row_bytes - 1} (it changed "
                                  "since it was opened); restore the file, or re-export or re-save it")
            done += got


def _open_exact(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray | _RowReader:
    """A bundle's table file, refused unless its size is exactly what ``shape`` needs."""
    expected = int(np.prod(shape)) * dtype.itemsize
    size = path.stat().st_size
    if size != expected:
        raise BundleError(f"{path}: {size} bytes, but a {dtype.name} table of shape {list(shape)} is {expected}; "
                          "the file is truncated or altered, re-export the bundle")
    return _rows_of(path, 0, dtype, shape, BundleError)


# ---------------------------------------------------------------------------- writing
def write_tables(chunks: Iterable[np.ndarray], rows: int, dim: int, out_dir: Path,
                 storages: Sequence[str]) -> dict[str, tuple[TableFiles, list[Path]]]:
    """Stream float32 row chunks ([k, dim] each, in row order) into the table files of every
    storage in ``storages`` at once. ``out_dir`` is the bundle's TABLE_DIR folder (created if
    missing); the entries' paths are relative to the bundle. Returns per storage its manifest
    entry and the files written. The files are written under temporary names and renamed only
    once every row has arrived finite and the count is ``rows``; on any refusal nothing is left
    behind. Never holds more than one chunk (and its encodings)."""
    records = [precision.storage(name) for name in dict.fromkeys(storages)]
    table_dir = Path(out_dir)
    check_free_space(table_dir, sum(r.bytes_for(rows * dim, groups=rows) for r in records), "item table")
    table_dir.mkdir(parents=True, exist_ok=True)
    targets: dict[str, list[tuple[Path, Path]]] = {}
    for record in records:
        names = [table_relpath(record.name)] + ([scales_relpath(record.name)] if record.scaled else [])
        finals = [table_dir / Path(n).name for n in names]
        targets[record.name] = [(final, final.with_name(f".{final.name}.partial")) for final in finals]
    handles: dict[Path, Any] = {}
    try:
        for pairs in targets.values():
            for _, partial in pairs:
                handles[partial] = open(partial, "xb")  # closed below, on every path
        written = 0
        for chunk in chunks:
            chunk = _checked_chunk(chunk, dim, written)
            if written + len(chunk) > rows:
                raise CheckpointError(f"the item table has more than the {rows} rows its config implies "
                                      "(num_items + 1); use the config.json the weights were trained with")
            for record in records:
                if record.dtype.name == "float16" and len(chunk) and np.abs(chunk).max() > _FP16_MAX:
                    worst = written + int(np.abs(chunk).max(axis=1).argmax())
                    raise CheckpointError(f"item table row {worst} exceeds float16's range ({_FP16_MAX:g}); "
                                          "choose another item table storage (fp32 or int8)")
                stored, scale = record.encode(chunk, axes=(1,))
                pairs = targets[record.name]
                # memoryview: the encoded chunk goes to the file without another copy.
                handles[pairs[0][1]].write(memoryview(np.ascontiguousarray(stored, dtype=_file_dtype(record))))
                if record.scaled:
                    handles[pairs[1][1]].write(memoryview(np.ascontiguousarray(scale.reshape(-1), dtype=_SCALE_DTYPE)))
            written += len(chunk)
        if written != rows:
            raise CheckpointError(f"the item table has {written} rows, its config implies {rows} (num_items + 1); "
                                  "use the config.json the weights were trained with")
        for handle in handles.values():
            handle.close()
        result: dict[str, tuple[TableFiles, list[Path]]] = {}
        for record in records:
            pairs = targets[record.name]
            for final, partial in pairs:
                os.replace(partial, final)
            files = TableFiles(record.name, rows, dim, table_relpath(record.name),
                               scales_relpath(record.name) if record.scaled else None)
            result[record.name] = (files, [final for final, _ in pairs])
        return result
    except BaseException:
        for handle in handles.values():
            handle.close()
        for pairs in targets.values():
            for _, partial in pairs:
                partial.unlink(missing_ok=True)
        raise


def _checked_chunk(chunk: np.ndarray, dim: int, first_row: int) -> np.ndarray:
    chunk = np.asarray(chunk)
    if chunk.dtype != np.float32 or chunk.ndim != 2 or chunk.shape[1] != dim:
        raise CheckpointError(f"item table rows from {first_row} are {chunk.dtype} {list(chunk.shape)}, expected "
                              f"float32 [k, {dim}] (d_model); save the float32 weights")
    finite = np.isfinite(chunk).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite) + first_row
        raise CheckpointError(f"item table rows {_few(bad)} hold NaN or inf; retrain or repair those rows "
                              "before exporting")
    return chunk


def _few(rows: np.ndarray, limit: int = 4) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:limit])
    return f"[{shown}{f', ... {len(rows) - limit} more' if len(rows) > limit else ''}]"


__all__ = [
    "CHUNK_BYTES", "REFERENCE_TABLE", "TABLE_DIR", "ItemTable", "TableFiles", "chunk_rows", "planned_table_bytes",
    "scales_relpath", "table_relpath", "write_tables",
]
