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
from astro_trt.runtime.torch_runner import TorchRunner
from astro_trt.validate.bench import Latency, parse_candidates, run_bench, time_interleaved, write_bench_reports

TINY = ASTROConfig(name="tiny", num_items=50, num_behaviors=4, num_scenarios=2, d_model=16, num_heads=2,
                   num_layers=2, num_blocks=2, max_len=8, num_tasks=2, ffn_dim=32)


def test_latency_percentiles():
    lat = Latency.of([0.001 * i for i in range(1, 101)])
    assert lat.samples == 100
    assert lat.p50 == pytest.approx(50.5)
    assert lat.p99 == pytest.approx(np.percentile(np.arange(1, 101), 99))
    assert lat.mean == pytest.approx(50.5)


def test_time_interleaved_counts_calls_and_excludes_warmup():
    calls = {"naive": 0, "split": 0, "peer": 0}
    seconds = time_interleaved({name: (lambda n=name: calls.__setitem__(n, calls[n] + 1)) for name in calls},
                               warmup=2, repetitions=3)
    assert calls == {"naive": 5, "split": 5, "peer": 5}
    assert list(seconds) == ["naive", "split", "peer"] and all(len(s) == 3 for s in seconds.values())
    with pytest.raises(DataError):
        time_interleaved({"a": lambda: None}, warmup=0, repetitions=0)


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
    # Which heading depends on the timings (small configs can beat the arithmetic); one of them is there.
    text = paths["md"].read_text()
    assert "Why the measured gain is below the arithmetic" in text or "Measured gain against the arithmetic" in text
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_bench_users_peers_and_sampled_naive(tmp_path):
    """Two users per request, a PyTorch peer and a naive path capped at 6 pairs per call: the
    naive path runs 3 candidates per user and its latency is scaled by M / 3."""
    torch.manual_seed(0)
    model = ASTRO(TINY).eval()
    calls = []

    class Counting(TorchRunner):
        def full(self, history, cand_items):
            calls.append(tuple(cand_items.shape))
            return super().full(history, cand_items)

    result = run_bench(Counting(model), TINY, [2, 12], source="random tiny", users=[2],
                       peers={"torch eager": TorchRunner(model)}, naive_pairs=6, warmup=0, repetitions=2)
    small, large = result.points
    assert (small.users, small.candidates, small.naive_sampled) == (2, 2, None)
    assert (large.users, large.candidates, large.naive_sampled) == (2, 12, 3)
    assert calls == [(2, 2)] * 2 + [(2, 3)] * 2
    assert large.scored == 24 and large.split_per_second == pytest.approx(24 / (large.split.p50 / 1e3))
    assert set(large.peers) == {"torch eager"}
    assert large.speedup_over("torch eager") == pytest.approx(large.peers["torch eager"].p50 / large.split.p50)
    assert result.machine["logical_cores"] >= 1 and result.machine["versions"]["torch"] == torch.__version__
    paths = write_bench_reports(result, tmp_path)
    text = paths["md"].read_text()
    assert "torch eager split p50 ms" in text and "naive timed on the first 3 (U=2, M=12)" in text
    assert "Machine:" in text
    data = json.loads(paths["json"].read_text())
    assert data["points"][1]["naive_sampled_candidates"] == 3 and "torch eager" in data["points"][1]["peers"]


def test_naive_pairs_limit_shrinks_with_sequence_length():
    from astro_trt.config import preset
    from astro_trt.validate.bench import naive_pairs_limit

    # climber (L = 50) fits 1024 pairs in one call; climber-large (L = 200, H = 8) only tens.
    assert naive_pairs_limit(preset("climber")) >= 1024
    assert 10 <= naive_pairs_limit(preset("climber-large")) < 200
    assert naive_pairs_limit(preset("climber-large"), budget_bytes=1) == 1


def test_operator_profile_of_an_exported_scorer(tmp_path):
    """--profile's breakdown on real ONNX Runtime profiles of a tiny export: every graph reports
    its nodes, and the per-type times add up to the total."""
    from astro_trt.exporter.export import export_onnx
    from astro_trt.runtime.torch_runner import model_item_table
    from astro_trt.validate.bench import profile_ort

    torch.manual_seed(0)
    model = ASTRO(TINY).eval()
    result = export_onnx(model, tmp_path, precision="fp32", attention="plugin")
    profile = profile_ort(result.paths, TINY, "fp32", [4], threads=1, runs=2,
                          item_table=model_item_table(model))
    graphs = profile["M=4"]
    assert set(graphs) == {"user_encoder", "item_scorer", "full_model"}
    for prof in graphs.values():
        assert prof["nodes"] > 10 and prof["total_us"] > 0
        assert sum(us for _, us in prof["ops"]) == pytest.approx(prof["total_us"])
        assert "MatMul" in dict(prof["ops"])


def test_gain_with_the_fusion_head_is_the_lower_ceiling():
    """The fusion head costs both paths the same per candidate, so counting it lowers the ratio;
    with 12 layers (climber-large) the head matters far less than with 2 (climber)."""
    from astro_trt.config import preset
    from astro_trt.validate.bench import BenchResult

    small = BenchResult(preset("climber"), "ort", "fp32", "x", 0, 1, 1)
    large = BenchResult(preset("climber-large"), "ort", "fp32", "x", 0, 1, 1)
    for m in (64, 256, 1024):
        assert 1 < small.predicted_gain(m, head=True) < small.predicted_gain(m)
        share_large = large.predicted_gain(m, head=True) / large.predicted_gain(m)
        assert share_large > small.predicted_gain(m, head=True) / small.predicted_gain(m)
    assert small.predicted_gain(256, head=True) < small.predicted_gain(1024, head=True) < preset("climber").max_len + 1


def test_bench_cli_on_a_tiny_bundle(tmp_path):
    """`astro-trt bench` end to end on an exported bundle: users, the PyTorch peer (the bundle's
    own checkpoint), the per-operator profile and the machine header all reach the report."""
    from conftest import cli_status as run
    from conftest import small_config

    from astro_trt.model.checkpoint import save_checkpoint

    cfg = small_config()
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "ckpt", ASTRO(cfg), cfg)

    assert run(["export", str(ckpt), "--out",
                str(tmp_path / "bundle"), "--no-engines", "--precision", "fp32"]) == 0
    assert run(["bench", str(tmp_path / "bundle"), "--candidates", "3", "--users", "1,2", "--repetitions", "1",
                "--warmup", "0", "--profile", "--out", str(tmp_path / "reports")]) == 0
    data = json.loads((tmp_path / "reports" / "bench.json").read_text())
    assert [(p["users"], p["candidates"]) for p in data["points"]] == [(1, 3), (2, 3)]
    assert all("torch eager" in p["peers"] for p in data["points"])
    assert data["threads"] == 1 and data["machine"]["threads"] == 1
    assert set(data["profile"]["M=3"]) == {"user_encoder", "item_scorer", "full_model"}
    assert "Where the time goes" in (tmp_path / "reports" / "bench.md").read_text()
    # More users per request than the bundle's profile serves: refused before anything is timed.
    assert run(["bench", str(tmp_path / "bundle"), "--users", "9", "--out", str(tmp_path / "refused")]) == 2
    assert not (tmp_path / "refused").exists()
