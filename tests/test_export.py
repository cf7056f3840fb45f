"""ONNX export on a tiny random model (random bias tables and temperatures): every graph passes
the full onnx.checker, runs on the CPU and matches the fp32 PyTorch model; the split in ONNX
Runtime equals the full graph pair for pair; both attention lowerings agree; the I/O is the
contract's; bad requests fail before any file is written."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from conftest import random_model, small_config

from astro_trt import contract
from astro_trt.errors import ExportError
from astro_trt.exporter.check import check_graphs, feeds, graph_errors, run_onnx, runner_for
from astro_trt.exporter.export import export_onnx
from astro_trt.exporter.pair_chunks import walk_nodes
from astro_trt.model.astro import ASTRO
from astro_trt.model.synthetic import synthetic_batch
from astro_trt.plugins.names import CANDIDATE_ONNX_OP, MSA_ONNX_OP, ONNX_DOMAIN

# fp32 graphs repeat the float32 arithmetic in another order; errors seen are ~1e-6 on the
# kv_cache and ~1e-7 on logits, so 1e-5 is tighter than the 1e-4 with 10x headroom.
FP32_TOL = 1e-5
VARIANTS = [(p, a) for p in contract.PRECISIONS for a in ("plugin", "native")]


@pytest.fixture(scope="module")
def model() -> ASTRO:
    return random_model(small_config(), seed=3)


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    """All six precision x lowering variants, exported once for the module."""
    root = tmp_path_factory.mktemp("onnx")
    return {(p, a): export_onnx(model, root / f"{p}-{a}", precision=p, attention=a) for p, a in VARIANTS}


@pytest.mark.parametrize(("precision", "attention"), VARIANTS)
def test_graphs_pass_checker_and_match_pytorch(model, exported, precision, attention):
    result = exported[precision, attention]
    # batch 3 and 7 candidates differ from the traced 2 x 3: the dynamic axes are exercised.
    errors = check_graphs(model, result, batch=3, candidates=7, seed=1)
    assert set(errors) == set(contract.GRAPHS)
    if precision == "fp32":
        assert max(errors.values()) <= FP32_TOL, errors


def test_half_precision_is_within_twice_pytorchs_own_error(model, exported):
    batch = synthetic_batch(model.cfg, 4, 6, seed=2, empty_block_prob=0.3)
    for precision in ("fp16", "bf16"):
        for attention in ("plugin", "native"):
            for name, (error, limit) in graph_errors(
                model, exported[precision, attention], batch.history, batch.cand_items
            ).items():
                assert 0 < error <= limit, (precision, attention, name, error, limit)


def test_which_runtime_runs_each_precision(exported):
    # ORT's CPU provider runs fp32 and fp16 (Attention-23 included); bf16 has no CPU kernels,
    # so bf16 graphs are checked in onnx.reference.
    for (precision, _), result in exported.items():
        expected = "onnx.reference" if precision == "bf16" else "onnxruntime"
        assert {runner_for(p) for p in result.paths.values()} == {expected}


@pytest.mark.parametrize("attention", ["plugin", "native"])
def test_split_equals_full_in_onnxruntime(model, exported, attention):
    result = exported["fp32", attention]
    batch = synthetic_batch(model.cfg, 3, 5, seed=4, empty_block_prob=0.3)
    h, cand = batch.history, batch.cand_items
    io = result.io
    kv = run_onnx(result.paths["user_encoder"], feeds(io["user_encoder"], model, h, cand))[contract.KV_CACHE]
    scorer_feeds = feeds(io["item_scorer"], model, h, cand, torch.from_numpy(kv))
    split = run_onnx(result.paths["item_scorer"], scorer_feeds)["logits"]
    full = run_onnx(result.paths["full_model"], feeds(io["full_model"], model, h, cand))["logits"]
    assert split.shape == full.shape == (3, 5, model.cfg.num_tasks)
    np.testing.assert_allclose(split, full, rtol=0, atol=FP32_TOL)


@pytest.mark.parametrize("precision", contract.PRECISIONS)
def test_lowerings_agree(model, exported, precision):
    batch = synthetic_batch(model.cfg, 2, 4, seed=5)
    h, cand = batch.history, batch.cand_items
    plugin, native = exported[precision, "plugin"], exported[precision, "native"]
    got = {
        name: run_onnx(r.paths["full_model"], feeds(r.io["full_model"], model, h, cand))["logits"]
        for name, r in (("plugin", plugin), ("native", native))
    }
    # fp32: same arithmetic reordered. Half: native keeps q/k/v and the mask in half precision
    # (the fused-kernel form), the reference bodies upcast; both sit within their precision's
    # tolerance of the oracle, so they differ by at most the sum of two such tolerances. int8: the
    # same int8 weights; activations are re-quantized per call, so a reordered fp32 sum may flip one
    # rounding step (1/255 of a tensor's range, ~1e-2 of a logit here); seen: equal.
    tol = {"fp32": FP32_TOL, "fp16": 4e-3, "bf16": 3.2e-2, "int8": 1e-2}[precision]
    np.testing.assert_allclose(got["plugin"], got["native"], rtol=0, atol=tol)


def test_graph_io_and_ops_follow_the_contract(model, exported):
    for (precision, attention), result in exported.items():
        assert result.io == {g: contract.graph_io(model.cfg, precision)[g] for g in contract.GRAPHS}
        for name, path in result.paths.items():
            proto = onnx.load(str(path))
            spec = result.io[name]
            assert [v.name for v in proto.graph.input] == spec.input_names
            assert [v.name for v in proto.graph.output] == spec.output_names
            for value, tensor in zip(proto.graph.input, spec.inputs, strict=True):
                dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
                assert dims == list(tensor.shape)
            ops = {(n.domain, n.op_type) for n in walk_nodes(proto.graph)}
            if attention == "plugin":
                expected = {MSA_ONNX_OP} if name == "user_encoder" else {CANDIDATE_ONNX_OP}
                if name == "full_model":
                    expected = {MSA_ONNX_OP}
                assert {op for d, op in ops if d == ONNX_DOMAIN} == expected
                assert {f.name for f in proto.functions} == expected
                assert {o.domain: o.version for o in proto.opset_import}[""] == 18
            else:
                assert not any(d == ONNX_DOMAIN for d, _ in ops) and not proto.functions
                assert ("", "Attention") in ops
                assert {o.domain: o.version for o in proto.opset_import}[""] == 23


def test_manifest_records_graphs_and_kv_layout(model, exported):
    result = exported["fp16", "native"]
    manifest = json.loads(json.dumps(result.to_manifest()))
    assert manifest["precision"] == "fp16" and manifest["attention"] == "native" and manifest["opset"] == 23
    kv = manifest["kv_cache"]
    assert kv["dtype"] == "float16" and kv["shape"] == list(contract.kv_cache_shape(model.cfg))
    assert kv["scorer_history_inputs"] == list(contract.SCORER_HISTORY_INPUTS)
    assert set(manifest["graphs"]) == set(contract.GRAPHS)
    assert manifest["graphs"]["item_scorer"]["io"]["inputs"][0]["name"] == contract.KV_CACHE
    plugin = exported["fp32", "plugin"].to_manifest()
    assert plugin["graphs"]["user_encoder"]["op_domains"] == ["ai.onnx", ONNX_DOMAIN]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"precision": "int4"}, "unknown precision 'int4'"),
        ({"attention": "fused"}, "unknown attention lowering 'fused'"),
        ({"graphs": ["decoder"]}, "unknown graphs ['decoder']"),
    ],
)
def test_bad_options_fail_before_writing(model, tmp_path, kwargs, message):
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=message.replace("[", r"\[").replace("]", r"\]")):
        export_onnx(model, out, **kwargs)
    assert not out.exists()


def test_config_beyond_the_tensor_limit_fails_before_writing(tmp_path):
    # L = 8191: Nb * (L+1)^2 * max(H, NT-1) = 3 * 8192^2 * 31 > 2^31 - 1 elements per user.
    model = ASTRO(small_config(max_len=8191, num_time_buckets=32)).eval()
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=r"max_len=8191 is too long.*2\^31 - 1"):
        export_onnx(model, out)
    assert not out.exists()


def test_subset_of_graphs(model, tmp_path):
    result = export_onnx(model, tmp_path, graphs=["item_scorer"])
    assert set(result.paths) == {"item_scorer"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["item_scorer.onnx"]


def test_export_leaves_the_callers_model_alone(model, exported):
    assert next(model.parameters()).dtype == torch.float32
    assert type(model.ops).__name__ == "ReferenceOps"


def test_the_trace_and_the_function_bodies_share_one_opset():
    # The graph is traced in TRACE_OPSET and the astro function bodies are onnxscript in their own
    # opset module; the model's opset import holds one version, so the two must agree.
    from astro_trt.exporter import functions
    from astro_trt.exporter.export import TRACE_OPSET

    assert functions.op.version == TRACE_OPSET
    assert {o.domain: o.version for o in functions.attention_functions()[0].opset_import}[""] == TRACE_OPSET
