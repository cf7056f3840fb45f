"""The reference bodies of the two astro attention ops as ONNX model-local functions.

Each body is plugins/reference.py's arithmetic in standard opset-18 ops, input for input in the
reference's argument order, so ONNX Runtime and TensorRT-RTX (which inline local functions)
compute what the oracle computes (up to float32 reassociation), while full TensorRT with the
astro plugins registered runs the plugin instead. Like the reference, the body upcasts to
float32 and casts the result back to the dtype of q, which keeps half-precision graphs accurate
in the softmax.

What keeps the bodies cheap (every full-size [.., S, S] or [.., M, L] pass is time and memory):
- time buckets are "number of thresholds <= dt" (plugins/buckets.py), found by a float guess
  that integer comparisons against the exact thresholds correct, so every runtime agrees and
  memory stays O(1) per element;
- the time-bias table is gathered heads-last through one flat Gather whose index has one
  entry per element of dt, and hidden keys index a -inf row, so the mask costs no extra pass;
- the candidate side folds everything but q . k (biases, mask, 1 / tau) into one per-user row
  shared by all M candidates, and runs the softmax over [history ; self] without a
  concatenated score tensor.
"""

from __future__ import annotations

from typing import Any

import onnx
import onnx.inliner
from onnxscript import FLOAT, INT64, script
from onnxscript import opset18 as op
from onnxscript.values import Opset

from astro_trt.plugins.names import ONNX_DOMAIN, ONNX_OPSET_VERSION

astro = Opset(ONNX_DOMAIN, ONNX_OPSET_VERSION)


def time_bias_function(op: Any) -> Any:
    """The shared time-bias helper function for the opset ``op`` (18 here, 23 in native.py):
    one body, so the two lowerings cannot drift apart."""

    @script(astro, default_opset=op)
    def _time_bias(dt: INT64, visible, time_bias: FLOAT, time_thresholds: INT64) -> FLOAT:
        """dt [B, Nb, *S] int64 (rank 3 or 4), visible (bool, same shape) -> bias [B, Nb, *S, H]
        float32 (heads last), -inf where not visible: the mask rides on the gather for free."""
        # plugins/buckets.py bucketize, op for op: a float32 log guess, then one comparison against
        # each exact integer edge of the guessed bucket. O(1) memory per element of dt.
        count = op.Size(time_thresholds)  # n - 1
        xmax = op.Slice(time_thresholds, [-1], [9223372036854775807])  # [1]
        edges = op.Concat([-9223372036854775808], time_thresholds, [9223372036854775807], axis=0)
        scale = op.Div(
            op.Cast(op.Sub(count, 1), to=onnx.TensorProto.FLOAT),
            op.Log(op.Cast(op.Max(xmax, [2]), to=onnx.TensorProto.FLOAT)),
        )
        x = op.Min(dt, xmax)
        guess = op.Add(op.Floor(op.Mul(op.Log(op.Cast(op.Max(x, [1]), to=onnx.TensorProto.FLOAT)), scale)), 1.0)
        guess = op.Cast(
            op.Clip(guess, op.Constant(value_float=0.0), op.Cast(count, to=onnx.TensorProto.FLOAT)),
            to=onnx.TensorProto.INT64,
        )
        guess = op.Where(op.GreaterOrEqual(x, xmax), count, guess)  # x = xmax: the last bucket
        below = op.Cast(op.Less(x, op.Gather(edges, guess, axis=0)), to=onnx.TensorProto.INT64)
        above = op.Cast(op.GreaterOrEqual(x, op.Gather(edges, op.Add(guess, 1), axis=0)), to=onnx.TensorProto.INT64)
        bucket = op.Add(op.Sub(guess, below), above)  # [B, Nb, *S]
        # Heads last: the table as rows (block, bucket) of H values, so that the gather index is
        # [B, Nb, *S] (one int64 per element of dt) rather than one per head as well. Row NT of
        # each block is -inf: hidden keys point there.
        table_shape = op.Shape(time_bias)  # [Nb, H, NT]
        nb = op.Slice(table_shape, [0], [1])
        heads = op.Slice(table_shape, [1], [2])
        buckets = op.Slice(table_shape, [2], [3])
        hidden_row = op.Expand(op.Constant(value_float=float("-inf")), op.Concat(nb, heads, [1], axis=0))
        table = op.Concat(op.Cast(time_bias, to=onnx.TensorProto.FLOAT), hidden_row, axis=2)  # [Nb, H, NT + 1]
        rows = op.Reshape(op.Transpose(table, perm=[0, 2, 1]), op.Concat([-1], heads, axis=0))  # [Nb * (NT+1), H]
        offsets = op.Mul(op.Range(0, op.Squeeze(nb, [0]), 1), op.Add(buckets, 1))  # [Nb]: first row of each block
        extra_axes = op.Sub(op.Size(op.Shape(bucket)), 2)  # number of sequence axes (1 or 2)
        offsets = op.Reshape(offsets, op.Concat([1], nb, op.Expand([1], op.Reshape(extra_axes, [1])), axis=0))
        index = op.Add(op.Where(visible, bucket, op.Squeeze(buckets, [0])), offsets)
        return op.Gather(rows, index, axis=0)  # [B, Nb, *S, H]

    return _time_bias


def candidate_bias_function(op: Any, _time_bias: Any) -> Any:
    """CandidateAttention's per-user biases for the opset ``op``, built on that opset's
    ``time_bias_function``: one body for the reference and the native lowering."""

    @script(astro, default_opset=op)
    def _candidate_bias(hist, lengths, hist_times, request_time, pos_bias, time_bias, time_thresholds, tau):
        """hist [1] = L, tau [B, Nb, H, 1, 1] -> (history row [B, Nb, H, 1, L] scaled by tau, -inf at
        padding; the own key's bias [B, Nb, H, 1, 1] scaled by tau). Everything about the history
        keys except q . k is per user, so it is computed once and shared by all M candidates."""
        pos_table = op.Cast(pos_bias, to=onnx.TensorProto.FLOAT)
        pos = op.Range(0, op.Squeeze(hist, [0]), 1)  # [L]
        dt = op.Abs(op.Sub(op.Unsqueeze(request_time, [1, 2]), hist_times))  # [B, Nb, L]
        valid = op.GreaterOrEqual(pos, op.Unsqueeze(op.Sub(hist, lengths), [-1]))  # [B, Nb, L]
        hist_bias = op.Add(
            op.Unsqueeze(op.Gather(pos_table, op.Sub(hist, pos), axis=2), [0, 3]),
            op.Unsqueeze(op.Transpose(_time_bias(dt, valid, time_bias, time_thresholds), perm=[0, 1, 3, 2]), [3]),
        )  # [B, Nb, H, 1, L], -inf at padding
        hist_mask = op.Mul(hist_bias, tau)
        # Distance 0 and time difference 0 fall in bucket 0 of both tables.
        zero_bucket = op.Add(
            op.Gather(pos_table, 0, axis=2), op.Gather(op.Cast(time_bias, to=onnx.TensorProto.FLOAT), 0, axis=2)
        )  # [Nb, H]
        self_bias = op.Mul(op.Unsqueeze(zero_bucket, [0, 3, 4]), tau)
        return hist_mask, self_bias

    return _candidate_bias


_time_bias = time_bias_function(op)
_candidate_bias = candidate_bias_function(op, _time_bias)


@script(astro, default_opset=op)
def MultiScaleSelfAttention(q, k, v, lengths, times, pos_bias, time_bias, time_thresholds, inv_tau):
    """q, k, v [B, Nb, H, S, dh]; see plugins/reference.py multi_scale_self_attention."""
    qf = op.Cast(q, to=onnx.TensorProto.FLOAT)
    kf = op.Cast(k, to=onnx.TensorProto.FLOAT)
    vf = op.Cast(v, to=onnx.TensorProto.FLOAT)
    tau = op.Unsqueeze(op.Cast(inv_tau, to=onnx.TensorProto.FLOAT), [3, 4])  # [B, Nb, H, 1, 1]
    seq = op.Slice(op.Shape(q), [-2], [-1])  # [1]
    pos = op.Range(0, op.Squeeze(seq, [0]), 1)  # [S]
    pos_i = op.Unsqueeze(pos, [1])
    pos_j = op.Unsqueeze(pos, [0])
    dist = op.Abs(op.Sub(pos_i, pos_j))  # [S, S]

    # The time bias carries the mask too (-inf where hidden, from its gather); it and the position
    # bias (one [Nb, H, S, S] table, broadcast over B) are added into q . k, and 1 / tau scales the
    # sum: no separate full-size bias tensor, and dt's int64 chain starts only after q . k.
    valid = op.GreaterOrEqual(pos, op.Unsqueeze(op.Sub(seq, lengths), [-1]))  # [B, Nb, S]
    scores = op.MatMul(qf, op.Transpose(kf, perm=[0, 1, 2, 4, 3]))  # [B, Nb, H, S, S]
    dt = op.Abs(op.Sub(op.Unsqueeze(times, [-1]), op.Unsqueeze(times, [-2])))  # [B, Nb, S, S]
    visible = op.And(op.Unsqueeze(valid, [2]), op.LessOrEqual(pos_j, pos_i))  # [B, Nb, S, S]
    scores = op.Add(scores, op.Transpose(_time_bias(dt, visible, time_bias, time_thresholds), perm=[0, 1, 4, 2, 3]))
    scores = op.Add(scores, op.Gather(op.Cast(pos_bias, to=onnx.TensorProto.FLOAT), dist, axis=2))  # [Nb, H, S, S]
    scores = op.Mul(scores, tau)
    out = op.MatMul(op.Softmax(scores, axis=-1), vf)
    # Valid slots are a suffix, so a query sees some key iff its own slot is valid; the others
    # (all -inf, Softmax NaN) output zeros like the reference.
    out = op.Where(op.Unsqueeze(valid, [2, 4]), out, op.Constant(value_float=0.0))
    return op.CastLike(out, q)


@script(astro, default_opset=op)
def CandidateAttention(
    q, k, v, k_cache, v_cache, lengths, hist_times, request_time, pos_bias, time_bias, time_thresholds, inv_tau
):
    """q, k, v [B, Nb, H, M, dh]; k_cache, v_cache [B, Nb, H, L, dh]; see plugins/reference.py."""
    qf = op.Cast(q, to=onnx.TensorProto.FLOAT)
    kf = op.Cast(k, to=onnx.TensorProto.FLOAT)
    vf = op.Cast(v, to=onnx.TensorProto.FLOAT)
    kc = op.Cast(k_cache, to=onnx.TensorProto.FLOAT)
    vc = op.Cast(v_cache, to=onnx.TensorProto.FLOAT)
    tau = op.Unsqueeze(op.Cast(inv_tau, to=onnx.TensorProto.FLOAT), [3, 4])  # [B, Nb, H, 1, 1]
    hist = op.Slice(op.Shape(k_cache), [-2], [-1])  # [1] = L

    # The biases, 1 / tau and the padding mask fold into one [B, Nb, H, 1, L] additive row.
    hist_mask, self_bias = _candidate_bias(
        hist, lengths, hist_times, request_time, pos_bias, time_bias, time_thresholds, tau
    )

    qs = op.Mul(qf, tau)
    s_hist = op.Add(op.MatMul(qs, op.Transpose(kc, perm=[0, 1, 2, 4, 3])), hist_mask)  # [B, Nb, H, M, L]
    s_self = op.Add(op.ReduceSum(op.Mul(qs, kf), [-1], keepdims=1), self_bias)  # [B, Nb, H, M, 1]
    # The own key is always visible, so the row maximum is finite and no row is empty: the
    # softmax over [history ; self] runs without a concatenated score tensor.
    row_max = op.Max(op.ReduceMax(s_hist, [-1], keepdims=1), s_self)
    e_hist = op.Exp(op.Sub(s_hist, row_max))
    e_self = op.Exp(op.Sub(s_self, row_max))
    denom = op.Add(op.ReduceSum(e_hist, [-1], keepdims=1), e_self)
    out = op.Div(op.Add(op.MatMul(e_hist, vc), op.Mul(e_self, vf)), denom)
    return op.CastLike(out, q)


def function_protos() -> list[onnx.FunctionProto]:
    """The model-local functions every exported graph carries (helpers first, callers after)."""
    return [f.to_function_proto() for f in (_time_bias, _candidate_bias, MultiScaleSelfAttention, CandidateAttention)]



def attention_functions() -> list[onnx.FunctionProto]:
    """The two astro functions with their private helpers inlined, so that a graph carries exactly
    one local function per attention op and nothing else in the astro domain."""
    helpers = [(ONNX_DOMAIN, f.name) for f in (_time_bias, _candidate_bias)]
    holder = onnx.helper.make_model(
        onnx.helper.make_graph([], "holder", [], []),
        opset_imports=[onnx.helper.make_opsetid("", op.version),
                       onnx.helper.make_opsetid(ONNX_DOMAIN, ONNX_OPSET_VERSION)],
        functions=function_protos(),
    )
    inlined = onnx.inliner.inline_selected_functions(holder, helpers, exclude=False)
    return list(inlined.functions)
