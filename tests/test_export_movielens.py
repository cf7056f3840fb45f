"""Parity of the exported graphs on real MovieLens-100k requests (ml100k preset, random weights
with random bias tables and temperatures until a trained checkpoint ships): fp32 graphs against
the fp32 PyTorch model, fp16 against twice PyTorch's own fp16 error, split == full in ORT."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_model

from astro_trt import contract
from astro_trt.config import preset
from astro_trt.errors import AstroError
from astro_trt.exporter.check import feeds, graph_errors, run_onnx
from astro_trt.exporter.export import export_onnx

FP32_TOL = 1e-5  # see tests/test_export.py


@pytest.fixture(scope="module")
def request_batch():
    from astro_trt.model.movielens import load_ml100k_requests
    from astro_trt.model.requests import collate

    try:
        requests = load_ml100k_requests(preset("ml100k"), "test")
    except AstroError as exc:
        pytest.skip(f"MovieLens-100k is not available here ({exc})")
    # Users with short and long histories, so that padding and empty blocks are in the batch.
    chosen = sorted(requests, key=lambda r: int(r.lengths.sum()))
    picks = [chosen[0], chosen[len(chosen) // 2], chosen[-1]]
    return collate(picks)


@pytest.fixture(scope="module")
def model():
    return random_model(preset("ml100k"), seed=7)


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("ml100k")
    variants = [("fp32", "plugin"), ("fp32", "native"), ("fp16", "native")]
    return {(p, a): export_onnx(model, root / f"{p}-{a}", precision=p, attention=a) for p, a in variants}


def test_batch_has_padding_and_an_empty_block(request_batch):
    lengths = request_batch.history.lengths
    assert (lengths == 0).any() and (lengths < preset("ml100k").max_len).any()


@pytest.mark.parametrize(("precision", "attention"), [("fp32", "plugin"), ("fp32", "native"), ("fp16", "native")])
def test_graphs_match_pytorch_on_movielens(model, exported, request_batch, precision, attention):
    errors = graph_errors(model, exported[precision, attention], request_batch.history, request_batch.cand_items)
    for name, (error, limit) in errors.items():
        assert error <= (FP32_TOL if precision == "fp32" else limit), (name, error, limit)


def test_split_equals_full_on_movielens(model, exported, request_batch):
    result = exported["fp32", "plugin"]
    h, cand, io = request_batch.history, request_batch.cand_items, result.io
    encoder_feeds = feeds(io[contract.USER_ENCODER], model, h, cand)
    kv = run_onnx(result.paths[contract.USER_ENCODER], encoder_feeds)[contract.KV_CACHE]
    scorer_feeds = feeds(io[contract.ITEM_SCORER], model, h, cand, torch.from_numpy(kv))
    split = run_onnx(result.paths[contract.ITEM_SCORER], scorer_feeds)["logits"]
    full = run_onnx(result.paths[contract.FULL_MODEL], feeds(io[contract.FULL_MODEL], model, h, cand))["logits"]
    np.testing.assert_allclose(split, full, rtol=0, atol=FP32_TOL)
