"""The Python API (export_bundle, bisect_bundle, bench) with one bad argument at a time: every
case is refused with the project's one-line error before any output appears. Each case draws
one argument from a list of wrong values (wrong names, wrong types, out-of-range numbers) and
keeps the others valid, so a refusal can only come from the bad one."""

from __future__ import annotations

import random

import pytest
from conftest import random_model, small_config
from fuzz.harness import Tally, cases

pytestmark = pytest.mark.fuzz

BAD = {
    "precisions": ["", "fp8", "fp32,fp64", 32, None, [], ["fp32", None], {"fp32"}, "fp32;fp16", ["fp16", 16]],
    "backend": ["cuda", "", None, "TensorRT RTX", 3, "tensorrt_rtx"],
    "attention": ["flash", "", None, "Plugin ", 1, "reference"],
    "max_batch": [0, -1, "8", 2.5, True, None],
    "max_candidates": [0, -3, "1024", 1e3, False],
    "opt_level": [6, -1, "3", 2.0, True],
}
BISECT_BAD = {
    "precisions": ["fp64", "", 16, ["fp32", "int4"], "bf16"],
    "runtime": ["trt", "gpu", "", None, ["torch"], 7],
    "data": ["imagenet", "", None, 100],
    "users": [0, -1, "8", 1.5, True],
    "candidates": [0, "16", None, False],
    "seed": [-1, "0", 0.5],
}
BENCH_BAD = {
    "runtime": ["torch", "gpu", "", None],
    "candidates": ["", "a,b", "0", "-4", [0], [True], [2.5], "64;256", None],
    "config": ["huge", "", None, ["climber"]],
    "precision": ["fp64", "", 16],
    "attention": ["flash", None],
    "repetitions": [0, -1, "5", True],
    "warmup": [-1, "1", 0.5],
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from astro_trt.engines.export_bundle import export_bundle
    from astro_trt.model.checkpoint import save_checkpoint

    cfg = small_config()
    root = tmp_path_factory.mktemp("fuzz-api")
    ckpt = save_checkpoint(root / "ckpt", random_model(cfg, seed=0), cfg)
    return ckpt, export_bundle(ckpt, root / "bundle", precisions="fp32", engines=False).directory


def test_export_bundle_refuses_one_bad_argument(tiny, tmp_path):
    from astro_trt.engines.export_bundle import export_bundle

    ckpt, _ = tiny
    rng, tally = random.Random(0), Tally("api: export_bundle arguments")
    for i in range(cases(24)):
        name = rng.choice(sorted(BAD))
        value = rng.choice(BAD[name])
        out = tmp_path / f"out{i}"
        # engines=False keeps an accepted case cheap; a back end is only resolved with engines on.
        kwargs = {"engines": name == "backend", name: value}
        tally.python(f"{name}={value!r}", lambda o=out, k=kwargs: export_bundle(ckpt, o, **k))
        assert not out.exists() and list(tmp_path.iterdir()) == [], f"{name}={value!r} left output"
    tally.check()


def one_bad_argument(category: str, table: dict, seed: int, base: int, call) -> None:
    """``base`` cases (scaled), each ``call(**{name: bad value})`` for a random name of ``table``."""
    rng, tally = random.Random(seed), Tally(category)
    for _ in range(cases(base)):
        name = rng.choice(sorted(table))
        value = rng.choice(table[name])
        tally.python(f"{name}={value!r}", lambda n=name, v=value: call(**{n: v}))
    tally.check()


def test_bisect_bundle_refuses_one_bad_argument(tiny):
    from astro_trt.validate.bisect import bisect_bundle

    _, bundle = tiny
    one_bad_argument("api: bisect_bundle arguments", BISECT_BAD, 1, 20,
                     lambda **bad: bisect_bundle(bundle, **{"data": "synthetic", **bad}))


def test_bench_refuses_one_bad_argument(tiny):
    from astro_trt.validate.bench_bundle import bench_bundle

    _, bundle = tiny
    one_bad_argument("api: bench arguments", BENCH_BAD, 2, 20,
                     lambda **bad: bench_bundle(bundle, **{"candidates": [2], "repetitions": 1, "warmup": 0, **bad}))
