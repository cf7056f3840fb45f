"""The astro-trt command line.

Each stage's commands live in ``astro_trt/cli/<module>.py``; this group only names them and imports
a module when its command runs, so ``astro-trt --help`` never pays for torch or TensorRT.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading

import click

# Imported here, not in the handler: a signal can arrive while a module is half imported.
from astro_trt.artifacts import abandon_staged_writes
from astro_trt.errors import AstroError, GateError

# command name -> (module, attribute, one-line help shown by --help without importing it)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "data": ("astro_trt.cli.model", "data", "Fetch and prepare a dataset (offline-friendly)."),
    "train": ("astro_trt.cli.model", "train", "Train an ASTRO model on the CPU and write a checkpoint."),
    "export": ("astro_trt.cli.export", "export", "Export a checkpoint to ONNX and TensorRT engines (a bundle)."),
    "inspect": ("astro_trt.cli.export", "inspect", "Show what is inside a bundle."),
    "validate": ("astro_trt.cli.validate", "validate", "Parity report of a bundle against PyTorch."),
    "bench": ("astro_trt.cli.validate", "bench", "Throughput of the split against the full model."),
    "bench-memory": ("astro_trt.cli.validate", "bench_memory",
                     "Peak memory of ONNX Runtime running the full model (fresh process)."),
    "bench-kernels": ("astro_trt.cli.kernels", "bench_kernels", "Time the attention kernels (GPU)."),
    "gpu-check": ("astro_trt.cli.gpu_check", "gpu_check", "Run every GPU-side check in one call (JSON + Markdown)."),
    "triton": ("astro_trt.cli.serve", "triton", "Write a Triton Inference Server model repository."),
    "serve": ("astro_trt.cli.serve", "serve", "Serve a bundle with Triton on 127.0.0.1."),
    "loadtest": ("astro_trt.cli.serve", "loadtest", "Load-test a served model over HTTP and gRPC."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, help_) for name, (_, _, help_) in COMMANDS.items()])


@click.group(cls=LazyGroup)
@click.version_option(package_name="astro-trt")
def cli() -> None:
    """Compile a trained ASTRO recommendation model into verified TensorRT engines."""


EXIT_TERMINATED = 128 + signal.SIGTERM


def _on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM (what timeout, systemd and Kubernetes send) cleans up like Ctrl-C: every staged
    artifact is removed, a previous one moved aside is put back. It does so here and exits at
    once rather than raising: an exception raised from a signal can land inside a C extension's
    Python callback (torch.onnx, ONNX Runtime) or a destructor, where it crashes the process or
    is printed and swallowed."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not interrupt the clean-up
    try:
        abandon_staged_writes()
        sys.stdout.flush()
        print("terminated", file=sys.stderr, flush=True)
    finally:
        os._exit(EXIT_TERMINATED)


def main(argv: list[str] | None = None) -> None:
    """Entry point: expected failures (AstroError) print one line and exit 2, not a traceback; a
    failed gate (GateError) prints one line and exits 1; Ctrl-C exits 130 and SIGTERM 143
    (128 + signal), both after removing staged output."""
    # Signal handlers can only be set from the main thread; the previous one is restored after,
    # so calling main() inside another program (a test) leaves its handling as it was.
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        _run(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(argv: list[str] | None) -> None:
    try:
        cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("aborted", err=True)
        sys.exit(130)
    except GateError as exc:  # the run worked and its report is printed; what it measured failed
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except AstroError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)

