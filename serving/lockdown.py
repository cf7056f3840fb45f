"""The one locked-down tritonserver argument list: what `astro-trt serve` starts and what a
container or Kubernetes manifest of the project must start too, so that every served copy of a
bundle answers inference and nothing else.

- Model control "none": the models in the repository load at start and no client can load,
  unload or replace one (a load request can carry a model.py, which Triton runs as the server's
  user).
- Every management API (model repository, model config, shared-memory registration, logging,
  trace, statistics) needs the ``astro-admin-key`` header with the operator's key, on HTTP and
  gRPC alike. Inference, health and metadata stay open (what a client and a load balancer need);
  so does the metrics port (Prometheus text, read-only).

Triton 2.51 takes the key only on its command line, so local accounts can read it in
/proc/PID/cmdline: the key keeps out remote clients and web pages, not users of the same host
(run the server in its own container or user for that).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

# Triton 2.51's names of its API groups (tritonserver --help, --http-restricted-api).
MANAGEMENT_APIS = ("model-repository", "model-config", "shared-memory", "logging", "trace", "statistics")
OPEN_APIS = ("health", "metadata", "inference")
# The header (HTTP) / metadata key (gRPC, which wants it lower case) that carries the key.
KEY_HEADER = "astro-admin-key"


def new_api_key() -> str:
    """A fresh operator key (256 bits, URL-safe: it goes into a header and a command line)."""
    return secrets.token_urlsafe(32)


def admin_headers(api_key: str) -> dict[str, str]:
    """What a client sends to reach the management APIs (tritonclient's ``headers=``)."""
    return {KEY_HEADER: api_key}


def tritonserver_args(repository: str, *, api_key: str, http_port: int, grpc_port: int, metrics_port: int,
                      address: str = "127.0.0.1", extra: Sequence[str] = ()) -> list[str]:
    """tritonserver's arguments after the binary: every model under ``repository`` loaded at
    start and nothing loadable later, the management APIs behind ``api_key``. ``api_key`` may be
    a placeholder a manifest expands (Kubernetes ``$(ASTRO_ADMIN_KEY)`` from a Secret);
    ``extra`` goes last (e.g. ``--backend-directory``)."""
    if not api_key or any(c in api_key for c in ",:= \n"):
        raise ValueError("api_key must be a non-empty token without ',', ':', '=' or whitespace")
    restricted = f"{','.join(MANAGEMENT_APIS)}:{KEY_HEADER}={api_key}"
    args = [f"--model-repository={repository}", "--model-control-mode=none",
            f"--http-restricted-api={restricted}", f"--grpc-restricted-protocol={restricted}",
            "--exit-on-error=true", "--strict-readiness=true", "--exit-timeout-secs=10"]
    for kind, port in (("http", http_port), ("grpc", grpc_port), ("metrics", metrics_port)):
        args += [f"--{kind}-address={address}", f"--{kind}-port={port}"]
    return [*args, *extra]


__all__ = ["KEY_HEADER", "MANAGEMENT_APIS", "OPEN_APIS", "admin_headers", "new_api_key", "tritonserver_args"]
