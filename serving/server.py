"""A local tritonserver: the binary and Python backend that the nvidia-pytriton wheel ships,
started on 127.0.0.1 with a model repository, and always stopped.

Two facts about that binary shape the start: the Python backend's stub embeds libpython, which
must be this interpreter's own (its LIBDIR goes on LD_LIBRARY_PATH; the system's libpython fails
model initialisation when the interpreter is another build), and the stub finds its packages
through the first ``python3`` on PATH, so this environment's bin directory goes first."""

from __future__ import annotations

import importlib.util
import os
import re
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

from astro_trt.artifacts import as_path, pid_alive, read_regular_file
from astro_trt.errors import AstroError, BackendError, DataError, one_line
from astro_trt.lazy import lazy_import
from astro_trt.model.resources import machine_memory
from astro_trt.serving import lockdown
from astro_trt.serving.cache import check_cache_dtype
from astro_trt.serving.defaults import (
    DEFAULT_CACHE_BYTES,
    DEFAULT_ORT_THREADS,
    check_cache_bytes,
    check_ort_threads,
    check_port,
    check_replicas,
)
from astro_trt.serving.processes import end_group, wait_ready
from astro_trt.serving.proxy import find_haproxy
from astro_trt.serving.repository import PYTHON_MODELS, write_repository
from astro_trt.serving.source import load_served_bundle

# replicas.py builds on TritonServer below: imported when first used, not in a cycle at import.
replicas_lib = lazy_import("astro_trt.serving.replicas")

HOST = "127.0.0.1"
LOG_NAME = "tritonserver.log"
# Temporary folders of a server and of `serve` carry the owner's pid, so that the next start can
# tell a dead owner's leftovers (swept) from a running one's (left alone).
SERVER_PREFIX, REPO_PREFIX = "astro-triton-", "astro-repo-"
_RUN_DIR = re.compile(rf"(?:{SERVER_PREFIX}|{REPO_PREFIX})(\d+)-.+")
_STUB_SHM = re.compile(r"astro(\d+)p\d+_.+")
# Lines every start on a machine without a GPU logs: never the cause of an exit.
_NOISE = ("CudaDriverHelper", "DCGM", "NVML", "CUDA", "pinned memory")
# Triton's last words after a model failed to load: the line before them names the model.
_SUMMARY = ("failed to load all models",)
# serve restarts a dead server at once, but gives up (exit 2, cause named) after this many
# deaths within the window: a server that cannot stay up is not hidden behind restarts.
MAX_RESTARTS, RESTART_WINDOW_S = 5, 60.0
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


def _mine(path: Path) -> bool:
    try:
        return not path.is_symlink() and path.lstat().st_uid == os.getuid()
    except OSError:
        return False


def sweep_stale(tmp: str | Path | None = None) -> list[Path]:
    """Remove what servers and `serve` processes that died without cleaning up (SIGKILL) left:
    their temporary repositories and backend copies (each dead server's log is kept: a message
    may have named it) and their Python stubs' shared memory. Only this user's, only of pids
    that no longer run. Returns what was removed."""
    removed = []
    for run in Path(tmp or tempfile.gettempdir()).iterdir():
        match = _RUN_DIR.fullmatch(run.name)
        if not match or not _mine(run) or not run.is_dir() or pid_alive(int(match[1])):
            continue
        try:  # another start may sweep the same folder at the same time
            for child in run.iterdir():
                if child.name != LOG_NAME:
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child, ignore_errors=True)
                    else:
                        child.unlink(missing_ok=True)
                    removed.append(child)
            if not any(run.iterdir()):
                run.rmdir()
        except OSError:
            continue
    shm = Path("/dev/shm")
    for region in shm.iterdir() if shm.is_dir() else ():
        match = _STUB_SHM.fullmatch(region.name)
        if match and _mine(region) and not pid_alive(int(match[1])):
            region.unlink(missing_ok=True)
            removed.append(region)
    return removed


def default_memory_limit(cache_bytes: int = 0) -> int:
    """Bytes of private memory each server process may map: half this machine's memory plus the
    per-user cache. A request body declaring a bigger tensor (Triton's HTTP front end allocates
    the declared shape before any model sees it) then fails its allocation at once instead of
    taking the machine's memory."""
    return machine_memory() // 2 + cache_bytes


# Run in the child between fork and tritonserver: the memory bound (inherited by the Python
# stubs) and the parent-death signal (PR_SET_PDEATHSIG = 1: the kernel SIGKILLs the server when the
# thread that started it ends, even by SIGKILL, so no orphan keeps answering on its ports; the
# getppid check catches a parent gone before prctl took effect), then exec. A small interpreter
# of its own rather than preexec_fn: preexec_fn makes Python fork and run code in the child, and
# there grpcio's fork handlers abort when this process holds gRPC clients (seen in the tests).
_LAUNCH = """import ctypes, os, resource, sys
parent, limit, pdeath, argv = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4:]
resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
if pdeath:
    ctypes.CDLL(None).prctl(1, 9, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)
os.execv(argv[0], argv)
"""


def _launched(command: Sequence[str], memory_limit: int, die_with_parent: bool) -> list[str]:
    return [sys.executable, "-I", "-S", "-c", _LAUNCH, str(os.getpid()), str(memory_limit),
            "1" if die_with_parent else "0", *command]


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


@dataclass(frozen=True)
class Endpoints:
    http: str
    grpc: str
    metrics: str

    def lines(self) -> list[str]:
        return [f"HTTP     http://{self.http}", f"gRPC     {self.grpc}", f"metrics  http://{self.metrics}/metrics"]


class TritonServer:
    """``with TritonServer(repo, models=[...]) as server:`` starts tritonserver, locked down
    (lockdown.py: only ``models`` load, management APIs behind ``api_key``), and waits until
    every model is ready; leaving the block (or ``stop()``) ends it and its Python stubs.
    Started from the main thread, the server also ends when this process ends, even by SIGKILL."""

    def __init__(self, repository: str | Path, *, models: Sequence[str], http_port: int = 0, grpc_port: int = 0,
                 metrics_port: int = 0, startup_timeout: float = 180.0, env: dict[str, str] | None = None,
                 cancel: threading.Event | None = None, api_key: str | None = None,
                 memory_limit: int | None = None) -> None:
        self.repository = Path(repository).resolve()
        self.models = list(models)
        self.ports = {k: p or free_port() for k, p in
                      (("http", http_port), ("grpc", grpc_port), ("metrics", metrics_port))}
        self.startup_timeout = startup_timeout
        self.extra_env = dict(env or {})
        self.cancel = cancel  # set (by a signal handler) to abandon a start that is still waiting
        self.endpoints = Endpoints(*(f"{HOST}:{self.ports[k]}" for k in ("http", "grpc", "metrics")))
        # The operator's key to the management APIs (lockdown.py); clients get inference only.
        self.api_key = api_key or lockdown.new_api_key()
        self.memory_limit = memory_limit or default_memory_limit()
        self.process: subprocess.Popen | None = None
        self._workdir: Path | None = None

    @property
    def log_path(self) -> Path | None:
        return None if self._workdir is None else self._workdir / LOG_NAME

    @property
    def admin_headers(self) -> dict[str, str]:
        return lockdown.admin_headers(self.api_key)

    def _served_view(self, workdir: Path) -> Path:
        """A repository holding only ``models`` (links to their folders): with model control off
        Triton loads every model it finds, and a repository may hold models this server cannot
        run (ONNX Runtime and TensorRT backends the local binary lacks)."""
        view = workdir / "models"
        view.mkdir()
        for model in self.models:
            source = self.repository / model
            if not (source / "config.pbtxt").is_file():
                raise BackendError(f"model repository {self.repository} has no model {model!r}; "
                                   "write it with astro-trt triton")
            (view / model).symlink_to(source, target_is_directory=True)
        return view

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

    def command(self, install: TritonInstall, backends: Path, view: Path) -> list[str]:
        # Leaked stub shared memory from a killed server is found (and removed) by this prefix.
        extra = [f"--backend-directory={backends}",
                 f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}"]
        return [str(install.binary), *lockdown.tritonserver_args(
            str(view), api_key=self.api_key, http_port=self.ports["http"], grpc_port=self.ports["grpc"],
            metrics_port=self.ports["metrics"], address=HOST, extra=extra)]

    @property
    def _shm_prefix(self) -> str:
        return f"astro{os.getpid()}p{self.ports['http']}_"

    def start(self) -> Endpoints:
        install = find_triton()
        if not self.repository.is_dir():
            raise BackendError(f"model repository {self.repository} does not exist; write it with astro-trt triton")
        sweep_stale()
        self._check_ports_free()
        self._workdir = Path(tempfile.mkdtemp(prefix=f"{SERVER_PREFIX}{os.getpid()}-"))
        try:
            command = self.command(install, self._backends(install, self._workdir), self._served_view(self._workdir))
        except BaseException:
            self.stop()
            raise
        log = open(self.log_path, "wb")  # noqa: SIM115 - the server writes it until stop()
        try:
            # Its own process group (stop() ends the stubs with it), the parent-death signal (a
            # SIGKILLed caller leaves no server behind) and a memory bound.
            self.process = subprocess.Popen(_launched(command, self.memory_limit, self._die_with_parent()),
                                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=self._env(install), start_new_session=True)
        finally:
            log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop(keep_log=True)
            raise
        return self.endpoints

    def _check_ports_free(self) -> None:
        """Refuse a port something already listens on: the readiness probe would otherwise be
        answered by that other server while this one fails to bind."""
        for kind, port in self.ports.items():
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((HOST, port))
                except OSError:
                    raise BackendError(f"tritonserver cannot start: {HOST}:{port} (--{kind}-port) is already in use; "
                                       f"stop what listens there or choose another --{kind}-port") from None

    @staticmethod
    def _die_with_parent() -> bool:
        """The parent-death signal fires when the starting *thread* ends: armed when the main
        thread starts the server (`serve`); a server started from another thread relies on
        stop() and its process group instead."""
        return threading.current_thread() is threading.main_thread()

    def _wait_ready(self) -> None:
        wait_ready(self.process, f"http://{self.endpoints.http}/v2/health/ready", what="tritonserver",
                   timeout=self.startup_timeout, last_error=self.exit_cause, log_path=self.log_path,
                   cancel=self.cancel)

    def last_error(self) -> str:
        """The server log's last error line, for one-line messages; the warnings every start on a
        machine without a GPU logs (CUDA, NVML, DCGM) are never the cause."""
        if self.log_path is None or not self.log_path.exists():
            return "no log"
        lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines()
                 if (ln[:1] == "E" or "error" in ln.lower() or "terminate called" in ln)
                 and not any(n in ln for n in _NOISE)]
        lines = [ln for ln in lines if not any(g in ln for g in _SUMMARY)] or lines
        return lines[-1].strip()[:300] if lines else "no error line in its log"

    def exit_cause(self) -> str:
        """How the server ended (signal or status) and its log's last error line."""
        return f"{describe_exit(None if self.process is None else self.process.poll())}; {self.last_error()}"

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
            if keep_log:  # the backends' copy and the served view go; the log stays where messages named it
                for child in self._workdir.iterdir():
                    if child.name != LOG_NAME:
                        shutil.rmtree(child, ignore_errors=True)
            else:
                shutil.rmtree(self._workdir, ignore_errors=True)
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

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.stop(keep_log=exc_type is not None)  # a failure's message names the log: keep it


def _write_key(path: Path, api_key: str) -> Path:
    """The operator's key in a file only this user can read (created anew, never through a link)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(api_key + "\n")
    return path


def read_api_key(path: str | Path) -> str:
    """The key `serve` wrote (its ``management key`` line names the file), for the management
    APIs (statistics, model config) the load test reads."""
    try:  # a regular file of a few bytes: never a FIFO, a device or /dev/zero
        key = read_regular_file(as_path(path, "--api-key-file", DataError), max_bytes=4096).decode().strip()
    except (AstroError, OSError, UnicodeError, ValueError) as exc:
        raise DataError(f"--api-key-file {path}: cannot read it ({one_line(exc, 120)}); pass the file "
                        "astro-trt serve named on its 'management key' line") from None
    if not key or len(key) > 256 or any(c in key for c in ",:= \n"):
        raise DataError(f"--api-key-file {path}: not a key astro-trt serve wrote; pass the file astro-trt serve "
                        "named on its 'management key' line")
    return key


def supervise(server: TritonServer, stop: threading.Event, *, progress: Callable[[str], None],
              poll_s: float = 0.25, max_restarts: int = MAX_RESTARTS) -> TritonServer:
    """Keep ``server`` up until ``stop`` is set: a server that dies (a body that crashes Triton's
    own HTTP front end, a kill, the kernel's OOM killer) is restarted at once on the same ports,
    repository and key, its cause logged and its log kept. More than ``max_restarts`` deaths
    within RESTART_WINDOW_S end it with BackendError naming the last cause and log. Returns the server
    that is running when ``stop`` is set."""
    deaths: list[float] = []
    while not stop.wait(poll_s):
        if server.alive():
            continue
        cause, log = server.exit_cause(), server.log_path
        server.stop(keep_log=True)
        now = time.monotonic()
        deaths = [t for t in deaths if now - t < RESTART_WINDOW_S] + [now]
        if len(deaths) > max_restarts:
            raise BackendError(f"tritonserver died {len(deaths)} times within {RESTART_WINDOW_S:.0f} s, last "
                               f"({cause}); see {log}")
        progress(f"tritonserver died ({cause}); its log is kept at {log}; restarting ...")
        server = TritonServer(server.repository, models=server.models, http_port=server.ports["http"],
                              grpc_port=server.ports["grpc"], metrics_port=server.ports["metrics"],
                              startup_timeout=server.startup_timeout, env=server.extra_env, cancel=server.cancel,
                              api_key=server.api_key, memory_limit=server.memory_limit)
        began = time.monotonic()
        server.start()
        progress(f"tritonserver restarted in {time.monotonic() - began:.1f} s")
    return server


def _serve_replicas(repo: Path, tmp: Path, *, replicas: int, ports: tuple[int, int, int], memory_limit: int,
                    stop: threading.Event, show: Callable[[str], None], progress: Callable[[str], None]) -> None:
    """serve_bundle's --replicas N: the fleet (one management key for all replicas) until ``stop``."""
    http_port, grpc_port, metrics_port = ports
    fleet = replicas_lib.Replicas(repo, models=PYTHON_MODELS, count=replicas, http_port=http_port,
                                  grpc_port=grpc_port, metrics_port=metrics_port, cancel=stop,
                                  memory_limit=memory_limit)
    key_file = _write_key(tmp / "api-key", fleet.api_key)
    progress(f"starting {replicas} tritonservers ...")
    with fleet:
        for line in fleet.lines():
            show(line)
        show(f"management key  {key_file} (header {lockdown.KEY_HEADER}; model control off)")
        progress(f"models   {', '.join(PYTHON_MODELS)} (Ctrl-C stops)")
        while not stop.wait(0.5):
            if not fleet.alive():
                raise BackendError(f"the replicas stopped serving ({fleet.last_error()}); see {fleet.log_path}")


def serve_bundle(bundle_dir: Path, *, http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
                 precision: str | None = None, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 ort_threads: int | None = DEFAULT_ORT_THREADS, cache_dtype: str = "fp32", batching: bool = True,
                 replicas: int = 1, item_table: str | None = None,
                 expect_sha256: str | None = None, show: Callable[[str], None] = print,
                 progress: Callable[[str], None] = lambda _: None) -> None:
    """``astro-trt serve``: a model repository of ``bundle_dir`` in a temporary folder, served by
    a locked-down tritonserver (lockdown.py) on 127.0.0.1 and restarted if it dies, until SIGINT
    or SIGTERM; ``show`` gets the endpoints and the file holding the management key. With
    ``replicas`` > 1, that many tritonservers behind HAProxy on the HTTP and gRPC ports, routing
    users by their X-User-Key header (replicas.py); a replica that dies is not restarted, its users
    move to the next replica on the ring."""
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
    sweep_stale()  # repositories of `serve` processes killed before they could remove them
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with tempfile.TemporaryDirectory(prefix=f"{REPO_PREFIX}{os.getpid()}-") as tmp:
            repo = write_repository(bundle, Path(tmp) / "models", precision=precision, cache_bytes=cache_bytes,
                                    ort_threads=ort_threads, cache_dtype=cache_dtype, batching=batching,
                                    item_table=item_table)
            memory_limit = default_memory_limit(cache_bytes)
            if replicas > 1:
                _serve_replicas(repo, Path(tmp), replicas=replicas, ports=(http_port, grpc_port, metrics_port),
                                memory_limit=memory_limit, stop=stop, show=show, progress=progress)
                progress("stopped")
                return
            server = TritonServer(repo, models=PYTHON_MODELS, http_port=http_port, grpc_port=grpc_port,
                                  metrics_port=metrics_port, cancel=stop, memory_limit=memory_limit)
            key_file = _write_key(Path(tmp) / "api-key", server.api_key)
            progress("starting tritonserver ...")
            server.start()
            try:
                for line in server.endpoints.lines():
                    show(line)
                show(f"management key  {key_file} (header {lockdown.KEY_HEADER}; model control off)")
                progress(f"models   {', '.join(PYTHON_MODELS)} (Ctrl-C stops)")
                server = supervise(server, stop, progress=progress)
            except BaseException:
                server.stop(keep_log=True)
                raise
            server.stop()
            progress("stopped")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


__all__ = ["HOST", "LOG_NAME", "Endpoints", "TritonInstall", "TritonServer", "describe_exit", "find_triton",
           "free_port", "read_api_key", "serve_bundle", "supervise", "sweep_stale", "unavailable_reason"]
