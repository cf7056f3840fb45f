"""The precision registry is the one owner of precisions and dtypes: a record registered in it
(here temporarily, with monkeypatch) is what the contract, the tolerance policy, the exporter and
its checks, the engine builder and the runners read, with no other table to edit."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch
from conftest import random_model, small_config

from astro_trt import contract, precision
from astro_trt.engines.build import attention_candidates, dtype_name
from astro_trt.errors import ConfigError
from astro_trt.exporter.check import check_graphs
from astro_trt.exporter.export import export_onnx
from astro_trt.model.checkpoint import _header_of
from astro_trt.precision import DTYPES, REGISTRY, DType, Precision
from astro_trt.runtime.torch_runner import TorchRunner
from astro_trt.tolerances import max_abs_limit
from astro_trt.validate.gates import Gates


def test_records_agree_with_each_toolkit():
    for record in DTYPES.values():
        assert record.torch() == getattr(torch, record.name)
        assert onnx.helper.tensor_dtype_to_np_dtype(record.onnx_type()) == record.numpy()
        assert record.numpy().itemsize == record.bytes == torch.empty((), dtype=record.torch()).element_size()
    for p in REGISTRY.values():
        if p.quantized:  # eps is one step of the stored integers relative to the largest (2^-7 for int8)
            assert p.eps == 2.0 ** -(8 * p.weights.dtype.bytes - 1)
            continue
        # eps is the spacing of the format just above 1.0.
        one = torch.ones((), dtype=p.torch())
        assert float(torch.nextafter(one, one + 1) - one) == p.eps
    assert contract.PRECISIONS == tuple(REGISTRY)
    assert precision.REFERENCE == "fp32"


def test_unknown_names_are_config_errors():
    with pytest.raises(ConfigError, match="unknown precision 'fp64'; choose one of"):
        precision.get("fp64")
    with pytest.raises(ConfigError, match="unknown dtype 'complex64'"):
        contract.dtype_bytes("complex64")


def test_an_fp8_kv_like_record_reaches_the_contract(monkeypatch):
    """A one-byte precision: one DType and one Precision record, and the contract's I/O, its
    cache layout and the tolerance policy follow."""
    fp8 = DType("float8_e4m3fn", 1, "FLOAT8E4M3FN", "FP8", "F8_E4M3", "TYPE_FP8")
    monkeypatch.setitem(DTYPES, fp8.name, fp8)
    monkeypatch.setitem(REGISTRY, "fp8", Precision("fp8", fp8, 2.0**-3, ort_cpu=False))
    cfg = small_config()
    io = contract.graph_io(cfg, "fp8")
    assert io[contract.USER_ENCODER].outputs[0].dtype == "float8_e4m3fn"
    assert io[contract.ITEM_SCORER].tensor(contract.KV_CACHE).dtype == "float8_e4m3fn"
    assert io[contract.ITEM_SCORER].tensor("logits").dtype == "float32"  # the contract, whatever the precision
    fp16_bytes = contract.kv_cache_layout(cfg, "fp16").bytes_per_user
    assert contract.kv_cache_layout(cfg, "fp8").bytes_per_user * 2 == fp16_bytes
    assert precision.get("fp8").torch() is torch.float8_e4m3fn
    assert fp8.onnx_type() == onnx.TensorProto.FLOAT8E4M3FN
    assert max_abs_limit("fp8", 0.0) == pytest.approx(2.0 * 2.0**-3)
    assert Gates().half_floor("fp8") == pytest.approx(2.0 * 2.0**-3)
    assert _header_of({"w": torch.zeros(2, dtype=torch.float8_e4m3fn)})["w"]["dtype"] == "F8_E4M3"


def test_a_registered_copy_of_fp16_exports_and_checks(monkeypatch, tmp_path):
    """fp16 under another name: the exporter casts, types and checks the graphs from the record
    alone, and the runners and the engine builder treat it as the half precision it is."""
    monkeypatch.setitem(REGISTRY, "half", dataclasses.replace(REGISTRY["fp16"], name="half"))
    model = random_model(small_config(), seed=3)
    result = export_onnx(model, tmp_path, precision="half", attention="native")
    kv = onnx.load(str(result.paths[contract.USER_ENCODER])).graph.output[0]
    assert kv.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    errors = check_graphs(model, result, batch=3, candidates=5, seed=1)  # within the half tolerance
    assert set(errors) == set(contract.GRAPHS)
    assert 0 < max(errors.values()) < 0.1
    assert TorchRunner(model, "half").dtype is torch.float16
    assert [c.effective for c in attention_candidates(None, "auto", "half")] == ["native", "reference"]
    assert Gates().auc_limit("half") == Gates().auc_delta_half


def test_tensorrt_type_names_map_back():
    class Fake:
        def __init__(self, name: str) -> None:
            self.name = name

    assert [dtype_name(Fake(n)) for n in ("FLOAT", "HALF", "BF16", "INT64", "FP8")] == [
        "float32", "float16", "bfloat16", "int64", "fp8"]
    assert np.dtype(DTYPES["bfloat16"].numpy()).itemsize == 2
