"""The full-model memory probe (validate/peak_memory.py, `astro-trt bench-memory`): real child
processes, real figures. No figure is compared with a target here (that is the benchmark's job);
the tests check that the probe measures the graph and only the graph."""

from __future__ import annotations

import json

from click.testing import CliRunner

from astro_trt.cli import cli
from astro_trt.config import preset
from astro_trt.validate.peak_memory import full_model_memory

# The probe runs the fp32 graph against the fp32 PyTorch full model on the same inputs: float32
# reassociation only, ~1e-7 on logits of order 1.
FP32_TOL = 1e-5


def test_probe_measures_both_graphs_in_a_process_without_torch():
    points = full_model_memory(preset("ml100k"), users=2, candidates=5, runs=1)
    assert [(p.graph, p.memory_pattern) for p in points] == [
        (g, pattern) for g in ("exported", "ort-prepared", "plain") for pattern in (True, False)]
    for p in points:
        assert p.heavy_modules == ()  # numpy and onnxruntime only: the figure is ONNX Runtime's
        assert 0 < p.loaded_rss_bytes <= p.peak_rss_bytes < 4 * 2**30
        assert p.max_abs_vs_torch < FP32_TOL
        assert p.median_ms > 0


def test_cli_writes_the_figures_and_refuses_a_directory(tmp_path):
    out = tmp_path / "figures" / "memory.json"
    result = CliRunner().invoke(cli, ["bench-memory", "--config", "ml100k", "--candidates", "3", "--runs", "1",
                                       "--no-plain", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["config"] == "ml100k" and report["candidates"] == 3 and report["pairs_per_chunk"] >= 1
    assert [p["graph"] for p in report["points"]] == ["exported", "exported", "ort-prepared", "ort-prepared"]
    refused = CliRunner().invoke(cli, ["bench-memory", "--config", "ml100k", "--json", str(tmp_path)])
    assert refused.exit_code == 2 and "is a directory" in refused.output
