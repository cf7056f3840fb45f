"""The request path every served model shares, free of Triton so that it runs (and is tested)
in-process too: the project's one input gate (runtime/gate.py) once in front of any model, then
"encode once, score many" with a per-user cache, on a runner of the runtime layer (runtime/)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from astro_trt.config import ASTROConfig
from astro_trt.contract import (
    BATCH,
    CAND_ITEMS,
    HISTORY_INPUTS,
    ITEM_SCORER,
    KV_CACHE,
    SPLIT_GRAPHS,
    USER_ENCODER,
    request_name,
)
from astro_trt.engines.bundle import Bundle
from astro_trt.errors import BackendError, DataError
from astro_trt.runtime import gate
from astro_trt.runtime.gate import Ranges
from astro_trt.runtime.onnxruntime import OrtRunner
from astro_trt.runtime.runner import Runner
from astro_trt.serving.cache import DEFAULT_CACHE_DTYPE, StateCodec, UserCache, fingerprint
from astro_trt.serving.compute import make_compute
from astro_trt.serving.defaults import DEFAULT_CACHE_BYTES

# What identifies an encoded history: everything but the request time, which only the scorer reads.
FINGERPRINT_INPUTS = tuple(n for n in HISTORY_INPUTS if n != "request_time")


def gate_profiles(profiles: Mapping[str, Mapping[str, Sequence[int]]]) -> dict[str, Ranges]:
    """The split graphs' profiles as the gate reads them (axis -> (min, opt, max)), converted once
    when a model starts rather than per request (a config.pbtxt carries them as JSON lists)."""
    return {g: {k: tuple(v) for k, v in profiles[g].items()} for g in SPLIT_GRAPHS}  # type: ignore[misc]


def check_request(cfg: ASTROConfig, tensors: Mapping[str, np.ndarray],
                  profiles: Mapping[str, Ranges]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The gate: history and candidates checked against the config and the engines' profiles
    (``gate_profiles``; DataError naming the problem otherwise). Returns (history arrays, cand_items)."""
    arrays = gate.validate_history(cfg, tensors, profiles[USER_ENCODER])
    if "cand_items" not in tensors:
        raise DataError("request is missing cand_items; send [batch, candidates] int64 item ids")
    batch = arrays["hist_items"].shape[0]
    return arrays, gate.validate_candidates(cfg, tensors["cand_items"], batch, profiles[ITEM_SCORER])


@dataclass
class Page:
    logits: np.ndarray  # [B, M, T] float32
    encoded: np.ndarray  # [B] bool: this request encoded that user (False: served from the cache)


class Recommender:
    """Scores pages of candidates for users, encoding a user only when its (key, history) is not
    in the cache. A page is gated once and put into the runner's form once (on the TensorRT path:
    one upload to the device, which the encoder and the scorer both read)."""

    def __init__(self, bundle: Bundle, precision: str, *, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 compute: str = "auto", threads: int | None = None, engine: Runner | None = None,
                 cache_dtype: str = DEFAULT_CACHE_DTYPE, item_table: str | None = None) -> None:
        self.cfg = bundle.config
        self.profiles = {g: bundle.profile(g) for g in SPLIT_GRAPHS}  # tuples already, as gate_profiles gives
        self.codec = StateCodec(cache_dtype)
        self.compute = engine or make_compute(bundle, precision, compute, threads, item_table)
        if not self.codec.identity and not isinstance(self.compute, OrtRunner):
            raise BackendError(f"--cache-dtype {cache_dtype} packs states on the host, but {self.compute.name} keeps "
                               "them on the device; serve with ONNX Runtime or --cache-dtype fp32")
        self.cache = UserCache(cache_bytes)
        self.encodes = 0  # users encoded since start

    def page(self, user_keys: np.ndarray, tensors: Mapping[str, np.ndarray]) -> Page:
        result = self.pages([(user_keys, tensors)])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def pages(self, requests: Sequence[tuple[np.ndarray, Mapping[str, np.ndarray]]]) -> list[Page | Exception]:
        """Several requests that arrived together (Triton's dynamic batcher hands them over as one
        list): requests with the same page size are encoded and scored in merged calls of at most
        the profiles' batch; each request gets its Page, or the exception that refused or failed it
        alone (a merged call that fails is retried request by request, so one bad request never
        fails its neighbours)."""
        results: list[Page | Exception | None] = [None] * len(requests)
        checked: list[_Checked] = []
        for index, (user_keys, tensors) in enumerate(requests):
            try:
                arrays, cand = check_request(self.cfg, tensors, self.profiles)
                keys = _keys(user_keys, cand.shape[0])
            except Exception as exc:  # noqa: BLE001 - this request's error, returned in its place
                results[index] = exc
                continue
            prints = [fingerprint(arrays, FINGERPRINT_INPUTS, b) for b in range(len(keys))]
            checked.append(_Checked(index, keys, prints, arrays, cand))
        for group in merge_groups(checked, self.batch_limit):
            try:
                self._serve(group, results)
            except Exception as exc:  # noqa: BLE001 - find which request it was: each alone
                if len(group) == 1:
                    results[group[0].index] = exc
                    continue
                for one in group:
                    try:
                        self._serve([one], results)
                    except Exception as alone:  # noqa: BLE001
                        results[one.index] = alone
        return results  # type: ignore[return-value]

    @property
    def batch_limit(self) -> int:
        """Users one merged call may hold: the largest batch both graphs' profiles take."""
        return min(int(self.profiles[g][BATCH][2]) for g in SPLIT_GRAPHS)

    def _serve(self, group: Sequence[_Checked], results: list[Page | Exception | None]) -> None:
        """Encode the group's cache misses in one call and score its pages (all of one size) in
        another; the group's arrays are put into the runner's form once (TensorRT: one upload)."""
        rows = [(c, b) for c in group for b in range(len(c.keys))]
        cached = [self.cache.get(c.keys[b], c.prints[b]) for c, b in rows]
        states: list[Any] = [None if p is None else self.codec.unpack(p) for p in cached]
        # A user missing twice in the group (two pages of one session) is encoded once.
        misses: dict[tuple[bytes, bytes], list[int]] = {}
        for r, ((c, b), state) in enumerate(zip(rows, states, strict=True)):
            if state is None:
                misses.setdefault((c.keys[b], c.prints[b]), []).append(r)
        arrays = group[0].arrays if len(group) == 1 else {n: np.concatenate([c.arrays[n] for c in group])
                                                          for n in group[0].arrays}
        cand = group[0].cand if len(group) == 1 else np.concatenate([c.cand for c in group])
        io = self.compute.io
        # The request tensors the graphs' inputs come from: put() looks the ids up (a cache hit never
        # looks its history's items up).
        names = {request_name(n) for n in (*io[ITEM_SCORER].input_names,
                                           *(io[USER_ENCODER].input_names if misses else ()))} - {KV_CACHE}
        feeds = self.compute.put({n: cand if n == CAND_ITEMS else arrays[n] for n in names})
        encoded = np.zeros(len(rows), dtype=bool)
        if misses:
            firsts = [rs[0] for rs in misses.values()]
            history = {n: feeds[n] if len(firsts) == len(rows) else feeds[n][firsts]
                       for n in io[USER_ENCODER].input_names}
            fresh = self.compute.split(self.compute.encode_checked(history))
            self.encodes += len(firsts)
            for (key, print_), rs, state in zip(misses, misses.values(), fresh, strict=True):
                # A page scores from the state as the cache keeps it: the same logits hit or miss.
                packed = self.codec.pack(state)
                self.cache.put(key, print_, packed,
                               self.compute.nbytes(state) if self.codec.identity else packed.nbytes)
                for r in rs:
                    states[r] = self.codec.unpack(packed)
                encoded[rs[0]] = True
        logits = self.compute.score_checked(self.compute.stack(states), feeds)
        start = 0
        for c in group:
            end = start + len(c.keys)
            results[c.index] = Page(logits[start:end], encoded[start:end])
            start = end


@dataclass
class _Checked:
    """A request that passed the gate: where its result goes, its users' keys and fingerprints."""

    index: int
    keys: list[bytes]
    prints: list[bytes]
    arrays: dict[str, np.ndarray]
    cand: np.ndarray


def merge_groups(checked: Sequence[_Checked], limit: int) -> list[list[_Checked]]:
    """Requests with the same page size (candidates) in arrival order, packed into groups of at most
    ``limit`` users: each group is one encoder call and one scorer call of a rectangular [B, M]."""
    by_size: dict[int, list[list[_Checked]]] = {}
    for c in checked:
        groups = by_size.setdefault(int(c.cand.shape[1]), [[]])
        if sum(len(g.keys) for g in groups[-1]) + len(c.keys) > limit:
            groups.append([])
        groups[-1].append(c)
    return [g for groups in by_size.values() for g in groups if g]


def _keys(user_keys: np.ndarray, batch: int) -> list[bytes]:
    flat = np.asarray(user_keys, dtype=object).reshape(-1)
    if flat.size != batch:
        raise DataError(f"user_key: {flat.size} keys for a batch of {batch} users; send one key per user")
    if any(not isinstance(k, (bytes, str, int, np.integer)) for k in flat):
        # None or NaN would become the text "None"/"nan": one key shared by unrelated users.
        raise DataError(f"user_key: {next(k for k in flat if not isinstance(k, (bytes, str, int, np.integer)))!r} "
                        "is not a key; send one non-empty bytes key per user")
    keys = [k if isinstance(k, bytes) else str(k).encode() for k in flat]
    if any(not k for k in keys):
        raise DataError("user_key: empty key; send a non-empty key per user")
    return keys


__all__ = ["FINGERPRINT_INPUTS", "Page", "Recommender", "check_request", "gate_profiles", "merge_groups"]
