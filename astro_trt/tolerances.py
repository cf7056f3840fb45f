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

# int8 (weights int8 per output channel, activations rounded to 8 bits by the runtime at each
# weight MatMul): judged by what a user sees, not by logits alone.
# - AUC change at most 1e-3 per task against the oracle: what recommendation teams call lossless
#   (measured on ml-100k: 2.2e-5).
INT8_AUC_DELTA = 1e-3
# A stored fp16 or row-wise int8 item table (model/item_table.py) is judged the same way against
# the fp32 rows: AUC change at most 1e-3 per task, the Kendall tau and top-k gates below; the
# int8 rows are within half a step of their row's scale (max |row| / 127 / 2) of the fp32 rows.
TABLE_AUC_DELTA = 1e-3
# - Kendall tau between each user's ranking and the oracle's, mean over users, at least this
#   (measured on ml-100k: 0.995; 0.98 is ~1 discordant pair in 100 beyond that).
INT8_KENDALL_TAU = 0.98
# - logits: at most this many times PyTorch's own int8 error (its weights rounded exactly as the
#   graph stores them) plus the floor. PyTorch's yardstick has no activation rounding, which the
#   runtime adds: measured 3.1x the yardstick on the ml-100k scorer (0.033 vs 0.011), so 2x (the
#   half-precision ratio) would be a coin toss and 4x still catches a wrong weight or scale
#   (a 5 % change of one block's weight moves logits by ~3e-2 on top).
INT8_ERROR_RATIO = 4.0


def max_abs_limit(
    precision: str,
    torch_error: float | None = None,
    *,
    fp32_max_abs: float = FP32_MAX_ABS,
    ratio: float = HALF_ERROR_RATIO,
    floor_ulps: float = HALF_FLOOR_ULPS,
    int8_ratio: float = INT8_ERROR_RATIO,
) -> float:
    """Max abs error allowed against the oracle in ``precision``; ``torch_error`` is PyTorch's own
    max abs error in that precision (needed for fp16/bf16/int8 only)."""
    record = get(precision)
    if record.reference:
        return fp32_max_abs
    if torch_error is None:
        raise ValueError(f"the {precision} limit needs PyTorch's own {precision} error")
    return error_ratio(precision, ratio, int8_ratio) * torch_error + floor_ulps * record.eps


def error_ratio(precision: str, ratio: float = HALF_ERROR_RATIO, int8_ratio: float = INT8_ERROR_RATIO) -> float:
    """The multiple of PyTorch's own error a non-reference ``precision`` may reach."""
    return int8_ratio if get(precision).quantized else ratio
