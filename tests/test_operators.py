"""The operator records of plugins/operators.py against every place that spells an operator's
inputs: the reference and the Triton wrappers, the torch custom ops, the two ONNX function forms
and the TensorRT plugin's spec; and the dispatch against the reference it must reach."""

from __future__ import annotations

import inspect

import pytest
import torch

from astro_trt.errors import DataError
from astro_trt.plugins import operators, reference
from astro_trt.plugins.operators import CANDIDATE, MSA, OPERATORS, Impl
from astro_trt.plugins.tensorrt import spec as trt_spec


@pytest.mark.parametrize("op", OPERATORS, ids=lambda op: op.onnx_op)
def test_reference_signature_is_the_record(op):
    assert tuple(inspect.signature(getattr(reference, op.name)).parameters) == op.input_names


@pytest.mark.parametrize("op", OPERATORS, ids=lambda op: op.onnx_op)
def test_onnx_functions_take_the_record_inputs(op):
    from astro_trt.exporter.functions import function_protos
    from astro_trt.exporter.native import native_functions

    for protos in (function_protos(), native_functions()):
        (proto,) = [f for f in protos if f.name == op.onnx_op]
        assert tuple(proto.input) == op.input_names


@pytest.mark.parametrize("op", OPERATORS, ids=lambda op: op.onnx_op)
def test_torch_custom_op_schema_is_derived(op):
    import astro_trt.exporter.custom_ops  # noqa: F401 - registers the ops

    schema = getattr(torch.ops.astro, op.name).default._schema
    assert tuple(a.name for a in schema.arguments) == op.input_names
    assert len(schema.returns) == 1


def test_trt_spec_roles_come_from_the_record():
    assert trt_spec.CANDIDATE.activations == ("q", "k", "v", "k_cache", "v_cache")
    assert trt_spec.MSA.tables == ("pos_bias", "time_bias", "inv_tau") == trt_spec.CANDIDATE.tables
    assert trt_spec.CANDIDATE.index("request_time") == CANDIDATE.input_names.index("request_time") == 7


def _msa_inputs():
    torch.manual_seed(0)
    b, nb, h, s, dh = 2, 2, 2, 5, 8
    times = torch.sort(torch.randint(0, 10_000, (b, nb, s)), dim=-1).values
    return (torch.randn(b, nb, h, s, dh), torch.randn(b, nb, h, s, dh), torch.randn(b, nb, h, s, dh),
            torch.tensor([[5, 3], [1, 0]]), times, torch.randn(nb, h, s), torch.randn(nb, h, 4),
            torch.tensor([1, 10, 100]), torch.rand(b, nb, h) + 0.5)


def test_dispatch_reaches_the_reference_and_the_custom_op():
    from astro_trt.exporter.custom_ops import ExportOps

    args = _msa_inputs()
    want = reference.multi_scale_self_attention(*args)
    # The same function behind every route: bit-identical, no tolerance needed.
    assert torch.equal(operators.multi_scale_self_attention(*args), want)
    assert torch.equal(operators.dispatch(MSA, args, Impl.REFERENCE), want)
    assert torch.equal(ExportOps.multi_scale_self_attention(*args), want)


def test_dispatch_counts_the_inputs_once():
    args = _msa_inputs()
    with pytest.raises(DataError, match="MultiScaleSelfAttention takes 9 inputs"):
        operators.multi_scale_self_attention(*args[:-1])
    with pytest.raises(DataError, match="CandidateAttention takes 12 inputs"):
        operators.dispatch(CANDIDATE, args, Impl.REFERENCE)

