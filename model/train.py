"""CPU training of ASTRO: Adam on masked BCE-with-logits, early stopping on mean valid AUC.

The model is trained through ``forward`` (the split path: encode_user then score), which is
exact and M times cheaper than the full path. Seeds fix the initialisation, dropout and the
batch order, so a run repeats bit for bit on the same machine and thread count.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from astro_trt.artifacts import check_destination, check_replaceable
from astro_trt.config import ASTROConfig
from astro_trt.errors import AstroError
from astro_trt.model import movielens
from astro_trt.model.astro import ASTRO
from astro_trt.model.checkpoint import save_checkpoint
from astro_trt.model.metrics import ItemAverageBaseline, evaluate, mean_auc
from astro_trt.model.requests import Request, RequestBatch, batches
from astro_trt.model.resources import check_fits

# The machines this runs on (and CI) have 2 cores; more threads only contend.
NUM_THREADS = 2
# Requests per evaluation batch; metrics pool every batch, so this only bounds memory.
EVAL_BATCH = 256
# Bounds of the training options: far above any useful run, below what would run for days.
MAX_EPOCHS = 10_000
MAX_BATCH = 1_000_000
MAX_LR = 1.0
MAX_CANDIDATES = 100_000


@dataclass(frozen=True)
class TrainOptions:
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    patience: int = 3  # epochs without a better valid AUC before stopping

    def validate(self) -> None:
        for flag, value, high in (("--epochs", self.epochs, MAX_EPOCHS), ("--batch-size", self.batch_size, MAX_BATCH),
                                  ("--patience", self.patience, MAX_EPOCHS)):
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= high:
                raise AstroError(f"{flag} must be an integer in [1, {high}], got {value!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise AstroError(f"--seed must be an integer in [0, 2^32), got {self.seed!r}")
        # Adam steps are about lr in size; beyond MAX_LR the weights leave any useful range at once.
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and 0 < self.lr <= MAX_LR):
            raise AstroError(f"--lr must be a finite number in (0, {MAX_LR}], got {self.lr!r}")
        if not (isinstance(self.weight_decay, int | float) and math.isfinite(self.weight_decay)
                and self.weight_decay >= 0):
            raise AstroError(f"weight decay must be a finite number >= 0, got {self.weight_decay!r}")


@dataclass
class TrainResult:
    model: ASTRO  # best weights (by mean valid AUC), in eval mode
    best_epoch: int
    valid_best: dict[str, dict[str, float]]
    history: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0


def masked_bce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean BCE-with-logits over tasks and valid candidates; padded candidate slots count 0."""
    per = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")  # [B, M, T]
    weight = mask.to(per.dtype)[..., None]
    return (per * weight).sum() / (weight.sum() * per.shape[-1]).clamp_min(1.0)


def predictor(model: ASTRO) -> Callable[[RequestBatch], np.ndarray]:
    """The PyTorch predictor for ``evaluate``: eval mode, no grad, logits [B, M, T] as numpy."""

    def predict(batch: RequestBatch) -> np.ndarray:
        model.eval()
        with torch.no_grad():
            return model(batch.history, batch.cand_items).numpy()

    return predict


def train_epoch(
    model: ASTRO,
    optimizer: torch.optim.Optimizer,
    data: Iterable[RequestBatch],
    on_step: Callable[[float], None] | None = None,
) -> float:
    """One pass over ``data``; returns the mean loss over its steps."""
    model.train()
    losses = []
    for batch in data:
        optimizer.zero_grad(set_to_none=True)
        loss = masked_bce(model(batch.history, batch.cand_items), batch.labels, batch.cand_mask)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if on_step:
            on_step(losses[-1])
    return float(np.mean(losses)) if losses else float("nan")


def train_model(
    cfg: ASTROConfig,
    train: Sequence[Request],
    valid: Sequence[Request],
    options: TrainOptions = TrainOptions(),
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train from scratch; after every epoch score the valid split and keep the best weights."""
    options.validate()
    if not train or not valid:
        raise AstroError(f"training needs train and valid requests, got {len(train)} and {len(valid)}")
    torch.set_num_threads(NUM_THREADS)
    torch.manual_seed(options.seed)
    model = ASTRO(cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    m = max(len(r.cand_items) for r in (*train, *valid))
    steps = -(-len(train) // options.batch_size)
    names = cfg.task_names or None

    best_state, best_epoch, best_valid, best_score, stale = None, 0, {}, -np.inf, 0
    history: list[dict[str, float]] = []
    started = time.perf_counter()
    with _progress(progress) as bar:
        task = bar.add_task("training", total=steps * options.epochs) if bar else None
        for epoch in range(1, options.epochs + 1):
            data = batches(train, options.batch_size, num_candidates=m, shuffle_seed=options.seed * 100_003 + epoch)
            loss = train_epoch(model, optimizer, data, (lambda _: bar.advance(task)) if bar else None)
            if not math.isfinite(loss):
                raise AstroError(f"training diverged: the mean loss of epoch {epoch} is {loss}; lower --lr "
                                 f"(now {options.lr}) and train again (no checkpoint was written)")
            valid_result = evaluate(predictor(model), batches(valid, EVAL_BATCH, num_candidates=m), names)
            score = mean_auc(valid_result)
            history.append({"epoch": epoch, "train_loss": loss, "valid_mean_auc": score})
            log(f"epoch {epoch}: train loss {loss:.4f}, valid mean AUC {score:.4f}")
            if score > best_score:
                best_state, best_epoch, best_valid, best_score, stale = (
                    copy.deepcopy(model.state_dict()),
                    epoch,
                    valid_result,
                    score,
                    0,
                )
            else:
                stale += 1
                if stale >= options.patience:
                    log(f"early stop: no better valid AUC for {options.patience} epochs; best epoch {best_epoch}")
                    break
    model.load_state_dict(best_state)
    model.eval()
    return TrainResult(model, best_epoch, best_valid, history, time.perf_counter() - started)


def _progress(enabled: bool):
    if not enabled:
        return contextlib.nullcontext()

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True
    )


def train_ml100k(
    cfg: ASTROConfig,
    out_dir: str | Path,
    options: TrainOptions = TrainOptions(),
    *,
    candidates: int = 10,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Train on ml-100k, evaluate the best model and the item-average baseline on test, and
    write the checkpoint (config, weights, metrics.json, data.json). Returns the metrics."""
    # Everything that can be refused is refused before the data is read.
    options.validate()
    spec = movielens.SplitSpec(candidates=candidates)
    if not isinstance(candidates, int) or candidates > MAX_CANDIDATES:
        raise AstroError(f"--candidates must be an integer in [1, {MAX_CANDIDATES}], got {candidates!r}")
    spec.validate()
    check_destination(out_dir)
    check_replaceable(out_dir)
    check_fits(cfg, users=options.batch_size, candidates=candidates, purpose="training", full=False, training=True)
    interactions = movielens.load_ml100k(cache_dir)
    splits = {s: movielens.build_requests(interactions, cfg, s, spec) for s in movielens.SPLITS}
    log(", ".join(f"{s}: {len(r)} requests" for s, r in splits.items()))
    result = train_model(cfg, splits["train"], splits["valid"], options, progress=progress, log=log)

    names = cfg.task_names or None
    m = spec.candidates
    baseline = ItemAverageBaseline(splits["train"], cfg.num_items, cfg.num_tasks)

    def score(predict: Callable[[RequestBatch], np.ndarray], split: str) -> dict:
        return evaluate(predict, batches(splits[split], EVAL_BATCH, num_candidates=m), names)

    metrics = {
        "test": {"model": score(predictor(result.model), "test"), "baseline": score(baseline, "test")},
        "valid": {"model": result.valid_best, "baseline": score(baseline, "valid")},
        "valid_best": mean_auc(result.valid_best),
        "best_epoch": result.best_epoch,
        "epochs": len(result.history),
        "history": result.history,
        "train_seconds": round(result.train_seconds, 1),
        "options": asdict(options),
        "threads": NUM_THREADS,
        "baseline": "item average: smoothed per-item fraction of train candidates meeting the task",
    }
    counts = {s: len(r) for s, r in splits.items()}
    save_checkpoint(
        out_dir, result.model, cfg, metrics=metrics, extra={"data": movielens.fingerprint(interactions, spec, counts)}
    )
    for task, values in metrics["test"]["model"].items():
        base = metrics["test"]["baseline"][task]
        log(
            f"test {task}: AUC {values['auc']:.4f} (baseline {base['auc']:.4f}), "
            f"LogLoss {values['logloss']:.4f} (baseline {base['logloss']:.4f})"
        )
    return metrics


__all__ = ["TrainOptions", "TrainResult", "masked_bce", "predictor", "train_epoch", "train_ml100k", "train_model"]
