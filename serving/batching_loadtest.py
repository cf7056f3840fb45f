"""The load test of batching across requests (``astro-trt loadtest --compare-batching --bundle
BUNDLE``): astro_recommend served with and without Triton's dynamic batcher, in the same command,
``rounds`` times in alternating order (with first, then without first, ...), each run on a freshly
started server (an empty cache, the same workload). On a machine whose other work comes and goes,
only such paired runs minutes apart compare the two modes; the report gives each pair's ratio and
their spread rather than one figure."""

from __future__ import annotations

import os
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from astro_trt.arguments import integer
from astro_trt.choices import comma_list
from astro_trt.errors import DataError
from astro_trt.reports import by_kind, json_bytes, markdown_table, write_files
from astro_trt.serving import client as tc
from astro_trt.serving.defaults import DEFAULT_CACHE_BYTES, MAX_ROUNDS, check_seconds, check_workload
from astro_trt.serving.loadtest import Phase, check_report_destination, served_phase
from astro_trt.serving.lockdown import admin_headers
from astro_trt.serving.repository import PYTHON_MODELS, write_repository
from astro_trt.serving.server import TritonServer, find_triton
from astro_trt.serving.source import load_served_bundle, served_precision
from astro_trt.serving.workload import make_workload

MODES = ("batching", "no batching")
# The goal the comparison is judged by (issue 22): with batching, this many times the requests/s
# at an equal or lower p99.
GOAL_RATIO = 1.2
REPORT_FILES = ("batching.json", "batching.md")


@dataclass
class BatchingRun:
    round: int
    mode: str
    protocol: str
    phase: Phase
    load_average: float  # the machine's 1-minute load average as the run started

    def summary(self) -> dict[str, Any]:
        p = self.phase
        return {"round": self.round, "mode": self.mode, "protocol": self.protocol, "requests": p.requests,
                "failed": p.errors, "requests_per_s": p.requests_per_s, "p50_ms": p.percentile(50),
                "p99_ms": p.percentile(99), "requests_per_execute": p.requests_per_execute,
                "server_queue_ms": p.server_queue_ms, "server_compute_ms": p.server_compute_ms,
                "load_average": self.load_average, "error_samples": p.error_samples}


@dataclass
class BatchingReport:
    workload: dict[str, Any]
    runs: list[BatchingRun]
    note: str = ""

    @property
    def failed(self) -> int:
        return sum(r.phase.errors for r in self.runs)

    def pairs(self) -> list[dict[str, Any]]:
        """Per round and protocol: batched against unbatched requests/s and p99."""
        out = []
        keyed = {(r.round, r.protocol, r.mode): r.phase for r in self.runs}
        for (round_, protocol, mode), on in keyed.items():
            off = keyed.get((round_, protocol, MODES[1]))
            if mode != MODES[0] or off is None or not off.requests_per_s:
                continue
            ratio = on.requests_per_s / off.requests_per_s
            out.append({"round": round_, "protocol": protocol, "ratio": ratio,
                        "p99_ms": on.percentile(99), "p99_ms_without": off.percentile(99),
                        "met": ratio >= GOAL_RATIO and on.percentile(99) <= off.percentile(99)})
        return out

    def spread(self) -> dict[str, Any]:
        ratios = [p["ratio"] for p in self.pairs()]
        if not ratios:
            return {}
        return {"pairs": len(ratios), "median_ratio": statistics.median(ratios), "min_ratio": min(ratios),
                "max_ratio": max(ratios), "pairs_meeting_goal": sum(p["met"] for p in self.pairs()),
                "goal": f">= {GOAL_RATIO}x requests/s at an equal or lower p99"}

    def to_dict(self) -> dict[str, Any]:
        return {"workload": self.workload, "note": self.note, "failed_requests": self.failed,
                "runs": [r.summary() for r in self.runs], "pairs": self.pairs(), "spread": self.spread()}


def report_markdown(report: BatchingReport) -> str:
    w = report.workload
    rows = [(r.round, r.mode, r.protocol, r.phase.requests, r.phase.errors, f"{r.phase.requests_per_s:,.1f}",
             f"{r.phase.percentile(50):.1f}", f"{r.phase.percentile(99):.1f}",
             "-" if r.phase.requests_per_execute is None else f"{r.phase.requests_per_execute:.2f}",
             f"{r.load_average:.1f}") for r in report.runs]
    pairs = [(p["round"], p["protocol"], f"{p['ratio']:.2f}x", f"{p['p99_ms']:.1f} / {p['p99_ms_without']:.1f}",
              "yes" if p["met"] else "no") for p in report.pairs()]
    lines = ["# astro-trt load test: batching across requests", "",
             f"astro_recommend on {w['bundle']} ({w['precision']}), {w['clients']} clients, {w['duration']:.0f} s "
             f"per run, {w['users']} users x {w['pages']} pages of {w['candidates']} candidates; each run on a "
             f"fresh server, {w['rounds']} rounds in alternating order.", ""]
    if report.note:
        lines += [report.note, ""]
    lines += [markdown_table(["round", "mode", "protocol", "requests", "failed", "req/s", "p50 ms", "p99 ms",
                              "requests per execute", "load average"], rows), "",
              markdown_table(["round", "protocol", "with / without batching, req/s", "p99 ms with / without",
                              f">= {GOAL_RATIO}x at equal or lower p99"], pairs), ""]
    spread = report.spread()
    if spread:
        lines += [f"Ratio over {spread['pairs']} pairs: median {spread['median_ratio']:.2f}x, min "
                  f"{spread['min_ratio']:.2f}x, max {spread['max_ratio']:.2f}x; {spread['pairs_meeting_goal']} of "
                  f"{spread['pairs']} pairs meet the goal.", ""]
    return "\n".join(lines)


def run_batching_loadtest(bundle_dir: Path, *, rounds: int = 3, protocol: str = "http", clients: int = 16,
                          duration: float = 30.0, users: int = 32, pages: int = 8, candidates: int = 256,
                          cache_bytes: int = DEFAULT_CACHE_BYTES, seed: int = 0, note: str = "",
                          out_dir: Path = Path("loadtest"), progress: Callable[[str], None] = lambda _: None,
                          ) -> tuple[BatchingReport, dict[str, Path]]:
    """``astro-trt loadtest --compare-batching --bundle BUNDLE``: ``rounds`` rounds of one run with
    and one without batching per protocol (odd rounds batched first, even rounds unbatched first);
    the report and the paths of batching.{json,md}."""
    integer(rounds, "--rounds", 1, MAX_ROUNDS, "choose fewer rounds")
    check_workload(clients=clients, users=users, pages=pages, candidates=candidates, seed=seed)
    check_seconds(duration, "--duration")
    protocols = comma_list(protocol, tc.PROTOCOLS, "--protocol", DataError)
    check_report_destination(out_dir)
    find_triton()
    bundle = load_served_bundle(bundle_dir)
    workload = make_workload(bundle.config, users=users, pages=pages, candidates=candidates, seed=seed)
    runs: list[BatchingRun] = []
    with tempfile.TemporaryDirectory(prefix="astro-batching-") as tmp:
        repos = {mode: write_repository(bundle, Path(tmp) / mode.replace(" ", "-"), cache_bytes=cache_bytes,
                                        batching=mode == MODES[0]) for mode in MODES}
        for round_ in range(1, rounds + 1):
            for mode in MODES if round_ % 2 else MODES[::-1]:
                with TritonServer(repos[mode], models=PYTHON_MODELS) as server:
                    for proto in protocols:
                        progress(f"round {round_}, {mode}: {clients} {proto} clients for {duration:.0f} s ...")
                        url = server.endpoints.http if proto == "http" else server.endpoints.grpc
                        load = os.getloadavg()[0]
                        tag = f"r{round_}-{mode.replace(' ', '-')}-{proto}"  # each run's users are its own
                        phase = served_phase(proto, url, replace(workload, tag=tag), clients=clients, seconds=duration,
                                             stats_url=server.endpoints.http, headers=admin_headers(server.api_key))
                        runs.append(BatchingRun(round_, mode, proto, phase, load))
    report = BatchingReport({"bundle": str(bundle_dir), "precision": served_precision(bundle, None),
                             "clients": clients, "duration": duration, "users": users,
                             "pages": pages, "candidates": candidates, "rounds": rounds,
                             "protocol": ",".join(protocols), "seed": seed, "cpus": os.cpu_count()}, runs, note)
    files = {REPORT_FILES[0]: json_bytes(report.to_dict()), REPORT_FILES[1]: report_markdown(report).encode()}
    return report, by_kind(write_files(Path(out_dir), files))


__all__ = ["GOAL_RATIO", "MODES", "BatchingReport", "BatchingRun", "run_batching_loadtest"]
