"""What computes the encoder and the scorer inside a served model: ONNX Runtime on a CPU, the
project's TensorRT runtime (engines/runtime.py) where a GPU and the bundle's engines are. Both
take and return numpy at the edges; the encoded state stays in the runtime's own form (a numpy
array, or a tensor on the device) so that a cached user never crosses to the host."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from astro_trt.contract import ITEM_SCORER, KV_CACHE, SCORER_HISTORY_INPUTS, SPLIT_GRAPHS, USER_ENCODER
from astro_trt.engines.bundle import Bundle
from astro_trt.errors import BackendError

COMPUTES = ("auto", "ort", "trt")


class Compute(Protocol):
    name: str

    def encode(self, arrays: Mapping[str, np.ndarray]) -> list[Any]:
        """Checked history arrays [B, ...] -> one encoded state per user."""

    def score(self, states: Sequence[Any], arrays: Mapping[str, np.ndarray], cand: np.ndarray) -> np.ndarray:
        """States of the B users, their history arrays and cand [B, M] -> logits [B, M, T] float32."""

    def nbytes(self, state: Any) -> int: ...


class OrtCompute:
    def __init__(self, bundle: Bundle, precision: str, threads: int | None = None) -> None:
        from astro_trt.exporter.ort_session import onnx_session

        self.name = f"onnxruntime-{precision}"
        self.io = bundle.io(precision)
        self.sessions = {g: onnx_session(bundle.onnx_path(g, precision), threads) for g in SPLIT_GRAPHS}

    def encode(self, arrays: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        feeds = {n: arrays[n] for n in self.io[USER_ENCODER].input_names}
        kv = self.sessions[USER_ENCODER].run(None, feeds)[0]
        # Copies when several users were encoded together: a cached view would keep the whole batch alive.
        return [kv] if kv.shape[0] == 1 else [kv[b : b + 1].copy() for b in range(kv.shape[0])]

    def score(self, states: Sequence[np.ndarray], arrays: Mapping[str, np.ndarray], cand: np.ndarray) -> np.ndarray:
        feeds = {KV_CACHE: states[0] if len(states) == 1 else np.concatenate(states), "cand_items": cand}
        feeds.update({n: arrays[n] for n in SCORER_HISTORY_INPUTS})
        names = self.io[ITEM_SCORER].input_names
        return np.asarray(self.sessions[ITEM_SCORER].run(None, {n: feeds[n] for n in names})[0], dtype=np.float32)

    def nbytes(self, state: np.ndarray) -> int:
        return int(state.nbytes)


class TrtCompute:
    """The bundle's engines through the project's runtime; a user's state is its KV cache on the
    device, and a page binds the stacked caches of its users."""

    def __init__(self, bundle: Bundle, precision: str) -> None:
        from astro_trt.engines.runtime import Session

        self.name = f"{bundle.backend}-{precision}"
        self.session = Session(bundle, precision)

    def encode(self, arrays: Mapping[str, np.ndarray]) -> list[Any]:
        state = self.session.encode(dict(arrays))
        kv = state.kv_cache
        return [kv] if state.batch == 1 else [kv[b : b + 1].clone() for b in range(state.batch)]

    def score(self, states: Sequence[Any], arrays: Mapping[str, np.ndarray], cand: np.ndarray) -> np.ndarray:
        import torch

        from astro_trt.engines.runtime import UserState

        kv = states[0] if len(states) == 1 else torch.cat(list(states))
        history = {n: torch.from_numpy(arrays[n]).to(self.session.device) for n in SCORER_HISTORY_INPUTS}
        logits = self.session.score(UserState(kv, history, len(states)), cand)
        return logits.float().cpu().numpy()

    def nbytes(self, state: Any) -> int:
        return int(state.nbytes)


def _gpu_visible() -> bool:
    # Checked before importing torch: a CPU-only server should not pay for it in every model.
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/dxg"))


def make_compute(bundle: Bundle, precision: str, kind: str = "auto", threads: int | None = None) -> Compute:
    """``auto``: the TensorRT runtime when the bundle has engines and a GPU is visible, else
    ONNX Runtime on the CPU."""
    if kind not in COMPUTES:
        raise BackendError(f"compute '{kind}' is unknown; choose one of {list(COMPUTES)}")
    if kind == "trt" or (kind == "auto" and bundle.backend is not None and _gpu_visible()):
        return TrtCompute(bundle, precision)
    return OrtCompute(bundle, precision, threads)


__all__ = ["COMPUTES", "Compute", "OrtCompute", "TrtCompute", "make_compute"]
