"""The engine I/O contract, defined once: names, dtypes and shapes of every input and output of
the three graphs (user encoder, item scorer, full model) and the KV-cache layout that joins the
encoder to the scorer. The exporter names graph tensors from here, the engine builder derives
optimization profiles from here, the runtime binds buffers by it, the manifest records it and
the tests read it back from here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from astro_trt import precision as _precision
from astro_trt.config import ASTROConfig

# Symbolic (dynamic) dimensions. Everything else is fixed by the model config.
BATCH = "batch"
CANDIDATES = "candidates"
DYNAMIC_DIMS = (BATCH, CANDIDATES)

# The registry in astro_trt/precision.py owns the precisions; this is its list of names.
PRECISIONS = _precision.names()

# How the astro attention operators reach a graph (docs/attention.md): one vocabulary for the
# exporter's argument, the bundle's --attention and the manifest's attention.effective.
PLUGIN = "plugin"  # custom op nodes (TensorRT plugins); each carries its reference body as an ONNX function
NATIVE = "native"  # ONNX Attention (opset 23), TensorRT's fused IAttention
REFERENCE_BODY = "reference"  # the plugin graph parsed without plugins: the function bodies inlined
AUTO_LOWERING = "auto"  # the bundle picks: plugin where the back end has plugins, else native, else reference
EXPORT_LOWERINGS = (PLUGIN, NATIVE)  # what the exporter writes
LOWERINGS = (PLUGIN, NATIVE, REFERENCE_BODY)  # what the manifest records as effective
ATTENTION_CHOICES = (AUTO_LOWERING, *EXPORT_LOWERINGS)  # what --attention of a bundle accepts

# The builder optimization levels both TensorRT back ends take (--opt-level; the manifest records it).
OPT_LEVELS = range(0, 6)

USER_ENCODER = "user_encoder"
ITEM_SCORER = "item_scorer"
FULL_MODEL = "full_model"
GRAPHS = (USER_ENCODER, ITEM_SCORER, FULL_MODEL)
LOGITS = "logits"
CAND_ITEMS = "cand_items"
HIST_ITEMS = "hist_items"

# Sparse and dense are apart: the item embedding table (10^7-10^8 rows in a deployment) is in no
# graph. A request carries item ids; the runner looks their rows up in the bundle's mapped table
# (model/item_table.py) once per request, and the graphs take the rows. Each id input and the graph
# input its rows become; the rows are float32 whatever the precision (an fp16/int8 table is
# dequantized at lookup, a half-precision graph casts on entry), so one lookup serves every graph.
HIST_ITEM_EMB = "hist_item_emb"
CAND_ITEM_EMB = "cand_item_emb"
ITEM_ROWS = {HIST_ITEMS: HIST_ITEM_EMB, CAND_ITEMS: CAND_ITEM_EMB}
ITEM_ROWS_DTYPE = "float32"

KV_CACHE = "kv_cache"
# The KV cache is one tensor, batch-major, so that one user's cache is one contiguous slice and
# a dynamic batch axis stays the leading one in both engines.
KV_CACHE_AXES = ("batch", "layer", "block", "kv", "head", "slot", "head_dim")
# The request's history inputs (docs/model.md §1), in the field order of model/astro.py History, so that
# ``zip(HISTORY_INPUTS, history.astuple())`` names a History's tensors.
HISTORY_INPUTS = ("hist_items", "hist_behaviors", "hist_times", "hist_lengths", "scenario", "request_time")
# History inputs the scorer needs besides the cache (masking and the time bias); the runtime
# keeps them on the device with the cache as the "user state".
SCORER_HISTORY_INPUTS = ("hist_lengths", "hist_times", "scenario", "request_time")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy-style name: int64, float32, float16, bfloat16
    shape: tuple[int | str, ...]  # ints are fixed, strings are DYNAMIC_DIMS

    def concrete(self, dims: dict[str, int]) -> tuple[int, ...]:
        return tuple(dims[d] if isinstance(d, str) else d for d in self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class GraphIO:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def dynamic_dims(self) -> tuple[str, ...]:
        """The DYNAMIC_DIMS this graph's inputs use (the encoder has no candidates), in their order."""
        used = {d for t in self.inputs for d in t.shape if isinstance(d, str)}
        return tuple(d for d in DYNAMIC_DIMS if d in used)

    def tensor(self, name: str) -> TensorSpec:
        for t in self.inputs + self.outputs:
            if t.name == name:
                return t
        raise KeyError(f"{self.name} has no tensor '{name}'")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }


def float_dtype(precision: str) -> str:
    """dtype of the floating tensors that cross an engine boundary in ``precision``. Logits are
    always float32: a service compares and sorts them, and the cast is free next to the model."""
    return _precision.get(precision).dtype.name


def kv_cache_shape(cfg: ASTROConfig) -> tuple[int | str, ...]:
    return (BATCH, cfg.num_layers, cfg.num_blocks, 2, cfg.num_heads, cfg.max_len, cfg.head_dim)


def request_name(graph_input: str) -> str:
    """The request tensor a graph input is made from: an id input for a looked-up rows input, else itself."""
    return next((ids for ids, rows in ITEM_ROWS.items() if rows == graph_input), graph_input)


def request_spec(graph_input: TensorSpec) -> TensorSpec:
    """The request tensor a graph input is made from: item rows [..., d] come from int64 ids [...]."""
    name = request_name(graph_input.name)
    if name == graph_input.name:
        return graph_input
    return TensorSpec(name, "int64", graph_input.shape[:-1])


def history_inputs(cfg: ASTROConfig) -> tuple[TensorSpec, ...]:
    blk = (BATCH, cfg.num_blocks, cfg.max_len)
    shapes = (blk, blk, blk, (BATCH, cfg.num_blocks), (BATCH,), (BATCH,))
    return tuple(TensorSpec(name, "int64", shape) for name, shape in zip(HISTORY_INPUTS, shapes, strict=True))


def graph_io(cfg: ASTROConfig, precision: str) -> dict[str, GraphIO]:
    """The I/O of the three graphs, in the positional order of their inputs. Item ids never enter a
    graph: ``hist_items`` and ``cand_items`` arrive as their rows (ITEM_ROWS)."""
    hist = {t.name: t for t in history_inputs(cfg)}
    hist[HIST_ITEMS] = TensorSpec(HIST_ITEM_EMB, ITEM_ROWS_DTYPE, (BATCH, cfg.num_blocks, cfg.max_len, cfg.d_model))
    cand = TensorSpec(CAND_ITEM_EMB, ITEM_ROWS_DTYPE, (BATCH, CANDIDATES, cfg.d_model))
    logits = TensorSpec(LOGITS, "float32", (BATCH, CANDIDATES, cfg.num_tasks))
    kv = TensorSpec(KV_CACHE, float_dtype(precision), kv_cache_shape(cfg))
    encoder_names = [HIST_ITEMS, "hist_behaviors"]
    if cfg.num_layers > 1:
        # The encoder skips the last layer's history attention (only its K/V are needed), so a
        # one-layer encoder never reads times, lengths or scenario: they are not graph inputs then.
        encoder_names += ["hist_times", "hist_lengths", "scenario"]
    encoder_inputs = tuple(hist[n] for n in encoder_names)
    return {
        USER_ENCODER: GraphIO(USER_ENCODER, encoder_inputs, (kv,)),
        ITEM_SCORER: GraphIO(ITEM_SCORER, (kv, *(hist[n] for n in SCORER_HISTORY_INPUTS), cand), (logits,)),
        FULL_MODEL: GraphIO(FULL_MODEL, (*hist.values(), cand), (logits,)),
    }


@dataclass(frozen=True)
class GraphSpec:
    """One graph of a bundle, as every stage sees it: its I/O is ``graph_io(cfg, precision)[name]``,
    the exporter's builder is ``exporter.graphs.WRAPPERS[name]``, and every runner (runtime/runner.py)
    runs it through its public method ``call`` (``Runner.call(name, ...)`` looks it up here)."""

    name: str
    call: str  # encode(history) | score(state, history, candidates) | full(history, candidates)
    output: str  # its one output tensor
    split: bool  # part of the encoder + scorer pair a service runs (the full model is the baseline)


GRAPH_SPECS: dict[str, GraphSpec] = {s.name: s for s in (
    GraphSpec(USER_ENCODER, "encode", KV_CACHE, split=True),
    GraphSpec(ITEM_SCORER, "score", LOGITS, split=True),
    GraphSpec(FULL_MODEL, "full", LOGITS, split=False),
)}
SPLIT_GRAPHS = tuple(g for g in GRAPHS if GRAPH_SPECS[g].split)


@dataclass(frozen=True)
class KVCacheLayout:
    """What the manifest records about the cache, so a service can allocate and slice it."""

    name: str
    axes: tuple[str, ...]
    shape: tuple[int | str, ...]
    dtype: str
    scorer_history_inputs: tuple[str, ...]
    bytes_per_user: int

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["axes"], out["shape"] = list(self.axes), list(self.shape)
        out["scorer_history_inputs"] = list(self.scorer_history_inputs)
        return out


def dtype_bytes(dtype: str) -> int:
    return _precision.dtype(dtype).bytes


def kv_cache_layout(cfg: ASTROConfig, precision: str) -> KVCacheLayout:
    shape = kv_cache_shape(cfg)
    per_user = dtype_bytes(float_dtype(precision))
    for d in shape[1:]:
        per_user *= int(d)
    return KVCacheLayout(KV_CACHE, KV_CACHE_AXES, shape, float_dtype(precision), SCORER_HISTORY_INPUTS, per_user)
