"""A serving session over a bundle on a GPU (docs/attention.md, "Runtimes").

``encode(history)`` runs the user encoder once and keeps the KV cache on the device as a
:class:`UserState`; ``score(state, candidates)`` binds that cache's device buffer directly as the
scorer's ``kv_cache`` input (no copy), so one encoded user is scored against any number of
candidate batches. ``full(history, candidates)`` runs the full-model engine (the baseline).

Device buffers are torch CUDA tensors; inputs are validated on the host first (engines/inputs.py).
Needs a GPU and the back end the bundle was built with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from astro_trt import contract
from astro_trt.contract import FULL_MODEL, ITEM_SCORER, KV_CACHE, LOGITS, USER_ENCODER
from astro_trt.engines.backend import BACKENDS, capturing_logger
from astro_trt.engines.bundle import Bundle, load_bundle
from astro_trt.engines.inputs import validate_candidates, validate_history
from astro_trt.errors import BackendError, BundleError, DataError
from astro_trt.precision import dtype


@dataclass
class UserState:
    """One encoded batch of users, resident on the device: the KV cache plus the history inputs
    the scorer needs (lengths, times, scenario, request time)."""

    kv_cache: Any  # torch.Tensor [B, N_L, Nb, 2, H, L, dh] on the device
    history: dict[str, Any]  # contract.SCORER_HISTORY_INPUTS -> torch.Tensor on the device
    batch: int


class _Engine:
    """One deserialized engine with one execution context."""

    def __init__(self, trt: Any, runtime: Any, path: Path, cuda_graphs: bool) -> None:
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise BackendError(f"{path}: the engine does not deserialize on this GPU (wrong GPU, driver or "
                               "back-end version); re-export the bundle on or for this GPU")
        self.engine = engine
        self.name = path.name
        if cuda_graphs:
            # Kept on self: the context was created from it, so it must not be freed before the context.
            self.runtime_config = engine.create_runtime_config()
            self.runtime_config.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
            self.context = engine.create_execution_context(self.runtime_config)
        else:
            self.context = engine.create_execution_context()
        if self.context is None:
            raise BackendError(f"{path}: TensorRT could not create an execution context (out of GPU memory?); "
                               "free GPU memory or use a smaller --max-batch/--max-candidates profile")
        self.outputs = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)
                        if engine.get_tensor_mode(engine.get_tensor_name(i)) == trt.TensorIOMode.OUTPUT]

    def run(self, inputs: dict[str, Any], outputs: dict[str, Any], stream: Any) -> None:
        # TensorRT reports a refused shape or address by returning False, not by raising.
        for name, tensor in inputs.items():
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise BackendError(f"{self.name}: input {name} of shape {tuple(tensor.shape)} is outside the "
                                   "engine's optimization profile; split the request or re-export with a larger "
                                   "profile")
        for name, tensor in {**inputs, **outputs}.items():
            if not self.context.set_tensor_address(name, tensor.data_ptr()):
                raise BackendError(f"{self.name}: TensorRT refused the device buffer of {name} (misaligned or not "
                                   "a tensor of this engine); pass contiguous CUDA tensors")
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise BackendError(f"{self.name}: TensorRT failed to enqueue the engine; run with a smaller batch or "
                               "check the log")


class Session:
    """Engines of one precision of a bundle, ready to serve on ``device``."""

    def __init__(self, bundle: Bundle | str | Path, precision: str = "fp16", *, device: str = "cuda",
                 cuda_graphs: bool = False, graphs: tuple[str, ...] = contract.GRAPHS) -> None:
        import torch

        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        if self.bundle.backend is None:
            raise BundleError(f"{self.bundle.directory} has no engines (exported with --no-engines); re-export it "
                              "with a TensorRT back end")
        if not torch.cuda.is_available():
            raise BackendError("the engine runtime needs an NVIDIA GPU with CUDA; validate on the CPU with "
                               "ONNX Runtime instead (astro-trt validate --runtime ort)")
        backend = BACKENDS[self.bundle.backend]
        if cuda_graphs and not backend.cuda_graphs:
            raise BackendError(f"CUDA graphs are not supported by this runtime on back end '{backend.name}'; "
                               "drop cuda_graphs or use a TensorRT-RTX bundle")
        self.cfg = self.bundle.config
        self.precision = precision
        self.io = self.bundle.io(precision)
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise BackendError(f"device {device!r} is not a device ({exc}); pass 'cuda' or 'cuda:N'") from None
        if self.device.type != "cuda":
            raise BackendError(f"device {device!r}: TensorRT engines run on a CUDA device; pass 'cuda' or 'cuda:N'")
        self.stream = torch.cuda.Stream(self.device)
        trt = backend.load()
        self._runtime = trt.Runtime(capturing_logger(trt))
        self.engines: dict[str, _Engine] = {}
        for graph in graphs:
            path = self.bundle.engine_path(graph, precision)
            if path is None:
                raise BundleError(f"{self.bundle.directory}: no {precision} engine for {graph}; re-export the bundle")
            self.engines[graph] = _Engine(trt, self._runtime, path, cuda_graphs)

    def _to_device(self, arrays: dict[str, Any]) -> dict[str, Any]:
        import torch

        return {n: torch.from_numpy(a).to(self.device, non_blocking=True) for n, a in arrays.items()}

    def _output(self, graph: str, name: str, dims: dict[str, int]) -> Any:
        import torch

        spec = self.io[graph].tensor(name)
        return torch.empty(spec.concrete(dims), dtype=dtype(spec.dtype).torch(), device=self.device)

    def encode(self, history: Any) -> UserState:
        """History (model/astro.py History or a mapping of contract names) -> UserState on the device."""
        import torch

        arrays = validate_history(self.cfg, history, self.bundle.profile(USER_ENCODER))
        batch = arrays["hist_items"].shape[0]
        with torch.cuda.stream(self.stream):
            dev = self._to_device(arrays)
            kv = self._output(USER_ENCODER, KV_CACHE, {contract.BATCH: batch})
            inputs = {n: dev[n] for n in self.io[USER_ENCODER].input_names}
            self.engines[USER_ENCODER].run(inputs, {KV_CACHE: kv}, self.stream)
        return UserState(kv, {n: dev[n] for n in contract.SCORER_HISTORY_INPUTS}, batch)

    def score(self, state: UserState, cand_items: Any) -> Any:
        """cand_items [B, M] -> logits [B, M, T] (float32 torch tensor on the device). The
        scorer reads ``state.kv_cache`` in place: its device pointer is bound as the input."""
        import torch

        if not isinstance(state, UserState):
            raise DataError(f"Session.score: state is a {type(state).__name__}, not the UserState this session's "
                            "encode() returned; call encode(history) first and pass its result")
        cand = validate_candidates(self.cfg, cand_items, state.batch, self.bundle.profile(ITEM_SCORER))
        dims = {contract.BATCH: state.batch, contract.CANDIDATES: cand.shape[1]}
        with torch.cuda.stream(self.stream):
            inputs = {KV_CACHE: state.kv_cache, **state.history, "cand_items": self._to_device({"c": cand})["c"]}
            logits = self._output(ITEM_SCORER, LOGITS, dims)
            self.engines[ITEM_SCORER].run(inputs, {LOGITS: logits}, self.stream)
        self.stream.synchronize()
        return logits

    def full(self, history: Any, cand_items: Any) -> Any:
        """The baseline: every (user, candidate) pair recomputed by the full-model engine."""
        import torch

        arrays = validate_history(self.cfg, history, self.bundle.profile(FULL_MODEL))
        batch = arrays["hist_items"].shape[0]
        arrays["cand_items"] = validate_candidates(self.cfg, cand_items, batch, self.bundle.profile(FULL_MODEL))
        dims = {contract.BATCH: batch, contract.CANDIDATES: arrays["cand_items"].shape[1]}
        with torch.cuda.stream(self.stream):
            dev = self._to_device(arrays)
            logits = self._output(FULL_MODEL, LOGITS, dims)
            self.engines[FULL_MODEL].run({n: dev[n] for n in self.io[FULL_MODEL].input_names}, {LOGITS: logits},
                                         self.stream)
        self.stream.synchronize()
        return logits


__all__ = ["Session", "UserState"]
