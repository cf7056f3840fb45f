"""AUC and LogLoss per task over valid candidates, the item-average baseline, and ``evaluate``.

``evaluate`` is shared by every stage: PyTorch here, ONNX Runtime and TensorRT predictors in the
validation stage. It pools all valid (logit, label) pairs of all batches and computes each metric
once over the pool, so the numbers do not depend on how requests were grouped into batches
(a per-batch average would), and it sums in float64 so that they do not depend on order either.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np

from astro_trt.errors import DataError
from astro_trt.model.requests import Request, RequestBatch


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing the mean of the ranks they span."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # Start index of each run of equal values, and the run each sorted element belongs to.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    run = np.cumsum(np.r_[True, sorted_values[1:] != sorted_values[:-1]]) - 1
    ends = np.r_[starts[1:], len(values)]
    mean_rank = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = mean_rank[run]
    return ranks


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a random positive > a random negative), ties
    counting one half (Mann-Whitney U from average ranks). NaN when a class is absent."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel() > 0.5
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    u = ranks[labels].sum() - positives * (positives + 1) / 2.0
    return float(u / (positives * negatives))


def logloss(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean binary cross-entropy of sigmoid(logits), computed from the logits directly
    (log(1 + e^-|x|) form), so that confident predictions never give log(0)."""
    x = np.asarray(logits, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if len(x) == 0:
        return float("nan")
    losses = np.maximum(x, 0.0) - x * y + np.log1p(np.exp(-np.abs(x)))
    return float(losses.sum() / len(x))


def evaluate(
    predict: Callable[[RequestBatch], np.ndarray],
    batches: Iterable[RequestBatch],
    task_names: Sequence[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Run ``predict`` (logits [B, M, T]) on every batch and score the valid candidates:
    {task: {"auc": ..., "logloss": ..., "count": ...}}. Tasks are named by ``task_names``
    or task0, task1, ..."""
    pooled_logits: list[np.ndarray] = []
    pooled_labels: list[np.ndarray] = []
    for batch in batches:
        logits = np.asarray(predict(batch), dtype=np.float64)
        if logits.shape != tuple(batch.labels.shape):
            raise DataError(
                f"predictor returned logits of shape {logits.shape}, expected {tuple(batch.labels.shape)} "
                "([B, M, T] of the batch)"
            )
        mask = batch.cand_mask.numpy()
        pooled_logits.append(logits[mask])
        pooled_labels.append(batch.labels.numpy()[mask])
    if not pooled_logits:
        raise DataError("evaluate got no batches; pass at least one request")
    logits = np.concatenate(pooled_logits)
    labels = np.concatenate(pooled_labels)
    num_tasks = labels.shape[1]
    names = list(task_names) if task_names else [f"task{t}" for t in range(num_tasks)]
    if len(names) != num_tasks:
        raise DataError(f"{len(names)} task names for {num_tasks} tasks")
    return {
        name: {"auc": auc(logits[:, t], labels[:, t]), "logloss": logloss(logits[:, t], labels[:, t]),
               "count": int(len(labels))}
        for t, name in enumerate(names)
    }


def mean_auc(result: dict[str, dict[str, float]]) -> float:
    return float(np.mean([task["auc"] for task in result.values()]))


class ItemAverageBaseline:
    """Per item, the smoothed fraction of its training candidates that met each task:
    p = (positives + s * prior) / (count + s), with prior the task's overall rate and s the
    smoothing strength (pseudo-counts), so rare items fall back to the prior. Predicts logit(p)."""

    def __init__(self, train: Sequence[Request], num_items: int, num_tasks: int, smoothing: float = 5.0) -> None:
        if not train:
            raise DataError("the item-average baseline needs training requests")
        items = np.concatenate([r.cand_items for r in train])
        labels = np.concatenate([r.cand_labels for r in train]).astype(np.float64)
        counts = np.bincount(items, minlength=num_items + 1).astype(np.float64)
        prior = labels.mean(axis=0)
        positives = np.stack([np.bincount(items, weights=labels[:, t], minlength=num_items + 1)
                              for t in range(num_tasks)], axis=1)
        p = (positives + smoothing * prior) / (counts[:, None] + smoothing)
        p = np.clip(p, 1e-6, 1 - 1e-6)
        self.logits = np.log(p) - np.log1p(-p)  # [num_items + 1, T]

    def __call__(self, batch: RequestBatch) -> np.ndarray:
        return self.logits[batch.cand_items.numpy()]


__all__ = ["ItemAverageBaseline", "auc", "evaluate", "logloss", "mean_auc"]
