"""Writing reports: JSON for machines, Markdown for people, PNG plots (matplotlib, Agg back end
so that no display is needed). Every report is rendered to bytes first and then written file by
file atomically: into a bundle through engines.bundle.write_report (so the manifest lists and
hashes it), or into a plain directory with write_files."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from astro_trt.artifacts import atomic_write

# The folder of the bundle's reports/ that `astro-trt validate` writes.
VALIDATE_REPORT = "validate"


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


def png_bytes(fig: Any) -> bytes:
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buffer.getvalue()


def plot_error_distributions(errors: Mapping[str, np.ndarray], title: str) -> bytes:
    """Histogram of log10 |error| per label (exact zeros are drawn at the left edge)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
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


__all__ = [
    "VALIDATE_REPORT", "by_kind", "json_bytes", "markdown_table", "parity_markdown", "plot_error_distributions",
    "plot_throughput", "write_files", "write_parity_reports",
]


# ---------------------------------------------------------------------------- parity
def write_parity_reports(report: Any, gates: Any, errors: Mapping[str, np.ndarray], *, checkpoint: Any,
                         bundle: Any) -> dict[str, Path]:
    """BUNDLE/reports/validate/parity.{json,md,png} of a ParityReport (validate.parity), recorded in
    the manifest. Returns {"json", "md", "png"} -> path."""
    from astro_trt.engines.bundle import write_report

    payload = {
        "passed": report.passed,
        "bundle": str(bundle.directory),
        "checkpoint": {"path": str(checkpoint.directory), "sha256": checkpoint.sha256,
                       "bundle_sha256": bundle.checkpoint_sha256},
        "data": report.data,
        "precisions": list(bundle.precisions),
        "gates": gates.to_dict(),
        "gate_results": [g.to_dict() for g in report.gates],
        "skipped": report.skipped,
        "results": report.results,
    }
    files = {
        "parity.json": json_bytes(payload),
        "parity.png": plot_error_distributions(errors, f"logits error vs fp32 oracle ({report.data})"),
        "parity.md": parity_markdown(report, payload, "parity.png").encode(),
    }
    written = write_report(bundle.directory, VALIDATE_REPORT, files)
    return by_kind(dict(zip(files, written, strict=True)))


def parity_markdown(report: Any, payload: Mapping[str, Any], plot_name: str) -> str:
    results = payload["results"]
    lines = [f"# astro-trt parity report: {'PASSED' if report.passed else 'FAILED'}", "",
             f"Bundle `{payload['bundle']}`, checkpoint sha256 `{payload['checkpoint']['sha256'][:16]}...`, "
             f"data `{report.data}`. Oracle: the checkpoint's PyTorch model in fp32.", ""]
    failed = [g for g in report.gates if not g.passed]
    lines += ["## Gates", ""]
    lines += [f"- **{g.describe()}**" for g in failed] or ["- all gates passed"]
    lines += [f"- skipped {rt}: {why}" for rt, why in report.skipped.items()]
    lines += ["", markdown_table(["gate", "subject", "value", "limit", "pass"],
                                 [(g.gate, g.subject, g.value, g.limit, "yes" if g.passed else "NO")
                                  for g in report.gates]), ""]
    stat_rows, metric_rows, rank_rows = [], [], []
    oracle = results["oracle"]
    for task, m in oracle["metrics"].items():
        trained = (oracle.get("trained_metrics") or {}).get(task, {})
        metric_rows.append(("oracle torch-fp32", task, m["auc"], m["logloss"], 0.0, trained.get("auc", "-")))
    for precision in payload["precisions"]:
        for name, entry in results.get(precision, {}).items():
            for output in ("logits", "full_logits", "kv_cache", "split_vs_full"):
                if output not in entry:
                    continue
                s = entry[output]
                stat_rows.append((name, output, s["max_abs"], s["mean_abs"], s["quantile_abs"], s["max_rel"],
                                  s["median_rel"], s["cosine"], entry.get("error_ratio_vs_torch", "-")
                                  if output == "logits" else "-"))
            for task, m in entry["metrics"].items():
                trained = (oracle.get("trained_metrics") or {}).get(task, {})
                metric_rows.append((name, task, m["auc"], m["logloss"], entry["auc_delta_vs_oracle"][task],
                                    trained.get("auc", "-")))
            for task, r in entry["ranking"].items():
                rank_rows.append((name, task, r["topk_overlap"], r["kendall_tau"]))
    lines += ["## Error against the oracle", "",
              "`logits`: split (encoder + scorer); `full_logits`: full model; `split_vs_full`: split against "
              "full in the same runtime. Quantile = 0.99. Ratio: max abs error over PyTorch's own in that "
              "precision.", "",
              markdown_table(["runner", "output", "max abs", "mean abs", "q99 abs", "max rel", "median rel",
                              "cosine", "ratio vs torch"], stat_rows), "",
              "## AUC and LogLoss", "",
              markdown_table(["runner", "task", "AUC", "LogLoss", "|dAUC| vs oracle", "trained AUC"], metric_rows),
              "", "## Ranking agreement with the oracle (per user)", "",
              markdown_table(["runner", "task", f"top-{payload['gates']['topk']} overlap", "Kendall tau"], rank_rows),
              "", f"![error distribution]({plot_name})", ""]
    return "\n".join(lines)
