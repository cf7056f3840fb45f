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
        list): requests with the same page size are gated, encoded and scored in merged calls of at
        most the profiles' batch; each request gets its Page, or the exception that refused or
        failed it alone (a merged gate or call that fails is retried request by request, so one bad
        request never fails its neighbours)."""
        results: list[Page | Exception | None] = [None] * len(requests)
        checked: list[_Checked] = []
        for chunk in gate_chunks(requests, self.batch_limit):
            merged = self._check_merged(chunk, requests) if len(chunk) > 1 else None
            if merged is not None:
                checked.append(merged)
                continue
            for index in chunk:
                user_keys, tensors = requests[index]
                try:
                    arrays, cand = check_request(self.cfg, tensors, self.profiles)
                    keys = _keys(user_keys, cand.shape[0])
                except Exception as exc:  # noqa: BLE001 - this request's error, returned in its place
                    results[index] = exc
                    continue
                checked.append(_Checked([(index, len(keys))], keys, self._prints(arrays, len(keys)), arrays, cand))
        for group in merge_groups(checked, self.batch_limit):
            try:
                self._serve(group, results)
            except Exception as exc:  # noqa: BLE001 - find which request it was: each alone
                alone = [one for c in group for one in c.split()]
                if len(alone) == 1:
                    results[alone[0].spans[0][0]] = exc
                    continue
                for one in alone:
                    try:
                        self._serve([one], results)
                    except Exception as error:  # noqa: BLE001
                        results[one.spans[0][0]] = error
        return results  # type: ignore[return-value]

    def _check_merged(self, chunk: Sequence[int],
                      requests: Sequence[tuple[np.ndarray, Mapping[str, np.ndarray]]]) -> _Checked | None:
        """One gate pass over the chunk's requests concatenated (gate_chunks: the same tensors,
        dtypes and non-batch shapes, at most the profiles' batch of users): the gate checks each
        user's rows on their own, so the merged arrays pass exactly when every request would.
        None when a request's keys or the merged arrays are refused: the caller then gates the
        chunk request by request, so that each refusal is that request's own message."""
        try:
            keys = [_keys(requests[i][0], int(np.shape(requests[i][1]["hist_items"])[0])) for i in chunk]
            tensors = {n: np.concatenate([requests[i][1][n] for i in chunk]) for n in requests[chunk[0]][1]}
            arrays, cand = check_request(self.cfg, tensors, self.profiles)
        except Exception:  # noqa: BLE001 - the per-request path names the request and its problem
            return None
        flat = [k for ks in keys for k in ks]
        return _Checked([(i, len(ks)) for i, ks in zip(chunk, keys, strict=True)], flat,
                        self._prints(arrays, len(flat)), arrays, cand)

    @staticmethod
    def _prints(arrays: Mapping[str, np.ndarray], users: int) -> list[bytes]:
        return [fingerprint(arrays, FINGERPRINT_INPUTS, b) for b in range(users)]

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
        # One scorer call for the whole group, on this thread: split into two concurrent calls
        # (users on both cores) it served 0.75-0.98x of the unbatched requests/s on the shared
        # 2-core machine, against 1.07-1.48x as one call (loadtest --compare-batching, minutes
        # apart): smaller calls cost more per user, and a batch waits for its slower half.
        logits = self.compute.score_checked(self.compute.stack(states), feeds)
        start = 0
        for c in group:
            for index, users in c.spans:
                results[index] = Page(logits[start:start + users], encoded[start:start + users])
                start += users


@dataclass
class _Checked:
    """Requests that passed the gate (one, or several gated together): where each one's result
    goes and how many users (rows) it has, in order, then all their users' keys, fingerprints
    and arrays."""

    spans: list[tuple[int, int]]  # (request index, users)
    keys: list[bytes]
    prints: list[bytes]
    arrays: dict[str, np.ndarray]
    cand: np.ndarray

    def split(self) -> list[_Checked]:
        """One _Checked per request (views of the rows), to retry a failed merged call alone."""
        if len(self.spans) == 1:
            return [self]
        out, start = [], 0
        for index, users in self.spans:
            rows = slice(start, start + users)
            out.append(_Checked([(index, users)], self.keys[rows], self.prints[rows],
                                {n: a[rows] for n, a in self.arrays.items()}, self.cand[rows]))
            start += users
        return out


def gate_chunks(requests: Sequence[tuple[Any, Mapping[str, Any]]], limit: int) -> list[list[int]]:
    """Request indices in arrival order, in chunks that one gate pass can check together: the
    same tensor names, dtypes and shapes but the batch axis (which every tensor of a request
    agrees on), at most ``limit`` users in all. A request that fits no chunk (a missing or ragged
    tensor, more users than ``limit``) is a chunk of its own, gated alone."""
    chunks: dict[Any, list[list[int]]] = {}
    alone: list[list[int]] = []
    users: dict[int, int] = {}
    for index, (_, tensors) in enumerate(requests):
        layout = _layout(tensors)
        if layout is None or layout[0] > limit:
            alone.append([index])
            continue
        users[index] = layout[0]
        open_chunks = chunks.setdefault(layout[1], [[]])
        if sum(users[i] for i in open_chunks[-1]) + layout[0] > limit:
            open_chunks.append([])
        open_chunks[-1].append(index)
    return [c for cs in chunks.values() for c in cs if c] + alone


def _layout(tensors: Mapping[str, Any]) -> tuple[int, tuple[Any, ...]] | None:
    """(users, what must agree to concatenate) of a request's numpy tensors; None when a tensor is
    not an array with the batch axis every other one has."""
    if not all(isinstance(t, np.ndarray) and t.ndim >= 1 for t in tensors.values()) or not tensors:
        return None
    batch = {t.shape[0] for t in tensors.values()}
    if len(batch) != 1:
        return None
    return batch.pop(), tuple(sorted((n, t.dtype.str, t.shape[1:]) for n, t in tensors.items()))


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


__all__ = ["FINGERPRINT_INPUTS", "Page", "Recommender", "check_request", "gate_chunks", "gate_profiles",
           "merge_groups"]
