"""Precision variants as strongly typed graphs.

TensorRT 11 and TensorRT-RTX take each layer's precision from the tensor types in the graph, so a
half-precision graph is traced from the model cast to that dtype: the weights, the matmuls and the
kv_cache are fp16/bf16 in the graph itself, the attention bodies upcast to float32 internally (as
the reference does), ids stay int64 and the logits are cast to float32 at the end (the contract).
"""

from __future__ import annotations

import copy
import types

import torch
import torch.nn.functional as F

from astro_trt.exporter.custom_ops import ExportOps
from astro_trt.exporter.quantize import fake_quantize_weights
from astro_trt.model.astro import ASTRO, BlockLayer
from astro_trt.precision import get


def model_in_precision(model: ASTRO, precision: str, *, export_ops: bool) -> ASTRO:
    """A detached eval-mode copy of ``model`` in ``precision``; the caller's model is untouched.
    ``export_ops`` routes attention through the astro custom ops (for tracing). A quantized
    precision is traced in float and quantized as a graph (exporter/quantize.py); the copy that is
    not traced is PyTorch's own yardstick in it, its weights rounded as the graph stores them."""
    record = get(precision)
    out = copy.deepcopy(model).eval()
    _freeze_temperatures(out)
    out = out.to(record.torch())
    if export_ops:
        out.ops = ExportOps()
    elif record.quantized:
        fake_quantize_weights(out)
    return out


def _frozen_inv_tau(layer: BlockLayer, scenario: torch.Tensor) -> torch.Tensor:
    return layer.inv_tau_table[:, scenario].transpose(0, 1)


def _freeze_temperatures(model: ASTRO) -> None:
    """Replace each layer's softplus temperature by its [Nb, R, H] inverse table, computed once in
    float32 before the model is cast. The table depends on weights only, ONNX has no bfloat16
    Softplus before opset 22, and one rounding of the final value is more accurate than running
    softplus in half precision. BlockLayer.inv_tau is otherwise unchanged: same gather, same axes."""
    for layer in model.modules():
        if isinstance(layer, BlockLayer):
            with torch.no_grad():
                table = 1.0 / (F.softplus(layer.theta.float()) + 0.01)
            layer.register_buffer("inv_tau_table", table, persistent=False)
            layer.inv_tau = types.MethodType(_frozen_inv_tau, layer)
