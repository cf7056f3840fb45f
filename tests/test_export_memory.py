"""The memory estimate with the item table outside every graph: an export streams the table and a
loaded model maps it, so neither estimate grows with the vocabulary; training holds the table with
Adam's copies, and a vocabulary it cannot hold is refused in one line before any work."""

from __future__ import annotations

import dataclasses

import pytest

from astro_trt.config import preset
from astro_trt.errors import ConfigError
from astro_trt.model import resources
from astro_trt.model.resources import EXPORT_STREAM_BYTES, check_fits, estimate_bytes, item_table_bytes


def _climber(num_items: int):
    return dataclasses.replace(preset("climber"), num_items=num_items, name=f"climber-{num_items}")


def test_export_and_load_estimates_do_not_grow_with_the_vocabulary():
    small, big = _climber(100_000), _climber(10_000_000)
    for streaming in (False, True):
        estimates = [estimate_bytes(c, users=2, candidates=5, streaming=streaming) for c in (small, big)]
        assert estimates[0] == estimates[1]
    # The climber's dense weights are ~5 MB: the export's estimate is its streaming buffers and one
    # request's attention, far below the 5.1 GB table it writes.
    export = estimate_bytes(big, users=2, candidates=5, streaming=True)
    assert EXPORT_STREAM_BYTES < export < EXPORT_STREAM_BYTES + (64 << 20)
    assert export < item_table_bytes(big) / 10


def test_training_counts_the_table_with_adams_copies():
    small, big = _climber(100_000), _climber(1_000_000)
    grown = (estimate_bytes(big, users=2, candidates=5, full=False, training=True)
             - estimate_bytes(small, users=2, candidates=5, full=False, training=True))
    assert grown == 4 * (item_table_bytes(big) - item_table_bytes(small))


def test_a_10m_item_export_fits_a_24gb_machine_but_training_it_is_refused(monkeypatch):
    monkeypatch.setattr(resources, "machine_memory", lambda: 24 << 30)  # the 24 GB machine of issue 21
    cfg = _climber(10_000_000)
    check_fits(cfg, users=2, candidates=5, purpose="export", streaming=True)
    # 1.28e9 weights x 4 bytes x (weights, gradients, two moments) = 19.1 GiB > 75 % of 24 GiB.
    with pytest.raises(ConfigError) as info:
        check_fits(cfg, users=64, candidates=1, purpose="training", full=False, training=True)
    message = str(info.value)
    assert "\n" not in message and "num_items=10000000) needs about 19." in message and "18.0 GiB" in message
