"""How far a graph or an engine may sit from the fp32 PyTorch oracle: one policy, used by the
exporter's own check and, as the defaults of its gates, by the parity report."""

from __future__ import annotations

from astro_trt.precision import get

# fp32: the same float32 arithmetic in another order (matmul blocking, fused softmax). Seen
# errors are ~1e-6 on logits of magnitude ~1, so 1e-4 leaves 100x headroom and still catches any
# real difference (a wrong weight, mask or bucket moves logits by > 1e-2).
FP32_MAX_ABS = 1e-4

# Half precision: at most this many times PyTorch's own error in that precision (same weights,
# same inputs, cast the same way) ...
HALF_ERROR_RATIO = 2.0
# ... plus this many ulps at 1.0 of the format (fp16: 2 * 2^-10 ~ 2e-3, bf16: 2 * 2^-7 ~ 1.6e-2).
# PyTorch's error is one sample of rounding; where it rounds luckily, a runtime with a different
# but equally valid summation order lands a couple of ulps of a logit ~1 away.
HALF_FLOOR_ULPS = 2.0


def max_abs_limit(
    precision: str,
    torch_error: float | None = None,
    *,
    fp32_max_abs: float = FP32_MAX_ABS,
    ratio: float = HALF_ERROR_RATIO,
    floor_ulps: float = HALF_FLOOR_ULPS,
) -> float:
    """Max abs error allowed against the oracle in ``precision``; ``torch_error`` is PyTorch's own
    max abs error in that precision (needed for fp16/bf16 only)."""
    record = get(precision)
    if record.reference:
        return fp32_max_abs
    if torch_error is None:
        raise ValueError(f"the {precision} limit needs PyTorch's own {precision} error")
    return ratio * torch_error + floor_ulps * record.eps
