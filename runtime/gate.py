"""The input gate: every runner (runtime/runner.py: PyTorch, ONNX Runtime, TensorRT) and the served
models pass a request through here once, before a graph sees it. Graphs do not check their inputs: ONNX Runtime's
Gather wraps a negative id (-3 scores another item) and a TensorRT engine reads out of bounds
silently, so a value the gate lets through must be one the model was trained to read.

What a request must be (ASTRO's input contract; Nb blocks, L slots per block, N items, R
scenarios, b behaviour types):

- arrays of integers (any signed or unsigned width; returned as C-contiguous int64), one batch
  size B shared by every input, B >= 1 and M >= 1 candidates, both inside the engine profile
  when one is given;
- ``hist_lengths[b, k]`` in 0..L: block k holds that many events, right-aligned. The first
  L - len slots are padding and hold 0 in ``hist_items``, ``hist_behaviors`` and ``hist_times``;
  the last len slots are events with item ids 1..N and behaviour ids 1..b-1 (b itself is the
  reserved candidate behaviour). A non-zero padding slot or a zero event slot is refused: it
  almost always means a left-aligned block or a wrong length, which the graphs would score
  without complaint;
- event times are unix seconds >= 0, oldest first within a block (equal times allowed), and
  none after the user's ``request_time`` (>= 0): a history holds only events before the request;
- ``scenario`` in 0..R-1; ``cand_items`` in 1..N (0 is padding, never a candidate);
- no id is ever negative: negative values are refused everywhere, never wrapped;
- ``kv_cache`` (the scorer's input) has the contract's shape [B, N_L, Nb, 2, H, L, dh] and the
  precision's dtype, and only finite values.

A refusal is a DataError naming the input, the offending index and value, and the fix.
Pure numpy (torch tensors are read through their host copy), so it is tested on any machine.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from astro_trt.config import ASTROConfig
from astro_trt.contract import BATCH, CANDIDATES, HISTORY_INPUTS, KV_CACHE, float_dtype, kv_cache_shape
from astro_trt.errors import DataError

HISTORY_FIELDS = HISTORY_INPUTS
Ranges = Mapping[str, tuple[int, int, int]]  # a profile: axis -> (min, opt, max)
_INT64_MAX = int(np.iinfo(np.int64).max)


def _host(name: str, value: Any) -> np.ndarray:
    """Any array-like as a numpy array, or a DataError (never a numpy or torch exception)."""
    try:
        if hasattr(value, "detach"):  # a torch tensor: validation needs the host copy
            value = value.detach().cpu().numpy()
        return np.asarray(value)
    except (TypeError, ValueError, OverflowError, RuntimeError) as exc:
        raise DataError(f"{name}: not an array of numbers ({type(exc).__name__}: {str(exc)[:120]}); "
                        "pass a numpy array or tensor") from None


def _as_int64(name: str, value: Any) -> np.ndarray:
    array = _host(name, value)
    if array.dtype.kind not in "iu":
        raise DataError(f"{name}: expected integer ids, got dtype {array.dtype}; pass int64 arrays")
    if array.dtype.kind == "u" and array.size and int(array.max()) > _INT64_MAX:
        # Converting would wrap it to a negative int64: name the value the caller sent.
        at = np.unravel_index(int(np.argmax(array)), array.shape)
        raise DataError(f"{name}: value {int(array.max())} at {_index(at)} does not fit int64; pass int64 arrays")
    return np.ascontiguousarray(array, dtype=np.int64)


def _index(at: Any) -> str:
    return "[" + ", ".join(str(int(i)) for i in at) + "]"


def _first(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(mask)[0])


def _check_range(name: str, array: np.ndarray, low: int, high: int, what: str) -> None:
    if array.size and (array.min() < low or array.max() > high):
        at = _first((array < low) | (array > high))
        raise DataError(f"{name}: value {int(array[at])} out of range {low}..{high} at {_index(at)} ({what}); "
                        "send only values inside that range")


def _check_dim(name: str, size: int, axis: str, limits: tuple[int, int, int] | None, flag: str) -> None:
    if limits is not None and not limits[0] <= size <= limits[2]:
        raise DataError(
            f"{name}: {axis} {size} is outside the engine profile {limits[0]}..{limits[2]}; "
            f"split the request or re-export with a larger {flag}"
        )


def check_profile(profile: Ranges | None, *, batch: int | None = None, candidates: int | None = None,
                  what: str = "request") -> None:
    """B and M against a profile ({axis: (min, opt, max)}), e.g. to refuse a flag before any work."""
    if batch is not None:
        _check_dim(what, batch, BATCH, (profile or {}).get(BATCH), "--max-batch")
    if candidates is not None:
        _check_dim(what, candidates, CANDIDATES, (profile or {}).get(CANDIDATES), "--max-candidates")


def _history_mapping(history: Any) -> dict[str, Any]:
    if isinstance(history, Mapping):
        missing = [n for n in HISTORY_FIELDS if n not in history]
        if missing:
            raise DataError(f"history is missing {missing}; it needs {list(HISTORY_FIELDS)}")
        return {n: history[n] for n in HISTORY_FIELDS}
    astuple = getattr(history, "astuple", None)
    if not callable(astuple):
        raise DataError(f"history must be a History or a mapping of {list(HISTORY_FIELDS)}, "
                        f"got {type(history).__name__}")
    values = astuple()
    if len(values) != len(HISTORY_FIELDS):
        raise DataError(f"history has {len(values)} fields, expected {list(HISTORY_FIELDS)}")
    return dict(zip(HISTORY_FIELDS, values, strict=True))


def _check_blocks(cfg: ASTROConfig, arrays: dict[str, np.ndarray]) -> None:
    """Padding and event slots, right alignment, time order (the module docstring's rules)."""
    length = cfg.max_len
    lengths = arrays["hist_lengths"]
    event = np.arange(length) >= (length - lengths)[..., None]  # [B, Nb, L]: True on the last len slots
    for name in ("hist_items", "hist_behaviors", "hist_times"):
        padded = (arrays[name] != 0) & ~event
        if padded.any():
            at = _first(padded)
            raise DataError(
                f"{name}: padding slot {_index(at)} holds {int(arrays[name][at])} but hist_lengths"
                f"{_index(at[:2])} = {int(lengths[at[:2]])} makes it padding; blocks are right-aligned (events "
                "last, oldest first) and padding slots hold 0"
            )
    for name, what in (("hist_items", "item"), ("hist_behaviors", "behaviour")):
        empty = (arrays[name] == 0) & event
        if empty.any():
            at = _first(empty)
            raise DataError(
                f"{name}: event slot {_index(at)} holds the padding id 0 (hist_lengths{_index(at[:2])} = "
                f"{int(lengths[at[:2]])}); every event needs a {what} id >= 1: right-align each block and set "
                "hist_lengths to its number of events"
            )
    times = arrays["hist_times"]
    earlier = (np.diff(times, axis=-1) < 0) & event[..., :-1] & event[..., 1:]
    if earlier.any():
        b, k, j = _first(earlier)
        raise DataError(
            f"hist_times: value {int(times[b, k, j + 1])} at {_index((b, k, j + 1))} is earlier than the event "
            f"before it ({int(times[b, k, j])}); sort each block's events oldest first"
        )
    request = arrays["request_time"]
    late = (times > request[:, None, None]) & event
    if late.any():
        at = _first(late)
        raise DataError(
            f"hist_times: value {int(times[at])} at {_index(at)} is after request_time[{at[0]}] = "
            f"{int(request[at[0]])}; a history holds only events up to the request"
        )


def validate_history(cfg: ASTROConfig, history: Any, profile: Ranges | None = None) -> dict[str, np.ndarray]:
    """A History (model/astro.py) or a mapping of contract names -> contiguous int64 arrays,
    checked against the config (module docstring) and the profile's batch range."""
    arrays = {n: _as_int64(n, v) for n, v in _history_mapping(history).items()}
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
    if batch < 1:
        raise DataError("history: empty batch; send at least one user")
    _check_dim("hist_items", batch, BATCH, (profile or {}).get(BATCH), "--max-batch")
    _check_range("hist_items", items, 0, cfg.num_items, "item ids, 0 = padding")
    # TARGET (= num_behaviors) is reserved for candidate tokens, so history stops one below it.
    _check_range("hist_behaviors", arrays["hist_behaviors"], 0, cfg.num_behaviors - 1, "behaviour ids, 0 = padding")
    _check_range("hist_lengths", arrays["hist_lengths"], 0, length, "valid events per block")
    _check_range("scenario", arrays["scenario"], 0, cfg.num_scenarios - 1, "scenario ids")
    _check_range("hist_times", arrays["hist_times"], 0, _INT64_MAX, "unix seconds")
    _check_range("request_time", arrays["request_time"], 0, _INT64_MAX, "unix seconds")
    _check_blocks(cfg, arrays)
    return arrays


def validate_candidates(cfg: ASTROConfig, cand_items: Any, batch: int, profile: Ranges | None = None) -> np.ndarray:
    """cand_items [batch, M] int64 with ids 1..num_items and M inside the profile."""
    if cand_items is None:
        raise DataError("cand_items: none given; pass a [batch, candidates] array of item ids")
    cand = _as_int64("cand_items", cand_items)
    if cand.ndim != 2 or cand.shape[0] != batch:
        raise DataError(f"cand_items: shape {cand.shape}, expected [{batch}, candidates] for batch {batch}; "
                        "send one row of candidates per user")
    if cand.shape[1] < 1:
        raise DataError("cand_items: no candidates; send at least one per user")
    _check_dim("cand_items", cand.shape[1], CANDIDATES, (profile or {}).get(CANDIDATES), "--max-candidates")
    _check_range("cand_items", cand, 1, cfg.num_items, "candidate item ids, padding is not a candidate")
    return cand


def _dtype_name(value: Any) -> str:
    dtype = value.dtype
    return str(dtype).removeprefix("torch.") if hasattr(value, "detach") else np.dtype(dtype).name


def _finite(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.float16:
        # numpy's float16 arithmetic is emulated and slow (25 ms for a 19 MiB cache); inf and NaN
        # are exactly the values whose five exponent bits are all set.
        return (np.ascontiguousarray(array).view(np.uint16) & 0x7C00) != 0x7C00
    return np.isfinite(array)


def validate_kv_cache(cfg: ASTROConfig, kv_cache: Any, precision: str, batch: int, *, host: bool = False) -> Any:
    """The scorer's kv_cache: the contract's shape for ``batch`` users, the precision's dtype,
    finite values. Returns a numpy array as C-contiguous numpy, a torch tensor as it came (or,
    with ``host``, as C-contiguous numpy: what ONNX Runtime takes)."""
    expected_dtype = float_dtype(precision)
    expected = tuple(batch if d == BATCH else d for d in kv_cache_shape(cfg))
    is_torch = hasattr(kv_cache, "detach")
    if is_torch and getattr(kv_cache, "is_meta", False):
        raise DataError(f"{KV_CACHE}: a meta tensor holds no values; pass the cache the user encoder returned")
    if not is_torch:
        kv_cache = _host(KV_CACHE, kv_cache)
    shape = tuple(kv_cache.shape)
    if shape != expected:
        raise DataError(f"{KV_CACHE}: shape {list(shape)}, expected {list(expected)} (batch {batch} of the history); "
                        "pass the cache the user encoder returned for this history")
    if _dtype_name(kv_cache) != expected_dtype:
        raise DataError(f"{KV_CACHE}: dtype {_dtype_name(kv_cache)}, expected {expected_dtype} for {precision}; "
                        "pass the cache the user encoder of the same precision returned")
    if is_torch:
        finite = kv_cache.isfinite()
        if not bool(finite.all()):
            at = tuple(int(i) for i in (~finite).nonzero()[0])
            raise DataError(f"{KV_CACHE}: non-finite value {float(kv_cache[at])} at {_index(at)}; "
                            "re-encode the user (the cache must come from the user encoder)")
        return np.ascontiguousarray(_host(KV_CACHE, kv_cache)) if host else kv_cache
    finite = _finite(kv_cache)
    if not finite.all():
        at = _first(~finite)
        raise DataError(f"{KV_CACHE}: non-finite value {float(kv_cache[at])} at {_index(at)}; "
                        "re-encode the user (the cache must come from the user encoder)")
    return np.ascontiguousarray(kv_cache)


NO_CANDIDATES: Any = object()  # "encode: no candidates"; score(..., None) must still be refused


def gate(cfg: ASTROConfig, history: Any, cand_items: Any = NO_CANDIDATES,
         profile: Ranges | None = None) -> dict[str, np.ndarray]:
    """One request through the gate: contract name -> C-contiguous int64 array (the history, plus
    ``cand_items`` unless none are passed), both against ``profile``."""
    arrays = validate_history(cfg, history, profile)
    if cand_items is not NO_CANDIDATES:
        arrays["cand_items"] = validate_candidates(cfg, cand_items, arrays["hist_items"].shape[0], profile)
    return arrays


__all__ = ["HISTORY_FIELDS", "NO_CANDIDATES", "check_profile", "gate", "validate_candidates", "validate_history",
           "validate_kv_cache"]
