"""The load test over replicas (``astro-trt loadtest --replicas N --bundle BUNDLE``): the command
starts the servers itself, once per routing, so that each run sees fresh caches and it can kill
a replica at a chosen second:

- ``user-key``: N replicas behind HAProxy, users hashed onto them by their X-User-Key header;
- ``round-robin``: the same N replicas, requests spread in turn (each replica sees every user);
- ``single``: one replica holding the cache of all N (the same memory in one place);
- with ``kill_at``: one more user-key run in which replica 1 is killed (SIGKILL) at that second.

Every run supervises its replicas as `serve --replicas` does: the killed replica is restarted on
its ports, and the report says when it answered again and how many requests it served after.

A population of users larger than one replica's cache shows what routing buys: with user-keyed
routing each replica holds only its share of the users."""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from astro_trt.choices import comma_list
from astro_trt.contract import KV_CACHE, USER_ENCODER
from astro_trt.errors import DataError
from astro_trt.reports import by_kind, json_bytes, markdown_table, write_files
from astro_trt.serving import client as tc
from astro_trt.serving.defaults import (
    DEFAULT_CACHE_BYTES,
    check_cache_bytes,
    check_replicas,
    check_seconds,
    check_workload,
)
from astro_trt.serving.loadtest import Phase, served_phase
from astro_trt.serving.lockdown import admin_headers
from astro_trt.serving.proxy import ROUTINGS, find_haproxy
from astro_trt.serving.replicas import Replicas
from astro_trt.serving.repository import PYTHON_MODELS, write_repository
from astro_trt.serving.server import find_triton
from astro_trt.serving.source import load_served_bundle, served_precision
from astro_trt.serving.workload import make_workload

SINGLE = "single"
RUNS = (*ROUTINGS, SINGLE)
KILLED_REPLICA = 1  # the second replica: the first one's metrics port is the one `serve` prints
WINDOW_S = 1.0  # hit rate over time, in windows of this many seconds


@dataclass
class ReplicaRun:
    name: str
    routing: str
    replicas: int
    cache_bytes: int  # per replica
    phase: Phase
    killed_at: float | None = None  # seconds into the run
    windows: list[tuple[float, int, float]] = field(default_factory=list)  # (start s, requests, hit rate)
    # (replica, seconds into the run when it answered again) of each restart, and the requests each
    # restarted replica then served (routed back to it by the proxy: the ring healed).
    restarts: list[tuple[int, float]] = field(default_factory=list)
    served_after_restart: list[int] = field(default_factory=list)

    @property
    def in_flight_at_kill(self) -> int:
        """Requests sent before the kill and answered (or failed) after it: all that the killed
        replica can have been holding."""
        if self.killed_at is None:
            return 0
        spans = [(s, e) for s, e, _ in self.phase.served_at] + list(self.phase.failed_at)
        return sum(1 for s, e in spans if s <= self.killed_at <= e)

    @property
    def failed_outside_kill(self) -> int:
        """Failed requests that were not in flight when the replica was killed (must be 0)."""
        t = self.killed_at
        return sum(1 for s, e in self.phase.failed_at if t is None or not s <= t <= e)

    def hit_rate_between(self, start: float, end: float) -> float:
        pages = [enc for s, _, enc in self.phase.served_at if start <= s < end]
        return 1.0 - sum(pages) / len(pages) if pages else float("nan")

    def summary(self) -> dict[str, Any]:
        p = self.phase
        out = {"name": self.name, "routing": self.routing, "replicas": self.replicas,
               "cache_bytes_per_replica": self.cache_bytes, "requests": p.requests, "failed": p.errors,
               "requests_per_s": p.requests_per_s, "p50_ms": p.percentile(50), "p90_ms": p.percentile(90),
               "p99_ms": p.percentile(99), "hit_rate": p.hit_rate,
               "encodes_per_page": p.encodes / p.requests if p.requests else None,
               "error_samples": p.error_samples, "hit_rate_windows": self.windows}
        if self.killed_at is not None:
            out.update(killed_replica=KILLED_REPLICA, killed_at_s=self.killed_at,
                       in_flight_at_kill=self.in_flight_at_kill, failed_outside_kill=self.failed_outside_kill,
                       hit_rate_before_kill=self.hit_rate_between(0, self.killed_at),
                       hit_rate_after_kill=self.hit_rate_between(self.killed_at, self.killed_at + 2 * WINDOW_S),
                       hit_rate_last_third=self.hit_rate_between(p.seconds * 2 / 3, p.seconds))
        out.update(restarts=[{"replica": i, "ready_at_s": t, "requests_served_after": n}
                             for (i, t), n in zip(self.restarts, self.served_after_restart, strict=True)])
        return out


@dataclass
class ReplicaReport:
    workload: dict[str, Any]
    runs: list[ReplicaRun]
    note: str = ""

    @property
    def failed_outside_kill(self) -> int:
        return sum(r.failed_outside_kill for r in self.runs)

    def to_dict(self) -> dict[str, Any]:
        return {"workload": self.workload, "note": self.note, "failed_outside_kill": self.failed_outside_kill,
                "runs": [r.summary() for r in self.runs]}


def _windows(phase: Phase) -> list[tuple[float, int, float]]:
    out = []
    start = 0.0
    while start < phase.seconds:
        pages = [enc for s, _, enc in phase.served_at if start <= s < start + WINDOW_S]
        out.append((start, len(pages), 1.0 - sum(pages) / len(pages) if pages else float("nan")))
        start += WINDOW_S
    return out


def report_markdown(report: ReplicaReport) -> str:
    w = report.workload
    rows = []
    for r in report.runs:
        s = r.summary()
        kill = "-" if r.killed_at is None else (
            f"replica{KILLED_REPLICA} at {r.killed_at:.1f} s: {r.in_flight_at_kill} in flight, "
            f"{r.failed_outside_kill} failed outside; hit rate {s['hit_rate_before_kill']:.1%} before, "
            f"{s['hit_rate_after_kill']:.1%} in the {2 * WINDOW_S:.0f} s after, {s['hit_rate_last_third']:.1%} in "
            "the last third")
        for (i, t), n in zip(r.restarts, r.served_after_restart, strict=True):
            kill += f"; replica{i} restarted, serving again at {t:.1f} s ({n} requests after)"
        rows.append((r.name, r.replicas, f"{r.cache_bytes / 2**20:.0f}", r.phase.requests, r.phase.errors,
                     f"{r.phase.requests_per_s:,.1f}", f"{r.phase.percentile(50):.1f}",
                     f"{r.phase.percentile(90):.1f}", f"{r.phase.percentile(99):.1f}", f"{r.phase.hit_rate:.1%}",
                     f"{s['encodes_per_page']:.3f}" if s["encodes_per_page"] is not None else "-", kill))
    lines = ["# astro-trt load test over replicas", "",
             f"{w['users']} users x {w['pages']} pages of {w['candidates']} candidates ({w['protocol']}, "
             f"{w['clients']} clients, {w['duration']:.0f} s per run; one user's encoded state is "
             f"{w['state_bytes']:,} bytes, so one replica's cache holds {w['users_per_cache']} users). Sessions "
             f"repeat with new user keys: at best {1 - 1 / w['pages']:.1%} of pages hit the cache.", ""]
    if report.note:
        lines += [report.note, ""]
    lines += [markdown_table(["run", "replicas", "cache MiB each", "requests", "failed", "req/s", "p50 ms",
                              "p90 ms", "p99 ms", "hit rate", "encodes per page", "kill"], rows), "",
              "Hit rate: pages whose user was served from the replica's cache, of all served pages. "
              "`single` holds the cache of all replicas in one server.", ""]
    return "\n".join(lines)


def _one_run(repo: Path, name: str, routing: str, count: int, cache_bytes: int, *, protocol: str, workload: Any,
             clients: int, duration: float, kill_at: float | None, progress: Callable[[str], None]) -> ReplicaRun:
    done = threading.Event()  # the run is over: supervision ends, and so does a restart still starting
    with Replicas(repo, models=PYTHON_MODELS, count=count, routing=routing, cancel=done) as fleet:
        url = fleet.endpoints.http if protocol == "http" else fleet.endpoints.grpc
        failures: list[BaseException] = []

        def keep_up() -> None:  # as `serve --replicas` does: a replica that dies is restarted
            try:
                fleet.supervise(done, progress=progress)
            except BaseException as exc:  # noqa: BLE001 - raised in the run's own thread below
                failures.append(exc)

        supervisor = threading.Thread(target=keep_up, name="supervise-replicas", daemon=True)
        supervisor.start()
        killed: list[float] = []
        timer = None
        if kill_at is not None:
            victim = fleet.servers[KILLED_REPLICA]
            timer = threading.Timer(kill_at, lambda: (killed.append(time.perf_counter()), victim.kill()))
            timer.start()
        try:
            # Each run's user keys are its own (the run's name, made a key-friendly word).
            tag = "".join(c if c.isalnum() else "-" for c in name)
            phase = served_phase(protocol, url, replace(workload, tag=tag), clients=clients, seconds=duration)
        finally:
            if timer is not None:
                timer.cancel()
            done.set()
            supervisor.join()
        # Requests the restarted replica served: a fresh server's statistics start at 0.
        served_again = [tc.server_times(fleet.servers[i].endpoints.http, headers=admin_headers(fleet.api_key))
                        ["count"] for i, _ in fleet.restarted]
        restarted = [(i, t - phase.started) for i, t in fleet.restarted]
    if failures:
        raise failures[0]
    run = ReplicaRun(name, routing, count, cache_bytes, phase, windows=_windows(phase), restarts=restarted,
                     served_after_restart=served_again)
    if killed:
        run.killed_at = killed[0] - phase.started
    return run


def run_replica_loadtest(bundle_dir: Path, *, replicas: int = 3, runs: str = ",".join(RUNS),
                         kill_at: float | None = None, protocol: str = "http", clients: int = 16,
                         duration: float = 30.0, users: int = 32, pages: int = 8, candidates: int = 256,
                         cache_bytes: int = DEFAULT_CACHE_BYTES, seed: int = 0, note: str = "",
                         out_dir: Path = Path("loadtest"), progress: Callable[[str], None] = lambda _: None,
                         ) -> tuple[ReplicaReport, dict[str, Path]]:
    """``astro-trt loadtest --replicas N --bundle BUNDLE``: each of ``runs`` (``user-key``,
    ``round-robin``, ``single``) on freshly started servers, plus a user-key run that kills replica 1
    at ``kill_at`` s; the report and the paths of replicas.{json,md}."""
    check_replicas(replicas)
    check_workload(clients=clients, users=users, pages=pages, candidates=candidates, seed=seed)
    check_seconds(duration, "--duration")
    check_cache_bytes(cache_bytes)
    check_cache_bytes(cache_bytes * replicas)  # the single run holds all of it
    names = comma_list(runs, RUNS, "--routing", DataError)
    protocols = comma_list(protocol, tc.PROTOCOLS, "--protocol", DataError)
    if kill_at is not None:
        check_seconds(kill_at, "--kill-at")
        if kill_at >= duration:
            raise DataError(f"--kill-at {kill_at} s is not before the end of the run (--duration {duration} s); "
                            "choose an earlier second")
        if replicas < 2:
            raise DataError("--kill-at needs --replicas 2 or more: a killed single replica leaves no one to serve")
    find_triton()
    find_haproxy()
    bundle = load_served_bundle(bundle_dir)
    workload = make_workload(bundle.config, users=users, pages=pages, candidates=candidates, seed=seed)
    plan = [(n, n if n in ROUTINGS else "user-key", replicas if n in ROUTINGS else 1,
             cache_bytes if n in ROUTINGS else cache_bytes * replicas, None) for n in names]
    if kill_at is not None:
        plan.append((f"user-key, replica{KILLED_REPLICA} killed", "user-key", replicas, cache_bytes, kill_at))
    done = []
    with tempfile.TemporaryDirectory(prefix="astro-replicas-") as tmp:
        repos: dict[int, Path] = {}
        for proto in protocols:
            for name, routing, count, cache, kill in plan:
                if cache not in repos:
                    repos[cache] = write_repository(bundle, Path(tmp) / f"models-{cache}", cache_bytes=cache)
                name = name if len(protocols) == 1 else f"{name} ({proto})"
                progress(f"{name}: {count} replica(s), {clients} {proto} clients for {duration:.0f} s ...")
                done.append(_one_run(repos[cache], name, routing, count, cache, protocol=proto, workload=workload,
                                     clients=clients, duration=duration, kill_at=kill, progress=progress))
    state = _state_bytes(bundle)
    report = ReplicaReport({"users": users, "pages": pages, "candidates": candidates, "clients": clients,
                            "duration": duration, "protocol": ",".join(protocols), "seed": seed, "state_bytes": state,
                            "users_per_cache": cache_bytes // state, "config": bundle.config.name}, done, note)
    files = {"replicas.json": json_bytes(report.to_dict()), "replicas.md": report_markdown(report).encode()}
    return report, by_kind(write_files(Path(out_dir), files))


def _state_bytes(bundle: Any) -> int:
    """One user's encoded state (its KV cache) in the served precision."""
    spec = bundle.io(served_precision(bundle, None))[USER_ENCODER].tensor(KV_CACHE)
    dims = [int(d) for d in spec.shape[1:]]
    return int(np.prod(dims)) * np.dtype(spec.dtype).itemsize


__all__ = ["RUNS", "ReplicaReport", "ReplicaRun", "run_replica_loadtest"]
