"""The full model in bounded memory: its graph wrapped in an ONNX Loop over chunks of pairs.

The full model (the baseline) runs one sequence of L + 1 tokens per (user, candidate) pair, and
every attention materialises [pairs, Nb, H, L + 1, L + 1] scores and biases: ONNX Runtime's peak
grew with B x M (climber, 1 user x 1024 candidates: 1.1 GB; 2.1 GB with its memory pattern on;
the max profile of 8 x 1024 needed 9.7 GB). Nothing in a pair depends on another pair, so the
exported ``full_model.onnx`` runs the traced graph once per chunk of at most ``pairs_per_chunk``
pairs inside one Loop: each iteration gathers its pairs' users' history rows and candidate ids,
runs the unchanged graph on them as ``batch = chunk, candidates = 1``, and the Loop stacks the
logits. Every pair is still computed from scratch; only how many are in flight at once is bounded,
so peak memory no longer grows with B x M.

Chunks are equal-sized (the Loop's scan output needs one shape per iteration): ``trips =
ceil(B*M / pairs_per_chunk)`` and ``chunk = ceil(B*M / trips)``; the last chunk repeats the last
pair for at most ``trips - 1`` padding slots, which are sliced off.

The stored form is the chunked one; ``runtime_form`` is the one place a consumer's form is made
from it, at load time (no later stage reshapes the stored graph itself). TensorRT engines are
built from ``unchunk(model)``, the traced graph as it was: a GPU has the memory, and a loop of
small chunks would serialise work the GPU runs in parallel.

ONNX Runtime merges identical subexpressions (common-subexpression elimination) in a model's main
graph but not inside a Loop body: the full model's layers all compute the same time buckets from
the same times, which the main graph computes once and the body once per layer (+9 % time for
climber's 2 layers, +20-35 % for climber-large's 12). ``for_onnxruntime`` hands ONNX Runtime the
body with the attention functions inlined and those duplicates merged, which restores the plain
graph's speed (within 2 %); the file keeps its function nodes for TensorRT's plugins.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import onnx
import onnx.inliner
import onnx.numpy_helper
from onnx import TensorProto, helper

from astro_trt import contract
from astro_trt.config import ASTROConfig
from astro_trt.lazy import lazy_import
from astro_trt.model.resources import attention_bytes

ir = lazy_import("onnxscript.ir")  # onnxscript costs ~1 s to import; only for_onnxruntime needs it
passes = lazy_import("onnxscript.ir.passes.common")

# What the exported full model may hold in flight: it runs its (user, candidate) pairs in chunks
# whose estimated attention stays within this (exporter/pair_chunks.py).
FULL_MODEL_CHUNK_BYTES = 512 * 2**20


def full_model_pairs_per_chunk(cfg: ASTROConfig) -> int:
    """Pairs the exported full model runs at once: as many sequences of L + 1 tokens as fit
    FULL_MODEL_CHUNK_BYTES by attention_bytes (165 for climber, 5 for climber-large)."""
    return max(1, FULL_MODEL_CHUNK_BYTES // attention_bytes(cfg, 1, cfg.max_len + 1))


LOOP_NAME = "astro_pair_chunks"  # the Loop node that marks a chunked graph
PREFIX = "pair_chunks/"  # every value and node this module adds, and the body's renamed ones
# The full model's inputs: the history, items as their looked-up rows (contract.ITEM_ROWS), then the candidates' rows.
_HISTORY = tuple(contract.ITEM_ROWS.get(n, n) for n in contract.HISTORY_INPUTS)
_CANDIDATES = contract.CAND_ITEM_EMB
_INPUTS = (*_HISTORY, _CANDIDATES)


def _subgraphs(graph: onnx.GraphProto):
    """The graphs held by ``graph``'s nodes (a Loop's body), one level down."""
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield attribute.g
            yield from attribute.graphs


def walk_nodes(graph: onnx.GraphProto):
    """Every node of ``graph`` and of its subgraphs (a Loop's body included), outer first."""
    yield from graph.node
    for sub in _subgraphs(graph):
        yield from walk_nodes(sub)


def initializers(graph: onnx.GraphProto):
    """Every initializer of ``graph`` and of its subgraphs (a chunked model keeps its weights in
    the Loop's body)."""
    yield from graph.initializer
    for sub in _subgraphs(graph):
        yield from initializers(sub)


def is_chunked(model: onnx.ModelProto) -> bool:
    return any(n.op_type == "Loop" and n.name == LOOP_NAME for n in model.graph.node)


def _const(name: str, value: int | list[int]) -> onnx.NodeProto:
    dims = [len(value)] if isinstance(value, list) else []
    values = value if isinstance(value, list) else [value]
    return helper.make_node("Constant", [], [PREFIX + name], name=PREFIX + name,
                            value=helper.make_tensor(PREFIX + name, TensorProto.INT64, dims, values))


def _node(op: str, inputs: list[str], output: str, **attrs) -> onnx.NodeProto:
    """A node of this module: its inputs and output prefixed, except the graph's own inputs."""
    def full(name: str) -> str:
        return name if name in _INPUTS else PREFIX + name

    return helper.make_node(op, [full(i) for i in inputs], [PREFIX + output], name=PREFIX + output, **attrs)


def _renamed(node: onnx.NodeProto, names: dict[str, str]) -> onnx.NodeProto:
    """A copy of ``node`` with its inputs and outputs renamed by ``names`` (others kept)."""
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.input[:] = [names.get(i, i) for i in copy.input]
    copy.output[:] = [names.get(o, o) for o in copy.output]
    return copy


def chunk_pairs(model: onnx.ModelProto, pairs_per_chunk: int) -> onnx.ModelProto:
    """``model`` (a traced full_model, I/O as the contract) as one Loop over chunks of at most
    ``pairs_per_chunk`` (user, candidate) pairs; same inputs, outputs and logits."""
    if pairs_per_chunk < 1:
        raise ValueError(f"pairs_per_chunk must be >= 1, got {pairs_per_chunk}")
    graph = model.graph
    names = [v.name for v in graph.input]
    if names != list(_INPUTS) or [v.name for v in graph.output] != [contract.LOGITS]:
        raise ValueError(f"chunk_pairs takes the full model's graph ({list(_INPUTS)} -> logits), got {names}")
    logits_type = graph.output[0].type.tensor_type.elem_type

    # Outside the loop: B, M, the trip count and the (equal) chunk size, all int64 scalars.
    outer = [
        _const("zero", 0), _const("one", 1), _const("pairs", pairs_per_chunk),
        _const("flat", [-1]), _const("first", [0]), _const("unsqueeze_axis", [1]), _const("two", [2]),
        _const("tasks_from", [-1]), _const("tasks_to", [2**63 - 1]),
        helper.make_node("Constant", [], [PREFIX + "true"], name=PREFIX + "true",
                         value=helper.make_tensor(PREFIX + "true", TensorProto.BOOL, [], [True])),
        _node("Shape", [_CANDIDATES], "shape"),
        _node("Gather", ["shape", "zero"], "users"),
        _node("Gather", ["shape", "one"], "candidates"),
        _node("Mul", ["users", "candidates"], "total"),
        _node("Sub", ["total", "one"], "last"),
        _node("Sub", ["pairs", "one"], "pairs_minus_one"),
        _node("Add", ["total", "pairs_minus_one"], "trips_numerator"),
        _node("Div", ["trips_numerator", "pairs"], "trips"),  # ceil(B*M / pairs)
        _node("Sub", ["trips", "one"], "trips_minus_one"),
        _node("Add", ["total", "trips_minus_one"], "chunk_numerator"),
        _node("Div", ["chunk_numerator", "trips"], "chunk"),  # ceil(B*M / trips) <= pairs
        _node("Flatten", [_CANDIDATES], "flat_candidates", axis=2),  # [B, M, d] -> [B*M, d]
    ]

    # The body: this chunk's pair indices, their users' history rows and their candidates, then
    # the traced graph unchanged on [chunk] users x 1 candidate.
    body = [
        _node("Mul", ["iteration", "chunk"], "start"),
        _node("Add", ["start", "chunk"], "stop"),
        _node("Range", ["start", "stop", "one"], "span"),
        _node("Min", ["span", "last"], "pair"),  # the last chunk's padding slots repeat the last pair
        _node("Div", ["pair", "candidates"], "user"),
        *(_node("Gather", [name, "user"], "chunk/" + name, axis=0) for name in _HISTORY),
        _node("Gather", ["flat_candidates", "pair"], "chunk/flat_candidates", axis=0),
        _node("Unsqueeze", ["chunk/flat_candidates", "unsqueeze_axis"], "chunk/" + _CANDIDATES),
    ]
    renamed = {name: f"{PREFIX}chunk/{name}" for name in _INPUTS}
    renamed[contract.LOGITS] = PREFIX + contract.LOGITS
    body += [_renamed(node, renamed) for node in graph.node]
    body.append(_node("Identity", ["condition"], "condition_out"))
    body_graph = helper.make_graph(
        body, LOOP_NAME + "_body",
        [helper.make_tensor_value_info(PREFIX + "iteration", TensorProto.INT64, []),
         helper.make_tensor_value_info(PREFIX + "condition", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info(PREFIX + "condition_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info(PREFIX + contract.LOGITS, logits_type, None)],
        initializer=list(graph.initializer), value_info=list(graph.value_info),
    )

    # After the loop: [trips, chunk, 1, T] -> [trips * chunk, T] -> the first B * M rows -> [B, M, T].
    # T is read from the last axis: onnx.reference concatenates the scan output to [trips * chunk,
    # 1, T] where ONNX Runtime stacks it, and both flatten to the same rows.
    after = [
        # The condition stays true (the body passes it through): the trip count alone ends the loop.
        # It is an input all the same because TensorRT's ONNX parser refuses a Loop without one.
        helper.make_node("Loop", [PREFIX + "trips", PREFIX + "true"], [PREFIX + "stacked"], name=LOOP_NAME,
                         body=body_graph),
        _node("Shape", ["stacked"], "stacked_shape"),
        _node("Slice", ["stacked_shape", "tasks_from", "tasks_to"], "tasks"),
        _node("Concat", ["flat", "tasks"], "rows_shape", axis=0),
        _node("Reshape", ["stacked", "rows_shape"], "rows"),
        _node("Unsqueeze", ["total", "first"], "total_1d"),
        _node("Slice", ["rows", "first", "total_1d", "first"], "pair_rows"),
        _node("Slice", ["shape", "first", "two"], "users_candidates"),  # [B, M] of the rows' [B, M, d]
        _node("Concat", ["users_candidates", "tasks"], "out_shape", axis=0),
        helper.make_node("Reshape", [PREFIX + "pair_rows", PREFIX + "out_shape"], [contract.LOGITS],
                         name=PREFIX + "logits"),
    ]

    chunked = onnx.ModelProto()
    chunked.CopyFrom(model)
    del chunked.graph.node[:], chunked.graph.initializer[:], chunked.graph.value_info[:]
    chunked.graph.node.extend(outer + after)
    return chunked


def pairs_per_chunk(model: onnx.ModelProto) -> int:
    """The chunk size a chunked graph was made with."""
    node = next(n for n in model.graph.node if n.output and n.output[0] == PREFIX + "pairs")
    return int(onnx.numpy_helper.to_array(node.attribute[0].t))


def for_onnxruntime(model: onnx.ModelProto) -> onnx.ModelProto:
    """A chunked full model as ONNX Runtime runs it fastest: the same Loop around the traced graph
    with its local functions inlined and duplicate subexpressions merged (module docstring). Same
    inputs, outputs and arithmetic; a graph that is not chunked comes back as it is."""
    if not is_chunked(model):
        return model
    plain = ir.serde.deserialize_model(onnx.inliner.inline_local_functions(unchunk(model)))
    passes.CommonSubexpressionEliminationPass()(plain)
    return chunk_pairs(ir.serde.serialize_model(plain), pairs_per_chunk(model))


def unchunk(model: onnx.ModelProto) -> onnx.ModelProto:
    """The traced graph inside a chunked full model, as a plain graph with the same I/O; a graph
    that is not chunked comes back as it is."""
    if not is_chunked(model):
        return model
    loop = next(n for n in model.graph.node if n.name == LOOP_NAME)
    body = loop.attribute[0].g
    original = {f"{PREFIX}chunk/{name}": name for name in _INPUTS}
    original[PREFIX + contract.LOGITS] = contract.LOGITS
    plain = onnx.ModelProto()
    plain.CopyFrom(model)
    del plain.graph.node[:]
    plain.graph.node.extend(_renamed(node, original) for node in body.node if not node.name.startswith(PREFIX))
    plain.graph.initializer.extend(body.initializer)
    plain.graph.value_info.extend(body.value_info)
    return plain


# What each consumer runs of a stored full model, and whether it needs the weights in memory:
# TensorRT parses the plain graph (its weights found beside the file), ONNX Runtime runs the Loop
# prepared by for_onnxruntime, and the bench's naive path runs the plain graph on ONNX Runtime.
RUNTIME_FORMS: dict[str, tuple[Callable[[onnx.ModelProto], onnx.ModelProto], bool]] = {
    "tensorrt": (unchunk, False),
    "onnxruntime": (for_onnxruntime, True),
    "onnxruntime-plain": (unchunk, True),
}
# A model handed over from memory must stay under protobuf's 2 GB; a larger one runs as stored.
IN_MEMORY_BYTES = 1_500_000_000


def runtime_form(path: Path | str, consumer: str) -> bytes | None:
    """The stored graph at ``path`` as ``consumer`` (a key of RUNTIME_FORMS) runs it, serialized;
    None when the consumer runs the file as stored (a graph that is not chunked, one too large to
    hand over in memory, or a file that is no ONNX model, which the consumer then names itself)."""
    prepare, with_weights = RUNTIME_FORMS[consumer]
    try:
        model = onnx.load(str(path), load_external_data=with_weights)
    except Exception:  # noqa: BLE001 - not an ONNX model at all: the runtime's parser says so in its words
        return None
    if not is_chunked(model):
        return None
    prepared = prepare(model)
    return prepared.SerializeToString() if prepared.ByteSize() < IN_MEMORY_BYTES else None
