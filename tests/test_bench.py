"""The bench harness: timing, statistics and reports, on a tiny model through the PyTorch
runner (fast); the ONNX Runtime path on a real export is covered at the end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from astro_trt.config import ASTROConfig
from astro_trt.errors import DataError
from astro_trt.model.astro import ASTRO
from astro_trt.validate.bench import Latency, parse_candidates, run_bench, time_alternating, write_bench_reports
from astro_trt.validate.runners import TorchRunner

TINY = ASTROConfig(name="tiny", num_items=50, num_behaviors=4, num_scenarios=2, d_model=16, num_heads=2,
                   num_layers=2, num_blocks=2, max_len=8, num_tasks=2, ffn_dim=32)


def test_latency_percentiles():
    lat = Latency.of([0.001 * i for i in range(1, 101)])
    assert lat.samples == 100
    assert lat.p50 == pytest.approx(50.5)
    assert lat.p99 == pytest.approx(np.percentile(np.arange(1, 101), 99))
    assert lat.mean == pytest.approx(50.5)


def test_time_alternating_counts_calls_and_excludes_warmup():
    calls = {"naive": 0, "split": 0}
    naive_s, split_s = time_alternating(lambda: calls.__setitem__("naive", calls["naive"] + 1),
                                        lambda: calls.__setitem__("split", calls["split"] + 1),
                                        warmup=2, repetitions=3)
    assert calls == {"naive": 5, "split": 5} and len(naive_s) == len(split_s) == 3
    with pytest.raises(DataError):
        time_alternating(lambda: None, lambda: None, warmup=0, repetitions=0)


def test_parse_candidates():
    assert parse_candidates("64, 256,1024") == [64, 256, 1024]
    for bad in ("", "a,b", "0,4"):
        with pytest.raises(DataError, match="--candidates"):
            parse_candidates(bad)


def test_bench_on_torch_writes_reports(tmp_path):
    torch.manual_seed(0)
    runner = TorchRunner(ASTRO(TINY).eval())
    result = run_bench(runner, TINY, [4, 32], source="random tiny", warmup=1, repetitions=3)
    assert [p.candidates for p in result.points] == [4, 32]
    for p in result.points:
        assert p.naive.samples == p.split.samples == 3
        assert p.split_per_second == pytest.approx(p.candidates / (p.split.p50 / 1e3))
        assert p.gain == pytest.approx(p.naive.p50 / p.split.p50)
    # L + 1 = 9 tokens per candidate in the naive path against 1 in the scorer: the arithmetic
    # predicts a gain between 1 and L + 1 that grows with M as the encoder amortises.
    assert 1 < result.predicted_gain(4) < result.predicted_gain(32) < TINY.max_len + 1 + 1
    paths = write_bench_reports(result, tmp_path / "reports")
    data = json.loads(paths["json"].read_text())
    assert data["points"][1]["candidates"] == 32 and data["runtime"] == "torch"
    assert "Why the measured gain" in paths["md"].read_text()
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
