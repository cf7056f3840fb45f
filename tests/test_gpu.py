"""Checks only a GPU can run: the Triton kernels compiled for CUDA, and the TensorRT engines of a
bundle through runtime/tensorrt.py. Elsewhere they skip with the reason. On the device machine:
``pytest -m gpu`` (TensorRT-RTX travels there packed by ../shared/device/pack-trt-rtx.sh)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA (none visible)"),
]

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ml100k"

# Runs in a fresh interpreter: test_kernels.py sets TRITON_INTERPRET=1 for the whole pytest process,
# and Triton reads it when a kernel is decorated, so in-process the kernels would stay interpreted.
KERNEL_CHECK = textwrap.dedent(
    """
    import torch
    from astro_trt.plugins.buckets import bucket_thresholds
    from astro_trt.plugins import reference
    from astro_trt.plugins.kernels import ops

    EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
    gen = torch.Generator(device="cuda").manual_seed(0)
    dev = "cuda"
    thr = torch.tensor(bucket_thresholds(32, 2**26), dtype=torch.int64, device=dev)

    def check(out, ref, v, dtype, what):
        assert torch.isfinite(out.float()).all(), what
        err = (out.float() - ref.float()).abs()
        if dtype == torch.float32:
            # the kernels multiply fp32 in IEEE mode (no TF32): a few ulps of O(1) values
            bound = 1e-5 + 1e-5 * ref.float().abs()
        else:
            # rounding of both outputs and of P before P @ V (see test_kernels.py), doubled for the
            # longer accumulations (up to 200 keys) in another order than the reference's
            bound = 2 * EPS[dtype] * (ref.float().abs() + v.float().abs().max())
        assert (err <= bound).all(), f"{what}: max error {err.max().item():.3g}"

    for (b, nb, h, seq, dh, m) in [(2, 4, 4, 50, 32, 64), (2, 4, 8, 200, 32, 1), (1, 4, 8, 200, 32, 1024)]:
        lengths = torch.randint(0, seq + 1, (b, nb), generator=gen, device=dev)
        lengths[0, 0], lengths[-1, -1] = 0, seq
        times = torch.sort(torch.randint(0, 2**27, (b, nb, seq), generator=gen, device=dev), -1).values
        req = times[:, :, -1].amax(-1) + 60
        pos_bias = torch.randn(nb, h, seq + 1, generator=gen, device=dev)
        time_bias = torch.randn(nb, h, 32, generator=gen, device=dev)
        inv_tau = torch.rand(b, nb, h, generator=gen, device=dev) + 0.2
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            q, k, v = (torch.randn(b, nb, h, seq, dh, generator=gen, device=dev).to(dtype) for _ in range(3))
            args = (q, k, v, lengths, times, pos_bias, time_bias, thr, inv_tau)
            check(ops.multi_scale_self_attention(*args), reference.multi_scale_self_attention(*args), v, dtype,
                  f"MSA {dtype} S={seq}")
            cq, ck, cv = (torch.randn(b, nb, h, m, dh, generator=gen, device=dev).to(dtype) for _ in range(3))
            cargs = (cq, ck, cv, k, v, lengths, times, req, pos_bias, time_bias, thr, inv_tau)
            check(ops.candidate_attention(*cargs), reference.candidate_attention(*cargs),
                  torch.cat([v, cv], dim=-2), dtype, f"CandidateAttention {dtype} L={seq} M={m}")
    print("kernels match the reference on", torch.cuda.get_device_name())
    """
)


def test_triton_kernels_on_cuda_match_the_reference():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", KERNEL_CHECK], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from astro_trt.engines.backend import resolve_backend

    try:
        resolve_backend("auto")
    except Exception as exc:  # the back end is what this module tests; without one there is nothing to run
        pytest.skip(f"no TensorRT back end importable here ({exc})")
    out = tmp_path_factory.mktemp("gpu") / "bundle"
    proc = subprocess.run([sys.executable, "-m", "astro_trt.cli", "export", str(EXAMPLE), "--out", str(out),
                           "--item-table", "fp32,int8"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_engines_pass_the_parity_gates(bundle):
    from astro_trt.validate.parity import validate_bundle

    report = validate_bundle(bundle, data="synthetic", runtimes=("torch", "trt"))
    assert not report.skipped, report.skipped  # the trt runner must have run, not been skipped
    assert report.passed, report.summary()


def test_one_encoded_user_serves_many_candidate_batches(bundle):
    from astro_trt.engines.bundle import load_bundle
    from astro_trt.model.synthetic import synthetic_batch
    from astro_trt.runtime.tensorrt import TrtRunner
    from astro_trt.tolerances import FP32_MAX_ABS

    loaded = load_bundle(bundle)
    model = loaded.checkpoint().model
    batch = synthetic_batch(loaded.config, batch=1, candidates=512, seed=3)
    runner = TrtRunner(loaded, "fp32")
    state = runner.encode(batch.history)
    assert state.kv_cache.is_cuda and all(t.is_cuda for t in state.feeds.values())  # it stays on the device
    cache_before = state.kv_cache.clone()
    whole = torch.from_numpy(runner.score(state, batch.history, batch.cand_items))
    chunks = torch.cat([torch.from_numpy(runner.score(state, batch.history, c))
                        for c in batch.cand_items.split(128, dim=1)], dim=1)
    torch.testing.assert_close(state.kv_cache, cache_before, rtol=0, atol=0)  # scoring never writes the cache
    with torch.no_grad():
        expected = model.score(model.encode_user(batch.history), batch.history, batch.cand_items)
        baseline = torch.from_numpy(runner.full(batch.history, batch.cand_items))
    for got in (whole, chunks, baseline):
        assert (got - expected).abs().max().item() <= FP32_MAX_ABS


@pytest.mark.parametrize("storage", ["fp32", "int8"])
def test_item_rows_are_gathered_on_the_device_as_the_host_looks_them_up(bundle, storage):
    """The engines take item rows (the table is in no engine): the session keeps the table on the
    device in its stored form and gathers a request's rows there, in the request's one crossing.
    The rows must be the host lookup's (the mapped file), bit for bit for fp32 and to float32
    rounding of stored * scale for int8."""
    from astro_trt.contract import CAND_ITEM_EMB, HIST_ITEM_EMB
    from astro_trt.engines.bundle import load_bundle
    from astro_trt.model.synthetic import synthetic_batch
    from astro_trt.runtime.gate import gate
    from astro_trt.runtime.tensorrt import TrtRunner

    loaded = load_bundle(bundle)
    runner = TrtRunner(loaded, "fp32", item_table=storage)
    assert runner.session.item_rows.values.is_cuda and runner.session.item_rows.storage.name == storage
    batch = synthetic_batch(loaded.config, batch=3, candidates=40, seed=5)
    arrays = gate(loaded.config, batch.history, batch.cand_items)
    on_device = runner.put(arrays)
    host = loaded.item_table(storage)
    for ids, rows in (("hist_items", HIST_ITEM_EMB), ("cand_items", CAND_ITEM_EMB)):
        assert on_device[rows].is_cuda
        expected = torch.from_numpy(host.lookup(arrays[ids]))
        torch.testing.assert_close(on_device[rows].cpu(), expected, rtol=1e-7, atol=0)
