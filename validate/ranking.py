"""Ranking agreement between two runtimes' candidate scores, per user: what a recommender
serves is an order, so a runtime can be numerically close and still reorder the top items."""

from __future__ import annotations

import numpy as np


def _users(scores_a: np.ndarray, scores_b: np.ndarray, mask: np.ndarray | None):
    a, b = np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"expected two [users, candidates] score arrays, got {a.shape} and {b.shape}")
    m = np.ones(a.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    for row_a, row_b, row_m in zip(a, b, m, strict=True):
        yield row_a[row_m], row_b[row_m]


def topk_overlap(scores_a: np.ndarray, scores_b: np.ndarray, k: int, mask: np.ndarray | None = None) -> float:
    """Mean over users of |top-k(a) & top-k(b)| / k, k clipped to the user's real candidates.

    Users with a single candidate count as agreeing (there is nothing to order). Ties are
    broken by candidate index (a stable sort) in both runtimes alike."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    overlaps = []
    for a, b in _users(scores_a, scores_b, mask):
        kk = min(k, a.size)
        if kk == 0:
            continue
        top_a = np.argsort(-a, kind="stable")[:kk]
        top_b = np.argsort(-b, kind="stable")[:kk]
        overlaps.append(len(np.intersect1d(top_a, top_b)) / kk)
    return float(np.mean(overlaps)) if overlaps else 1.0


def kendall_tau(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's tau-b of two score vectors (ties handled); 1.0 when either has < 2 distinct values
    in both, i.e. there is no order to disagree about."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    i, j = np.triu_indices(a.size, k=1)
    sa, sb = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
    concordance = float(np.sum(sa * sb))
    pairs_a, pairs_b = float(np.count_nonzero(sa)), float(np.count_nonzero(sb))
    if pairs_a == 0 and pairs_b == 0:
        return 1.0
    if pairs_a == 0 or pairs_b == 0:
        return 0.0
    return concordance / np.sqrt(pairs_a * pairs_b)


def mean_kendall_tau(scores_a: np.ndarray, scores_b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean over users (with >= 2 real candidates) of Kendall's tau-b of their candidate scores."""
    taus = [kendall_tau(a, b) for a, b in _users(scores_a, scores_b, mask) if a.size >= 2]
    return float(np.mean(taus)) if taus else 1.0


__all__ = ["kendall_tau", "mean_kendall_tau", "topk_overlap"]
