"""Layer bisect: where a bundle's graphs first part from the fp32 PyTorch oracle.

The bundle's own ONNX graphs are copied with the tensors at every stage boundary marked as extra
outputs (Polygraphy's "mark all", restricted to the boundaries of the model's structure), run on
ONNX Runtime, and compared stage by stage with the same tensors recorded from the PyTorch model:

    encoder   embedding, per layer: kv (the cache it writes), attention and FFN output per block
    scorer    embedding (the candidates), per layer: attention and FFN output per block,
    fusion    gate (the gated representation the head reads), head (the logits)

A boundary is found by the weight that reads it, which the exporter keeps by name in every
precision and lowering: a layer's input is the data input of the MatMul with
``model.layers.<i>.w_k``, its attention output (heads merged) that of ``model.layers.<i>.w_1``, the
last layer's output that of ``model.fusion.layer.w_k``, the gate that of the MatMul feeding the
Add with ``model.fusion.head_1.bias``. Each stage is judged by the tolerance policy of the parity
report (astro_trt/tolerances.py): fp32 within the fp32 limit, fp16/bf16 within the ratio of
PyTorch's own error at that same stage in that precision plus the floor. Stages are listed in
dataflow order (the scorer reads the encoder's cache from the same runtime), so the first stage
over its limit is where the fault is.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from astro_trt.artifacts import as_path, check_destination
from astro_trt.choices import comma_list
from astro_trt.contract import (
    FULL_MODEL,
    ITEM_SCORER,
    KV_CACHE,
    KV_CACHE_AXES,
    PRECISIONS,
    SPLIT_GRAPHS,
    USER_ENCODER,
    graph_io,
)
from astro_trt.engines.bundle import load_bundle, write_report
from astro_trt.errors import BundleError, DataError
from astro_trt.exporter.precision import model_in_precision
from astro_trt.exporter.quantize import INPUT_MARK
from astro_trt.model.checkpoint import load_checkpoint
from astro_trt.model.item_table import REFERENCE_TABLE
from astro_trt.model.resources import check_fits
from astro_trt.model.synthetic import synthetic_batch
from astro_trt.precision import REFERENCE, REGISTRY, get, is_reference
from astro_trt.reports import by_kind, figure, json_bytes, markdown_table, png_bytes, write_files
from astro_trt.runtime.gate import check_profile, gate
from astro_trt.runtime.onnxruntime import ort_session
from astro_trt.runtime.runner import with_item_rows
from astro_trt.validate.parity import library_arguments, load_batches, parse_runtimes

BISECT_REPORT = "bisect"
USERS, CANDIDATES = 8, 16  # one synthetic batch: every block length, padding and empty blocks occur
FUSION_INPUT = "fusion.in"
# A "kv" stage is one layer's slice of the cache: the contract's axes without "layer".
KV_LAYER_AXIS = KV_CACHE_AXES.index("layer")
KV_SLICE_AXES = tuple(a for a in KV_CACHE_AXES if a != "layer")


@dataclass(frozen=True)
class Stage:
    """One boundary. ``anchor``: how the ONNX tensor is found (("input_of", weight),
    ("gate", bias) or ("output", name)); ``key``: what the PyTorch recorder calls it; ``layout``:
    how canonical() puts its blocks on block_axis (1; 2 for the gate; the contract's for a cache
    slice), "whole" for the logits."""

    graph: str
    name: str  # e.g. "scorer.layer1.ffn"
    anchor: tuple[str, str]
    key: str
    layout: str = "blocks"  # blocks | kv | fusion_input | gate | whole
    layer: int | None = None  # the cache's layer, for layout "kv"

    @property
    def block_axis(self) -> int | None:
        return {"whole": None, "gate": 2, "kv": KV_SLICE_AXES.index("block")}.get(self.layout, 1)


@dataclass(frozen=True)
class StageError:
    precision: str
    stage: str
    block: str | None
    max_abs: float
    limit: float
    torch_error: float | None  # PyTorch's own max abs error at this stage (half precision)
    tensor: str = ""  # the ONNX tensor compared (a graph output of the marked copy)

    @property
    def passed(self) -> bool:
        return self.max_abs <= self.limit  # NaN fails

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), passed=self.passed)


@dataclass
class BisectReport:
    bundle: Path
    runtime: str
    data: str
    stages: list[StageError]
    paths: dict[str, Path] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(s.passed for s in self.stages)

    def first_failure(self, precision: str | None = None) -> StageError | None:
        """The first stage (dataflow order) over its limit, in ``precision`` or in any."""
        return next((s for s in self.stages if not s.passed and precision in (None, s.precision)), None)

    def summary(self) -> str:
        precisions = list(dict.fromkeys(s.precision for s in self.stages))
        lines = [f"bisect {'PASSED' if self.passed else 'FAILED'}: {len(self.stages)} stage checks on "
                 f"{self.runtime} ({', '.join(precisions)}, {self.data})"]
        for precision in precisions:
            first = self.first_failure(precision)
            if first is None:
                lines.append(f"  {precision}: every stage within its limit")
            else:
                where = first.stage + (f" [{first.block}]" if first.block else "")
                lines.append(f"  {precision}: first stage over its limit: {where}, max |err| {first.max_abs:.3g} "
                             f"> {first.limit:.3g} (ONNX tensor {first.tensor})")
        if self.paths:
            lines.append(f"  report: {self.paths.get('md', '')}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"bundle": str(self.bundle), "runtime": self.runtime, "data": self.data, "passed": self.passed,
                "first_failure": {p: (f.to_dict() if (f := self.first_failure(p)) else None)
                                  for p in dict.fromkeys(s.precision for s in self.stages)},
                "stages": [s.to_dict() for s in self.stages]}


# ---------------------------------------------------------------------------- the stages
def stage_plan(cfg: Any) -> list[Stage]:
    """Every boundary of the split, in dataflow order."""
    n = cfg.num_layers
    logits = graph_io(cfg, REFERENCE)[ITEM_SCORER].output_names[0]
    plan = [Stage(USER_ENCODER, "encoder.embedding", ("input_of", "model.layers.0.w_k"), "enc.in0")]
    for i in range(n):
        plan.append(Stage(USER_ENCODER, f"encoder.layer{i}.kv", ("output", KV_CACHE), KV_CACHE, "kv", i))
        if i + 1 < n:  # the encoder skips the last layer's history attention and FFN
            plan.append(Stage(USER_ENCODER, f"encoder.layer{i}.attention", ("input_of", f"model.layers.{i}.w_1"),
                              f"enc.att{i}"))
            plan.append(Stage(USER_ENCODER, f"encoder.layer{i}.ffn", ("input_of", f"model.layers.{i + 1}.w_k"),
                              f"enc.in{i + 1}"))
    plan.append(Stage(ITEM_SCORER, "scorer.embedding", ("input_of", "model.layers.0.w_k"), "sc.in0"))
    for i in range(n):
        plan.append(Stage(ITEM_SCORER, f"scorer.layer{i}.attention", ("input_of", f"model.layers.{i}.w_1"),
                          f"sc.att{i}"))
        if i + 1 < n:
            plan.append(Stage(ITEM_SCORER, f"scorer.layer{i}.ffn", ("input_of", f"model.layers.{i + 1}.w_k"),
                              f"sc.in{i + 1}"))
        else:  # the fusion reads the last layer's output as [B*M, 1, Nb, d]
            plan.append(Stage(ITEM_SCORER, f"scorer.layer{i}.ffn", ("input_of", "model.fusion.layer.w_k"),
                              FUSION_INPUT, "fusion_input"))
    plan.append(Stage(ITEM_SCORER, "fusion.gate", ("gate", "model.fusion.head_1.bias"), "gate", "gate"))
    plan.append(Stage(ITEM_SCORER, "head", ("output", logits), "logits", "whole"))
    return plan


def _find_tensor(model: Any, anchor: tuple[str, str], path: Path) -> str:
    kind, name = anchor
    if kind == "output":
        return name
    consumers: dict[str, list[Any]] = {}
    producers = {}
    for node in model.graph.node:
        for tensor in node.input:
            consumers.setdefault(tensor, []).append(node)
        for tensor in node.output:
            producers[tensor] = node
    readers = [n for n in consumers.get(name, []) if n.op_type in (("MatMul",) if kind == "input_of" else ("Add",))]
    # An int8 graph's weight MatMuls are the quantizer's: their inputs are marked (exporter/quantize.py).
    marks = {n.name: n.input[0] for n in model.graph.node if n.op_type == "Identity"}
    marks.update({n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity"})
    if kind == "input_of" and not readers and name + INPUT_MARK in marks:
        return marks[name + INPUT_MARK]
    if len(readers) == 1:
        other = [t for t in readers[0].input if t != name]
        if kind == "input_of" and other:
            return other[0]
        if kind == "gate" and other and other[0] + INPUT_MARK in marks:
            return marks[other[0] + INPUT_MARK]
        if kind == "gate" and other and other[0] in producers and producers[other[0]].op_type == "MatMul":
            return producers[other[0]].input[0]
    raise BundleError(f"{path}: no stage boundary at weight '{name}' (the graph was not exported by this version "
                      "of astro-trt, or was edited); re-export the bundle to bisect it")


def marked_graph(source: Path, stages: Sequence[Stage], target: Path) -> dict[str, str]:
    """Copy ``source`` to ``target`` with every stage's tensor marked as a graph output; returns
    stage name -> tensor name."""
    model = onnx.load(str(source))
    tensors = {s.name: _find_tensor(model, s.anchor, source) for s in stages}
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    present = {o.name for o in model.graph.output}
    for tensor in dict.fromkeys(tensors.values()):
        if tensor not in present:
            if tensor not in types:
                raise BundleError(f"{source}: the type of tensor '{tensor}' is unknown; re-export the bundle")
            model.graph.output.append(onnx.helper.make_tensor_value_info(tensor, types[tensor], None))
    onnx.save_model(model, str(target))
    return tensors


# ---------------------------------------------------------------------------- PyTorch side
class _Recorder:
    """Records the stage tensors of one PyTorch model by wrapping its layers' project/finish on
    the instance (a copy's, so the caller's model is never touched)."""

    def __init__(self, model: Any) -> None:
        self.model, self.values, self.prefix = model, {}, ""
        self.count = {"in": 0, "att": 0}
        for layer in model.layers:
            layer.project = self._project(layer.project)
            layer.finish = self._finish(layer.finish)
        # The fusion's own layer reads the last layer's output: recorded under one name, not counted.
        model.fusion.layer.project = self._project(model.fusion.layer.project, FUSION_INPUT)
        model.fusion.head_1.register_forward_pre_hook(lambda _m, args: self._put("gate", args[0]))

    def _put(self, key: str, value: Any) -> None:
        self.values[key] = value.detach().float().numpy()

    def _project(self, project: Callable, name: str | None = None) -> Callable:
        def wrapped(x):
            if name is None:
                self._put(f"{self.prefix}.in{self.count['in']}", x)
                self.count["in"] += 1
            else:
                self._put(name, x)
            return project(x)
        return wrapped

    def _finish(self, finish: Callable) -> Callable:
        def wrapped(x, attended):
            b, n, h, s, dh = attended.shape  # heads merged, as the FFN's first matmul reads them
            self._put(f"{self.prefix}.att{self.count['att']}", attended.transpose(2, 3).reshape(b, n, s, h * dh))
            self.count["att"] += 1
            return finish(x, attended)
        return wrapped

    def run(self, batch: Any, dtype: Any) -> dict[str, np.ndarray]:
        self.values = {}
        with torch.no_grad():
            self.prefix, self.count = "enc", {"in": 0, "att": 0}
            kv = self.model.encode_user(batch.history)
            self.prefix, self.count = "sc", {"in": 0, "att": 0}
            logits = self.model.score(kv.to(dtype), batch.history, batch.cand_items)
        self._put(KV_CACHE, kv)
        self._put("logits", logits)
        return self.values


# ---------------------------------------------------------------------------- comparing
def canonical(stage: Stage, value: np.ndarray, cfg: Any) -> np.ndarray:
    """Bring a stage tensor to a layout with the blocks on ``stage.block_axis``: a layer's slice
    of the cache has KV_SLICE_AXES, the fusion's input is [B*M, Nb, d], the gate [B, M, Nb, d]."""
    value = np.asarray(value, dtype=np.float32)
    if stage.layout == "kv":
        return np.take(value, stage.layer, axis=KV_LAYER_AXIS)
    if stage.layout == "fusion_input":
        return value[:, 0]
    if stage.layout == "gate":
        return value.reshape(*value.shape[:2], cfg.num_blocks, -1)
    return value


def _pieces(stage: Stage, value: np.ndarray, block_names: Sequence[str]) -> list[tuple[str | None, np.ndarray]]:
    if stage.block_axis is None:
        return [(None, value)]
    return [(block_names[b], np.take(value, b, axis=stage.block_axis)) for b in range(value.shape[stage.block_axis])]


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float("nan") if not np.all(np.isfinite(diff)) else float(diff.max(initial=0.0))


def bisect_bundle(
    bundle_dir: str | Path,
    *,
    precisions: str | Sequence[str] | None = None,
    runtime: str | Sequence[str] = "ort",
    data: str = "synthetic",
    checkpoint: str | Path | None = None,
    gates: Any = None,
    users: int = USERS,
    candidates: int = CANDIDATES,
    seed: int = 0,
    out: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    expect_sha256: str | None = None,
) -> BisectReport:
    """Error against the fp32 PyTorch oracle at every stage boundary of the bundle's split graphs
    (``precisions``: default all of the bundle's), on ONNX Runtime; writes bisect.{json,md,png}
    to BUNDLE/reports/bisect/ (recorded in the manifest) or to ``out``. ``data``: "synthetic"
    (one seeded batch of ``users`` x ``candidates``) or "ml-100k" (the first test batch)."""
    gates, say, checkpoint = library_arguments(gates, progress, checkpoint)
    asked = parse_runtimes(runtime)
    if [r for r in asked if r != "torch"] != ["ort"]:  # torch is the oracle itself
        raise DataError(f"--bisect runs on ONNX Runtime only (got --runtime {','.join(asked)}); a TensorRT engine "
                        "keeps no intermediate tensors, so use --runtime ort")
    for name, value in (("users", users), ("candidates", candidates), ("seed", seed)):
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "seed" else 1):
            raise DataError(f"bisect {name} must be a {'non-negative' if name == 'seed' else 'positive'} integer, "
                            f"got {value!r}")
    if out is not None:
        check_destination(as_path(out, "out"))
    bundle = load_bundle(bundle_dir, verify=True, expect_sha256=expect_sha256)
    # The oracle runs every pair through the full model at once: the bundle's profile and this
    # machine's memory bound the batch (10^7 candidates asked 20 GB before this).
    check_profile(bundle.profile(FULL_MODEL), batch=users, candidates=candidates, what="bisect")
    check_fits(bundle.config, users=users, candidates=candidates, purpose="bisect", error=DataError)
    wanted = bundle.precisions if precisions is None else comma_list(precisions, PRECISIONS, "--precision", DataError)
    for p in wanted:
        bundle.onnx_path(USER_ENCODER, p)  # BundleError naming the bundle's precisions
        if not get(p).ort_cpu:
            runnable = " or ".join(q.name for q in REGISTRY.values() if q.ort_cpu)
            raise DataError(f"--bisect: ONNX Runtime has no {get(p).dtype.name} CPU kernels; bisect {runnable}")
    ckpt = load_checkpoint(checkpoint) if checkpoint else bundle.checkpoint()
    if ckpt.sha256 != bundle.checkpoint_sha256:
        raise DataError(f"checkpoint {ckpt.directory} is not the one the bundle was exported from (sha256 "
                        f"{ckpt.sha256[:16]}... vs {bundle.checkpoint_sha256[:16]}...); bisect against the "
                        "bundle's own checkpoint")
    cfg = bundle.config
    batch = _batch(data, cfg, ckpt.directory, users, candidates, seed)
    plan = stage_plan(cfg)
    say(f"fp32 oracle on {batch.batch_size} users x {batch.cand_items.shape[1]} candidates")
    oracle = _Recorder(copy.deepcopy(ckpt.model).eval()).run(batch, torch.float32)
    blocks = list(cfg.block_names) or [f"block{b}" for b in range(cfg.num_blocks)]
    stages: list[StageError] = []
    for precision in wanted:
        own = None
        if not is_reference(precision):
            say(f"PyTorch {precision} (the yardstick)")
            own = _Recorder(model_in_precision(ckpt.model, precision, export_ops=False)).run(batch,
                                                                                          get(precision).torch())
        say(f"ort-{precision}: marking {len(plan)} stage boundaries")
        with tempfile.TemporaryDirectory(prefix="astro-bisect-") as tmp:
            got, where = {}, {}
            # The same input gate as every runner, and the rows of the fp32 table (the graphs judged alone).
            feeds = with_item_rows(bundle.item_table(REFERENCE_TABLE), gate(cfg, batch.history, batch.cand_items))
            for graph in SPLIT_GRAPHS:
                stages_here = [s for s in plan if s.graph == graph]
                marked = Path(tmp) / f"{graph}.onnx"
                tensors = marked_graph(bundle.onnx_path(graph, precision), stages_here, marked)
                session = ort_session(marked)
                names = [o.name for o in session.get_outputs()]
                inputs = {i.name: feeds[i.name] for i in session.get_inputs()}
                values = dict(zip(names, session.run(names, inputs), strict=True))
                if graph == USER_ENCODER:
                    feeds[KV_CACHE] = values[KV_CACHE]  # the scorer reads this runtime's own cache
                got.update({s.name: values[tensors[s.name]] for s in stages_here})
                where.update({s.name: f"{graph}:{tensors[s.name]}" for s in stages_here})
        for stage in plan:
            ref = canonical(stage, oracle[stage.key], cfg)
            mine = canonical(stage, got[stage.name], cfg)
            theirs = None if own is None else canonical(stage, own[stage.key], cfg)
            for (block, r), (_, m) in zip(_pieces(stage, ref, blocks), _pieces(stage, mine, blocks), strict=True):
                torch_error = None
                if theirs is not None:
                    torch_error = _max_abs(np.take(theirs, blocks.index(block), axis=stage.block_axis)
                                           if block is not None else theirs, r)
                limit = gates.logits_limit(precision, torch_error)
                stages.append(StageError(precision, stage.name, block, _max_abs(m, r), limit, torch_error,
                                         where[stage.name]))
    report = BisectReport(Path(bundle.directory), "ort", data, stages)
    report.paths = _write(report, bundle.directory, out)
    return report


def _batch(data: str, cfg: Any, documents: Path, users: int, candidates: int, seed: int) -> Any:
    if data == "synthetic":
        return synthetic_batch(cfg, users, candidates, seed=seed)

    first = load_batches(data, cfg, documents)[0]  # DataError for an unknown name
    return type(first)(first.history.rows(0, users), first.cand_items[:users], first.labels[:users],
                       first.cand_mask[:users])


# ---------------------------------------------------------------------------- reports
def bisect_markdown(report: BisectReport, plot_name: str) -> str:
    lines = [f"# astro-trt layer bisect: {'PASSED' if report.passed else 'FAILED'}", "",
             f"Bundle `{report.bundle}`, runtime `{report.runtime}`, data `{report.data}`. Oracle: the "
             "checkpoint's PyTorch model in fp32. Stages in dataflow order; the limit is the parity report's: "
             "fp32 a fixed max abs, fp16/bf16 a multiple of PyTorch's own error at the same stage plus a floor.",
             ""]
    for line in report.summary().splitlines()[1:]:
        if not line.strip().startswith("report:"):
            lines.append(f"- {line.strip()}")
    lines += ["", markdown_table(["precision", "stage", "block", "max abs", "PyTorch's own", "limit", "within",
                                  "ONNX tensor"],
                                 [(s.precision, s.stage, s.block or "-", s.max_abs,
                                   "-" if s.torch_error is None else s.torch_error, s.limit,
                                   "yes" if s.passed else "NO", f"`{s.tensor}`") for s in report.stages]),
              "", f"![error by stage]({plot_name})", ""]
    return "\n".join(lines)


def plot_stages(report: BisectReport) -> bytes:
    """Max abs error by stage (worst block), one line per precision, its limits dashed."""
    fig, ax = figure(figsize=(11, 4.8))
    names = list(dict.fromkeys(s.stage for s in report.stages))
    for precision in dict.fromkeys(s.precision for s in report.stages):
        worst = {n: max((s for s in report.stages if s.precision == precision and s.stage == n),
                        key=lambda s: s.max_abs / s.limit if s.limit else float("inf")) for n in names}
        line, = ax.semilogy(range(len(names)), [max(worst[n].max_abs, 1e-12) for n in names], "o-",
                            label=f"{report.runtime}-{precision}")
        ax.semilogy(range(len(names)), [worst[n].limit for n in names], "--", color=line.get_color(),
                    label=f"{precision} limit")
        first = report.first_failure(precision)
        if first is not None:
            ax.axvline(names.index(first.stage), color=line.get_color(), alpha=0.3)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("max |error| vs fp32 oracle (worst block)")
    ax.set_title("layer bisect: error by stage")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return png_bytes(fig)


def _write(report: BisectReport, bundle_dir: Path, out: str | Path | None) -> dict[str, Path]:
    files = {"bisect.json": json_bytes(report.to_dict()), "bisect.md": bisect_markdown(report, "bisect.png").encode(),
             "bisect.png": plot_stages(report)}
    if out is not None:
        return by_kind(write_files(Path(out), files))

    return by_kind(dict(zip(files, write_report(bundle_dir, BISECT_REPORT, files), strict=True)))


__all__ = ["BISECT_REPORT", "BisectReport", "Stage", "StageError", "bisect_bundle", "marked_graph", "stage_plan"]
