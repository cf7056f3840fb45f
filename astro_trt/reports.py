"""Writing reports, for every command that writes one (validate, bench, bisect, the load test):
JSON for machines, Markdown for people, PNG plots (matplotlib on the Agg back end, so that no
display is needed). Every report is rendered to bytes first and then written file by file
atomically: into a bundle through engines.bundle.write_report (so the manifest lists and hashes
it), or into a plain directory with write_files."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from astro_trt.artifacts import atomic_write
from astro_trt.lazy import lazy_import

matplotlib = lazy_import("matplotlib")  # ~0.5 s to import: only a command that draws pays for it
plt = lazy_import("matplotlib.pyplot")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else str(value)  # JSON has no NaN/inf
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Path):
        return str(value)
    return value


def json_bytes(payload: Mapping[str, Any]) -> bytes:
    return (json.dumps(_jsonable(payload), indent=2, sort_keys=False) + "\n").encode()


def write_files(directory: Path, files: Mapping[str, bytes]) -> dict[str, Path]:
    """Write rendered report files into a plain directory; returns file name -> path."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        atomic_write(directory / name, data)
    return {name: directory / name for name in files}


def by_kind(paths: Mapping[str, Path]) -> dict[str, Path]:
    """File name -> path, keyed by suffix instead ("json", "md", "png"): what callers print."""
    return {Path(name).suffix.lstrip("."): path for name, path in paths.items()}


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def figure(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """``plt.subplots(*args, **kwargs)`` on the Agg back end (no display needed)."""
    matplotlib.use("Agg")
    return plt.subplots(*args, **kwargs)


def png_bytes(fig: Any) -> bytes:
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buffer.getvalue()


def plot_error_distributions(errors: Mapping[str, np.ndarray], title: str) -> bytes:
    """Histogram of log10 |error| per label (exact zeros are drawn at the left edge)."""
    fig, ax = figure(figsize=(8, 4.5))
    floor = 1e-12
    for label, err in errors.items():
        err = np.asarray(err, dtype=np.float64).ravel()
        if err.size == 0:
            continue
        ax.hist(np.log10(np.maximum(err, floor)), bins=80, histtype="step", linewidth=1.4, label=label)
    ax.set_xlabel("log10 |error| against the fp32 PyTorch oracle (zeros at -12)")
    ax.set_ylabel("elements")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return png_bytes(fig)


def plot_throughput(series: Mapping[str, tuple[Sequence[int], Sequence[float]]], title: str) -> bytes:
    """Candidates scored per second against candidates per request, one line per path."""
    fig, ax = figure(figsize=(7, 4.5))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("candidates per request (M)")
    ax.set_ylabel("candidates scored per second")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    return png_bytes(fig)


__all__ = ["by_kind", "figure", "json_bytes", "markdown_table", "plot_error_distributions", "plot_throughput",
           "png_bytes", "write_files"]
