"""The item table on a CUDA device, for the TensorRT runtime: the engines take item rows (the
table is in no engine, contract.ITEM_ROWS), and a request's ids are gathered here, on the device,
right after they cross with the rest of the request, so a request still crosses once.

The table stays in its stored form on the device (fp32, fp16, or int8 with a float32 scale per
row: a quarter of the memory), and rows are dequantized to float32 as they are gathered. It is
uploaded in chunks of rows, so the host never holds more than one chunk besides the mapped file.
Needs a GPU; imports torch only when used.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from astro_trt.contract import ITEM_ROWS
from astro_trt.errors import BackendError
from astro_trt.lazy import lazy_import

torch = lazy_import("torch")

UPLOAD_ROWS = 1 << 16  # rows per host-to-device chunk: ~32 MB at d = 128 fp32


class DeviceItemTable:
    """``table`` (model/item_table.py ItemTable) copied to ``device`` as stored."""

    def __init__(self, table: Any, device: Any, chunk_rows: int = UPLOAD_ROWS) -> None:
        self.rows, self.dim, self.storage = int(table.rows), int(table.dim), table.storage
        self.device = device
        try:
            self.values = torch.empty((self.rows, self.dim), dtype=table.storage.dtype.torch(), device=device)
            self.scales = (torch.empty((self.rows,), dtype=torch.float32, device=device)
                           if table.storage.scaled else None)
        except torch.cuda.OutOfMemoryError:
            raise BackendError(f"the {table.storage.name} item table ({self.rows} x {self.dim}, "
                               f"{table.nbytes / 2**30:.2f} GiB) does not fit in the memory of {device}; serve "
                               "a smaller stored table (export --item-table fp16 or int8)") from None
        for start in range(0, self.rows, chunk_rows):
            stop = min(self.rows, start + chunk_rows)
            values, scales = table.stored_rows(start, stop)
            self.values[start:stop].copy_(torch.from_numpy(np.ascontiguousarray(values)))
            if self.scales is not None:
                self.scales[start:stop].copy_(torch.from_numpy(np.ascontiguousarray(scales)))

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes) + (0 if self.scales is None else int(self.scales.nbytes))

    def gather(self, ids: Any) -> Any:
        """Device ids [...] (already gated: 0..rows-1) -> float32 rows [..., dim] on the device."""
        flat = ids.reshape(-1)
        rows = self.values.index_select(0, flat).float()
        if self.scales is not None:
            rows = rows * self.scales.index_select(0, flat)[:, None]
        return rows.reshape(*ids.shape, self.dim)


def upload(arrays: dict[str, np.ndarray], device: Any, table: DeviceItemTable) -> dict[str, Any]:
    """Checked host arrays -> tensors on ``device`` (non-blocking, on the current stream), with the
    rows of their item ids (contract.ITEM_ROWS) gathered there from ``table``: the request's one crossing."""
    out = {n: torch.from_numpy(a).to(device, non_blocking=True) for n, a in arrays.items()}
    for ids, rows in ITEM_ROWS.items():
        if ids in out:
            out[rows] = table.gather(out[ids])
    return out


__all__ = ["DeviceItemTable", "UPLOAD_ROWS", "upload"]
