"""Build-time behaviour of the astro IPluginV3 plugins, exercised with the TensorRT Python classes
installed here (tensorrt_rtx: the classes exist, but RTX cannot put a custom plugin in a network).
Running a plugin inside an engine needs full TensorRT and a GPU; that test skips with the reason."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from astro_trt.errors import BackendError
from astro_trt.plugins import names, operators
from astro_trt.plugins.tensorrt import plugin as plugin_mod
from astro_trt.plugins.tensorrt.spec import CANDIDATE, MSA

trt = pytest.importorskip("tensorrt_rtx", reason="no TensorRT Python classes installed (pip install tensorrt-rtx)")


def _desc(data_type, dims=(2, 3), fmt=None):
    desc = trt.PluginTensorDesc()
    desc.type = data_type
    desc.format = fmt if fmt is not None else trt.TensorFormat.LINEAR
    desc.dims = trt.Dims(list(dims))
    dynamic = trt.DynamicPluginTensorDesc()
    dynamic.desc = desc
    return dynamic


def _io(spec, act=None, table=None, index=None, out=None, thresholds=31):
    """in_out descriptors for ``spec``: activations, tables and index inputs of the given types."""
    act = act or trt.DataType.HALF
    descs = []
    for name in spec.inputs:
        if name in spec.activations:
            descs.append(_desc(act, (2, 4, 8, 16, 32)))
        elif name in spec.tables:
            descs.append(_desc(table or trt.DataType.FLOAT))
        elif name == "time_thresholds":
            descs.append(_desc(index or trt.DataType.INT64, (thresholds,)))
        else:
            descs.append(_desc(index or trt.DataType.INT64))
    return descs + [_desc(out or act, (2, 4, 8, 16, 32))]


def _creator(spec, name=None):
    _, creator_class = plugin_mod.plugin_classes(trt, spec, name or spec.plugin_name)
    return creator_class()


_FIELD_DATA: list[np.ndarray] = []  # PluginField points into its array: keep the arrays alive


def _fields(**values):
    _FIELD_DATA.extend(np.array([value], dtype=np.int32) for value in values.values())
    data = _FIELD_DATA[-len(values):] if values else []
    return trt.PluginFieldCollection([
        trt.PluginField(key, array, trt.PluginFieldType.INT32) for key, array in zip(values, data, strict=True)
    ])


def test_names_match_the_onnx_contract():
    assert operators.MSA.input_names == MSA.inputs and len(MSA.inputs) == 9
    assert operators.CANDIDATE.input_names == CANDIDATE.inputs and len(CANDIDATE.inputs) == 12
    creators = plugin_mod.creators(trt)
    assert sorted((c.name, c.plugin_namespace, c.plugin_version) for c in creators) == sorted(
        (n, "astro", "1") for n in ("AstroMultiScaleSelfAttention", "MultiScaleSelfAttention",
                                    "AstroCandidateAttention", "CandidateAttention"))


@pytest.mark.parametrize("spec", [MSA, CANDIDATE], ids=["msa", "candidate"])
def test_serialization_round_trips_through_the_creator(spec):
    creator = _creator(spec)
    plugin = creator.create_plugin("node", _fields(op_version=1, num_time_thresholds=31), trt.TensorRTPhase.BUILD)
    assert (plugin.plugin_name, plugin.plugin_namespace, plugin.plugin_version) == (spec.plugin_name, "astro", "1")
    serialized = plugin.get_fields_to_serialize()
    assert {serialized[i].name: int(serialized[i].data[0]) for i in range(len(serialized))} == {
        "op_version": 1, "num_time_thresholds": 31}
    revived = creator.create_plugin("node", serialized, trt.TensorRTPhase.RUNTIME)
    assert revived.num_time_thresholds == 31 and revived.phase == trt.TensorRTPhase.RUNTIME
    twin = revived.clone()
    assert twin is not revived and twin.num_time_thresholds == 31 and type(twin) is type(revived)
    default = creator.create_plugin("node", trt.PluginFieldCollection([]), trt.TensorRTPhase.BUILD)
    assert default.num_time_thresholds == 0


def test_bad_attributes_are_refused():
    creator = _creator(MSA)
    with pytest.raises(BackendError, match="op_version 2"):
        creator.create_plugin("node", _fields(op_version=2), trt.TensorRTPhase.RUNTIME)
    with pytest.raises(BackendError, match="unknown attribute 'scale'"):
        creator.create_plugin("node", _fields(scale=3), trt.TensorRTPhase.BUILD)
    plugin = creator.create_plugin("node", _fields(num_time_thresholds=15), trt.TensorRTPhase.BUILD)
    io = _io(MSA, thresholds=31)
    with pytest.raises(BackendError, match="has 31 entries"):
        plugin.configure_plugin(io[:-1], io[-1:])


@pytest.mark.parametrize("spec", [MSA, CANDIDATE], ids=["msa", "candidate"])
def test_output_type_and_shape(spec):
    plugin = _creator(spec).create_plugin("node", None, trt.TensorRTPhase.BUILD)
    for act in (trt.DataType.FLOAT, trt.DataType.HALF, trt.DataType.BF16):
        types = [act if n in spec.activations else trt.DataType.INT64 for n in spec.inputs]
        assert plugin.get_output_data_types(types) == [act]
    with pytest.raises(BackendError, match="q has type INT32"):
        plugin.get_output_data_types([trt.DataType.INT32] * spec.num_inputs)
    # Symbolic dims cannot be built from Python; DimsExprs of the right ranks still exercise the method.
    shapes = plugin.get_output_shapes([trt.DimsExprs(5)] + [trt.DimsExprs(2)] * (spec.num_inputs - 1), [],
                                      trt.IExprBuilder())
    assert len(shapes) == 1 and len(shapes[0]) == 5
    assert spec.output_shape([(2, 4, 8, 7, 32)] + [(1,)] * (spec.num_inputs - 1)) == (2, 4, 8, 7, 32)
    with pytest.raises(BackendError, match="rank 5"):
        plugin.get_output_shapes([trt.DimsExprs(4)] + [trt.DimsExprs(2)] * (spec.num_inputs - 1), [], None)
    with pytest.raises(BackendError, match=f"takes {spec.num_inputs} inputs"):
        spec.output_shape([(1, 1, 1, 1, 1)])


@pytest.mark.parametrize("spec", [MSA, CANDIDATE], ids=["msa", "candidate"])
def test_supported_format_combinations(spec):
    plugin = _creator(spec).create_plugin("node", None, trt.TensorRTPhase.BUILD)
    n = spec.num_inputs

    def accepted(io):
        return all(plugin.supports_format_combination(pos, io, n) for pos in range(n + 1))

    for act in (trt.DataType.FLOAT, trt.DataType.HALF, trt.DataType.BF16):
        assert accepted(_io(spec, act=act))
        assert accepted(_io(spec, act=act, table=trt.DataType.HALF, index=trt.DataType.INT32))
    assert not accepted(_io(spec, act=trt.DataType.INT8, out=trt.DataType.INT8))
    assert not accepted(_io(spec, act=trt.DataType.HALF, out=trt.DataType.FLOAT))  # output must follow q
    assert not accepted(_io(spec, index=trt.DataType.FLOAT))  # lengths/times must be integers
    assert not accepted(_io(spec, table=trt.DataType.INT32))
    mixed = _io(spec, act=trt.DataType.HALF)
    mixed[spec.index("v")] = _desc(trt.DataType.FLOAT, (2, 4, 8, 16, 32))  # v must match q
    assert not plugin.supports_format_combination(spec.index("v"), mixed, n)
    vectorized = _io(spec)
    vectorized[0] = _desc(trt.DataType.HALF, (2, 4, 8, 16, 32), trt.TensorFormat.HWC8)
    assert not plugin.supports_format_combination(0, vectorized, n)
    assert plugin.get_workspace_size([], []) == 0


def test_register_puts_every_creator_in_the_astro_namespace():
    registry = trt.get_plugin_registry()
    made = plugin_mod.register(trt)
    try:
        for creator in made:
            found = registry.get_creator(creator.name, "1", "astro")
            assert found is not None and found.name == creator.name
        assert plugin_mod.register(trt) is made  # a second export in the process reuses the creators
    finally:
        plugin_mod.unregister(trt)
    assert all(registry.get_creator(c.name, "1", "astro") is None for c in made)
    with pytest.raises(BackendError, match="no IPluginV3"):
        plugin_mod.register(np)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None,
                    reason="full TensorRT is not installed (only tensorrt_rtx, which cannot run custom plugins)")
@pytest.mark.gpu
def test_plugin_runs_in_a_full_tensorrt_engine():  # pragma: no cover - needs full TensorRT and a GPU
    import tensorrt
    import torch
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    made = plugin_mod.register(tensorrt)
    assert made and tensorrt.get_plugin_registry().get_creator(names.MSA_ONNX_OP, "1", "astro") is not None
