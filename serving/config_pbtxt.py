"""Triton model configurations (config.pbtxt) derived from a bundle's manifest: tensor names,
dtypes and dims come from the engine contract the manifest records, batch limits from its
profiles. Nothing here restates the model's shapes.

Batching decision. Triton's dynamic batcher merges only requests whose non-batch dims agree, and
the candidate count M is a non-batch dim that varies by page. Requests are not padded to buckets
(padding costs scorer work proportional to the pad, and padded slots would need masking the
scorer does not have) and ragged batching does not apply (the scorer takes a rectangular
[B, M]): requests with the same M (the fixed page sizes a recommender uses) are merged, a
request with another M runs in its own batch. astro_gate executes request by request.
astro_recommend has a dynamic batcher too: Triton hands its execute() the list of requests queued
together (at most max_batch_size users, the profiles' batch), and the model merges pages of the
same size into one encoder call and one scorer call itself (service.Recommender.pages). Its
cand_items are ragged for the batcher, so pages of other sizes wait in no separate queue: the
model sorts them by size.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from astro_trt.contract import (
    BATCH,
    CAND_ITEM_EMB,
    CAND_ITEMS,
    CANDIDATES,
    ITEM_SCORER,
    KV_CACHE,
    SPLIT_GRAPHS,
    USER_ENCODER,
    GraphIO,
    TensorSpec,
    request_spec,
)
from astro_trt.precision import dtype as dtype_record

# Model names in the repository.
GATE = "astro_gate"  # Python: the input gate, passes the checked tensors on
ENSEMBLE = "astro_score"  # ensemble: gate -> user_encoder -> item_scorer, for one request
RECOMMEND = "astro_recommend"  # Python: encode once per user and history, score every page
PLAN_SUFFIX = "_plan"  # tensorrt_plan twins of the encoder, scorer and ensemble (full TensorRT bundles)
USER_KEY = "user_key"  # astro_recommend: who the history belongs to (any bytes), the cache key
ENCODED = "encoded"  # astro_recommend: whether this request encoded the user (False: served from cache)
USER_KEY_SPEC = TensorSpec(USER_KEY, "bytes", (BATCH, 1))
ENCODED_SPEC = TensorSpec(ENCODED, "bool", (BATCH, 1))
CHECKED = "checked_"  # prefix of the gate's outputs

# Dynamic batching waits at most this long for more requests of the same shape: long enough to
# merge concurrent requests, short next to one scorer call.
QUEUE_DELAY_US = 100



class Enum(str):
    """A protobuf enum value: written bare, not quoted."""


def triton_dtype(dtype: str) -> Enum:
    # "bytes" is Triton's variable-length string, which no engine tensor is.
    return Enum("TYPE_STRING" if dtype == "bytes" else dtype_record(dtype).triton)


def _scalar(value: Any) -> str:
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # protobuf text format reads JSON's string escapes (ASCII output)


def render(message: Mapping[str, Any], indent: int = 0) -> str:
    """Protobuf text format of a nested mapping (messages), lists of mappings (repeated
    messages and maps) and scalars."""
    pad = "  " * indent
    lines = []
    for key, value in message.items():
        if isinstance(value, Mapping):
            body = render(value, indent + 1)
            lines.append(f"{pad}{key} {{\n{body}\n{pad}}}" if body else f"{pad}{key} {{ }}")
        elif isinstance(value, list) and value and isinstance(value[0], Mapping):
            items = [f"{pad}  {{\n{render(v, indent + 2)}\n{pad}  }}" for v in value]
            lines.append(f"{pad}{key} [\n" + ",\n".join(items) + f"\n{pad}]")
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return "\n".join(lines)


def tensor(spec: TensorSpec, name: str | None = None, *, reshape: bool = True) -> dict[str, Any]:
    """A batched model's tensor entry: the leading batch axis is implicit (max_batch_size), the
    candidate axis is -1; a [batch] tensor is sent as [batch, 1] and (``reshape``) reshaped to
    [batch] for the model. An ensemble's tensors keep [batch, 1]: Triton checks them against the
    composing models' declared dims, and reshaping is the composing models' business."""
    if not spec.shape or spec.shape[0] != BATCH:
        raise ValueError(f"{spec.name}: the contract's leading axis must be '{BATCH}', got {spec.shape}")
    dims = [-1 if d == CANDIDATES else int(d) for d in spec.shape[1:]]
    entry: dict[str, Any] = {"name": name or spec.name, "data_type": triton_dtype(spec.dtype)}
    if dims:
        entry["dims"] = dims
    else:
        entry["dims"] = [1]
        if reshape:
            entry["reshape"] = {"shape": []}
    return entry


def max_batch(profiles: Mapping[str, Mapping[str, Sequence[int]]], *graphs: str) -> int:
    """The largest batch every one of ``graphs`` accepts (the profiles' max)."""
    return min(int(profiles[g][BATCH][2]) for g in graphs)


def _parameters(values: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [{"key": k, "value": {"string_value": v if isinstance(v, str) else json.dumps(v)}} for k, v in
            values.items()]


def graph_config(io: GraphIO, profiles: Mapping[str, Any], *, name: str, platform: str) -> str:
    """An ONNX Runtime (``onnxruntime_onnx``) or TensorRT (``tensorrt_plan``) model of one graph."""
    return render({
        "name": name,
        "platform": platform,
        "max_batch_size": max_batch(profiles, io.name),
        "input": [tensor(t) for t in io.inputs],
        "output": [tensor(t) for t in io.outputs],
        "instance_group": [{"count": 1, "kind": Enum("KIND_AUTO")}],
        "dynamic_batching": {"max_queue_delay_microseconds": QUEUE_DELAY_US},
    }) + "\n"


def graph_inputs(io: Mapping[str, GraphIO]) -> list[TensorSpec]:
    """Every input either split graph reads but the kv_cache (which stays inside a served model):
    history tensors and the rows of the item ids (contract.ITEM_ROWS), candidates' rows last."""
    seen: dict[str, TensorSpec] = {}
    for graph in SPLIT_GRAPHS:
        for t in io[graph].inputs:
            if t.name not in (KV_CACHE, CAND_ITEM_EMB):
                seen.setdefault(t.name, t)
    return [*seen.values(), io[ITEM_SCORER].tensor(CAND_ITEM_EMB)]


def request_tensors(io: Mapping[str, GraphIO]) -> list[TensorSpec]:
    """What one scoring request carries: every history input either graph reads, then the
    candidates; item ids, never their rows (a served model looks them up), and never the kv_cache."""
    return [request_spec(t) for t in graph_inputs(io)]


def gate_config(io: Mapping[str, GraphIO], profiles: Mapping[str, Any], config: Mapping[str, Any], *,
                bundle: str, item_table: str) -> str:
    """The Python gate model: checks a request with the project's input gate, looks the item ids up
    in the repository's one copy of the item table (``bundle``: that copy's folder, relative to the
    repository; ``item_table``: its stored form) and passes the graphs' inputs on as
    ``checked_<name>``; a bad request ends there with a 400."""
    return render({
        "name": GATE,
        "backend": "python",
        "max_batch_size": max_batch(profiles, *SPLIT_GRAPHS),
        "input": [tensor(t) for t in request_tensors(io)],
        "output": [tensor(t, CHECKED + t.name) for t in graph_inputs(io)],
        "instance_group": [{"count": 1, "kind": Enum("KIND_CPU")}],
        "parameters": _parameters({"astro_config": dict(config), "profiles": dict(profiles), "bundle": bundle,
                                   "item_table": item_table}),
    }) + "\n"


def ensemble_config(io: Mapping[str, GraphIO], profiles: Mapping[str, Any], *, suffix: str = "") -> str:
    """gate -> user_encoder -> item_scorer for one request. The kv_cache is a tensor internal to
    the ensemble, never one of its outputs."""
    request = request_tensors(io)
    encoder, scorer = io[USER_ENCODER], io[ITEM_SCORER]
    scorer_inputs = [t.name for t in scorer.inputs if t.name != KV_CACHE]
    consumed = [t.name for t in graph_inputs(io)]
    steps = [
        {"model_name": GATE, "model_version": -1,
         "input_map": [{"key": t.name, "value": t.name} for t in request],
         "output_map": [{"key": CHECKED + n, "value": CHECKED + n} for n in consumed]},
        {"model_name": USER_ENCODER + suffix, "model_version": -1,
         "input_map": [{"key": n, "value": CHECKED + n} for n in encoder.input_names],
         "output_map": [{"key": KV_CACHE, "value": KV_CACHE}]},
        {"model_name": ITEM_SCORER + suffix, "model_version": -1,
         "input_map": [{"key": KV_CACHE, "value": KV_CACHE}]
         + [{"key": n, "value": CHECKED + n} for n in scorer_inputs],
         "output_map": [{"key": t.name, "value": t.name} for t in scorer.outputs]},
    ]
    return render({
        "name": ENSEMBLE + suffix,
        "platform": "ensemble",
        "max_batch_size": max_batch(profiles, *SPLIT_GRAPHS),
        "input": [tensor(t, reshape=False) for t in request],
        "output": [tensor(t, reshape=False) for t in scorer.outputs],
        "ensemble_scheduling": {"step": steps},
    }) + "\n"


def recommend_config(io: Mapping[str, GraphIO], profiles: Mapping[str, Any], config: Mapping[str, Any], *,
                     precision: str, cache_bytes: int, ort_threads: int | None, cache_dtype: str = "fp32",
                     bundle_sha256: str = "", batching: bool = True, item_table: str = "fp32") -> str:
    """The Python model that keeps a per-user cache of encoded state across requests;
    ``bundle_sha256`` (the manifest digest) lets a client tell which bundle is served. With
    ``batching`` Triton queues concurrent requests for at most QUEUE_DELAY_US and hands them over
    together (see the module's note)."""
    request = request_tensors(io)
    key, encoded = USER_KEY_SPEC, ENCODED_SPEC
    inputs = [tensor(key), *(tensor(t) for t in request)]
    if batching:
        for entry in inputs:
            if entry["name"] == CAND_ITEMS:
                entry["allow_ragged_batch"] = True
    message: dict[str, Any] = {
        "name": RECOMMEND,
        "backend": "python",
        "max_batch_size": max_batch(profiles, *SPLIT_GRAPHS),
        "input": inputs,
        "output": [*(tensor(t) for t in io[ITEM_SCORER].outputs), tensor(encoded)],
        # One instance: the cache lives in the instance, so a second one would encode users twice.
        "instance_group": [{"count": 1, "kind": Enum("KIND_CPU")}],
    }
    if batching:
        message["dynamic_batching"] = {"max_queue_delay_microseconds": QUEUE_DELAY_US}
    message["parameters"] = _parameters({
        "bundle": "bundle", "precision": precision, "item_table": item_table, "cache_bytes": str(cache_bytes),
        "cache_dtype": cache_dtype,
        "compute": "auto", "ort_threads": "" if ort_threads is None else str(ort_threads),
        "astro_config": dict(config), "bundle_sha256": bundle_sha256})
    return render(message) + "\n"


__all__ = [
    "CHECKED", "ENCODED", "ENSEMBLE", "GATE", "PLAN_SUFFIX", "QUEUE_DELAY_US", "RECOMMEND", "USER_KEY",
    "ensemble_config", "gate_config", "graph_config", "graph_inputs", "max_batch", "recommend_config", "render",
    "request_tensors",
    "tensor", "triton_dtype",
]
