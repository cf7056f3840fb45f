"""TEMPORARY stand-in for the table helper's module (replaced at merge): the interface only."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from astro_trt.errors import DataError
from astro_trt.lazy import lazy_import
from astro_trt.precision import storage as storage_record

torch = lazy_import("torch")
TABLE_DIR = "tables"
REFERENCE_TABLE = "fp32"  # always stored: the checkpoint's own rows, what the oracle reads


@dataclass(frozen=True)
class TableFiles:
    storage: str
    rows: int
    dim: int
    path: str
    scales: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"storage": self.storage, "rows": self.rows, "dim": self.dim, "path": self.path, "scales": self.scales}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "manifest") -> TableFiles:
        return cls(d["storage"], int(d["rows"]), int(d["dim"]), d["path"], d.get("scales"))


class ItemTable:
    def __init__(self, array: np.ndarray, storage: str = "fp32", scales: np.ndarray | None = None) -> None:
        self.array, self.scales, self.storage = array, scales, storage_record(storage)
        self.rows, self.dim = (int(n) for n in array.shape)

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.rows):
            raise DataError(f"item id out of range 0..{self.rows - 1}")
        out = self.array[ids].astype(np.float32)
        return out * self.scales[ids][..., None] if self.scales is not None else out

    def lookup_torch(self, ids: Any) -> Any:
        return torch.from_numpy(self.lookup(ids.cpu().numpy()))

    @classmethod
    def from_array(cls, weight: np.ndarray, storage: str = "fp32") -> ItemTable:
        return cls(np.asarray(weight), storage)

    @classmethod
    def open(cls, directory: Path, files: TableFiles) -> ItemTable:
        record = storage_record(files.storage)
        array = np.memmap(Path(directory) / files.path, dtype=record.dtype.numpy(), mode="r",
                          shape=(files.rows, files.dim))
        scales = None if files.scales is None else np.memmap(Path(directory) / files.scales, dtype=np.float32,
                                                             mode="r", shape=(files.rows,))
        return cls(array, files.storage, scales)


def _stored_rows(self: ItemTable, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None]:
    return self.array[start:stop], None if self.scales is None else self.scales[start:stop]


ItemTable.stored_rows = _stored_rows


def write_tables(chunks, rows, dim, out_dir, storages):  # STAND-IN
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = np.concatenate(list(chunks)).astype(np.float32)
    written = {}
    for name in storages:
        record = storage_record(name)
        stored, scale = record.encode(table, axes=(1,))
        path = out_dir / f"item_table.{name}.bin"
        stored.tofile(path)
        files = [path]
        scales = None
        if scale is not None:
            sp = out_dir / f"item_table.{name}.scales.bin"
            scale.reshape(-1).astype(np.float32).tofile(sp)
            files.append(sp)
            scales = f"{TABLE_DIR}/{sp.name}"
        written[name] = (TableFiles(name, rows, dim, f"{TABLE_DIR}/{path.name}", scales), files)
    return written
