"""The exact threshold form of the log buckets against the float64 formula of docs/model.md §3.

The float64 formula can be wrong exactly at bucket edges: where xmax ** ((m-1)/(n-2)) is an
integer x, log(x) / log(xmax) * (n-2) is m-1 in real arithmetic but may round to m-1 - 1ulp,
and floor() then drops a whole bucket. The arbiter there is exact integer arithmetic:

    bucket(x) >= m  <=>  log(x)/log(xmax) * (n-2) >= m-1  <=>  x ** (n-2) >= xmax ** (m-1)

(for x >= 1, xmax >= 2), which ``integer_bucket`` evaluates with Python's unbounded integers,
independently of the threshold code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from astro_trt.plugins.buckets import (
    bucket_thresholds,
    bucketize,
    bucketize_counting,
    bucketize_reference,
    distance_table,
)


def integer_bucket(x: int, n: int, xmax: int) -> int:
    if x < 1:
        return 0
    if n < 3:
        return n - 1
    return 1 + sum(1 for m in range(2, n) if x ** (n - 2) >= xmax ** (m - 1))


def exact_buckets(x: np.ndarray, n: int, xmax: int) -> np.ndarray:
    thr = torch.tensor(bucket_thresholds(n, xmax), dtype=torch.int64)
    return bucketize(torch.from_numpy(x), thr).numpy()


# (n, xmax): the time buckets (32, 2^26), position buckets for L = 50 and 200, and cases whose
# thresholds are exact powers (64 = 2^6 with n = 8, 1000 = 10^3 with n = 11, 2^16 with n = 17,
# 32 = 2^5 with n = 7), where the float formula may land one ulp below an integer.
CASES = [(32, 2**26), (32, 50), (32, 200), (8, 64), (11, 1000), (17, 2**16), (7, 32), (3, 2), (6, 8), (40, 10**6)]


@pytest.mark.parametrize(("n", "xmax"), CASES)
def test_exact_form_equals_formula_for_every_x_up_to_a_million(n: int, xmax: int) -> None:
    x = np.arange(0, 10**6 + 1, dtype=np.int64)
    exact = exact_buckets(x, n, xmax)

    ratio = np.log(np.maximum(x, 1).astype(np.float64)) / math.log(xmax) * (n - 2)
    float_form = np.where(x < 1, 0, np.minimum(n - 1, 1 + np.floor(ratio))).astype(np.int64)
    # Away from an integer ratio a last-bit difference in log() cannot move floor(), so there
    # the vectorised float64 formula is exactly the reference; at near-integer ratios (and any
    # disagreement) the reference and the integer arbiter are evaluated one by one.
    near_edge = np.abs(ratio - np.round(ratio)) < 1e-9
    suspects = np.flatnonzero(near_edge | (exact != float_form))
    far = np.ones_like(near_edge)
    far[suspects] = False
    np.testing.assert_array_equal(exact[far], float_form[far])

    float_edge_misses = []
    for value in suspects.tolist():
        truth = integer_bucket(value, n, xmax)
        assert exact[value] == truth, f"exact form wrong at x={value}, n={n}, xmax={xmax}"
        if bucketize_reference(value, n, xmax) != truth:
            float_edge_misses.append(value)
    # Where the float64 formula misses, it is only ever at an exact power (an edge), never elsewhere.
    for value in float_edge_misses:
        assert any(value ** (n - 2) == xmax ** (m - 1) for m in range(2, n)), value


def test_float_formula_misses_an_exact_power_edge() -> None:
    """The caveat the exact form exists for. With n = 7 and xmax = 32 the thresholds are the
    powers 1, 2, 4, 8, 16, 32; x = 2 is an edge (2^5 = 32^1), yet in float64 (x86-64 glibc)
    log(2) / log(32) * 5 = 0.9999999999999999, so the formula puts x = 2 in bucket 1, not 2.
    A sweep of xmax in 2..199, 2^2..2^40, 10^2..10^12 and n in 3..64 found 565 of 20801
    exact-power edges misplaced this way; none for the defaults (32, 2^26) or (32, L)."""
    assert bucket_thresholds(7, 32) == [1, 2, 4, 8, 16, 32]
    exact = exact_buckets(np.arange(1, 33), 7, 32).tolist()
    assert exact == [integer_bucket(x, 7, 32) for x in range(1, 33)]
    assert exact[1] == 2  # x = 2
    # Another libm may round the other way; where the float form differs it is one bucket low.
    for x in (2, 4, 16):
        assert bucketize_reference(x, 7, 32) in (integer_bucket(x, 7, 32), integer_bucket(x, 7, 32) - 1)


@settings(max_examples=300, deadline=None)
@given(x=st.integers(0, 2**40), n=st.integers(3, 64), xmax=st.integers(2, 2**40))
def test_exact_form_is_right_for_large_x(x: int, n: int, xmax: int) -> None:
    truth = integer_bucket(x, n, xmax)
    assert exact_buckets(np.array([x]), n, xmax)[0] == truth
    if bucketize_reference(x, n, xmax) != truth:  # float64 may only miss at an exact power
        assert any(x ** (n - 2) == xmax ** (m - 1) for m in range(2, n))


@settings(max_examples=200, deadline=None)
@given(n=st.integers(2, 64), xmax=st.integers(2, 2**40))
def test_thresholds_are_sorted_start_at_one_and_end_at_xmax(n: int, xmax: int) -> None:
    thr = bucket_thresholds(n, xmax)
    assert len(thr) == n - 1 and thr[0] == 1
    assert thr == sorted(thr)
    if n >= 3:
        assert thr[-1] == xmax  # x = xmax is the first x of the last bucket
        assert exact_buckets(np.array([xmax - 1]), n, xmax)[0] <= n - 2 or n == 3 and xmax == 2


@pytest.mark.parametrize("xmax", [2, 50, 2**26])
def test_two_buckets_mean_zero_or_one(xmax: int) -> None:
    x = np.array([0, 1, 2, 10**9])
    np.testing.assert_array_equal(exact_buckets(x, 2, xmax), [0, 1, 1, 1])
    assert [bucketize_reference(int(v), 2, xmax) for v in x] == [0, 1, 1, 1]


def test_distance_table_gathers_by_bucketed_distance() -> None:
    n, length = 6, 50
    table = torch.arange(2 * 3 * n, dtype=torch.float32).reshape(2, 3, n)
    out = distance_table(table, length, n)
    assert out.shape == (2, 3, length + 1)
    for d in range(length + 1):
        torch.testing.assert_close(out[..., d], table[..., integer_bucket(d, n, length)], rtol=0, atol=0)


def test_history_of_length_one_puts_distance_one_in_the_last_bucket() -> None:
    """L = 1 makes the formula 0/0 (log 1 / log 1); the exact form extends 'x = xmax is the
    last bucket', which every other L obeys, so distance 1 (candidate to its one slot) -> n-1."""
    table = torch.arange(5, dtype=torch.float32)
    assert distance_table(table, 1, 5).tolist() == [0.0, 4.0]


def _edge_values(thresholds: list[int]) -> np.ndarray:
    """Every threshold and its two neighbours, dt = 0 and 1, values around 2^26 and far beyond."""
    thr = np.asarray(thresholds, dtype=np.int64)
    extra = [-(2**63), -1, 0, 1, 2, 2**26 - 1, 2**26, 2**26 + 1, 2**31, 2**40, 2**53 + 1, 2**62, 2**63 - 1]
    return np.unique(np.concatenate([thr - 1, thr, thr + 1, np.asarray(extra, dtype=np.int64)]))


@pytest.mark.parametrize(("n", "xmax"), [*CASES, (2, 5), (2, 2**26), (64, 2**40)])
def test_log_guess_with_one_correction_is_exact_at_every_edge(n: int, xmax: int) -> None:
    thr = torch.tensor(bucket_thresholds(n, xmax), dtype=torch.int64)
    x = torch.from_numpy(np.concatenate([_edge_values(thr.tolist()), np.arange(0, 5000, dtype=np.int64)]))
    got = bucketize(x, thr)
    torch.testing.assert_close(got, bucketize_counting(x, thr), rtol=0, atol=0)
    for value, bucket in zip(x.tolist(), got.tolist(), strict=True):
        if 0 <= value <= 2**62:
            assert bucket == integer_bucket(value, n, xmax)


def test_onnx_time_bias_body_on_onnx_runtime_equals_the_count_at_every_edge() -> None:
    """The exported body (exporter/functions.py) run by ONNX Runtime, whose float log is not
    PyTorch's: the correction must still land on the exact count, for both opsets it is built in."""
    import onnx
    import onnxruntime as ort
    from onnxscript import opset18, opset23

    from astro_trt.exporter.functions import time_bias_function
    from astro_trt.plugins.names import ONNX_DOMAIN, ONNX_OPSET_VERSION

    h = onnx.helper
    for opset in (opset18, opset23):
        body = time_bias_function(opset).to_function_proto()
        graph = h.make_graph(
            [h.make_node(body.name, ["dt", "visible", "table", "thresholds"], ["bias"], domain=body.domain)],
            "time_bias",
            [h.make_tensor_value_info("dt", onnx.TensorProto.INT64, None),
             h.make_tensor_value_info("visible", onnx.TensorProto.BOOL, None),
             h.make_tensor_value_info("table", onnx.TensorProto.FLOAT, None),
             h.make_tensor_value_info("thresholds", onnx.TensorProto.INT64, None)],
            [h.make_tensor_value_info("bias", onnx.TensorProto.FLOAT, None)])
        model = h.make_model(graph, functions=[body], opset_imports=[
            h.make_opsetid("", opset.version), h.make_opsetid(ONNX_DOMAIN, ONNX_OPSET_VERSION)])
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        for n, xmax in [(32, 2**26), (7, 32), (3, 2), (2, 5), (40, 10**6)]:
            thresholds = bucket_thresholds(n, xmax)
            dt = _edge_values(thresholds)
            table = np.arange(2 * 3 * n, dtype=np.float32).reshape(2, 3, n)  # bias = row offset + bucket
            dt3 = np.broadcast_to(np.abs(dt), (1, 2, dt.size)).copy()
            visible = np.arange(dt3.size).reshape(dt3.shape) % 7 != 3  # some keys hidden: -inf there
            (bias,) = session.run(None, {"dt": dt3, "visible": visible, "table": table,
                                         "thresholds": np.asarray(thresholds, np.int64)})
            want = bucketize_counting(torch.from_numpy(dt3), torch.tensor(thresholds)).numpy()  # [1, 2, S]
            # bias [1, Nb=2, S, H=3] (heads last) = table[block, head, bucket]
            expected = table[np.arange(2)[:, None, None], np.arange(3)[None, None, :], want[0][:, :, None]][None]
            np.testing.assert_array_equal(bias, np.where(visible[..., None], expected, -np.inf))
