"""Reference implementations of ASTRO's two attention operators, in plain PyTorch.

These are the oracle: the model calls them in eager mode, the exporter's ONNX function bodies
decompose exactly the same arithmetic, and every kernel and plugin is tested against them.
Signatures carry every learned quantity as a tensor (bias tables, inverse temperatures) so that
a kernel or a TensorRT plugin can replace a call one for one.

Common arguments (Nb blocks, H heads, dh head width, NT time buckets):
    lengths          [B, Nb] int64   valid history slots per block; valid slots are the LAST
                                     ``lengths`` of the sequence (right-aligned, padding first)
    pos_bias         [Nb, H, P] f    bias by position distance d = |pos_i - pos_j|, P > max d
                                     (already bucketed: plugins.buckets.distance_table)
    time_bias        [Nb, H, NT] f   bias by time bucket
    time_thresholds  [NT - 1] int64  bucket(dt) = number of thresholds <= dt
    inv_tau          [B, Nb, H] f    1 / temperature for the request's scenario

Scores are s_ij = (q_i . k_j + pos_bias[d_ij] + time_bias[bucket(|t_i - t_j|)]) * inv_tau.
All arithmetic runs in float32 whatever the input dtype; the output takes the input dtype.
A query that sees no key (a padding slot) outputs zeros, never NaN: padding rows feed the
next layer's padding K/V, which are masked but would still poison a matmul with NaN * 0.
"""

from __future__ import annotations

import torch

from astro_trt.plugins.buckets import bucketize


def _time_bias(
    dt: torch.Tensor, time_bias: torch.Tensor, time_thresholds: torch.Tensor
) -> torch.Tensor:
    """dt [B, Nb, *S] int64 -> bias [B, Nb, H, *S] float32."""
    bucket = bucketize(dt, time_thresholds)  # [B, Nb, *S], O(1) memory per element
    batch, nb = bucket.shape[:2]
    heads, buckets = time_bias.shape[1:]
    index = bucket.reshape(batch, nb, 1, -1).expand(batch, nb, heads, -1)
    table = time_bias.float().unsqueeze(0).expand(batch, nb, heads, buckets)
    return torch.gather(table, -1, index).reshape(batch, nb, heads, *bucket.shape[2:])


def _softmax_rows(scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis restricted to ``visible``; rows with nothing visible -> 0."""
    scores = scores.masked_fill(~visible, float("-inf"))
    row_max = scores.amax(-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)  # exp(-inf) = 0 for hidden keys
    denom = weights.sum(-1, keepdim=True)
    return weights / torch.where(denom > 0, denom, torch.ones_like(denom))


def multi_scale_self_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    times: torch.Tensor,
    pos_bias: torch.Tensor,
    time_bias: torch.Tensor,
    time_thresholds: torch.Tensor,
    inv_tau: torch.Tensor,
) -> torch.Tensor:
    """Causal, block-diagonal, relative-biased, temperature-scaled self-attention.

    q, k, v [B, Nb, H, S, dh]; times [B, Nb, S] int64 (the event times of the S slots).
    Token i sees token j iff j is valid and j <= i. Returns [B, Nb, H, S, dh].
    """
    dtype = q.dtype
    q, k, v = q.float(), k.float(), v.float()
    seq = q.shape[-2]
    pos = torch.arange(seq, device=q.device)
    dist = (pos[:, None] - pos[None, :]).abs()  # [S, S]
    dt = (times[..., :, None] - times[..., None, :]).abs()  # [B, Nb, S, S]

    scores = torch.einsum("bnhid,bnhjd->bnhij", q, k)
    scores = scores + pos_bias.float()[:, :, dist].unsqueeze(0)
    scores = scores + _time_bias(dt, time_bias, time_thresholds)
    scores = scores * inv_tau.float()[..., None, None]

    valid = pos >= (seq - lengths)[..., None]  # [B, Nb, S]
    visible = valid[:, :, None, None, :] & (pos[None, :] <= pos[:, None])  # [B, Nb, 1, S, S]
    weights = _softmax_rows(scores, visible)
    return torch.einsum("bnhij,bnhjd->bnhid", weights, v).to(dtype)


def candidate_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    hist_times: torch.Tensor,
    request_time: torch.Tensor,
    pos_bias: torch.Tensor,
    time_bias: torch.Tensor,
    time_thresholds: torch.Tensor,
    inv_tau: torch.Tensor,
) -> torch.Tensor:
    """M candidate queries per user against the user's cached history K/V plus their own K/V.

    q, k, v [B, Nb, H, M, dh] (the candidates' projections); k_cache, v_cache [B, Nb, H, L, dh];
    hist_times [B, Nb, L] int64; request_time [B] int64. A candidate sits at position L at
    time request_time; it sees every valid history slot of its block and itself, never another
    candidate (docs/model.md §3). Returns [B, Nb, H, M, dh].
    """
    dtype = q.dtype
    q, k, v = q.float(), k.float(), v.float()
    kc, vc = k_cache.float(), v_cache.float()
    hist = kc.shape[-2]
    pos = torch.arange(hist, device=q.device)

    s_hist = torch.einsum("bnhmd,bnhjd->bnhmj", q, kc)  # [B, Nb, H, M, L]
    s_hist = s_hist + pos_bias.float()[:, :, hist - pos][None, :, :, None, :]
    dt = (request_time[:, None, None] - hist_times).abs()  # [B, Nb, L]
    s_hist = s_hist + _time_bias(dt, time_bias, time_thresholds).unsqueeze(3)
    # Distance 0 and time difference 0 fall in bucket 0 of both tables.
    s_self = (q * k).sum(-1) + (pos_bias.float()[:, :, 0] + time_bias.float()[:, :, 0])[None, :, :, None]

    scores = torch.cat([s_hist, s_self.unsqueeze(-1)], dim=-1) * inv_tau.float()[..., None, None]
    valid = pos >= (hist - lengths)[..., None]  # [B, Nb, L]
    visible = torch.cat([valid, torch.ones_like(valid[..., :1])], dim=-1)[:, :, None, None, :]
    weights = _softmax_rows(scores, visible)
    out = torch.einsum("bnhmj,bnhjd->bnhmd", weights[..., :hist], vc) + weights[..., hist:] * v
    return out.to(dtype)
