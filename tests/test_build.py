"""Engine builds with the real TensorRT-RTX builder (ahead of time, no GPU) on small graphs with
the contract's exact I/O: profiles, targets, I/O read-back, contract checks, the plugin error."""

from __future__ import annotations

import pytest
from contract_graphs import TINY, write_contract_graph

from astro_trt.contract import BATCH, CANDIDATES, FULL_MODEL, ITEM_SCORER, USER_ENCODER, graph_io
from astro_trt.engines.backend import TENSORRT, TENSORRT_RTX
from astro_trt.engines.build import Profile, attention_candidates, build_engine, compare_io
from astro_trt.errors import BackendError, ConfigError, ExportError

needs_rtx = pytest.mark.skipif(not TENSORRT_RTX.is_available(), reason="tensorrt_rtx is not installed")


def test_profile_ranges_and_opt_points():
    assert Profile().ranges() == {BATCH: (1, 1, 8), CANDIDATES: (1, 256, 1024)}
    assert Profile(max_batch=4, max_candidates=100).ranges()[CANDIDATES] == (1, 100, 100)
    io = graph_io(TINY, "fp32")
    assert set(Profile().for_graph(io[USER_ENCODER])) == {BATCH}
    assert set(Profile().for_graph(io[FULL_MODEL])) == {BATCH, CANDIDATES}
    shapes = Profile(max_batch=4, max_candidates=64).shapes(io[ITEM_SCORER])
    d = TINY.d_model  # the candidates' looked-up rows: the table is in no engine
    assert shapes["cand_item_emb"] == ((1, 1, d), (1, 64, d), (4, 64, d))
    with pytest.raises(ConfigError, match="max-batch"):
        Profile(max_batch=0)


def test_plugin_attention_on_rtx_fails_early_naming_alternatives():
    with pytest.raises(BackendError, match=r"--attention native.*--attention auto.*--backend tensorrt"):
        attention_candidates(TENSORRT_RTX, "plugin")
    assert [c.effective for c in attention_candidates(TENSORRT, "auto")] == ["plugin"]
    assert [c.effective for c in attention_candidates(TENSORRT_RTX, "auto", "fp16")] == ["native", "reference"]
    assert [c.effective for c in attention_candidates(TENSORRT_RTX, "auto", "fp32")] == ["reference"]
    assert [c.export_as for c in attention_candidates(TENSORRT_RTX, "native", "fp32")] == ["native"]
    with pytest.raises(ConfigError):
        attention_candidates(TENSORRT_RTX, "flash")


@needs_rtx
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_built_engine_io_matches_the_contract(tmp_path, precision):
    io = graph_io(TINY, precision)[ITEM_SCORER]
    path = write_contract_graph(io, tmp_path / "item_scorer.onnx")
    profile = Profile(max_batch=4, max_candidates=64)
    phases: list[str] = []
    built = build_engine(TENSORRT_RTX, path, io, profile, opt_level=0, progress=phases.append)
    assert built.plan[:4] and len(built.plan) > 1000
    # Without a GPU TensorRT-RTX cannot deserialize, so the I/O comes from the parsed network.
    assert built.io_source in ("engine", "network")
    assert compare_io(built.io, io, profile.shapes(io)) == []
    by_name = {r["name"]: r for r in built.io}
    assert by_name["kv_cache"]["dtype"] == ("float16" if precision == "fp16" else "float32")
    assert by_name["kv_cache"]["max"][0] == 4 and by_name["cand_item_emb"]["opt"] == [1, 64, TINY.d_model]
    assert by_name["logits"] == {"name": "logits", "mode": "output", "dtype": "float32",
                                 "shape": [-1, -1, TINY.num_tasks]}
    assert "Building engine" in phases


@needs_rtx
def test_compute_targets_build(tmp_path):
    io = graph_io(TINY, "fp16")[USER_ENCODER]
    path = write_contract_graph(io, tmp_path / "user_encoder.onnx")
    built = build_engine(TENSORRT_RTX, path, io, Profile(max_batch=2), targets=["sm86", "sm89"], opt_level=0)
    assert built.targets == ["sm86", "sm89"] and built.plan


@needs_rtx
def test_graph_that_breaks_the_contract_is_refused(tmp_path):
    fp32 = graph_io(TINY, "fp32")[ITEM_SCORER]
    path = write_contract_graph(fp32, tmp_path / "item_scorer.onnx")
    with pytest.raises(ExportError, match=r"kv_cache: dtype float32, contract says float16"):
        build_engine(TENSORRT_RTX, path, graph_io(TINY, "fp16")[ITEM_SCORER], Profile())


@needs_rtx
def test_unparseable_graph_and_bad_opt_level(tmp_path):
    io = graph_io(TINY, "fp32")[USER_ENCODER]
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf")
    with pytest.raises(ExportError, match="cannot parse"):
        build_engine(TENSORRT_RTX, bad, io, Profile())
    with pytest.raises(ConfigError, match="opt-level"):
        build_engine(TENSORRT_RTX, bad, io, Profile(), opt_level=9)
