"""The exported graphs parse in TensorRT-RTX (ahead of time, no GPU): both attention lowerings
in fp16, the precision TensorRT's fused attention needs; the native lowering's Attention nodes
must become IAttention layers, and one small engine builds.

head_dim is 16 here: TensorRT-RTX 1.7 has no dedicated fp16 attention kernel for head_dim 8 (the
build fails unless the layer is marked decomposable); 16, 24 and 32 build (seen)."""

from __future__ import annotations

import time

import pytest
from conftest import random_model, small_config

from astro_trt.exporter.export import export_onnx

trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt_rtx is not installed")


def _parse(path):
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(path))
    errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
    return ok, errors, builder, network


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = random_model(small_config(d_model=32, num_heads=2), seed=0)
    root = tmp_path_factory.mktemp("trt")
    return {a: export_onnx(model, root / a, precision="fp16", attention=a) for a in ("plugin", "native")}


@pytest.mark.parametrize("attention", ["plugin", "native"])
def test_fp16_graphs_parse(exported, attention):
    for name, path in exported[attention].paths.items():
        ok, errors, _, network = _parse(path)
        assert ok, (name, errors)
        kinds = {network.get_layer(i).type for i in range(network.num_layers)}
        if attention == "native":
            assert trt.LayerType.ATTENTION_OUTPUT in kinds, name


def test_native_scorer_engine_builds(exported):
    ok, errors, builder, network = _parse(exported["native"].paths["item_scorer"])
    assert ok, errors
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = list(tensor.shape)
        lo, opt, hi = ([n if d == -1 else d for d in shape] for n in (1, 2, 4))
        profile.set_shape(tensor.name, lo, opt, hi)
    config.add_optimization_profile(profile)
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    elapsed = time.perf_counter() - start
    assert plan is not None and plan.nbytes > 0
    print(f"native fp16 item_scorer engine: {elapsed:.1f} s to build, {plan.nbytes} bytes")
