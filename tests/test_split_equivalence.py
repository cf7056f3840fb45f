"""Split vs full (docs/model.md §6): score(encode_user(h), h, c) == full(h, c) for every pair.

Both paths do the same arithmetic in float32 but in a different order: the full model takes
one softmax over [history ; candidate] of length L+1 in one matmul, the scorer concatenates
separately computed history and self scores and adds two partial weighted sums. Each op's
result is correct to ~1 ulp (6e-8 relative) and the differences pass through at most 3
layers, LayerNorm and the fusion head. Measured: max |split - full| = 1.5e-7 over 150 random
configs like the ones below and on the ml100k preset (logits of O(0.1-1)). atol 1e-5 (plus
rtol 1e-5 for a larger logit) leaves a ~60x margin over float32 rounding, while a masking or
bias bug moves logits by O(0.01) or more.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from astro_trt.config import ASTROConfig

TOL = dict(rtol=1e-5, atol=1e-5)


@st.composite
def small_configs(draw: st.DrawFn) -> ASTROConfig:
    heads = draw(st.integers(1, 4))
    return ASTROConfig(
        name="random", num_items=draw(st.integers(1, 30)), num_behaviors=draw(st.integers(2, 5)),
        num_scenarios=draw(st.integers(1, 3)), d_model=heads * draw(st.integers(1, 6)), num_heads=heads,
        num_layers=draw(st.integers(1, 3)), num_blocks=draw(st.integers(1, 4)), max_len=draw(st.integers(1, 20)),
        num_tasks=draw(st.integers(1, 3)), ffn_dim=draw(st.integers(1, 16)),
        num_pos_buckets=draw(st.integers(2, 8)), num_time_buckets=draw(st.integers(3, 10)),
        time_bucket_max=draw(st.sampled_from([2, 1000, 2**20, 2**26])), dropout=0.0,
    )


@st.composite
def lengths_for(draw: st.DrawFn, cfg: ASTROConfig, batch: int) -> torch.Tensor:
    # Empty and full blocks are the edge cases of the mask; draw them often.
    choice = st.one_of(st.just(0), st.just(cfg.max_len), st.integers(0, cfg.max_len))
    return torch.tensor([[draw(choice) for _ in range(cfg.num_blocks)] for _ in range(batch)])


@settings(max_examples=30, deadline=None)
@given(cfg=small_configs(), batch=st.integers(1, 3), m=st.integers(1, 6), seed=st.integers(0, 2**31), data=st.data())
def test_split_equals_full_for_every_pair(cfg, batch, m, seed, data, make_history, make_model) -> None:
    model = make_model(cfg, seed)
    g = torch.Generator().manual_seed(seed)
    h = make_history(cfg, batch, g, lengths=data.draw(lengths_for(cfg, batch)))
    cands = torch.randint(1, cfg.num_items + 1, (batch, m), generator=g)
    with torch.no_grad():
        split = model.score(model.encode_user(h), h, cands)
        full = model.full(h, cands)
        forward = model(h, cands)
    assert split.shape == full.shape == (batch, m, cfg.num_tasks)
    assert torch.isfinite(split).all()
    torch.testing.assert_close(split, full, **TOL)
    assert torch.equal(forward, split)  # forward() is the split


@settings(max_examples=12, deadline=None)
@given(cfg=small_configs(), m=st.integers(2, 6), seed=st.integers(0, 2**31))
def test_one_candidates_logits_do_not_depend_on_the_others(cfg, m, seed, make_history, make_model) -> None:
    model = make_model(cfg, seed)
    g = torch.Generator().manual_seed(seed)
    h = make_history(cfg, 2, g)
    cands = torch.randint(1, cfg.num_items + 1, (2, m), generator=g)
    with torch.no_grad():
        cache = model.encode_user(h)
        together = model.score(cache, h, cands)
        # Scoring candidates one at a time changes matmul shapes, hence possibly the summation
        # order: float32 rounding only (same tolerance as above), never a different value.
        for i in range(m):
            alone = model.score(cache, h, cands[:, i : i + 1])
            torch.testing.assert_close(alone[:, 0], together[:, i], **TOL)
        # Same shapes, other candidates replaced: must be bit-identical.
        others = torch.randint(1, cfg.num_items + 1, (2, m), generator=g)
        others[:, 0] = cands[:, 0]
        assert torch.equal(model.score(cache, h, others)[:, 0], together[:, 0])
        assert torch.equal(model.full(h, others)[:, 0], model.full(h, cands)[:, 0])


def test_preset_sized_model_split_equals_full(make_history, make_model) -> None:
    """The ml100k preset's sizes (d 64, 4 heads, 2 layers, 3 blocks, L 50), which the random
    configs above stay well below."""
    from astro_trt.config import preset

    cfg = preset("ml100k").replace(dropout=0.0)
    model = make_model(cfg, 0)
    g = torch.Generator().manual_seed(0)
    h = make_history(cfg, 3, g, lengths=torch.tensor([[50, 0, 17], [1, 50, 50], [0, 0, 0]]))
    cands = torch.randint(1, cfg.num_items + 1, (3, 8), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(model.score(model.encode_user(h), h, cands), model.full(h, cands), **TOL)


def test_split_differs_when_history_differs(make_config, make_history, make_model) -> None:
    """Guards the test above against a vacuous pass: the logits do depend on the history."""
    cfg = make_config()
    model = make_model(cfg, 1)
    g = torch.Generator().manual_seed(1)
    full_len = torch.full((1, cfg.num_blocks), cfg.max_len)
    h1, h2 = make_history(cfg, 1, g, lengths=full_len), make_history(cfg, 1, g, lengths=full_len)
    cands = torch.tensor([[1, 2]])
    with torch.no_grad():
        diff = (model.full(h1, cands) - model.full(h2, cands)).abs().max()
    assert diff > 1e-3
