"""Host-side request validation (engines/inputs.py): what the runtime checks before a GPU sees it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_history, small_config

from astro_trt.contract import BATCH, CANDIDATES
from astro_trt.engines.inputs import HISTORY_FIELDS, validate_candidates, validate_history
from astro_trt.errors import DataError

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
