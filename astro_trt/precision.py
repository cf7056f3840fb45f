"""Precisions and tensor dtypes, defined once.

A ``DType`` is one element type as each toolkit spells it (numpy-style name, torch, ONNX
TensorProto, TensorRT DataType, safetensors, Triton's model config); a ``Precision`` is what a
bundle is built in (fp32, fp16, bf16): the dtype of its floating tensors plus the facts the
exporter, the tolerance policy and the runners need about it. Every table of dtypes and every
test of a precision name reads from here, so adding a precision is adding one ``Precision``
record (and, for a new element type, one ``DType`` record) to the registries below.

torch, onnx and ml_dtypes are imported lazily (astro_trt/lazy.py), on the first accessor that needs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from astro_trt.errors import ConfigError
from astro_trt.lazy import lazy_import

# Each back end's own dtype object, named only when asked for: the CLI and the served models load
# neither torch nor onnx.
torch = lazy_import("torch")
onnx = lazy_import("onnx")
ml_dtypes = lazy_import("ml_dtypes")


@dataclass(frozen=True)
class DType:
    name: str  # numpy-style, as the contract and the manifest write it: float32, int64, ...
    bytes: int
    onnx: str  # onnx.TensorProto attribute: FLOAT, FLOAT16, ...
    trt: str  # tensorrt.DataType attribute: FLOAT, HALF, ...
    safetensors: str  # safetensors header name: F32, F16, ...
    triton: str  # Triton model-config type: TYPE_FP32, ...

    def torch(self) -> Any:
        return getattr(torch, self.name)

    def onnx_type(self) -> int:
        return int(getattr(onnx.TensorProto, self.onnx))

    def numpy(self) -> Any:
        """numpy dtype; bfloat16 through ml_dtypes, as onnx and ONNX Runtime expect."""
        if self.name == "bfloat16":
            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype(self.name)


DTYPES: dict[str, DType] = {d.name: d for d in (
    DType("float32", 4, "FLOAT", "FLOAT", "F32", "TYPE_FP32"),
    DType("float16", 2, "FLOAT16", "HALF", "F16", "TYPE_FP16"),
    DType("bfloat16", 2, "BFLOAT16", "BF16", "BF16", "TYPE_BF16"),
    DType("float64", 8, "DOUBLE", "DOUBLE", "F64", "TYPE_FP64"),
    DType("int64", 8, "INT64", "INT64", "I64", "TYPE_INT64"),
    DType("int32", 4, "INT32", "INT32", "I32", "TYPE_INT32"),
    DType("int8", 1, "INT8", "INT8", "I8", "TYPE_INT8"),
    DType("uint8", 1, "UINT8", "UINT8", "U8", "TYPE_UINT8"),
    DType("bool", 1, "BOOL", "BOOL", "BOOL", "TYPE_BOOL"),
)}


def dtype(name: str) -> DType:
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"unknown dtype '{name}'; choose one of {list(DTYPES)}") from None


def by_torch(torch_dtype: Any) -> DType | None:
    """The record of a torch dtype, or None for one the registry does not know."""
    return next((d for d in DTYPES.values() if str(torch_dtype) == f"torch.{d.name}"), None)


def by_trt(trt_name: str) -> DType | None:
    """The record of a tensorrt DataType by its attribute name (``DataType.HALF.name``)."""
    return next((d for d in DTYPES.values() if d.trt == trt_name), None)


@dataclass(frozen=True)
class Precision:
    name: str  # what --precision and the manifest say: fp32, fp16, bf16
    dtype: DType  # of the weights, the activations and the kv_cache in this precision
    # Unit in the last place at 1.0; the tolerance floor of a half precision is a few of these.
    eps: float
    # Whether ONNX Runtime's CPU provider runs graphs in it (it has no bfloat16 Add, MatMul, ...).
    ort_cpu: bool
    # The oracle's precision: graphs in it are checked against a fixed max abs error instead of
    # PyTorch's own error in that precision, and the model needs no cast.
    reference: bool = False

    @property
    def bytes(self) -> int:
        return self.dtype.bytes

    def torch(self) -> Any:
        return self.dtype.torch()


REGISTRY: dict[str, Precision] = {p.name: p for p in (
    Precision("fp32", DTYPES["float32"], 2.0**-23, ort_cpu=True, reference=True),
    Precision("fp16", DTYPES["float16"], 2.0**-10, ort_cpu=True),
    Precision("bf16", DTYPES["bfloat16"], 2.0**-7, ort_cpu=False),
)}
REFERENCE = next(p.name for p in REGISTRY.values() if p.reference)


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get(name: str) -> Precision:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown precision '{name}'; choose one of {list(REGISTRY)}") from None


def is_reference(name: str) -> bool:
    return get(name).reference


def float_dtypes() -> tuple[DType, ...]:
    """The floating dtypes some precision computes in (what the kernels and plugins accept)."""
    return tuple(dict.fromkeys(p.dtype for p in REGISTRY.values()))


def index_dtypes() -> tuple[DType, ...]:
    """The integer dtypes the attention operators take for their index inputs (lengths, times,
    thresholds): int64, what the contract's history tensors are, and int32."""
    return (DTYPES["int64"], DTYPES["int32"])
