"""The graph facts the bundle loader checks a manifest against (engines/graph_facts.py), read from
the ONNX wire format: the same inputs, outputs, table shapes and external data as onnx's own
parser sees, without holding the weights; anything that is not an ONNX model is a ValueError; and
an engine's recorded I/O that is not the manifest's profile is refused."""

from __future__ import annotations

import hashlib
import json
import os
import tracemalloc

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from astro_trt.engines.bundle import load_bundle
from astro_trt.engines.graph_facts import ELEM_TYPES, read_graph_facts
from astro_trt.errors import BundleError
from astro_trt.manifest import MANIFEST, MANIFEST_HASH


def _model(table_rows: int = 5, *, big: int = 0) -> onnx.ModelProto:
    """ids -> Gather(table) -> Loop whose body holds its own table and a Constant kept outside."""
    table = numpy_helper.from_array(np.zeros((table_rows, 3), np.float32), "model.item_embedding.weight")
    inner = numpy_helper.from_array(np.zeros((table_rows, 3), np.float32), "inner_table")
    outside = numpy_helper.from_array(np.zeros(4, np.float32), "c")
    outside.ClearField("raw_data")
    outside.data_location = TensorProto.EXTERNAL
    outside.external_data.add(key="location", value="weights.bin")
    body = helper.make_graph(
        [helper.make_node("Identity", ["x_in"], ["x_out"]), helper.make_node("Constant", [], ["k"], value=outside)],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("x_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_out", TensorProto.FLOAT, None)], [inner])
    body.node.insert(0, helper.make_node("Identity", ["cond"], ["cond_out"]))
    inits = [table] + ([numpy_helper.from_array(np.zeros(big, np.uint8), "big")] if big else [])
    graph = helper.make_graph(
        [helper.make_node("Gather", ["model.item_embedding.weight", "cand_items"], ["e"], axis=0),
         helper.make_node("Loop", ["", "", "e"], ["logits"], body=body)],
        "g", [helper.make_tensor_value_info("cand_items", TensorProto.INT64, ["batch", "candidates"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph)


def test_facts_match_onnx_and_skip_the_weights(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(_model(7, big=64 << 20).SerializeToString())
    tracemalloc.start()
    facts = read_graph_facts(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20  # a 64 MB initializer in the file, not in memory
    assert facts.inputs == [("cand_items", TensorProto.INT64)] and facts.outputs == [("logits", TensorProto.FLOAT)]
    assert facts.initializers["model.item_embedding.weight"] == (7, 3) and facts.initializers["inner_table"] == (7, 3)
    assert facts.initializers["big"] == (64 << 20,)
    assert facts.gathers == [((7, 3), "cand_items", 0)]
    assert facts.external == [{"location": "weights.bin"}]  # found inside a Loop body's Constant


def test_elem_types_are_onnx_s_own():
    assert ELEM_TYPES == {name: int(getattr(TensorProto, name)) for name in ELEM_TYPES}


def test_anything_but_an_onnx_model_is_a_value_error(tmp_path):
    data = _model().SerializeToString()
    cases = {"empty": b"", "json": b'{"a": 1}', "truncated": data[: len(data) // 2], "one byte short": data[:-1],
             "text": b"not a model at all\n", "overlong varint": b"\x3a" + b"\xff" * 11}
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(ValueError):
            read_graph_facts(tmp_path / name)
    os.mkfifo(tmp_path / "fifo")  # refused without blocking on the open
    with pytest.raises(ValueError, match="not a regular file"):
        read_graph_facts(tmp_path / "fifo")
    graph = _model().graph
    for _ in range(20):  # Loop bodies nested 20 deep: not one of ours, and no RecursionError
        graph = helper.make_graph([helper.make_node("Loop", ["", "", "cand_items"], ["logits"], body=graph)], "g",
                                  list(graph.input), list(graph.output))
    (tmp_path / "deep").write_bytes(helper.make_model(graph).SerializeToString())
    with pytest.raises(ValueError, match="nested"):
        read_graph_facts(tmp_path / "deep")


def test_engine_io_apart_from_the_profile_is_refused(tmp_path):
    test_bundle = pytest.importorskip("test_bundle")
    backend = pytest.importorskip("astro_trt.engines.backend").TENSORRT_RTX
    if not backend.is_available():
        pytest.skip("TensorRT-RTX is not installed; no engine to record")
    bundle = test_bundle._write_bundle(tmp_path / "b", engines=True)
    load_bundle(bundle)
    manifest = json.loads((bundle / MANIFEST).read_text())
    record = next(r for r in manifest["engines"]["fp32"]["item_scorer"]["io"] if r["name"] == "cand_item_emb")
    record["max"] = [record["max"][0], 10**6, record["max"][2]]
    body = (json.dumps(manifest) + "\n").encode()
    (bundle / MANIFEST).write_bytes(body)
    (bundle / MANIFEST_HASH).write_text(f"{hashlib.sha256(body).hexdigest()}  {MANIFEST}\n")
    with pytest.raises(BundleError, match=r"engines\.fp32\.item_scorer\.io cand_item_emb max shape"):
        load_bundle(bundle)


def test_loose_graphs_keep_external_data_beside_them(tmp_path):
    """OrtRunner's graphs (no manifest): external data named outside the graph's folder, as text or
    through a link, is refused before ONNX Runtime would read it."""
    from serving_fixture import tiny_bundle

    import astro_trt

    bundle = astro_trt.load_bundle(tiny_bundle(tmp_path / "b"))
    (tmp_path / "secret").write_bytes(bytes(1 << 16))
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "link.data").symlink_to(tmp_path / "secret")
    for location in ("../secret", str(tmp_path / "secret"), "link.data"):
        model = onnx.load(bundle.onnx_path("user_encoder", "fp32"))
        table = next(t for t in model.graph.initializer if t.name == "model.behavior_embedding.weight")
        table.ClearField("raw_data")
        table.data_location = TensorProto.EXTERNAL
        table.external_data.add(key="location", value=location)
        onnx.save(model, tmp_path / "g" / "user_encoder.onnx")
        graphs = {g: bundle.onnx_path(g, "fp32") for g in ("item_scorer", "full_model")}
        with pytest.raises(BundleError, match="not a file beside the graph"):
            astro_trt.OrtRunner({"user_encoder": tmp_path / "g" / "user_encoder.onnx", **graphs}, bundle.config,
                                "fp32", item_table=bundle.item_table())
