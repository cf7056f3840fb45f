"""The GPU-free parts of bench-kernels: FLOP/byte accounting, peak lookup, the table, the CLI's refusal."""

from __future__ import annotations

import pytest
import torch

from astro_trt.cli import main
from astro_trt.validate.kernel_bench import (
    Case,
    cases,
    cost,
    format_predicted,
    format_table,
    make_result,
    peak_for,
    predict,
    predicted_kernels,
    predicted_split,
    split_cost,
)


def test_cost_counts_pairs_and_bytes_by_hand():
    # climber: Nb=4, H=4, L=50, dh=32; B=2. Causal pairs 50*51/2 = 1275; 4*dh FLOPs per pair.
    msa = Case("climber", "msa", batch=2, blocks=4, heads=4, hist=50, head_dim=32)
    flops, moved = cost(msa, "fp16")
    assert flops == 4 * 32 * 1275 * 32
    assert moved == 4 * 32 * 50 * 32 * 2 + 2 * 4 * 50 * 8  # q,k,v,out in fp16 + int64 times
    cand = Case("climber", "candidate", batch=2, blocks=4, heads=4, hist=50, head_dim=32, cands=64)
    flops, moved = cost(cand, "bf16")
    assert flops == 4 * 32 * 64 * 51 * 32
    assert moved == (4 * 64 + 2 * 50) * 32 * 32 * 2 + 2 * 4 * 50 * 8
    # The history is read once per user: doubling M adds only the candidates' own traffic.
    assert cost(Case(**{**cand.__dict__, "cands": 128}), "bf16")[1] - moved == 4 * 64 * 32 * 32 * 2


def test_cases_cover_every_config_and_m():
    got = cases(["climber", "climber-large"], [64, 4096], batch=8)
    assert [(c.config, c.op, c.cands) for c in got] == [
        ("climber", "msa", 0), ("climber", "candidate", 64), ("climber", "candidate", 4096),
        ("climber-large", "msa", 0), ("climber-large", "candidate", 64), ("climber-large", "candidate", 4096)]
    large = got[3]
    assert (large.blocks, large.heads, large.hist, large.head_dim) == (4, 8, 200, 32)


def test_peaks_and_derived_rates():
    assert peak_for("NVIDIA H100 80GB HBM3") == (989e12, 3.35e12)
    assert peak_for("NVIDIA H100 PCIe") == (756e12, 2.0e12)
    assert peak_for("NVIDIA H200") == (989e12, 4.8e12)
    assert peak_for("NVIDIA GeForce RTX 4090", 1.0e12) == (None, 1.0e12)
    case = Case("climber", "msa", batch=2, blocks=4, heads=4, hist=50, head_dim=32)
    flops, moved = cost(case, "fp16")
    r = make_result(case, "triton", 0.5, "fp16", (989e12, 3.35e12))
    assert r.tflops == pytest.approx(flops / 0.5e-3 / 1e12)
    assert r.gbps == pytest.approx(moved / 0.5e-3 / 1e9)
    assert r.flop_frac == pytest.approx(r.tflops * 1e12 / 989e12)
    assert r.bw_frac == pytest.approx(r.gbps * 1e9 / 3.35e12)
    table = format_table([r, make_result(case, "sdpa-dense-mask", None, "fp16", (None, None), note="skipped")])
    lines = table.splitlines()
    assert lines[0].split()[:5] == ["config", "op", "M", "impl", "ms"]
    assert "0.5000" in lines[1] and f"{r.tflops:.2f}" in lines[1] and f"{100 * r.bw_frac:.1f}" in lines[1]
    assert lines[2].split()[3:5] == ["sdpa-dense-mask", "-"] and lines[2].endswith("skipped")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where no GPU is visible")
def test_cli_without_gpu_says_a_gpu_is_needed(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench-kernels", "--config", "climber", "--candidates", "64"])
    assert exc.value.code == 2
    assert "needs an NVIDIA GPU" in capsys.readouterr().err


def test_predictions_take_the_slower_of_bandwidth_and_compute_by_hand():
    # climber-large candidate attention, M=4096, B=8, fp16: 98 FLOP/byte, below the H100's ridge
    # (989e12 / 3.35e12 = 295), so HBM bounds it on both GPUs.
    case = Case("climber-large", "candidate", batch=8, blocks=4, heads=8, hist=200, head_dim=32, cands=4096)
    flops, moved = cost(case, "fp16")
    [row] = predicted_kernels([case], "fp16")
    h100, h200 = row.predictions
    assert (h100.device, h100.bound, h200.bound) == ("H100", "memory", "memory")
    assert h100.seconds == pytest.approx(moved / 3.35e12) and h200.seconds == pytest.approx(moved / 4.8e12)
    assert h100.goal_seconds == pytest.approx(h100.seconds / 0.90)
    # Compute-bound: the same FLOPs with almost no bytes; the fp32 kernels get the CUDA-core peak.
    assert predict(1e12, 1.0, "H200", "fp16").seconds == pytest.approx(1e12 / 989e12)
    assert predict(1e12, 1.0, "H200", "fp32").bound == "compute"
    assert predict(1e12, 1.0, "H200", "fp32").goal_seconds == pytest.approx(1e12 / 67e12 / 0.60)
    assert row.measured_ms is None and "measured us" in format_predicted([row]).splitlines()[0]


def test_split_cost_by_hand_and_one_encoder_row_per_preset():
    from astro_trt.config import preset

    cfg = preset("ml100k")  # d 64, ffn 128, Nb 3, L 50, 2 layers, T 2
    got = split_cost(cfg, users=1, candidates=10, dtype="fp32")
    per_token = 3 * 64 * 64 + 2 * 64 * 128
    assert got["encoder"][0] == 6 * (2 * 50 * per_token + 4 * 64 * 50 * 51 / 2)
    kv = 6 * 2 * 50 * 64 * 4
    assert got["encoder"][1] == 6 * per_token * 4 + 3 * 50 * 64 * 4 + kv
    rows = predicted_split(["ml100k", "climber"], [64, 1024], users=8, dtype="fp16")
    assert [(r.config, r.what, r.cands) for r in rows] == [
        ("ml100k", "encoder", 0), ("ml100k", "scorer", 64), ("ml100k", "scorer", 1024),
        ("climber", "encoder", 0), ("climber", "scorer", 64), ("climber", "scorer", 1024)]
