"""Fuzz: corrupted requests through the served request path (serving/service.py, what
astro_recommend and astro_gate run inside Triton) are refused with the project's one-line error,
never scored and never a traceback; the recommender keeps serving good requests after them."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import Tally, cases  # noqa: E402
from serving_fixture import request, tiny_bundle  # noqa: E402

from astro_trt.engines.bundle import load_bundle  # noqa: E402
from astro_trt.serving.service import Recommender  # noqa: E402


def _corrupt(rng: np.random.Generator, cfg, good: dict[str, np.ndarray]) -> tuple[str, dict, np.ndarray]:
    tensors = {k: v.copy() for k, v in good.items()}
    keys = np.array([[b"fuzz"]], dtype=object)
    name = str(rng.choice(sorted(tensors)))
    kind = str(rng.choice(["high", "negative", "float", "rank", "batch", "missing", "keys", "empty"]))
    array = tensors[name]
    if kind == "high":
        limit = {"hist_items": cfg.num_items, "cand_items": cfg.num_items, "hist_behaviors": cfg.num_behaviors - 1,
                 "hist_lengths": cfg.max_len, "scenario": cfg.num_scenarios - 1}.get(name)
        if limit is None:  # times have no upper bound but int64's
            kind = "negative"
        else:
            array.flat[rng.integers(array.size)] = limit + 1 + int(rng.integers(0, 1000))
    if kind == "negative":
        array.flat[rng.integers(array.size)] = -int(rng.integers(1, 10**9))
    elif kind == "float":
        tensors[name] = array.astype(np.float32) + 0.5
    elif kind == "rank":
        tensors[name] = array.reshape(-1) if array.ndim > 1 else array.reshape(1, 1, -1)
    elif kind == "batch":
        tensors[name] = np.repeat(array, 2, axis=0)
    elif kind == "missing":
        del tensors[name]
    elif kind == "keys":
        keys = np.array([[b"a"], [b"b"]], dtype=object)
    elif kind == "empty":
        tensors[name] = array[:, :0] if name == "cand_items" else array[:0]
    return f"{name}:{kind}", tensors, keys


@pytest.mark.fuzz
def test_corrupted_requests_are_refused(tmp_path):
    bundle = load_bundle(tiny_bundle(tmp_path))
    cfg = bundle.config
    recommender = Recommender(bundle, "fp32", compute="ort", cache_bytes=1 << 20)
    good = request(cfg, candidates=6, seed=0)
    rng = np.random.default_rng(7)
    tally = Tally("serving-requests")
    for _ in range(cases(60)):
        case, tensors, keys = _corrupt(rng, cfg, good)
        tally.python(case, lambda t=tensors, k=keys: recommender.page(k, t))
        page = recommender.page(np.array([[b"good"]], dtype=object), good)  # still serving
        assert np.isfinite(page.logits).all()
    tally.check()
