"""Error statistics of one output against a reference, computed by Polygraphy's comparators
(SimpleCompareFunc for abs/rel max/mean/median/quantile, CosineSimilarityCompareFunc for the
cosine) so that the figures mean exactly what ``polygraphy run`` reports."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from astro_trt.lazy import lazy_import
from astro_trt.runtime.runner import to_float32

# Polygraphy costs ~0.3 s to import: loaded by the first comparison.
polygraphy_logger = lazy_import("polygraphy.logger")
comparator = lazy_import("polygraphy.comparator")

# The quantile reported next to max/mean/median: 99 % of elements are at most this far off.
ERROR_QUANTILE = 0.99


@dataclass(frozen=True)
class ErrorStats:
    count: int
    max_abs: float
    mean_abs: float
    median_abs: float
    quantile_abs: float
    max_rel: float
    mean_rel: float
    median_rel: float
    quantile_rel: float
    cosine: float
    quantile: float = ERROR_QUANTILE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _quiet_polygraphy() -> None:
    # Polygraphy logs every comparison (and warns about exact zeros in the reference); the
    # report is ours to print.
    logger = polygraphy_logger.G_LOGGER
    logger.module_severity = logger.ERROR


def error_stats(actual: Any, expected: Any, *, name: str = "output", quantile: float = ERROR_QUANTILE) -> ErrorStats:
    """Statistics of ``actual`` against ``expected`` (same shape). Relative error divides by
    |expected| (Polygraphy adds 2e-16 where it is exactly zero)."""
    _quiet_polygraphy()
    a, e = to_float32(actual), to_float32(expected)
    if a.shape != e.shape:
        raise ValueError(f"{name}: shapes differ, {a.shape} vs {e.shape}")
    if a.size == 0:
        raise ValueError(f"{name}: nothing to compare (empty output)")
    runs = (comparator.IterationResult({name: a}, runner_name="actual"),
            comparator.IterationResult({name: e}, runner_name="expected"))
    # The tolerances here only decide Polygraphy's own verdict, which we do not use: gates do.
    simple = comparator.SimpleCompareFunc(check_error_stat="quantile", error_quantile=quantile, atol=np.inf,
                                          rtol=np.inf)
    result = simple(*runs)[name]
    if not (np.any(a) or np.any(e)):
        cosine = 1.0  # two all-zero outputs agree; the cosine formula would divide 0 by 0
    else:
        cosine = comparator.CosineSimilarityCompareFunc(cosine_similarity_threshold=-1.0)(*runs)[name].cosine_similarity
    return ErrorStats(
        count=int(a.size),
        max_abs=float(result.max_absdiff),
        mean_abs=float(result.mean_absdiff),
        median_abs=float(result.median_absdiff),
        quantile_abs=float(result.quantile_absdiff),
        max_rel=float(result.max_reldiff),
        mean_rel=float(result.mean_reldiff),
        median_rel=float(result.median_reldiff),
        quantile_rel=float(result.quantile_reldiff),
        cosine=float(cosine),
        quantile=quantile,
    )


def abs_errors(actual: Any, expected: Any) -> np.ndarray:
    """Element-wise |actual - expected| (float32, flattened), for the error-distribution plot."""
    return np.abs(to_float32(actual) - to_float32(expected)).ravel()


__all__ = ["ERROR_QUANTILE", "ErrorStats", "abs_errors", "error_stats"]
