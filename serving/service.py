"""The request path every served model shares, free of Triton so that it runs (and is tested)
in-process too: the project's one input gate (runtime/gate.py) once in front of any model, then
"encode once, score many" with a per-user cache, on a runner of the runtime layer (runtime/)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from astro_trt.config import ASTROConfig
from astro_trt.contract import CAND_ITEMS, HISTORY_INPUTS, ITEM_SCORER, KV_CACHE, SPLIT_GRAPHS, USER_ENCODER
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
                 cache_dtype: str = DEFAULT_CACHE_DTYPE) -> None:
        self.cfg = bundle.config
        self.profiles = {g: bundle.profile(g) for g in SPLIT_GRAPHS}  # tuples already, as gate_profiles gives
        self.codec = StateCodec(cache_dtype)
        self.compute = engine or make_compute(bundle, precision, compute, threads)
        if not self.codec.identity and not isinstance(self.compute, OrtRunner):
            raise BackendError(f"--cache-dtype {cache_dtype} packs states on the host, but {self.compute.name} keeps "
                               "them on the device; serve with ONNX Runtime or --cache-dtype fp32")
        self.cache = UserCache(cache_bytes)
        self.encodes = 0  # users encoded since start

    def page(self, user_keys: np.ndarray, tensors: Mapping[str, np.ndarray]) -> Page:
        arrays, cand = check_request(self.cfg, tensors, self.profiles)
        batch = cand.shape[0]
        keys = _keys(user_keys, batch)
        prints = [fingerprint(arrays, FINGERPRINT_INPUTS, b) for b in range(batch)]
        cached = [self.cache.get(k, p) for k, p in zip(keys, prints, strict=True)]
        states: list[Any] = [None if c is None else self.codec.unpack(c) for c in cached]
        missing = [b for b, s in enumerate(states) if s is None]
        # What the graphs of this page read, put into the runner's form once (TensorRT: one upload).
        io = self.compute.io
        names = {*io[ITEM_SCORER].input_names, *(io[USER_ENCODER].input_names if missing else ())} - {KV_CACHE}
        feeds = self.compute.put({n: cand if n == CAND_ITEMS else arrays[n] for n in names})
        if missing:
            rows = {n: feeds[n] if len(missing) == batch else feeds[n][missing] for n in io[USER_ENCODER].input_names}
            fresh = self.compute.split(self.compute.encode_checked(rows))
            self.encodes += len(missing)
            for b, state in zip(missing, fresh, strict=True):
                # A page scores from the state as the cache keeps it: the same logits hit or miss.
                packed = self.codec.pack(state)
                states[b] = self.codec.unpack(packed)
                self.cache.put(keys[b], prints[b], packed,
                               self.compute.nbytes(state) if self.codec.identity else packed.nbytes)
        encoded = np.zeros(batch, dtype=bool)
        encoded[missing] = True
        return Page(self.compute.score_checked(self.compute.stack(states), feeds), encoded)


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


__all__ = ["FINGERPRINT_INPUTS", "Page", "Recommender", "check_request", "gate_profiles"]
