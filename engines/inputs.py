"""Request validation on the host, before anything reaches the GPU: an engine given an
out-of-range id reads out of bounds silently, and a shape outside the optimization profile fails
deep inside TensorRT. Pure numpy, so it is tested on any machine."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from astro_trt.config import ASTROConfig
from astro_trt.contract import BATCH, CANDIDATES, HISTORY_INPUTS
from astro_trt.errors import DataError

HISTORY_FIELDS = HISTORY_INPUTS


def _as_int64(name: str, value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor: validation needs the host copy
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.dtype.kind not in "iu":
        raise DataError(f"{name}: expected integer ids, got dtype {array.dtype}; pass int64 arrays")
    return np.ascontiguousarray(array, dtype=np.int64)


def _check_range(name: str, array: np.ndarray, low: int, high: int, what: str) -> None:
    if array.size and (array.min() < low or array.max() > high):
        bad = array[(array < low) | (array > high)]
        raise DataError(f"{name}: value {int(bad.flat[0])} out of range {low}..{high} ({what})")


def _check_dim(name: str, size: int, axis: str, limits: tuple[int, int, int] | None, flag: str) -> None:
    if limits is not None and not limits[0] <= size <= limits[2]:
        raise DataError(
            f"{name}: {axis} {size} is outside the engine profile {limits[0]}..{limits[2]}; "
            f"split the request or re-export with a larger {flag}"
        )


def validate_history(
    cfg: ASTROConfig, history: Any, profile: Mapping[str, tuple[int, int, int]] | None = None
) -> dict[str, np.ndarray]:
    """A History (model/astro.py) or a mapping of contract names -> contiguous int64 arrays,
    checked against the config (ids, lengths, scenario) and the profile's batch range."""
    if isinstance(history, Mapping):
        missing = [n for n in HISTORY_FIELDS if n not in history]
        if missing:
            raise DataError(f"history is missing {missing}; it needs {list(HISTORY_FIELDS)}")
        raw = {n: history[n] for n in HISTORY_FIELDS}
    else:
        try:
            raw = dict(zip(HISTORY_FIELDS, history.astuple(), strict=True))
        except AttributeError as exc:
            raise DataError(f"history must be a History or a mapping of {list(HISTORY_FIELDS)} ({exc})") from None
    arrays = {n: _as_int64(n, v) for n, v in raw.items()}
    nb, length = cfg.num_blocks, cfg.max_len
    items = arrays["hist_items"]
    if items.ndim != 3 or items.shape[1:] != (nb, length):
        raise DataError(f"hist_items: shape {items.shape}, expected [batch, {nb}, {length}] (blocks, max_len)")
    batch = items.shape[0]
    expected = {"hist_behaviors": (batch, nb, length), "hist_times": (batch, nb, length),
                "hist_lengths": (batch, nb), "scenario": (batch,), "request_time": (batch,)}
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise DataError(f"{name}: shape {arrays[name].shape}, expected {list(shape)} for batch {batch}")
    _check_dim("hist_items", batch, BATCH, (profile or {}).get(BATCH), "--max-batch")
    if batch < 1:
        raise DataError("history: empty batch; send at least one user")
    _check_range("hist_items", items, 0, cfg.num_items, "item ids, 0 = padding")
    # TARGET (= num_behaviors) is reserved for candidate tokens, so history stops one below it.
    _check_range("hist_behaviors", arrays["hist_behaviors"], 0, cfg.num_behaviors - 1, "behaviour ids, 0 = padding")
    _check_range("hist_lengths", arrays["hist_lengths"], 0, length, "valid events per block")
    _check_range("scenario", arrays["scenario"], 0, cfg.num_scenarios - 1, "scenario ids")
    _check_range("hist_times", arrays["hist_times"], 0, np.iinfo(np.int64).max, "unix seconds")
    _check_range("request_time", arrays["request_time"], 0, np.iinfo(np.int64).max, "unix seconds")
    return arrays


def validate_candidates(
    cfg: ASTROConfig, cand_items: Any, batch: int, profile: Mapping[str, tuple[int, int, int]] | None = None
) -> np.ndarray:
    """cand_items [batch, M] int64 with ids 1..num_items and M inside the profile."""
    cand = _as_int64("cand_items", cand_items)
    if cand.ndim != 2 or cand.shape[0] != batch:
        raise DataError(f"cand_items: shape {cand.shape}, expected [{batch}, candidates] for batch {batch}")
    if cand.shape[1] < 1:
        raise DataError("cand_items: no candidates; send at least one per user")
    _check_dim("cand_items", cand.shape[1], CANDIDATES, (profile or {}).get(CANDIDATES), "--max-candidates")
    _check_range("cand_items", cand, 1, cfg.num_items, "candidate item ids, padding is not a candidate")
    return cand


__all__ = ["HISTORY_FIELDS", "validate_candidates", "validate_history"]
