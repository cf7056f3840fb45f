"""The int8 precision: fp32 graphs quantized by ONNX Runtime's own quantizer
(``onnxruntime.quantization``), never by hand-inserted Q/DQ nodes.

Two forms come out of the same fp32 graph, because the two runtimes want different ones:

- ``dynamic_int8`` (what the bundle's ``onnx/int8/*.onnx`` hold, what ONNX Runtime runs):
  ``quantize_dynamic`` with symmetric per-channel int8 weights. ONNX Runtime fuses each weight
  MatMul into ``DynamicQuantizeMatMul`` (activations quantized per call to uint8, weights int8:
  the VNNI u8s8 kernel). Measured on the climber scorer, one thread: the static QDQ form runs
  ~1.2x slower than this one on ONNX Runtime's CPU provider (``QLinearMatMul`` with int8
  activations plus the Q/DQ around it), and was 1.6x less accurate.
- ``qdq_int8`` (what TensorRT builds its INT8 plans from): ``quantize_static`` in QDQ format,
  symmetric int8 activations (calibrated on synthetic requests of the model's own config) and
  symmetric per-channel int8 weights, the form TensorRT's explicit quantization parses.

Only MatMuls whose right operand is a weight are quantized: the attention score and value
products (activations on both sides), softmax, LayerNorm, GELU, the bias gathers and the embedding
lookups stay float (docs/precision.md records the bisect that chose this).

The model keeps each block's weights stacked as one ``[Nb, d, e]`` tensor (one batched MatMul for
all blocks). ONNX Runtime's quantizer cannot give such a weight a scale per block and channel
(``per_channel=True`` on it fails at run time: "MatMulIntegerToFloat ... b zero point is not
valid"), so ``split_block_matmuls`` first rewrites each batched weight MatMul into one 2-D MatMul
per block (Split the activation on the block axis, Concat the results): the arithmetic is the
same, and each block's [d, e] weight gets its own per-channel scales.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from astro_trt.lazy import lazy_import
from astro_trt.precision import STORAGE

onnx = lazy_import("onnx")
ort_quantization = lazy_import("onnxruntime.quantization")
torch = lazy_import("torch")

BLOCK_SUFFIX = ".block"  # a per-block weight is named <stacked weight>.block<i>
# The quantizer renames a weight and rewires its MatMul, so the bisect's anchors ("the input of the
# MatMul with weight W", "the MatMul feeding the Add with bias B") would be lost. Before quantizing,
# each weight MatMul's input passes through an Identity named ``W + INPUT_MARK`` whose output is
# named ``<the MatMul's output> + INPUT_MARK``: ONNX Runtime and TensorRT drop Identity nodes, the
# bisect (validate/bisect.py) finds its boundaries through them.
INPUT_MARK = ":input"


def weight_matmuls(graph: Any) -> list[Any]:
    """The MatMul nodes of ``graph`` whose right operand is an initializer (a weight)."""
    weights = {t.name for t in graph.initializer}
    return [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def split_block_matmuls(proto: Any) -> Any:
    """Rewrite the weight MatMuls for per-channel int8, in place: MatMuls by stacked [Nb, d, e]
    weights that read the same input (a layer's q, k, v projections) become one MatMul by the
    weights side by side ([d, 3e] per block: the input is quantized once, one larger GEMM), each
    stacked weight becomes Nb 2-D MatMuls (Split on the block axis, Concat after), and every
    weight MatMul's input is marked (INPUT_MARK)."""
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    groups: dict[str, list[Any]] = {}  # input tensor -> the weight MatMuls reading it
    for node in weight_matmuls(graph):
        groups.setdefault(node.input[0], []).append(node)
    first = {group[0].name: group for group in groups.values()}
    grouped = {n.name for group in groups.values() for n in group}
    nodes, added, dropped = [], [], set()
    for node in graph.node:
        if node.name not in grouped:
            nodes.append(node)
            continue
        if node.name not in first:
            continue  # emitted with the first MatMul of its group
        group = first[node.name]
        for n in group:  # one mark per weight, all of the same tensor: the bisect's anchors
            nodes.append(helper.make_node("Identity", [n.input[0]], [n.output[0] + INPUT_MARK],
                                          name=n.input[1] + INPUT_MARK))
        marked = node.output[0] + INPUT_MARK
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in group]
        if weights[0].ndim == 2 or len({w.shape[:-1] for w in weights}) > 1:
            for n in group:
                nodes.append(helper.make_node("MatMul", [n.output[0] + INPUT_MARK, n.input[1]], list(n.output),
                                              name=n.name))
            continue
        dropped.update(n.input[1] for n in group)
        w = np.concatenate(weights, axis=-1)  # [Nb, d, sum of e]
        base = "+".join(n.input[1] for n in group)
        fused = node.output[0] + "/fused" if len(group) > 1 else node.output[0]
        if w.shape[0] == 1:  # the fusion layer: one block, a plain 2-D weight
            added.append(numpy_helper.from_array(np.ascontiguousarray(w[0]), base))
            nodes.append(helper.make_node("MatMul", [marked, base], [fused], name=node.name))
        else:
            blocks = range(w.shape[0])
            parts = [f"{node.name}/in{BLOCK_SUFFIX}{i}" for i in blocks]
            outs = [f"{node.name}/out{BLOCK_SUFFIX}{i}" for i in blocks]
            # The activation is [..., Nb, S, d]: its block axis is the third from the end.
            nodes.append(helper.make_node("Split", [marked], parts, name=f"{node.name}/split", axis=-3,
                                          num_outputs=len(parts)))
            for i in blocks:
                added.append(numpy_helper.from_array(np.ascontiguousarray(w[i]), f"{base}{BLOCK_SUFFIX}{i}"))
                nodes.append(helper.make_node("MatMul", [parts[i], f"{base}{BLOCK_SUFFIX}{i}"], [outs[i]],
                                              name=f"{node.name}{BLOCK_SUFFIX}{i}"))
            nodes.append(helper.make_node("Concat", outs, [fused], name=f"{node.name}/concat", axis=-3))
        if len(group) > 1:
            sizes = f"{node.name}/sizes"
            added.append(numpy_helper.from_array(np.array([x.shape[-1] for x in weights], dtype=np.int64), sizes))
            nodes.append(helper.make_node("Split", [fused, sizes], [n.output[0] for n in group],
                                          name=f"{node.name}/unfuse", axis=-1))
    kept = [t for t in graph.initializer if t.name not in dropped]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + added)
    return proto


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    # The quantizer logs "please run pre-processing" on every call through the root logger;
    # pre-processing (symbolic shape inference) is for convolutional models and changes nothing here.
    # The root logger's level is put back afterwards: the caller's own warnings still show.
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def dynamic_int8(proto: Any) -> Any:
    """``proto`` (fp32, any graph of the contract) -> its int8 form for ONNX Runtime."""
    QuantType = ort_quantization.QuantType  # noqa: N806 - the quantizer's own name
    split_block_matmuls(proto)
    nodes = [n.name for n in weight_matmuls(proto.graph)]
    with _quiet_quantizer(), tempfile.TemporaryDirectory(prefix="astro-int8-") as tmp:
        out = Path(tmp) / "int8.onnx"
        ort_quantization.quantize_dynamic(proto, out, weight_type=QuantType.QInt8, per_channel=True,
                                          nodes_to_quantize=nodes, op_types_to_quantize=["MatMul"],
                                          extra_options={"WeightSymmetric": True})
        return onnx.load(str(out))


class _Feeds:
    """CalibrationDataReader over a list of feed dicts (what quantize_static reads)."""

    def __init__(self, feeds: Iterable[Mapping[str, np.ndarray]]) -> None:
        self._it = iter(list(feeds))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return dict(next(self._it, None) or {}) or None


def qdq_int8(proto: Any, calibration: Iterable[Mapping[str, np.ndarray]]) -> Any:
    """``proto`` (fp32) -> its QDQ int8 form for TensorRT, activations calibrated (min/max) on
    ``calibration`` (feed dicts of the graph's inputs)."""
    q = ort_quantization
    split_block_matmuls(proto)
    nodes = [n.name for n in weight_matmuls(proto.graph)]
    reader = type("Reader", (_Feeds, q.CalibrationDataReader), {})(calibration)
    with _quiet_quantizer(), tempfile.TemporaryDirectory(prefix="astro-qdq-") as tmp:
        src, out = Path(tmp) / "fp32.onnx", Path(tmp) / "qdq.onnx"
        onnx.save_model(proto, str(src))
        q.quantize_static(src, out, reader, quant_format=q.QuantFormat.QDQ, per_channel=True,
                          activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8, nodes_to_quantize=nodes,
                        op_types_to_quantize=["MatMul"],
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
        return onnx.load(str(out))


def fake_quantize_weights(model: Any) -> Any:
    """PyTorch's own int8 yardstick, in place: every weight the graphs quantize (each block's
    [d, e] slice of a stacked weight, each Linear of the fusion head) rounded to symmetric int8
    with a scale per output channel, as ``dynamic_int8`` stores it. The error of this model against
    the oracle is what int8 weights alone cost; the runtime adds its activation rounding."""
    int8 = STORAGE["int8"]
    with torch.no_grad():
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("w_q", "w_k", "w_v", "w_1", "w_2"):  # [Nb, d_in, d_out]: a scale per block and column
                axes: tuple[int, ...] = (param.dim() - 2,)
            elif leaf == "weight" and ".fusion." in f".{name}" and param.dim() == 2:  # Linear [out, in]
                axes = (1,)
            else:
                continue
            stored, scale = int8.encode(param.detach().float().numpy(), axes)
            param.copy_(torch.from_numpy(int8.decode(stored, scale)))
    return model


__all__ = ["dynamic_int8", "fake_quantize_weights", "qdq_int8", "split_block_matmuls", "weight_matmuls"]
