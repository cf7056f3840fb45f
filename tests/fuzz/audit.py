"""Which files a piece of code opens, seen through Python's audit hooks (the ``open`` event is
raised by ``open``, ``io.open``, ``Path.read_bytes``/``read_text`` and ``os.open``), so a test can
assert that loading a bundle never opened a file outside it: a check that fails as soon as a
loader follows a path or a link out of the bundle, whether or not the read then succeeds.

Audit hooks cannot be removed, so one hook is installed on first use and records only while an
``OpenAudit`` is active.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_active: list[list[str]] = []


def _hook(event: str, args: tuple) -> None:
    if _active and event == "open" and args and isinstance(args[0], str | bytes | os.PathLike):
        path = os.fsdecode(args[0])
        _active[-1].append(os.path.realpath(path))


_installed = False


@contextmanager
def opened_files() -> Iterator[list[str]]:
    """Collect the real paths of every file opened inside the block."""
    global _installed
    if not _installed:
        sys.addaudithook(_hook)
        _installed = True
    record: list[str] = []
    _active.append(record)
    try:
        yield record
    finally:
        _active.remove(record)


def outside(record: list[str], sandbox: Path, allowed: Path) -> list[str]:
    """Opened paths under ``sandbox`` (the test's own directory, where outside files are planted)
    that are not under ``allowed`` (the bundle)."""
    sandbox_real, allowed_real = os.path.realpath(sandbox), os.path.realpath(allowed)
    return [p for p in record
            if (p == sandbox_real or p.startswith(sandbox_real + os.sep))
            and not (p == allowed_real or p.startswith(allowed_real + os.sep))]


__all__ = ["opened_files", "outside"]
