"""The two attention operators as torch custom ops (``astro::...``) for tracing.

Tracing through a custom op keeps each attention call one opaque node, which the symbolic
functions (exporter/symbolic.py) turn into one ``astro`` ONNX node; the reference is the eager
implementation, so a model using ExportOps computes exactly what the oracle computes.
"""

from __future__ import annotations

import torch

from astro_trt.plugins import reference

MSA_TORCH_OP = "astro::multi_scale_self_attention"
CANDIDATE_TORCH_OP = "astro::candidate_attention"


@torch.library.custom_op(MSA_TORCH_OP, mutates_args=())
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
    return reference.multi_scale_self_attention(q, k, v, lengths, times, pos_bias, time_bias, time_thresholds, inv_tau)


@multi_scale_self_attention.register_fake
def _(q, k, v, lengths, times, pos_bias, time_bias, time_thresholds, inv_tau):
    return torch.empty_like(q)


@torch.library.custom_op(CANDIDATE_TORCH_OP, mutates_args=())
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
    return reference.candidate_attention(
        q, k, v, k_cache, v_cache, lengths, hist_times, request_time, pos_bias, time_bias, time_thresholds, inv_tau
    )


@candidate_attention.register_fake
def _(q, k, v, k_cache, v_cache, lengths, hist_times, request_time, pos_bias, time_bias, time_thresholds, inv_tau):
    return torch.empty_like(q)


class ExportOps:
    """AttentionOps (model/astro.py) that route both operators through the astro custom ops."""

    @staticmethod
    def multi_scale_self_attention(*args: torch.Tensor) -> torch.Tensor:
        return torch.ops.astro.multi_scale_self_attention(*args)

    @staticmethod
    def candidate_attention(*args: torch.Tensor) -> torch.Tensor:
        return torch.ops.astro.candidate_attention(*args)
