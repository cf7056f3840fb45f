"""What the generated Python-backend models run inside Triton's Python stub. The model.py files
in a repository only hand Triton's ``triton_python_backend_utils`` module (``pb``) to these
classes, so the logic lives (and is linted and versioned) here.

Errors: a request the gate refuses gets INVALID_ARG (HTTP 400, gRPC INVALID_ARGUMENT) with the
gate's one-line message; any other failure gets INTERNAL with one line. The model keeps serving."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from astro_trt.config import ASTROConfig
from astro_trt.contract import CAND_ITEMS, HISTORY_INPUTS
from astro_trt.errors import AstroError, DataError
from astro_trt.runtime.runner import with_item_rows
from astro_trt.serving.cache import DEFAULT_CACHE_DTYPE, check_cache_dtype
from astro_trt.serving.config_pbtxt import CHECKED, ENCODED, USER_KEY
from astro_trt.serving.defaults import check_cache_bytes, check_ort_threads
from astro_trt.serving.service import Recommender, check_request, gate_profiles
from astro_trt.serving.source import load_served_bundle

REQUEST_INPUTS = (*HISTORY_INPUTS, CAND_ITEMS)


def parameters(args: dict[str, Any]) -> dict[str, str]:
    """The ``parameters`` of the model's config.pbtxt as name -> string."""
    config = json.loads(args["model_config"])
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


def _int_parameter(params: dict[str, str], name: str) -> int:
    """An integer parameter of config.pbtxt; a hand edit that is not one is refused in one line
    (Triton prints it as the model's load failure)."""
    text = params.get(name, "")
    try:
        return int(text)
    except ValueError:
        raise DataError(f"config.pbtxt parameter {name} = {text!r} is not an integer; write the repository again "
                        "with `astro-trt triton` (--cache-mib, --ort-threads) instead of editing it") from None


def read_inputs(pb: Any, request: Any, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    out = {}
    for name in names:
        tensor = pb.get_input_tensor_by_name(request, name)
        if tensor is not None:
            out[name] = tensor.as_numpy()
    return out


def error_response(pb: Any, exc: BaseException) -> Any:
    if isinstance(exc, DataError):
        return pb.InferenceResponse(error=pb.TritonError(str(exc), pb.TritonError.INVALID_ARG))
    text = str(exc).splitlines()[0] if str(exc) else ""
    message = text if isinstance(exc, AstroError) else f"{type(exc).__name__}: {text}"
    return pb.InferenceResponse(error=pb.TritonError(message, pb.TritonError.INTERNAL))


class GateModel:
    """astro_gate: the project's input gate in front of the ONNX Runtime / TensorRT models of the
    ensemble, which would otherwise read whatever ids they are sent, and the lookup of the item
    ids' rows in the repository's one item table (the copy astro_recommend serves from, mapped:
    only the rows requested are read; verified with that copy's manifest when the model loads)."""

    def __init__(self, args: dict[str, Any], pb: Any) -> None:
        params = parameters(args)
        self.pb = pb
        self.cfg = ASTROConfig.from_dict(json.loads(params["astro_config"]), source="astro_gate config.pbtxt")
        self.profiles = gate_profiles(json.loads(params["profiles"]))
        # The repository this model was written into (a server that loads a subset of the models
        # links their folders into a repository of its own; the table stays in the written one).
        repository = Path(args["model_repository"]).resolve().parent
        bundle = load_served_bundle(repository / params["bundle"])
        self.item_table = bundle.item_table(params["item_table"])
        self.outputs = [t["name"][len(CHECKED):] for t in json.loads(args["model_config"])["output"]]

    def respond(self, request: Any) -> Any:
        try:
            arrays, cand = check_request(self.cfg, read_inputs(self.pb, request, REQUEST_INPUTS), self.profiles)
            arrays = with_item_rows(self.item_table, {**arrays, CAND_ITEMS: cand})
        except Exception as exc:  # noqa: BLE001 - every failure becomes this request's error, not the server's
            return error_response(self.pb, exc)
        return self.pb.InferenceResponse([self.pb.Tensor(CHECKED + n, arrays[n]) for n in self.outputs])


class RecommendModel:
    """astro_recommend: encode a user once per (key, history), score every page against the
    cached state. Counters go to the server's metrics endpoint (astro_* families)."""

    def __init__(self, args: dict[str, Any], pb: Any) -> None:
        params = parameters(args)
        self.pb = pb
        bundle_dir = Path(args["model_repository"]) / args["model_version"] / params.get("bundle", "bundle")
        bundle = load_served_bundle(bundle_dir)
        threads = check_ort_threads(_int_parameter(params, "ort_threads") if params.get("ort_threads") else None)
        cache_bytes = check_cache_bytes(_int_parameter(params, "cache_bytes"))
        self.recommender = Recommender(bundle, params["precision"], cache_bytes=cache_bytes,
                                       item_table=params.get("item_table") or None,
                                       compute=params.get("compute", "auto"), threads=threads,
                                       cache_dtype=check_cache_dtype(params.get("cache_dtype") or DEFAULT_CACHE_DTYPE))
        self.metrics = _Metrics(pb, args["model_name"])

    def respond(self, requests: list[Any]) -> list[Any]:
        """One response per request, in order. The requests Triton's dynamic batcher hands over
        together are served in merged calls (Recommender.pages); a refused request gets its own
        error response and its neighbours are still served."""
        inputs: list[Any] = []
        for request in requests:
            try:
                tensors = read_inputs(self.pb, request, REQUEST_INPUTS)
                keys = self.pb.get_input_tensor_by_name(request, USER_KEY)
                if keys is None:
                    raise DataError(f"request is missing {USER_KEY}; send one key per user ([batch, 1] bytes)")
                inputs.append((keys.as_numpy(), tensors))
            except Exception as exc:  # noqa: BLE001 - every failure becomes this request's error, not the server's
                inputs.append(exc)
        valid = [i for i, item in enumerate(inputs) if not isinstance(item, Exception)]
        try:
            served = self.recommender.pages([inputs[i] for i in valid])
        except Exception as exc:  # noqa: BLE001 - pages() returns per-request errors; this is a last resort
            served = [exc] * len(valid)
        results: list[Any] = list(inputs)
        for i, result in zip(valid, served, strict=True):
            results[i] = result
        responses = []
        for result in results:
            if isinstance(result, Exception):
                self.metrics.refused.increment(1)
                responses.append(error_response(self.pb, result))
                continue
            self.metrics.update(result.encoded, self.recommender.cache.stats)
            responses.append(self.pb.InferenceResponse([self.pb.Tensor("logits", result.logits),
                                                        self.pb.Tensor(ENCODED, result.encoded[:, None])]))
        return responses


class _Metrics:
    def __init__(self, pb: Any, model: str) -> None:
        labels = {"model": model}
        self._families: list[Any] = []  # a family must outlive its metrics

        def family(name: str, text: str, kind: Any) -> Any:
            self._families.append(pb.MetricFamily(name=name, description=text, kind=kind))
            return self._families[-1].Metric(labels=labels)

        counter, gauge = pb.MetricFamily.COUNTER, pb.MetricFamily.GAUGE
        self.encodes = family("astro_user_encodes_total", "users encoded (cache misses)", counter)
        self.hits = family("astro_cache_hits_total", "users served from the per-user cache", counter)
        self.refused = family("astro_requests_refused_total", "requests refused by the input gate or failed", counter)
        self.evictions = family("astro_cache_evictions_total", "cache entries evicted to stay within its bytes",
                                counter)
        self.bytes = family("astro_cache_bytes", "bytes of encoded state held in the cache", gauge)
        self._evicted = 0

    def update(self, encoded: np.ndarray, stats: Any) -> None:
        self.encodes.increment(int(encoded.sum()))
        self.hits.increment(int((~encoded).sum()))
        self.evictions.increment(stats.evictions - self._evicted)
        self._evicted = stats.evictions
        self.bytes.set(stats.bytes)


__all__ = ["GateModel", "RecommendModel", "error_response", "parameters", "read_inputs"]
