"""Defaults every entry point (CLI, Python API, build, runners) reads, each defined here once."""

from __future__ import annotations

import os

from astro_trt.errors import DataError

# export (astro-trt export, export_bundle, the engine profile): the largest dynamic axes a bundle's
# engines take. One user per call is how online serving encodes; 8 covers small request batches.
MAX_BATCH = 8
MAX_CANDIDATES = 1024
EXPORT_PRECISIONS = ("fp32", "fp16")


def _env_threads() -> int:
    raw = os.environ.get("ASTRO_ORT_THREADS") or "2"  # empty is unset
    if not raw.strip().isdigit():
        raise DataError(f"ASTRO_ORT_THREADS={raw!r} is not a thread count; unset it or set an integer >= 0")
    return int(raw)


# ONNX Runtime intra-op threads of validate, bench and bisect: the bench and CI machines give us
# two cores (ASTRO_ORT_THREADS overrides; 0 is one per core).
ORT_THREADS = _env_threads()
# ...of what bench and bench-memory time: one request per core is the serving layout, and on a
# shared machine two threads per request slow the split (~350 small nodes, each waiting for a
# descheduled thread)...
BENCH_THREADS = 1
# ...and of a served model's scorer: the server's own threads (HTTP, gRPC, the stub) need a core
# too, and spinning intra-op threads lose badly on a shared machine (measured on 2 cores: 6.0 ms
# per 256-candidate page with 1 thread, 16.5 ms with 2 while other work ran).
SERVED_ORT_THREADS = 1
