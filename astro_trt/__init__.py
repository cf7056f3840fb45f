"""astro-trt: compile a trained ASTRO recommendation model into verified TensorRT engines.

The main job from Python (each function is what the command of the same name runs)::

    import astro_trt

    bundle = astro_trt.export_bundle("examples/ml100k", "build/ml100k", force=True)
    report = astro_trt.validate_bundle(bundle.directory, data="synthetic")
    runner = astro_trt.OrtRunner.from_bundle(astro_trt.load_bundle(bundle.directory), "fp32")

Stages live in sub-packages named after them: ``astro_trt.model`` (PyTorch ASTRO, data,
training), ``astro_trt.exporter`` (ONNX), ``astro_trt.engines`` (TensorRT builds, bundle,
runtime), ``astro_trt.validate`` (parity and throughput), ``astro_trt.plugins`` (attention
operators: reference, kernels, TensorRT plugins). The names below are imported on first use,
so ``import astro_trt`` (and ``astro-trt --help``) never pays for torch or TensorRT.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it (imported on first attribute access, PEP 562)
_API: dict[str, str] = {
    "export_bundle": "astro_trt.engines.export_bundle",
    "ExportedBundle": "astro_trt.engines.export_bundle",
    "load_bundle": "astro_trt.engines.bundle",
    "Bundle": "astro_trt.engines.bundle",
    "describe_bundle": "astro_trt.engines.describe",
    "validate_bundle": "astro_trt.validate.parity",
    "ParityReport": "astro_trt.validate.parity",
    "Gates": "astro_trt.validate.gates",
    "bisect_bundle": "astro_trt.validate.bisect",
    "BisectReport": "astro_trt.validate.bisect",
    "bench": "astro_trt.validate.bench_bundle",
    "BenchRun": "astro_trt.validate.bench_bundle",
    "TorchRunner": "astro_trt.runtime.torch_runner",
    "OrtRunner": "astro_trt.runtime.onnxruntime",
    "TrtRunner": "astro_trt.runtime.tensorrt",
    "make_trt_runner": "astro_trt.runtime.tensorrt",
    "synthetic_batch": "astro_trt.model.synthetic",
    "load_checkpoint": "astro_trt.model.checkpoint",
}
_ALIASES = {"bench": "bench_bundle"}

__all__ = [  # the names of _API, written out so that linters and IDEs see them
    "BenchRun", "BisectReport", "Bundle", "ExportedBundle", "Gates", "OrtRunner", "ParityReport", "TorchRunner",
    "TrtRunner", "__version__", "bench", "bisect_bundle", "describe_bundle", "export_bundle", "load_bundle",
    "load_checkpoint", "make_trt_runner", "synthetic_batch", "validate_bundle",
]

if TYPE_CHECKING:  # what type checkers and IDEs see; nothing is imported at run time
    from astro_trt.engines.bundle import Bundle, load_bundle
    from astro_trt.engines.describe import describe_bundle
    from astro_trt.engines.export_bundle import ExportedBundle, export_bundle
    from astro_trt.model.checkpoint import load_checkpoint
    from astro_trt.model.synthetic import synthetic_batch
    from astro_trt.runtime.onnxruntime import OrtRunner
    from astro_trt.runtime.tensorrt import TrtRunner, make_trt_runner
    from astro_trt.runtime.torch_runner import TorchRunner
    from astro_trt.validate.bench_bundle import BenchRun
    from astro_trt.validate.bench_bundle import bench_bundle as bench
    from astro_trt.validate.bisect import BisectReport, bisect_bundle
    from astro_trt.validate.gates import Gates
    from astro_trt.validate.parity import ParityReport, validate_bundle


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'astro_trt' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), _ALIASES.get(name, name))
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
