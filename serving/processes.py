"""The child processes serving starts (tritonserver, HAProxy): each in its own process group, its
output in a log file, asked to stop with SIGTERM and killed after a grace period, so that neither
it nor anything it started outlives the command."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from astro_trt.errors import BackendError


def start_logged(cmd: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``cmd`` in a new session (its own process group), stdout and stderr into ``log_path``."""
    log = open(log_path, "wb")  # noqa: SIM115 - the child writes it until it ends
    try:
        return subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    finally:
        log.close()


def end_group(process: subprocess.Popen, timeout: float) -> int | None:
    """SIGTERM ``process``'s group, SIGKILL after ``timeout`` s; its exit status."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        except ProcessLookupError:
            pass
    return process.returncode


def answers(url: str, timeout: float = 2.0) -> bool:
    """``url`` answers 200 (a health endpoint)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def wait_ready(process: subprocess.Popen | None, url: str, *, what: str, timeout: float,
               last_error: Callable[[], str], log_path: Path | None, cancel: threading.Event | None = None,
               poll: float = 0.25) -> None:
    """Until ``url`` answers 200: BackendError (with the log's last error) when ``process`` exits
    or ``timeout`` s pass first; KeyboardInterrupt when ``cancel`` is set (a signal arrived)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cancel is not None and cancel.is_set():
            raise KeyboardInterrupt
        if process is None or process.poll() is not None:
            raise BackendError(f"{what} exited while starting ({last_error()}); see {log_path}")
        if answers(url):
            return
        time.sleep(poll)
    raise BackendError(f"{what} was not ready within {timeout:.0f} s ({last_error()}); see {log_path}")


__all__ = ["answers", "end_group", "start_logged", "wait_ready"]
