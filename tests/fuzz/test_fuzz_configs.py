"""Fuzz category "configs": config values of the wrong type or encoding, and configs that pass
every per-field bound yet ask for more than the machine has.

- types: every field set to values of other JSON types or outside its range (floats, strings
  and null where integers belong, bools as integers, non-finite numbers, 2^70, names with line
  breaks), keys missing or unknown, a top level that is not an object -> ``ASTROConfig.from_dict``;
- encodings: config.json as non-UTF-8 bytes, a BOM, NaN tokens, deeply nested JSON, an empty or
  oversized file, a directory, a FIFO, a device -> ``ASTROConfig.load``, which must not block;
- resources: valid configs whose model or attention does not fit this machine -> the memory
  checks of load (``check_fits``), train (``train_ml100k``, refused before it reads any data)
  and bench (``check_counts``, the profile; its naive path is sampled within a memory budget).

A sample goes through `astro-trt train --config FILE`.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from harness import Tally, cases

from astro_trt.config import LIMITS, PRESETS, ASTROConfig
from astro_trt.errors import ConfigError
from astro_trt.model.resources import check_fits

pytestmark = pytest.mark.fuzz

BASE = PRESETS["ml100k"].to_dict()

# Per field kind: values that must never be accepted.
BAD_INT = [None, "8", 8.0, 8.5, True, False, -1, float("nan"), float("inf"), 2**70, -(2**70), [], {}, [8], "", "0x10"]
BAD_FLOAT = [None, "1e-5", True, False, float("nan"), float("inf"), -float("inf"), [], {}, "nan"]
BAD_LABEL = [None, 5, "", "a\nb", "x" * 201, [], {}, "\x00", "tab\there", "line\u2028sep", True]
BAD_NAMES = ["ab", [1, 2], [None, None], ["a"], ["a", "b\n"], {}, 3, ["", "b"], [[], []]]


def _bad_values(key: str) -> list:
    if key in LIMITS:
        low, high = LIMITS[key]
        return [*BAD_INT, low - 1, high + 1, 0 if low >= 1 else -1]
    if key == "dropout":
        return [*BAD_FLOAT, -0.1, 1.0, 1.5]
    if key == "layer_norm_eps":
        return [*BAD_FLOAT, 0, 0.0, -1e-5, 2.0]
    if key == "name":
        return BAD_LABEL
    return BAD_NAMES  # task_names, block_names


def test_fuzz_config_types():
    tally = Tally("configs")
    rng = random.Random(int(os.environ.get("ASTRO_FUZZ_SEED", "14")))
    keys = sorted(BASE)
    # Every bad value of every field once, then random pairs of bad values.
    singles = [(k, v) for k in keys for v in _bad_values(k)]
    for key, value in singles:
        tally.python(f"{key}={value!r}"[:80], lambda d={**BASE, key: value}: ASTROConfig.from_dict(d))
    for _ in range(cases(100)):
        a, b = rng.sample(keys, 2)
        data = {**BASE, a: rng.choice(_bad_values(a)), b: rng.choice(_bad_values(b))}
        tally.python(f"{a}={data[a]!r}, {b}={data[b]!r}"[:80], lambda d=data: ASTROConfig.from_dict(d))
    for key in keys:
        if key not in ("num_pos_buckets", "num_time_buckets", "time_bucket_max", "dropout", "layer_norm_eps",
                       "task_names", "block_names"):  # those have defaults
            rest = {x: v for x, v in BASE.items() if x != key}
            tally.python(f"without {key}", lambda d=rest: ASTROConfig.from_dict(d))
    tally.python("unknown key", lambda: ASTROConfig.from_dict({**BASE, "num_experts": 4}))
    for top in ([BASE], "ml100k", 3, None, True):
        tally.python(f"top level {type(top).__name__}", lambda t=top: ASTROConfig.from_dict(t))
    tally.check()


def _files(tmp: Path, rng: random.Random) -> list[tuple[str, Path]]:
    """config.json variants that are not a usable UTF-8 JSON object file."""
    good = json.dumps(BASE)
    made: list[tuple[str, Path]] = []

    def write(name: str, data: bytes) -> None:
        path = tmp / f"{len(made)}-config.json"
        path.write_bytes(data)
        made.append((name, path))

    write("latin-1 name", good.replace('"ml100k"', '"caf\u00e9"').encode("latin-1"))
    write("UTF-16", good.encode("utf-16"))
    write("BOM", b"\xef\xbb\xbf" + good.encode())
    write("NaN token", good.replace('"dropout": 0.1', '"dropout": NaN').encode())
    write("Infinity token", good.replace('"layer_norm_eps": 1e-05', '"layer_norm_eps": Infinity').encode())
    write("empty", b"")
    write("deeply nested list", b"[" * 100_000 + b"]" * 100_000)
    write("nested object", ('{"a":' * 50 + "1" + "}" * 50).encode())
    write("nested value", good.replace('"task_names": ["like", "love"]',
                                       '"task_names": ' + "[" * 40 + "]" * 40).encode())
    write("oversized", b'{"name": "' + b"x" * 2_000_000 + b'"}')
    write("trailing garbage", good.encode() + b"}")
    write("duplicate keys, last invalid", good[:-1].encode() + b', "max_len": -5}')
    write("2^70", good.replace('"max_len": 50', f'"max_len": {2**70}').encode())
    write("huge exponent", good.replace('"layer_norm_eps": 1e-05', '"layer_norm_eps": 1e999').encode())
    for _ in range(cases(20)):
        data = bytearray(good.encode())
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            ASTROConfig.from_dict(json.loads(bytes(data).decode("utf-8")))
            continue  # the flip kept it a valid config: no case
        except Exception:  # noqa: BLE001 -- any failure makes it a bad file worth trying
            write("random byte flips", bytes(data))
    special = tmp / "dir-config.json"
    special.mkdir()
    made.append(("a directory", special))
    fifo = tmp / "fifo-config.json"
    os.mkfifo(fifo)
    made.append(("a FIFO", fifo))
    for device in ("/dev/zero", "/dev/null", "/dev/urandom"):
        link = tmp / f"{Path(device).name}-config.json"
        link.symlink_to(device)
        made.append((f"a link to {device}", link))
    made.append(("missing", tmp / "missing-config.json"))
    return made


def test_fuzz_config_files(tmp_path):
    tally = Tally("configs")
    rng = random.Random(int(os.environ.get("ASTRO_FUZZ_SEED", "14")) + 1)
    for name, path in _files(tmp_path, rng):
        tally.python(f"config.json {name}", lambda p=path: ASTROConfig.load(p))
    tally.check()


def _too_big(rng: random.Random) -> ASTROConfig:
    """A config inside every per-field bound whose memory estimate exceeds this machine."""
    while True:
        cfg = PRESETS["ml100k"].replace(
            max_len=rng.choice([50, 2000, 4000, 16_384]), num_layers=rng.choice([2, 64, 256]),
            d_model=rng.choice([64, 4096, 16_384]), num_items=rng.choice([1682, 10**7, 10**8]),
            num_heads=rng.choice([4, 64]), ffn_dim=rng.choice([128, 65_536]),
        )
        try:
            check_fits(cfg, users=2, candidates=5, purpose="probe")
        except ConfigError:
            return cfg


def test_fuzz_config_resources(tmp_path):
    tally = Tally("configs")
    rng = random.Random(int(os.environ.get("ASTRO_FUZZ_SEED", "14")) + 2)
    from astro_trt.model.train import TrainOptions, train_ml100k

    # The example first: max_len 2000 asked 17.9 GB in one allocation.
    examples = [PRESETS["ml100k"].replace(max_len=2000), *(_too_big(rng) for _ in range(cases(8)))]
    for cfg in examples:
        label = f"max_len={cfg.max_len} layers={cfg.num_layers} d={cfg.d_model} items={cfg.num_items}"
        tally.python(f"load: {label}", lambda c=cfg: check_fits(c, users=2, candidates=5, purpose="one request"))
        tally.python(f"train: {label}", lambda c=cfg: train_ml100k(c, tmp_path / "never", TrainOptions(epochs=1),
                                                                  progress=False, log=lambda _m: None))
    assert not (tmp_path / "never").exists()
    # Training batches: a valid config, a batch far beyond memory.
    tally.python("train: batch 10^6 x 100k candidates", lambda: train_ml100k(
        PRESETS["ml100k"], tmp_path / "never", TrainOptions(epochs=1, batch_size=10**6), candidates=100_000,
        progress=False, log=lambda _m: None))
    # bench --candidates beyond the profile (the naive path is sampled within a memory budget).
    from astro_trt.validate.bench_bundle import check_counts

    for counts in ([5000], [64, 1025], [2048], [10**9]):
        tally.python(f"bench {counts} over a 1024 profile", lambda c=counts: check_counts(c, None))
    tally.check()


def test_fuzz_configs_cli(tmp_path):
    """A sample through `astro-trt train --config FILE`: a FIFO named config.json does not hang,
    a float where an integer belongs is one line; neither writes --out."""
    tally = Tally("configs")
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    tally.cli("train --config FIFO", ["train", "--config", fifo, "--out", tmp_path / "o1", "--no-progress"],
              timeout=60)
    floats = tmp_path / "floats.json"
    floats.write_text(json.dumps({**BASE, "num_pos_buckets": 32.0}))
    tally.cli("train --config num_pos_buckets 32.0", ["train", "--config", floats, "--out", tmp_path / "o2"],
              timeout=60)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    tally.check()
