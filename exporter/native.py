"""``--attention native``: the astro function nodes rewritten into ONNX Attention (opset 23).

Both ops become one Attention over 4-D [B * Nb, H, S, dh] tensors with q pre-scaled by 1 / tau,
scale = 1 and a materialized additive mask (bias / tau where visible, -inf elsewhere), which is
the form TensorRT fuses into IAttention in fp16/bf16 (docs/attention.md). Unlike the reference bodies
these keep q/k/v in the graph's precision: the fused kernel is the point.
- MultiScaleSelfAttention: a query with no visible key (a padding slot) makes Attention's softmax
  0/0; a Where on "any key visible" after the op restores the reference's zeros.
- CandidateAttention: keys are [K_cache (L) ; k_1..k_M] and the mask lets candidate i see the valid
  history and only its own k_i (the SUMI diagonal); every row sees itself, so no row is empty.
  The mask is O(M * (L + M)) per block and head, which is what a plugin avoids.
The rewrite swaps the function bodies and inlines them, so the result has no astro nodes.
"""

from __future__ import annotations

import onnx
import onnx.inliner
import onnx.version_converter
from onnxscript import opset23 as op
from onnxscript import script
from onnxscript.values import Opset

from astro_trt.exporter.functions import candidate_bias_function, time_bias_function
from astro_trt.plugins.names import CANDIDATE_ONNX_OP, MSA_ONNX_OP, ONNX_DOMAIN, ONNX_OPSET_VERSION

NATIVE_OPSET = op.version  # the onnxscript opset the Attention bodies are written in
astro = Opset(ONNX_DOMAIN, ONNX_OPSET_VERSION)


# The same bodies as the reference lowering, in opset 23.
_time_bias = time_bias_function(op)
_candidate_bias = candidate_bias_function(op, _time_bias)


@script(astro, default_opset=op)
def MultiScaleSelfAttention(q, k, v, lengths, times, pos_bias, time_bias, time_thresholds, inv_tau):
    shape = op.Shape(q)  # [B, Nb, H, S, dh]
    seq = op.Slice(shape, [-2], [-1])
    pos = op.Range(0, op.Squeeze(seq, [0]), 1)
    pos_i = op.Unsqueeze(pos, [1])
    pos_j = op.Unsqueeze(pos, [0])
    dt = op.Abs(op.Sub(op.Unsqueeze(times, [-1]), op.Unsqueeze(times, [-2])))
    tau = op.Unsqueeze(op.Cast(inv_tau, to=onnx.TensorProto.FLOAT), [3, 4])  # [B, Nb, H, 1, 1]
    dist = op.Abs(op.Sub(pos_i, pos_j))  # [S, S]
    valid = op.GreaterOrEqual(pos, op.Unsqueeze(op.Sub(seq, lengths), [-1]))  # [B, Nb, S]
    visible = op.And(op.Unsqueeze(valid, [2]), op.LessOrEqual(pos_j, pos_i))  # [B, Nb, S, S]
    bias = op.Add(
        op.Unsqueeze(op.Gather(op.Cast(pos_bias, to=onnx.TensorProto.FLOAT), dist, axis=2), [0]),
        op.Transpose(_time_bias(dt, visible, time_bias, time_thresholds), perm=[0, 1, 4, 2, 3]),
    )  # [B, Nb, H, S, S], -inf where hidden
    mask = op.CastLike(op.Mul(bias, tau), q)

    heads_seq_dim = op.Slice(shape, [2], [5])
    to_4d = op.Concat([-1], heads_seq_dim, axis=0)
    mask_4d = op.Reshape(mask, op.Concat([-1], op.Slice(shape, [2], [4]), seq, axis=0))  # mask is [B, Nb, H, S, S]
    out = op.Attention(
        op.Reshape(op.Mul(q, op.CastLike(tau, q)), to_4d),
        op.Reshape(k, to_4d),
        op.Reshape(v, to_4d),
        mask_4d,
        scale=1.0,
    )
    out = op.Reshape(out, shape)
    # Valid slots are a suffix, so a query sees some key iff its own slot is valid.
    return op.Where(op.Unsqueeze(valid, [2, 4]), out, op.CastLike(0.0, q))


@script(astro, default_opset=op)
def CandidateAttention(
    q, k, v, k_cache, v_cache, lengths, hist_times, request_time, pos_bias, time_bias, time_thresholds, inv_tau
):
    shape = op.Shape(q)  # [B, Nb, H, M, dh]
    hist = op.Slice(op.Shape(k_cache), [-2], [-1])  # [1] = L
    cands = op.Slice(shape, [-2], [-1])  # [1] = M
    tau = op.Unsqueeze(op.Cast(inv_tau, to=onnx.TensorProto.FLOAT), [3, 4])  # [B, Nb, H, 1, 1]
    neg_inf = op.Constant(value_float=float("-inf"))

    hist_mask, self_bias = _candidate_bias(
        hist, lengths, hist_times, request_time, pos_bias, time_bias, time_thresholds, tau
    )  # [B, Nb, H, 1, L] (-inf at padding), [B, Nb, H, 1, 1]
    m_range = op.Range(0, op.Squeeze(cands, [0]), 1)
    diagonal = op.Equal(op.Unsqueeze(m_range, [1]), op.Unsqueeze(m_range, [0]))  # [M, M]
    self_mask = op.Where(diagonal, self_bias, neg_inf)  # [B, Nb, H, M, M]
    rows = op.Concat(op.Slice(shape, [0], [4]), hist, axis=0)  # [B, Nb, H, M, L]
    mask = op.CastLike(op.Concat(op.Expand(hist_mask, rows), self_mask, axis=-1), q)

    keys = op.Add(hist, cands)
    to_4d = op.Concat([-1], op.Slice(shape, [2], [5]), axis=0)
    kv_4d = op.Concat([-1], op.Slice(shape, [2], [3]), keys, op.Slice(shape, [4], [5]), axis=0)
    mask_4d = op.Concat([-1], op.Slice(shape, [2], [4]), keys, axis=0)
    out = op.Attention(
        op.Reshape(op.Mul(q, op.CastLike(tau, q)), to_4d),
        op.Reshape(op.Concat(op.CastLike(k_cache, q), k, axis=-2), kv_4d),
        op.Reshape(op.Concat(op.CastLike(v_cache, q), v, axis=-2), kv_4d),
        op.Reshape(mask, mask_4d),
        scale=1.0,
    )
    return op.Reshape(out, shape)


def native_functions() -> list[onnx.FunctionProto]:
    return [f.to_function_proto() for f in (_time_bias, _candidate_bias, MultiScaleSelfAttention, CandidateAttention)]


def lower_native(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace the astro function bodies by the Attention forms and inline them (opset 23)."""
    # Raise the traced graph to opset 23 first; its ops only gained types between 18 and 23.
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    del bare.functions[:]
    converted = onnx.version_converter.convert_version(bare, NATIVE_OPSET)
    converted.functions.extend(native_functions())
    return onnx.inliner.inline_local_functions(converted)


__all__ = ["lower_native", "NATIVE_OPSET", "MSA_ONNX_OP", "CANDIDATE_ONNX_OP"]
