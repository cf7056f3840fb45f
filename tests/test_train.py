"""Training: the masked loss, a smoke run whose loss falls, and early stopping keeping the best
weights. Tiny configs so the file runs in seconds on 2 cores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from astro_trt.config import ASTROConfig, preset
from astro_trt.errors import AstroError
from astro_trt.model import movielens
from astro_trt.model.astro import ASTRO
from astro_trt.model.metrics import evaluate, mean_auc
from astro_trt.model.requests import batches
from astro_trt.model.synthetic import synthetic_batch
from astro_trt.model.train import TrainOptions, masked_bce, predictor, train_epoch, train_model


def tiny(num_items: int = 60) -> ASTROConfig:
    return preset("ml100k").replace(
        name="tiny", num_items=num_items, d_model=16, num_heads=2, num_layers=1, max_len=6, ffn_dim=32, dropout=0.0
    )


def test_masked_bce_ignores_padded_candidates():
    logits = torch.tensor([[[2.0, -1.0], [5.0, 5.0]]])
    labels = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[True, False]])
    expected = (torch.nn.functional.softplus(torch.tensor(-2.0)) + torch.nn.functional.softplus(torch.tensor(-1.0))) / 2
    assert masked_bce(logits, labels, mask).item() == pytest.approx(expected.item(), rel=1e-6)
    labels[0, 1] = 1.0  # a padded slot's label must not matter
    assert masked_bce(logits, labels, mask).item() == pytest.approx(expected.item(), rel=1e-6)


def test_smoke_training_loss_decreases():
    torch.manual_seed(0)
    cfg = tiny()
    model = ASTRO(cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = [synthetic_batch(cfg, 32, 8, seed=s) for s in range(4)]
    with torch.no_grad():
        model.eval()
        before = np.mean([masked_bce(model(b.history, b.cand_items), b.labels, b.cand_mask).item() for b in data])
    for _ in range(6):
        train_epoch(model, optimizer, data)
    with torch.no_grad():
        model.eval()
        after = np.mean([masked_bce(model(b.history, b.cand_items), b.labels, b.cand_mask).item() for b in data])
    # Labels are a function of the item: 24 steps must fit them well below the start (~0.69).
    assert after < 0.8 * before, (before, after)


def test_train_model_keeps_best_weights_on_ml100k_subset():
    data = movielens.load_ml100k()
    keep = np.isin(data.users, np.arange(1, 41))
    subset = movielens.Interactions(data.users[keep], data.items[keep], data.ratings[keep], data.times[keep], "sub")
    cfg = tiny(num_items=1682)
    spec = movielens.SplitSpec(candidates=16)
    train = movielens.build_requests(subset, cfg, "train", spec)
    valid = movielens.build_requests(subset, cfg, "valid", spec)
    logs: list[str] = []
    result = train_model(cfg, train, valid, TrainOptions(epochs=3, batch_size=32, lr=3e-3, seed=1),
                         progress=False, log=logs.append)
    assert len(result.history) == 3 and len(logs) == 3
    best = max(result.history, key=lambda h: h["valid_mean_auc"])
    assert result.best_epoch == best["epoch"]
    again = evaluate(predictor(result.model), batches(valid, 5, num_candidates=16), cfg.task_names)
    assert mean_auc(again) == pytest.approx(best["valid_mean_auc"], abs=1e-9)  # the best weights came back
    assert not result.model.training


def test_bad_options_are_refused():
    with pytest.raises(AstroError, match="--epochs must be an integer in"):
        TrainOptions(epochs=0).validate()
