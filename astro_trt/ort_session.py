"""ONNX Runtime CPU sessions, made in one place for every stage that runs a graph on the CPU:
the exporter's checks, the validator's runners, the served Triton models. It imports neither
torch nor onnx, so a served model (or anything else that only runs graphs) never loads them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from astro_trt.lazy import lazy_import

ort = lazy_import("onnxruntime")  # ~0.3 s: a module that only names sessions does not pay for it


def onnx_session(
    path: Path | str | bytes, threads: int | None = None, profile_prefix: str | None = None, *,
    memory_pattern: bool = True,
) -> Any:
    """An ONNX Runtime CPU session, the one place sessions are made. ``threads`` caps the intra-op
    threads (one inter-op thread then); None keeps ONNX Runtime's default of one per core.
    ``profile_prefix`` turns on ONNX Runtime's per-node profiler (``end_profiling`` names the file).
    ``memory_pattern=False`` stops ONNX Runtime from pre-planning one block for all intermediates
    on repeated shapes, which it allocates on top of its arena: for the full model at 1 user x 1024
    candidates (climber) the second run's peak went from 1.3 GB to 2.0 GB with it."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the exporter's graphs trip harmless optimizer warnings
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.enable_mem_pattern = memory_pattern
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    source = path if isinstance(path, bytes) else str(path)  # bytes: a serialized model
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


__all__ = ["onnx_session"]
