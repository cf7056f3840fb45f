"""Every error astro-trt raises on purpose. Each message names the problem and the fix; the CLI
prints it as one line and exits non-zero instead of a traceback."""


def one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's text on one line, at most ``limit`` characters (its type when it has none),
    for quoting a library's error inside a project message."""
    text = " ".join(str(exc).split())
    return text[:limit] or type(exc).__name__


class AstroError(Exception):
    """Base class: an expected failure with a message meant for the user."""


class ConfigError(AstroError):
    """A model config that is invalid or does not match the weights."""


class CheckpointError(AstroError):
    """A checkpoint that is missing, truncated, not safetensors, or does not match its config."""


class DataError(AstroError):
    """Input data that cannot be used: missing files, bad checksums, ids or shapes out of range."""


class ExportError(AstroError):
    """A model the exporter cannot honour, or a graph that fails its checks."""


class BackendError(AstroError):
    """A TensorRT back end that is missing or cannot do what was asked."""


class BundleError(AstroError):
    """A deployment bundle that is incomplete, changed since it was written, or inconsistent."""


class GateError(AstroError):
    """A validation gate failed."""


class ArtifactError(AstroError):
    """An output path that cannot be written, or an input file that is not a regular file of sane size."""
