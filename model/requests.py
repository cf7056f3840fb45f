"""Requests: the unit of training and evaluation, shaped for "single user, multiple items".

A request is one user at one moment: the multi-scale history strictly before the request time
and M candidate items whose labels are the user's later reactions. ``RequestBatch`` stacks B of
them with tensors the model consumes directly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from astro_trt.errors import DataError
from astro_trt.model.astro import History

# Padded candidate slots hold a real item id (1) so that every runtime embeds a valid row;
# cand_mask keeps them out of losses and metrics.
PAD_CANDIDATE = 1


@dataclass
class RequestBatch:
    """B requests. history: History ([B, Nb, L] items/behaviors/times, [B, Nb] lengths,
    [B] scenario and request_time, all int64); cand_items [B, M] int64; labels [B, M, T]
    float32 in {0, 1}; cand_mask [B, M] bool (False = padded candidate slot)."""

    history: History
    cand_items: torch.Tensor
    labels: torch.Tensor
    cand_mask: torch.Tensor

    @property
    def batch_size(self) -> int:
        return int(self.cand_items.shape[0])

    @property
    def num_candidates(self) -> int:
        return int(self.cand_items.shape[1])


@dataclass(frozen=True)
class Request:
    """One request as numpy arrays (cheap to hold by the ten thousand, stacked by ``collate``).

    items/behaviors/times [Nb, L], lengths [Nb], cand_items/cand_labels [K] / [K, T] with K
    the number of real candidates (<= M of the batch)."""

    user: int
    items: np.ndarray
    behaviors: np.ndarray
    times: np.ndarray
    lengths: np.ndarray
    scenario: int
    request_time: int
    cand_items: np.ndarray
    cand_labels: np.ndarray


def collate(requests: Sequence[Request], num_candidates: int | None = None) -> RequestBatch:
    """Stack requests into a RequestBatch, padding candidates to ``num_candidates`` (default:
    the largest count among them) with item PAD_CANDIDATE, label 0 and mask False."""
    if not requests:
        raise DataError("cannot build a batch from zero requests; pass at least one")
    m = num_candidates or max(len(r.cand_items) for r in requests)
    num_tasks = requests[0].cand_labels.shape[1]
    b = len(requests)
    cand = np.full((b, m), PAD_CANDIDATE, dtype=np.int64)
    labels = np.zeros((b, m, num_tasks), dtype=np.float32)
    mask = np.zeros((b, m), dtype=bool)
    for row, r in enumerate(requests):
        k = len(r.cand_items)
        if k > m:
            raise DataError(f"request of user {r.user} has {k} candidates, more than the batch's {m}")
        cand[row, :k] = r.cand_items
        labels[row, :k] = r.cand_labels
        mask[row, :k] = True
    history = History(
        items=torch.from_numpy(np.stack([r.items for r in requests]).astype(np.int64)),
        behaviors=torch.from_numpy(np.stack([r.behaviors for r in requests]).astype(np.int64)),
        times=torch.from_numpy(np.stack([r.times for r in requests]).astype(np.int64)),
        lengths=torch.from_numpy(np.stack([r.lengths for r in requests]).astype(np.int64)),
        scenario=torch.tensor([r.scenario for r in requests], dtype=torch.int64),
        request_time=torch.tensor([r.request_time for r in requests], dtype=torch.int64),
    )
    return RequestBatch(history, torch.from_numpy(cand), torch.from_numpy(labels), torch.from_numpy(mask))


def batches(
    requests: Sequence[Request],
    batch_size: int,
    *,
    num_candidates: int | None = None,
    shuffle_seed: int | None = None,
) -> Iterator[RequestBatch]:
    """Yield RequestBatches of ``batch_size`` (the last may be smaller), in order unless
    ``shuffle_seed`` is given. ``num_candidates`` fixes M for every batch (default: the most
    candidates of any request, so every batch has the same M)."""
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    m = num_candidates or max((len(r.cand_items) for r in requests), default=1)
    order = np.arange(len(requests))
    if shuffle_seed is not None:
        np.random.default_rng(shuffle_seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        yield collate([requests[i] for i in order[start : start + batch_size]], m)


__all__ = ["PAD_CANDIDATE", "Request", "RequestBatch", "batches", "collate"]
