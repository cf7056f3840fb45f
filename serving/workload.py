"""The requests a load test sends (and the in-process baseline replays): ``users`` synthetic users,
each a session of ``pages`` pages of ``candidates`` candidates; sessions repeat with new user keys,
so one request in ``pages`` encodes a user and the rest are served from the cache."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from astro_trt.config import ASTROConfig
from astro_trt.contract import HISTORY_INPUTS
from astro_trt.errors import DataError
from astro_trt.lazy import lazy_import

synthetic = lazy_import("astro_trt.model.synthetic")  # imports torch: only a workload being made needs it


@dataclass(frozen=True)
class Workload:
    histories: list[dict[str, np.ndarray]]  # per user: contract name -> [1, ...] int64
    pages: list[np.ndarray]  # per (page, user), page-major: cand_items [1, M] int64
    users: int
    candidates: int
    tag: str

    def __len__(self) -> int:
        return len(self.pages)

    def request(self, index: int) -> tuple[bytes, dict[str, np.ndarray]]:
        """Request ``index`` (any int >= 0): its user key and tensors."""
        cycle, within = divmod(index, len(self.pages))
        user = within % self.users
        tensors = dict(self.histories[user])
        tensors["cand_items"] = self.pages[within]
        return f"{self.tag}:{cycle}:{user}".encode(), tensors


def make_workload(cfg: ASTROConfig, *, users: int, pages: int, candidates: int, seed: int = 0,
                  tag: str = "load") -> Workload:
    if users < 1 or pages < 1 or candidates < 1:
        raise DataError(f"workload needs users, pages and candidates >= 1, got {users}, {pages}, {candidates}")
    history = synthetic.synthetic_batch(cfg, users, 1, seed=seed).history
    arrays = {n: t.numpy().astype(np.int64) for n, t in zip(HISTORY_INPUTS, history.astuple(), strict=True)}
    histories = [{n: np.ascontiguousarray(a[u : u + 1]) for n, a in arrays.items()} for u in range(users)]
    rng = np.random.default_rng(seed + 1)
    cands = [rng.integers(1, cfg.num_items + 1, size=(1, candidates), dtype=np.int64) for _ in range(users * pages)]
    return Workload(histories, cands, users, candidates, tag)


__all__ = ["Workload", "make_workload"]
