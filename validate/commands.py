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
@click.option("--candidates", default="64,256,1024", show_default=True, help="Comma list of M per user.")
@click.option("--users", default="1,8,32", show_default=True, help="Comma list of users per request.")
@click.option("--config", "config_name", default="bundle", show_default=True,
              type=click.Choice(["bundle", *PRESETS]),
              help="Graphs to time: the bundle's own, or a randomly initialised preset exported on the fly.")
@click.option("--precision", default=None,
              help="Precision of the graphs (default: the bundle's first; fp32 for presets).")
@click.option("--attention", default="plugin", show_default=True, type=click.Choice(ATTENTIONS),
              help="Lowering of preset graphs (plugin = reference function bodies, what ORT runs fastest here).")
@click.option("--peer/--no-peer", default=True, show_default=True,
              help="Time the same split in PyTorch eager (and torch.compile with --compile) alongside.")
@click.option("--compile", "use_compile", is_flag=True, help="Add a torch.compile peer (compiles per shape: slow).")
@click.option("--profile", is_flag=True, help="Add ONNX Runtime's per-operator breakdown (one user) to the report.")
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True,
              help="Intra-op threads of every runtime and path. One request per core is the serving layout; on "
                   "a shared machine two threads per request slow the split (~350 small nodes, each waiting for a "
                   "descheduled second thread) far more than the naive path (README, Measured).")
@click.option("--repetitions", default=5, show_default=True, type=click.IntRange(1), help="Timed calls per path and M.")
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(0), help="Untimed calls first.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Reports directory (default: BUNDLE/reports/bench, recorded in the manifest).")
def bench(bundle_dir: Path, runtime: str, candidates: str, users: str, config_name: str, precision: str | None,
          attention: str, peer: bool, use_compile: bool, profile: bool, threads: int, repetitions: int,
          warmup: int, out_dir: Path | None) -> None:
    """Throughput of the split (encode once, score M) against the naive full model, same runtime,
    with the same split in PyTorch as a peer."""
    from rich.console import Console

    from astro_trt.engines.bundle import load_bundle
    from astro_trt.validate.bench import (
        parse_candidates,
        parse_users,
        profile_ort,
        run_bench,
        write_bench_reports,
        write_bench_to_bundle,
    )
    counts, user_counts = parse_candidates(candidates), parse_users(users)
    bundle = load_bundle(bundle_dir, verify=True)
    console = Console(stderr=True)

    def say(msg: str) -> None:
        console.print(f"  {msg}")

    with tempfile.TemporaryDirectory(prefix="astro-bench-") as tmp:
        runner, cfg, source, model, graphs = _bench_runner(bundle, runtime, config_name, precision, attention,
                                                           Path(tmp), threads)
        peers, notes = _peers(model, runner.precision, threads, peer, use_compile) if model is not None else ({}, {})
        result = run_bench(runner, cfg, counts, source=source, users=user_counts, peers=peers, warmup=warmup,
                           repetitions=repetitions, progress=say)
        result.peer_notes.update(notes)
        if profile:
            if graphs is None:
                raise DataError("--profile breaks down ONNX Runtime graphs; use --runtime ort")
            say("profiling the graphs per operator (one user per request)")
            result.profile = profile_ort(graphs, cfg, runner.precision, counts, threads=threads)
    if out_dir is None:
        paths = write_bench_to_bundle(result, bundle.directory)
    else:
        paths = write_bench_reports(result, out_dir)
    _print_bench(result)
    click.echo(f"reports: {paths['md']}")


def _peers(model, precision: str, threads: int, eager: bool, use_compile: bool):
    """name -> runner timing the same split in PyTorch, and name -> note for the report."""
    import copy

    import torch

    from astro_trt.validate.runners import TorchRunner

    torch.set_num_threads(threads)  # the same cores as the runtime under test
    peers, notes = {}, {}
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


def _bench_runner(bundle, runtime: str, config_name: str, precision: str | None, attention: str, tmp: Path,
                  threads: int):
    """(runner, config, source, the PyTorch model of the same weights or None, ONNX graphs or None)."""
    from astro_trt.config import preset
    from astro_trt.contract import GRAPHS
    from astro_trt.model.checkpoint import load_checkpoint
    from astro_trt.validate.runners import OrtRunner, make_trt_runner

    if config_name == "bundle":
        precision = precision or bundle.precisions[0]
        model = load_checkpoint(bundle.checkpoint_dir).model
        if runtime == "trt":
            runner, why = make_trt_runner(bundle, precision)
            if runner is None:
                raise DataError(f"cannot bench TensorRT: {why}")
            return runner, bundle.config, f"bundle {bundle.directory} (engines)", model, None
        graphs = {g: bundle.onnx_path(g, precision) for g in GRAPHS}
        return (OrtRunner(graphs, bundle.config, precision, threads), bundle.config, f"bundle {bundle.directory}",
                model, graphs)
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
    model = ASTRO(cfg).eval()
    result = export_onnx(model, tmp, precision=precision, attention=attention)
    return (OrtRunner(result.paths, cfg, precision, threads), cfg, f"random {config_name} ({attention} lowering)",
            model, dict(result.paths))


def _print_bench(result) -> None:
    from rich.console import Console
    from rich.table import Table

    peers = list(dict.fromkeys(name for p in result.points for name in p.peers))
    table = Table(title=f"{result.config.name}: split vs naive on {result.runtime} ({result.precision})")
    for column in ("U", "M", "naive p50 ms", "split p50 ms", "split p99", "naive cand/s", "split cand/s",
                   "gain", "arithmetic", *(f"{n} p50 ms" for n in peers), *(f"vs {n}" for n in peers)):
        table.add_column(column, justify="right")
    for p in result.points:
        table.add_row(str(p.users), str(p.candidates), f"{p.naive.p50:.2f}" + ("*" if p.naive_sampled else ""),
                      f"{p.split.p50:.2f}", f"{p.split.p99:.2f}", f"{p.naive_per_second:,.0f}",
                      f"{p.split_per_second:,.0f}", f"{p.gain:.1f}x", f"{result.predicted_gain(p.candidates):.0f}x",
                      *(f"{p.peers[n].p50:.2f}" if n in p.peers else "" for n in peers),
                      *(f"{p.speedup_over(n):.2f}x" if n in p.peers else "" for n in peers))
    Console(width=160).print(table)  # pipes default to 80 columns, which truncates the figures
