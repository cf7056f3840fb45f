"""The parity report of a bundle: every runtime's outputs against the fp32 PyTorch oracle on the
same batches (error statistics, error relative to PyTorch's own error in that precision, AUC and
LogLoss, ranking agreement, split against full), judged by gates, written to BUNDLE/reports/validate/
as parity.json, parity.md and parity.png (and recorded in the manifest)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from astro_trt.arguments import as_path, callback, choice, instance
from astro_trt.artifacts import read_regular_file
from astro_trt.choices import comma_list
from astro_trt.contract import SPLIT_GRAPHS
from astro_trt.engines.bundle import load_bundle
from astro_trt.errors import ArtifactError, DataError
from astro_trt.model import movielens
from astro_trt.model.checkpoint import MAX_DOCUMENT_BYTES, METRICS_FILE, load_checkpoint
from astro_trt.model.item_table import REFERENCE_TABLE
from astro_trt.model.metrics import evaluate
from astro_trt.model.requests import batches
from astro_trt.model.synthetic import synthetic_batch
from astro_trt.model.train import EVAL_BATCH
from astro_trt.precision import REFERENCE, is_quantized, is_reference
from astro_trt.runtime.onnxruntime import OrtRunner
from astro_trt.runtime.runner import to_float32
from astro_trt.runtime.tensorrt import make_trt_runner
from astro_trt.runtime.torch_runner import TorchRunner
from astro_trt.validate.choices import DATA_CHOICES, RUNTIMES
from astro_trt.validate.gates import GateResult, Gates
from astro_trt.validate.ranking import mean_kendall_tau, topk_overlap
from astro_trt.validate.report import write_parity_reports
from astro_trt.validate.stats import abs_errors, error_stats

# Users whose kv_cache is compared element by element: the cache is ~100x the logits per user,
# and a few hundred users already exercise every block length and time bucket.
KV_USERS = 256
FULL_USERS = 16  # users per full-model call (memory, see collect)
SYNTHETIC_BATCHES, SYNTHETIC_USERS, SYNTHETIC_CANDIDATES = 3, 16, 16


@dataclass
class Outputs:
    """One runner's outputs over all batches: logits [B, M, T] per batch (split and full) and
    the kv_cache of the first KV_USERS users (float32)."""

    split: list[np.ndarray] = field(default_factory=list)
    full: list[np.ndarray] = field(default_factory=list)
    kv: list[np.ndarray] = field(default_factory=list)

    def masked(self, which: str, masks: Sequence[np.ndarray]) -> np.ndarray:
        """Logits of the real candidates only, [N, T]: padded slots are no one's prediction."""
        return np.concatenate([lg[m] for lg, m in zip(getattr(self, which), masks, strict=True)])


@dataclass
class ParityReport:
    bundle: Path
    data: str
    results: dict[str, Any]
    gates: list[GateResult]
    skipped: dict[str, str]
    paths: dict[str, Path] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    @property
    def failed(self) -> list[GateResult]:
        return [g for g in self.gates if not g.passed]

    def summary(self) -> str:
        head = (f"parity {'PASSED' if self.passed else 'FAILED'}: {len(self.gates) - len(self.failed)}/"
                f"{len(self.gates)} gates passed on {self.data}")
        lines = [head, *(f"  {g.describe()}" for g in self.failed)]
        lines += [f"  skipped {rt}: {why}" for rt, why in self.skipped.items()]
        if self.paths:
            lines.append(f"  report: {self.paths.get('md', '')}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------- data
def load_batches(data: str, cfg: Any, checkpoint_dir: Path) -> list[Any]:
    """The batches to compare on. ml-100k: the test split exactly as training evaluated it
    (split spec from the checkpoint's data.json), so that the oracle's AUCs reproduce
    metrics.json; synthetic: a few seeded random batches at the config's sizes."""
    if data == "synthetic":
        return [synthetic_batch(cfg, SYNTHETIC_USERS, SYNTHETIC_CANDIDATES, seed=s) for s in range(SYNTHETIC_BATCHES)]
    if data != "ml-100k":
        raise DataError(f"unknown --data '{data}'; choose one of {list(DATA_CHOICES)}")

    data_json = _document(checkpoint_dir / "data.json")
    spec = movielens.split_spec_of(json.loads(data_json)) if data_json is not None else movielens.SplitSpec()
    requests = movielens.build_requests(movielens.load_ml100k(), cfg, "test", spec)
    return list(batches(requests, EVAL_BATCH, num_candidates=spec.candidates))


def reference_metrics(checkpoint_dir: Path) -> dict[str, dict[str, float]] | None:
    """Test metrics the checkpoint was trained to (metrics.json), or None when it has none."""
    text = _document(checkpoint_dir / METRICS_FILE)
    if text is None:
        return None
    try:
        return json.loads(text)["test"]["model"]
    except (KeyError, TypeError, ValueError):
        return None


def _document(path: Path) -> str | None:
    """A checkpoint's JSON document as text, None when absent; never read through a symlink, and
    a FIFO, device or oversized file in its place is refused (one line) instead of read."""
    try:
        raw = read_regular_file(path, max_bytes=MAX_DOCUMENT_BYTES, follow_symlinks=False)
    except FileNotFoundError:
        return None
    except ArtifactError as exc:
        raise DataError(str(exc)) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 JSON; re-copy the checkpoint") from None


# ---------------------------------------------------------------------------- running
def collect(runner: Any, batches: Sequence[Any], *, full: bool = True) -> Outputs:
    """Run ``runner`` on every batch; ``full=False`` skips the full model (L+1 times the work)."""
    out, kv_users = Outputs(), 0
    for batch in batches:
        kv = runner.encode(batch.history)
        out.split.append(runner.score(kv, batch.history, batch.cand_items))
        if full:
            # The full model runs B*M sequences of L+1 tokens and materializes [L+1, L+1] scores and
            # time buckets per sequence: a 256-user batch needs ~10 GB in ONNX Runtime. Users go
            # through it FULL_USERS at a time; results do not depend on the batching.
            out.full.append(np.concatenate([
                runner.full(batch.history.rows(i, i + FULL_USERS), batch.cand_items[i : i + FULL_USERS])
                for i in range(0, batch.batch_size, FULL_USERS)
            ]))
        if kv_users < KV_USERS:
            take = min(KV_USERS - kv_users, batch.batch_size)
            out.kv.append(to_float32(kv)[:take])
            kv_users += take
    return out


def _metrics_of(outputs: Outputs, batches: Sequence[Any], task_names: Sequence[str] | None) -> dict:
    by_batch = {id(b): lg for b, lg in zip(batches, outputs.split, strict=True)}
    return evaluate(lambda b: by_batch[id(b)], batches, task_names or None)


def _ranking(actual: Outputs, oracle: Outputs, masks: Sequence[np.ndarray], k: int, tasks: Sequence[str]) -> dict:
    a = np.concatenate(actual.split)  # [users, M, T]; same M in every batch
    o = np.concatenate(oracle.split)
    mask = np.concatenate(masks)
    return {
        task: {"topk_overlap": topk_overlap(a[..., t], o[..., t], k, mask),
               "kendall_tau": mean_kendall_tau(a[..., t], o[..., t], mask)}
        for t, task in enumerate(tasks)
    }


def parse_runtimes(value: str | Sequence[str]) -> list[str]:
    """'torch,ort' or ['torch', 'ort'] -> ['torch', 'ort'] (lower case, duplicates dropped)."""
    return comma_list(value, RUNTIMES, "--runtime", DataError)


def library_arguments(gates: Any, progress: Any, checkpoint: Any) -> tuple[Gates, Callable[[str], None], Any]:
    """The arguments validate_bundle and bisect_bundle share, checked (astro_trt.arguments):
    (gates or the defaults, progress or a no-op, checkpoint as a Path or None)."""
    gates = Gates() if gates is None else instance(gates, "gates", Gates, "a Gates(...) of the limits, or None")
    say = callback(progress, "progress") or (lambda _msg: None)
    return gates, say, None if checkpoint is None else as_path(checkpoint, "checkpoint")


def validate_bundle(
    bundle_dir: str | Path,
    *,
    data: str = "ml-100k",
    runtimes: str | Sequence[str] = ("torch", "ort"),
    checkpoint: Path | None = None,
    gates: Gates | None = None,
    progress: Callable[[str], None] | None = None,
    expect_sha256: str | None = None,
) -> ParityReport:
    """Compare the bundle's runtimes against the fp32 PyTorch oracle of ``checkpoint`` (default:
    the bundle's own copy) and write BUNDLE/reports/validate/parity.{json,md,png}. With
    ``expect_sha256`` only the bundle whose manifest has that digest is validated."""
    gates, say, checkpoint = library_arguments(gates, progress, checkpoint)
    choice(data, "data (--data)", DATA_CHOICES)
    runtimes = parse_runtimes(runtimes)
    bundle = load_bundle(bundle_dir, verify=True, expect_sha256=expect_sha256)
    ckpt = load_checkpoint(checkpoint) if checkpoint else bundle.checkpoint()
    results: dict[str, Any] = {}
    gate_results: list[GateResult] = []

    same = ckpt.sha256 == bundle.checkpoint_sha256
    gate_results.append(GateResult(
        "checkpoint_sha256", "checkpoint", 1.0 if same else 0.0, 1.0, higher_is_better=True,
        detail="" if same else (
            f"checkpoint {ckpt.directory} has sha256 {ckpt.sha256} but the bundle was exported from "
            f"{bundle.checkpoint_sha256}; re-export the bundle from this checkpoint (astro-trt export "
            f"{ckpt.directory} --out BUNDLE) or validate against the checkpoint it was built from"),
    ))
    ours, theirs = ckpt.config.to_dict(), bundle.config.to_dict()
    if ours != theirs:
        differ = ", ".join(f"{k}={ours[k]!r} (bundle {theirs[k]!r})" for k in ours if ours[k] != theirs[k])
        raise DataError(
            f"checkpoint {ckpt.directory} differs from the bundle's config in {differ}; "
            "validate with the checkpoint the bundle was exported from"
        )

    cfg = bundle.config
    tasks = list(cfg.task_names) or [f"task{t}" for t in range(cfg.num_tasks)]
    say(f"loading {data} batches")
    documents = ckpt.directory  # holds metrics.json / data.json (the bundle's copy carries them)
    batches = load_batches(data, cfg, documents)
    masks = [b.cand_mask.numpy() for b in batches]
    say(f"{len(batches)} batches, {sum(int(m.sum()) for m in masks)} candidates; running the fp32 oracle")
    oracle = collect(TorchRunner(ckpt.model, REFERENCE), batches)
    oracle_split = oracle.masked("split", masks)
    oracle_metrics = _metrics_of(oracle, batches, tasks)
    trained = reference_metrics(documents) if data == "ml-100k" else None
    if data == "ml-100k" and trained is None:
        say(f"no metrics.json with the checkpoint ({documents}): AUCs are compared with the oracle only")
    results["oracle"] = {"metrics": oracle_metrics, "trained_metrics": trained,
                         "split_vs_full": error_stats(oracle_split, oracle.masked("full", masks)).to_dict()}
    errors_for_plot: dict[str, np.ndarray] = {}
    skipped: dict[str, str] = {}

    for precision in bundle.precisions:
        per: dict[str, Any] = {}
        results[precision] = per
        torch_error = None
        runners: list[Any] = []
        if not is_reference(precision):
            # PyTorch's own error in this precision: the yardstick for every half-precision runtime.
            runners.append(TorchRunner(ckpt.model, precision))
        elif "torch" in runtimes:
            runners.append(None)  # torch-fp32 is the oracle itself: its split-vs-full is gated below
        if "ort" in runtimes:
            # The graphs judged alone: the rows they get are the fp32 table's, the oracle's own.
            runners.append(OrtRunner.from_bundle(bundle, precision, item_table=REFERENCE_TABLE))
        if "trt" in runtimes:
            trt_runner, why = make_trt_runner(bundle, precision)
            if trt_runner is None:
                skipped[f"trt-{precision}"] = why
            else:
                runners.append(trt_runner)
        for runner in runners:
            if runner is None:
                outputs, name, rt = oracle, f"torch-{REFERENCE}", "torch"
            else:
                say(f"running {runner.name}")
                # PyTorch in half precision on the CPU is slow, and only its scorer error is the
                # yardstick: its full model is not run.
                run_full = runner.runtime != "torch"
                outputs, name, rt = collect(runner, batches, full=run_full), runner.name, runner.runtime
            split = outputs.masked("split", masks)
            entry = _quality(outputs, oracle, oracle_metrics, batches, masks, gates, tasks)
            entry["kv_cache"] = error_stats(np.concatenate(outputs.kv), np.concatenate(oracle.kv),
                                            name="kv_cache").to_dict()
            if outputs.full:
                full = outputs.masked("full", masks)
                entry["full_logits"] = error_stats(full, oracle_split, name="logits").to_dict()
                entry["split_vs_full"] = error_stats(split, full, name="logits").to_dict()
            if rt == "torch" and not is_reference(precision):
                torch_error = entry["logits"]["max_abs"]
            if torch_error is not None:
                entry["error_ratio_vs_torch"] = entry["logits"]["max_abs"] / max(torch_error, 1e-30)
            per[name] = entry
            if runner is not None:
                errors_for_plot[name] = abs_errors(split, oracle_split)
            gate_results += _gates_for(name, rt, precision, entry, torch_error, gates, trained, tasks)
    if "ort" in runtimes:
        for storage in bundle.table_storages:
            if storage == REFERENCE_TABLE:
                continue
            runner = OrtRunner.from_bundle(bundle, REFERENCE, only=SPLIT_GRAPHS, item_table=storage)
            name = f"{runner.name}+{storage}-table"
            say(f"running {name}")
            outputs = collect(runner, batches, full=False)
            entry = _quality(outputs, oracle, oracle_metrics, batches, masks, gates, tasks)
            results.setdefault("item_tables", {})[storage] = {name: entry}
            errors_for_plot[name] = abs_errors(outputs.masked("split", masks), oracle_split)
            gate_results += _table_gates(name, storage, entry, gates, tasks)
    report = ParityReport(Path(bundle.directory), data, results, gate_results, skipped)

    report.paths = write_parity_reports(report, gates, errors_for_plot, checkpoint=ckpt, bundle=bundle)
    return report


def _quality(outputs: Outputs, oracle: Outputs, oracle_metrics: dict, batches: Sequence[Any],
             masks: Sequence[np.ndarray], gates: Gates, tasks: Sequence[str]) -> dict[str, Any]:
    """A runner's scorer results against the oracle's: logits error, task metrics, rankings and the
    AUC change per task (every runtime and precision, and each stored item table)."""
    metrics = _metrics_of(outputs, batches, tasks)
    return {"logits": error_stats(outputs.masked("split", masks), oracle.masked("split", masks),
                                  name="logits").to_dict(),
            "metrics": metrics, "ranking": _ranking(outputs, oracle, masks, gates.topk, tasks),
            "auc_delta_vs_oracle": {t: abs(metrics[t]["auc"] - oracle_metrics[t]["auc"]) for t in tasks}}


def _table_gates(name: str, storage: str, entry: dict, gates: Gates, tasks: Sequence[str]) -> list[GateResult]:
    """A quantized table is judged by task quality, as int8 graphs are (docs/tolerances.md): the AUC
    change per task, the top-k overlap and Kendall tau of the rankings; its logits error is reported."""
    out = [GateResult("auc_delta_vs_oracle", f"{name} {task}", entry["auc_delta_vs_oracle"][task],
                      gates.auc_delta_table, detail=f"{storage} item table against the fp32 rows")
           for task in tasks]
    low_task = min(tasks, key=lambda t: entry["ranking"][t]["topk_overlap"])
    out.append(GateResult(f"top{gates.topk}_overlap", f"{name} {low_task}",
                          entry["ranking"][low_task]["topk_overlap"], gates.topk_overlap, higher_is_better=True))
    low_tau = min(tasks, key=lambda t: entry["ranking"][t]["kendall_tau"])
    out.append(GateResult("kendall_tau", f"{name} {low_tau}", entry["ranking"][low_tau]["kendall_tau"],
                          gates.kendall_tau_int8, higher_is_better=True))
    return out


def _gates_for(name: str, runtime: str, precision: str, entry: dict, torch_error: float | None, gates: Gates,
               trained: dict | None, tasks: Sequence[str]) -> list[GateResult]:
    out = []
    is_yardstick = runtime == "torch"  # PyTorch itself: judged only on split-vs-full and the trained AUCs
    subject = f"{name}"
    if not is_yardstick:
        limit = gates.logits_limit(precision, torch_error)
        why = "" if is_reference(precision) else (
            f"{gates.error_ratio(precision):g} x PyTorch's own {precision} error {torch_error:.3g} + "
            f"{gates.half_floor(precision):.3g} floor")
        out.append(GateResult("logits_max_abs", subject, entry["logits"]["max_abs"], limit, detail=why))
        out.append(GateResult("full_logits_max_abs", subject, entry["full_logits"]["max_abs"], limit, detail=why))
        worst_task = max(tasks, key=lambda t: entry["auc_delta_vs_oracle"][t])
        out.append(GateResult("auc_delta_vs_oracle", f"{subject} {worst_task}",
                              entry["auc_delta_vs_oracle"][worst_task], gates.auc_limit(precision)))
        low_task = min(tasks, key=lambda t: entry["ranking"][t]["topk_overlap"])
        out.append(GateResult(f"top{gates.topk}_overlap", f"{subject} {low_task}",
                              entry["ranking"][low_task]["topk_overlap"], gates.topk_overlap, higher_is_better=True))
        if is_quantized(precision):  # int8 is judged by the rankings a user sees (docs/tolerances.md)
            low_tau = min(tasks, key=lambda t: entry["ranking"][t]["kendall_tau"])
            out.append(GateResult("kendall_tau", f"{subject} {low_tau}", entry["ranking"][low_tau]["kendall_tau"],
                                  gates.kendall_tau_int8, higher_is_better=True))
    if "split_vs_full" in entry:
        out.append(GateResult("split_vs_full_max_abs", subject, entry["split_vs_full"]["max_abs"],
                              gates.split_full_limit(precision, torch_error)))
    if trained is not None:
        for task in tasks:
            if task in trained:
                delta = abs(entry["metrics"][task]["auc"] - trained[task]["auc"])
                out.append(GateResult("auc_delta_vs_metrics_json", f"{subject} {task}", delta,
                                      gates.auc_limit(precision),
                                      detail=f"trained AUC {trained[task]['auc']:.6f}"))
    return out


__all__ = ["DATA_CHOICES", "Outputs", "ParityReport", "RUNTIMES", "load_batches", "parse_runtimes", "validate_bundle"]
