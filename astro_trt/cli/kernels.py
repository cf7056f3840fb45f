"""``astro-trt bench-kernels``: time the attention kernels against PyTorch baselines (GPU)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from astro_trt.choices import split_list
from astro_trt.config import preset
from astro_trt.contract import PRECISIONS
from astro_trt.lazy import lazy_import

bench_lib = lazy_import("astro_trt.validate.bench")
kernel_bench = lazy_import("astro_trt.validate.kernel_bench")


@click.command("bench-kernels")
@click.option("--config", "configs", default="climber,climber-large", show_default=True,
              help="Comma-separated config presets whose shapes to time.")
@click.option("--candidates", default="64,256,1024,4096", show_default=True, help="Candidates per user (M).")
@click.option("--dtype", type=click.Choice(PRECISIONS), default="fp16", show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True, help="Users per batch.")
@click.option("--repeat", type=click.IntRange(min=1), default=20, show_default=True, help="Timed runs (median).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the results as JSON here.")
def bench_kernels(configs: str, candidates: str, dtype: str, batch: int, repeat: int, json_out: Path | None) -> None:
    """Time both attention kernels against the reference, SDPA with a dense mask and FlexAttention."""
    names = [str(name) for name in split_list(configs) or ()]
    for name in names:
        preset(name)  # unknown names fail here with the list of presets, before any GPU work
    results = kernel_bench.run_benchmark(names, bench_lib.parse_candidates(candidates), dtype=dtype, batch=batch,
                                         repeat=repeat)
    click.echo(kernel_bench.format_table(results))
    if json_out is not None:
        json_out.write_text(json.dumps(kernel_bench.results_json(results), indent=2))
