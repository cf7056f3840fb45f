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
class Storage:
    """How float data is stored: as is in a float type, or as integers times a float scale
    (symmetric, zero point 0: what TensorRT's INT8 requires). One family for every stored float
    tensor: a precision's dense weights (a scale per output channel), the served per-user cache (a
    scale per head and block) and, later, the item table (a scale per row). Which axes share one
    scale is the caller's: ``encode`` takes the axes a scale spans."""

    name: str  # fp32, fp16, int8: what a --cache-dtype / --item-table style option says
    dtype: DType  # of the stored elements
    scaled: bool = False  # integers with a float32 scale per group

    @property
    def qmax(self) -> int:
        """Largest stored magnitude of a scaled type: 127 for int8 (-128 is left unused: symmetric)."""
        return 2 ** (8 * self.dtype.bytes - 1) - 1

    def encode(self, x: Any, axes: tuple[int, ...] = ()) -> tuple[Any, Any]:
        """float array -> (stored array, float32 scale broadcastable against it; None unscaled).
        A scale spans ``axes`` (reduced with keepdims): max |x| over them maps to qmax."""
        if not self.scaled:
            return np.asarray(x).astype(self.dtype.numpy()), None
        x = np.asarray(x, dtype=np.float32)
        amax = np.abs(x).max(axis=axes, keepdims=True) if axes else np.abs(x)
        # A scale that underflows to 0 (max |x| below qmax subnormals) would divide by zero: 1 instead.
        scale = (amax / self.qmax).astype(np.float32)
        scale = np.where(scale > 0, scale, np.float32(1.0))
        stored = np.clip(np.rint(x / scale), -self.qmax, self.qmax).astype(self.dtype.numpy())
        return stored, scale

    def decode(self, stored: Any, scale: Any = None) -> Any:
        """The float32 values a stored array stands for."""
        out = np.asarray(stored).astype(np.float32)
        return out * scale if self.scaled else out

    def bytes_for(self, elements: int, groups: int = 0) -> int:
        """Bytes of ``elements`` values stored with ``groups`` float32 scales."""
        return elements * self.dtype.bytes + (4 * groups if self.scaled else 0)


STORAGE: dict[str, Storage] = {s.name: s for s in (
    Storage("fp32", DTYPES["float32"]),
    Storage("fp16", DTYPES["float16"]),
    Storage("int8", DTYPES["int8"], scaled=True),
)}


def storage(name: str) -> Storage:
    try:
        return STORAGE[name]
    except KeyError:
        raise ConfigError(f"unknown storage '{name}'; choose one of {list(STORAGE)}") from None


@dataclass(frozen=True)
class Precision:
    name: str  # what --precision and the manifest say: fp32, fp16, bf16
    dtype: DType  # of the weights, the activations and the kv_cache in this precision
    # Unit in the last place at 1.0 (a quantized precision: one step of its integers relative to
    # the largest, 2^-7 for int8); the tolerance floor of a non-reference precision is a few of these.
    eps: float
    # Whether ONNX Runtime's CPU provider runs graphs in it (it has no bfloat16 Add, MatMul, ...).
    ort_cpu: bool
    # The oracle's precision: graphs in it are checked against a fixed max abs error instead of
    # PyTorch's own error in that precision, and the model needs no cast.
    reference: bool = False
    # How the dense graphs' weights are stored when not in ``dtype``: int8 keeps float32 I/O,
    # activations and kv_cache and quantizes the weight MatMuls (exporter/quantize.py).
    weights: Storage | None = None

    @property
    def quantized(self) -> bool:
        return self.weights is not None and self.weights.scaled

    @property
    def compute(self) -> str:
        """What its graphs and engines compute in, in words (what `inspect` prints)."""
        if self.weights is None:
            return self.dtype.name
        return f"{self.weights.name} weight MatMuls (a scale per channel), {self.dtype.name} elsewhere"

    @property
    def bytes(self) -> int:
        return self.dtype.bytes

    def torch(self) -> Any:
        return self.dtype.torch()


REGISTRY: dict[str, Precision] = {p.name: p for p in (
    Precision("fp32", DTYPES["float32"], 2.0**-23, ort_cpu=True, reference=True),
    Precision("fp16", DTYPES["float16"], 2.0**-10, ort_cpu=True),
    Precision("bf16", DTYPES["bfloat16"], 2.0**-7, ort_cpu=False),
    # eps: one int8 step at the largest magnitude of a channel (1/127 ~ 2^-7).
    Precision("int8", DTYPES["float32"], 2.0**-7, ort_cpu=True, weights=STORAGE["int8"]),
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


def is_quantized(name: str) -> bool:
    return get(name).quantized


def float_dtypes() -> tuple[DType, ...]:
    """The floating dtypes some precision computes in (what the kernels and plugins accept)."""
    return tuple(dict.fromkeys(p.dtype for p in REGISTRY.values()))


def index_dtypes() -> tuple[DType, ...]:
    """The integer dtypes the attention operators take for their index inputs (lengths, times,
    thresholds): int64, what the contract's history tensors are, and int32."""
    return (DTYPES["int64"], DTYPES["int32"])
