"""Python entry points of the Triton kernels, with exactly the reference's signatures.

``multi_scale_self_attention`` and ``candidate_attention`` replace
``astro_trt.plugins.reference.<same name>`` one for one; ``TritonOps`` plugs them into the model
(model/astro.py's AttentionOps). Tensors must be on a CUDA device, or on the CPU with
TRITON_INTERPRET=1 set before this package's kernels were first imported (Triton reads the flag
when it decorates a kernel), which is how CI checks the kernels against the reference.
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch

from astro_trt.errors import BackendError, DataError
from astro_trt.plugins.kernels import blocks
from astro_trt.plugins.operators import ACTIVATION, CANDIDATE, MSA, Impl, Operator, Ops
from astro_trt.precision import float_dtypes, index_dtypes

FLOAT_TYPES = tuple(d.torch() for d in float_dtypes())
INDEX_TYPES = tuple(d.torch() for d in index_dtypes())
# The inputs both operator records have, which _check_common checks alike.
_COMMON = tuple(n for n in MSA.input_names if n in CANDIDATE.input_names)


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


def _target(kernel, tensor: torch.Tensor) -> str:
    """The compiled target the launch runs on (blocks.TARGETS); the interpreter has none."""
    if _is_interpreted(kernel) or not tensor.is_cuda:
        return blocks.INTERPRETER_TARGET
    return blocks.target_of(torch.cuda.get_device_capability(tensor.device))


def _check_common(q, k, v, lengths, pos_bias, time_bias, time_thresholds, inv_tau, need_pos: int) -> None:
    if q.dim() != 5:
        raise DataError(f"attention input 'q' must be [B, Nb, H, S, dh], got shape {tuple(q.shape)}")
    if q.dtype not in FLOAT_TYPES:
        raise DataError(f"attention input 'q' has dtype {q.dtype}; the kernels take {[d.name for d in float_dtypes()]}")
    b, nb, h, _, _ = q.shape
    _expect("k", k, tuple(q.shape), (q.dtype,))
    _expect("v", v, tuple(q.shape), (q.dtype,))
    _expect("lengths", lengths, (b, nb), INDEX_TYPES)
    if pos_bias.dim() != 3 or tuple(pos_bias.shape[:2]) != (nb, h) or pos_bias.shape[2] < need_pos:
        raise DataError(f"attention input 'pos_bias' has shape {tuple(pos_bias.shape)}, expected [{nb}, {h}, P] "
                        f"with P >= {need_pos} (one entry per distance; see plugins.buckets.distance_table)")
    if pos_bias.dtype not in FLOAT_TYPES:
        raise DataError(f"attention input 'pos_bias' has dtype {pos_bias.dtype}; use a float type")
    if time_bias.dim() != 3 or tuple(time_bias.shape[:2]) != (nb, h) or time_bias.dtype not in FLOAT_TYPES:
        raise DataError(f"attention input 'time_bias' has shape {tuple(time_bias.shape)} dtype {time_bias.dtype}, "
                        f"expected float [{nb}, {h}, NT]")
    _expect("time_thresholds", time_thresholds, (time_bias.shape[2] - 1,), INDEX_TYPES)
    _expect("inv_tau", inv_tau, (b, nb, h), FLOAT_TYPES)


def launch_config(rows: int, cols: int, head_dim: int, dtype: torch.dtype, target: str, block_m: int | None = None,
                  block_n: int | None = None) -> blocks.BlockConfig:
    """The block configuration of one launch: blocks.choose for (shape, target), unless a test
    overrides the tiles (small tiles make tiny shapes span several of them under the interpreter)."""
    cfg = blocks.choose(rows, cols, head_dim, dtype.itemsize, target)
    if block_m is None and block_n is None:
        return cfg
    return replace(cfg, block_m=min(block_m or cfg.block_m, cfg.block_m),
                   block_n=min(block_n or cfg.block_n, cfg.block_n))


def _launch(op: Operator, kernel, a: dict[str, torch.Tensor], dims: tuple[int, ...], rows: int, cols: int,
            block_m: int | None, block_n: int | None) -> torch.Tensor:
    """One kernel launch, its arguments in the order of ``op``'s inputs: the activations and the
    output, the other inputs, every tensor's strides (time_thresholds is read flat), then ``dims``;
    the tiles from launch_config."""
    _check_device(kernel, a["q"])
    out = torch.empty_like(a["q"], memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    activations = [*(a[n] for n in op.with_role(ACTIVATION)), out]
    others = [a[n] for n in op.input_names if n not in op.with_role(ACTIVATION)]
    strided = [*activations, *(a[n] for n in op.input_names if n not in (*op.with_role(ACTIVATION), "time_thresholds"))]
    b, nb, h, _, dh = a["q"].shape
    cfg = launch_config(rows, cols, dh, a["q"].dtype, _target(kernel, a["q"]), block_m, block_n)
    grid = ((rows + cfg.block_m - 1) // cfg.block_m, b * nb * h)
    kernel[grid](
        *activations, *others, *(stride for t in strided for stride in t.stride()), *dims,
        NUM_THR=a["time_thresholds"].shape[0], BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
        UPCAST=_upcast(kernel, a["q"].dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def multi_scale_self_attention(*args: torch.Tensor, block_m: int | None = None,
                               block_n: int | None = None) -> torch.Tensor:
    """Triton MultiScaleSelfAttention; arguments (plugins/operators.py MSA) and result as in plugins/reference.py."""
    msa_mod, _ = _kernels()
    a = MSA.bind(args)
    q = a["q"]
    _check_common(**{n: a[n] for n in _COMMON}, need_pos=q.shape[3])
    b, nb, h, s, dh = q.shape
    _expect("times", a["times"], (b, nb, s), INDEX_TYPES)
    return _launch(MSA, msa_mod.msa_fwd_kernel, a, (nb, h, s, dh), s, s, block_m, block_n)


def candidate_attention(*args: torch.Tensor, block_m: int | None = None,
                        block_n: int | None = None) -> torch.Tensor:
    """Triton CandidateAttention; arguments (plugins/operators.py CANDIDATE) and result as in plugins/reference.py."""
    _, cand_mod = _kernels()
    a = CANDIDATE.bind(args)
    q, k_cache = a["q"], a["k_cache"]
    if k_cache.dim() != 5:
        raise DataError(f"attention input 'k_cache' must be [B, Nb, H, L, dh], got shape {tuple(k_cache.shape)}")
    hist = k_cache.shape[3]
    _check_common(**{n: a[n] for n in _COMMON}, need_pos=hist + 1)
    b, nb, h, m, dh = q.shape
    _expect("k_cache", k_cache, (b, nb, h, hist, dh), (q.dtype,))
    _expect("v_cache", a["v_cache"], (b, nb, h, hist, dh), (q.dtype,))
    _expect("hist_times", a["hist_times"], (b, nb, hist), INDEX_TYPES)
    _expect("request_time", a["request_time"], (b,), INDEX_TYPES)
    return _launch(CANDIDATE, cand_mod.candidate_fwd_kernel, a, (nb, h, m, hist, dh), m, hist, block_m, block_n)


class TritonOps(Ops):
    """model/astro.py's AttentionOps backed by the Triton kernels."""

    impl = Impl.TRITON
