"""The runtimes a parity report compares, behind one small interface: ``encode`` (history ->
kv_cache), ``score`` (kv_cache + candidates -> logits) and ``full`` (the baseline graph), all
in and out as numpy (logits float32; the cache in the runtime's own dtype).

TorchRunner is the PyTorch model (the fp32 oracle, or cast to a half precision); OrtRunner runs
a bundle's ONNX graphs on ONNX Runtime (CPU); TrtRunner runs its engines through
engines/runtime.py on a GPU.

Every runner passes its inputs through the input gate (engines/inputs.py) before anything runs:
a request the gate refuses is a DataError from every runtime alike, never logits.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from astro_trt.arguments import choice, instance, max_threads
from astro_trt.arguments import threads as threads_argument
from astro_trt.config import ASTROConfig
from astro_trt.contract import FULL_MODEL, GRAPHS, HISTORY_INPUTS, ITEM_SCORER, KV_CACHE, USER_ENCODER, graph_io
from astro_trt.engines.bundle import Bundle
from astro_trt.engines.bundle_graphs import check_graph_files
from astro_trt.engines.inputs import Ranges, validate_candidates, validate_history, validate_kv_cache
from astro_trt.errors import BackendError, BundleError, DataError
from astro_trt.exporter.precision import model_in_precision
from astro_trt.model.astro import History
from astro_trt.model.resources import check_fits
from astro_trt.precision import get, is_reference, names
from astro_trt.validate.stats import to_float32


# ONNX Runtime threads: the bench and CI machines give us two cores (fewer where the process may
# use fewer; never more than it may use, astro_trt.arguments.threads).
def _env_threads() -> int:
    raw = os.environ.get("ASTRO_ORT_THREADS") or str(min(2, max_threads()))  # empty is unset
    if not raw.strip().isdigit():
        raise DataError(f"ASTRO_ORT_THREADS={raw!r} is not a thread count; unset it or set an integer >= 0")
    return threads_argument(int(raw), "ASTRO_ORT_THREADS", zero_means_all=True)


ORT_THREADS = _env_threads()


class Runner(Protocol):
    name: str  # e.g. "torch-fp32", "ort-fp16"
    runtime: str  # torch | ort | trt
    precision: str

    def encode(self, history: History) -> Any: ...

    def score(self, kv_cache: Any, history: History, cand_items: torch.Tensor) -> np.ndarray: ...

    def full(self, history: History, cand_items: torch.Tensor) -> np.ndarray: ...


_NO_CANDIDATES: Any = object()  # encode passes no candidates; score(..., None) must still be refused


def gate(cfg: ASTROConfig, history: Any, cand_items: Any = _NO_CANDIDATES,
         profile: Ranges | None = None) -> dict[str, np.ndarray]:
    """The history (and candidates) through the input gate: contract name -> int64 array."""
    arrays = validate_history(cfg, history, profile)
    if cand_items is not _NO_CANDIDATES:
        arrays["cand_items"] = validate_candidates(cfg, cand_items, arrays["hist_items"].shape[0], profile)
    return arrays


def gated_history(arrays: Mapping[str, np.ndarray]) -> History:
    """The gated arrays as the History the PyTorch model reads (no copy)."""
    return History(*(torch.from_numpy(arrays[n]) for n in HISTORY_INPUTS))


def as_float32(array: Any) -> np.ndarray:
    # A runtime UserState (TensorRT runner) keeps its KV cache as a device tensor.
    return to_float32(getattr(array, "kv_cache", array))


def scored(logits: Any) -> np.ndarray:
    """Scorer logits as float32, refused when not finite: a finite but absurd kv_cache (one no
    encoder produced, e.g. 3e38 everywhere) passes the input gate and turns into NaN here."""
    out = as_float32(logits)
    if not np.isfinite(out).all():
        at = tuple(int(i) for i in np.argwhere(~np.isfinite(out))[0])
        raise DataError(f"logits: non-finite value at {list(at)} from this kv_cache; pass the cache the user "
                        "encoder returned for this history (re-encode the user)")
    return out


class TorchRunner:
    """The PyTorch model in ``precision`` (a cast copy, the caller's model is left alone)."""

    runtime = "torch"

    def __init__(self, model: torch.nn.Module, precision: str = "fp32") -> None:
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "cfg"):
            raise DataError(f"TorchRunner needs the ASTRO model (load_checkpoint(DIR).model), got "
                            f"{type(model).__name__}")
        self.dtype = get(precision).torch()  # ConfigError naming the precisions for an unknown one
        self.precision = precision
        self.name = f"torch-{precision}"
        # The half copy is prepared exactly as the exporter prepares the graphs it traces.
        self.model = model if is_reference(precision) else model_in_precision(model, precision, export_ops=False)
        self.model.eval()

        self.cfg: ASTROConfig = self.model.cfg

    @torch.no_grad()
    def encode(self, history: History) -> torch.Tensor:
        return self.model.encode_user(gated_history(gate(self.cfg, history)))

    @torch.no_grad()
    def score(self, kv_cache: Any, history: History, cand_items: torch.Tensor) -> np.ndarray:
        arrays = gate(self.cfg, history, cand_items)
        kv = validate_kv_cache(self.cfg, kv_cache, self.precision, arrays["hist_items"].shape[0])
        kv = kv if isinstance(kv, torch.Tensor) else torch.from_numpy(kv)
        return scored(self.model.score(kv, gated_history(arrays), torch.from_numpy(arrays["cand_items"])))

    @torch.no_grad()
    def full(self, history: History, cand_items: torch.Tensor) -> np.ndarray:
        arrays = gate(self.cfg, history, cand_items)
        return as_float32(self.model.full(gated_history(arrays), torch.from_numpy(arrays["cand_items"])))


def ort_session(path: Path, threads: int = ORT_THREADS, profile_prefix: str | None = None,
                memory_pattern: bool = True, *, prepare: Callable[[Any], Any] | None = None) -> Any:
    """An ONNX Runtime CPU session with ``threads`` intra-op threads (one inter-op). ``prepare``
    maps the loaded model to the one ONNX Runtime gets (for the full model: exporter/pair_chunks.py
    ``for_onnxruntime`` or ``unchunk``); a model it returns unchanged runs from its file."""
    from astro_trt.exporter.ort_session import onnx_session

    if not Path(path).is_file():
        raise BundleError(f"ONNX graph {path} is missing; re-export the bundle")
    source: Path | bytes = path
    if prepare is not None:
        import onnx

        model = onnx.load(str(path))
        prepared = prepare(model)
        if prepared is not model and prepared.ByteSize() < IN_MEMORY_BYTES:
            source = prepared.SerializeToString()
    return onnx_session(source, threads, profile_prefix, memory_pattern=memory_pattern)


# A model serialized for ONNX Runtime from memory must stay under protobuf's 2 GB; a larger one
# is run from its file as exported.
IN_MEMORY_BYTES = 1_500_000_000


class OrtRunner:
    """ONNX Runtime (CPU) over the three ONNX graphs of one precision. ``profiles`` (graph ->
    {axis: (min, opt, max)}, e.g. a bundle's) bounds B and M as the engines are bounded; without
    it ONNX Runtime takes any batch (validation runs larger batches than the engines serve).

    The full model runs in bounded memory (its Loop over chunks of pairs), prepared for ONNX
    Runtime by exporter/pair_chunks.py ``for_onnxruntime``; ``unchunked_full`` runs its plain graph
    instead, all pairs at once, which is what the bench times as the naive path (the fastest form
    of the baseline, so the reported gain is the conservative one); its memory then grows with
    B x M again, and the bench bounds the pairs per call."""

    runtime = "ort"

    def __init__(self, graphs: Mapping[str, Path], cfg: ASTROConfig, precision: str, threads: int = ORT_THREADS,
                 profile_dir: Path | None = None, *, profiles: Mapping[str, Ranges] | None = None,
                 unchunked_full: bool = False):
        threads_argument(threads, "OrtRunner threads", zero_means_all=True)
        instance(cfg, "OrtRunner cfg", ASTROConfig, "the model's ASTROConfig (load_bundle(DIR).config)")
        choice(precision, "OrtRunner precision", names())
        instance(graphs, "OrtRunner graphs", Mapping, "a mapping of graph name -> ONNX path")
        missing = [g for g in GRAPHS if g not in graphs]
        if missing:
            raise BundleError(f"no ONNX graph for {missing} ({precision}); re-export the bundle with every graph")
        check_graph_files(graphs, cfg, precision)  # before ONNX Runtime opens any of them
        self.precision = precision
        self.name = f"ort-{precision}"
        self.cfg = cfg
        self.profiles = dict(profiles or {})
        self.io = graph_io(cfg, precision)
        self.threads = threads
        self.unchunked_full = unchunked_full
        from astro_trt.exporter.pair_chunks import for_onnxruntime, unchunk

        full = unchunk if unchunked_full else for_onnxruntime
        # The full model: no pre-planned block on top of the arena (climber, 1 x 1024: 0.35 vs 0.50 GB).
        self.sessions = {g: ort_session(Path(p), threads, None if profile_dir is None else str(Path(profile_dir) / g),
                                        memory_pattern=g != FULL_MODEL, prepare=full if g == FULL_MODEL else None)
                         for g, p in graphs.items()}
        for graph, session in self.sessions.items():
            got = [i.name for i in session.get_inputs()]
            if got != self.io[graph].input_names:
                raise BundleError(
                    f"{graphs[graph]}: inputs {got} do not follow the engine contract {self.io[graph].input_names}; "
                    "re-export the bundle with this version of astro-trt"
                )

    def end_profiling(self) -> dict[str, Path]:
        """graph -> the profile file its session wrote (sessions made with ``profile_dir``)."""
        return {g: Path(s.end_profiling()) for g, s in self.sessions.items()}

    @classmethod
    def from_bundle(cls, bundle: Any, precision: str = "fp32", threads: int = ORT_THREADS) -> OrtRunner:
        """The bundle's ONNX graphs of ``precision`` (a loaded engines.bundle.Bundle, or its directory),
        bounded by the bundle's profiles as its engines are (2x10^7 candidates are refused naming the
        profile, not handed to ONNX Runtime)."""
        if not hasattr(bundle, "onnx_path"):
            from astro_trt.engines.bundle import load_bundle

            bundle = load_bundle(bundle)  # a path, or a one-line BundleError for anything else
        return cls({g: bundle.onnx_path(g, precision) for g in bundle.io(precision)}, bundle.config, precision,
                   threads, profiles={g: bundle.profile(g) for g in bundle.io(precision)})

    def _run(self, graph: str, feeds: dict[str, Any]) -> np.ndarray:
        names = self.io[graph].input_names
        return self.sessions[graph].run(None, {n: feeds[n] for n in names})[0]

    def encode(self, history: History) -> np.ndarray:
        return self._run(USER_ENCODER, gate(self.cfg, history, profile=self.profiles.get(USER_ENCODER)))

    def _fits(self, graph: str, feeds: dict[str, np.ndarray]) -> None:
        """Without a profile for ``graph`` nothing else bounds B x M: refuse what the memory
        estimate says this machine cannot hold (the chunked full model holds one chunk of pairs)."""
        if self.profiles.get(graph) is None:
            users, candidates = feeds["cand_items"].shape
            check_fits(self.cfg, users=users, candidates=candidates, purpose=f"ONNX Runtime {graph}",
                       full=graph == FULL_MODEL and self.unchunked_full, error=DataError)

    def score(self, kv_cache: Any, history: History, cand_items: torch.Tensor) -> np.ndarray:
        feeds = gate(self.cfg, history, cand_items, self.profiles.get(ITEM_SCORER))
        self._fits(ITEM_SCORER, feeds)
        feeds[KV_CACHE] = validate_kv_cache(self.cfg, kv_cache, self.precision, feeds["hist_items"].shape[0],
                                            host=True)
        return scored(self._run(ITEM_SCORER, feeds))

    def full(self, history: History, cand_items: torch.Tensor) -> np.ndarray:
        feeds = gate(self.cfg, history, cand_items, self.profiles.get(FULL_MODEL))
        self._fits(FULL_MODEL, feeds)
        return as_float32(self._run(FULL_MODEL, feeds))


def gpu_unavailable_reason() -> str | None:
    """Why TensorRT engines cannot run here, or None when they can."""
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to PyTorch (TensorRT engines need one); run on a GPU machine"
    return None


class TrtRunner:
    """TensorRT engines of one precision through engines/runtime.py (needs a GPU). The runtime
    keeps the user state on the device; here it comes back to the host so that every runner's
    cache can be compared with the oracle's. The session gates encode, score and full itself
    (same gate, with the engines' profiles); the history given to ``score`` is gated here, since
    the session scores from the state and would never look at it."""

    runtime = "trt"

    def __init__(self, session: Any, precision: str) -> None:
        self.session = session
        self.precision = precision
        self.name = f"trt-{precision}"

    def encode(self, history: History) -> Any:
        return self.session.encode(history)  # a runtime.UserState, cache on the device; the session gates it

    def score(self, state: Any, history: History, cand_items: torch.Tensor) -> np.ndarray:
        # The state already holds this history's device inputs; only the candidates travel.
        arrays = gate(self.session.cfg, history)
        if not hasattr(state, "batch"):
            raise DataError(f"state is a {type(state).__name__}, not what this runner's encode() returned; "
                            "pass the result of encode(history)")
        if arrays["hist_items"].shape[0] != state.batch:
            raise DataError(f"history: batch {arrays['hist_items'].shape[0]} but the encoded state holds "
                            f"{state.batch} users; score with the history that was encoded")
        return scored(self.session.score(state, cand_items))

    def full(self, history: History, cand_items: torch.Tensor) -> np.ndarray:
        return as_float32(self.session.full(history, cand_items))  # the session gates both


def make_trt_runner(bundle: Any, precision: str) -> tuple[TrtRunner | None, str]:
    """(runner, "") when the bundle's engines of ``precision`` can run here, else (None, why)."""
    from astro_trt.contract import GRAPHS

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
        from astro_trt.engines import runtime
    except ImportError as exc:
        return None, f"the TensorRT runtime cannot be imported ({exc}); install the back end the bundle names"
    try:
        session = runtime.Session(bundle, precision)
    except BackendError as exc:
        return None, str(exc)
    return TrtRunner(session, precision), ""
