"""`astro-trt export` / `inspect` end to end on a small checkpoint: real ONNX export and real
TensorRT-RTX engine builds (ahead of time, no GPU), the bundle's contract read back, and the
refusals (plugin attention on RTX, bad checkpoints, existing --out)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import cli_status, small_config

from astro_trt.contract import GRAPHS, graph_io
from astro_trt.engines.backend import TENSORRT_RTX
from astro_trt.engines.build import Profile, compare_io
from astro_trt.engines.bundle import load_bundle
from astro_trt.model.astro import ASTRO
from astro_trt.model.checkpoint import load_checkpoint, save_checkpoint

needs_rtx = pytest.mark.skipif(not TENSORRT_RTX.is_available(), reason="tensorrt_rtx is not installed")
SMALL = ["--max-batch", "2", "--max-candidates", "8", "--opt-level", "0"]
run = cli_status


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = small_config()
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", ASTRO(cfg), cfg)


@pytest.fixture(scope="module")
def bundle_dir(checkpoint, tmp_path_factory):
    pytest.importorskip("astro_trt.exporter.check")
    if not TENSORRT_RTX.is_available():
        pytest.skip("tensorrt_rtx is not installed")
    out = tmp_path_factory.mktemp("out") / "bundle"
    assert run(["export", str(checkpoint), "--out", str(out), "--backend", "tensorrt-rtx", *SMALL]) == 0
    return out


def test_export_writes_a_complete_verified_bundle(bundle_dir, checkpoint):
    bundle = load_bundle(bundle_dir)
    assert bundle.precisions == ["fp32", "fp16"] and bundle.backend == "tensorrt-rtx"
    assert bundle.config == small_config()
    assert bundle.manifest["backend"]["targets"] == ["portable"]
    for precision in bundle.precisions:
        assert bundle.attention(precision) in ("native", "reference")
        for graph in GRAPHS:
            assert bundle.onnx_path(graph, precision).is_file()
            assert bundle.engine_path(graph, precision).stat().st_size > 1000
            # ONNX Runtime agrees with PyTorch on every graph; fp16 graphs carry fp16 rounding.
            assert bundle.manifest["parity"][precision][graph] < (1e-4 if precision == "fp32" else 5e-2)
    # The rows are stored once: the fp32 table file holds the checkpoint's table, the checkpoint copy the rest.
    source = load_checkpoint(checkpoint)
    table = source.model.item_table
    assert np.array_equal(bundle.item_table("fp32").stored_rows(0, table.rows)[0], table.stored_rows(0, table.rows)[0])
    oracle = bundle.checkpoint()
    assert oracle.sha256 == source.sha256
    for name, weight in source.model.state_dict().items():
        assert torch.equal(oracle.model.state_dict()[name], weight), name


def test_engine_io_matches_the_manifest_contract(bundle_dir):
    bundle = load_bundle(bundle_dir)
    profile = Profile(max_batch=2, max_candidates=8)
    for precision in bundle.precisions:
        assert bundle.io(precision) == graph_io(bundle.config, precision)
        for graph, io in bundle.io(precision).items():
            entry = bundle.manifest["engines"][precision][graph]
            assert entry["io_source"] in ("engine", "network")
            assert compare_io(entry["io"], io, profile.shapes(io)) == []
            ranges = bundle.profile(graph)
            assert ranges["batch"] == (1, 1, 2)
            if graph != "user_encoder":
                assert ranges["candidates"] == (1, 8, 8)
        assert bundle.manifest["kv_cache"][precision]["dtype"] == ("float16" if precision == "fp16" else "float32")


def test_inspect_lists_engines_io_and_back_end(bundle_dir, capsys):
    assert run(["inspect", str(bundle_dir)]) == 0
    text = capsys.readouterr().out
    assert "back end: tensorrt-rtx" in text and "targets portable" in text
    for graph in GRAPHS:
        assert text.count(f"  {graph}: onnx") == 2
    assert "kv_cache" in text and "min [1, 2, 3, 2, 2, 8, 8]" in text


def test_a_changed_engine_byte_is_refused_by_inspect(bundle_dir, capsys):
    plan = bundle_dir / "engines" / "fp16" / "item_scorer.plan"
    original = plan.read_bytes()
    plan.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
    try:
        assert run(["inspect", str(bundle_dir)]) == 2
        assert "engines/fp16/item_scorer.plan changed since export" in capsys.readouterr().err
    finally:
        plan.write_bytes(original)


@needs_rtx
def test_plugin_attention_on_rtx_fails_early(checkpoint, tmp_path, capsys):
    out = tmp_path / "bundle"
    code = run(["export", str(checkpoint), "--out", str(out), "--backend", "tensorrt-rtx", "--attention", "plugin"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--attention plugin" in err and "--attention native" in err and "--backend tensorrt" in err
    assert list(tmp_path.iterdir()) == []


def test_a_failing_checkpoint_leaves_no_output(checkpoint, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((checkpoint / "config.json").read_text())
    weights = (checkpoint / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(weights[: len(weights) // 2])  # truncated mid-tensor
    out = tmp_path / "out" / "bundle"
    assert run(["export", str(broken), "--out", str(out), "--no-engines"]) == 2
    assert "model.safetensors" in capsys.readouterr().err
    # The checkpoint is read before anything is staged, so not even the parent folder appears.
    assert not (tmp_path / "out").exists()


def test_a_graph_failing_its_check_mid_export_leaves_no_output(checkpoint, tmp_path, capsys):
    # Weights that load but make the model emit NaN: the ONNX files are written, then the
    # ONNX Runtime parity check refuses them, after the bundle was partly staged.
    pytest.importorskip("astro_trt.exporter.check")
    from safetensors.torch import load_file, save_file

    nan = tmp_path / "nan"
    nan.mkdir()
    (nan / "config.json").write_text((checkpoint / "config.json").read_text())
    tensors = load_file(checkpoint / "model.safetensors")
    first_float = next(k for k, v in tensors.items() if v.is_floating_point() and "norm" not in k)
    tensors[first_float] = torch.full_like(tensors[first_float], float("nan"))
    save_file(tensors, nan / "model.safetensors")
    out = tmp_path / "out"
    assert run(["export", str(nan), "--out", str(out / "bundle"), "--no-engines"]) == 2
    assert "outputs NaN/inf" in capsys.readouterr().err
    # The failure came after staging began beside --out: the stage is gone, and so is the folder
    # the export created to hold it.
    assert not out.exists() and list(tmp_path.iterdir()) == [nan]


def test_existing_out_needs_force(bundle_dir, checkpoint, capsys):
    before = json.loads((bundle_dir / "manifest.json").read_text())["tool"]["created"]
    assert run(["export", str(checkpoint), "--out", str(bundle_dir), "--no-engines"]) != 0
    assert "--force" in capsys.readouterr().err
    assert json.loads((bundle_dir / "manifest.json").read_text())["tool"]["created"] == before
