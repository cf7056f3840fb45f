"""The two attention operators, each described once: its inputs in call order, their roles and
shapes, and its names in torch, ONNX and TensorRT. The torch custom-op schema
(exporter/custom_ops.py), the TensorRT plugin's inputs and types (plugins/tensorrt/spec.py), the
Triton wrappers' argument binding and kernel launch (plugins/kernels/ops.py) and the kernel
benchmark read these records; the reference (plugins/reference.py) and the ONNX functions
(exporter/functions.py, exporter/native.py) are checked against them by the tests.

``multi_scale_self_attention`` and ``candidate_attention`` below are the one entry point per
operator: they check the argument count once and dispatch on ``Impl`` (the pattern of
generative-recommenders' HSTU ops), for the model, the exporter and the TensorRT plugin alike.
Adding an input is a change to one record here plus the implementations' arithmetic.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from astro_trt.errors import DataError
from astro_trt.lazy import lazy_import
from astro_trt.plugins import names

# Both import torch (and the kernels triton): loaded by the first dispatch, not by the records here.
_TRITON = lazy_import("astro_trt.plugins.kernels.ops")
_REFERENCE = lazy_import("astro_trt.plugins.reference")

# Roles: activations share q's dtype (and the output takes it); tables are float bias tables and
# temperatures, read as float32; indices are lengths, times and thresholds (precision.index_dtypes).
ACTIVATION, TABLE, INDEX = "activation", "table", "index"


@dataclass(frozen=True)
class Input:
    name: str
    role: str
    shape: str  # as plugins/reference.py documents it


@dataclass(frozen=True)
class Operator:
    name: str  # the Python function (reference, kernels, torch op ``astro::<name>``)
    onnx_op: str
    plugin: str
    inputs: tuple[Input, ...]

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.inputs)

    def with_role(self, role: str) -> tuple[str, ...]:
        return tuple(i.name for i in self.inputs if i.role == role)

    @property
    def torch_op(self) -> str:
        return f"{names.ONNX_DOMAIN}::{self.name}"

    def torch_schema(self) -> str:
        """The torch.library schema: every input a Tensor, one Tensor out (q's shape and dtype)."""
        return "(" + ", ".join(f"Tensor {n}" for n in self.input_names) + ") -> Tensor"

    def bind(self, args: tuple[Any, ...]) -> dict[str, Any]:
        """The positional arguments of one call by input name; the count is checked here, once."""
        if len(args) != len(self.inputs):
            raise DataError(f"{self.onnx_op} takes {len(self.inputs)} inputs {list(self.input_names)}, got "
                            f"{len(args)}; pass them in that order (plugins/operators.py)")
        return dict(zip(self.input_names, args, strict=True))


def _activations(names_: tuple[str, ...], rows: str) -> tuple[Input, ...]:
    return tuple(Input(name, ACTIVATION, f"[B, Nb, H, {rows}, dh]") for name in names_)


# Both operators end with the bias tables, the time thresholds and the temperatures.
_COMMON_TAIL = (
    Input("pos_bias", TABLE, "[Nb, H, P]"),
    Input("time_bias", TABLE, "[Nb, H, NT]"),
    Input("time_thresholds", INDEX, "[NT - 1]"),
    Input("inv_tau", TABLE, "[B, Nb, H]"),
)
MSA = Operator("multi_scale_self_attention", names.MSA_ONNX_OP, names.MSA_PLUGIN, (
    *_activations(("q", "k", "v"), "S"),
    Input("lengths", INDEX, "[B, Nb]"), Input("times", INDEX, "[B, Nb, S]"),
    *_COMMON_TAIL,
))
CANDIDATE = Operator("candidate_attention", names.CANDIDATE_ONNX_OP, names.CANDIDATE_PLUGIN, (
    *_activations(("q", "k", "v"), "M"), *_activations(("k_cache", "v_cache"), "L"),
    Input("lengths", INDEX, "[B, Nb]"), Input("hist_times", INDEX, "[B, Nb, L]"), Input("request_time", INDEX, "[B]"),
    *_COMMON_TAIL,
))
OPERATORS = (MSA, CANDIDATE)


class Impl(enum.Enum):
    """Who computes an operator: the PyTorch reference (the oracle) or the Triton kernels."""

    REFERENCE = "reference"
    TRITON = "triton"


def implementation(op: Operator, impl: Impl) -> Callable[..., Any]:
    """The function of ``impl`` for ``op``; the Triton module is imported only when asked for."""
    return getattr(_TRITON if impl is Impl.TRITON else _REFERENCE, op.name)


def dispatch(op: Operator, args: tuple[Any, ...], impl: Impl = Impl.REFERENCE) -> Any:
    """``op`` computed by ``impl``: the count of ``args`` checked once, then the implementation."""
    return implementation(op, impl)(*op.bind(args).values())


def multi_scale_self_attention(*args: Any, impl: Impl = Impl.REFERENCE) -> Any:
    """MultiScaleSelfAttention by ``impl``; inputs as MSA lists them."""
    return dispatch(MSA, args, impl)


def candidate_attention(*args: Any, impl: Impl = Impl.REFERENCE) -> Any:
    """CandidateAttention by ``impl``; inputs as CANDIDATE lists them."""
    return dispatch(CANDIDATE, args, impl)


BY_ONNX_OP: dict[str, Operator] = {op.onnx_op: op for op in OPERATORS}


class Ops:
    """model/astro.py's AttentionOps over one implementation (a subclass names it)."""

    impl: Impl = Impl.REFERENCE

    def multi_scale_self_attention(self, *args: Any) -> Any:
        return dispatch(MSA, args, self.impl)

    def candidate_attention(self, *args: Any) -> Any:
        return dispatch(CANDIDATE, args, self.impl)
