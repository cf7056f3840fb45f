"""`astro-trt validate` (parity report, exit 1 on a failed gate) and `astro-trt bench`
(split against naive throughput)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import click

from astro_trt.config import PRESETS
from astro_trt.errors import DataError
from astro_trt.exporter.limits import ATTENTIONS
from astro_trt.validate.parity import DATA_CHOICES, RUNTIMES


def _runtimes(value: str) -> list[str]:
    items = list(dict.fromkeys(v.strip().lower() for v in value.split(",") if v.strip()))
    bad = [v for v in items if v not in RUNTIMES]
    if not items or bad:
        raise DataError(f"--runtime {value!r}: choose a comma list of {list(RUNTIMES)}")
    return items


@click.command("validate")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--data", default="ml-100k", show_default=True, type=click.Choice(DATA_CHOICES),
              help="Batches to compare on: the ml-100k test split or seeded synthetic requests.")
@click.option("--runtime", "runtime", default="torch,ort", show_default=True,
              help="Comma list of torch, ort, trt (trt needs a GPU and the bundle's engines).")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Oracle checkpoint (default: the bundle's own copy); its sha256 must match the manifest.")
@click.option("--fp32-max-abs", type=float, default=None, help="fp32 max |logits error| vs oracle [1e-4].")
@click.option("--half-error-ratio", type=float, default=None,
              help="Half precision: allowed multiple of PyTorch's own error in that precision [2].")
@click.option("--half-floor-ulps", type=float, default=None, help="Absolute floor in half ulps at 1.0 [2].")
@click.option("--auc-delta-fp32", type=float, default=None, help="Max |AUC delta| for fp32 [1e-4].")
@click.option("--auc-delta-half", type=float, default=None, help="Max |AUC delta| for fp16/bf16 [5e-3].")
@click.option("--split-full-max-abs", type=float, default=None, help="fp32 max |split - full| logits [1e-4].")
@click.option("--topk", type=int, default=None, help="k of the top-k overlap gate [10].")
@click.option("--topk-overlap", type=float, default=None, help="Min mean top-k overlap per user [0.9].")
def validate(bundle_dir: Path, data: str, runtime: str, checkpoint: Path | None, **gate_flags: float | None) -> None:
    """Parity report of BUNDLE_DIR against the fp32 PyTorch oracle; exit 1 when a gate fails."""
    from astro_trt.validate.gates import Gates
    from astro_trt.validate.parity import validate_bundle

    gates = Gates(**{k: v for k, v in gate_flags.items() if v is not None})
    report = validate_bundle(bundle_dir, data=data, runtimes=_runtimes(runtime), checkpoint=checkpoint, gates=gates,
                             progress=lambda msg: click.echo(f"  {msg}", err=True))
    _print_gates(report)
    click.echo(report.summary())
    if not report.passed:
        sys.exit(1)


def _print_gates(report) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="parity gates")
    for column in ("gate", "subject", "value", "limit", "result"):
        table.add_column(column)
    for g in report.gates:
        table.add_row(g.gate, g.subject, f"{g.value:.4g}", f"{'>=' if g.higher_is_better else '<='} {g.limit:.4g}",
                      "[green]pass[/]" if g.passed else f"[red]FAIL by {abs(g.margin):.3g}[/]")
    Console(width=140).print(table)


@click.command("bench")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--runtime", default="ort", show_default=True, type=click.Choice([r for r in RUNTIMES if r != "torch"]))
@click.option("--candidates", default="64,256,1024", show_default=True, help="Comma list of M per request.")
@click.option("--config", "config_name", default="bundle", show_default=True,
              type=click.Choice(["bundle", *PRESETS]),
              help="Graphs to time: the bundle's own, or a randomly initialised preset exported on the fly.")
@click.option("--precision", default=None,
              help="Precision of the graphs (default: the bundle's first; fp32 for presets).")
@click.option("--attention", default="plugin", show_default=True, type=click.Choice(ATTENTIONS),
              help="Lowering of preset graphs (plugin = reference function bodies, what ORT runs fastest here).")
@click.option("--repetitions", default=5, show_default=True, type=click.IntRange(1), help="Timed calls per path and M.")
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(0), help="Untimed calls first.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Reports directory (default: BUNDLE/reports/bench, recorded in the manifest).")
def bench(bundle_dir: Path, runtime: str, candidates: str, config_name: str, precision: str | None, attention: str,
          repetitions: int, warmup: int, out_dir: Path | None) -> None:
    """Throughput of the split (encode once, score M) against the naive full model, same runtime."""
    from rich.console import Console

    from astro_trt.artifacts import check_destination
    from astro_trt.engines.bundle import load_bundle
    from astro_trt.resources import check_bench_request
    from astro_trt.validate.bench import parse_candidates, run_bench, write_bench_reports, write_bench_to_bundle

    counts = parse_candidates(candidates)
    if out_dir is not None:
        check_destination(out_dir)
    bundle = load_bundle(bundle_dir, verify=True)
    check_bench_request(bundle, config_name, counts)
    console = Console(stderr=True)
    with tempfile.TemporaryDirectory(prefix="astro-bench-") as tmp:
        runner, cfg, source = _bench_runner(bundle, runtime, config_name, precision, attention, Path(tmp))
        result = run_bench(runner, cfg, counts, source=source, warmup=warmup, repetitions=repetitions,
                           progress=lambda msg: console.print(f"  {msg}"))
    if out_dir is None:
        paths = write_bench_to_bundle(result, bundle.directory)
    else:
        paths = write_bench_reports(result, out_dir)
    _print_bench(result)
    click.echo(f"reports: {paths['md']}")


def _bench_runner(bundle, runtime: str, config_name: str, precision: str | None, attention: str, tmp: Path):
    from astro_trt.config import preset
    from astro_trt.contract import GRAPHS
    from astro_trt.validate.runners import OrtRunner, make_trt_runner

    if config_name == "bundle":
        precision = precision or bundle.precisions[0]
        if runtime == "trt":
            runner, why = make_trt_runner(bundle, precision)
            if runner is None:
                raise DataError(f"cannot bench TensorRT: {why}")
            return runner, bundle.config, f"bundle {bundle.directory} (engines)"
        graphs = {g: bundle.onnx_path(g, precision) for g in GRAPHS}
        return OrtRunner(graphs, bundle.config, precision), bundle.config, f"bundle {bundle.directory}"
    if runtime == "trt":
        raise DataError("--runtime trt times the bundle's engines; use --config bundle (presets are exported to "
                        "ONNX on the fly and run on ONNX Runtime)")
    import torch

    from astro_trt.exporter.export import export_onnx
    from astro_trt.model.astro import ASTRO

    cfg = preset(config_name)
    precision = precision or "fp32"
    torch.manual_seed(0)
    click.echo(f"  exporting a random {config_name} model ({precision}, {attention}) to ONNX", err=True)
    result = export_onnx(ASTRO(cfg).eval(), tmp, precision=precision, attention=attention)
    return OrtRunner(result.paths, cfg, precision), cfg, f"random {config_name} ({attention} lowering)"


def _print_bench(result) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result.config.name}: split vs naive on {result.runtime} ({result.precision})")
    for column in ("M", "naive p50 ms", "naive p99", "split p50 ms", "split p99", "naive cand/s", "split cand/s",
                   "gain", "arithmetic"):
        table.add_column(column, justify="right")
    for p in result.points:
        table.add_row(str(p.candidates), f"{p.naive.p50:.2f}", f"{p.naive.p99:.2f}", f"{p.split.p50:.2f}",
                      f"{p.split.p99:.2f}", f"{p.naive_per_second:,.0f}", f"{p.split_per_second:,.0f}",
                      f"{p.gain:.1f}x", f"{result.predicted_gain(p.candidates):.0f}x")
    Console(width=140).print(table)  # pipes default to 80 columns, which truncates the figures
