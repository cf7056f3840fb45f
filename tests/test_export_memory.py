"""The export's memory estimate against what `astro-trt export` was measured to hold, and the
refusal it gives a vocabulary that cannot fit, before any weight is read."""

from __future__ import annotations

import dataclasses
import json

import pytest

from astro_trt.config import preset
from astro_trt.engines.export_bundle import export_bundle
from astro_trt.errors import ConfigError
from astro_trt.model import resources
from astro_trt.model.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from astro_trt.model.resources import EXPORT_TABLE_COPIES, estimate_bytes

# Peak RSS of `astro-trt export CKPT --no-engines --precision fp32` (/usr/bin/time -v, climber dims,
# random weights), 2026-12-03 on this project's 2-core CPU machine: 1,061,004 and 2,560,596 KiB.
MEASURED_PEAK = {100_000: 1_061_004 << 10, 400_000: 2_560_596 << 10}


def _climber(num_items: int):
    return dataclasses.replace(preset("climber"), num_items=num_items, name=f"climber-{num_items}")


def test_export_estimate_grows_with_the_vocabulary_as_measured():
    # The growth between two vocabularies is what the table term must explain: the interpreter,
    # torch and ONNX Runtime (~0.5 GiB, the same in both) are MEMORY_SHARE's slack, not the estimate's.
    (small, big) = MEASURED_PEAK
    measured = MEASURED_PEAK[big] - MEASURED_PEAK[small]
    estimated = (estimate_bytes(_climber(big), users=2, candidates=5, table_copies=EXPORT_TABLE_COPIES)
                 - estimate_bytes(_climber(small), users=2, candidates=5, table_copies=EXPORT_TABLE_COPIES))
    assert estimated == pytest.approx(measured, rel=0.05)
    # Counting the weights once (the old estimate) explained a tenth of it.
    once = (estimate_bytes(_climber(big), users=2, candidates=5)
            - estimate_bytes(_climber(small), users=2, candidates=5))
    assert once < measured / 8


def test_a_10m_item_export_is_refused_before_the_weights_are_read(tmp_path, monkeypatch):
    monkeypatch.setattr(resources, "machine_memory", lambda: 24 << 30)  # the 24 GB machine of the report
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / CONFIG_FILE).write_text(json.dumps(_climber(10_000_000).to_dict()))
    (ckpt / WEIGHTS_FILE).write_bytes(b"not read")  # refused before anything opens it
    with pytest.raises(ConfigError, match=r"export .*num_items=10000000\) needs about 4\d\.\d GiB") as info:
        export_bundle(ckpt, tmp_path / "out", engines=False)
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()
