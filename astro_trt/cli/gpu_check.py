"""``astro-trt gpu-check``: every GPU-side check in one call (serving/gpu_check.py)."""

from __future__ import annotations

from pathlib import Path

import click

from astro_trt.choices import split_list
from astro_trt.errors import GateError
from astro_trt.lazy import lazy_import

# The check imports the serving and runtime stages: loaded when the command runs, not for --help.
gpu_check_lib = lazy_import("astro_trt.serving.gpu_check")


@click.command("gpu-check")
@click.argument("bundle_dir", type=click.Path(path_type=Path), default=Path("build/ml100k"))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for gpu-check.json, gpu-check.md, each step's log and reports.")
@click.option("--dry-run", is_flag=True, help="On a CPU machine: run every step as far as its first CUDA call.")
@click.option("--skip", default="", help="Comma list of steps to leave out (environment, pytest-gpu, kernels, "
                                         "trt-plans, bench-trt, served-trt).")
@click.option("--budget", default=480, show_default=True, type=click.IntRange(30, 3600),
              help="Seconds for all steps together; each step also has its own time box.")
def gpu_check(bundle_dir: Path, out: Path, dry_run: bool, skip: str, budget: int) -> None:
    """Everything GPU-side against BUNDLE_DIR (default build/ml100k): pytest -m gpu, the kernel
    benchmark against its predictions, the bundle's TensorRT-RTX plans on this GPU, bench and
    validate with --runtime trt against ONNX Runtime, and astro_recommend served with compute=trt.
    Exit 1 when a step failed; the report says which and why."""
    steps_left_out = [str(s) for s in split_list(skip) or ()]
    report = gpu_check_lib.run_gpu_check(bundle_dir, out, dry_run=dry_run, skip=steps_left_out, budget=budget,
                                         progress=lambda msg: click.echo(msg, err=True))
    for step in report["steps"]:
        click.echo(f"{step['name']:<12} {step['status']:<12} {step['seconds']:6.1f} s")
    click.echo(f"report: {out / 'gpu-check.md'}")
    if not gpu_check_lib.ok(report):
        bad = [s["name"] for s in report["steps"] if s["status"] not in ("passed", "skipped", "reached-gpu")]
        raise GateError(f"gpu-check: {', '.join(bad)} did not pass; see {out / 'gpu-check.md'}")
