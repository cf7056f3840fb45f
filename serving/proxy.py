"""HAProxy (the Debian package ``haproxy``) in front of several tritonservers: its configuration,
generated here, and its process, started and always stopped.

Routing. A client names its user in the ``X-User-Key`` header (HTTP header, gRPC metadata); the
proxy hashes it onto a consistent-hash ring of the replicas (``balance hdr(X-User-Key)`` with
``hash-type consistent``), so every page of a user reaches the replica that holds its encoded
state. A replica that fails its health check (``/v2/health/ready``) leaves the ring: only its
users move, to the next replica on the ring, where they are encoded once. A request without the
header is balanced round-robin.

Retries. Inference is a POST, which HAProxy retries only at layer 7 with the request buffered
(``option http-buffer-request``): a connection refused, or closed without a response by a replica
that died with the request in flight, is sent again to another replica (``retry-on`` +
``option redispatch``). Scoring has no side effect but the cache, so resending is safe."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from astro_trt.errors import BackendError, DataError
from astro_trt.serving.processes import end_group, start_logged, wait_ready

USER_KEY_HEADER = "X-User-Key"
ROUTINGS = ("user-key", "round-robin")
_INSTALL = "install the Debian package haproxy (apt-get install haproxy)"
# A replica is marked down after FALL failed checks INTERVAL_MS apart (or at once when a connection to
# it fails: observe layer4), and back after RISE good ones.
INTERVAL_MS, FALL, RISE = 500, 2, 2
RETRIES = 3
# Longer than the client's own timeout (client.TIMEOUT_S), so that the client decides when a request failed.
SERVER_TIMEOUT_S = 90
# A request body is buffered for layer-7 retries; a page of 100,000 int64 candidates is 800 kB.
BUFFER_BYTES = 1 << 20


# Debian installs it in /usr/sbin, which a non-root user's PATH often lacks.
SBIN = ("/usr/sbin", "/usr/local/sbin")


def find_haproxy() -> Path:
    """The haproxy binary (on PATH or in SBIN), or BackendError naming the package to install."""
    found = shutil.which("haproxy", path=os.pathsep.join([os.environ.get("PATH", ""), *SBIN]))
    if found is None:
        raise BackendError(f"haproxy is not installed (replicas are served behind it); {_INSTALL}")
    return Path(found)


def haproxy_unavailable_reason() -> str | None:
    try:
        find_haproxy()
    except BackendError as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class Backend:
    name: str
    http: str  # host:port
    grpc: str


def _balance(routing: str) -> list[str]:
    if routing not in ROUTINGS:
        raise DataError(f"routing {routing!r} is unknown; choose one of {list(ROUTINGS)}")
    if routing == "round-robin":
        return ["balance roundrobin"]
    return [f"balance hdr({USER_KEY_HEADER})", "hash-type consistent"]


def haproxy_config(backends: Sequence[Backend], *, http: str, grpc: str | None = None,
                   routing: str = "user-key", dns: bool = False) -> str:
    """haproxy.cfg: an HTTP frontend at ``http`` (host:port) and, with ``grpc``, an HTTP/2 frontend
    for gRPC, both routed over ``backends`` by ``routing``. With ``dns`` the backends are DNS names
    (a Kubernetes StatefulSet's pods) resolved at run time: a name that does not resolve yet (a pod
    the autoscaler has not made) is a server that is down, out of the ring until it appears."""
    if not backends:
        raise DataError("a proxy needs at least one replica")
    balance = _balance(routing)
    discovery = " resolvers cluster init-addr none" if dns else ""
    lines = [
        "global",
        "    maxconn 4096",
        f"    tune.bufsize {BUFFER_BYTES}",
        "",
        *(["resolvers cluster", "    parse-resolv-conf", "    hold valid 5s", ""] if dns else []),
        "defaults",
        "    mode http",
        "    timeout connect 2s",
        f"    timeout client {SERVER_TIMEOUT_S}s",
        f"    timeout server {SERVER_TIMEOUT_S}s",
        "    timeout check 2s",
        f"    retries {RETRIES}",
        "    option redispatch 1",
        "    option http-buffer-request",
        "    retry-on conn-failure empty-response response-timeout",
        f"    default-server check inter {INTERVAL_MS}ms fall {FALL} rise {RISE} observe layer4 error-limit 1 "
        f"on-error mark-down{discovery}",
        "",
    ]
    frontends = [("http", http, "")] + ([("grpc", grpc, " proto h2")] if grpc else [])
    for kind, address, proto in frontends:
        lines += [f"frontend astro_{kind}", f"    bind {address}{proto}", f"    default_backend triton_{kind}", "",
                  f"backend triton_{kind}", *(f"    {b}" for b in balance),
                  # Triton answers readiness over HTTP; the gRPC servers are checked on their replica's HTTP port.
                  "    option httpchk GET /v2/health/ready", "    http-check expect status 200"]
        for b in backends:
            target = b.http if kind == "http" else b.grpc
            check = "" if kind == "http" else f" port {b.http.rpartition(':')[2]}"
            lines.append(f"    server {b.name} {target}{proto}{check}")
        lines.append("")
    return "\n".join(lines)


class HAProxy:
    """``with HAProxy(config_text, ready_url) as proxy:`` runs haproxy in the foreground of its own
    process group until the block ends."""

    def __init__(self, config: str, ready_url: str, *, startup_timeout: float = 30.0) -> None:
        self.config = config
        self.ready_url = ready_url
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None
        self._workdir: Path | None = None

    @property
    def log_path(self) -> Path | None:
        return None if self._workdir is None else self._workdir / "haproxy.log"

    def check(self) -> None:
        """``haproxy -c``: the generated configuration is valid (BackendError with haproxy's own line)."""
        with tempfile.TemporaryDirectory(prefix="astro-haproxy-check-") as tmp:
            path = Path(tmp) / "haproxy.cfg"
            path.write_text(self.config)
            done = subprocess.run([str(find_haproxy()), "-c", "-f", str(path)], capture_output=True, text=True,
                                  timeout=30, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            alerts = [ln for ln in (done.stdout + done.stderr).splitlines() if "ALERT" in ln] or ["no alert line"]
            raise BackendError(f"haproxy refused the generated configuration ({alerts[0].strip()[:300]})")

    def start(self) -> None:
        binary = find_haproxy()
        self._workdir = Path(tempfile.mkdtemp(prefix="astro-haproxy-"))
        config = self._workdir / "haproxy.cfg"
        config.write_text(self.config)
        # -db: stay in the foreground (no daemon to lose track of); its own group, stopped as one.
        self.process = start_logged([str(binary), "-db", "-f", str(config)], self.log_path)
        try:
            self._wait_ready()
        except BaseException:
            self.stop(keep_log=True)
            raise

    def _wait_ready(self) -> None:
        wait_ready(self.process, self.ready_url, what="haproxy", timeout=self.startup_timeout,
                   last_error=self.last_error, log_path=self.log_path, poll=0.1)

    def last_error(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "no log"
        lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if "ALERT" in ln]
        return lines[-1].strip()[:300] if lines else "no alert in its log"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 10.0, *, keep_log: bool = False) -> int | None:
        """SIGTERM the proxy's process group, SIGKILL after ``timeout`` s; removes its work folder
        (but the log with ``keep_log``)."""
        code = None if self.process is None else end_group(self.process, timeout)
        if self._workdir is not None and not keep_log:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        return code

    def __enter__(self) -> HAProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["Backend", "HAProxy", "ROUTINGS", "SBIN", "USER_KEY_HEADER", "find_haproxy", "haproxy_config",
           "haproxy_unavailable_reason"]
