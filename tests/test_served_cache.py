"""astro_recommend's per-user cache kept in fp16 or int8 (serving/cache.py, `--cache-dtype`): the
users a cache of the same bytes holds, and pages scored from the reduced state against pages
scored from the runtime's own fp32 state, judged by the int8 gates (docs/tolerances.md), on the
shipped ml-100k checkpoint through the served request path in-process (serving/service.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from serving_fixture import request

from astro_trt.errors import ConfigError
from astro_trt.serving.cache import StateCodec, cache_capacity, check_cache_dtype
from astro_trt.serving.service import Recommender
from astro_trt.validate.gates import Gates
from astro_trt.validate.ranking import mean_kendall_tau, topk_overlap

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ml100k"
USERS, CANDIDATES = 8, 200


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from astro_trt.engines.bundle import load_bundle
    from astro_trt.engines.export_bundle import export_bundle

    out = export_bundle(EXAMPLE, tmp_path_factory.mktemp("served") / "b", precisions="fp32", engines=False)
    return load_bundle(out.directory)


def service_of(bundle, cache_dtype: str, cache_bytes: int = 64 << 20) -> Recommender:
    return Recommender(bundle, "fp32", cache_bytes=cache_bytes, compute="ort", threads=1, cache_dtype=cache_dtype)


def page(service: Recommender):
    keys = np.array([f"user{u}".encode() for u in range(USERS)], dtype=object)
    return service.page(keys, request(service.cfg, users=USERS, candidates=CANDIDATES, seed=3))


def pages(bundle, cache_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """The same request twice: (logits on the encoding request, logits on the cache hit)."""
    service = service_of(bundle, cache_dtype)
    first, again = page(service), page(service)
    assert first.encoded.all() and not again.encoded.any()
    return first.logits, again.logits


def test_an_int8_cache_holds_four_times_the_users_in_the_same_bytes(bundle):
    cfg, cache = bundle.config, 1 << 20
    plain, plain_users = cache_capacity(cfg, "fp32", "fp32", cache)
    half, _ = cache_capacity(cfg, "fp32", "fp16", cache)
    int8, int8_users = cache_capacity(cfg, "fp32", "int8", cache)
    assert plain == 2 * half == 153_600  # [2 layers, 3 blocks, K/V, 4 heads, 50 slots, 16] float32
    assert int8 == 38_400 + 4 * (2 * 3 * 2 * 4)  # one byte each, a float32 scale per layer, block, K/V, head
    assert int8_users >= 3.5 * plain_users  # the bar: 3.98x here
    # The cache itself counts what it holds at that size: fill it past its bytes and count.
    service = service_of(bundle, "int8", cache_bytes=int8 * 5 + int8 // 2)
    page(service)
    assert len(service.cache) == 5 and service.cache.stats.bytes == 5 * int8 and service.cache.stats.evictions == 3


@pytest.mark.parametrize("cache_dtype", ["fp16", "int8"])
def test_pages_from_a_reduced_cache_rank_like_the_fp32_cache(bundle, cache_dtype):
    _, reference = pages(bundle, "fp32")
    first, hit = pages(bundle, cache_dtype)
    np.testing.assert_array_equal(first, hit)  # a page scores the cached state whether it hit or missed
    gates, mask = Gates(), np.ones((USERS, CANDIDATES), dtype=bool)
    for task in range(reference.shape[-1]):
        assert mean_kendall_tau(hit[..., task], reference[..., task], mask) >= gates.kendall_tau_int8
        assert topk_overlap(hit[..., task], reference[..., task], gates.topk, mask) >= gates.topk_overlap
    error = float(np.abs(hit - reference).max())
    # fp16 rounds the state to 2^-11 relative, int8 to 1/254 of each head's range: both move the
    # logits, int8 more, and neither by more than the int8 logits floor (2 x 2^-7).
    assert 0 < error < 2 * 2.0**-7, error


def test_the_fp32_cache_is_the_runtime_state_untouched_and_bad_names_are_refused():
    codec = StateCodec("fp32")
    state = np.ones((1, 2, 3), dtype=np.float16)
    assert codec.pack(state) is state and codec.unpack(state) is state
    packed = StateCodec("int8").pack(np.linspace(-1, 1, 24, dtype=np.float32).reshape(1, 1, 1, 1, 2, 3, 4))
    assert packed.stored.dtype == np.int8 and packed.scale.shape == (1, 1, 1, 1, 2, 1, 1)
    with pytest.raises(ConfigError, match="cache dtype 'int4' is unknown; choose one of"):
        check_cache_dtype("int4")
