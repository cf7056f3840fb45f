"""Layer bisect (validate/bisect.py) on the shipped example checkpoint, exported ONNX-only: every
stage within its limit as exported, and a fault planted in one layer of one block of the exported
graph (the checkpoint, hence the oracle, untouched) named as the first stage over its limit, on
ONNX Runtime in fp32 and fp16."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from astro_trt.cli import main

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ml100k"


@pytest.fixture(scope="module")
def shipped(tmp_path_factory) -> Path:
    from astro_trt.engines.export_bundle import export_bundle

    return export_bundle(EXAMPLE, tmp_path_factory.mktemp("bisect") / "ml100k", engines=False).directory


def plant_fault(bundle: Path, out: Path, graph: str, precision: str, weight: str, block: int, scale: float) -> Path:
    """A copy of ``bundle`` whose ``graph`` has ``weight``[block] scaled, re-hashed so it loads."""
    import onnx
    from onnx import numpy_helper

    from astro_trt.manifest import read_manifest, write_manifest

    shutil.copytree(bundle, out)
    path = out / "onnx" / precision / f"{graph}.onnx"
    model = onnx.load(str(path))
    init = next(i for i in model.graph.initializer if i.name == weight)
    value = numpy_helper.to_array(init).copy()
    value[block] = value[block] * scale
    init.CopyFrom(numpy_helper.from_array(value, weight))
    onnx.save_model(model, str(path))
    shutil.rmtree(out / "reports", ignore_errors=True)
    manifest = read_manifest(out)
    manifest.pop("reports", None)  # the copy's reports are gone; a manifest may list only files it holds
    write_manifest(out, manifest)
    return out


def test_the_shipped_bundle_is_within_every_stage_limit(shipped):
    from astro_trt.validate.bisect import bisect_bundle, stage_plan

    report = bisect_bundle(shipped)
    assert report.passed, report.summary()
    cfg = report_config(shipped)
    names = {s.stage for s in report.stages}
    assert {f"scorer.layer{i}.{k}" for i in range(cfg.num_layers) for k in ("attention", "ffn")} <= names
    assert {"encoder.embedding", "encoder.layer0.ffn", "encoder.layer1.kv", "fusion.gate", "head"} <= names
    assert len(names) == len(stage_plan(cfg))
    # fp32 is ORT against PyTorch in the same precision: rounding only (measured <= 2e-6).
    assert max(s.max_abs for s in report.stages if s.precision == "fp32") < 1e-5
    # fp16 is judged against PyTorch's own fp16 error at the same stage, which is never zero after the embeddings.
    assert all(s.torch_error > 0 for s in report.stages if s.precision == "fp16" and "embedding" not in s.stage)
    written = json.loads(report.paths["json"].read_text())
    assert written["passed"] and report.paths["png"].read_bytes()[:4] == b"\x89PNG"
    assert "bisect" in json.loads((shipped / "manifest.json").read_text())["reports"]


def report_config(bundle: Path):
    from astro_trt.engines.bundle import load_bundle

    return load_bundle(bundle).config


@pytest.mark.parametrize(("graph", "weight", "block", "precision", "stage"), [
    ("item_scorer", "model.layers.1.w_1", 1, "fp32", "scorer.layer1.ffn"),
    ("item_scorer", "model.layers.1.w_1", 1, "fp16", "scorer.layer1.ffn"),
    ("user_encoder", "model.layers.0.w_2", 2, "fp16", "encoder.layer0.ffn"),
    ("item_scorer", "model.layers.0.w_v", 0, "fp32", "scorer.layer0.attention"),
])
def test_a_planted_fault_is_named(shipped, tmp_path, graph, weight, block, precision, stage):
    from astro_trt.validate.bisect import bisect_bundle

    # 5% on one block's weight: ~10x the fp16 limit at the faulty stage (measured 0.098 against
    # 0.011), yet the logits move by only ~3e-2: the kind of drift a parity number reports without a place.
    faulty = plant_fault(shipped, tmp_path / "faulty", graph, precision, weight, block, 1.05)
    report = bisect_bundle(faulty, precisions=[precision])
    first = report.first_failure(precision)
    assert first is not None, report.summary()
    assert (first.stage, first.block) == (stage, report_config(faulty).block_names[block]), report.summary()
    # Everything upstream of the fault stays within its limit.
    upstream = report.stages[: report.stages.index(first)]
    assert upstream and all(s.passed for s in upstream)


def test_cli_bisect_exits_1_and_names_the_stage(shipped, tmp_path, capsys):
    faulty = plant_fault(shipped, tmp_path / "faulty", "item_scorer", "fp32", "model.layers.1.w_1", 1, 1.05)
    with pytest.raises(SystemExit) as exc:
        main(["validate", str(faulty), "--bisect", "--data", "synthetic", "--precision", "fp32",
              "--out", str(tmp_path / "reports")])
    assert exc.value.code == 1
    out = capsys.readouterr().out
    assert "fp32: first stage over its limit: scorer.layer1.ffn [liked]" in out
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == ["bisect.json", "bisect.md", "bisect.png"]
    assert "scorer.layer1.ffn" in (tmp_path / "reports" / "bisect.md").read_text()


@pytest.mark.parametrize(("argv", "message"), [
    (["--runtime", "trt"], "ONNX Runtime only"),
    (["--precision", "bf16"], "no bf16 graphs"),
])
def test_cli_bisect_refusals_are_one_line(shipped, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(["validate", str(shipped), "--bisect", "--data", "synthetic", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_marked_graph_keeps_the_original_outputs_first(shipped, tmp_path):
    import onnx

    from astro_trt.engines.bundle import load_bundle
    from astro_trt.validate.bisect import marked_graph, stage_plan

    bundle = load_bundle(shipped)
    source = bundle.onnx_path("item_scorer", "fp16")
    stages = [s for s in stage_plan(bundle.config) if s.graph == "item_scorer"]
    tensors = marked_graph(source, stages, tmp_path / "marked.onnx")
    marked = onnx.load(str(tmp_path / "marked.onnx"))
    outputs = [o.name for o in marked.graph.output]
    assert outputs[0] == "logits" and set(tensors.values()) <= set(outputs)
    assert len(set(tensors.values())) == len(stages)  # every stage is its own tensor
    assert np.array_equal(  # the weights are the bundle's, untouched
        onnx.numpy_helper.to_array(next(i for i in marked.graph.initializer if i.name == "model.layers.1.w_1")),
        onnx.numpy_helper.to_array(next(i for i in onnx.load(str(source)).graph.initializer
                                        if i.name == "model.layers.1.w_1")))


def test_plugin_lowering_and_a_one_layer_model(tmp_path):
    """The boundaries are found in the astro function-node graphs too (the shipped export uses the
    reference and native lowerings), and in a model whose encoder has no attention at all."""
    from conftest import random_model, small_config

    from astro_trt.engines.export_bundle import export_bundle
    from astro_trt.model.checkpoint import save_checkpoint
    from astro_trt.validate.bisect import bisect_bundle

    for layers in (1, 2):
        cfg = small_config(num_layers=layers)
        ckpt = save_checkpoint(tmp_path / f"ckpt{layers}", random_model(cfg, seed=layers), cfg)
        bundle = export_bundle(ckpt, tmp_path / f"bundle{layers}", precisions="fp16", attention="plugin",
                               engines=False).directory
        report = bisect_bundle(bundle, out=tmp_path / f"reports{layers}")
        assert report.passed, report.summary()
        encoder_attention = any(s.stage == "encoder.layer0.attention" for s in report.stages)
        assert encoder_attention == (layers > 1)  # the encoder skips the last layer's attention
        last = f"model.layers.{layers - 1}.w_1"
        faulty = plant_fault(bundle, tmp_path / f"faulty{layers}", "item_scorer", "fp16", last, 0, 1.05)
        first = bisect_bundle(faulty, precisions="fp16", out=tmp_path / "r").first_failure("fp16")
        assert first is not None and (first.stage, first.block) == (f"scorer.layer{layers - 1}.ffn", "block0")
