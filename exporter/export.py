"""The exporter's entry point: an ASTRO model -> ONNX graphs (user encoder, item scorer, full model).

Exporter choice: the TorchScript exporter (``torch.onnx.export(dynamo=False)``). It maps each
astro custom op to one node through ``register_custom_op_symbolic`` and leaves the rest of the
model as clean standard ops; the dynamo exporter could not carry a custom op with an onnxscript
body through its inliner for this model ("number of values and replacements must match", torch
2.13), and the custom op is the whole point of the graphs (the plugin seam).
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch

from astro_trt import contract
from astro_trt.contract import GraphIO, KVCacheLayout
from astro_trt.exporter import symbolic
from astro_trt.exporter.check import feeds
from astro_trt.exporter.cleanup import clean, pin_io
from astro_trt.exporter.functions import attention_functions
from astro_trt.exporter.graphs import WRAPPERS, named_tensors, run, with_item_rows, wrapper_inputs
from astro_trt.exporter.limits import check_export_request
from astro_trt.exporter.native import NATIVE_OPSET, lower_native
from astro_trt.exporter.pair_chunks import chunk_pairs, full_model_pairs_per_chunk, initializers, walk_nodes
from astro_trt.exporter.precision import model_in_precision
from astro_trt.exporter.quantize import dynamic_int8, qdq_int8
from astro_trt.model.astro import ASTRO, History
from astro_trt.model.synthetic import synthetic_batch
from astro_trt.plugins.names import ONNX_DOMAIN, ONNX_OPSET_VERSION
from astro_trt.precision import get as get_precision

TRACE_OPSET = 18  # every op of the model and the reference bodies exists in 18; TensorRT parses it
EXTERNAL_DATA_BYTES = 1_500_000_000  # protobuf caps a file at 2 GB; stay clear of it


@dataclass
class ExportResult:
    paths: dict[str, Path]
    io: dict[str, GraphIO]
    precision: str
    attention: str
    opset: int
    kv_cache: KVCacheLayout
    op_domains: dict[str, list[str]] = field(default_factory=dict)
    pairs_per_chunk: int | None = None  # the full model's Loop chunk (exporter/pair_chunks.py)
    # Where an engine is built from another form of the graph than the bundle's ONNX file: the QDQ
    # form of an int8 graph (exporter/quantize.py), written under the caller's ``engine_dir``.
    engine_sources: dict[str, Path] = field(default_factory=dict)

    def to_manifest(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "attention": self.attention,
            "opset": self.opset,
            "kv_cache": self.kv_cache.to_dict(),
            "graphs": {
                name: {
                    "file": path.name,
                    "io": self.io[name].to_dict(),
                    "op_domains": self.op_domains.get(name, []),
                    **({"pairs_per_chunk": self.pairs_per_chunk} if name == contract.FULL_MODEL else {}),
                }
                for name, path in self.paths.items()
            },
        }


def export_onnx(
    model: ASTRO,
    out_dir: Path,
    *,
    precision: str = "fp32",
    attention: str = contract.PLUGIN,
    graphs: Sequence[str] = contract.GRAPHS,
    engine_dir: Path | None = None,
) -> ExportResult:
    """Write out_dir/<graph>.onnx for each of ``graphs``; all files appear, or none. For a quantized
    precision with ``engine_dir``, the QDQ form TensorRT builds from goes to engine_dir/<graph>.onnx."""
    cfg = model.cfg
    graphs = tuple(graphs)
    check_export_request(cfg, precision, attention, graphs)
    io = contract.graph_io(cfg, precision)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    traced_model = model_in_precision(model, precision, export_ops=True)
    opset = TRACE_OPSET
    if attention == contract.NATIVE:
        opset = NATIVE_OPSET
    pairs_per_chunk = full_model_pairs_per_chunk(cfg)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir))
    try:
        staged, domains, sources = {}, {}, {}
        for name in graphs:
            proto = _export_graph(traced_model, name, io[name], staging)
            if attention == contract.NATIVE:
                proto = lower_native(proto)
            if get_precision(precision).quantized:
                if engine_dir is not None:
                    qdq = qdq_int8(copy.deepcopy(proto), _calibration(traced_model, io[name]))
                    if name == contract.FULL_MODEL:
                        qdq = chunk_pairs(qdq, pairs_per_chunk)
                    Path(engine_dir).mkdir(parents=True, exist_ok=True)
                    sources[name] = _save(qdq, Path(engine_dir) / f"{name}.onnx")[0]
                proto = dynamic_int8(proto)
            if name == contract.FULL_MODEL:
                proto = chunk_pairs(proto, pairs_per_chunk)
            domains[name] = sorted({n.domain or "ai.onnx" for n in walk_nodes(proto.graph)})
            staged[name] = _save(proto, staging / f"{name}.onnx")
        paths = {}
        for name, files in staged.items():
            for file in files:
                os.replace(file, out_dir / file.name)
            paths[name] = out_dir / f"{name}.onnx"
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(
        paths=paths,
        io={name: io[name] for name in graphs},
        precision=precision,
        attention=attention,
        opset=opset,
        kv_cache=contract.kv_cache_layout(cfg, precision),
        op_domains=domains,
        pairs_per_chunk=pairs_per_chunk if contract.FULL_MODEL in graphs else None,
        engine_sources=sources,
    )


CALIBRATION_BATCHES, CALIBRATION_USERS, CALIBRATION_CANDIDATES = 4, 4, 16


def _calibration(model: ASTRO, io: GraphIO) -> list[dict[str, Any]]:
    """Feeds of graph ``io`` for int8 calibration: seeded synthetic requests at the model's own
    config (every block length, padding and time bucket), the scorer fed the model's own cache."""
    out = []
    for seed in range(CALIBRATION_BATCHES):
        request = synthetic_batch(model.cfg, CALIBRATION_USERS, CALIBRATION_CANDIDATES, seed=1000 + seed)
        with torch.no_grad():
            kv = run(model, contract.USER_ENCODER, named_tensors(request.history, request.cand_items))
        out.append(feeds(io, model, request.history, request.cand_items, kv))
    return out


def example_inputs(model: ASTRO, name: str, batch: int = 2, candidates: int = 3) -> tuple[torch.Tensor, ...]:
    """Inputs to trace graph ``name`` with. B and M differ (and exceed 1) so that no traced shape
    arithmetic can confuse the two dynamic axes or specialise on a broadcastable 1."""
    cfg = model.cfg
    gen = torch.Generator().manual_seed(0)
    nb, length = cfg.num_blocks, cfg.max_len
    lengths = torch.randint(0, length + 1, (batch, nb), generator=gen)
    pos = torch.arange(length)
    valid = pos >= (length - lengths)[..., None]
    items = torch.randint(1, cfg.num_items + 1, (batch, nb, length), generator=gen) * valid
    behaviors = torch.randint(1, cfg.num_behaviors, (batch, nb, length), generator=gen) * valid
    times = (1_600_000_000 + pos * 3600).expand(batch, nb, length).clone()
    scenario = torch.randint(0, cfg.num_scenarios, (batch,), generator=gen)
    request_time = torch.full((batch,), 1_600_000_000 + length * 3600)
    cand = torch.randint(1, cfg.num_items + 1, (batch, candidates), generator=gen)

    tensors = with_item_rows(model, named_tensors(History(items, behaviors, times, lengths, scenario, request_time),
                                                  cand))
    wanted = wrapper_inputs(name)
    if contract.KV_CACHE in wanted:
        with torch.no_grad():
            tensors[contract.KV_CACHE] = run(model, contract.USER_ENCODER, tensors)
    return tuple(tensors[n] for n in wanted)


def _export_graph(model: ASTRO, name: str, io: GraphIO, staging: Path):
    symbolic.register(TRACE_OPSET)
    dynamic_axes = {
        t.name: {axis: dim for axis, dim in enumerate(t.shape) if isinstance(dim, str)} for t in io.inputs + io.outputs
    }
    raw = staging / f"{name}.raw.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter is chosen on purpose (module docstring); the bucket thresholds
        # it calls constants are constants (plugins/buckets.py).
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            WRAPPERS[name](model),
            example_inputs(model, name),
            str(raw),
            dynamo=False,
            opset_version=TRACE_OPSET,
            input_names=io.input_names,
            output_names=io.output_names,
            dynamic_axes=dynamic_axes,
            custom_opsets={ONNX_DOMAIN: ONNX_OPSET_VERSION},
            do_constant_folding=True,
        )
    proto = onnx.load(str(raw))
    raw.unlink()
    for leftover in staging.glob(f"{name}.raw*"):  # external data of very large models
        leftover.unlink()
    used = {n.op_type for n in proto.graph.node if n.domain == ONNX_DOMAIN}
    proto.functions.extend(f for f in attention_functions() if f.name in used)
    proto = clean(proto)
    pin_io(proto, io)
    proto.graph.name = name
    proto.producer_name = "astro-trt"
    return proto


def _save(proto, path: Path) -> list[Path]:
    onnx.checker.check_model(proto, full_check=True)
    weight_bytes = sum(len(t.raw_data) for t in initializers(proto.graph))
    if weight_bytes > EXTERNAL_DATA_BYTES:
        data = path.with_suffix(".onnx.data")
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
        return [path, data]
    onnx.save_model(proto, str(path))
    return [path]
