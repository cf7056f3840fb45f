"""N tritonservers on 127.0.0.1 behind HAProxy: each replica is a TritonServer of server.py (the
same start, flags and clean-up as one server), the proxy routes users to them by consistent
hashing of the user key (proxy.py). Started together, stopped together, nothing left behind."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from astro_trt.errors import DataError
from astro_trt.serving import lockdown
from astro_trt.serving.defaults import check_replicas
from astro_trt.serving.proxy import ROUTINGS, Backend, HAProxy, find_haproxy, haproxy_config
from astro_trt.serving.server import HOST, Endpoints, TritonServer, free_port


class Replicas:
    """``with Replicas(repo, models=[...], count=3) as fleet:`` starts ``count`` tritonservers and
    the proxy in front of them on ``http_port`` (HTTP) and ``grpc_port`` (gRPC); ``fleet.servers``
    are the replicas (``kill()`` one to see its users move), ``fleet.endpoints`` the proxy's."""

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

    def alive(self) -> bool:
        """The proxy runs and at least one replica does (the proxy routes around a dead one)."""
        return self.proxy.alive() and any(s.alive() for s in self.servers)

    def last_error(self) -> str:
        if not self.proxy.alive():
            return f"haproxy: {self.proxy.last_error()}"
        return "; ".join(f"replica{i}: {s.last_error()}" for i, s in enumerate(self.servers) if not s.alive())

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
