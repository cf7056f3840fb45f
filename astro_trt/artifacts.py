"""How every stage writes and fingerprints its artifacts. Writes are atomic: a checkpoint, a
dataset, a bundle or a report file appears at its final path complete, or not at all, so a crash,
a bad input or Ctrl-C never leaves a half-written artifact where a user (or a loader) would find
it. Hashes are sha256 of the file's bytes."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def staged_directory(out: str | Path) -> Iterator[Path]:
    """Yield an empty directory beside ``out``. On normal exit it takes ``out``'s place by
    rename (an existing ``out`` is moved aside first, put back if the rename fails, and removed
    last); on any exception, KeyboardInterrupt included, it is removed and ``out`` is untouched.
    Callers decide beforehand whether replacing an existing ``out`` is allowed."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield stage
        _usual_modes(stage)
        _replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _usual_modes(stage: Path) -> None:
    """mkdtemp makes the directory private (0700) and some writers (safetensors) make private
    files (0600); the artifact gets the modes any file the user creates would get."""
    mask = _umask()
    stage.chmod(0o777 & ~mask)
    for path in stage.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _replace(stage: Path, out: Path) -> None:
    if not out.exists():
        os.replace(stage, out)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, retired / out.name)
    try:
        os.replace(stage, out)
    except BaseException:
        os.replace(retired / out.name, out)
        shutil.rmtree(retired, ignore_errors=True)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary name beside ``path`` and rename it over ``path``, so a reader
    (or a crash) never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
