"""The implementations bench-kernels times (GPU only): inputs and one closure per implementation.

Every history slot is valid (the accounting in kernel_bench.cost assumes it). SDPA gets its dense additive
mask built once, outside the timed region: its best case; the mask's size is reported so that the
caller can skip shapes where it would not fit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from astro_trt.lazy import lazy_import
from astro_trt.plugins import operators
from astro_trt.plugins.buckets import bucket_thresholds
from astro_trt.validate.kernel_cases import Case

# FlexAttention exists from torch 2.5 on (the project takes 2.4): named only when its case runs.
flex = lazy_import("torch.nn.attention.flex_attention")

NT, TIME_MAX = 32, 2**26


def make_inputs(case: Case, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    dev = "cuda"
    b, nb, h, L, dh = case.batch, case.blocks, case.heads, case.hist, case.head_dim
    s = L if case.op == "msa" else case.cands
    rnd = lambda *shape: torch.randn(*shape, device=dev, dtype=dtype)  # noqa: E731
    times = torch.sort(torch.randint(0, 2**30, (b, nb, L), device=dev), dim=-1).values
    x = dict(q=rnd(b, nb, h, s, dh), k=rnd(b, nb, h, s, dh), v=rnd(b, nb, h, s, dh),
             lengths=torch.full((b, nb), L, device=dev, dtype=torch.int64), times=times,
             request_time=times[:, 0, -1] + 1000,
             pos_bias=torch.randn(nb, h, L + 1, device=dev), time_bias=torch.randn(nb, h, NT, device=dev),
             time_thresholds=torch.tensor(bucket_thresholds(NT, TIME_MAX), device=dev, dtype=torch.int64),
             inv_tau=torch.rand(b, nb, h, device=dev) + 0.1)
    if case.op == "candidate":
        x["k_cache"], x["v_cache"] = rnd(b, nb, h, L, dh), rnd(b, nb, h, L, dh)
    return x


def _args(case: Case, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The operator's inputs in its order (plugins/operators.py)."""
    aliases = {"hist_times": "times"}  # a candidate's history times are the case's times
    return tuple(x[aliases.get(name, name)] for name in _operator(case).input_names)


def _operator(case: Case) -> operators.Operator:
    return operators.MSA if case.op == "msa" else operators.CANDIDATE


def _keys_and_bias(case: Case, x: dict[str, torch.Tensor]):
    """Dense-form inputs: keys/values [B*Nb, H, T, dh], q_pos/k_pos, q_time/k_time, visibility [.., S, T]."""
    L, dev = case.hist, x["q"].device
    if case.op == "msa":
        k, v, t_q, t_k = x["k"], x["v"], x["times"], x["times"]
        p_q = p_k = torch.arange(L, device=dev)
        visible = p_k[None, :] <= p_q[:, None]
    else:
        m = case.cands
        k, v = torch.cat([x["k_cache"], x["k"]], 3), torch.cat([x["v_cache"], x["v"]], 3)
        t_q = x["request_time"][:, None, None].expand(-1, case.blocks, m)
        t_k = torch.cat([x["times"], t_q], 2)
        p_q = torch.full((m,), L, device=dev)
        p_k = torch.cat([torch.arange(L, device=dev), p_q])
        own = torch.arange(m, device=dev)
        visible = torch.cat([torch.ones(m, L, dtype=torch.bool, device=dev), own[:, None] == own[None, :]], 1)
    return k, v, p_q, p_k, t_q, t_k, visible


def _sdpa(case: Case, x: dict[str, torch.Tensor]) -> tuple[Callable[[], object], int]:
    k, v, p_q, p_k, t_q, t_k, visible = _keys_and_bias(case, x)
    b, nb, h = case.batch, case.blocks, case.heads
    s, t = visible.shape
    mask_bytes = b * nb * h * s * t * x["q"].element_size()
    if mask_bytes > 64 * 2**30:  # not even attempted
        return (lambda: None), mask_bytes

    def build() -> tuple[torch.Tensor, ...]:
        itau = x["inv_tau"][..., None, None]
        dist = (p_q[:, None] - p_k[None, :]).abs()
        bucket = ((t_q[..., :, None] - t_k[..., None, :]).abs().unsqueeze(-1) >= x["time_thresholds"]).sum(-1)
        tb = x["time_bias"][None, :, :, None, :].expand(b, -1, -1, s, -1)
        tb = torch.gather(tb, -1, bucket[:, :, None].expand(-1, -1, h, -1, -1))
        bias = (x["pos_bias"][:, :, dist][None] + tb) * itau
        mask = bias.masked_fill(~visible, float("-inf")).to(x["q"].dtype)
        q = (x["q"].float() * itau).to(x["q"].dtype)
        return tuple(z.reshape(b * nb, h, *z.shape[3:]) for z in (q, k, v, mask))

    def run() -> torch.Tensor:
        q, kk, vv, mask = dense
        return torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=1.0)

    dense = build() if mask_bytes <= 4 * 2**30 else None
    return run, mask_bytes


def _flex(case: Case, x: dict[str, torch.Tensor]) -> Callable[[], object]:
    k, v, p_q, p_k, t_q, t_k, visible_dense = _keys_and_bias(case, x)
    b, nb, h, L = case.batch, case.blocks, case.heads, case.hist
    s, t = visible_dense.shape
    pos, tbias, thr = x["pos_bias"], x["time_bias"], x["time_thresholds"]
    itau = x["inv_tau"].reshape(b * nb, h)
    tq, tk = t_q.reshape(b * nb, s), t_k.reshape(b * nb, t)
    msa = case.op == "msa"

    def visible(bn, hh, qi, kj):
        return (kj <= qi) if msa else ((kj < L) | (kj == L + qi))

    def score_mod(score, bn, hh, qi, kj):
        n = bn % nb
        dist = (p_q[qi] - p_k[kj]).abs()
        dt = (tq[bn, qi] - tk[bn, kj]).abs()
        bucket = (dt >= thr[0]).to(torch.int64)
        for i in range(1, thr.shape[0]):
            bucket = bucket + (dt >= thr[i]).to(torch.int64)
        return (score + pos[n, hh, dist] + tbias[n, hh, bucket]) * itau[bn, hh]

    block_mask = flex.create_block_mask(visible, None, None, s, t, device="cuda")
    q, kk, vv = (z.reshape(b * nb, h, *z.shape[3:]) for z in (x["q"], k, v))
    compiled = torch.compile(flex.flex_attention)
    return lambda: compiled(q, kk, vv, score_mod=score_mod, block_mask=block_mask, scale=1.0)


def implementations(case: Case, x: dict[str, torch.Tensor],
                    names: tuple[str, ...]) -> list[tuple[str, Callable[[], object], int]]:
    """(name, closure, dense-mask bytes) for the implementations ``names`` of ``case``'s operator
    (kernel_bench.IMPLS; FlexAttention compiles per shape, so leaving it out saves minutes)."""
    args = _args(case, x)
    op = _operator(case)
    makers = {
        "triton": lambda: (lambda f: (lambda: f(*args), 0))(operators.implementation(op, operators.Impl.TRITON)),
        "reference": lambda: (lambda f: (lambda: f(*args), 0))(operators.implementation(op, operators.Impl.REFERENCE)),
        "sdpa-dense-mask": lambda: _sdpa(case, x),
        "flex": lambda: (_flex(case, x), 0),
    }
    return [(name, *makers[name]()) for name in names]
