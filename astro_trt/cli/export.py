"""`astro-trt export` (checkpoint -> bundle) and `astro-trt inspect` (what is inside a bundle):
argument parsing, one library call (engines/export_bundle.py, engines/describe.py), printing."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from astro_trt.cli.gates import gate_failure
from astro_trt.contract import ATTENTION_CHOICES, OPT_LEVELS
from astro_trt.engines.backend import BACKEND_CHOICES
from astro_trt.engines.describe import describe_bundle, pin_line, size_text
from astro_trt.errors import GateError
from astro_trt.lazy import lazy_import
from astro_trt.settings import EXPORT_PRECISIONS, MAX_BATCH, MAX_CANDIDATES

export_lib = lazy_import("astro_trt.engines.export_bundle")
parity = lazy_import("astro_trt.validate.parity")
rich_console = lazy_import("rich.console")
rich_progress = lazy_import("rich.progress")
rich_table = lazy_import("rich.table")

EXPECT_SHA256_HELP = ("Refuse the bundle unless its manifest.json has this sha256 (printed by export and inspect): "
                      "pins the approved bundle.")


@contextmanager
def _spinner() -> Iterator[Any]:
    """A transient one-line spinner that shows the library's latest status line."""
    columns = (rich_progress.SpinnerColumn(), rich_progress.TextColumn("{task.description}"),
               rich_progress.TimeElapsedColumn())
    with rich_progress.Progress(*columns, transient=True) as bar:
        task = bar.add_task("starting", total=None)

        def show(message: str) -> None:
            # A note is something to act on, so it stays on screen; status lines only replace each other.
            if message.startswith("note: "):
                bar.console.print(message)
            bar.update(task, description=message)

        yield show


def _summary(out: Path, manifest: dict[str, Any]) -> None:
    table = rich_table.Table(title=f"bundle {out}", show_lines=False)
    for column in ("precision", "graph", "attention", "onnx", "engine", "build s", "ORT max |err|"):
        table.add_column(column, justify="right" if column in ("onnx", "engine", "build s") else "left")
    for precision in manifest["precisions"]:
        for graph, entry in manifest["onnx"][precision].items():
            engine = manifest["engines"].get(precision, {}).get(graph)
            onnx_bytes = sum(p.stat().st_size for p in (out / entry["path"]).parent.glob(f"{graph}.onnx*"))
            table.add_row(
                precision, graph, manifest["attention"]["effective"][precision], size_text(onnx_bytes),
                size_text(engine["bytes"]) if engine else "-", f"{engine['build_seconds']:.1f}" if engine else "-",
                f"{manifest['parity'][precision][graph]:.2e}",
            )
    # A pipe or CI log has no terminal width; a fixed width keeps graph names whole there.
    console = rich_console.Console(width=None if sys.stdout.isatty() else 110)
    console.print(table)
    backend = manifest["backend"]
    where = (f"{backend['name']} {backend['version']}, targets {','.join(backend['targets'])}"
             if backend else "none (--no-engines: ONNX only)")
    total = sum((out / rel).stat().st_size for rel in manifest["files"])
    console.print(f"back end: {where}; {len(manifest['files'])} files, {size_text(total)}")


@click.command("export")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Bundle directory to write.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--precision", default=",".join(EXPORT_PRECISIONS), show_default=True,
              help="Comma list of fp32, fp16, bf16.")
@click.option("--backend", "backend_name", default="auto", show_default=True,
              type=click.Choice(BACKEND_CHOICES))
@click.option("--attention", default="auto", show_default=True, type=click.Choice(ATTENTION_CHOICES))
@click.option("--targets", default="portable", show_default=True,
              help="Compute targets for TensorRT-RTX: portable, current, or e.g. sm86,sm89.")
@click.option("--max-batch", default=MAX_BATCH, show_default=True, type=int, help="Largest batch of users per call.")
@click.option("--max-candidates", default=MAX_CANDIDATES, show_default=True, type=int,
              help="Largest candidates per user.")
@click.option("--item-table", "item_table", default="fp32", show_default=True,
              help="Stored forms of the item table, comma list of fp32, fp16, int8 (row-wise scales); the first "
                   "is the one served, fp32 is always kept (the oracle's rows).")
@click.option("--opt-level", default=None, type=click.IntRange(OPT_LEVELS[0], OPT_LEVELS[-1]),
              help=f"Builder optimization level ({OPT_LEVELS[0]}-{OPT_LEVELS[-1]}).")
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Timing cache file, read and updated across builds (full TensorRT; TensorRT-RTX has none).")
@click.option("--no-engines", is_flag=True, help="Write ONNX only (machines without a TensorRT back end).")
@click.option("--validate", "run_validate", is_flag=True, help="Run the parity report on the bundle afterwards.")
def export(
    checkpoint: Path, out: Path, force: bool, precision: str, backend_name: str, attention: str, targets: str,
    max_batch: int, max_candidates: int, item_table: str, opt_level: int | None, timing_cache: Path | None,
    no_engines: bool, run_validate: bool,
) -> None:
    """Export CHECKPOINT (a checkpoint directory, or a bundle to re-export from its own dense
    checkpoint and fp32 item table) to a verified bundle: ONNX graphs, TensorRT engines, the item
    table, manifest."""
    with _spinner() as progress:
        result = export_lib.export_bundle(
            checkpoint, out, precisions=precision, backend=backend_name, attention=attention, targets=targets,
            max_batch=max_batch, max_candidates=max_candidates, item_tables=item_table, opt_level=opt_level,
            timing_cache=timing_cache,
            engines=not no_engines, force=force, progress=progress,
        )
    _summary(result.directory, result.manifest)
    report = None
    if run_validate:
        report = parity.validate_bundle(result.directory, runtimes=("torch", "ort"),
                                        progress=lambda msg: click.echo(f"  {msg}", err=True))
        click.echo(report.summary())

    click.echo(pin_line(result.directory))
    if report is not None and not report.passed:
        raise GateError(gate_failure(report.summary()))


@click.command("inspect")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of every file.")
@click.option("--expect-sha256", default=None, help=EXPECT_SHA256_HELP)
def inspect(bundle_dir: Path, no_verify: bool, expect_sha256: str | None) -> None:
    """Show what is inside BUNDLE_DIR: engines, I/O, sizes, back end, targets."""
    click.echo(describe_bundle(bundle_dir, verify=not no_verify, expect_sha256=expect_sha256))
