"""Fuzz categories "library argument types" and "threads/sizes": every public function of
``astro_trt`` (astro_trt/__init__.py) given a bad path (None, a number, bytes, blank, NUL, longer
than PATH_MAX, a name longer than NAME_MAX, an os.PathLike whose __fspath__ gives an int or bytes
or raises), a bad flag, option, callback or object, or a number beyond what the machine can do
(threads past its cores, 10^12 repetitions, 10^7 candidates): each is refused with the project's
error in one line, before any work (the expensive functions would take minutes otherwise)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from harness import Tally
from tiny_bundle import pristine_bundle

import astro_trt
from astro_trt.arguments import max_threads

pytestmark = pytest.mark.fuzz


class _Fs:
    def __init__(self, value: object) -> None:
        self.value = value

    def __fspath__(self):  # noqa: ANN204 -- returns whatever it was given, on purpose
        if isinstance(self.value, BaseException):
            raise self.value
        return self.value


BAD_PATHS = {
    "None": None, "int": 123, "float": 1.5, "bytes": b"bytes-path", "empty": "", "blank": "   ", "NUL": "a\0b",
    "10,000 characters": "x" * 10_000, "a 300-character name": "d/" + "n" * 300, "fspath int": _Fs(7),
    "fspath bytes": _Fs(b"x"), "fspath raises": _Fs(RuntimeError("boom")), "object": object(), "list": ["a"],
}


def _path_calls(bundle: Path, ckpt: Path, tmp: Path, loaded) -> dict[str, object]:
    """name -> call(path)"""
    return {
        "load_bundle": lambda p: astro_trt.load_bundle(p),
        "describe_bundle": lambda p: astro_trt.describe_bundle(p),
        "validate_bundle": lambda p: astro_trt.validate_bundle(p, data="synthetic"),
        "validate_bundle(checkpoint=)": lambda p: astro_trt.validate_bundle(bundle, data="synthetic", checkpoint=p),
        "bisect_bundle": lambda p: astro_trt.bisect_bundle(p),
        "bisect_bundle(out=)": lambda p: astro_trt.bisect_bundle(bundle, out=p),
        "bench": lambda p: astro_trt.bench(p),
        "bench(out=)": lambda p: astro_trt.bench(bundle, out=p),
        "export_bundle(checkpoint)": lambda p: astro_trt.export_bundle(p, tmp / "out", engines=False),
        "export_bundle(out)": lambda p: astro_trt.export_bundle(ckpt, p, engines=False),
        "load_checkpoint": lambda p: astro_trt.load_checkpoint(p),
        "OrtRunner.from_bundle": lambda p: astro_trt.OrtRunner.from_bundle(p),
        "write_repository(out)": lambda p: _write_repository(loaded, p),
    }


def _write_repository(bundle, out, **kwargs):
    from astro_trt.serving.repository import write_repository

    return write_repository(bundle, out, **kwargs)


def test_every_public_function_refuses_a_bad_path(tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(pristine_bundle(), bundle)
    loaded = astro_trt.load_bundle(bundle)
    tally = Tally("library argument types: paths")
    for fn, call in _path_calls(bundle, loaded.checkpoint_dir, tmp_path, loaded).items():
        for name, value in BAD_PATHS.items():
            if fn.endswith("=)") and value is None:
                continue  # None is the documented default of those (the bundle's own)
            tally.python(f"{fn}({name})", lambda c=call, v=value: c(v))
    tally.check()


def test_every_public_function_refuses_bad_types_and_sizes(tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(pristine_bundle(), bundle)
    loaded = astro_trt.load_bundle(bundle)
    ckpt = loaded.checkpoint_dir
    graphs = {g: loaded.onnx_path(g, "fp32") for g in ("user_encoder", "item_scorer", "full_model")}
    too_many = max_threads() + 1
    tally = Tally("library argument types and sizes")
    cases = {
        "validate_bundle(gates='strict')": lambda: astro_trt.validate_bundle(bundle, gates="strict"),
        "validate_bundle(progress=123)": lambda: astro_trt.validate_bundle(bundle, progress=123),
        "validate_bundle(runtimes=123)": lambda: astro_trt.validate_bundle(bundle, runtimes=123),
        "validate_bundle(data=5)": lambda: astro_trt.validate_bundle(bundle, data=5),
        "validate_bundle(expect_sha256=5)": lambda: astro_trt.validate_bundle(bundle, expect_sha256=5),
        "bisect_bundle(gates='strict')": lambda: astro_trt.bisect_bundle(bundle, gates="strict"),
        "bisect_bundle(progress=123)": lambda: astro_trt.bisect_bundle(bundle, progress=123),
        "bisect_bundle(candidates=10**7)": lambda: astro_trt.bisect_bundle(bundle, candidates=10**7),
        "bisect_bundle(users=10**6)": lambda: astro_trt.bisect_bundle(bundle, users=10**6),
        "bench(progress=123)": lambda: astro_trt.bench(bundle, progress=123),
        "bench(repetitions=10**12)": lambda: astro_trt.bench(bundle, repetitions=10**12),
        "bench(warmup=10**9)": lambda: astro_trt.bench(bundle, warmup=10**9),
        "bench(threads=10**6)": lambda: astro_trt.bench(bundle, threads=10**6),
        f"bench(threads={too_many})": lambda: astro_trt.bench(bundle, threads=too_many),
        "bench(peer='no')": lambda: astro_trt.bench(bundle, peer="no"),
        "bench(profile='yes')": lambda: astro_trt.bench(bundle, profile="yes"),
        "bench(candidates=[2*10**7])": lambda: astro_trt.bench(bundle, candidates=[2 * 10**7]),
        "export_bundle(progress=123)": lambda: astro_trt.export_bundle(ckpt, tmp_path / "o", engines=False,
                                                                       progress=123),
        "export_bundle(force='yes')": lambda: astro_trt.export_bundle(ckpt, tmp_path / "o", engines=False,
                                                                      force="yes"),
        "export_bundle(engines='no')": lambda: astro_trt.export_bundle(ckpt, tmp_path / "o", engines="no"),
        "export_bundle(max_batch=10**9)": lambda: astro_trt.export_bundle(ckpt, tmp_path / "o", engines=False,
                                                                          max_batch=10**9),
        "load_bundle(verify='no')": lambda: astro_trt.load_bundle(bundle, verify="no"),
        "load_bundle(expect_sha256=123)": lambda: astro_trt.load_bundle(bundle, expect_sha256=123),
        "describe_bundle(verify='no')": lambda: astro_trt.describe_bundle(bundle, verify="no"),
        "OrtRunner(None, cfg, fp32)": lambda: astro_trt.OrtRunner(None, loaded.config, "fp32"),
        "OrtRunner(graphs=/etc/passwd)": lambda: astro_trt.OrtRunner(dict.fromkeys(graphs, "/etc/passwd"),
                                                                     loaded.config, "fp32"),
        "OrtRunner(graphs=a folder)": lambda: astro_trt.OrtRunner(dict.fromkeys(graphs, tmp_path), loaded.config,
                                                                  "fp32"),
        "OrtRunner(graphs swapped)": lambda: astro_trt.OrtRunner(
            {"user_encoder": graphs["item_scorer"], "item_scorer": graphs["user_encoder"],
             "full_model": graphs["full_model"]}, loaded.config, "fp32"),
        "OrtRunner(graphs of None)": lambda: astro_trt.OrtRunner(dict.fromkeys(graphs), loaded.config, "fp32"),
        "OrtRunner(cfg=None)": lambda: astro_trt.OrtRunner(graphs, None, "fp32"),
        "OrtRunner(precision='fp99')": lambda: astro_trt.OrtRunner(graphs, loaded.config, "fp99"),
        "OrtRunner(precision=None)": lambda: astro_trt.OrtRunner(graphs, loaded.config, None),
        "OrtRunner(threads=10**6)": lambda: astro_trt.OrtRunner(graphs, loaded.config, "fp32", threads=10**6),
        "OrtRunner.from_bundle(threads=10**6)": lambda: astro_trt.OrtRunner.from_bundle(loaded, threads=10**6),
        f"OrtRunner.from_bundle(threads={too_many})": lambda: astro_trt.OrtRunner.from_bundle(loaded,
                                                                                             threads=too_many),
        "OrtRunner.from_bundle(precision='fp99')": lambda: astro_trt.OrtRunner.from_bundle(loaded, "fp99"),
        "OrtRunner.from_bundle(None)": lambda: astro_trt.OrtRunner.from_bundle(None),
        "make_trt_runner(None, fp32)": lambda: astro_trt.make_trt_runner(None, "fp32"),
        "make_trt_runner(bundle, None)": lambda: astro_trt.make_trt_runner(loaded, None),
        "make_trt_runner(bundle, 'fp99')": lambda: astro_trt.make_trt_runner(loaded, "fp99"),
        "TorchRunner(None)": lambda: astro_trt.TorchRunner(None),
        "write_repository(None, out)": lambda: _write_repository(None, tmp_path / "r"),
        "write_repository(out=None)": lambda: _write_repository(loaded, None),
        "write_repository(force='yes')": lambda: _write_repository(loaded, tmp_path / "r", force="yes"),
        "write_repository(precision=5)": lambda: _write_repository(loaded, tmp_path / "r", precision=5),
        f"write_repository(ort_threads={too_many})": lambda: _write_repository(loaded, tmp_path / "r",
                                                                               ort_threads=too_many),
        "run_loadtest(None)": lambda: _run_loadtest(None),
        "run_loadtest(123)": lambda: _run_loadtest(123),
        "run_loadtest(progress=123)": lambda: _run_loadtest("127.0.0.1:9", progress=123),
        "run_loadtest(out_dir=b'x')": lambda: _run_loadtest("127.0.0.1:9", out_dir=b"x"),
        "synthetic_batch(None, ...)": lambda: astro_trt.synthetic_batch(None, 1, 1, seed=0),
        "synthetic_batch(batch=10**9)": lambda: astro_trt.synthetic_batch(loaded.config, 10**9, 10**9, seed=0),
    }
    for name, call in cases.items():
        tally.python(name, call)
    # A runner of the bundle is bounded by the bundle's profile, named in the refusal.
    runner = astro_trt.OrtRunner.from_bundle(loaded, "fp32", profiles=True)
    batch = astro_trt.synthetic_batch(loaded.config, 1, 1, seed=0)
    state = runner.encode(batch.history)
    huge = torch.ones((1, 2 * 10**7), dtype=torch.int64)
    for name, call in {"score(2x10^7 candidates)": lambda: runner.score(state, batch.history, huge),
                       "full(2x10^7 candidates)": lambda: runner.full(batch.history, huge)}.items():
        assert "profile" in tally.python(name, call).detail
    # Without profiles (validation's runner), the memory estimate bounds B x M.
    bare = astro_trt.OrtRunner(graphs, loaded.config, "fp32", item_table=loaded.item_table())
    for name, call in {"bare score(2x10^7)": lambda: bare.score(state, batch.history, huge),
                       "bare full(2x10^7)": lambda: bare.full(batch.history, huge)}.items():
        assert "memory" in tally.python(name, call).detail
    tally.check()


def _run_loadtest(url, **kwargs):
    from astro_trt.serving.loadtest import run_loadtest

    return run_loadtest(url, **kwargs)


def test_the_commands_refuse_threads_and_repetitions_beyond_the_machine(tmp_path):
    """The same bounds on the command line (exit 2, one line), before any work: the option's
    range (click) or the library's check it calls."""
    tally = Tally("threads/sizes: commands")
    bundle = pristine_bundle()
    for argv in (["triton", bundle, "--out", tmp_path / "r", "--ort-threads", "1024"],
                 ["bench", bundle, "--threads", "1000000"],
                 ["bench", bundle, "--repetitions", str(10**12)]):
        tally.cli(" ".join(map(str, argv[2:] if argv[0] == "bench" else argv[3:])), argv, timeout=120)
    tally.check()
    assert not (tmp_path / "r").exists()
