"""The bundle's TensorRT engines of one precision, loaded on a GPU and run one graph at a time
(docs/attention.md, "Runtimes"). This is the TensorRT back end's executor, not an entry point:
``Session.run(graph, inputs)`` binds device tensors the caller has already checked and moved
(runtime/tensorrt.py: the runner gates a request once, moves it to the device once, and keeps
the encoder's KV cache there, so the scorer binds that buffer in place, no copy).

Device buffers are torch CUDA tensors. Needs a GPU and the back end the bundle was built with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from astro_trt import contract
from astro_trt.contract import CAND_ITEM_EMB
from astro_trt.engines.backend import BACKENDS, capturing_logger
from astro_trt.engines.bundle import Bundle, load_bundle
from astro_trt.engines.device_table import DeviceItemTable, upload
from astro_trt.errors import BackendError, BundleError
from astro_trt.lazy import lazy_import
from astro_trt.precision import dtype

torch = lazy_import("torch")

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
    """Engines of one precision of a bundle, ready to run on ``device``, with the bundle's item table
    (``item_table``: the stored form to serve, None: the bundle's default) resident there."""

    def __init__(self, bundle: Bundle | str | Path, precision: str = "fp16", *, device: str = "cuda",
                 cuda_graphs: bool = False, graphs: tuple[str, ...] = contract.GRAPHS,
                 item_table: str | None = None) -> None:
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
        self.host_table = self.bundle.item_table(item_table)
        with torch.cuda.stream(self.stream):
            self.item_rows = DeviceItemTable(self.host_table, self.device)
        self.stream.synchronize()

    def to_device(self, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        """Checked host arrays -> device tensors, on this session's stream (the one crossing), with
        the rows of their item ids gathered there (contract.ITEM_ROWS)."""
        with torch.cuda.stream(self.stream):
            return upload(arrays, self.device, self.item_rows)

    def run(self, graph: str, inputs: dict[str, Any]) -> Any:
        """One graph on device tensors (a superset of its inputs, by contract name) -> its one output
        as a device tensor, after the stream has finished."""
        io = self.io[graph]
        feeds = {n: inputs[n] for n in io.input_names}
        dims = {contract.BATCH: int(next(iter(feeds.values())).shape[0])}
        if CAND_ITEM_EMB in feeds:
            dims[contract.CANDIDATES] = int(feeds[CAND_ITEM_EMB].shape[1])
        spec = io.tensor(io.output_names[0])
        with torch.cuda.stream(self.stream):
            out = torch.empty(spec.concrete(dims), dtype=dtype(spec.dtype).torch(), device=self.device)
            self.engines[graph].run(feeds, {spec.name: out}, self.stream)
        self.stream.synchronize()
        return out


__all__ = ["Session"]
