"""ONNX graph -> serialized TensorRT engine (a plan), with one optimization profile over the
contract's dynamic axes (batch, candidates), compute targets where the back end has them, a
timing cache where it has one, plugin registration for ``--attention plugin`` and a progress
callback fed by TensorRT's IProgressMonitor.

The engine's I/O is recorded next to the plan: read back from the deserialized engine where the
back end can deserialize here, else from the parsed network (TensorRT-RTX without a GPU), and
``io_source`` says which.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from astro_trt.artifacts import atomic_write
from astro_trt.contract import (
    ATTENTION_CHOICES,
    BATCH,
    CANDIDATES,
    NATIVE,
    OPT_LEVELS,
    PLUGIN,
    REFERENCE_BODY,
    GraphIO,
)
from astro_trt.engines.backend import PORTABLE, Backend, capturing_logger
from astro_trt.errors import BackendError, ConfigError, ExportError
from astro_trt.exporter.pair_chunks import runtime_form
from astro_trt.plugins.tensorrt import register as register_plugins
from astro_trt.precision import by_trt, get
from astro_trt.settings import MAX_BATCH, MAX_CANDIDATES

ProgressCallback = Callable[[str], None]


# ------------------------------------------------------------------------------ profiles
# Largest dynamic axis of a profile: the naive graph holds batch x candidates sequences, and
# TensorRT's dimensions are 32-bit; no serving request comes near this.
MAX_PROFILE_DIM = 65_536


@dataclass(frozen=True)
class Profile:
    """min/opt/max of the dynamic axes. Opt points are where TensorRT tunes: one user (online
    serving encodes one request at a time) and min(256, max) candidates (a typical ranking stage)."""

    max_batch: int = MAX_BATCH
    max_candidates: int = MAX_CANDIDATES
    opt_batch: int = 1
    opt_candidates: int | None = None

    def __post_init__(self) -> None:
        for key in ("max_batch", "max_candidates", "opt_batch"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{key.replace('_', '-')} must be a positive integer, got {value!r}")
            if value > MAX_PROFILE_DIM:
                raise ConfigError(f"{key.replace('_', '-')} {value} is beyond what an engine profile may ask for "
                                  f"(at most {MAX_PROFILE_DIM}); choose a smaller value")
        if self.opt_batch > self.max_batch:
            raise ConfigError(f"opt batch {self.opt_batch} exceeds --max-batch {self.max_batch}")
        if self.opt_candidates is not None and not 1 <= self.opt_candidates <= self.max_candidates:
            raise ConfigError(f"opt candidates {self.opt_candidates} must lie in 1..--max-candidates")

    def ranges(self) -> dict[str, tuple[int, int, int]]:
        opt_m = self.opt_candidates if self.opt_candidates is not None else min(256, self.max_candidates)
        return {BATCH: (1, self.opt_batch, self.max_batch), CANDIDATES: (1, opt_m, self.max_candidates)}

    def for_graph(self, io: GraphIO) -> dict[str, tuple[int, int, int]]:
        """The ranges of the dynamic axes this graph actually has (the encoder has no candidates)."""
        return {name: r for name, r in self.ranges().items() if name in io.dynamic_dims}

    def shapes(self, io: GraphIO) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """Per input tensor: (min, opt, max) concrete shapes."""
        ranges = self.ranges()
        picks = [{d: r[i] for d, r in ranges.items()} for i in range(3)]
        return {t.name: tuple(t.concrete(p) for p in picks) for t in io.inputs}  # type: ignore[misc]


# ------------------------------------------------------------------------------ attention
@dataclass(frozen=True)
class BuildSettings:
    """How every engine of an export is built, resolved once from the export's arguments (the
    defaults are astro_trt/settings.py's): the back end (None: ONNX only), the profile, the compute
    targets, the builder optimization level and the timing cache."""

    backend: Backend | None = None
    profile: Profile = field(default_factory=Profile)
    targets: tuple[str, ...] = ()
    opt_level: int | None = None
    timing_cache: Path | None = None


@dataclass(frozen=True)
class Lowering:
    effective: str  # what the manifest records: plugin | native | reference
    export_as: str  # the exporter's attention argument that produces the graph for it


def attention_candidates(backend: Backend | None, requested: str, precision: str = "fp16") -> list[Lowering]:
    """Lowerings to try, in order, for --attention. 'plugin' on a back end without plugins fails
    here, before anything is exported. 'auto' without plugins tries the fused native form and
    falls back to the reference body. fp32 goes straight to the reference body: TensorRT-RTX 1.7
    has no fp32 IAttention kernel ("Attention operation was not supported by a dedicated kernel",
    measured on the ml100k graphs), and a parsed network's IAttention cannot be marked
    decomposable from Python (the layer is not downcast to IAttentionOutputLayer)."""
    if requested not in ATTENTION_CHOICES:
        raise ConfigError(f"unknown --attention '{requested}'; choose one of {list(ATTENTION_CHOICES)}")
    plugins = backend is not None and backend.supports_plugins
    if requested == PLUGIN:
        if backend is not None and not backend.supports_plugins:
            raise BackendError(
                f"--attention plugin needs custom TensorRT plugins, which back end '{backend.name}' cannot load; "
                "use --attention native (fused ONNX Attention) or --attention auto (native, else the reference "
                "decomposition), or --backend tensorrt on a machine with full TensorRT"
            )
        return [Lowering(PLUGIN, PLUGIN)]
    if requested == NATIVE:
        return [Lowering(NATIVE, NATIVE)]
    if plugins:
        return [Lowering(PLUGIN, PLUGIN)]
    if get(precision).dtype.name == "float32":  # fp32, and int8 (float activations, int8 weight MatMuls)
        return [Lowering(REFERENCE_BODY, PLUGIN)]
    return [Lowering(NATIVE, NATIVE), Lowering(REFERENCE_BODY, PLUGIN)]


def _register_plugins(trt: Any) -> None:
    register_plugins(trt)


# ------------------------------------------------------------------------------ building
@dataclass
class BuiltEngine:
    graph: str
    plan: bytes
    io: list[dict[str, Any]]  # one record per I/O tensor, see _network_io
    io_source: str  # "engine" (deserialized plan) or "network" (parsed ONNX; no GPU to deserialize)
    seconds: float
    targets: list[str]
    warnings: list[str] = field(default_factory=list)


def _make_monitor(trt: Any, progress: ProgressCallback) -> Any:
    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, parent_phase: str | None, phase_name: str, num_steps: int) -> None:
            progress(phase_name)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True

        def phase_finish(self, phase_name: str) -> None:
            pass

    return Monitor()


def dtype_name(trt_dtype: Any) -> str:
    """tensorrt DataType -> the contract's numpy-style dtype name."""
    known = by_trt(trt_dtype.name)
    return known.name if known else trt_dtype.name.lower()


def _parse(parser: Any, onnx_path: Path) -> bool:
    """Parse ``onnx_path`` in the form TensorRT runs (exporter/pair_chunks.py ``runtime_form``: a
    chunked full model as the plain graph inside its Loop), its weights found beside the file."""
    form = runtime_form(onnx_path, "tensorrt")
    return parser.parse_from_file(str(onnx_path)) if form is None else parser.parse(form, str(onnx_path))


def _network_io(network: Any, shapes: dict[str, tuple]) -> list[dict[str, Any]]:
    records = []
    for i in range(network.num_inputs):
        t = network.get_input(i)
        lo, opt, hi = shapes.get(t.name, (None, None, None))
        records.append({"name": t.name, "mode": "input", "dtype": dtype_name(t.dtype), "shape": list(t.shape),
                        "min": list(lo) if lo else None, "opt": list(opt) if opt else None,
                        "max": list(hi) if hi else None})
    for i in range(network.num_outputs):
        t = network.get_output(i)
        records.append({"name": t.name, "mode": "output", "dtype": dtype_name(t.dtype), "shape": list(t.shape)})
    return records


def read_engine_io(backend: Backend, plan: bytes) -> list[dict[str, Any]] | None:
    """I/O read back from the deserialized plan, or None when this machine cannot deserialize it
    (TensorRT-RTX needs a GPU for that)."""
    trt = backend.load()
    runtime = trt.Runtime(capturing_logger(trt))
    try:
        engine = runtime.deserialize_cuda_engine(plan)
    except Exception:  # a missing driver surfaces as an exception on some versions
        return None
    if engine is None:
        return None
    records = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        record: dict[str, Any] = {"name": name, "mode": "input" if is_input else "output",
                                  "dtype": dtype_name(engine.get_tensor_dtype(name)),
                                  "shape": list(engine.get_tensor_shape(name))}
        if is_input:
            lo, opt, hi = engine.get_tensor_profile_shape(name, 0)
            record.update(min=list(lo), opt=list(opt), max=list(hi))
        records.append(record)
    return records


def compare_io(records: list[dict[str, Any]], io: GraphIO, shapes: dict[str, tuple]) -> list[str]:
    """Differences between an engine's I/O records and the contract (empty = they match):
    names and order, dtypes, fixed dims, dynamic dims as -1, and each input's min/opt/max."""
    problems = []
    for mode, specs in (("input", io.inputs), ("output", io.outputs)):
        got = [r for r in records if r["mode"] == mode]
        if [r["name"] for r in got] != [s.name for s in specs]:
            names = [r["name"] for r in got]
            problems.append(f"{io.name} {mode}s are {names}, contract says {[s.name for s in specs]}")
            continue
        for record, spec in zip(got, specs, strict=True):
            want_shape = [-1 if isinstance(d, str) else d for d in spec.shape]
            if record["dtype"] != spec.dtype:
                problems.append(f"{io.name}.{spec.name}: dtype {record['dtype']}, contract says {spec.dtype}")
            if list(record["shape"]) != want_shape:
                problems.append(f"{io.name}.{spec.name}: shape {record['shape']}, contract says {want_shape}")
            if mode == "input":
                want = [list(s) for s in shapes[spec.name]]
                if [record.get("min"), record.get("opt"), record.get("max")] != want:
                    problems.append(f"{io.name}.{spec.name}: profile {[record.get(k) for k in ('min', 'opt', 'max')]}"
                                    f", expected {want}")
    return problems


def check_opt_level(opt_level: object) -> int | None:
    """``opt_level`` if it is None (the back end's default) or one of OPT_LEVELS: the one check,
    made by the bundle export before any work (engines or not) and by every build."""
    if opt_level is None or (isinstance(opt_level, int) and not isinstance(opt_level, bool)
                             and opt_level in OPT_LEVELS):
        return opt_level
    raise ConfigError(f"--opt-level {opt_level!r}: must be an integer in {OPT_LEVELS[0]}..{OPT_LEVELS[-1]}; "
                      "choose a builder optimization level in that range, or leave it out for the default")


def build_engine(
    backend: Backend,
    onnx_path: Path,
    io: GraphIO,
    profile: Profile,
    *,
    targets: list[str] | None = None,
    opt_level: int | None = None,
    plugins: bool = False,
    timing_cache: Path | None = None,
    progress: ProgressCallback | None = None,
) -> BuiltEngine:
    """Parse ``onnx_path``, build a plan for ``profile`` and check its I/O against ``io``.

    Raises ExportError when the graph does not parse or does not match the contract, BackendError
    when TensorRT cannot build it (with TensorRT's own messages)."""
    opt_level = check_opt_level(opt_level)
    trt = backend.load()
    targets = targets or [PORTABLE]
    if plugins:
        if not backend.supports_plugins:
            raise BackendError(f"back end '{backend.name}' cannot load custom plugins; use --attention native or auto")
        _register_plugins(trt)
    logger = capturing_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(backend.network_flags())
    parser = trt.OnnxParser(network, logger)
    if not _parse(parser, onnx_path):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(f"{onnx_path}: TensorRT ({backend.name}) cannot parse the graph: {'; '.join(errors)}")

    shapes = profile.shapes(io)
    config = builder.create_builder_config()
    opt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        opt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(opt_profile)
    if opt_level is not None:
        config.builder_optimization_level = opt_level
    backend.apply_targets(config, targets)
    cache = None
    if backend.timing_cache and timing_cache is not None:
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.exists() else b"")
        config.set_timing_cache(cache, False)
    if progress is not None:
        config.progress_monitor = _make_monitor(trt, progress)

    network_io = _network_io(network, shapes)
    problems = compare_io(network_io, io, shapes)
    if problems:
        raise ExportError(f"{onnx_path}: the graph does not match the engine contract: {'; '.join(problems)}; "
                          "re-export it with this version of astro-trt")
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if plan is None:
        detail = "; ".join(logger.errors[-2:] or logger.messages[-2:]) or "no message from TensorRT"
        raise BackendError(f"{backend.name} could not build {io.name} from {onnx_path.name}: {detail}")
    if cache is not None:
        # Atomically: a build killed mid-write must not leave a truncated cache for the next to read.
        atomic_write(timing_cache, bytes(cache.serialize()))  # type: ignore[union-attr]
    plan_bytes = bytes(plan)
    engine_io = read_engine_io(backend, plan_bytes)
    if engine_io is not None:
        problems = compare_io(engine_io, io, shapes)
        if problems:
            raise BackendError(f"{io.name}: the built engine does not match the contract: {'; '.join(problems)}")
    return BuiltEngine(
        graph=io.name, plan=plan_bytes, io=engine_io if engine_io is not None else network_io,
        io_source="engine" if engine_io is not None else "network", seconds=seconds, targets=list(targets),
        warnings=list(logger.messages),
    )


__all__ = [
    "BuiltEngine", "Lowering", "Profile", "attention_candidates",
    "build_engine", "check_opt_level", "compare_io", "dtype_name", "read_engine_io",
]
