"""The TensorRT back ends behind one small interface (docs/attention.md, "Back ends").

Full TensorRT (``tensorrt``) and TensorRT for RTX (``tensorrt_rtx``) share the TensorRT Python
API but differ in what they can do. Every difference the builder and the runtime care about is a
field of :class:`Backend`, so callers ask ``backend.supports_plugins`` instead of testing names.
The module itself is imported lazily: describing a back end costs nothing.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, fields
from functools import cached_property
from types import ModuleType
from typing import Any

from astro_trt.choices import split_list
from astro_trt.errors import BackendError

# "portable": no compute-capability call, the back end's default multi-GPU plan.
PORTABLE = "portable"
_IDENTITY_FIELDS = ("name", "module_name", "install_hint")


@dataclass(frozen=True)
class Backend:
    """One TensorRT flavour and what it can do."""

    name: str  # the --backend value
    module_name: str  # what to import
    install_hint: str  # how a user gets it
    supports_plugins: bool  # custom IPluginV3 attention plugins can be registered and built
    builds_without_gpu: bool  # ahead-of-time builds on a machine with no GPU
    compute_targets: tuple[str, ...]  # --targets values it accepts besides "portable"; () = none
    strongly_typed_only: bool  # precision comes from the ONNX tensor types, no FP16 flags
    timing_cache: bool  # the builder's timing cache does something (RTX: a no-op)
    cuda_graphs: bool  # the runtime config can capture a whole engine as a CUDA graph

    def capabilities(self) -> dict[str, object]:
        """Every capability field, for the manifest (a service reads what the bundle's back end can do)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _IDENTITY_FIELDS}

    def is_available(self) -> bool:
        return importlib.util.find_spec(self.module_name) is not None

    def load(self) -> ModuleType:
        """The imported module; BackendError naming the install command when it is missing."""
        try:
            return importlib.import_module(self.module_name)
        except ImportError as exc:
            raise BackendError(
                f"back end '{self.name}' is not installed ({exc}); {self.install_hint}, "
                "or pick another with --backend, or export ONNX only with --no-engines"
            ) from None

    @cached_property
    def version(self) -> str:
        return str(getattr(self.load(), "__version__", "unknown"))

    def network_flags(self) -> int:
        """Flags for Builder.create_network. Both back ends build strongly typed networks: the
        exporter casts the graph to the target precision, so the graph's types are the truth."""
        trt = self.load()
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)

    def parse_targets(self, targets: str | list[str] | tuple[str, ...]) -> list[str]:
        """'portable' | 'current' | 'sm86,sm89' -> a normalised list, checked against the back end."""
        items = target_names(targets)
        if items == [PORTABLE]:
            return [PORTABLE]
        if PORTABLE in items:
            raise BackendError(f"--targets: 'portable' cannot be combined with {items}; give one or the other")
        if not self.compute_targets:
            raise BackendError(
                f"--targets {','.join(items)}: back end '{self.name}' builds for the GPU it runs on and takes "
                "no compute-capability targets; drop --targets (or use --backend tensorrt-rtx for ahead-of-time "
                "targets)"
            )
        unknown = [t for t in items if t not in self.compute_targets]
        if unknown:
            raise BackendError(
                f"--targets: unknown compute target(s) {unknown} for back end '{self.name}'; "
                f"choose from {[PORTABLE, *self.compute_targets]}"
            )
        return items

    def apply_targets(self, config: object, targets: list[str]) -> None:
        """Set the builder config's compute capabilities ('portable' leaves the default)."""
        if targets == [PORTABLE]:
            return
        trt = self.load()
        config.num_compute_capabilities = len(targets)  # type: ignore[attr-defined]
        for index, target in enumerate(targets):
            capability = getattr(trt.ComputeCapability, target.upper())
            config.set_compute_capability(capability, index)  # type: ignore[attr-defined]


def target_names(targets: object) -> list[str]:
    """--targets as lower-case names, [PORTABLE] when empty; refused unless a comma list (str) or a
    list or tuple of str. Which names exist is the back end's to say (``Backend.parse_targets``)."""
    raw = split_list(targets)
    if raw is None or not all(isinstance(t, str) for t in raw):
        raise BackendError(f"--targets {targets!r}: expected a comma list such as 'portable' or 'sm86,sm89'; "
                           "pass the compute targets as text")
    return [str(t).lower() for t in raw] or [PORTABLE]


TENSORRT = Backend(
    name="tensorrt",
    module_name="tensorrt",
    install_hint="install full TensorRT from NVIDIA (pip install tensorrt on a machine that can reach NVIDIA's index)",
    supports_plugins=True,
    builds_without_gpu=False,
    compute_targets=(),
    strongly_typed_only=False,
    timing_cache=True,
    cuda_graphs=False,  # possible by stream capture, not implemented by this runtime
)

TENSORRT_RTX = Backend(
    name="tensorrt-rtx",
    module_name="tensorrt_rtx",
    install_hint="pip install 'astro-trt[rtx]' (TensorRT for RTX from PyPI)",
    supports_plugins=False,
    builds_without_gpu=True,
    compute_targets=("current", "sm75", "sm80", "sm86", "sm89", "sm120", "sm121"),
    strongly_typed_only=True,
    timing_cache=False,  # the API exists but is a no-op since TensorRT-RTX 1.2
    cuda_graphs=True,  # IRuntimeConfig.cuda_graph_strategy = WHOLE_GRAPH_CAPTURE
)

BACKENDS: dict[str, Backend] = {b.name: b for b in (TENSORRT, TENSORRT_RTX)}
AUTO = "auto"  # the first importable back end, in BACKENDS order
BACKEND_CHOICES = (AUTO, *BACKENDS)


def capturing_logger(trt: ModuleType) -> Any:
    """A logger that keeps warnings and errors for the error message instead of printing them
    over the progress display."""

    class CapturingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[str] = []
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if int(severity) <= int(trt.ILogger.Severity.WARNING):
                self.messages.append(msg)
            if int(severity) <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(msg)

    return CapturingLogger()


def resolve_backend(choice: str = AUTO) -> Backend:
    """--backend value -> Backend. 'auto' takes the first importable (full TensorRT first: it can
    run the plugins); a named back end that is missing fails here, before any work is done."""
    if choice == AUTO:
        for backend in BACKENDS.values():
            if backend.is_available():
                return backend
        raise BackendError(
            "no TensorRT back end is installed; pip install 'astro-trt[rtx]' for TensorRT-RTX "
            "(builds on machines without a GPU), install full TensorRT, or export ONNX only with --no-engines"
        )
    try:
        backend = BACKENDS[choice]
    except KeyError:
        raise BackendError(f"unknown back end '{choice}'; choose one of {list(BACKEND_CHOICES)}") from None
    backend.load()
    return backend


__all__ = [
    "AUTO", "BACKENDS", "BACKEND_CHOICES", "PORTABLE", "Backend", "TENSORRT", "TENSORRT_RTX", "capturing_logger",
    "resolve_backend", "target_names",
]
