"""Error statistics, ranking agreement and gates of the parity report, against direct numpy
computations (independent of Polygraphy) on known inputs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from astro_trt.validate.gates import GateResult, Gates
from astro_trt.validate.ranking import kendall_tau, mean_kendall_tau, topk_overlap
from astro_trt.validate.stats import abs_errors, error_stats


def test_error_stats_match_numpy():
    rng = np.random.default_rng(0)
    expected = rng.normal(size=(40, 7, 2)).astype(np.float32)
    actual = expected + rng.normal(scale=1e-3, size=expected.shape).astype(np.float32)
    s = error_stats(actual, expected, name="logits")
    diff = np.abs(actual.astype(np.float64) - expected)
    # float32 inputs: statistics agree with a float64 recomputation to float32 rounding of the diff.
    assert s.count == expected.size
    assert s.max_abs == pytest.approx(diff.max(), rel=1e-5)
    assert s.mean_abs == pytest.approx(diff.mean(), rel=1e-5)
    assert s.median_abs == pytest.approx(np.median(diff), rel=1e-4)
    assert s.quantile_abs == pytest.approx(np.quantile(diff, 0.99), rel=1e-4)
    assert s.max_rel == pytest.approx((diff / np.abs(expected)).max(), rel=1e-4)
    cosine = np.dot(actual.ravel().astype(np.float64), expected.ravel()) / (
        np.linalg.norm(actual.astype(np.float64)) * np.linalg.norm(expected.astype(np.float64)))
    assert s.cosine == pytest.approx(cosine, abs=1e-6)
    np.testing.assert_allclose(abs_errors(actual, expected), diff.ravel(), rtol=1e-5)


def test_error_stats_accepts_half_and_torch_and_rejects_shape_mismatch():
    x = torch.linspace(-2, 2, 64).reshape(8, 8)
    s = error_stats(x.to(torch.bfloat16), x)
    # bfloat16 spacing in [1, 2) is 2^-7, so rounding moves a value by at most half of it.
    assert 0 < s.max_abs <= 2.0**-8
    assert error_stats(x.numpy().astype(np.float16), x.numpy()).max_abs <= 2.0**-11 * 2
    assert error_stats(np.zeros(4), np.zeros(4)).cosine == 1.0
    with pytest.raises(ValueError, match="shapes differ"):
        error_stats(np.zeros((2, 3)), np.zeros((3, 2)))


def _tau_b_bruteforce(a, b):
    conc = disc = ties_a = ties_b = 0
    for i, j in itertools.combinations(range(len(a)), 2):
        da, db = a[i] - a[j], b[i] - b[j]
        if da == 0 and db == 0:
            continue
        if da == 0:
            ties_a += 1
        elif db == 0:
            ties_b += 1
        elif da * db > 0:
            conc += 1
        else:
            disc += 1
    return (conc - disc) / np.sqrt((conc + disc + ties_a) * (conc + disc + ties_b))


def test_kendall_tau_against_bruteforce_with_ties():
    rng = np.random.default_rng(1)
    for _ in range(20):
        a = rng.integers(0, 5, size=12).astype(float)
        b = a + rng.integers(-2, 3, size=12)
        assert kendall_tau(a, b) == pytest.approx(_tau_b_bruteforce(a, b), abs=1e-12)
    assert kendall_tau(np.arange(5.0), np.arange(5.0)) == 1.0
    assert kendall_tau(np.arange(5.0), -np.arange(5.0)) == -1.0


def test_topk_overlap_and_mask():
    a = np.array([[5.0, 4, 3, 2, 1], [1, 2, 3, 4, 5]])
    b = np.array([[5.0, 3, 4, 1, 2], [5, 4, 3, 2, 1]])
    # user 0: top-2 {0,1} vs {0,2} -> 1/2; user 1: top-2 {4,3} vs {0,1} -> 0.
    assert topk_overlap(a, b, 2) == pytest.approx(0.25)
    mask = np.array([[True, True, True, True, True], [True, False, False, False, False]])
    # user 1 keeps a single candidate: k clips to 1 and that one is shared.
    assert topk_overlap(a, b, 2, mask) == pytest.approx(0.75)
    assert mean_kendall_tau(a, a) == 1.0
    assert mean_kendall_tau(a, b, mask) == pytest.approx(kendall_tau(a[0], b[0]))


def test_gates_limits_and_failure_message():
    g = Gates()
    assert g.logits_limit("fp32", None) == 1e-4
    # fp16: 2x PyTorch's own error + 2 ulps at 1.0 (2 * 2^-10).
    assert g.logits_limit("fp16", 1e-3) == pytest.approx(2e-3 + 2 * 2.0**-10)
    assert g.split_full_limit("bf16", 0.0) == pytest.approx(2 * 2 * 2.0**-7)
    failed = GateResult("logits_max_abs", "ort fp32", value=3e-3, limit=1e-4)
    assert not failed.passed and "FAIL by 0.0029" in failed.describe() and "ort fp32" in failed.describe()
    assert GateResult("topk_overlap", "ort", 0.95, 0.9, higher_is_better=True).passed
    assert not GateResult("x", "y", float("nan"), 1.0).passed
