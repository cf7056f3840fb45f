"""`astro-trt validate` (parity report or layer bisect, exit 1 on a failed gate) and `astro-trt
bench` (split against naive throughput): argument parsing, one library call, printing."""

from __future__ import annotations

import json
from pathlib import Path

import click

from astro_trt.artifacts import atomic_write, check_destination
from astro_trt.cli.export import EXPECT_SHA256_HELP
from astro_trt.cli.gates import gate_failure
from astro_trt.config import PRESETS, preset
from astro_trt.contract import EXPORT_LOWERINGS
from astro_trt.engines.describe import pin_line
from astro_trt.errors import GateError
from astro_trt.lazy import lazy_import
from astro_trt.settings import BENCH_THREADS
from astro_trt.validate.choices import DATA_CHOICES, RUNTIMES
from astro_trt.validate.gates import Gates
from astro_trt.validate.peak_memory import full_model_memory, to_json

bench_lib = lazy_import("astro_trt.validate.bench_bundle")
bisect_lib = lazy_import("astro_trt.validate.bisect")
parity_lib = lazy_import("astro_trt.validate.parity")
rich_console = lazy_import("rich.console")
rich_table = lazy_import("rich.table")


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
@click.option("--int8-error-ratio", type=float, default=None,
              help="int8: allowed multiple of PyTorch's own int8-weight error [4].")
@click.option("--auc-delta-fp32", type=float, default=None, help="Max |AUC delta| for fp32 [1e-4].")
@click.option("--auc-delta-half", type=float, default=None, help="Max |AUC delta| for fp16/bf16 [5e-3].")
@click.option("--auc-delta-int8", type=float, default=None, help="Max |AUC delta| per task for int8 [1e-3].")
@click.option("--kendall-tau-int8", type=float, default=None,
              help="int8: min mean Kendall tau of each user's ranking vs the oracle's [0.98].")
@click.option("--auc-delta-table", type=float, default=None,
              help="fp16/int8 stored item table: max |AUC delta| per task vs the fp32 rows [1e-3].")
@click.option("--split-full-max-abs", type=float, default=None, help="fp32 max |split - full| logits [1e-4].")
@click.option("--topk", type=int, default=None, help="k of the top-k overlap gate [10].")
@click.option("--topk-overlap", type=float, default=None, help="Min mean top-k overlap per user [0.9].")
@click.option("--bisect", is_flag=True,
              help="Instead of the report: error at every stage boundary (embedding, each layer's attention and "
                   "FFN per block, fusion gate, head) on ONNX Runtime, naming the first stage over its limit.")
@click.option("--precision", default=None, help="--bisect: comma list of the bundle's precisions [all].")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="--bisect: reports directory (default: BUNDLE/reports/bisect, recorded in the manifest).")
@click.option("--expect-sha256", default=None, help=EXPECT_SHA256_HELP)
def validate(bundle_dir: Path, data: str, runtime: str, checkpoint: Path | None, bisect: bool, precision: str | None,
             out_dir: Path | None, expect_sha256: str | None, **gate_flags: float | None) -> None:
    """Parity report of BUNDLE_DIR against the fp32 PyTorch oracle; exit 1 when a gate fails."""
    if not bisect and (precision is not None or out_dir is not None):
        raise click.UsageError("--precision and --out belong to --bisect (the parity report covers every precision "
                               "and is written into the bundle)")
    gates = Gates(**{k: v for k, v in gate_flags.items() if v is not None})
    say = lambda msg: click.echo(f"  {msg}", err=True)  # noqa: E731
    if bisect:
        result = bisect_lib.bisect_bundle(bundle_dir, precisions=precision, runtime=runtime, data=data,
                                          checkpoint=checkpoint, gates=gates, out=out_dir, progress=say,
                                          expect_sha256=expect_sha256)
        _print_bisect(result)
        click.echo(result.summary())
    else:
        result = parity_lib.validate_bundle(bundle_dir, data=data, runtimes=runtime, checkpoint=checkpoint,
                                            gates=gates, progress=say, expect_sha256=expect_sha256)
        _print_gates(result)
        click.echo(result.summary())
    if out_dir is None:  # the report is recorded in the manifest: a new digest

        click.echo(pin_line(bundle_dir))
    if not result.passed:
        raise GateError(gate_failure(result.summary()))


def _print_bisect(result) -> None:
    table = rich_table.Table(title="error by stage (first over its limit in red)")
    for column in ("precision", "stage", "block", "max |err|", "PyTorch's own", "limit", "result"):
        table.add_column(column)
    for s in result.stages:
        table.add_row(s.precision, s.stage, s.block or "-", f"{s.max_abs:.3g}",
                      "-" if s.torch_error is None else f"{s.torch_error:.3g}", f"{s.limit:.3g}",
                      "[green]ok[/]" if s.passed else "[red]OVER[/]")
    rich_console.Console(width=140).print(table)


def _print_gates(report) -> None:
    table = rich_table.Table(title="parity gates")
    for column in ("gate", "subject", "value", "limit", "result"):
        table.add_column(column)
    for g in report.gates:
        table.add_row(g.gate, g.subject, f"{g.value:.4g}", f"{'>=' if g.higher_is_better else '<='} {g.limit:.4g}",
                      "[green]pass[/]" if g.passed else f"[red]FAIL by {abs(g.margin):.3g}[/]")
    rich_console.Console(width=140).print(table)


@click.command("bench")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--runtime", default="ort", show_default=True, type=click.Choice([r for r in RUNTIMES if r != "torch"]))
@click.option("--candidates", default="64,256,1024", show_default=True, help="Comma list of M per user.")
@click.option("--users", default=None,
              help="Comma list of users per request [1,8,32, capped at the bundle's max batch].")
@click.option("--config", "config_name", default="bundle", show_default=True,
              type=click.Choice(["bundle", *PRESETS]),
              help="Graphs to time: the bundle's own, or a randomly initialised preset exported on the fly.")
@click.option("--precision", default=None,
              help="Precision of the graphs (default: the bundle's first; fp32 for presets).")
@click.option("--attention", default="plugin", show_default=True, type=click.Choice(EXPORT_LOWERINGS),
              help="Lowering of preset graphs (plugin = reference function bodies, what ORT runs fastest here).")
@click.option("--peer/--no-peer", default=True, show_default=True,
              help="Time the same split in PyTorch eager (and torch.compile with --compile) alongside.")
@click.option("--compile", "use_compile", is_flag=True, help="Add a torch.compile peer (compiles per shape: slow).")
@click.option("--profile", is_flag=True, help="Add ONNX Runtime's per-operator breakdown (one user) to the report.")
@click.option("--threads", type=click.IntRange(1), default=BENCH_THREADS, show_default=True,
              help="Intra-op threads of every runtime and path. One request per core is the serving layout; on "
                   "a shared machine two threads per request slow the split (~350 small nodes, each waiting for a "
                   "descheduled second thread) far more than the naive path (README, Measured).")
@click.option("--repetitions", default=5, show_default=True, type=click.IntRange(1), help="Timed calls per path and M.")
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(0), help="Untimed calls first.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Reports directory (default: BUNDLE/reports/bench, recorded in the manifest).")
@click.option("--expect-sha256", default=None, help=EXPECT_SHA256_HELP)
def bench(bundle_dir: Path, runtime: str, candidates: str, users: str | None, config_name: str, precision: str | None,
          attention: str, peer: bool, use_compile: bool, profile: bool, threads: int, repetitions: int, warmup: int,
          out_dir: Path | None, expect_sha256: str | None) -> None:
    """Throughput of the split (encode once, score M) against the naive full model, same runtime,
    with the same split in PyTorch as a peer."""
    console = rich_console.Console(stderr=True)
    run = bench_lib.bench_bundle(bundle_dir, runtime=runtime, candidates=candidates, users=users, config=config_name,
                                 precision=precision, attention=attention, peer=peer, use_compile=use_compile,
                                 profile=profile, threads=threads, repetitions=repetitions, warmup=warmup, out=out_dir,
                                 progress=lambda msg: console.print(f"  {msg}"), expect_sha256=expect_sha256)
    _print_bench(run.result)
    click.echo(f"reports: {run.paths['md']}")
    if out_dir is None:
        click.echo(pin_line(bundle_dir))


def _print_bench(result) -> None:
    peers = list(dict.fromkeys(name for p in result.points for name in p.peers))
    table = rich_table.Table(title=f"{result.config.name}: split vs naive on {result.runtime} ({result.precision})")
    for column in ("U", "M", "naive p50 ms", "split p50 ms", "split p99", "naive cand/s", "split cand/s",
                   "gain", "arithmetic", *(f"{n} p50 ms" for n in peers), *(f"vs {n}" for n in peers)):
        table.add_column(column, justify="right")
    for p in result.points:
        table.add_row(str(p.users), str(p.candidates), f"{p.naive.p50:.2f}" + ("*" if p.naive_sampled else ""),
                      f"{p.split.p50:.2f}", f"{p.split.p99:.2f}", f"{p.naive_per_second:,.0f}",
                      f"{p.split_per_second:,.0f}", f"{p.gain:.1f}x", f"{result.predicted_gain(p.candidates):.0f}x",
                      *(f"{p.peers[n].p50:.2f}" if n in p.peers else "" for n in peers),
                      *(f"{p.speedup_over(n):.2f}x" if n in p.peers else "" for n in peers))
    rich_console.Console(width=160).print(table)  # pipes default to 80 columns, which truncates the figures


@click.command("bench-memory")
@click.option("--config", "config_name", default="climber", show_default=True, type=click.Choice(list(PRESETS)),
              help="Preset of the randomly initialised model whose full model is measured.")
@click.option("--users", default=1, show_default=True, type=click.IntRange(1, 64), help="Users per request (B).")
@click.option("--candidates", default=1024, show_default=True, type=click.IntRange(1, 16384),
              help="Candidates per user (M).")
@click.option("--runs", default=5, show_default=True, type=click.IntRange(1, 100), help="Calls per probe.")
@click.option("--threads", default=BENCH_THREADS, show_default=True, type=click.IntRange(1, 256),
              help="Intra-op threads.")
@click.option("--plain/--no-plain", default=True, show_default=True,
              help="Also measure the unchunked graph (every pair at once) for comparison.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the figures as JSON here.")
def bench_memory(config_name: str, users: int, candidates: int, runs: int, threads: int, plain: bool,
                 json_out: Path | None) -> None:
    """Peak resident memory of ONNX Runtime running the exported full model (fp32), each figure
    from a fresh process that imports only numpy and onnxruntime."""
    if json_out is not None:
        if json_out.is_dir():
            raise click.BadParameter(f"{json_out} is a directory; name a file", param_hint="--json")
        check_destination(json_out.parent, "--json")
    cfg = preset(config_name)
    console = rich_console.Console(stderr=True)
    points = full_model_memory(cfg, users=users, candidates=candidates, runs=runs, threads=threads, plain=plain,
                               progress=lambda msg: console.print(f"  {msg}"))
    report = to_json(cfg, users, candidates, points)
    table = rich_table.Table(title=f"{cfg.name} full model on ONNX Runtime (fp32), {users} user(s) x {candidates} "
                                   f"candidates, {report['pairs_per_chunk']} pairs per chunk")
    for column in ("graph", "memory pattern", "peak RSS GB", "after load GB", "median ms", "max |err| vs torch"):
        table.add_column(column, justify="right")
    for p in points:
        table.add_row(p.graph, "on" if p.memory_pattern else "off", f"{p.peak_rss_bytes / 1e9:.3f}",
                      f"{p.loaded_rss_bytes / 1e9:.3f}", f"{p.median_ms:.0f}", f"{p.max_abs_vs_torch:.2e}")
    rich_console.Console(width=140).print(table)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(json_out, json.dumps(report, indent=2).encode())
        click.echo(f"figures: {json_out}")
