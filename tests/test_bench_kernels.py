"""The GPU-free parts of bench-kernels: FLOP/byte accounting, peak lookup, the table, the CLI's refusal."""

from __future__ import annotations

import pytest
import torch

from astro_trt.cli import main
from astro_trt.validate.kernel_bench import Case, cases, cost, format_table, make_result, peak_for


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
