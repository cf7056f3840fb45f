"""The library boundary: checks of the arguments every public function takes, with one wording
per kind of refusal, so that ``export_bundle(out=b"x")``, ``validate_bundle(B, gates="strict")``
or ``OrtRunner.from_bundle(B, threads=10**6)`` end in the same one-line error the command line
prints instead of a traceback from deep inside a library.

- paths: a str or an os.PathLike whose ``__fspath__`` gives a str (not bytes, not a number), not
  blank, without NUL, at most PATH_MAX characters and NAME_MAX per component (the kernel's own
  limits, read from the file system: ENAMETOOLONG otherwise surfaces as an OSError somewhere);
- flags are bools, counts are ints (not bools) within stated bounds, choices are among the
  listed strings, callbacks are callable;
- threads: at most the CPUs this process may run on (its affinity mask: a container's or
  taskset's limit, not the host's count). More intra-op threads than cores only spin, and
  10^6 of them exhaust the process (ONNX Runtime and torch accept any count and crash later).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from astro_trt.errors import AstroError, DataError


def _limit(name: str, default: int) -> int:
    try:
        return int(os.pathconf("/", name))
    except (OSError, ValueError):
        return default


PATH_MAX = _limit("PC_PATH_MAX", 4096)
NAME_MAX = _limit("PC_NAME_MAX", 255)


def _show(value: object) -> str:
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 -- a hostile __repr__ must not decide the error
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


def as_path(value: object, what: str, error: type[AstroError] = DataError) -> Path:
    """``value`` as a Path if it is a usable path; else ``error`` naming ``what`` in one line."""
    def refuse(problem: str) -> AstroError:
        return error(f"{what}: {problem}, got {type(value).__name__} {_show(value)}; pass the path as a str or "
                     "pathlib.Path")

    if not isinstance(value, str | os.PathLike):
        raise refuse("expected a path (str or pathlib.Path)")
    try:
        text = os.fspath(value)
    except Exception:  # noqa: BLE001 -- a PathLike whose __fspath__ returns an int or raises
        raise refuse("its __fspath__() does not give a str") from None
    if not isinstance(text, str):
        raise refuse("its __fspath__() gives bytes, not a str")
    if not text.strip():
        raise refuse("a blank path")
    if "\0" in text:
        raise refuse("a path with a NUL character")
    if len(os.fsencode(text)) > PATH_MAX:
        raise refuse(f"a path longer than {PATH_MAX} bytes")
    if any(len(os.fsencode(part)) > NAME_MAX for part in text.split("/")):
        raise refuse(f"a path with a name longer than {NAME_MAX} bytes")
    return Path(text)


def flag(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise DataError(f"{what} {_show(value)}: must be True or False")
    return value


def integer(value: object, what: str, low: int, high: int | None = None, fix: str = "") -> int:
    """An int (not a bool) in low..high."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f"{low}..{high}" if high is not None else f">= {low}"
        raise DataError(f"{what} {_show(value)}: must be an integer in {bounds}" + (f"; {fix}" if fix else ""))
    return value


def choice(value: object, what: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise DataError(f"{what} {_show(value)}: choose one of {list(choices)}")
    return value


def callback(value: object, what: str) -> Callable[..., Any] | None:
    """None or a callable (progress=...)."""
    if value is not None and not callable(value):
        raise DataError(f"{what} {_show(value)}: must be a function (or None)")
    return value


def instance(value: object, what: str, kind: type, hint: str) -> Any:
    """``value`` if it is a ``kind``; else one line naming what to pass (``hint``)."""
    if not isinstance(value, kind):
        raise DataError(f"{what}: expected {hint}, got {type(value).__name__} {_show(value)}")
    return value


def max_threads() -> int:
    """The CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def threads(value: object, what: str, *, zero_means_all: bool = False) -> int:
    """A thread count in 1..max_threads() (0 too with ``zero_means_all``: one per core)."""
    return integer(value, what, 0 if zero_means_all else 1, max_threads(),
                   f"this machine gives this process {max_threads()} CPU(s); more threads than cores only spin"
                   + ("; 0 is one per core" if zero_means_all else ""))


__all__ = ["NAME_MAX", "PATH_MAX", "as_path", "callback", "choice", "flag", "instance", "integer", "max_threads",
           "threads"]
