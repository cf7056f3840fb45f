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

from astro_trt.contract import KV_CACHE_AXES, dtype_bytes, kv_cache_layout
from astro_trt.errors import ConfigError, DataError
from astro_trt.precision import STORAGE


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


# How astro_recommend keeps a user's encoded state (`astro-trt triton --cache-dtype`): "fp32" as the
# runtime returns it (the precision's own dtype), or reduced to fp16 or int8 (precision.STORAGE).
CACHE_DTYPES = ("fp32", "fp16", "int8")
DEFAULT_CACHE_DTYPE = "fp32"
# An int8 state has a scale per layer, block, K/V and head: the values of one head's keys (or
# values) over the history share one range, while heads and blocks differ by their weights.
SCALE_AXES = tuple(KV_CACHE_AXES.index(a) for a in ("slot", "head_dim"))


def check_cache_dtype(name: object) -> str:
    if name not in CACHE_DTYPES:
        raise ConfigError(f"cache dtype {name!r} is unknown; choose one of {list(CACHE_DTYPES)} (--cache-dtype)")
    return str(name)


@dataclass(frozen=True)
class Packed:
    """One user's state as the cache keeps it: stored values, their scale (int8) and the dtype the
    runtime reads back."""

    stored: np.ndarray
    scale: np.ndarray | None
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(self.stored.nbytes + (0 if self.scale is None else self.scale.nbytes))


class StateCodec:
    """Packs a runtime's numpy state for the cache and unpacks it for the scorer. "fp32" keeps the
    state as it is (no copy, no rounding: the cache of every bundle before --cache-dtype)."""

    def __init__(self, name: str = DEFAULT_CACHE_DTYPE) -> None:
        self.name = check_cache_dtype(name)
        self.storage = STORAGE[self.name]

    @property
    def identity(self) -> bool:
        return self.name == DEFAULT_CACHE_DTYPE

    def pack(self, state: Any) -> Any:
        if self.identity:
            return state
        stored, scale = self.storage.encode(state, SCALE_AXES if self.storage.scaled else ())
        return Packed(stored, scale, np.asarray(state).dtype)

    def unpack(self, packed: Any) -> Any:
        if self.identity:
            return packed
        return self.storage.decode(packed.stored, packed.scale).astype(packed.dtype, copy=False)

    def state_bytes(self, kv_shape: Sequence[int], runtime_bytes: int) -> int:
        """Bytes one user's state takes in the cache; ``kv_shape`` without the batch axis."""
        elements = int(np.prod(kv_shape))
        if self.identity:
            return elements * runtime_bytes
        groups = elements // int(np.prod([kv_shape[a - 1] for a in SCALE_AXES]))
        return self.storage.bytes_for(elements, groups)


def cache_capacity(cfg: Any, precision: str, cache_dtype: str, cache_bytes: int) -> tuple[int, int]:
    """(bytes one user's state takes in the cache, users that fit in ``cache_bytes``)."""
    layout = kv_cache_layout(cfg, precision)
    per_user = StateCodec(cache_dtype).state_bytes([int(d) for d in layout.shape[1:]], dtype_bytes(layout.dtype))
    return per_user, cache_bytes // per_user


__all__ = ["CACHE_DTYPES", "cache_capacity", "CacheStats", "DEFAULT_CACHE_DTYPE", "Packed", "StateCodec", "UserCache",
           "check_cache_dtype", "fingerprint"]
