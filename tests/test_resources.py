"""What a config and a request shape may ask of the machine (model/resources.py)."""

from __future__ import annotations

import pytest

from astro_trt.config import PRESETS
from astro_trt.errors import ConfigError, DataError
from astro_trt.model.resources import (
    check_fits,
    estimate_bytes,
    machine_memory,
    parameter_count,
    parameter_lower_bound,
)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_fit_the_work_the_commands_do(name):
    cfg = PRESETS[name]
    check_fits(cfg, users=2, candidates=5, purpose="export check")
    assert parameter_lower_bound(cfg) <= parameter_count(cfg)


def test_the_issues_max_len_2000_is_refused_with_the_estimate():
    cfg = PRESETS["ml100k"].replace(max_len=2000)
    # 10 naive sequences of 2001 tokens, 3 blocks: 10 * 3 * 2001^2 pairs at 312 bytes each.
    assert estimate_bytes(cfg, users=2, candidates=5) >= 10 * 3 * 2001**2 * 312
    if estimate_bytes(cfg, users=2, candidates=5) < 0.75 * machine_memory():
        pytest.skip("this machine has the memory for it")
    with pytest.raises(ConfigError, match=r"max_len=2000.*GiB.*lower max_len"):
        check_fits(cfg, users=2, candidates=5, purpose="one request")


def test_bench_candidates_are_checked_against_the_profile():
    from astro_trt.validate.bench_bundle import check_counts

    check_counts([64, 256, 1024], None)  # presets: the profile export gives by default
    with pytest.raises(DataError, match="--candidates 5000"):
        check_counts([64, 5000], None)
    with pytest.raises(DataError, match="--candidates 10000000"):
        check_counts([10**7], None)
