"""Random but well-formed RequestBatches for tests and benchmarks of any config.

Everything the model and the engines must survive shows up: empty and full blocks, right-aligned
padding, time gaps from one second to years (so every time bucket is hit, including the last
one at 2**26 s), every scenario, padded candidate slots. Labels are a fixed function of the
candidate item, so a model can learn them (the training smoke test relies on it).
"""

from __future__ import annotations

import numpy as np
import torch

from astro_trt.config import ASTROConfig
from astro_trt.errors import DataError
from astro_trt.model.astro import History
from astro_trt.model.requests import PAD_CANDIDATE, RequestBatch

# 2001-09-09: a plausible unix epoch second; times stay far below int64 limits.
_BASE_TIME = 1_000_000_000
# Log-uniform gaps between consecutive events: 1 s .. ~1 year.
_MAX_GAP_LOG = np.log(3.2e7)
_MAX_BYTES = 4 << 30


def _lengths(rng: np.random.Generator, shape: tuple[int, int], max_len: int, empty_block_prob: float) -> np.ndarray:
    # A quarter of the non-empty blocks are full, so the L boundary is always exercised.
    lengths = rng.integers(1, max_len + 1, size=shape)
    lengths = np.where(rng.random(shape) < 0.25, max_len, lengths)
    return np.where(rng.random(shape) < empty_block_prob, 0, lengths)


def synthetic_batch(
    cfg: ASTROConfig, batch: int, candidates: int, *, seed: int, empty_block_prob: float = 0.1
) -> RequestBatch:
    """A RequestBatch of ``batch`` users and ``candidates`` candidate slots each (shapes of
    ``cfg``), fully determined by ``seed``."""
    if not isinstance(cfg, ASTROConfig):
        raise DataError(f"synthetic_batch needs an ASTROConfig (e.g. load_bundle(DIR).config), "
                        f"got {type(cfg).__name__}")
    for name, value in (("batch", batch), ("candidates", candidates), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise DataError(f"synthetic_batch: {name} must be an int, got {type(value).__name__} {value!r}")
    if seed < 0:
        raise DataError(f"synthetic_batch: seed must be >= 0, got {seed}")
    # Five int64 arrays of [batch, Nb, L] plus the candidates: refuse what would not fit in memory.
    if batch * (5 * cfg.num_blocks * cfg.max_len + 2 * candidates) * 8 > _MAX_BYTES:
        raise DataError(f"synthetic_batch: {batch} users x {candidates} candidates needs more than "
                        f"{_MAX_BYTES >> 30} GiB; generate it in smaller batches")
    if batch < 1 or candidates < 1:
        raise DataError(f"synthetic_batch needs batch >= 1 and candidates >= 1, got {batch} and {candidates}")
    if not isinstance(empty_block_prob, (int, float)) or not 0.0 <= empty_block_prob <= 1.0:
        raise DataError(f"empty_block_prob must be in [0, 1], got {empty_block_prob}")
    rng = np.random.default_rng(seed)
    nb, length = cfg.num_blocks, cfg.max_len

    lengths = _lengths(rng, (batch, nb), length, empty_block_prob)
    valid = np.arange(length)[None, None, :] >= (length - lengths)[..., None]  # right-aligned
    items = np.where(valid, rng.integers(1, cfg.num_items + 1, size=(batch, nb, length)), 0)
    behaviors = np.where(valid, rng.integers(1, cfg.num_behaviors, size=(batch, nb, length)), 0)

    # Each user's blocks share a start time; within a block, times strictly increase.
    start = _BASE_TIME + rng.integers(0, 10**8, size=(batch, 1, 1))
    gaps = np.exp(rng.uniform(0.0, _MAX_GAP_LOG, size=(batch, nb, length))).astype(np.int64)  # >= 1
    gaps = np.where(valid, gaps, 0)
    times = np.where(valid, start + np.cumsum(gaps, axis=-1), 0)
    last = np.where(lengths > 0, times[..., -1], start[..., 0]).max(axis=1)
    request_time = last + np.exp(rng.uniform(0.0, _MAX_GAP_LOG, size=batch)).astype(np.int64) + 1

    scenario = rng.integers(0, cfg.num_scenarios, size=batch)
    # At least one real candidate per request; the rest of the slots may be padding.
    real = np.where(rng.random(batch) < 0.5, candidates, rng.integers(1, candidates + 1, size=batch))
    cand_mask = np.arange(candidates)[None, :] < real[:, None]
    cand_items = np.where(cand_mask, rng.integers(1, cfg.num_items + 1, size=(batch, candidates)), PAD_CANDIDATE)
    # Task t's label: a hash bit of the item, learnable from the item embedding alone.
    task = np.arange(cfg.num_tasks, dtype=np.int64)
    hashed = (cand_items[..., None] * 2654435761 + task * 97) % 4294967296
    labels = (((hashed >> 13) & 1) * cand_mask[..., None]).astype(np.float32)

    history = History(
        items=torch.from_numpy(items.astype(np.int64)),
        behaviors=torch.from_numpy(behaviors.astype(np.int64)),
        times=torch.from_numpy(times.astype(np.int64)),
        lengths=torch.from_numpy(lengths.astype(np.int64)),
        scenario=torch.from_numpy(scenario.astype(np.int64)),
        request_time=torch.from_numpy(request_time.astype(np.int64)),
    )
    return RequestBatch(
        history=history,
        cand_items=torch.from_numpy(cand_items.astype(np.int64)),
        labels=torch.from_numpy(labels),
        cand_mask=torch.from_numpy(cand_mask),
    )


__all__ = ["synthetic_batch"]
