"""`bench` as one library call: choose the graphs (the bundle's own, or a random preset exported
on the fly), time split against naive (validate/bench.py), write the report. `astro-trt bench` is
this function plus printing."""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from astro_trt import arguments
from astro_trt.artifacts import as_path, check_destination
from astro_trt.config import PRESETS, preset
from astro_trt.contract import BATCH, EXPORT_LOWERINGS, FULL_MODEL, GRAPHS, PRECISIONS
from astro_trt.engines.build import Profile
from astro_trt.engines.bundle import load_bundle
from astro_trt.errors import DataError
from astro_trt.exporter.export import export_onnx
from astro_trt.model.astro import ASTRO
from astro_trt.precision import REFERENCE, is_quantized
from astro_trt.runtime.gate import check_profile
from astro_trt.runtime.onnxruntime import OrtRunner
from astro_trt.runtime.tensorrt import make_trt_runner
from astro_trt.runtime.torch_runner import TorchRunner, model_item_table
from astro_trt.settings import BENCH_THREADS
from astro_trt.validate.bench import (
    DEFAULT_USERS,
    parse_candidates,
    parse_users,
    profile_ort,
    run_bench,
    write_bench_reports,
    write_bench_to_bundle,
)
from astro_trt.validate.ceiling import scorer_ceiling


@dataclass
class BenchRun:
    """A bench result and where its report was written ({"json", "md", "png"} -> path)."""

    result: Any  # validate.bench.BenchResult
    paths: dict[str, Path] = field(default_factory=dict)


def bench_bundle(
    bundle_dir: str | Path,
    *,
    runtime: str = "ort",
    candidates: str | Sequence[int] = (64, 256, 1024),
    users: str | Sequence[int] | None = None,
    config: str = "bundle",
    precision: str | None = None,
    attention: str = "plugin",
    peer: bool = True,
    use_compile: bool = False,
    profile: bool = False,
    threads: int = BENCH_THREADS,
    repetitions: int = 5,
    warmup: int = 1,
    out: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    expect_sha256: str | None = None,
) -> BenchRun:
    """Throughput of the split (encode once, score M) against the naive full model, same runtime.
    ``config="bundle"`` times the bundle's graphs (``runtime`` "ort" or "trt"); a preset name
    times a randomly initialised model of that size exported to ONNX on the fly (ONNX Runtime).
    ``users`` per request default to 1, 8, 32 up to the profile's max batch; ``peer`` times the
    same split in PyTorch eager on the same weights (``use_compile``: torch.compile too);
    ``profile`` adds ONNX Runtime's per-operator breakdown; every runtime gets ``threads``
    intra-op threads. The report goes to BUNDLE/reports/bench/ (recorded in the manifest) or to
    ``out``. With ``expect_sha256`` only the bundle whose manifest has that digest is timed."""
    counts = parse_candidates(candidates) if isinstance(candidates, str) else _counts(candidates)
    _check_choices(runtime=runtime, config=config, precision=precision, attention=attention,
                   repetitions=repetitions, warmup=warmup)
    arguments.threads(threads, "--threads")
    for option, value in (("--peer", peer), ("--compile", use_compile), ("--profile", profile)):
        arguments.flag(value, option)
    if out is not None:
        check_destination(as_path(out, "out"))
    say = arguments.callback(progress, "progress") or (lambda _msg: None)
    bundle = load_bundle(bundle_dir, verify=True, expect_sha256=expect_sha256)
    check_counts(counts, bundle if config == "bundle" else None)
    user_counts = _users(users, bundle if config == "bundle" else None)
    with tempfile.TemporaryDirectory(prefix="astro-bench-") as tmp:
        runner, cfg, source, model, graphs = _runner(bundle, runtime, config, precision, attention, Path(tmp), say,
                                                     threads, max(user_counts))
        peers, notes = _peers(model, runner.precision, threads, peer, use_compile)
        reference = _reference_runner(bundle, runtime, config, runner, model, attention, Path(tmp), say, threads,
                                      max(user_counts))
        if reference is not None:  # int8 beside fp32 of the same weights, same requests, same run
            peers[f"ort {REFERENCE}"] = reference
            notes[f"ort {REFERENCE}"] = f"the same weights' {REFERENCE} graphs on ONNX Runtime, {threads} threads"
        result = run_bench(runner, cfg, counts, source=source, users=user_counts, peers=peers, warmup=warmup,
                           repetitions=repetitions, progress=say)
        result.peer_notes.update(notes)
        if reference is not None:
            say("int8 and fp32 scorers against the bare MatMul rates (one user per request)")
            result.ceiling = scorer_ceiling({runner.precision: runner, REFERENCE: reference}, cfg, counts,
                                            threads=threads, warmup=warmup, repetitions=repetitions)
        if profile:
            if graphs is None:
                raise DataError("--profile breaks down ONNX Runtime graphs; use --runtime ort")
            say("profiling the graphs per operator (one user per request)")
            result.profile = profile_ort(graphs, cfg, runner.precision, counts, threads=threads,
                                         item_table=runner.item_table)
    paths = write_bench_to_bundle(result, bundle.directory) if out is None else write_bench_reports(result, Path(out))
    return BenchRun(result, paths)


def _users(users: Any, bundle: Any) -> list[int]:
    """Users per request: given, or 1, 8, 32 up to the profile's max batch; refused beyond it."""
    if users is None:
        top = _bench_profiles(bundle)[FULL_MODEL][BATCH][2] if bundle is not None else max(DEFAULT_USERS)
        return [u for u in DEFAULT_USERS if u <= top] or [1]
    values = parse_users(users) if isinstance(users, str) else _counts(users, "--users")
    if bundle is not None:
        for u in values:
            check_profile(_bench_profiles(bundle)[FULL_MODEL], batch=u, what=f"--users {u}")
    return values


def _peers(model: Any, precision: str, threads: int, eager: bool, use_compile: bool) -> tuple[dict, dict]:
    """name -> runner timing the same split in PyTorch, and name -> note for the report."""
    if model is None or not (eager or use_compile):
        return {}, {}

    torch.set_num_threads(threads)  # the same cores as the runtime under test
    peers: dict[str, Any] = {}
    notes: dict[str, str] = {}
    if eager:
        peers["torch eager"] = TorchRunner(model, precision)
        notes["torch eager"] = f"PyTorch {torch.__version__} eager, {threads} threads, reference attention ops"
    if use_compile:
        compiled = TorchRunner(copy.deepcopy(model), precision)  # the eager peer keeps its own methods
        try:
            compiled.model.encode_user = torch.compile(compiled.model.encode_user)
            compiled.model.score = torch.compile(compiled.model.score)
        except Exception as exc:  # torch.compile raises many backend-specific types
            notes["torch.compile"] = f"not run: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        else:
            peers["torch.compile"] = compiled
            notes["torch.compile"] = "torch.compile (inductor, default mode); compilation happens in the warm-up calls"
    return peers, notes


def _counts(candidates: Any, option: str = "--candidates") -> list[int]:
    values = list(candidates) if isinstance(candidates, (list, tuple)) else []
    if not values or any(not isinstance(m, int) or isinstance(m, bool) or m < 1 for m in values):
        raise DataError(f"{option} {candidates!r}: give positive integers such as 64,256,1024")
    return values


MAX_BENCH_POINTS = 32  # each point costs warm-up + repetitions of both paths


def _bench_profiles(bundle: Any) -> dict[str, Any]:
    """The shapes bench may ask for: the bundle's engine profiles, or for presets the profile
    `export` gives by default (what such a bundle would serve)."""
    if bundle is not None:
        return {g: bundle.profile(g) for g in GRAPHS}
    return dict.fromkeys(GRAPHS, Profile().ranges())


def check_counts(counts: list[int], bundle: Any) -> None:
    """Refuse --candidates the profile would refuse before any graph is built or timed. Memory
    needs no check beyond the profile: the naive path is sampled within a budget (validate/bench.py)."""
    if len(counts) > MAX_BENCH_POINTS:
        raise DataError(f"--candidates: {len(counts)} counts; time at most {MAX_BENCH_POINTS} per run")
    for m in counts:
        check_profile(_bench_profiles(bundle)[FULL_MODEL], candidates=m, what=f"--candidates {m}")


def _check_choices(*, runtime: Any, config: Any, precision: Any, attention: Any, repetitions: Any,
                   warmup: Any) -> None:
    """Refuse a bad option before the bundle is read or a model exported."""
    for option, value, choices in (("--runtime", runtime, ("ort", "trt")), ("--config", config, ("bundle", *PRESETS)),
                                   ("--precision", precision, (None, *PRECISIONS)),
                                   ("--attention", attention, EXPORT_LOWERINGS)):
        if not (value is None or isinstance(value, str)) or value not in choices:
            raise DataError(f"{option} {value!r}: choose one of {[c for c in choices if c is not None]}")
    for option, value, least, most in (("--repetitions", repetitions, 1, MAX_REPETITIONS),
                                       ("--warmup", warmup, 0, MAX_WARMUP)):
        arguments.integer(value, option, least, most, "a bench of more runs does not finish in a working day")


# Timed and untimed runs per request shape: far beyond what a figure needs (5 and 1 by default),
# short of a bench that never ends (10^12 repetitions ran until killed).
MAX_REPETITIONS = 1000
MAX_WARMUP = 100


def _reference_runner(bundle: Any, runtime: str, config: str, runner: Any, model: Any, attention: str, tmp: Path,
                      say: Callable[[str], None], threads: int, max_users: int) -> Any:
    """For a quantized precision on ONNX Runtime: a runner of the same weights in the reference
    precision (the bundle's own fp32 graphs, or the preset's model exported again), else None."""
    if runtime != "ort" or not is_quantized(runner.precision):
        return None
    if config == "bundle":
        if REFERENCE not in bundle.precisions:
            say(f"no {REFERENCE} graphs in the bundle: int8 is timed without its {REFERENCE} peer")
            return None
        return _runner(bundle, runtime, config, REFERENCE, attention, tmp, say, threads, max_users)[0]
    fp32_dir = tmp / REFERENCE
    fp32_dir.mkdir()
    return _runner(bundle, runtime, config, REFERENCE, attention, fp32_dir, say, threads, max_users, model)[0]


def _runner(bundle: Any, runtime: str, config: str, precision: str | None, attention: str, tmp: Path,
            say: Callable[[str], None], threads: int, max_users: int,
            model: Any = None) -> tuple[Any, Any, str, Any, Any]:
    """(runner, config, source, the PyTorch model of the same weights, ONNX graphs or None);
    a preset exports ``model`` when given (another precision of the same weights)."""
    if config == "bundle":
        precision = precision or bundle.precisions[0]
        model = bundle.checkpoint().model
        if runtime == "trt":
            runner, why = make_trt_runner(bundle, precision)
            if runner is None:
                raise DataError(f"cannot bench TensorRT: {why}")
            return runner, bundle.config, f"bundle {bundle.directory} (engines)", model, None
        graphs = {g: bundle.onnx_path(g, precision) for g in GRAPHS}
        return (OrtRunner(graphs, bundle.config, precision, threads, profiles=_bench_profiles(bundle),
                          unchunked_full=True, item_table=bundle.item_table()),
                bundle.config, f"bundle {bundle.directory}", model, graphs)
    if runtime == "trt":
        raise DataError("--runtime trt times the bundle's engines; use --config bundle (presets are exported to "
                        "ONNX on the fly and run on ONNX Runtime)")

    cfg = preset(config)
    precision = precision or REFERENCE
    torch.manual_seed(0)
    say(f"exporting a random {config} model ({precision}, {attention}) to ONNX")
    model = model if model is not None else ASTRO(cfg).eval()
    result = export_onnx(model, tmp, precision=precision, attention=attention)
    # A preset has no engines: its graphs take as many users per request as asked.
    profiles = dict.fromkeys(GRAPHS, Profile(max_batch=max(max_users, Profile().max_batch)).ranges())
    runner = OrtRunner(result.paths, cfg, precision, threads, profiles=profiles, unchunked_full=True,
                       item_table=model_item_table(model))
    return runner, cfg, f"random {config} ({attention} lowering)", model, dict(result.paths)


__all__ = ["BenchRun", "bench_bundle"]
