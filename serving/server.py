"""A local tritonserver: the binary and Python backend that the nvidia-pytriton wheel ships,
started on 127.0.0.1 with a model repository, and always stopped.

Two facts about that binary shape the start: the Python backend's stub embeds libpython, which
must be this interpreter's own (its LIBDIR goes on LD_LIBRARY_PATH; the system's libpython fails
model initialisation when the interpreter is another build), and the stub finds its packages
through the first ``python3`` on PATH, so this environment's bin directory goes first."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from astro_trt.errors import BackendError, DataError
from astro_trt.lazy import lazy_import
from astro_trt.serving.cache import check_cache_dtype
from astro_trt.serving.defaults import (
    DEFAULT_CACHE_BYTES,
    DEFAULT_ORT_THREADS,
    check_cache_bytes,
    check_ort_threads,
    check_port,
    check_replicas,
)
from astro_trt.serving.processes import end_group, start_logged, wait_ready
from astro_trt.serving.proxy import find_haproxy
from astro_trt.serving.repository import PYTHON_MODELS, write_repository
from astro_trt.serving.source import load_served_bundle

# replicas.py builds on TritonServer below: imported when first used, not in a cycle at import.
replicas_lib = lazy_import("astro_trt.serving.replicas")

HOST = "127.0.0.1"
_INSTALL = "pip install 'astro-trt[serve]' (nvidia-pytriton ships tritonserver)"


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backends: Path  # holds python/ (libtriton_python.so, triton_python_backend_utils.py)
    stub: Path  # the Python backend stub built for this interpreter's version
    libs: Path  # the shared libraries the binary links


def find_triton() -> TritonInstall:
    """Where nvidia-pytriton's tritonserver is, or BackendError saying how to install it."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise BackendError(f"tritonserver is not installed; {_INSTALL}")
    root = Path(next(iter(spec.submodule_search_locations)))
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    install = TritonInstall(root / "tritonserver/bin/tritonserver", root / "tritonserver/backends",
                            root / "tritonserver/python_backend_stubs" / version / "triton_python_backend_stub",
                            root.parent / "nvidia_pytriton.libs")
    for path in (install.binary, install.backends / "python", install.stub, install.libs):
        if not path.exists():
            raise BackendError(f"nvidia-pytriton is incomplete ({path} is missing; Python {version}); {_INSTALL}")
    return install


def unavailable_reason() -> str | None:
    try:
        find_triton()
    except BackendError as exc:
        return str(exc)
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    members.append(int(entry.name))
            except OSError:
                continue
    return members


@dataclass(frozen=True)
class Endpoints:
    http: str
    grpc: str
    metrics: str

    def lines(self) -> list[str]:
        return [f"HTTP     http://{self.http}", f"gRPC     {self.grpc}", f"metrics  http://{self.metrics}/metrics"]


class TritonServer:
    """``with TritonServer(repo, models=[...]) as server:`` starts tritonserver and waits until
    every model is ready; leaving the block (or ``stop()``) ends it and its Python stubs."""

    def __init__(self, repository: str | Path, *, models: Sequence[str], http_port: int = 0, grpc_port: int = 0,
                 metrics_port: int = 0, startup_timeout: float = 180.0, env: dict[str, str] | None = None,
                 cancel: threading.Event | None = None) -> None:
        self.repository = Path(repository).resolve()
        self.models = list(models)
        self.ports = {k: p or free_port() for k, p in
                      (("http", http_port), ("grpc", grpc_port), ("metrics", metrics_port))}
        self.startup_timeout = startup_timeout
        self.extra_env = dict(env or {})
        self.cancel = cancel  # set (by a signal handler) to abandon a start that is still waiting
        self.endpoints = Endpoints(*(f"{HOST}:{self.ports[k]}" for k in ("http", "grpc", "metrics")))
        self.process: subprocess.Popen | None = None
        self._workdir: Path | None = None

    @property
    def log_path(self) -> Path | None:
        return None if self._workdir is None else self._workdir / "tritonserver.log"

    def _backends(self, install: TritonInstall, workdir: Path) -> Path:
        backends = workdir / "backends"
        shutil.copytree(install.backends / "python", backends / "python")
        shutil.copy2(install.stub, backends / "python" / "triton_python_backend_stub")
        return backends

    def _env(self, install: TritonInstall) -> dict[str, str]:
        env = dict(os.environ)
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        env["LD_LIBRARY_PATH"] = ":".join(p for p in (str(install.libs), libdir, env.get("LD_LIBRARY_PATH")) if p)
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        env.update(self.extra_env)
        return env

    def command(self, install: TritonInstall, backends: Path) -> list[str]:
        cmd = [str(install.binary), f"--model-repository={self.repository}", f"--backend-directory={backends}",
               "--model-control-mode=explicit", *(f"--load-model={m}" for m in self.models),
               "--exit-on-error=true", "--strict-readiness=true", "--exit-timeout-secs=10"]
        # Leaked stub shared memory from a killed server is found (and removed) by this prefix.
        cmd.append(f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}")
        for kind in ("http", "grpc", "metrics"):
            cmd += [f"--{kind}-address={HOST}", f"--{kind}-port={self.ports[kind]}"]
        return cmd

    @property
    def _shm_prefix(self) -> str:
        return f"astro{os.getpid()}p{self.ports['http']}_"

    def start(self) -> Endpoints:
        install = find_triton()
        if not self.repository.is_dir():
            raise BackendError(f"model repository {self.repository} does not exist; write it with astro-trt triton")
        self._workdir = Path(tempfile.mkdtemp(prefix="astro-triton-"))
        backends = self._backends(install, self._workdir)
        self.process = start_logged(self.command(install, backends), self.log_path, self._env(install))
        try:
            self._wait_ready()
        except BaseException:
            self.stop(keep_log=True)
            raise
        return self.endpoints

    def _wait_ready(self) -> None:
        wait_ready(self.process, f"http://{self.endpoints.http}/v2/health/ready", what="tritonserver",
                   timeout=self.startup_timeout, last_error=self.last_error, log_path=self.log_path,
                   cancel=self.cancel)

    def last_error(self) -> str:
        """The server log's last error line, for one-line messages."""
        if self.log_path is None or not self.log_path.exists():
            return "no log"
        lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln[:1] == "E" or "error" in ln]
        return lines[-1].strip()[:300] if lines else "no error line in its log"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the server's process group (the server and its stubs), as a crash would."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self, timeout: float = 20.0, *, keep_log: bool = False) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout`` s; removes the work directory (but the log with
        ``keep_log``) and any stub shared memory left behind. Returns the exit status (None if it
        never started)."""
        code = None
        if self.process is not None:
            code = end_group(self.process, timeout)
            self._end_stubs()
        for leftover in Path("/dev/shm").glob(f"{self._shm_prefix}*"):
            leftover.unlink(missing_ok=True)
        if self._workdir is not None:
            shutil.rmtree(self._workdir / "backends" if keep_log else self._workdir, ignore_errors=True)
            if not keep_log:
                self._workdir = None
        return code

    def _end_stubs(self, grace: float = 5.0) -> None:
        """Python stubs notice a dead server and exit by themselves; any still in the server's
        process group after ``grace`` seconds are killed."""
        assert self.process is not None
        pgid = self.process.pid
        deadline = time.monotonic() + grace
        while _group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _group_members(pgid):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_bundle(bundle_dir: Path, *, http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
                 precision: str | None = None, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 ort_threads: int | None = DEFAULT_ORT_THREADS, cache_dtype: str = "fp32", batching: bool = True,
                 replicas: int = 1,
                 expect_sha256: str | None = None, show: Callable[[str], None] = print,
                 progress: Callable[[str], None] = lambda _: None) -> None:
    """``astro-trt serve``: a model repository of ``bundle_dir`` in a temporary folder, served by
    tritonserver on 127.0.0.1 until SIGINT or SIGTERM; ``show`` gets the endpoints. With
    ``replicas`` > 1, that many tritonservers behind HAProxy on the HTTP and gRPC ports, routing
    users by their X-User-Key header (replicas.py)."""
    check_replicas(replicas)
    ports = {"--http-port": http_port, "--grpc-port": grpc_port, "--metrics-port": metrics_port}
    for what, port in ports.items():
        check_port(port, what)
    check_cache_bytes(cache_bytes)
    check_ort_threads(ort_threads)
    check_cache_dtype(cache_dtype)
    if len(set(ports.values())) < len(ports):
        raise DataError(f"{', '.join(f'{k} {v}' for k, v in ports.items())}: each endpoint needs its own port; "
                        "choose three different ports")
    find_triton()  # before any work: say how to install it
    if replicas > 1:
        find_haproxy()
    bundle = load_served_bundle(bundle_dir, expect_sha256=expect_sha256)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with tempfile.TemporaryDirectory(prefix="astro-repo-") as tmp:
            repo = write_repository(bundle, Path(tmp) / "models", precision=precision, cache_bytes=cache_bytes,
                                    ort_threads=ort_threads, cache_dtype=cache_dtype, batching=batching)
            server: TritonServer | replicas_lib.Replicas
            if replicas > 1:
                server = replicas_lib.Replicas(repo, models=PYTHON_MODELS, count=replicas, http_port=http_port,
                                               grpc_port=grpc_port, metrics_port=metrics_port, cancel=stop)
            else:
                server = TritonServer(repo, models=PYTHON_MODELS, http_port=http_port, grpc_port=grpc_port,
                                      metrics_port=metrics_port, cancel=stop)
            progress("starting tritonserver ..." if replicas == 1 else f"starting {replicas} tritonservers ...")
            with server:
                for line in server.lines() if isinstance(server, replicas_lib.Replicas) else server.endpoints.lines():
                    show(line)
                progress(f"models   {', '.join(PYTHON_MODELS)} (Ctrl-C stops)")
                while not stop.wait(0.5):
                    if not server.alive():
                        raise BackendError(f"tritonserver exited ({server.last_error()}); see {server.log_path}")
            progress("stopped")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


__all__ = ["HOST", "Endpoints", "TritonInstall", "TritonServer", "find_triton", "free_port", "serve_bundle",
           "unavailable_reason"]
