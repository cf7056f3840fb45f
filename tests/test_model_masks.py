"""Visibility (docs/model.md §3) by perturbation: change what a token must not see and require the
outputs that must not depend on it to stay bit-identical (tolerance 0: a masked score becomes
-inf before the softmax and its weight is exactly 0, so nothing may leak, not even rounding);
change what it must see and require a change (so the perturbation itself is effective).

Perturbations keep shapes fixed, so every matmul runs the same kernel on the same layout and a
bit-identical result is a fair demand on the CPU.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from astro_trt.model.astro import ASTRO, History, ReferenceOps
from astro_trt.plugins.buckets import bucket_thresholds, distance_table
from astro_trt.plugins.reference import candidate_attention, multi_scale_self_attention

SETTINGS = settings(max_examples=25, deadline=None)


def op_inputs(seed: int, batch: int, nb: int, heads: int, seq: int, dh: int, lengths: torch.Tensor | None = None):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, nb, heads, seq, dh, generator=g) for _ in range(3))
    if lengths is None:
        lengths = torch.randint(0, seq + 1, (batch, nb), generator=g)
    times = 1_700_000_000 + (2.0 ** (torch.rand(batch, nb, seq, generator=g) * 27)).long().cumsum(-1)
    n_pos, n_time = 5, 8
    pos_bias = distance_table(torch.randn(nb, heads, n_pos, generator=g), seq, n_pos)
    time_bias = torch.randn(nb, heads, n_time, generator=g)
    thresholds = torch.tensor(bucket_thresholds(n_time, 2**26))
    inv_tau = 1.0 / (0.3 + 3 * torch.rand(batch, nb, heads, generator=g))
    return dict(q=q, k=k, v=v, lengths=lengths, times=times, pos_bias=pos_bias, time_bias=time_bias,
                time_thresholds=thresholds, inv_tau=inv_tau)


def valid_mask(lengths: torch.Tensor, seq: int) -> torch.Tensor:
    return torch.arange(seq) >= (seq - lengths)[..., None]  # [B, Nb, S]


def perturbed(args: dict, name: str, slot: int, seed: int) -> dict:
    out = dict(args)
    tensor = args[name].clone()
    g = torch.Generator().manual_seed(seed)
    if tensor.dtype == torch.int64:  # times
        tensor[..., slot] += torch.randint(1, 2**30, tensor[..., slot].shape, generator=g)
    else:  # q/k/v [B, Nb, H, S, dh]
        tensor[..., slot, :] += 3 * torch.randn(tensor[..., slot, :].shape, generator=g)
    out[name] = tensor
    return out


shapes = dict(seed=st.integers(0, 2**31), batch=st.integers(1, 3), nb=st.integers(1, 3), heads=st.integers(1, 3),
              seq=st.integers(1, 12), dh=st.integers(1, 6))


# ------------------------------------------------------------------ MultiScaleSelfAttention
@SETTINGS
@given(**shapes, data=st.data())
def test_history_token_never_sees_a_later_token(seed, batch, nb, heads, seq, dh, data) -> None:
    args = op_inputs(seed, batch, nb, heads, seq, dh, lengths=torch.full((batch, nb), seq))  # all valid
    j = data.draw(st.integers(0, seq - 1))
    base = multi_scale_self_attention(**args)
    for name in ("k", "v", "times"):
        out = multi_scale_self_attention(**perturbed(args, name, j, seed + 1))
        assert torch.equal(out[..., :j, :], base[..., :j, :]), f"query before {j} saw slot {j} through {name}"
        # What query j (and later) must see: v_j always (query j sees itself); k_j only moves
        # rows with a second visible key (a single key gets weight 1 whatever its score), i.e.
        # rows >= max(j, 1). A time change need not cross a bucket edge, so it is not required.
        first_moved = {"v": j, "k": max(j, 1)}.get(name, seq)
        if first_moved < seq:
            assert not torch.equal(out[..., first_moved:, :], base[..., first_moved:, :]), f"{name}[{j}] unseen"


@SETTINGS
@given(**shapes, data=st.data())
def test_padding_slots_are_invisible_and_output_zero(seed, batch, nb, heads, seq, dh, data) -> None:
    args = op_inputs(seed, batch, nb, heads, seq, dh)
    valid = valid_mask(args["lengths"], seq)
    base = multi_scale_self_attention(**args)
    assert torch.isfinite(base).all()
    padding_rows = ~valid[:, :, None, :, None].expand_as(base)
    assert torch.equal(base[padding_rows], torch.zeros_like(base[padding_rows]))

    j = data.draw(st.integers(0, seq - 1))
    for name in ("q", "k", "v", "times"):
        out = multi_scale_self_attention(**perturbed(args, name, j, seed + 2))
        # Slot j is padding in some (user, block) pairs: their outputs must not move at all.
        pad_j = ~valid[:, :, j]  # [B, Nb]
        assert torch.equal(out[pad_j], base[pad_j]), f"padding slot {j} leaked through {name}"


def test_empty_blocks_give_zeros_not_nan() -> None:
    args = op_inputs(0, 2, 3, 2, 7, 4, lengths=torch.zeros(2, 3, dtype=torch.int64))
    out = multi_scale_self_attention(**args)
    assert torch.equal(out, torch.zeros_like(out))
    # NaN-free even when the padding K/V are huge (a masked matmul must not compute inf * 0).
    args["k"] = args["k"] * 1e30
    args["lengths"] = torch.tensor([[0, 7, 3], [1, 0, 7]])
    assert torch.isfinite(multi_scale_self_attention(**args)).all()


def test_single_visible_key_returns_its_value_exactly() -> None:
    """Slot 0 of a full block sees only itself: softmax of one score is exactly 1."""
    args = op_inputs(3, 2, 2, 2, 5, 4, lengths=torch.full((2, 2), 5))
    out = multi_scale_self_attention(**args)
    assert torch.equal(out[..., 0, :], args["v"][..., 0, :])


# ------------------------------------------------------------------ CandidateAttention
def cand_inputs(seed: int, batch: int, nb: int, heads: int, seq: int, dh: int, m: int):
    hist = op_inputs(seed, batch, nb, heads, seq, dh)
    g = torch.Generator().manual_seed(seed + 7)
    q, k, v = (torch.randn(batch, nb, heads, m, dh, generator=g) for _ in range(3))
    request_time = hist["times"].amax((1, 2)) + 5
    return dict(q=q, k=k, v=v, k_cache=hist["k"], v_cache=hist["v"], lengths=hist["lengths"],
                hist_times=hist["times"], request_time=request_time, pos_bias=hist["pos_bias"],
                time_bias=hist["time_bias"], time_thresholds=hist["time_thresholds"], inv_tau=hist["inv_tau"])


@SETTINGS
@given(**shapes, m=st.integers(2, 5), data=st.data())
def test_candidate_never_sees_another_candidate(seed, batch, nb, heads, seq, dh, m, data) -> None:
    args = cand_inputs(seed, batch, nb, heads, seq, dh, m)
    base = candidate_attention(**args)
    c = data.draw(st.integers(0, m - 1))
    others = [i for i in range(m) if i != c]
    for name in ("q", "k", "v"):
        out = candidate_attention(**perturbed(args, name, c, seed + 3))
        assert torch.equal(out[..., others, :], base[..., others, :]), f"candidate {c} leaked via {name}"
        # Its own q and k move its output only where it has a second visible key (history).
        sees_history = args["lengths"] > 0 if name != "v" else torch.ones_like(args["lengths"], dtype=torch.bool)
        if sees_history.any():
            assert not torch.equal(out[..., c, :][sees_history], base[..., c, :][sees_history])


@SETTINGS
@given(**shapes, m=st.integers(1, 4), data=st.data())
def test_candidate_sees_valid_history_and_never_padding(seed, batch, nb, heads, seq, dh, m, data) -> None:
    args = cand_inputs(seed, batch, nb, heads, seq, dh, m)
    valid = valid_mask(args["lengths"], seq)
    base = candidate_attention(**args)
    assert torch.isfinite(base).all()
    j = data.draw(st.integers(0, seq - 1))
    for name in ("k_cache", "v_cache", "hist_times"):
        out = candidate_attention(**perturbed(args, name, j, seed + 4))
        pad_j = ~valid[:, :, j]
        assert torch.equal(out[pad_j], base[pad_j]), f"padding slot {j} leaked via {name}"
        if valid[:, :, j].any() and name != "hist_times":  # a time change need not cross a bucket edge
            assert not torch.equal(out[valid[:, :, j]], base[valid[:, :, j]]), f"valid slot {j} unseen via {name}"


def test_candidate_of_an_empty_history_sees_only_itself() -> None:
    args = cand_inputs(5, 2, 3, 2, 6, 4, m=3)
    args["lengths"] = torch.zeros(2, 3, dtype=torch.int64)
    args["k_cache"] = args["k_cache"] * 1e30  # padding K must not turn into NaN
    assert torch.equal(candidate_attention(**args), args["v"])


# ------------------------------------------------------------------ the model
class RecordingOps(ReferenceOps):
    """The reference ops, keeping every self-attention output (the history rows of full())."""

    def __init__(self) -> None:
        self.outputs: list[torch.Tensor] = []

    def multi_scale_self_attention(self, *args: torch.Tensor) -> torch.Tensor:
        out = super().multi_scale_self_attention(*args)
        self.outputs.append(out)
        return out


def with_slot(h: History, block: int, slot: int, item: int, time: int) -> History:
    items, times = h.items.clone(), h.times.clone()
    items[:, block, slot] = item
    times[:, block, slot] = time
    return History(items, h.behaviors, times, h.lengths, h.scenario, h.request_time)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31), layers=st.integers(2, 3))
def test_model_history_never_sees_later_or_padding_tokens(seed, layers, make_config, make_history, make_model):
    cfg = make_config(num_layers=layers)
    model = make_model(cfg, seed)
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([[cfg.max_len, cfg.max_len - 3, 0]])
    h = make_history(cfg, 1, g, lengths=lengths)
    with torch.no_grad():
        base = model.encode_user(h)
        # Block 0 is full: changing slot j may change the cache at slots >= j only.
        j = 4
        other_item = int(h.items[0, 0, j]) % cfg.num_items + 1  # any item but the one there
        later = model.encode_user(with_slot(h, 0, j, item=other_item, time=int(h.times[0, 0, j]) + 12345))
        assert torch.equal(later[:, :, 0, :, :, :j], base[:, :, 0, :, :, :j])
        assert not torch.equal(later[:, 1:, 0, :, :, j + 1:], base[:, 1:, 0, :, :, j + 1:])  # later slots see j
        # Block 1: slot 1 is padding; writing a real item and time into it must change no
        # valid slot's cache and no logit.
        cands = torch.tensor([[1, 2, 3]])
        dirty = with_slot(h, 1, 1, item=7, time=int(h.request_time[0]) - 1)
        valid = slice(cfg.max_len - 3, None)
        assert torch.equal(model.encode_user(dirty)[:, :, 1, :, :, valid], base[:, :, 1, :, :, valid])
        assert torch.equal(model.score(model.encode_user(dirty), dirty, cands), model.score(base, h, cands))
        assert torch.equal(model.full(dirty, cands), model.full(h, cands))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31), m=st.integers(2, 5))
def test_model_candidates_see_neither_each_other_nor_are_seen_by_history(seed, m, make_config, make_history):
    cfg = make_config()
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    ops = RecordingOps()
    model = ASTRO(cfg, ops=ops).eval()
    h = make_history(cfg, 2, g)
    cands = torch.randint(1, cfg.num_items + 1, (2, m), generator=g)
    changed = cands.clone()
    changed[:, 0] = cands[:, 0] % cfg.num_items + 1  # a different item in slot 0
    with torch.no_grad():
        ops.outputs.clear()
        base_full = model.full(h, cands)
        base_rows = [o[..., : cfg.max_len, :] for o in ops.outputs]
        ops.outputs.clear()
        full = model.full(h, changed)
        rows = [o[..., : cfg.max_len, :] for o in ops.outputs]
        base_split = model.score(model.encode_user(h), h, cands)
        split = model.score(model.encode_user(h), h, changed)
    for got, want in ((full, base_full), (split, base_split)):
        assert torch.equal(got[:, 1:], want[:, 1:])  # other candidates untouched, bit for bit
        assert not torch.equal(got[:, 0], want[:, 0])
    # full(): every layer's history rows are computed with the candidate appended; they must
    # not depend on it (causality puts the candidate after every history slot).
    assert len(rows) == len(base_rows) == cfg.num_layers
    for got, want in zip(rows, base_rows, strict=True):
        assert torch.equal(got, want)


def test_temperatures_start_at_sqrt_head_dim(make_config) -> None:
    """docs/model.md §3: theta is initialised so that tau = softplus(theta) + 0.01 = sqrt(dh), for every
    layer, block, scenario and head, and for the fusion layer."""
    cfg = make_config(d_model=36, num_heads=4)  # dh = 9, tau = 3
    model = ASTRO(cfg)
    scenario = torch.arange(cfg.num_scenarios)
    for layer in [*model.layers, model.fusion.layer]:
        # inv_tau is computed in float32 from an inverse softplus in float64: ~1 ulp apart.
        torch.testing.assert_close(layer.inv_tau(scenario), torch.full_like(layer.inv_tau(scenario), 1 / 3),
                                   rtol=1e-6, atol=0)
