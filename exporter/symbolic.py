"""TorchScript-exporter symbolics: each astro custom op becomes one node of the ONNX op of the
same kind in domain ``astro`` (plugins/names.py), whose body exporter/functions.py supplies."""

from __future__ import annotations

from astro_trt.exporter.custom_ops import CANDIDATE_TORCH_OP, MSA_TORCH_OP
from astro_trt.plugins.names import CANDIDATE_ONNX_OP, MSA_ONNX_OP, ONNX_DOMAIN

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
    from torch.onnx import register_custom_op_symbolic

    register_custom_op_symbolic(MSA_TORCH_OP, _symbolic(MSA_ONNX_OP), opset)
    register_custom_op_symbolic(CANDIDATE_TORCH_OP, _symbolic(CANDIDATE_ONNX_OP), opset)
    _registered.add(opset)
