"""TorchScript-exporter symbolics: each astro custom op becomes one node of the ONNX op of the
same kind in domain ``astro`` (plugins/names.py), whose body exporter/functions.py supplies."""

from __future__ import annotations

from torch.onnx import register_custom_op_symbolic

import astro_trt.exporter.custom_ops  # noqa: F401 - the astro:: torch ops must exist before their symbolics
from astro_trt.plugins.names import ONNX_DOMAIN
from astro_trt.plugins.operators import OPERATORS

_registered: set[int] = set()


def _symbolic(onnx_op: str):
    def emit(g, q, *rest):
        out = g.op(f"{ONNX_DOMAIN}::{onnx_op}", q, *rest)
        # The op returns q's shape and dtype; telling the exporter keeps shape inference intact.
        out.setType(q.type())
        return out

    return emit


def register(opset: int) -> None:
    """Register the symbolics for ``opset`` (idempotent; the registry is per opset version)."""
    if opset in _registered:
        return

    for operator in OPERATORS:
        register_custom_op_symbolic(operator.torch_op, _symbolic(operator.onnx_op), opset)
    _registered.add(opset)
