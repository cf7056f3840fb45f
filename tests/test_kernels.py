"""The Triton kernels against the reference operators, on the CPU under TRITON_INTERPRET=1.

Shapes are tiny because the interpreter runs every program in numpy; small block sizes (16) make
even these shapes span several query and key tiles, so the online softmax, the causal loop bound
and the padding-skipping start are all exercised.
"""

from __future__ import annotations

import importlib
import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the kernels' first import (Triton reads it at @jit)

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from astro_trt.config import ASTROConfig  # noqa: E402
from astro_trt.errors import DataError  # noqa: E402
from astro_trt.model.astro import ASTRO, History  # noqa: E402
from astro_trt.plugins import reference  # noqa: E402
from astro_trt.plugins.buckets import bucket_thresholds  # noqa: E402
from astro_trt.plugins.kernels import candidate_attention as cand_mod  # noqa: E402
from astro_trt.plugins.kernels import common, ops  # noqa: E402
from astro_trt.plugins.kernels import multi_scale_self_attention as msa_mod  # noqa: E402

if not ops._is_interpreted(msa_mod.msa_fwd_kernel):
    # Another test module imported the kernels before TRITON_INTERPRET was set: decorate them again.
    for module in (common, msa_mod, cand_mod):
        importlib.reload(module)

NT = 8
TIME_MAX = 1000
THRESHOLDS = torch.tensor(bucket_thresholds(NT, TIME_MAX), dtype=torch.int64)
EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _lengths(batch: int, blocks: int, seq: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    if kind == "full":
        return torch.full((batch, blocks), seq, dtype=torch.int64)
    if kind == "empty":  # every block empty: all-padding queries and a candidate that sees only itself
        return torch.zeros((batch, blocks), dtype=torch.int64)
    lengths = torch.randint(0, seq + 1, (batch, blocks), generator=gen)
    lengths[0, 0], lengths[-1, -1] = 0, min(1, seq)  # always an empty block and a one-event block
    return lengths


def _tables(blocks: int, heads: int, positions: int, batch: int, gen: torch.Generator):
    pos_bias = torch.randn(blocks, heads, positions, generator=gen)
    time_bias = torch.randn(blocks, heads, NT, generator=gen)
    inv_tau = torch.rand(batch, blocks, heads, generator=gen) + 0.2
    return pos_bias, time_bias, inv_tau


def _times(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    # Up to 2x TIME_MAX apart, so differences land in every bucket including the last (clamped) one.
    return torch.sort(torch.randint(0, 2 * TIME_MAX, shape, generator=gen), dim=-1).values


def _assert_close(out: torch.Tensor, ref: torch.Tensor, v_scale: float, dtype: torch.dtype) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert torch.isfinite(out.float()).all()
    if dtype == torch.float32:
        # Same math in a different order (online softmax, exp2 with log2 e folded in): errors are a
        # few float32 ulps (1.2e-7 relative) of O(1) values; 1e-5 leaves margin, a wrong mask or
        # bias moves results by >1e-2.
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        return
    # Both results are rounded to the output dtype (<= eps/2 * |ref| each), and the kernel feeds
    # probabilities rounded to the input dtype into P @ V (<= eps/2 * max|v|): bound eps*(|ref| + max|v|).
    eps = EPS[dtype]
    err = (out.float() - ref.float()).abs()
    bound = eps * (ref.float().abs() + v_scale)
    assert (err <= bound).all(), f"max error {err.max():.3g} exceeds the rounding bound"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("seq", "dh", "lengths_kind", "block"),
    [(1, 8, "full", 64), (13, 8, "random", 16), (20, 16, "random", 16), (20, 8, "empty", 16), (17, 16, "full", 64)],
)
def test_multi_scale_self_attention_matches_reference(dtype, seq, dh, lengths_kind, block):
    gen = torch.Generator().manual_seed(seq * 100 + dh)
    batch, blocks, heads = 2, 2, 2
    q, k, v = (torch.randn(batch, blocks, heads, seq, dh, generator=gen).to(dtype) for _ in range(3))
    lengths = _lengths(batch, blocks, seq, lengths_kind, gen)
    times = _times((batch, blocks, seq), gen)
    pos_bias, time_bias, inv_tau = _tables(blocks, heads, seq, batch, gen)
    args = (q, k, v, lengths, times, pos_bias, time_bias, THRESHOLDS, inv_tau)

    out = ops.multi_scale_self_attention(*args, block_m=block, block_n=block)
    ref = reference.multi_scale_self_attention(*args)
    _assert_close(out, ref, v.float().abs().max().item(), dtype)
    padded = torch.arange(seq) < (seq - lengths)[..., None]  # [B, Nb, S] queries that see nothing
    assert (out.float().transpose(2, 3)[padded] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("cands", "hist", "dh", "lengths_kind", "block"),
    [(1, 13, 8, "random", 16), (3, 20, 16, "random", 16), (17, 20, 8, "full", 16), (3, 5, 16, "empty", 64)],
)
def test_candidate_attention_matches_reference(dtype, cands, hist, dh, lengths_kind, block):
    gen = torch.Generator().manual_seed(cands * 1000 + hist + dh)
    batch, blocks, heads = 2, 2, 2
    q, k, v = (torch.randn(batch, blocks, heads, cands, dh, generator=gen).to(dtype) for _ in range(3))
    k_cache, v_cache = (torch.randn(batch, blocks, heads, hist, dh, generator=gen).to(dtype) for _ in range(2))
    lengths = _lengths(batch, blocks, hist, lengths_kind, gen)
    hist_times = _times((batch, blocks, hist), gen)
    request_time = torch.randint(2 * TIME_MAX, 3 * TIME_MAX, (batch,), generator=gen)
    pos_bias, time_bias, inv_tau = _tables(blocks, heads, hist + 1, batch, gen)
    args = (q, k, v, k_cache, v_cache, lengths, hist_times, request_time, pos_bias, time_bias, THRESHOLDS, inv_tau)

    out = ops.candidate_attention(*args, block_m=block, block_n=block)
    ref = reference.candidate_attention(*args)
    v_scale = max(v.float().abs().max().item(), v_cache.float().abs().max().item())
    _assert_close(out, ref, v_scale, dtype)
    if lengths_kind == "empty":  # nothing to attend to but itself: the output is the candidate's own v
        torch.testing.assert_close(out, v, atol=0, rtol=0)


def test_kernels_accept_strided_views():
    """The model passes q/k/v as transposed views of [B, Nb, S, H, dh]; the kernels read strides."""
    gen = torch.Generator().manual_seed(7)
    batch, blocks, heads, seq, dh = 2, 2, 2, 9, 8
    q, k, v = (torch.randn(batch, blocks, seq, heads, dh, generator=gen).transpose(2, 3) for _ in range(3))
    lengths = torch.tensor([[9, 4], [2, 0]])
    times = _times((batch, blocks, seq), gen)
    pos_bias, time_bias, inv_tau = _tables(blocks, heads, seq + 1, batch, gen)
    time_bias = torch.randn(heads, blocks, NT, generator=gen).transpose(0, 1)  # a non-contiguous table too
    args = (q, k, v, lengths, times, pos_bias, time_bias, THRESHOLDS, inv_tau)
    assert not q.is_contiguous()
    _assert_close(ops.multi_scale_self_attention(*args), reference.multi_scale_self_attention(*args), 0, torch.float32)


def test_triton_ops_drive_the_model_like_the_reference():
    """TritonOps satisfy the model's AttentionOps: encoder, scorer and full model agree with ReferenceOps."""
    cfg = ASTROConfig(name="tiny", num_items=30, num_behaviors=4, num_scenarios=2, d_model=16, num_heads=2,
                      num_layers=2, num_blocks=2, max_len=6, num_tasks=2, ffn_dim=16,
                      num_pos_buckets=4, num_time_buckets=6, time_bucket_max=1000, dropout=0.0)
    torch.manual_seed(0)
    reference_model = ASTRO(cfg).eval()
    with torch.no_grad():  # non-zero tables so that the in-kernel bias actually matters
        reference_model.pos_table.normal_()
        reference_model.time_table.normal_()
    triton_model = ASTRO(cfg, ops=ops.TritonOps()).eval()
    triton_model.load_state_dict(reference_model.state_dict())
    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([[6, 3], [0, 1]])
    valid = torch.arange(6) >= (6 - lengths)[..., None]
    history = History(
        items=torch.randint(1, 31, (2, 2, 6), generator=gen) * valid,
        behaviors=torch.randint(1, 4, (2, 2, 6), generator=gen) * valid,
        times=_times((2, 2, 6), gen), lengths=lengths, scenario=torch.tensor([0, 1]),
        request_time=torch.tensor([2500, 2100]),
    )
    cands = torch.randint(1, 31, (2, 3), generator=gen)
    with torch.no_grad():
        cache = triton_model.encode_user(history)
        torch.testing.assert_close(cache, reference_model.encode_user(history), atol=1e-5, rtol=1e-5)
        expected = reference_model.score(cache, history, cands)
        torch.testing.assert_close(triton_model.score(cache, history, cands), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(triton_model.full(history, cands), expected, atol=1e-4, rtol=1e-4)


def test_bad_inputs_raise_clear_errors():
    q = torch.zeros(1, 1, 1, 4, 8)
    table = torch.zeros(1, 1, NT)
    args = [q, q, q, torch.ones(1, 1, dtype=torch.int64), torch.zeros(1, 1, 4, dtype=torch.int64),
            torch.zeros(1, 1, 5), table, THRESHOLDS, torch.ones(1, 1, 1)]
    with pytest.raises(DataError, match="'k' has shape"):
        ops.multi_scale_self_attention(q, torch.zeros(1, 1, 1, 5, 8), *args[2:])
    with pytest.raises(DataError, match="'pos_bias'"):
        ops.multi_scale_self_attention(*args[:5], torch.zeros(1, 1, 3), *args[6:])
    with pytest.raises(DataError, match="'lengths' has dtype"):
        ops.multi_scale_self_attention(*args[:3], torch.ones(1, 1), *args[4:])
    with pytest.raises(DataError, match="'time_thresholds'"):
        ops.multi_scale_self_attention(*args[:7], THRESHOLDS[:-1], *args[8:])
