"""Calling the served models with tritonclient over HTTP or gRPC: contract tensors in, logits
out. A [batch] tensor travels as [batch, 1] (Triton's batched models carry the batch axis
implicitly)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from astro_trt.lazy import lazy_import
from astro_trt.serving.config_pbtxt import ENCODED, RECOMMEND, USER_KEY
from astro_trt.serving.proxy import USER_KEY_HEADER

# tritonclient comes with the serve extra and costs ~0.3 s: only a command that calls a server pays.
_CLIENTS = {"http": lazy_import("tritonclient.http"), "grpc": lazy_import("tritonclient.grpc")}
triton_utils = lazy_import("tritonclient.utils")

PROTOCOLS = ("http", "grpc")
TIMEOUT_S = 60.0  # a request that takes longer counts as failed, so no client waits for ever


def _module(protocol: str) -> Any:
    if protocol not in _CLIENTS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    return _CLIENTS[protocol]


def connect(protocol: str, url: str) -> Any:
    module = _module(protocol)
    if protocol == "http":
        return module.InferenceServerClient(url, connection_timeout=TIMEOUT_S, network_timeout=TIMEOUT_S)
    return module.InferenceServerClient(url)


def _datatype(array: np.ndarray) -> str:
    return "BYTES" if array.dtype == object else triton_utils.np_to_triton_dtype(array.dtype)


def inputs(protocol: str, tensors: Mapping[str, np.ndarray], user_key: bytes | None = None) -> list[Any]:
    module = _module(protocol)
    named = dict(tensors)
    if user_key is not None:
        named = {USER_KEY: np.array([[user_key]], dtype=object), **named}
    out = []
    for name, array in named.items():
        array = np.asarray(array)
        if array.ndim == 1:
            array = array[:, None]
        entry = module.InferInput(name, list(array.shape), _datatype(array))
        entry.set_data_from_numpy(array)
        out.append(entry)
    return out


def header_key(user_key: bytes) -> str:
    """The X-User-Key value for ``user_key``: the key itself when it is printable ASCII without a
    comma, else its hex (the value only has to be the same for every page of a user). HAProxy's
    ``hdr()`` splits a header at commas, so keys "a,1" and "a,2" would hash alike."""
    if user_key.isascii() and user_key.decode().isprintable() and b"," not in user_key:
        return user_key.decode()
    return user_key.hex()


def infer(protocol: str, client: Any, tensors: Mapping[str, np.ndarray], user_key: bytes | None = None,
          model: str = RECOMMEND) -> Any:
    """One request; returns the InferResult (``as_numpy("logits")``). Errors raise tritonclient's
    InferenceServerException (``.status()`` is "400" / "StatusCode.INVALID_ARGUMENT" for a refused
    request). A ``user_key`` also travels as the X-User-Key header (gRPC metadata), which a proxy
    in front of replicas routes by (proxy.py)."""
    kwargs: dict[str, Any] = {"client_timeout": TIMEOUT_S} if protocol == "grpc" else {}
    if user_key is not None:
        kwargs["headers"] = {(USER_KEY_HEADER.lower() if protocol == "grpc" else USER_KEY_HEADER): header_key(user_key)}
    return client.infer(model, inputs(protocol, tensors, user_key), **kwargs)


def recommend(protocol: str, client: Any, user_key: bytes, tensors: Mapping[str, np.ndarray]) -> tuple[np.ndarray,
                                                                                                        np.ndarray]:
    """astro_recommend: (logits [B, M, T], encoded [B])."""
    result = infer(protocol, client, tensors, user_key)
    return result.as_numpy("logits"), result.as_numpy(ENCODED).reshape(-1)


def served_config(url: str, model: str = RECOMMEND, headers: Mapping[str, str] | None = None) -> dict[str, str]:
    """The model's config.pbtxt parameters (strings) as the server reports them over HTTP
    (a management API: ``headers`` carry the operator's key, see lockdown.py). A reply that is
    not a model config raises ValueError."""
    client = connect("http", url)
    try:
        config = client.get_model_config(model, headers=dict(headers or {}))
    finally:
        client.close()
    parameters = config.get("parameters") if isinstance(config, dict) else None
    if not isinstance(parameters, dict) or not all(isinstance(v, dict) for v in parameters.values()):
        raise ValueError(f"the reply is not a Triton model config of {model} (no parameters)")
    return {k: str(v.get("string_value", "")) for k, v in parameters.items()}


def server_times(url: str, model: str = RECOMMEND, headers: Mapping[str, str] | None = None) -> dict[str, float]:
    """Triton's cumulative statistics of ``model`` (over HTTP; a management API like
    served_config): successful requests and the nanoseconds they spent queued and computing.
    A reply that is not Triton's statistics raises ValueError."""
    client = connect("http", url)
    try:
        reply = client.get_inference_statistics(model, headers=dict(headers or {}))
    finally:
        client.close()
    try:
        model_stats = reply["model_stats"][0]
        stats = model_stats["inference_stats"]
        # executions: execute() calls; fewer than count when the dynamic batcher merged requests.
        return {"count": int(stats["success"]["count"]), "queue_ns": int(stats["queue"]["ns"]),
                "compute_ns": int(stats["compute_infer"]["ns"]), "executions": int(model_stats["execution_count"])}
    except (KeyError, IndexError, TypeError, ValueError):
        raise ValueError(f"the reply is not Triton's statistics of {model}") from None


__all__ = ["PROTOCOLS", "header_key", "server_times", "TIMEOUT_S", "connect", "infer", "inputs", "recommend",
           "served_config"]
