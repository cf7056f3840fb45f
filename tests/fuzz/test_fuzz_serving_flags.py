"""Fuzz category "serving-flags": out-of-range numbers given to triton, serve and loadtest
(cache size, ONNX Runtime threads, ports, clients, durations, workload sizes, seed) are refused
by the library functions the commands call, before any work: no repository, no server, no
report, and the refusal names the option. A sample goes through the CLI on a bundle that does
not exist, so an option checked after the work began would fail on the bundle instead."""

from __future__ import annotations

import math

import pytest
from harness import Tally, naming
from tiny_bundle import pristine_bundle

from astro_trt.engines.bundle import load_bundle
from astro_trt.errors import DataError
from astro_trt.serving import defaults as lim
from astro_trt.serving.loadtest import run_loadtest
from astro_trt.serving.repository import write_repository
from astro_trt.serving.server import serve_bundle

pytestmark = pytest.mark.fuzz

BAD_INTS = [0, -1, -(10**9), 10**12, 2**63, True, 1.5, float("nan"), "3"]
# Ten times this machine's memory: a cache the server could never hold.
HUGE_CACHE = 10 * lim.max_cache_mib() << 20



def test_repository_numbers_are_refused_before_writing(tmp_path):
    bundle = load_bundle(pristine_bundle())
    out = tmp_path / "repo"
    tally = Tally("serving-flags")
    for value in [*BAD_INTS, (1 << 20) - 1, HUGE_CACHE]:
        tally.python(f"cache_bytes={value!r}", naming("--cache-mib", lambda v=value: write_repository(
            bundle, out, cache_bytes=v)))
    for value in [*BAD_INTS, lim.MAX_ORT_THREADS + 1]:
        tally.python(f"ort_threads={value!r}", naming("--ort-threads", lambda v=value: write_repository(
            bundle, out, ort_threads=v)))
    tally.check()
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no repository, no staging left beside it


def test_exact_refusals():
    with pytest.raises(DataError) as exc:
        lim.check_cache_bytes(0)
    high = lim.max_cache_mib()
    assert str(exc.value) == (f"cache_bytes (--cache-mib) 0: must be an integer in {1 << 20}..{high << 20}; "
                              f"choose a cache between 1 MiB and {high} MiB (this machine's memory)")
    cores = lim.MAX_ORT_THREADS  # the CPUs this process may run on
    with pytest.raises(DataError) as exc:
        lim.check_ort_threads(cores + 1)
    assert str(exc.value) == (f"ort_threads (--ort-threads) {cores + 1}: must be an integer in 1..{cores}; this "
                              f"machine gives this process {cores} CPU(s); pass None (--ort-threads 0) for one per "
                              "core, or fewer threads")
    # The bounds themselves are accepted.
    assert lim.check_cache_bytes(1 << 20) == 1 << 20 and lim.check_cache_bytes(high << 20) == high << 20
    assert lim.check_ort_threads(None) is None and lim.check_ort_threads(cores) == cores


def test_serve_numbers_are_refused_before_starting(tmp_path):
    """serve_bundle refuses before it looks for tritonserver or loads the bundle (which does not exist)."""
    missing = tmp_path / "no-bundle"
    tally = Tally("serving-flags")
    for flag in ("http_port", "grpc_port", "metrics_port"):
        option = "--" + flag.replace("_", "-")
        for value in [0, -1, 65536, 10**12, True, "8000"]:
            ports = {"http_port": 18000, "grpc_port": 18001, "metrics_port": 18002, flag: value}
            tally.python(f"{flag}={value!r}", naming(option, lambda p=ports: serve_bundle(missing, **p)))
    for value in [0, -5, HUGE_CACHE]:
        tally.python(f"cache_bytes={value!r}", naming("--cache-mib", lambda v=value: serve_bundle(
            missing, cache_bytes=v)))
    for value in [0, -1, 10**6]:
        tally.python(f"ort_threads={value!r}", naming("--ort-threads", lambda v=value: serve_bundle(
            missing, ort_threads=v)))
    tally.check()
    assert not missing.exists()


def test_loadtest_numbers_are_refused_before_connecting(tmp_path):
    """run_loadtest refuses before it asks the server (none listens on port 1) or builds a workload."""
    out = tmp_path / "report"
    tally = Tally("serving-flags")
    good = {"clients": 2, "users": 2, "pages": 2, "candidates": 4, "seed": 0}
    for key, flag in (("clients", "--clients"), ("users", "--users"), ("pages", "--pages"),
                      ("candidates", "--candidates"), ("seed", "--seed")):
        for value in [0, -1, 10**12, True, 2.0]:
            if key == "seed" and value == 0:
                continue  # seed 0 is valid
            kwargs = {**good, key: value}
            tally.python(f"{key}={value!r}", naming(flag, lambda k=kwargs: run_loadtest(
                "127.0.0.1:1", out_dir=out, **k)))
    big = {**good, "users": lim.MAX_USERS, "pages": lim.MAX_PAGES, "candidates": 2}
    tally.python("workload too large", naming("candidate ids", lambda: run_loadtest("127.0.0.1:1", out_dir=out,
                                                                                     **big)))
    for key, flag in (("duration", "--duration"), ("baseline_seconds", "--baseline-seconds")):
        for value in [0, 0.4, -1.0, 3601, math.inf, math.nan, True, "60"]:
            tally.python(f"{key}={value!r}", naming(flag, lambda k=key, v=value: run_loadtest(
                "127.0.0.1:1", out_dir=out, **good, **{k: v})))
    tally.check()
    assert not out.exists()


def test_serving_flags_cli(tmp_path):
    tally = Tally("serving-flags")
    missing, out = tmp_path / "missing", tmp_path / "repo"
    runs = [
        ("triton --cache-mib 0", ["triton", missing, "--out", out, "--cache-mib", "0"], "--cache-mib"),
        ("triton --cache-mib -1", ["triton", missing, "--out", out, "--cache-mib", "-1"], "--cache-mib"),
        ("triton --cache-mib huge", ["triton", missing, "--out", out, "--cache-mib", str(10**12)], "--cache-mib"),
        ("triton --ort-threads -1", ["triton", missing, "--out", out, "--ort-threads", "-1"], "--ort-threads"),
        ("triton --ort-threads huge", ["triton", missing, "--out", out, "--ort-threads", str(10**12)],
         "--ort-threads"),
        ("serve --cache-mib 0", ["serve", missing, "--cache-mib", "0"], "--cache-mib"),
        ("serve --http-port 0", ["serve", missing, "--http-port", "0"], "--http-port"),
        ("loadtest --users huge", ["loadtest", "127.0.0.1:1", "--users", str(10**9), "--out", out], "--users"),
        ("loadtest --seed -1", ["loadtest", "127.0.0.1:1", "--seed", "-1", "--out", out], "--seed"),
        ("loadtest --candidates 0", ["loadtest", "127.0.0.1:1", "--candidates", "0", "--out", out], "--candidates"),
    ]
    for name, argv, flag in runs:
        outcome = tally.cli(name, argv, timeout=60)
        if outcome.kind == "refused" and flag not in outcome.detail:
            tally.bad.append((name, outcome))
    # The bounds themselves pass the options: the refusal is then the missing bundle.
    edge = tally.cli("triton at the bounds", ["triton", missing, "--out", out, "--cache-mib", "1",
                                              "--ort-threads", str(lim.MAX_ORT_THREADS)], timeout=60)
    assert str(missing) in edge.detail, edge
    tally.check()
    assert not out.exists() and not missing.exists()


def test_cli_and_library_share_the_bounds():
    from astro_trt.cli.serve import triton

    params = {p.name: p.type for p in triton.params}
    assert (params["cache_mib"].min, params["cache_mib"].max) == (lim.MIN_CACHE_MIB, lim.max_cache_mib())
    assert (params["ort_threads"].min, params["ort_threads"].max) == (0, lim.MAX_ORT_THREADS)


