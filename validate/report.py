"""The parity report of `astro-trt validate` (BUNDLE/reports/validate/parity.{json,md,png}),
written through the shared report writers (astro_trt/reports.py)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from astro_trt.engines.bundle import write_report
from astro_trt.reports import by_kind, json_bytes, markdown_table, plot_error_distributions

# The folder of the bundle's reports/ that `astro-trt validate` writes.
VALIDATE_REPORT = "validate"


# ---------------------------------------------------------------------------- parity
def write_parity_reports(report: Any, gates: Any, errors: Mapping[str, np.ndarray], *, checkpoint: Any,
                         bundle: Any) -> dict[str, Path]:
    """BUNDLE/reports/validate/parity.{json,md,png} of a ParityReport (validate.parity), recorded in
    the manifest. Returns {"json", "md", "png"} -> path."""
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


__all__ = ["VALIDATE_REPORT", "parity_markdown", "write_parity_reports"]
