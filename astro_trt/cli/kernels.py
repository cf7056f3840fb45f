"""``astro-trt bench-kernels``: time the attention kernels against PyTorch baselines (GPU) beside
their predicted times; ``--compile-only`` compiles them for real GPU targets here (no GPU)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from astro_trt.choices import comma_list
from astro_trt.config import PRESETS
from astro_trt.contract import PRECISIONS
from astro_trt.lazy import lazy_import
from astro_trt.plugins.kernels.blocks import TARGETS
from astro_trt.validate.kernel_cases import IMPLS

aot = lazy_import("astro_trt.plugins.kernels.aot")
bench_lib = lazy_import("astro_trt.validate.bench")
kernel_bench = lazy_import("astro_trt.validate.kernel_bench")


@click.command("bench-kernels")
@click.option("--config", "configs", default="climber,climber-large", show_default=True,
              help="Comma-separated config presets whose shapes to time.")
@click.option("--candidates", default="64,256,1024,4096", show_default=True, help="Candidates per user (M).")
@click.option("--dtype", "dtypes", default="fp16", show_default=True,
              help=f"Comma list of precisions ({', '.join(PRECISIONS)}).")
@click.option("--batch", type=click.IntRange(min=1, max=4096), default=8, show_default=True, help="Users per batch.")
@click.option("--repeat", type=click.IntRange(min=1), default=20, show_default=True, help="Timed runs (median).")
@click.option("--impl", "impls", default=",".join(IMPLS), show_default=True,
              help="Comma list of the implementations to time.")
@click.option("--compile-only", is_flag=True,
              help="No GPU: compile the kernels for --targets and print ptxas' registers, spills and shared "
                   "memory per kernel x target x block configuration, and the predicted times.")
@click.option("--targets", default=",".join(TARGETS), show_default=True,
              help="--compile-only: comma list of GPU targets.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the results as JSON here.")
def bench_kernels(configs: str, candidates: str, dtypes: str, batch: int, repeat: int, impls: str,
                  compile_only: bool, targets: str, json_out: Path | None) -> None:
    """Time both attention kernels against the reference, SDPA with a dense mask and FlexAttention,
    beside the time an H100 and an H200 would take at their peaks."""
    names = comma_list(configs, list(PRESETS), "--config")
    precisions = comma_list(dtypes, PRECISIONS, "--dtype")
    counts = bench_lib.parse_candidates(candidates)
    chosen_impls = tuple(comma_list(impls, IMPLS, "--impl"))
    report: dict = {}
    measured: dict = {}
    if compile_only:
        resources = aot.compile_jobs(aot.launcher_jobs(names, precisions, comma_list(targets, list(TARGETS),
                                                                                     "--targets")))
        click.echo(aot.format_resources(resources))
        report["resources"] = [aot.resources_json(r) for r in resources]
    else:
        by_dtype = {d: kernel_bench.run_benchmark(names, counts, dtype=d, batch=batch, repeat=repeat,
                                                  impls=chosen_impls) for d in precisions}
        results = [r for rows in by_dtype.values() for r in rows]
        click.echo(kernel_bench.format_table(results))
        report["results"] = kernel_bench.results_json(results)
        measured = {d: kernel_bench.measured_triton(rows) for d, rows in by_dtype.items()}
    report["predicted"], report["split"] = {}, {}
    for dtype in precisions:
        kernels = kernel_bench.predicted_kernels(kernel_bench.cases(names, counts, batch), dtype, measured.get(dtype))
        split = kernel_bench.predicted_split(names, counts, batch, dtype)
        click.echo(f"\npredicted, {dtype}, {batch} users (measured: the Triton kernel on this GPU)\n"
                   f"{kernel_bench.format_predicted(kernels)}\n\nsplit end to end, {dtype}, {batch} users\n"
                   f"{kernel_bench.format_predicted(split)}")
        report["predicted"][dtype] = kernel_bench.predicted_json(kernels)
        report["split"][dtype] = kernel_bench.predicted_json(split)
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=2))
