"""What the serving tests share: a tiny fp32 bundle, requests for it, and the in-process ONNX
Runtime runner (runtime/onnxruntime.py) as the reference the served logits are compared with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from validate_bundle_fixture import make_bundle, random_checkpoint

from astro_trt.contract import GRAPHS, HISTORY_INPUTS
from astro_trt.model.astro import History
from astro_trt.model.synthetic import synthetic_batch


def tiny_bundle(root: Path) -> Path:
    return make_bundle(root / "bundle", random_checkpoint(root / "ckpt", seed=3), precisions=("fp32",))


def request(cfg, *, users: int = 1, candidates: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """Contract name -> int64 array for ``users`` users and ``candidates`` real candidates each."""
    history = synthetic_batch(cfg, users, 1, seed=seed).history
    arrays = {n: t.numpy().astype(np.int64) for n, t in zip(HISTORY_INPUTS, history.astuple(), strict=True)}
    rng = np.random.default_rng(seed + 100)
    arrays["cand_items"] = rng.integers(1, cfg.num_items + 1, size=(users, candidates), dtype=np.int64)
    return arrays


def reference_logits(bundle, arrays: dict[str, np.ndarray]) -> np.ndarray:
    from astro_trt.runtime.onnxruntime import OrtRunner

    runner = OrtRunner({g: bundle.onnx_path(g, "fp32") for g in GRAPHS}, bundle.config, "fp32",
                       item_table=bundle.item_table())
    history = History(*(torch.from_numpy(arrays[n]) for n in HISTORY_INPUTS))
    cand = torch.from_numpy(arrays["cand_items"])
    return runner.score(runner.encode(history), history, cand)
