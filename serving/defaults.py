"""Serving defaults, in a module the command line can import without numpy or the bundle code."""

from __future__ import annotations

# astro_recommend's per-user cache of encoded state.
DEFAULT_CACHE_BYTES = 256 << 20
# One ONNX Runtime thread per scorer call: the server's own threads (HTTP, gRPC, the stub) need a
# core too, and spinning intra-op threads lose badly on a shared machine (measured on 2 cores:
# 6.0 ms per 256-candidate page with 1 thread, 16.5 ms with 2 while other work ran).
DEFAULT_ORT_THREADS = 1

__all__ = ["DEFAULT_CACHE_BYTES", "DEFAULT_ORT_THREADS"]
