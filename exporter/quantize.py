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
all blocks). ONNX Runtime's quantizer gives a weight a scale per index of one axis at most, so on a
stacked weight ``per_channel=True`` shares a column's scale across blocks, and its 1-D scales fail
at run time ("MatMulIntegerToFloat ... b zero point is not valid"). So ``split_block_matmuls``
first rewrites each batched weight MatMul into one 2-D MatMul per block (Split the activation on
the block axis, one Split for the MatMuls reading it, Concat the results): the quantizer then gives
each block's [d, e] weight its own per-channel scales and quantizes each block's activation once
for q, k and v. For ONNX Runtime, ``stack_block_matmuls`` then moves the quantizer's per-block
int8 weights and scales back into one ``[Nb, d, e]`` weight with ``[Nb, 1, e]`` scales (ONNX
Runtime's int8 MatMul kernels take a scale per batch and column of a batched weight), and the
Split/Concat go: measured on the climber scorer they cost ~2 ms of ~20, and one batched int8 GEMM
per weight ran 1.2-1.4x faster than the Nb per-block ones (docs/precision.md).
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
BLOCKS = "/blocks"  # the Split of a stacked weight MatMul's input into its blocks
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


def _replace(graph: Any, nodes: list[Any], dropped: set[str], added: list[Any]) -> None:
    """Give ``graph`` the nodes ``nodes`` and its initializers less ``dropped`` plus ``added``."""
    kept = [t for t in graph.initializer if t.name not in dropped]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + added)


def split_block_matmuls(proto: Any) -> Any:
    """Rewrite the weight MatMuls for per-channel int8, in place: each stacked [Nb, d, e] weight
    becomes Nb 2-D [d, e] weights, one MatMul per block, so that the quantizer gives every block
    and output channel its own scale. The MatMuls reading the same input (a layer's q, k, v)
    share one Split of it into blocks (``BLOCKS``), so the quantizer quantizes each block's
    activation once for all of them; a Concat per weight puts its blocks back together. A
    one-block weight ([1, d, e], the fusion layer's) becomes a plain 2-D weight. Every weight
    MatMul's input is marked (INPUT_MARK)."""
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
        weights = {n.name: numpy_helper.to_array(inits[n.input[1]]) for n in group}
        blocks = {w.shape[0] for w in weights.values() if w.ndim == 3 and w.shape[0] > 1}
        parts = [f"{node.name}/in{BLOCK_SUFFIX}{i}" for i in range(max(blocks, default=0))]
        if parts:  # the activation is [..., Nb, S, d]: its block axis is the third from the end
            nodes.append(helper.make_node("Split", [marked], parts, name=node.name + BLOCKS, axis=-3,
                                          num_outputs=len(parts)))
        for n in group:
            w = weights[n.name]
            if w.ndim == 2:
                nodes.append(helper.make_node("MatMul", [n.output[0] + INPUT_MARK, n.input[1]], list(n.output),
                                              name=n.name))
                continue
            dropped.add(n.input[1])
            if w.shape[0] == 1:  # the fusion layer: one block, a plain 2-D weight
                added.append(numpy_helper.from_array(np.ascontiguousarray(w[0]), n.input[1]))
                nodes.append(helper.make_node("MatMul", [marked, n.input[1]], list(n.output), name=n.name))
                continue
            outs = [f"{n.name}/out{BLOCK_SUFFIX}{i}" for i in range(len(w))]
            for i, (part, out) in enumerate(zip(parts, outs, strict=True)):
                block = f"{n.input[1]}{BLOCK_SUFFIX}{i}"
                added.append(numpy_helper.from_array(np.ascontiguousarray(w[i]), block))
                nodes.append(helper.make_node("MatMul", [part, block], [out], name=f"{n.name}{BLOCK_SUFFIX}{i}"))
            nodes.append(helper.make_node("Concat", outs, list(n.output), name=f"{n.name}/concat", axis=-3))
    _replace(graph, nodes, dropped, added)
    return proto


def _block_chain(concat: Any, producers: Mapping[str, Any], inits: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The quantizer's form of one stacked weight's Nb block MatMuls, read back from the Concat
    that joins them: per block, MatMulInteger(x_q, w_q, x_zp, w_zp) -> Cast -> Mul by
    (x_scale * w_scale). None where the graph is in any other form."""
    chain = []
    for out in concat.input:
        mul = producers.get(out)
        cast = producers.get(mul.input[0]) if mul is not None and mul.op_type == "Mul" else None
        matmul = producers.get(cast.input[0]) if cast is not None and cast.op_type == "Cast" else None
        scales = producers.get(mul.input[1]) if mul is not None else None
        if (matmul is None or matmul.op_type != "MatMulInteger" or len(matmul.input) != 4 or scales is None
                or scales.op_type != "Mul" or not {matmul.input[1], matmul.input[3], scales.input[1]} <= set(inits)):
            return None
        chain.append({"x": matmul.input[0], "w": matmul.input[1], "w_zp": matmul.input[3], "w_scale": scales.input[1],
                      "nodes": (mul, cast, matmul, scales)})
    return chain


def stack_block_matmuls(proto: Any) -> Any:
    """The inverse of ``split_block_matmuls`` on the quantizer's output, in place: the Nb int8
    MatMuls of each stacked weight become one batched MatMulInteger by the weight stacked again
    ([Nb, d, e] int8, zero points and scales [Nb, 1, e]: a scale per block and channel, which ONNX
    Runtime's int8 MatMul kernels take for a batched weight), its input quantized once
    (DynamicQuantizeLinear over all blocks) instead of per block, and the Split/Concat around them
    gone. The int8 weights, scales and zero points are the quantizer's, moved, not recomputed.
    ONNX Runtime then fuses each into one DynamicQuantizeMatMul / MatMulIntegerToFloat."""
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    replace: dict[str, list[Any]] = {}  # name of the first node dropped -> the nodes in its place
    dropped_nodes, dropped_inits, added = set(), set(), []
    for split in [n for n in graph.node if n.op_type == "Split" and n.name.endswith(BLOCKS)]:
        quantized = [consumers.get(part, []) for part in split.output]
        if not all(len(c) == 1 and c[0].op_type == "DynamicQuantizeLinear" for c in quantized):
            continue
        dqls = [c[0] for c in quantized]
        concats = {n.name: n for d in dqls for m in consumers.get(d.output[0], [])
                   for c in consumers.get(m.output[0], []) for mul in consumers.get(c.output[0], [])
                   for n in consumers.get(mul.output[0], []) if n.op_type == "Concat"}
        chains = {name: _block_chain(concat, producers, inits) for name, concat in concats.items()}
        if not chains or any(chain is None or [b["x"] for b in chain] != [d.output[0] for d in dqls]
                             for chain in chains.values()):
            continue  # not block i of the input in place i of every Concat: left as it is
        readers = {n.name for d in dqls for t in d.output for n in consumers.get(t, [])}
        if readers != {n.name for chain in chains.values() for b in chain for n in b["nodes"][2:]}:
            continue  # a quantized block is read by something else too
        base = split.input[0]
        x_q, x_scale, x_zp = (f"{split.name}/{t}" for t in ("quantized", "scale", "zero_point"))
        new = [helper.make_node("DynamicQuantizeLinear", [base], [x_q, x_scale, x_zp], name=f"{split.name}/quantize")]
        for name, chain in chains.items():
            weight = chain[0]["w"].rsplit(BLOCK_SUFFIX, 1)[0].removesuffix("_quantized")
            stacked = {key: np.stack([numpy_helper.to_array(inits[block[key]]) for block in chain])
                       for key in ("w", "w_zp", "w_scale")}
            w, w_zp, w_scale = (f"{weight}_{t}" for t in ("quantized", "zero_point", "scale"))
            added += [numpy_helper.from_array(stacked["w"], w),
                      numpy_helper.from_array(stacked["w_zp"][:, None, :], w_zp),
                      numpy_helper.from_array(stacked["w_scale"][:, None, :], w_scale)]
            out = concats[name].output[0]
            new += [helper.make_node("Mul", [x_scale, w_scale], [f"{name}/scales"], name=f"{name}/scales"),
                    helper.make_node("MatMulInteger", [x_q, w, x_zp, w_zp], [f"{name}/int32"], name=f"{name}/int8"),
                    helper.make_node("Cast", [f"{name}/int32"], [f"{name}/float"], name=f"{name}/cast",
                                     to=onnx.TensorProto.FLOAT),
                    helper.make_node("Mul", [f"{name}/float", f"{name}/scales"], [out], name=f"{name}/scaled")]
            for block in chain:
                dropped_nodes.update(n.name for n in block["nodes"])
                dropped_inits.update(block[key] for key in ("w", "w_zp", "w_scale"))
            dropped_nodes.add(name)
        dropped_nodes.update([split.name, *(d.name for d in dqls)])
        replace[split.name] = new
    nodes = []
    for node in graph.node:
        nodes.extend(replace.get(node.name, []))
        if node.name not in dropped_nodes:
            nodes.append(node)
    _replace(graph, nodes, dropped_inits, added)
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
        return stack_block_matmuls(onnx.load(str(out)))


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


__all__ = ["dynamic_int8", "fake_quantize_weights", "qdq_int8", "split_block_matmuls", "stack_block_matmuls",
           "weight_matmuls"]
