"""A bounded per-user cache of encoded state: least recently used first out, bounded in bytes.

An entry is keyed by the user key and remembers the fingerprint of the history it was encoded
from; a lookup with another fingerprint is a miss (and drops the stale entry), so a user whose
history changed is never scored against the old cache."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from astro_trt.errors import DataError


def fingerprint(arrays: Mapping[str, np.ndarray], names: Sequence[str], row: int) -> bytes:
    """A digest of one user's history tensors (row ``row`` of each of ``names``)."""
    digest = hashlib.blake2b(digest_size=16)
    for name in names:
        value = np.ascontiguousarray(arrays[name][row])
        digest.update(name.encode())
        digest.update(str(value.shape).encode())
        digest.update(value.tobytes())
    return digest.digest()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    stale: int = 0  # misses because the user's history changed
    evictions: int = 0
    too_large: int = 0  # entries larger than the whole cache, never stored
    entries: int = 0
    bytes: int = 0


class UserCache:
    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise DataError(f"cache capacity must be >= 0 bytes, got {capacity_bytes}; pass 0 (no cache) or more")
        self.capacity = capacity_bytes
        self._entries: OrderedDict[bytes, tuple[bytes, Any, int]] = OrderedDict()
        self.stats = CacheStats()

    def get(self, key: bytes, print_: bytes) -> Any | None:
        entry = self._entries.get(key)
        if entry is not None and entry[0] == print_:
            self._entries.move_to_end(key)
            self.stats.hits += 1
            return entry[1]
        self.stats.misses += 1
        if entry is not None:
            self.stats.stale += 1
            self._drop(key)
        return None

    def put(self, key: bytes, print_: bytes, value: Any, nbytes: int) -> None:
        if key in self._entries:
            self._drop(key)
        if nbytes > self.capacity:
            self.stats.too_large += 1
            return
        while self._entries and self.stats.bytes + nbytes > self.capacity:
            self._drop(next(iter(self._entries)))
            self.stats.evictions += 1
        self._entries[key] = (print_, value, nbytes)
        self.stats.bytes += nbytes
        self.stats.entries = len(self._entries)

    def _drop(self, key: bytes) -> None:
        _, _, nbytes = self._entries.pop(key)
        self.stats.bytes -= nbytes
        self.stats.entries = len(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


__all__ = ["CacheStats", "UserCache", "fingerprint"]
