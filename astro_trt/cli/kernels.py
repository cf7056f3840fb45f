"""``astro-trt bench-kernels``: time the attention kernels against PyTorch baselines (GPU) beside
their predicted times; ``--compile-only`` compiles them for real GPU targets here (no GPU)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from astro_trt.contract import PRECISIONS
from astro_trt.validate.kernel_bench import IMPLS


def _names(text: str, choices: list[str] | tuple[str, ...], option: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in choices]
    if bad or not names:
        raise click.BadParameter(f"{bad or text!r} not in {list(choices)}; pass a comma list of them",
                                 param_hint=option)
    return names


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
@click.option("--targets", default="sm_80,sm_86,sm_89,sm_90,sm_100", show_default=True,
              help="--compile-only: comma list of GPU targets.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the results as JSON here.")
def bench_kernels(configs: str, candidates: str, dtypes: str, batch: int, repeat: int, impls: str,
                  compile_only: bool, targets: str, json_out: Path | None) -> None:
    """Time both attention kernels against the reference, SDPA with a dense mask and FlexAttention,
    beside the time an H100 and an H200 would take at their peaks."""
    from astro_trt.config import PRESETS
    from astro_trt.plugins.kernels.blocks import TARGETS
    from astro_trt.validate import kernel_bench as kb
    from astro_trt.validate.bench import parse_candidates

    names = _names(configs, list(PRESETS), "--config")
    precisions = _names(dtypes, PRECISIONS, "--dtype")
    counts = parse_candidates(candidates)
    chosen_impls = tuple(_names(impls, IMPLS, "--impl"))
    report: dict = {}
    measured: dict = {}
    if compile_only:
        from astro_trt.plugins.kernels import aot

        chosen = _names(targets, list(TARGETS), "--targets")
        resources = aot.compile_jobs(aot.launcher_jobs(names, precisions, chosen))
        click.echo(aot.format_resources(resources))
        report["resources"] = [aot.resources_json(r) for r in resources]
    else:
        by_dtype = {d: kb.run_benchmark(names, counts, dtype=d, batch=batch, repeat=repeat,
                                              impls=chosen_impls) for d in precisions}
        results = [r for rows in by_dtype.values() for r in rows]
        click.echo(kb.format_table(results))
        report["results"] = kb.results_json(results)
        measured = {d: kb.measured_triton(rows) for d, rows in by_dtype.items()}
    report["predicted"], report["split"] = {}, {}
    for dtype in precisions:
        kernels = kb.predicted_kernels(kb.cases(names, counts, batch), dtype, measured.get(dtype))
        split = kb.predicted_split(names, counts, batch, dtype)
        click.echo(f"\npredicted, {dtype}, {batch} users (measured: the Triton kernel on this GPU)\n"
                   f"{kb.format_predicted(kernels)}\n\nsplit end to end, {dtype}, {batch} users\n"
                   f"{kb.format_predicted(split)}")
        report["predicted"][dtype], report["split"][dtype] = kb.predicted_json(kernels), kb.predicted_json(split)
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=2))
