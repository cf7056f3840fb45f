"""N tritonservers on 127.0.0.1 behind HAProxy: each replica is a TritonServer of server.py (the
same start, flags and clean-up as one server), the proxy routes users to them by consistent
hashing of the user key (proxy.py). Started together, supervised like one server (a replica that
dies is restarted on its ports), stopped together, nothing left behind."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from astro_trt.errors import BackendError, DataError
from astro_trt.serving import lockdown
from astro_trt.serving.defaults import check_replicas
from astro_trt.serving.proxy import ROUTINGS, Backend, HAProxy, find_haproxy, haproxy_config
from astro_trt.serving.server import HOST, MAX_RESTARTS, Endpoints, Restarts, TritonServer, free_port


class Replicas:
    """``with Replicas(repo, models=[...], count=3) as fleet:`` starts ``count`` tritonservers and
    the proxy in front of them on ``http_port`` (HTTP) and ``grpc_port`` (gRPC); ``fleet.servers``
    are the replicas (``kill()`` one to see its users move; ``supervise()`` restarts it),
    ``fleet.endpoints`` the proxy's."""

    def __init__(self, repository: str | Path, *, models: Sequence[str], count: int, http_port: int = 0,
                 grpc_port: int = 0, metrics_port: int = 0, routing: str = "user-key",
                 startup_timeout: float = 180.0, cancel: threading.Event | None = None,
                 api_key: str | None = None, memory_limit: int | None = None) -> None:
        check_replicas(count)
        if routing not in ROUTINGS:
            raise DataError(f"routing {routing!r} is unknown; choose one of {list(ROUTINGS)}")
        self.routing = routing
        # One operator key for the whole fleet: the management APIs of every replica open to it alone.
        self.api_key = api_key or lockdown.new_api_key()
        # The first replica's metrics go on metrics_port (the one a scraper was told); the others on free ports.
        self.servers = [TritonServer(repository, models=models, metrics_port=metrics_port if i == 0 else 0,
                                     startup_timeout=startup_timeout, cancel=cancel, api_key=self.api_key,
                                     memory_limit=memory_limit) for i in range(count)]
        ports = {"http": http_port or free_port(), "grpc": grpc_port or free_port()}
        self.endpoints = Endpoints(f"{HOST}:{ports['http']}", f"{HOST}:{ports['grpc']}",
                                   self.servers[0].endpoints.metrics)
        backends = [Backend(f"replica{i}", s.endpoints.http, s.endpoints.grpc) for i, s in enumerate(self.servers)]
        # (replica index, time.perf_counter() when it answered again) of each restart by supervise().
        self.restarted: list[tuple[int, float]] = []
        self.proxy = HAProxy(haproxy_config(backends, http=self.endpoints.http, grpc=self.endpoints.grpc,
                                            routing=routing), f"http://{self.endpoints.http}/v2/health/ready")

    @property
    def log_path(self) -> Path | None:
        return self.proxy.log_path

    def start(self) -> Endpoints:
        find_haproxy()  # before any server starts: name the package
        try:
            # Started side by side: each start mostly waits for its model to load.
            with ThreadPoolExecutor(len(self.servers)) as pool:
                for future in [pool.submit(s.start) for s in self.servers]:
                    future.result()
            self.proxy.start()
        except BaseException:
            self.stop()
            raise
        return self.endpoints

    def lines(self) -> list[str]:
        out = [f"{line}  (HAProxy, {self.routing} routing over {len(self.servers)} replicas)"
               for line in self.endpoints.lines()[:2]]
        for i, s in enumerate(self.servers):
            out.append(f"replica{i} http://{s.endpoints.http}  gRPC {s.endpoints.grpc}  "
                       f"metrics http://{s.endpoints.metrics}/metrics")
        return out

    def supervise(self, stop: threading.Event, *, progress: Callable[[str], None], poll_s: float = 0.25,
                  max_restarts: int = MAX_RESTARTS) -> None:
        """Until ``stop`` is set, keep every replica up the way `serve` keeps its one server up
        (server.Restarts): a replica that dies is restarted on its own ports with the fleet's key,
        so HAProxy's health check puts it back on the ring and its users return to it (encoded
        there once more); in the meantime they are served by the next replica on the ring. A
        replica dying more than ``max_restarts`` times within the window, or the proxy ending,
        raises BackendError naming the cause and the log."""
        restarts = [Restarts(max_restarts, f"replica{i}") for i in range(len(self.servers))]
        while not stop.wait(poll_s):
            if not self.proxy.alive():
                raise BackendError(f"haproxy stopped serving the replicas ({self.proxy.last_error()}); "
                                   f"see {self.proxy.log_path}")
            for i, server in enumerate(self.servers):
                if server.alive() or stop.is_set():
                    continue
                try:
                    self.servers[i] = restarts[i].restart(server, progress)
                except KeyboardInterrupt:  # ``stop`` (the fleet's cancel) set during the restart
                    if stop.is_set():
                        return
                    raise
                self.restarted.append((i, time.perf_counter()))

    def stop(self) -> None:
        """The proxy first (no new request reaches a stopping replica), then every replica."""
        self.proxy.stop()
        with ThreadPoolExecutor(len(self.servers)) as pool:
            list(pool.map(lambda s: s.stop(), self.servers))

    def __enter__(self) -> Replicas:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["Replicas"]
