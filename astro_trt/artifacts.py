"""How every stage writes and fingerprints its artifacts. Writes are atomic: a checkpoint, a
dataset, a bundle or a report file appears at its final path complete, or not at all, so a crash,
a bad input or Ctrl-C never leaves a half-written artifact where a user (or a loader) would find
it. Hashes are sha256 of the file's bytes."""

from __future__ import annotations

import errno
import fcntl
import glob
import hashlib
import logging
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from astro_trt import arguments
from astro_trt.errors import ArtifactError, AstroError

_log = logging.getLogger("astro_trt")


def as_path(value: object, what: str, error: type[AstroError] = ArtifactError) -> Path:
    """A usable str or os.PathLike as a Path (astro_trt.arguments.as_path); anything else is
    ``error`` in one line."""
    return arguments.as_path(value, what, error)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Staging directories are named ``.<out>.partial-<host>-<pid>-<random>`` (retired previous
# artifacts ``.<out>.old-<host>-<pid>-<random>``) and hold an exclusive flock for as long as
# their process works on them. A process killed with SIGKILL cannot clean up, so the next
# writer of the same ``out`` sweeps them: a lock it can take belongs to a dead process.
_STAGING_KINDS = ("partial", "old")


def _staging_prefix(out: Path, kind: str) -> str:
    return f".{out.name}.{kind}-{socket.gethostname()}-{os.getpid()}-"


def _lock(directory: Path) -> int | None:
    """An exclusive flock on ``directory`` held by this process: the staging area's proof of
    life. None when the file system has no flock (staging then simply is not swept)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the last descriptor releases the flock


def stale_staging(out: str | Path) -> list[tuple[Path, bool]]:
    """Staging directories of ``out`` left by other writers: (path, owner is dead). A directory
    whose flock this process can take has no live owner (its writer was killed); one whose lock
    is held belongs to a concurrent writer and must be left alone."""
    out = Path(out).absolute()
    found = []
    if not out.parent.is_dir():
        return found
    for kind in _STAGING_KINDS:
        for path in sorted(out.parent.glob(f".{glob.escape(out.name)}.{kind}-*")):
            if path.is_symlink() or not path.is_dir():
                continue
            fd = _lock(path)
            found.append((path, fd is not None))
            _unlock(fd)
    return found


def sweep_stale_staging(out: str | Path, *, warn: Callable[[str], None] | None = None) -> list[Path]:
    """Remove what killed writers of ``out`` left beside it and return the removed paths. A
    retired previous artifact (``.old-``) whose replacement never arrived is put back at ``out``
    instead of being deleted. Staging of a live writer is reported through ``warn`` and kept."""
    out = Path(out).absolute()
    removed = []
    for path, dead in stale_staging(out):
        if not dead:
            if warn:
                warn(f"{path} belongs to a running writer of {out}; left alone")
            continue
        fd = _lock(path)
        if fd is None:  # taken by a new writer since the scan
            continue
        try:
            previous = path / out.name
            if ".old-" in path.name and previous.is_dir() and not os.path.lexists(out):
                os.replace(previous, out)  # killed between moving the old artifact aside and the new in
            shutil.rmtree(path, ignore_errors=True)
        finally:
            _unlock(fd)
        removed.append(path)
    return removed


def _make_parents(directory: Path) -> list[Path]:
    """mkdir -p that returns the directories it created, outermost first."""
    missing = []
    for parent in (directory, *directory.parents):
        if parent.exists():
            break
        missing.append(parent)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ArtifactError(f"{directory}: a parent of the output is not a directory; choose another --out") from None
    except OSError as exc:
        raise ArtifactError(f"{directory}: cannot create the output's folder ({exc.strerror}); "
                            "choose a writable --out") from None
    return missing[::-1]


def _remove_empty(created: list[Path]) -> None:
    for directory in reversed(created):
        try:
            directory.rmdir()
        except OSError:
            break  # something else lives there now: keep it and its parents


class _Staging:
    """One staged write in progress: what abandoning it must undo. Kept in ``_ACTIVE`` so that a
    signal handler can undo it without unwinding the stack (see ``abandon_staged_writes``)."""

    def __init__(self, out: Path, created: list[Path]) -> None:
        self.out, self.created = out, created
        self.stage: Path | None = None
        self.retired: Path | None = None

    def abandon(self) -> None:
        """Idempotent, valid at any point of the write: remove the stage, put back a previous
        artifact moved aside but not yet replaced, remove the folders created for ``out``."""
        if self.stage is not None:
            shutil.rmtree(self.stage, ignore_errors=True)
        if self.retired is not None:
            previous = self.retired / self.out.name
            if previous.exists() and not os.path.lexists(self.out):
                os.replace(previous, self.out)
            shutil.rmtree(self.retired, ignore_errors=True)
        _remove_empty(self.created)


_ACTIVE: list[_Staging] = []


def abandon_staged_writes() -> None:
    """Undo every staged write of this process now, as if each had failed, and remove the
    temporary files of its atomic_write calls in flight. For a SIGTERM handler that then exits at
    once: unwinding the stack from a signal can land inside a C extension's callback (torch.onnx,
    ONNX Runtime), which may crash or swallow the exception."""
    while _ACTIVE:
        _ACTIVE.pop().abandon()
    for tmp in list(_IN_FLIGHT):
        _IN_FLIGHT.discard(tmp)
        with suppress(OSError):
            tmp.unlink()


@contextmanager
def staged_directory(out: str | Path) -> Iterator[Path]:
    """Yield an empty directory beside ``out``. On normal exit it takes ``out``'s place by
    rename (an existing ``out`` is moved aside first, put back if the rename fails, and removed
    last); on any exception, KeyboardInterrupt included, it is removed and ``out`` is untouched,
    and folders created for ``out`` are removed again. Staging left by writers killed with
    SIGKILL is swept first (see ``sweep_stale_staging``). Callers decide beforehand whether
    replacing an existing ``out`` is allowed."""
    out = Path(out).resolve()
    check_destination(out)
    check_replaceable(out)
    state = _Staging(out, [])
    _ACTIVE.append(state)
    lock = None
    try:
        state.created = _make_parents(out.parent)
        for path in sweep_stale_staging(out, warn=_log.warning):
            _log.warning("removed %s, left by a writer of %s that was killed", path, out)
        state.stage = Path(tempfile.mkdtemp(prefix=_staging_prefix(out, "partial"), dir=out.parent))
        lock = _lock(state.stage)
        yield state.stage
        _usual_modes(state.stage)
        _replace(state)
    except BaseException:
        state.abandon()
        raise
    finally:
        if state in _ACTIVE:
            _ACTIVE.remove(state)
        _unlock(lock)


# Pseudo file systems: writing an artifact there either fails deep inside a writer or does
# something other than storing a file.
_PSEUDO_ROOTS = (Path("/proc"), Path("/sys"), Path("/dev"))


def check_destination(out: str | Path, what: str = "--out") -> None:
    """Refuse, before any work, an output path that cannot be written: under a regular file,
    under /proc, /sys or /dev, in a folder this user cannot write, or itself a file where a
    directory goes. One-line ArtifactError naming the path and the fix."""
    out = Path(out).absolute()
    real = Path(os.path.realpath(out))
    for root in _PSEUDO_ROOTS:
        if real == root or root in real.parents:
            raise ArtifactError(f"{what} {out}: {root} is a pseudo file system, not storage; choose a folder on disk")
    if os.path.lexists(out) and not out.is_dir():
        raise ArtifactError(f"{what} {out}: exists and is not a directory; remove it or choose another path")
    ancestor = out.parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ArtifactError(f"{what} {out}: {ancestor} is not a directory, so nothing can be created under it; "
                            "choose another path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ArtifactError(f"{what} {out}: {ancestor} is not writable by this user; choose a writable folder")


# Besides what is planned: the manifest, reports, file-system overhead and estimates that run short.
FREE_SPACE_MARGIN = 64 << 20
FREE_SPACE_SHARE = 0.05


def check_free_space(path: str | Path, planned_bytes: int, what: str = "--out",
                     error: type[AstroError] = ArtifactError) -> int:
    """Refuse (one line, before writing) an output of ``planned_bytes`` whose file system has
    less free space than that plus a margin (the larger of FREE_SPACE_MARGIN and FREE_SPACE_SHARE
    of it): a multi-GB table must not fill the disk halfway. ``path`` may not exist yet: the file
    system is the one of its nearest existing folder. Returns the free bytes found."""
    ancestor = Path(path).absolute()
    while not ancestor.is_dir() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    free = shutil.disk_usage(ancestor).free
    margin = max(FREE_SPACE_MARGIN, int(planned_bytes * FREE_SPACE_SHARE))
    if planned_bytes + margin > free:
        raise error(f"{what} {path}: needs about {_size(planned_bytes)} (+ {_size(margin)} margin) but the file "
                    f"system of {ancestor} has {_size(free)} free; free space there or write to another disk")
    return free


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def refuse_existing(out: Path, force: bool, error: type[AstroError] = ArtifactError) -> None:
    """The one refusal of an output that exists when ``force`` was not given."""
    if out.exists() and not force:
        raise error(f"{out} already exists; choose another --out or pass --force (force=True) to replace it")


def check_replaceable(out: str | Path, what: str = "--out") -> None:
    """Refuse an output that replacing would delete the folder this process (and the user's
    shell) stands in: the current folder or one above it, ``/`` included."""
    out, here = Path(out).resolve(), Path.cwd().resolve()
    if out == here or out in here.parents:
        raise ArtifactError(f"{what} {out} is the current folder or one above it; choose a new folder for the output")


def check_apart(out: str | Path, source: str | Path, what: str, product: str) -> None:
    """Refuse an output that is, holds or lies inside the ``source`` folder it is made from
    (links resolved): replacing it would delete the source, or the output would copy itself."""
    target, origin = Path(out).resolve(), Path(source).resolve()
    if target == origin or target in origin.parents or origin in target.parents:
        raise ArtifactError(f"--out {out} overlaps the {what} {source} it is made from; write the {product} to a "
                            f"folder outside the {what}")


def _usual_modes(stage: Path) -> None:
    """mkdtemp makes the directory private (0700) and some writers (safetensors) make private
    files (0600); the artifact gets the modes any file the user creates would get."""
    mask = _umask()
    stage.chmod(0o777 & ~mask)
    for path in stage.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _replace(state: _Staging) -> None:
    stage, out = state.stage, state.out
    assert stage is not None
    if not out.exists():
        os.replace(stage, out)
        state.stage = None
        return
    state.retired = retired = Path(tempfile.mkdtemp(prefix=_staging_prefix(out, "old"), dir=out.parent))
    lock = _lock(retired)
    try:
        os.replace(out, retired / out.name)
        try:
            os.replace(stage, out)
            state.stage = None
        except BaseException:
            os.replace(retired / out.name, out)
            raise
    finally:
        shutil.rmtree(retired, ignore_errors=True)
        state.retired = None
        _unlock(lock)


# atomic_write's temporary files: ``.<name>.tmp-<host>-<pid>`` beside the target. Those of this
# process that are in flight are listed for abandon_staged_writes; those of dead processes of
# this host (killed between the write and the rename) are swept by the next writer of the target.
_IN_FLIGHT: set[Path] = set()


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, as another user's process
        return True
    return True


def sweep_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the atomic_write temporaries of ``path`` whose writer, a process of this host, is
    dead; return them. A temporary of another host, or of a live pid, is left alone (a reused pid
    only delays the sweep)."""
    path = Path(path)
    prefix = f".{path.name}.tmp-{socket.gethostname()}-"
    removed = []
    try:
        candidates = list(path.parent.glob(f"{glob.escape(prefix)}*"))
    except OSError:
        return removed
    for tmp in candidates:
        pid = tmp.name[len(prefix):]
        if not pid.isdigit() or int(pid) == os.getpid() or pid_alive(int(pid)) or tmp.is_dir():
            continue
        with suppress(OSError):
            tmp.unlink()
            removed.append(tmp)
    return removed


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary name beside ``path`` and rename it over ``path``, so a reader
    (or a crash) never sees half a file. The temporary is removed on any failure, by the SIGTERM
    clean-up (abandon_staged_writes) if the process is terminated in between, and by the next
    writer of ``path`` if the process was killed outright."""
    for stale in sweep_stale_temporaries(path):
        _log.warning("removed %s, left by a writer of %s that was killed", stale, path)
    tmp = _tmp_name(path)
    _IN_FLIGHT.add(tmp)  # before the file exists: a signal can come at any point from here
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        _IN_FLIGHT.discard(tmp)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _open_regular(path: Path, max_bytes: int, *, follow_symlinks: bool) -> int:
    """A blocking read descriptor of ``path`` if it is a regular file of at most ``max_bytes``.
    Opened O_NONBLOCK, so a FIFO cannot block the open, and judged by fstat of what was opened,
    so nothing can be swapped in between the check and the read."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ArtifactError(f"{path}: is a symbolic link; put the file itself there") from None
        raise ArtifactError(f"{path}: cannot be opened ({exc.strerror}); check its permissions") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ArtifactError(f"{path}: is a {_file_kind(info.st_mode)}, not a regular file; "
                                "put the file itself there")
        if info.st_size > max_bytes:
            raise ArtifactError(f"{path}: {info.st_size} bytes, more than the {max_bytes} such a file may hold; "
                                "it is not the file this format expects")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _bounded_chunks(fd: int, path: Path, max_bytes: int) -> Iterator[bytes]:
    total = 0
    while chunk := os.read(fd, 1 << 20):
        total += len(chunk)
        if total > max_bytes:  # grew while being read
            raise ArtifactError(f"{path}: grows past {max_bytes} bytes while being read; use a finished file")
        yield chunk


def read_regular_file(path: str | Path, *, max_bytes: int, follow_symlinks: bool = True) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``max_bytes``. A FIFO, a device, a
    socket or a directory in its place is refused without blocking; ``follow_symlinks=False``
    refuses a symlink too. Raises FileNotFoundError when absent and ArtifactError otherwise."""
    path = Path(path)
    fd = _open_regular(path, max_bytes, follow_symlinks=follow_symlinks)
    try:
        return b"".join(_bounded_chunks(fd, path, max_bytes))
    finally:
        os.close(fd)


def copy_regular_file(source: str | Path, target: str | Path, *, max_bytes: int, sha256: str | None = None) -> None:
    """Copy ``source`` to the new file ``target`` only if it is a regular file (never through a
    symlink, never a FIFO or device) of at most ``max_bytes``; with ``sha256``, only if the bytes
    copied hash to it (checked on the bytes written, so a file swapped after a check is caught)."""
    source, target = Path(source), Path(target)
    try:
        fd = _open_regular(source, max_bytes, follow_symlinks=False)
    except FileNotFoundError:
        raise ArtifactError(f"{source}: not found; the file is listed but missing, re-copy it") from None
    digest = hashlib.sha256()
    try:
        with open(target, "xb") as dst:
            for chunk in _bounded_chunks(fd, source, max_bytes):
                digest.update(chunk)
                dst.write(chunk)
        if sha256 is not None and digest.hexdigest() != sha256:
            raise ArtifactError(f"{source}: its content is not the sha256 recorded for it (changed since it was "
                                "checked); restore the file or re-create its source")
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "named pipe (FIFO)"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISLNK, "symbolic link")):
        if test(mode):
            return name
    return "special file"
