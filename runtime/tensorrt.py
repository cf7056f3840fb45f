"""The TensorRT back end: the bundle's engines through engines/runtime.py ``Session`` on a GPU.

A request is gated once by the public call (runtime/runner.py) and crosses to the device once
(``_put``); the encoded state keeps the KV cache and the history on the device, so scoring the
same history binds both in place (no copy, no second upload). Outputs come back to the host as
numpy, so every runner's results compare with the oracle's. Imports torch only when it runs."""

from __future__ import annotations

from typing import Any

import numpy as np

from astro_trt.arguments import choice, instance
from astro_trt.contract import GRAPHS
from astro_trt.engines.bundle import Bundle
from astro_trt.engines.runtime import Session
from astro_trt.errors import BackendError
from astro_trt.lazy import lazy_import
from astro_trt.precision import names
from astro_trt.runtime.runner import Runner

torch = lazy_import("torch")


def gpu_unavailable_reason() -> str | None:
    """Why TensorRT engines cannot run here, or None when they can."""
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to PyTorch (TensorRT engines need one); run on a GPU machine"
    return None


class TrtRunner(Runner):
    """TensorRT engines of one precision of a bundle (``graphs``: the ones to load), bounded by the
    bundle's engine profiles."""

    runtime = "trt"
    host_kv = False  # a cache from another runner is moved to the device by _put_kv

    def __init__(self, bundle: Any, precision: str = "fp16", *, device: str = "cuda",
                 graphs: tuple[str, ...] = GRAPHS, cuda_graphs: bool = False, item_table: str | None = None) -> None:
        self.session = Session(bundle, precision, device=device, cuda_graphs=cuda_graphs, graphs=graphs,
                               item_table=item_table)
        super().__init__(self.session.cfg, precision, {g: self.session.bundle.profile(g) for g in graphs},
                         item_table=self.session.host_table)

    def _put(self, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        return self.session.to_device(arrays)  # the item rows are gathered on the device

    def _put_kv(self, kv_cache: Any) -> Any:
        if isinstance(kv_cache, np.ndarray):
            kv_cache = torch.from_numpy(kv_cache)
        return kv_cache.to(self.session.device).contiguous()

    def split(self, kv_cache: Any) -> list[Any]:
        return [kv_cache] if kv_cache.shape[0] == 1 else [kv_cache[b : b + 1].clone() for b in range(len(kv_cache))]

    def stack(self, caches: list[Any]) -> Any:
        return caches[0] if len(caches) == 1 else torch.cat(caches)

    def nbytes(self, kv_cache: Any) -> int:
        return int(kv_cache.nbytes)

    def _run(self, graph: str, feeds: dict[str, Any]) -> Any:
        return self.session.run(graph, feeds)


def make_trt_runner(bundle: Any, precision: str) -> tuple[TrtRunner | None, str]:
    """(runner, "") when the bundle's engines of ``precision`` can run here, else (None, why)."""
    instance(bundle, "make_trt_runner bundle", Bundle, "a loaded bundle (load_bundle(DIR))")
    choice(precision, "make_trt_runner precision", names())
    missing = [g for g in GRAPHS if bundle.engine_path(g, precision) is None]
    if missing:
        return None, (f"the bundle has no {precision} engines for {missing} (exported with --no-engines?); "
                      "re-export with engines to validate TensorRT")
    reason = gpu_unavailable_reason()
    if reason:
        return None, reason
    try:
        return TrtRunner(bundle, precision), ""
    except (BackendError, ImportError) as exc:
        return None, str(exc)


__all__ = ["TrtRunner", "gpu_unavailable_reason", "make_trt_runner"]
