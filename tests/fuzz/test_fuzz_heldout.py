"""Fuzz category "held-out API": bad arguments to the public Python API that the other categories
do not try (argument types and values a user may pass by mistake: None, a number or an object
where a path goes, a missing candidates array, a meta tensor, a float batch size, a model that is
not one). Each must be a one-line AstroError; any other exception is a traceback."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from harness import Tally  # noqa: E402
from tiny_bundle import pristine_bundle  # noqa: E402

import astro_trt  # noqa: E402
from astro_trt.contract import HISTORY_INPUTS  # noqa: E402

pytestmark = pytest.mark.fuzz


@pytest.fixture(scope="module")
def api():
    bundle = astro_trt.load_bundle(pristine_bundle())
    ort = astro_trt.OrtRunner.from_bundle(bundle, "fp32")
    torch_runner = astro_trt.TorchRunner(bundle.checkpoint().model)
    batch = astro_trt.synthetic_batch(bundle.config, 2, 5, seed=3)
    history = {n: t.numpy().copy() for n, t in zip(HISTORY_INPUTS, batch.history.astuple(), strict=True)}
    return bundle, {"ort": ort, "torch": torch_runner}, history, batch.cand_items.numpy().copy()


def test_heldout_runner_arguments(api) -> None:
    bundle, runners, history, cand = api
    tally = Tally("heldout-runners")
    for name, runner in runners.items():
        kv = runner.encode(history)
        meta = torch.as_tensor(np.asarray(kv)).to("meta")
        tally.python(f"{name} full cand None", lambda r=runner: r.full(history, None))
        tally.python(f"{name} score cand None", lambda r=runner, kv=kv: r.score(kv, history, None))
        tally.python(f"{name} score meta kv", lambda r=runner, m=meta: r.score(m, history, cand))
    for model in (None, "model", bundle):
        tally.python(f"TorchRunner({type(model).__name__})", lambda m=model: astro_trt.TorchRunner(m))
    for bad in (None, 3, object()):
        tally.python(f"OrtRunner.from_bundle({bad!r})", lambda b=bad: astro_trt.OrtRunner.from_bundle(b, "fp32"))
    for threads in ("2", -1, 1.5, True):
        tally.python(f"OrtRunner threads={threads!r}",
                     lambda t=threads: astro_trt.OrtRunner.from_bundle(bundle, "fp32", threads=t))
    tally.check()


def test_heldout_paths_and_batches(api) -> None:
    bundle, _, _, _ = api
    cfg = bundle.config
    tally = Tally("heldout-api")
    for bad in (None, 5, 2.5, "", b"\x00", ["a"]):
        tally.python(f"load_bundle({bad!r})", lambda b=bad: astro_trt.load_bundle(b))
        tally.python(f"describe_bundle({bad!r})", lambda b=bad: astro_trt.describe_bundle(b))
        tally.python(f"load_checkpoint({bad!r})", lambda b=bad: astro_trt.load_checkpoint(b))
        tally.python(f"TrtRunner({bad!r})", lambda b=bad: astro_trt.TrtRunner(b))
    tally.python("TrtRunner(cpu)", lambda: astro_trt.TrtRunner(bundle.directory, "fp32", device="cpu"))
    for args, kw in (((2.5, 5), {}), (("2", 5), {}), ((True, 5), {}), ((2, None), {}), ((2, 5), {"seed": -1}),
                     ((2, 5), {"seed": "x"}), ((2, 5), {"seed": 1.0}), ((10**12, 5), {}), ((2, 10**12), {}),
                     ((2, 5), {"empty_block_prob": float("nan")}), ((2, 5), {"empty_block_prob": "0.1"})):
        kw = {"seed": 1, **kw}
        tally.python(f"synthetic_batch{args} {kw}", lambda a=args, k=kw: astro_trt.synthetic_batch(cfg, *a, **k))
    for bad_cfg in (None, {}, bundle):
        tally.python(f"synthetic_batch(cfg={type(bad_cfg).__name__})",
                     lambda c=bad_cfg: astro_trt.synthetic_batch(c, 2, 5, seed=1))
    tally.check()
    # What the gate must keep accepting: a Bundle for describe, a path for OrtRunner.from_bundle.
    assert "manifest sha256" in astro_trt.describe_bundle(bundle)
    assert astro_trt.OrtRunner.from_bundle(str(bundle.directory), "fp32").precision == "fp32"


def test_heldout_cli_flags(tmp_path) -> None:
    """Flags refused before any work (each run is a short subprocess; nothing here starts a server)."""
    tally = Tally("heldout-cli")
    bundle = tmp_path  # the ports are refused before the bundle is read
    for url in ("127.0.0.1:99999", "127.0.0.1:0", ":8000"):
        tally.cli(f"loadtest {url}", ["loadtest", url, "--duration", "0.5", "--protocol", "http"], timeout=60)
    tally.cli("loadtest --grpc-url bad", ["loadtest", "127.0.0.1:8000", "--grpc-url", "bad:url:x",
                                          "--duration", "0.5"], timeout=60)
    tally.cli("serve same ports", ["serve", bundle, "--http-port", "8000", "--grpc-port", "8000"], timeout=60)
    (tmp_path / "file").write_text("x")
    for cache in ("/proc/astro-x", str(tmp_path / "file" / "sub")):
        tally.cli(f"data --cache-dir {cache}", ["data", "ml-100k", "--cache-dir", cache, "--source", "/etc/passwd"],
                  timeout=60)
    for threads in ("abc", "-1", "2.5"):
        tally.cli(f"ASTRO_ORT_THREADS={threads}", ["validate", pristine_bundle(), "--data", "synthetic"],
                  env={"ASTRO_ORT_THREADS": threads}, timeout=60)
    tally.check()


def test_heldout_outputs_that_would_delete_inputs(tmp_path, monkeypatch) -> None:
    """--out (with --force) that is the checkpoint being exported, holds it or lies inside it, or is the
    current folder: replacing it would delete the source or the folder the user stands in."""
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(pristine_bundle() / "checkpoint", ckpt)
    before = sorted(p.name for p in ckpt.iterdir())
    tally = Tally("heldout-outputs")
    monkeypatch.chdir(ckpt)
    for out in (ckpt, ckpt / "sub", tmp_path, Path(".")):
        tally.python(f"export_bundle(out={out})",
                     lambda o=out: astro_trt.export_bundle(ckpt, o, precisions="fp32", engines=False, force=True))
    tally.cli("triton --out . --force", ["triton", pristine_bundle(), "--out", ".", "--force"], timeout=60)
    tally.check()
    assert sorted(p.name for p in ckpt.iterdir()) == before  # the checkpoint is untouched


def test_heldout_serving_and_out_arguments(api, tmp_path) -> None:
    from serving_fixture import request  # tests/ is on the path (tiny_bundle puts it there)

    from astro_trt.serving.service import Recommender

    bundle, _, _, _ = api
    tally = Tally("heldout-serving")
    recommender = Recommender(bundle, "fp32", compute="ort", cache_bytes=1 << 20)
    good = request(bundle.config, candidates=4, seed=0)
    batch = good["cand_items"].shape[0]
    for name, key in (("None", None), ("nan", float("nan")), ("object", object())):
        keys = np.array([[key]] * batch, dtype=object)
        tally.python(f"user_key {name}", lambda k=keys: recommender.page(k, good))
    tally.python("cache_bytes -1", lambda: Recommender(bundle, "fp32", compute="ort", cache_bytes=-1))
    tally.python("bisect_bundle(out=5)", lambda: astro_trt.bisect_bundle(bundle.directory, out=5))
    tally.python("bench(out=5)", lambda: astro_trt.bench(bundle.directory, out=5))
    ckpt = bundle.checkpoint_dir
    tally.python("export_bundle(out=None)", lambda: astro_trt.export_bundle(ckpt, None, engines=False))
    tally.python("export_bundle(timing_cache=5)",
                 lambda: astro_trt.export_bundle(ckpt, tmp_path / "b", engines=False, timing_cache=5))
    tally.check()
    assert not (tmp_path / "b").exists()


def test_heldout_absurd_finite_cache(api) -> None:
    """A finite cache no encoder produced (3e38 everywhere) passes the input gate; its NaN logits must not."""
    _, runners, history, cand = api
    tally = Tally("heldout-cache")
    for name, runner in runners.items():
        kv = np.asarray(runner.encode(history), dtype=np.float32)
        for value in (3e38, -3e38):
            absurd = np.full(kv.shape, value, np.float32)
            tally.python(f"{name} kv={value}", lambda r=runner, a=absurd: r.score(a, history, cand))
        assert np.isfinite(runner.score(kv, history, cand)).all()  # the real cache still scores
    tally.check()
