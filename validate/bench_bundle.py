"""`bench` as one library call: choose the graphs (the bundle's own, or a random preset exported
on the fly), time split against naive (validate/bench.py), write the report. `astro-trt bench` is
this function plus printing."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from astro_trt.errors import DataError


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
    config: str = "bundle",
    precision: str | None = None,
    attention: str = "plugin",
    repetitions: int = 5,
    warmup: int = 1,
    out: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    expect_sha256: str | None = None,
) -> BenchRun:
    """Throughput of the split (encode once, score M) against the naive full model, same runtime.
    ``config="bundle"`` times the bundle's graphs (``runtime`` "ort" or "trt"); a preset name
    times a randomly initialised model of that size exported to ONNX on the fly (ONNX Runtime).
    The report goes to BUNDLE/reports/bench/ (recorded in the manifest) or to ``out``. With
    ``expect_sha256`` only the bundle whose manifest has that digest is timed."""
    from astro_trt.engines.bundle import load_bundle
    from astro_trt.validate.bench import parse_candidates, run_bench, write_bench_reports, write_bench_to_bundle

    counts = parse_candidates(candidates) if isinstance(candidates, str) else _counts(candidates)
    _check_choices(runtime=runtime, config=config, precision=precision, attention=attention,
                   repetitions=repetitions, warmup=warmup)
    say = progress or (lambda _msg: None)
    bundle = load_bundle(bundle_dir, verify=True, expect_sha256=expect_sha256)
    _check_counts(counts, bundle if config == "bundle" else None)
    with tempfile.TemporaryDirectory(prefix="astro-bench-") as tmp:
        runner, cfg, source = _runner(bundle, runtime, config, precision, attention, Path(tmp), say)
        result = run_bench(runner, cfg, counts, source=source, warmup=warmup, repetitions=repetitions,
                           progress=say)
    paths = write_bench_to_bundle(result, bundle.directory) if out is None else write_bench_reports(result, Path(out))
    return BenchRun(result, paths)


def _counts(candidates: Any) -> list[int]:
    values = list(candidates) if isinstance(candidates, (list, tuple)) else []
    if not values or any(not isinstance(m, int) or isinstance(m, bool) or m < 1 for m in values):
        raise DataError(f"--candidates {candidates!r}: give positive integers such as 64,256,1024")
    return values


MAX_BENCH_POINTS = 32  # each point costs warm-up + repetitions of both paths


def _bench_profiles(bundle: Any) -> dict[str, Any]:
    """The shapes bench may ask for: the bundle's engine profiles, or for presets the profile
    `export` gives by default (what such a bundle would serve)."""
    from astro_trt.contract import GRAPHS
    from astro_trt.engines.build import Profile

    if bundle is not None:
        return {g: bundle.profile(g) for g in GRAPHS}
    return dict.fromkeys(GRAPHS, Profile().ranges())


def _check_counts(counts: list[int], bundle: Any) -> None:
    """Refuse --candidates the profile would refuse before any graph is built or timed."""
    from astro_trt.contract import FULL_MODEL
    from astro_trt.engines.inputs import check_profile

    if len(counts) > MAX_BENCH_POINTS:
        raise DataError(f"--candidates: {len(counts)} counts; time at most {MAX_BENCH_POINTS} per run")
    for m in counts:
        check_profile(_bench_profiles(bundle)[FULL_MODEL], candidates=m, what=f"--candidates {m}")


def _check_choices(*, runtime: Any, config: Any, precision: Any, attention: Any, repetitions: Any,
                   warmup: Any) -> None:
    """Refuse a bad option before the bundle is read or a model exported."""
    from astro_trt.config import PRESETS
    from astro_trt.contract import PRECISIONS
    from astro_trt.exporter.limits import ATTENTIONS

    for option, value, choices in (("--runtime", runtime, ("ort", "trt")), ("--config", config, ("bundle", *PRESETS)),
                                   ("--precision", precision, (None, *PRECISIONS)),
                                   ("--attention", attention, ATTENTIONS)):
        if not (value is None or isinstance(value, str)) or value not in choices:
            raise DataError(f"{option} {value!r}: choose one of {[c for c in choices if c is not None]}")
    for option, value, least in (("--repetitions", repetitions, 1), ("--warmup", warmup, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise DataError(f"{option} {value!r}: must be an integer >= {least}")


def _runner(bundle: Any, runtime: str, config: str, precision: str | None, attention: str, tmp: Path,
            say: Callable[[str], None]) -> tuple[Any, Any, str]:
    from astro_trt.config import preset
    from astro_trt.contract import GRAPHS
    from astro_trt.validate.runners import OrtRunner, make_trt_runner

    if config == "bundle":
        precision = precision or bundle.precisions[0]
        if runtime == "trt":
            runner, why = make_trt_runner(bundle, precision)
            if runner is None:
                raise DataError(f"cannot bench TensorRT: {why}")
            return runner, bundle.config, f"bundle {bundle.directory} (engines)"
        graphs = {g: bundle.onnx_path(g, precision) for g in GRAPHS}
        return (OrtRunner(graphs, bundle.config, precision, profiles=_bench_profiles(bundle)), bundle.config,
                f"bundle {bundle.directory}")
    if runtime == "trt":
        raise DataError("--runtime trt times the bundle's engines; use --config bundle (presets are exported to "
                        "ONNX on the fly and run on ONNX Runtime)")
    import torch

    from astro_trt.exporter.export import export_onnx
    from astro_trt.model.astro import ASTRO

    cfg = preset(config)
    precision = precision or "fp32"
    torch.manual_seed(0)
    say(f"exporting a random {config} model ({precision}, {attention}) to ONNX")
    result = export_onnx(ASTRO(cfg).eval(), tmp, precision=precision, attention=attention)
    runner = OrtRunner(result.paths, cfg, precision, profiles=_bench_profiles(None))
    return runner, cfg, f"random {config} ({attention} lowering)"


__all__ = ["BenchRun", "bench_bundle"]
