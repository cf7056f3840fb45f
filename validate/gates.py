"""Pass/fail gates of the parity report: defaults, and the verdict of one measured figure
against its limit, worded so that a failure says which gate and by how much."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from astro_trt import tolerances
from astro_trt.errors import ConfigError
from astro_trt.precision import get, is_quantized, is_reference

# Requests hold at most a few thousand candidates; a larger k only ever compares whole lists.
MAX_TOPK = 100_000


@dataclass(frozen=True)
class Gates:
    """Defaults of the gates; every field has a CLI flag of the same name (dashes for underscores)."""

    # The numeric limits and their reasons live in astro_trt/tolerances.py (the exporter's check
    # uses the same policy).
    fp32_max_abs: float = tolerances.FP32_MAX_ABS
    half_error_ratio: float = tolerances.HALF_ERROR_RATIO
    half_floor_ulps: float = tolerances.HALF_FLOOR_ULPS
    int8_error_ratio: float = tolerances.INT8_ERROR_RATIO
    # AUC deltas: fp32 against the trained checkpoint's metrics.json (ml-100k) and the oracle.
    auc_delta_fp32: float = 1e-4
    auc_delta_half: float = 5e-3
    auc_delta_int8: float = tolerances.INT8_AUC_DELTA
    kendall_tau_int8: float = tolerances.INT8_KENDALL_TAU
    # A stored fp16 or row-wise int8 item table against the fp32 rows, per task (ARCHITECTURE.md 8).
    auc_delta_table: float = tolerances.TABLE_AUC_DELTA
    # Split (encoder + scorer) against the full model in the same runtime, fp32. Half
    # precision uses twice its logits limit: each side may sit that far from the oracle.
    split_full_max_abs: float = 1e-4
    topk: int = 10
    topk_overlap: float = 0.9

    def __post_init__(self) -> None:
        """Every gate is checked when the flags are read, before any work."""
        for key, value in self.to_dict().items():
            flag = "--" + key.replace("_", "-")
            if key == "topk":
                if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_TOPK:
                    raise ConfigError(f"{flag} must be an integer in [1, {MAX_TOPK}], got {value!r}")
                continue
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{flag} must be a finite number >= 0, got {value!r}")
        if self.topk_overlap > 1:
            raise ConfigError(f"--topk-overlap is a fraction of the top k, in [0, 1]; got {self.topk_overlap}")
        if self.kendall_tau_int8 > 1:
            raise ConfigError(f"--kendall-tau-int8 is a rank correlation, at most 1; got {self.kendall_tau_int8}")
        for key in ("half_error_ratio", "int8_error_ratio"):
            if getattr(self, key) == 0:
                raise ConfigError(f"--{key.replace('_', '-')} must be > 0 (a multiple of PyTorch's own error in "
                                  "that precision)")

    def half_floor(self, precision: str) -> float:
        return self.half_floor_ulps * get(precision).eps

    def logits_limit(self, precision: str, torch_error: float | None) -> float:
        """Max abs logits error allowed against the oracle for a runtime in ``precision``.
        ``torch_error`` is PyTorch's own max abs error in that precision (unused for fp32)."""
        return tolerances.max_abs_limit(precision, torch_error, fp32_max_abs=self.fp32_max_abs,
                                        ratio=self.half_error_ratio, floor_ulps=self.half_floor_ulps,
                                        int8_ratio=self.int8_error_ratio)

    def error_ratio(self, precision: str) -> float:
        return tolerances.error_ratio(precision, self.half_error_ratio, self.int8_error_ratio)

    def auc_limit(self, precision: str) -> float:
        if is_reference(precision):
            return self.auc_delta_fp32
        return self.auc_delta_int8 if is_quantized(precision) else self.auc_delta_half

    def split_full_limit(self, precision: str, torch_error: float | None) -> float:
        if is_reference(precision):
            return self.split_full_max_abs
        return 2.0 * self.logits_limit(precision, torch_error)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GateResult:
    """One measured figure against its limit. ``higher_is_better`` flips the comparison (overlap)."""

    gate: str
    subject: str  # e.g. "ort fp32 logits", "checkpoint"
    value: float
    limit: float
    higher_is_better: bool = False
    detail: str = ""

    @property
    def passed(self) -> bool:
        if self.value != self.value:  # NaN never passes
            return False
        return self.value >= self.limit if self.higher_is_better else self.value <= self.limit

    @property
    def margin(self) -> float:
        """How far past the limit (positive = failed by that much)."""
        return self.limit - self.value if self.higher_is_better else self.value - self.limit

    def describe(self) -> str:
        op = ">=" if self.higher_is_better else "<="
        verdict = "PASS" if self.passed else f"FAIL by {abs(self.margin):.3g}"
        text = f"{verdict}: {self.gate} [{self.subject}] = {self.value:.4g} (limit {op} {self.limit:.4g})"
        return f"{text}; {self.detail}" if self.detail else text

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["passed"] = self.passed
        out["margin"] = self.margin
        return out


__all__ = ["GateResult", "Gates"]
