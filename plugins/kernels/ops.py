"""Python entry points of the Triton kernels, with exactly the reference's signatures.

``multi_scale_self_attention`` and ``candidate_attention`` replace
``astro_trt.plugins.reference.<same name>`` one for one; ``TritonOps`` plugs them into the model
(model/astro.py's AttentionOps). Tensors must be on a CUDA device, or on the CPU with
TRITON_INTERPRET=1 set before this package's kernels were first imported (Triton reads the flag
when it decorates a kernel), which is how CI checks the kernels against the reference.
"""

from __future__ import annotations

import os

import torch

from astro_trt.errors import BackendError, DataError

FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kernels():
    """Import the kernel modules lazily: importing ops must not need triton."""
    try:
        from astro_trt.plugins.kernels import candidate_attention as cand_mod
        from astro_trt.plugins.kernels import multi_scale_self_attention as msa_mod
    except ImportError as exc:  # pragma: no cover - triton is an optional dependency
        raise BackendError(
            f"the Triton kernels need the 'triton' package ({exc}); install it with "
            "`pip install 'astro-trt[triton]'` or use the reference operators"
        ) from None
    return msa_mod, cand_mod


def _is_interpreted(kernel) -> bool:
    return type(kernel).__name__ == "InterpretedFunction"


def _check_device(kernel, tensor: torch.Tensor) -> None:
    if tensor.is_cuda:
        return
    if not _is_interpreted(kernel):
        hint = (
            "TRITON_INTERPRET=1 is set now but the kernels were imported before it was; set it before the "
            "first import of astro_trt.plugins.kernels"
            if os.environ.get("TRITON_INTERPRET") == "1"
            else "move the tensors to a CUDA device, or set TRITON_INTERPRET=1 before importing the kernels "
            "to run them (slowly) on the CPU"
        )
        raise BackendError(f"the Triton attention kernels got {tensor.device} tensors; {hint}")


def _upcast(kernel, dtype: torch.dtype) -> bool:
    """Whether the kernel multiplies in float32 (see kernels.common.mma)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and _is_interpreted(kernel))


def _expect(name: str, tensor: torch.Tensor, shape: tuple[int, ...], kinds: tuple[torch.dtype, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise DataError(f"attention input '{name}' has shape {tuple(tensor.shape)}, expected {shape}; "
                        "pass tensors laid out as plugins/reference.py documents")
    if tensor.dtype not in kinds:
        raise DataError(f"attention input '{name}' has dtype {tensor.dtype}, expected one of "
                        f"{[str(k).replace('torch.', '') for k in kinds]}; cast it before the call")


def _head_block(dh: int) -> int:
    # tl.dot needs every tile dimension >= 16; narrower heads are zero-padded in registers.
    return max(16, triton_next_power_of_2(dh))


def triton_next_power_of_2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _check_common(q, k, v, lengths, pos_bias, time_bias, time_thresholds, inv_tau, need_pos: int) -> None:
    if q.dim() != 5:
        raise DataError(f"attention input 'q' must be [B, Nb, H, S, dh], got shape {tuple(q.shape)}")
    if q.dtype not in FLOAT_TYPES:
        raise DataError(f"attention input 'q' has dtype {q.dtype}; the kernels take float32, float16 or bfloat16")
    b, nb, h, _, _ = q.shape
    _expect("k", k, tuple(q.shape), (q.dtype,))
    _expect("v", v, tuple(q.shape), (q.dtype,))
    _expect("lengths", lengths, (b, nb), (torch.int64, torch.int32))
    if pos_bias.dim() != 3 or tuple(pos_bias.shape[:2]) != (nb, h) or pos_bias.shape[2] < need_pos:
        raise DataError(f"attention input 'pos_bias' has shape {tuple(pos_bias.shape)}, expected [{nb}, {h}, P] "
                        f"with P >= {need_pos} (one entry per distance; see plugins.buckets.distance_table)")
    if pos_bias.dtype not in FLOAT_TYPES:
        raise DataError(f"attention input 'pos_bias' has dtype {pos_bias.dtype}; use a float type")
    if time_bias.dim() != 3 or tuple(time_bias.shape[:2]) != (nb, h) or time_bias.dtype not in FLOAT_TYPES:
        raise DataError(f"attention input 'time_bias' has shape {tuple(time_bias.shape)} dtype {time_bias.dtype}, "
                        f"expected float [{nb}, {h}, NT]")
    _expect("time_thresholds", time_thresholds, (time_bias.shape[2] - 1,), (torch.int64, torch.int32))
    _expect("inv_tau", inv_tau, (b, nb, h), FLOAT_TYPES)


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
    *,
    block_m: int = 64,
    block_n: int = 64,
) -> torch.Tensor:
    """Triton MultiScaleSelfAttention; arguments and result as in plugins/reference.py."""
    msa_mod, _ = _kernels()
    kernel = msa_mod.msa_fwd_kernel
    _check_common(q, k, v, lengths, pos_bias, time_bias, time_thresholds, inv_tau, need_pos=q.shape[3])
    b, nb, h, s, dh = q.shape
    _expect("times", times, (b, nb, s), (torch.int64, torch.int32))
    _check_device(kernel, q)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    block_m = min(block_m, max(16, triton_next_power_of_2(s)))
    block_n = min(block_n, max(16, triton_next_power_of_2(s)))
    grid = ((s + block_m - 1) // block_m, b * nb * h)
    kernel[grid](
        q, k, v, out, lengths, times, pos_bias, time_bias, time_thresholds, inv_tau,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *lengths.stride(), *times.stride(), *pos_bias.stride(), *time_bias.stride(), *inv_tau.stride(),
        nb, h, s, dh,
        NUM_THR=time_thresholds.shape[0], BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_head_block(dh),
        UPCAST=_upcast(kernel, q.dtype),
    )
    return out


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
    *,
    block_m: int = 64,
    block_n: int = 64,
) -> torch.Tensor:
    """Triton CandidateAttention; arguments and result as in plugins/reference.py."""
    _, cand_mod = _kernels()
    kernel = cand_mod.candidate_fwd_kernel
    if k_cache.dim() != 5:
        raise DataError(f"attention input 'k_cache' must be [B, Nb, H, L, dh], got shape {tuple(k_cache.shape)}")
    hist = k_cache.shape[3]
    _check_common(q, k, v, lengths, pos_bias, time_bias, time_thresholds, inv_tau, need_pos=hist + 1)
    b, nb, h, m, dh = q.shape
    _expect("k_cache", k_cache, (b, nb, h, hist, dh), (q.dtype,))
    _expect("v_cache", v_cache, (b, nb, h, hist, dh), (q.dtype,))
    _expect("hist_times", hist_times, (b, nb, hist), (torch.int64, torch.int32))
    _expect("request_time", request_time, (b,), (torch.int64, torch.int32))
    _check_device(kernel, q)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    block_m = min(block_m, max(16, triton_next_power_of_2(m)))
    block_n = min(block_n, max(16, triton_next_power_of_2(max(hist, 1))))
    grid = ((m + block_m - 1) // block_m, b * nb * h)
    kernel[grid](
        q, k, v, k_cache, v_cache, out, lengths, hist_times, request_time, pos_bias, time_bias,
        time_thresholds, inv_tau,
        *q.stride(), *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
        *lengths.stride(), *hist_times.stride(), *request_time.stride(), *pos_bias.stride(),
        *time_bias.stride(), *inv_tau.stride(),
        nb, h, m, hist, dh,
        NUM_THR=time_thresholds.shape[0], BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_head_block(dh),
        UPCAST=_upcast(kernel, q.dtype),
    )
    return out


class TritonOps:
    """model/astro.py's AttentionOps backed by the Triton kernels."""

    multi_scale_self_attention = staticmethod(multi_scale_self_attention)
    candidate_attention = staticmethod(candidate_attention)
