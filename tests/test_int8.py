"""The int8 precision: ONNX Runtime's quantizer on the exported graphs (exporter/quantize.py), its
gates (AUC change <= 1e-3 per task on the ml-100k test split, Kendall tau, logits against
PyTorch's own int8-weight error), the bisect through the quantized graphs, the TensorRT-RTX plan
from the QDQ form, and the bench's ceiling figures."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import random_model, small_config
from validate_bundle_fixture import make_bundle, random_checkpoint

from astro_trt import contract
from astro_trt.exporter.check import feeds, run_onnx
from astro_trt.exporter.export import export_onnx
from astro_trt.exporter.pair_chunks import initializers, walk_nodes
from astro_trt.exporter.quantize import (
    BLOCK_SUFFIX,
    BLOCKS,
    INPUT_MARK,
    split_block_matmuls,
    stack_block_matmuls,
    weight_matmuls,
)
from astro_trt.model.synthetic import synthetic_batch
from astro_trt.precision import STORAGE, get

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ml100k"
STACKED = ("w_q", "w_k", "w_v", "w_1", "w_2")


@pytest.fixture(scope="module")
def model():
    return random_model(small_config(), seed=11)


@pytest.fixture(scope="module")
def fp32(model, tmp_path_factory):
    return export_onnx(model, tmp_path_factory.mktemp("fp32"), precision="fp32", attention="plugin")


@pytest.fixture(scope="module")
def int8(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    return export_onnx(model, root / "onnx", precision="int8", attention="plugin", engine_dir=root / "qdq")


def test_int8_storage_rounds_to_half_a_step_per_group():
    int8 = STORAGE["int8"]
    x = np.random.default_rng(0).standard_normal((3, 5, 7)).astype(np.float32)
    x[1] = 0.0  # an all-zero group keeps scale 1 and stores zeros, never NaN
    stored, scale = int8.encode(x, axes=(1,))  # a scale per [block, channel], as the weights get
    assert stored.dtype == np.int8 and scale.shape == (3, 1, 7)
    assert np.abs(stored).max(axis=1)[[0, 2]].min() == int8.qmax == 127  # max |x| maps to 127
    assert not stored[1].any() and np.all(scale[1] == 1.0)
    err = np.abs(int8.decode(stored, scale) - x)
    assert np.all(err <= scale / 2 + 1e-7)
    half, none = STORAGE["fp16"].encode(x)
    assert half.dtype == np.float16 and none is None
    assert int8.bytes_for(100, groups=4) == 116 and STORAGE["fp32"].bytes_for(100, groups=4) == 400
    assert get("int8").quantized and not get("fp16").quantized and get("int8").dtype.name == "float32"


def test_block_split_is_the_same_fp32_arithmetic(model, fp32, tmp_path):
    proto = onnx.load(str(fp32.paths[contract.ITEM_SCORER]))
    stacked = {n.input[1] for n in weight_matmuls(proto.graph) if n.input[1].rsplit(".", 1)[-1] in STACKED}
    split_block_matmuls(proto)
    onnx.checker.check_model(proto, full_check=True)
    inits = {t.name: t for t in proto.graph.initializer}
    assert all(len(inits[n.input[1]].dims) == 2 for n in weight_matmuls(proto.graph))
    marks = {n.name for n in proto.graph.node if n.op_type == "Identity"}
    assert {w + INPUT_MARK for w in stacked} <= marks  # the bisect's anchors survive
    path = tmp_path / "split.onnx"
    onnx.save_model(proto, str(path))
    batch = synthetic_batch(model.cfg, 3, 5, seed=1)
    kv = run_onnx(fp32.paths[contract.USER_ENCODER], feeds(fp32.io[contract.USER_ENCODER], model, batch.history,
                                                           batch.cand_items))[contract.KV_CACHE]
    inputs = feeds(fp32.io[contract.ITEM_SCORER], model, batch.history, batch.cand_items, torch.from_numpy(kv))
    before = run_onnx(fp32.paths[contract.ITEM_SCORER], inputs)["logits"]
    after = run_onnx(path, inputs)["logits"]
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-5)  # float32 reordering only


def test_int8_graphs_quantize_weight_matmuls_and_nothing_else(int8):
    for name, path in int8.paths.items():
        proto = onnx.load(str(path))
        ops = {n.op_type for n in walk_nodes(proto.graph)}
        assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops, name
        assert "MatMul" not in {n.op_type for n in weight_matmuls(proto.graph)}  # no float weight MatMul left
        tensors = {t.name: t for t in initializers(proto.graph)}  # the full model's Loop body included
        # The embedding tables, biases and LayerNorm stay float32; the weights are int8, symmetric
        # (zero point 0, what TensorRT requires) with a scale per output column (and per block of a
        # stacked weight: [Nb, 1, e]).
        tables = [n.input[0] for n in walk_nodes(proto.graph) if n.op_type == "Gather" and n.input[0] in tensors]
        assert tables and all(tensors[t].data_type == onnx.TensorProto.FLOAT for t in tables), name
        weights = [t for n, t in tensors.items() if n.endswith("_quantized")]
        assert weights and all(t.data_type == onnx.TensorProto.INT8 for t in weights)
        for t in weights:
            zero = onnx.numpy_helper.to_array(tensors[t.name.replace("_quantized", "_zero_point")])
            scale = onnx.numpy_helper.to_array(tensors[t.name.replace("_quantized", "_scale")])
            per_column = (t.dims[-1],) if len(t.dims) == 2 else (t.dims[0], 1, t.dims[-1])
            assert not zero.any() and scale.shape == zero.shape == per_column, t.name
        assert {f.name for f in proto.functions}  # attention stays the float reference body


def test_stacking_moves_the_quantizers_blocks_into_one_batched_int8_matmul(model, fp32, tmp_path):
    """The runtime form (stack_block_matmuls) holds the quantizer's own per-block int8 weights and
    scales, stacked: bit for bit the same numbers, one batched MatMulInteger per weight, one
    activation quantization per input (q, k and v share it), no Split/Concat of blocks."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    proto = split_block_matmuls(onnx.load(str(fp32.paths[contract.ITEM_SCORER])))
    nodes = [n.name for n in weight_matmuls(proto.graph)]
    quantize_dynamic(proto, tmp_path / "blocks.onnx", weight_type=QuantType.QInt8, per_channel=True,
                     nodes_to_quantize=nodes, op_types_to_quantize=["MatMul"], extra_options={"WeightSymmetric": True})
    blocks = onnx.load(str(tmp_path / "blocks.onnx"))
    # A graph not in the quantizer's form (here: before quantizing) is left as it is, never half-rewritten.
    assert stack_block_matmuls(copy.deepcopy(proto)) == proto
    stacked = stack_block_matmuls(copy.deepcopy(blocks))
    onnx.checker.check_model(stacked, full_check=True)
    before = {t.name: onnx.numpy_helper.to_array(t) for t in blocks.graph.initializer}
    after = {t.name: onnx.numpy_helper.to_array(t) for t in stacked.graph.initializer}
    nb = model.cfg.num_blocks
    for layer in range(model.cfg.num_layers):
        for w in STACKED:
            name = f"model.layers.{layer}.{w}"
            for kind, shape in (("quantized", None), ("scale", (1, -1)), ("zero_point", (1, -1))):
                parts = [before[f"{name}.block{i}_{kind}"] for i in range(nb)]
                want = np.stack([p if shape is None else p.reshape(shape) for p in parts])
                assert np.array_equal(after[f"{name}_{kind}"], want), (name, kind)
    ops = [n.op_type for n in stacked.graph.node]
    assert not any(n.name.endswith(BLOCKS) for n in stacked.graph.node)
    weights = len(weight_matmuls(onnx.load(str(fp32.paths[contract.ITEM_SCORER])).graph))
    assert ops.count("MatMulInteger") == weights and not any(BLOCK_SUFFIX in k for k in after)
    # one activation quantization per input: a layer's (q, k, v) and its FFN's two, the fusion
    # layer's likewise, and each of the head's four Linear layers
    assert ops.count("DynamicQuantizeLinear") == 3 * model.cfg.num_layers + 3 + 4
    # the same arithmetic up to the activation's int8 step: one scale per input now, not per block
    batch = synthetic_batch(model.cfg, 3, 5, seed=1)
    kv = run_onnx(fp32.paths[contract.USER_ENCODER], feeds(fp32.io[contract.USER_ENCODER], model, batch.history,
                                                           batch.cand_items))[contract.KV_CACHE]
    inputs = feeds(fp32.io[contract.ITEM_SCORER], model, batch.history, batch.cand_items, torch.from_numpy(kv))
    onnx.save_model(stacked, str(tmp_path / "stacked.onnx"))
    reference = run_onnx(fp32.paths[contract.ITEM_SCORER], inputs)["logits"]
    errors = [np.abs(run_onnx(tmp_path / f, inputs)["logits"] - reference).max()
              for f in ("blocks.onnx", "stacked.onnx")]
    assert 0 < errors[1] < 3 * errors[0], errors


def test_int8_sits_within_its_limit_and_ranks_like_the_oracle(model, int8):
    from astro_trt.exporter.check import graph_errors
    from astro_trt.validate.ranking import mean_kendall_tau

    batch = synthetic_batch(model.cfg, 6, 12, seed=4)
    errors = graph_errors(model, int8, batch.history, batch.cand_items)
    for name, (error, limit) in errors.items():
        # int8 weights move every output (a zero error would mean nothing was quantized).
        assert 1e-4 < error <= limit, (name, error, limit)
    with torch.no_grad():
        oracle = copy.deepcopy(model).eval()(batch.history, batch.cand_items).numpy()
    io = int8.io
    kv = run_onnx(int8.paths[contract.USER_ENCODER], feeds(io[contract.USER_ENCODER], model, batch.history,
                                                           batch.cand_items))[contract.KV_CACHE]
    got = run_onnx(int8.paths[contract.ITEM_SCORER], feeds(io[contract.ITEM_SCORER], model, batch.history,
                                                           batch.cand_items, torch.from_numpy(kv)))["logits"]
    mask = np.ones(got.shape[:2], dtype=bool)
    assert mean_kendall_tau(got[..., 0], oracle[..., 0], mask) > 0.9


def test_the_qdq_form_is_symmetric_and_tensorrt_rtx_builds_an_int8_plan(int8):
    from astro_trt.engines.backend import resolve_backend
    from astro_trt.engines.build import Profile, build_engine

    assert set(int8.engine_sources) == set(contract.GRAPHS)
    proto = onnx.load(str(int8.engine_sources[contract.ITEM_SCORER]))
    tensors = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert dq and all(not tensors[n.input[2]].any() for n in dq if len(n.input) > 2 and n.input[2] in tensors)
    per_channel = [n for n in dq if n.input[0] in tensors and tensors[n.input[0]].dtype == np.int8]
    assert per_channel and all(tensors[n.input[1]].ndim == 1 for n in per_channel)
    try:
        backend = resolve_backend("tensorrt-rtx")
    except Exception as exc:  # noqa: BLE001 - any reason the back end is absent
        pytest.skip(f"TensorRT-RTX not available: {exc}")
    built = build_engine(backend, int8.engine_sources[contract.ITEM_SCORER], int8.io[contract.ITEM_SCORER],
                         Profile(max_batch=2, max_candidates=16))
    assert len(built.plan) > 0 and built.graph == contract.ITEM_SCORER


def test_ml100k_int8_changes_no_task_auc_by_more_than_the_gate(tmp_path):
    """The judged figure: the shipped ml-100k checkpoint in int8 on ONNX Runtime, the whole test
    split, AUC per task against the fp32 oracle (measured 2.2e-5, 4.5e-6; gate 1e-3)."""
    from astro_trt.model.checkpoint import load_checkpoint
    from astro_trt.model.metrics import evaluate
    from astro_trt.runtime.onnxruntime import OrtRunner
    from astro_trt.runtime.torch_runner import TorchRunner
    from astro_trt.tolerances import INT8_AUC_DELTA
    from astro_trt.validate.parity import load_batches

    ckpt = load_checkpoint(EXAMPLE)
    result = export_onnx(ckpt.model, tmp_path, precision="int8", attention="plugin")
    runner = OrtRunner(result.paths, ckpt.config, "int8", threads=1, item_table=ckpt.model.item_table)
    oracle = TorchRunner(ckpt.model)
    batches = load_batches("ml-100k", ckpt.config, EXAMPLE)
    tasks = list(ckpt.config.task_names)
    ours = evaluate(lambda b: runner.score(runner.encode(b.history), b.history, b.cand_items), batches, tasks)
    theirs = evaluate(lambda b: oracle.score(oracle.encode(b.history), b.history, b.cand_items), batches, tasks)
    for task in tasks:
        assert 0 < abs(ours[task]["auc"] - theirs[task]["auc"]) <= INT8_AUC_DELTA, (task, ours, theirs)


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    return make_bundle(root / "bundle", random_checkpoint(root / "ckpt", seed=5), precisions=("fp32", "int8"))


def test_validate_judges_int8_by_rankings_and_a_kendall_tau_below_the_gate_fails(int8_bundle):
    from astro_trt.validate.gates import Gates
    from astro_trt.validate.parity import validate_bundle

    defaults = Gates()
    assert (defaults.auc_limit("int8"), defaults.auc_limit("fp16"), defaults.auc_limit("fp32")) == (1e-3, 5e-3, 1e-4)
    assert defaults.kendall_tau_int8 == 0.98 and defaults.error_ratio("int8") == 4 and defaults.error_ratio("fp16") == 2
    # A tiny random model (d=16) scores near ties on random requests, so its rankings reorder under
    # any rounding; the defaults are for trained models (the ml-100k test above): looser limits here.
    loose = Gates(auc_delta_int8=0.05, kendall_tau_int8=0.5)
    report = validate_bundle(int8_bundle, data="synthetic", runtimes=("ort",), gates=loose)
    assert report.passed, report.summary()
    ours = {g.gate: g for g in report.gates if g.subject.startswith("ort-int8")}
    assert ours["auc_delta_vs_oracle"].limit == 0.05 and ours["kendall_tau"].limit == 0.5
    assert "kendall_tau" not in {g.gate for g in report.gates if g.subject.startswith("ort-fp32")}
    tau = ours["kendall_tau"].value
    assert 0.5 < tau < 1.0
    strict = validate_bundle(int8_bundle, data="synthetic", runtimes=("ort",),
                             gates=Gates(auc_delta_int8=0.05, kendall_tau_int8=tau + 1e-6))
    assert [g.gate for g in strict.failed] == ["kendall_tau"]


def test_bisect_reads_every_stage_of_the_int8_graphs(int8_bundle):
    from astro_trt.validate.bisect import bisect_bundle, stage_plan

    report = bisect_bundle(int8_bundle, precisions="int8")
    assert report.passed, report.summary()
    assert len({s.stage for s in report.stages}) == len(stage_plan(report_cfg(int8_bundle)))
    # int8 weights move every stage after the first projection; PyTorch's yardstick moves too.
    moved = [s for s in report.stages if s.stage == "scorer.layer0.ffn"]
    assert moved and all(s.max_abs > 0 and s.torch_error > 0 for s in moved)


def report_cfg(bundle: Path):
    from astro_trt.engines.bundle import load_bundle

    return load_bundle(bundle).config


def test_the_ceiling_times_both_scorers_and_the_bare_matmuls(int8_bundle):
    from astro_trt.engines.bundle import load_bundle
    from astro_trt.runtime.onnxruntime import OrtRunner
    from astro_trt.validate.bench import ceiling_markdown
    from astro_trt.validate.ceiling import int8_estimate, scorer_ceiling, scorer_macs, weight_macs

    bundle = load_bundle(int8_bundle)
    cfg = bundle.config
    runners = {p: OrtRunner({g: bundle.onnx_path(g, p) for g in contract.GRAPHS}, cfg, p, threads=1,
                                 item_table=bundle.item_table())
               for p in ("int8", "fp32")}
    ceiling = scorer_ceiling(runners, cfg, [32], threads=1, warmup=0, repetitions=1)
    point = ceiling["M=32"]
    assert set(point["ms"]) == {"scorer int8", "scorer fp32", "MatMul fp32", "DynamicQuantizeMatMul int8"}
    assert all(v > 0 for v in point["gops"].values()) and point["int8_speedup"] > 0
    # per candidate: the 2 layers x 2 blocks of one token (3 d^2 + 2 d f) and its attention over L+1
    # keys (2 d (L+1)), then the fusion layer over Nb tokens and the head.
    d, f, nb, fh = cfg.d_model, cfg.ffn_dim, cfg.num_blocks, cfg.fuse_hidden
    per = 2 * nb * (3 * d * d + 2 * d * f + 2 * d * (cfg.max_len + 1)) + nb * (3 * d * d + 2 * d * f) \
        + 2 * nb * d * fh + nb * d * d + d * cfg.num_tasks
    assert scorer_macs(cfg, 32) == 32 * per
    assert weight_macs(cfg, 32) == 32 * (per - 2 * nb * 2 * d * (cfg.max_len + 1))
    # Amdahl over the bare rates: 10 ms of which 6 ms weight MatMuls (3e9 multiply-adds at 1000
    # GOP/s), int8 at 3x: 4 + 2 ms = 1.67x; the measured point carries its own.
    assert int8_estimate(10.0, 3_000_000_000, 1000.0, 3000.0) == pytest.approx(10 / 6)
    bound = int8_estimate(point["ms"]["scorer fp32"], weight_macs(cfg, 32), point["gops"]["MatMul fp32"],
                       point["gops"]["DynamicQuantizeMatMul int8"])
    assert point["int8_estimate"] == pytest.approx(bound) and "Amdahl estimate" in ceiling_markdown(ceiling, 1)
    assert "DynamicQuantizeMatMul int8" in ceiling_markdown(ceiling, 1)
