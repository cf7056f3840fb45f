"""Fuzz category "flags": bad values of train, validate, export and bench options, refused
before any work starts.

"Before any work" is part of the verdict: each Python case runs the library entry a command
calls first (``TrainOptions``, ``train_ml100k`` with an empty data cache, ``Gates``, ``Profile``,
``check_destination``, bench's ``parse_candidates`` and ``check_counts``), and a refusal
that does not name the flag (say, a missing dataset: the data was being read) counts against it.
A sample goes through the CLI, where the bundle and checkpoint named do not even exist: a flag
checked late would fail on them instead.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from harness import Tally, cases, naming

from astro_trt.artifacts import check_destination
from astro_trt.config import PRESETS
from astro_trt.engines.build import Profile
from astro_trt.engines.export_bundle import parse_precisions as _precisions
from astro_trt.errors import AstroError
from astro_trt.model.train import TrainOptions, train_ml100k
from astro_trt.validate.bench import parse_candidates
from astro_trt.validate.gates import Gates

pytestmark = pytest.mark.fuzz

NUMBERS = [0, -1, -(10**9), 10**9, 2**63, float("nan"), float("inf"), -float("inf"), 1e-300, True, None, "3"]


def test_fuzz_train_flags(tmp_path):
    tally = Tally("flags")
    rng = random.Random(int(os.environ.get("ASTRO_FUZZ_SEED", "14")))
    empty_cache = tmp_path / "no-data"  # reaching the data would fail here, naming the dataset
    bad = {
        "epochs": [0, -1, 10**7, 2.5, True], "batch_size": [0, -5, 10**9, 1.5],
        "patience": [0, -1, 10**7], "seed": [-1, 2**32, 2**70, 0.5],
        "lr": [float("inf"), float("nan"), -1.0, 0.0, -float("inf"), 100.0, 1e300, "1e-3"],
        "weight_decay": [-1.0, float("nan"), float("inf")],
    }
    flag = {"epochs": "--epochs", "batch_size": "--batch-size", "patience": "--patience", "seed": "--seed",
            "lr": "--lr", "weight_decay": "weight decay"}
    plan = [(k, v) for k, values in bad.items() for v in values]
    plan += [(k, rng.choice(NUMBERS)) for k in rng.choices(sorted(bad), k=cases(30))]
    for key, value in plan:
        options = TrainOptions(**{key: value})
        try:
            options.validate()
            continue  # a valid draw (lr 1e-300, seed 0, ...): no case, and no training started
        except AstroError:
            pass
        tally.python(f"train {key}={value!r}", naming(flag[key], lambda o=options: train_ml100k(
            PRESETS["ml100k"], tmp_path / "out", o, cache_dir=empty_cache, progress=False, log=lambda _m: None)))
    for value in (0, -1, 10**6, 10**9):
        tally.python(f"train --candidates {value}", naming("candidates", lambda v=value: train_ml100k(
            PRESETS["ml100k"], tmp_path / "out", TrainOptions(), candidates=v, cache_dir=empty_cache,
            progress=False, log=lambda _m: None)))
    assert not (tmp_path / "out").exists() and not empty_cache.exists()
    tally.check()


def test_fuzz_gate_and_profile_flags():
    tally = Tally("flags")
    rng = random.Random(int(os.environ.get("ASTRO_FUZZ_SEED", "14")) + 1)
    fields = [f for f in Gates().to_dict()]
    plan = [("topk", v) for v in (0, -1, 10**9, 2.5, True, float("nan"))]
    plan += [("topk_overlap", v) for v in (-0.1, 1.5, float("nan"), float("inf"))]
    plan += [(f, v) for f in fields if f not in ("topk", "topk_overlap") for v in (-1.0, float("nan"), float("inf"))]
    for _ in range(cases(30)):
        f = rng.choice(fields)
        plan.append((f, rng.choice([-1, -1e-9, float("nan"), float("inf"), -float("inf"), "x", None, True])))
    for key, value in plan:
        tally.python(f"validate --{key}={value!r}", naming("--" + key.replace("_", "-"), lambda k=key, v=value: Gates(
            **{k: v})))
    for key, value in [("max_batch", v) for v in (0, -1, 10**6, 2**40)] + \
            [("max_candidates", v) for v in (0, -3, 10**6, 2**31)]:
        tally.python(f"export --{key}={value}", naming(key.replace("_", "-"), lambda k=key, v=value: Profile(
            **{k: v})))
    for text in ("", ",", "fp8", "fp32,int4", "FP33", "fp16;fp32", "\x00"):
        tally.python(f"export --precision {text!r}", naming("--precision", lambda t=text: _precisions(t)))
    for text in ("", "a", "0", "-1", "1e3", "64,,x", "10**6", "0x10", "nan", "inf"):
        tally.python(f"bench --candidates {text!r}", naming("--candidates", lambda t=text: parse_candidates(t)))
    from astro_trt.validate.bench_bundle import check_counts

    for counts in ([5000], [10**6], [1, 1025]):
        tally.python(f"bench --candidates {counts} (profile 1024)", naming("--candidates", lambda c=counts:
                     check_counts(c, None)))
    tally.check()


def test_fuzz_out_flags(tmp_path):
    tally = Tally("flags")
    regular = tmp_path / "regular-file"
    regular.write_text("not a folder")
    outs = [regular / "out", regular / "a" / "b" / "out", regular, Path("/proc/self/out"), Path("/proc/out"),
            Path("/sys/kernel/out"), Path("/dev/null/out"), Path("/dev/shm-not/out"), Path("/proc")]
    for out in outs:
        tally.python(f"--out {out}", naming(str(out), lambda o=out: check_destination(o)))
        tally.python(f"train --out {out}", naming(str(out), lambda o=out: train_ml100k(
            PRESETS["ml100k"], o, TrainOptions(), cache_dir=tmp_path / "no-data", progress=False,
            log=lambda _m: None)))
    assert regular.read_text() == "not a folder"
    tally.check()


def test_fuzz_flags_cli(tmp_path):
    """The same refusals through the commands, on paths that do not exist: a flag checked after
    the work began would fail on the missing bundle or checkpoint instead (the verdict asks the
    message to name the flag)."""
    tally = Tally("flags")
    missing = tmp_path / "missing"
    runs = [
        ("train --lr inf", ["train", "--lr", "inf", "--out", tmp_path / "t", "--cache-dir", missing], "--lr"),
        ("train --epochs 0", ["train", "--epochs", "0", "--out", tmp_path / "t", "--cache-dir", missing], "--epochs"),
        ("validate --topk 0", ["validate", missing, "--topk", "0"], "--topk"),
        ("validate --fp32-max-abs nan", ["validate", missing, "--fp32-max-abs", "nan"], "--fp32-max-abs"),
        ("export --out under /proc", ["export", missing, "--out", "/proc/astro-out", "--no-engines"], "/proc"),
    ]
    for name, argv, flag in runs:
        outcome = tally.cli(name, argv, timeout=60)
        if outcome.kind == "refused" and flag not in outcome.detail:
            tally.bad.append((name, outcome))  # refused, but for another reason: the flag came late
    assert not (tmp_path / "t").exists()
    tally.check()
