"""Host-side request validation (runtime/gate.py): what the runtime checks before a GPU sees it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_history, small_config

from astro_trt.contract import BATCH, CANDIDATES
from astro_trt.errors import DataError
from astro_trt.runtime.gate import HISTORY_FIELDS, validate_candidates, validate_history

CFG = small_config()
PROFILE = {BATCH: (1, 1, 4), CANDIDATES: (1, 16, 32)}


def _history(batch: int = 2):
    return random_history(CFG, batch, torch.Generator().manual_seed(0))


def _mapping(batch: int = 2) -> dict[str, np.ndarray]:
    return dict(zip(HISTORY_FIELDS, (t.numpy().copy() for t in _history(batch).astuple()), strict=True))


def test_valid_history_passes_as_history_or_mapping_and_is_int64_contiguous():
    h = _history()
    from_history = validate_history(CFG, h, PROFILE)
    from_mapping = validate_history(CFG, {k: v.astype(np.int32) for k, v in _mapping().items()}, PROFILE)
    for name, tensor in zip(HISTORY_FIELDS, h.astuple(), strict=True):
        np.testing.assert_array_equal(from_history[name], tensor.numpy())
        np.testing.assert_array_equal(from_mapping[name], tensor.numpy())
        assert from_mapping[name].dtype == np.int64 and from_mapping[name].flags.c_contiguous


@pytest.mark.parametrize(
    ("name", "index", "value", "message"),
    [
        ("hist_items", (0, 0, 0), CFG.num_items + 1, "hist_items: value 41 out of range 0..40"),
        ("hist_items", (1, 2, 3), -1, "hist_items: value -1 out of range"),
        # TARGET is reserved for candidate tokens: not a valid history behaviour.
        ("hist_behaviors", (0, 1, 1), CFG.num_behaviors, "hist_behaviors: value 4 out of range 0..3"),
        ("hist_lengths", (0, 0), CFG.max_len + 1, "hist_lengths: value 9 out of range 0..8"),
        ("scenario", (1,), CFG.num_scenarios, "scenario: value 2 out of range 0..1"),
        ("request_time", (0,), -5, "request_time: value -5"),
    ],
)
def test_out_of_range_ids_are_refused_with_the_name_and_range(name, index, value, message):
    data = _mapping()
    data[name][index] = value
    with pytest.raises(DataError, match=message):
        validate_history(CFG, data, PROFILE)


def test_shapes_dtypes_and_profile_limits():
    data = _mapping()
    data["hist_lengths"] = data["hist_lengths"][:, :2]
    with pytest.raises(DataError, match=r"hist_lengths: shape \(2, 2\), expected \[2, 3\]"):
        validate_history(CFG, data, PROFILE)
    data = _mapping()
    data["hist_times"] = data["hist_times"].astype(np.float32)
    with pytest.raises(DataError, match="expected integer ids"):
        validate_history(CFG, data, PROFILE)
    with pytest.raises(DataError, match=r"batch 5 is outside the engine profile 1\.\.4.*--max-batch"):
        validate_history(CFG, _mapping(5), PROFILE)
    with pytest.raises(DataError, match=r"shape \(2, 3, 8\), expected \[batch, 3, 9\]"):
        validate_history(small_config(max_len=9), _mapping(), PROFILE)
    with pytest.raises(DataError, match="missing"):
        validate_history(CFG, {"hist_items": _mapping()["hist_items"]}, PROFILE)


def test_candidates():
    cand = np.arange(1, 11).reshape(2, 5)
    np.testing.assert_array_equal(validate_candidates(CFG, torch.from_numpy(cand), 2, PROFILE), cand)
    with pytest.raises(DataError, match="padding is not a candidate"):
        validate_candidates(CFG, np.zeros((2, 3), dtype=np.int64), 2, PROFILE)
    with pytest.raises(DataError, match=r"candidates 33 is outside the engine profile 1\.\.32.*--max-candidates"):
        validate_candidates(CFG, np.ones((2, 33), dtype=np.int64), 2, PROFILE)
    with pytest.raises(DataError, match=r"expected \[2, candidates\]"):
        validate_candidates(CFG, np.ones((3, 4), dtype=np.int64), 2, PROFILE)
    with pytest.raises(DataError, match="no candidates"):
        validate_candidates(CFG, np.ones((2, 0), dtype=np.int64), 2, PROFILE)


def _events(data: dict[str, np.ndarray]) -> tuple[int, int, int]:
    """(user, block, slot) of the last event of the first block with 2..L-1 events."""
    lengths = data["hist_lengths"]
    b, k = (int(i) for i in np.argwhere((lengths >= 2) & (lengths < CFG.max_len))[0])
    return b, k, CFG.max_len - 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        # A left-aligned block: events first, the slots hist_lengths calls events hold padding.
        (lambda d, b, k, j: d["hist_items"].__setitem__((b, k), np.roll(d["hist_items"][b, k],
                                                                        d["hist_lengths"][b, k])),
         r"hist_items: (padding slot|event slot) \[.*right-align"),
        (lambda d, b, k, j: d["hist_behaviors"].__setitem__((b, k, j), 0),
         r"hist_behaviors: event slot \[\d, \d, 7\] holds the padding id 0"),
        (lambda d, b, k, j: d["hist_times"].__setitem__((b, k, j), d["hist_times"][b, k, j - 1] - 1),
         r"hist_times: value \d+ at \[\d, \d, 7\] is earlier than the event before it .*oldest first"),
        (lambda d, b, k, j: d["request_time"].__setitem__(b, d["hist_times"][b, k, j] - 1),
         r"hist_times: value \d+ at \[\d, \d, 7\] is after request_time\[\d\]"),
        (lambda d, b, k, j: d["hist_lengths"].__setitem__((b, k), d["hist_lengths"][b, k] - 1),
         r"hist_\w+: padding slot \[\d, \d, \d\] holds \d+ but hist_lengths\[\d, \d\]"),
    ],
    ids=["left-aligned", "event-behaviour-0", "times-unordered", "event-after-request", "length-short"],
)
def test_blocks_are_right_aligned_with_zero_padding_and_ordered_times(change, message):
    data = _mapping()
    change(data, *_events(data))
    with pytest.raises(DataError, match=message):
        validate_history(CFG, data, PROFILE)


def test_unsigned_ids_beyond_int64_are_named_as_sent_not_wrapped():
    data = _mapping()
    data["hist_items"] = data["hist_items"].astype(np.uint64)
    data["hist_items"][0, 0, 0] = np.uint64(2**64 - 3)  # as int64 this would be -3
    with pytest.raises(DataError, match=r"hist_items: value 18446744073709551613 at \[0, 0, 0\] does not fit int64"):
        validate_history(CFG, data, PROFILE)


@pytest.mark.parametrize("bad", [[[1, 2], [3]], "abc", {"a": 1}, None, [[1.5, 2.0]], np.array([[True]])])
def test_non_integer_candidates_are_refused_not_crashed(bad):
    with pytest.raises(DataError, match="cand_items"):
        validate_candidates(CFG, bad, 1, PROFILE)


def test_kv_cache_shape_dtype_batch_and_finite():
    from astro_trt.contract import kv_cache_shape
    from astro_trt.runtime.gate import validate_kv_cache

    shape = tuple(2 if d == BATCH else d for d in kv_cache_shape(CFG))
    kv = np.zeros(shape, dtype=np.float32)
    assert validate_kv_cache(CFG, kv, "fp32", 2) is not None
    assert validate_kv_cache(CFG, torch.zeros(shape, dtype=torch.bfloat16), "bf16", 2).dtype == torch.bfloat16
    with pytest.raises(DataError, match=r"kv_cache: dtype float32, expected float16 for fp16"):
        validate_kv_cache(CFG, kv, "fp16", 2)
    with pytest.raises(DataError, match=r"kv_cache: shape .*, expected \[3, "):
        validate_kv_cache(CFG, kv, "fp32", 3)  # the cache of 2 users scored with a history of 3
    bad = kv.copy()
    bad[1, 0, 2, 1, 0, 3, 5] = np.nan
    with pytest.raises(DataError, match=r"kv_cache: non-finite value nan at \[1, 0, 2, 1, 0, 3, 5\]"):
        validate_kv_cache(CFG, bad, "fp32", 2)
    with pytest.raises(DataError, match=r"kv_cache: non-finite value inf"):
        validate_kv_cache(CFG, torch.full(shape, float("inf")), "fp32", 2)
