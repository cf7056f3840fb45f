"""Multi-scale sequence extraction (docs/model.md §1), data side, before the model.

An extraction strategy is a filter over behaviour types; block k of a request holds the most
recent L events passing strategy k that happened strictly before the request time, oldest first,
right-aligned (padding, item id 0, first) with their count in ``lengths``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from astro_trt.errors import DataError


@dataclass(frozen=True)
class Strategy:
    """A named filter over behaviour ids; ``behaviors=None`` keeps every event."""

    name: str
    behaviors: frozenset[int] | None = None

    def passes(self, behaviors: np.ndarray) -> np.ndarray:
        if self.behaviors is None:
            return np.ones(behaviors.shape, dtype=bool)
        return np.isin(behaviors, sorted(self.behaviors))


def strategy(name: str, behaviors: Iterable[int] | None = None) -> Strategy:
    return Strategy(name, None if behaviors is None else frozenset(int(b) for b in behaviors))


@dataclass(frozen=True)
class Blocks:
    """One request's user side as arrays: items/behaviors/times [Nb, L] int64, lengths [Nb]."""

    items: np.ndarray
    behaviors: np.ndarray
    times: np.ndarray
    lengths: np.ndarray


class UserTimeline:
    """One user's events sorted by time, with each strategy's passing positions precomputed, so
    that extracting the blocks of many requests of the same user is a few binary searches."""

    def __init__(
        self, items: np.ndarray, behaviors: np.ndarray, times: np.ndarray, strategies: tuple[Strategy, ...]
    ) -> None:
        items, behaviors, times = (np.asarray(a, dtype=np.int64) for a in (items, behaviors, times))
        if not items.shape == behaviors.shape == times.shape or items.ndim != 1:
            raise DataError(
                "events need equal-length 1-D items/behaviors/times, got "
                f"{items.shape}, {behaviors.shape}, {times.shape}"
            )
        if not strategies:
            raise DataError("at least one extraction strategy is needed (one per block)")
        # Stable sort: events of the same second keep their input order, so extraction is deterministic.
        order = np.argsort(times, kind="stable")
        self.items, self.behaviors, self.times = items[order], behaviors[order], times[order]
        self.strategies = strategies
        self.positions = [np.flatnonzero(s.passes(self.behaviors)) for s in strategies]

    def __len__(self) -> int:
        return len(self.times)

    def blocks(self, request_time: int, max_len: int) -> Blocks:
        """The Nb blocks of a request at ``request_time``: only events strictly before it."""
        if max_len < 1:
            raise DataError(f"max_len must be >= 1, got {max_len}")
        nb = len(self.strategies)
        out = {key: np.zeros((nb, max_len), dtype=np.int64) for key in ("items", "behaviors", "times")}
        lengths = np.zeros(nb, dtype=np.int64)
        before = int(np.searchsorted(self.times, request_time, side="left"))  # events with time < request_time
        for k, positions in enumerate(self.positions):
            count = int(np.searchsorted(positions, before, side="left"))  # passing events among them
            chosen = positions[max(0, count - max_len) : count]  # the most recent L, oldest first
            n = len(chosen)
            lengths[k] = n
            if n:
                out["items"][k, max_len - n :] = self.items[chosen]
                out["behaviors"][k, max_len - n :] = self.behaviors[chosen]
                out["times"][k, max_len - n :] = self.times[chosen]
        return Blocks(out["items"], out["behaviors"], out["times"], lengths)


def extract_blocks(
    items: np.ndarray,
    behaviors: np.ndarray,
    times: np.ndarray,
    request_time: int,
    strategies: tuple[Strategy, ...],
    max_len: int,
) -> Blocks:
    """One-off form of ``UserTimeline(...).blocks(request_time, max_len)``; events in any order."""
    return UserTimeline(items, behaviors, times, strategies).blocks(request_time, max_len)


__all__ = ["Blocks", "Strategy", "UserTimeline", "extract_blocks", "strategy"]
