"""What computes the encoder and the scorer inside a served model: a runner of the runtime layer
(runtime/) over the split graphs, ONNX Runtime on a CPU, the TensorRT engines where a GPU and the
bundle's engines are. The served model gates a request once itself (serving/service.py) and runs
the runner's checked calls; the encoded state stays in the runner's own form (a numpy array, or a
tensor on the device) so that a cached user never crosses to the host."""

from __future__ import annotations

import os

from astro_trt.contract import SPLIT_GRAPHS
from astro_trt.engines.bundle import Bundle
from astro_trt.errors import BackendError
from astro_trt.runtime.onnxruntime import OrtRunner
from astro_trt.runtime.runner import Runner
from astro_trt.runtime.tensorrt import TrtRunner

COMPUTES = ("auto", "ort", "trt")


def _gpu_visible() -> bool:
    # Checked before importing torch: a CPU-only server should not pay for it in every model.
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/dxg"))


def make_compute(bundle: Bundle, precision: str, kind: str = "auto", threads: int | None = None,
                 item_table: str | None = None) -> Runner:
    """The split graphs' runner. ``auto``: the TensorRT engines when the bundle has them and a GPU
    is visible, else ONNX Runtime on the CPU (``threads`` intra-op threads, None: one per core);
    ``item_table``: the stored form of the item table to look rows up in (None: the bundle's default)."""
    if kind not in COMPUTES:
        raise BackendError(f"compute '{kind}' is unknown; choose one of {list(COMPUTES)}")
    if kind == "trt" or (kind == "auto" and bundle.backend is not None and _gpu_visible()):
        return TrtRunner(bundle, precision, graphs=SPLIT_GRAPHS, item_table=item_table)
    return OrtRunner.from_bundle(bundle, precision, threads, only=SPLIT_GRAPHS, profiles=True, item_table=item_table)


__all__ = ["COMPUTES", "make_compute"]
