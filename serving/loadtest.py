"""A load test of astro_recommend: N concurrent clients per protocol for a bounded time, and the
same requests replayed in-process (ONNX Runtime, the same request path without Triton) as the
baseline the served throughput is compared with."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from astro_trt.arguments import as_path, callback, instance
from astro_trt.artifacts import check_destination
from astro_trt.choices import comma_list
from astro_trt.config import ASTROConfig
from astro_trt.errors import ArtifactError, DataError, one_line
from astro_trt.lazy import lazy_import
from astro_trt.reports import by_kind, figure, json_bytes, markdown_table, png_bytes, write_files
from astro_trt.serving import client as tc
from astro_trt.serving.defaults import check_seconds, check_workload
from astro_trt.serving.lockdown import admin_headers
from astro_trt.serving.service import Recommender
from astro_trt.serving.source import load_served_bundle
from astro_trt.serving.workload import Workload, make_workload

ticker = lazy_import("matplotlib.ticker")  # only the plot needs it


@dataclass
class Phase:
    """One protocol's (or the baseline's) run."""

    name: str
    clients: int
    seconds: float
    requests: int
    candidates: int
    errors: int
    encodes: int
    latencies_ms: list[float] = field(repr=False)
    error_samples: list[str] = field(default_factory=list)
    # Per request, as Triton's statistics report them (served runs only): time queued, time in the model.
    server_queue_ms: float | None = None
    server_compute_ms: float | None = None
    requests_per_execute: float | None = None  # requests the model got per execute() (dynamic batching)
    # Per request, seconds from the run's start: (start, end, encoded) of each served one and
    # (start, end) of each failed one; what a replica killed mid-run is judged by (replica_loadtest.py).
    served_at: list[tuple[float, float, bool]] = field(default_factory=list, repr=False)
    failed_at: list[tuple[float, float]] = field(default_factory=list, repr=False)
    started: float = 0.0  # time.perf_counter() when the run began

    @property
    def hit_rate(self) -> float:
        """Pages served from the per-user cache (not encoding their user), of all served pages."""
        return 1.0 - self.encodes / self.requests if self.requests else float("nan")

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def candidates_per_s(self) -> float:
        return self.candidates / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items()
               if k not in ("latencies_ms", "served_at", "failed_at", "started")}
        out.update(requests_per_s=self.requests_per_s, candidates_per_s=self.candidates_per_s,
                   p50_ms=self.percentile(50), p90_ms=self.percentile(90), p99_ms=self.percentile(99),
                   max_ms=max(self.latencies_ms, default=float("nan")))
        return out


def _run(name: str, clients: int, seconds: float, work: Callable[[Any, int], tuple[int, bool]],
         connect: Callable[[], Any], close: Callable[[Any], None]) -> Phase:
    """``clients`` threads call ``work(connection, index)`` -> (candidates, encoded) on shared
    request indices until ``seconds`` have passed."""
    counter = itertools.count()
    lock = threading.Lock()
    latencies: list[float] = []
    totals = {"requests": 0, "candidates": 0, "errors": 0, "encodes": 0}
    samples: list[str] = []
    served_at: list[tuple[float, float, bool]] = []
    failed_at: list[tuple[float, float]] = []
    began = time.monotonic()
    deadline = began + seconds

    def worker() -> None:
        conn = connect()
        try:
            while time.monotonic() < deadline:
                index = next(counter)
                start = time.perf_counter()
                try:
                    cands, encoded = work(conn, index)
                except Exception as exc:  # noqa: BLE001 - a failed request is counted, the client goes on
                    with lock:
                        failed_at.append((start - began_pc, time.perf_counter() - began_pc))
                        totals["errors"] += 1
                        if len(samples) < 5:
                            samples.append(str(exc).splitlines()[0][:300])
                    continue
                end = time.perf_counter()
                elapsed = (end - start) * 1e3
                with lock:
                    served_at.append((start - began_pc, end - began_pc, bool(encoded)))
                    latencies.append(elapsed)
                    totals["requests"] += 1
                    totals["candidates"] += cands
                    totals["encodes"] += int(encoded)
        finally:
            close(conn)

    began_pc = time.perf_counter()
    threads = [threading.Thread(target=worker, name=f"{name}-{i}", daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:  # a request is bounded by the client timeout, so this ends
        t.join(timeout=seconds + 2 * tc.TIMEOUT_S)
    return Phase(name, clients, time.monotonic() - began, latencies_ms=latencies, error_samples=samples,
                 served_at=served_at, failed_at=failed_at, started=began_pc, **totals)


def served_phase(protocol: str, url: str, workload: Workload, *, clients: int, seconds: float,
                 stats_url: str | None = None, headers: Mapping[str, str] | None = None) -> Phase:
    """``clients`` clients of ``protocol`` at ``url`` for ``seconds``; with ``stats_url`` (the
    HTTP endpoint; ``headers`` carry the operator's key to Triton's statistics) the server's own
    queue and compute time per request are added."""
    before = _server_times(stats_url, headers) if stats_url else None
    phase = _served(protocol, url, workload, clients=clients, seconds=seconds)
    if before is not None:
        after = _server_times(stats_url, headers)
        count = after["count"] - before["count"]
        if count > 0:
            phase.server_queue_ms = (after["queue_ns"] - before["queue_ns"]) / count / 1e6
            phase.server_compute_ms = (after["compute_ns"] - before["compute_ns"]) / count / 1e6
            phase.requests_per_execute = count / max(1, after["executions"] - before["executions"])
    return phase


def _server_times(url: str, headers: Mapping[str, str] | None) -> dict[str, float]:
    try:
        return tc.server_times(url, headers=headers)
    except Exception as exc:  # noqa: BLE001 - whatever the client raises, the message is one line
        raise DataError(f"{url}: no statistics of astro_recommend ({one_line(exc)}); pass the --api-key-file "
                        "astro-trt serve named, against a server of astro-trt serve") from None


def _served(protocol: str, url: str, workload: Workload, *, clients: int, seconds: float) -> Phase:
    def work(conn: Any, index: int) -> tuple[int, bool]:
        key, tensors = workload.request(index)
        logits, encoded = tc.recommend(protocol, conn, key, tensors)
        if logits.shape[1] != tensors["cand_items"].shape[1]:
            raise RuntimeError(f"{logits.shape[1]} logits for {tensors['cand_items'].shape[1]} candidates")
        return logits.shape[1], bool(encoded.any())

    return _run(protocol, clients, seconds, work, lambda: tc.connect(protocol, url), lambda c: c.close())


def inprocess_phase(recommender: Any, workload: Workload, *, seconds: float, name: str = "in-process") -> Phase:
    """The same requests through the same request path in this process, one at a time (ONNX
    Runtime uses every core it is given inside each call)."""

    def work(_: Any, index: int) -> tuple[int, bool]:
        key, tensors = workload.request(index)
        page = recommender.page(np.array([[key]], dtype=object), tensors)
        return page.logits.shape[1], bool(page.encoded.any())

    return _run(name, 1, seconds, work, lambda: None, lambda _: None)


@dataclass
class LoadReport:
    model: str
    urls: dict[str, str]
    workload: dict[str, Any]
    phases: list[Phase]
    baselines: list[Phase]  # in-process runs (before and after the served ones)
    note: str = ""

    @property
    def baseline(self) -> Phase | None:
        """The faster in-process run: on a shared machine the comparison with it is the conservative one."""
        return max(self.baselines, key=lambda p: p.candidates_per_s, default=None)

    @property
    def failed(self) -> int:
        return sum(p.errors for p in self.phases)

    def ratio(self, phase: Phase) -> float | None:
        if self.baseline is None or self.baseline.candidates_per_s == 0:
            return None
        return phase.candidates_per_s / self.baseline.candidates_per_s

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "urls": self.urls, "workload": self.workload, "note": self.note,
                "failed_requests": self.failed,
                "phases": [p.summary() | {"vs_in_process": self.ratio(p)} for p in self.phases],
                "in_process": None if self.baseline is None else self.baseline.summary(),
                "in_process_runs": [p.summary() for p in self.baselines]}


def report_markdown(report: LoadReport, plot: str) -> str:
    rows = []
    for p in report.baselines + report.phases:
        ratio = report.ratio(p) if p in report.phases else None
        server = "-" if p.server_compute_ms is None else f"{p.server_queue_ms:.2f} / {p.server_compute_ms:.2f}"
        rows.append((p.name, p.clients, f"{p.seconds:.1f}", p.requests, p.errors, f"{p.requests_per_s:,.1f}",
                     f"{p.candidates_per_s:,.0f}", f"{p.percentile(50):.2f}", f"{p.percentile(90):.2f}",
                     f"{p.percentile(99):.2f}", p.encodes, server, "-" if ratio is None else f"{ratio:.0%}"))
    w = report.workload
    lines = [f"# astro-trt load test: {report.model}", "",
             f"{w['users']} users x {w['pages']} pages of {w['candidates']} candidates per session, sessions "
             "repeated with new user keys (one request in pages encodes). Servers: "
             + ", ".join(f"{k} `{v}`" for k, v in report.urls.items()) + ".", ""]
    if report.note:
        lines += [report.note, ""]
    lines += [markdown_table(["run", "clients", "s", "requests", "failed", "req/s", "cand/s", "p50 ms", "p90 ms",
                              "p99 ms", "encodes", "server queue / compute ms", "vs in-process"], rows), "",
              "In-process: the same requests through the same request path (gate, cache, ONNX Runtime) in "
              "one stream, before and after the served runs; `vs in-process` compares with the faster of "
              "the two. Server queue / compute: Triton's own statistics per request.", "",
              f"![load test]({plot})", ""]
    return "\n".join(lines)


def plot_load(report: LoadReport) -> bytes:
    runs: Sequence[Phase] = report.baselines + report.phases
    fig, (bars, cdf) = figure(1, 2, figsize=(11, 4.2))
    bars.bar([p.name.replace(" ", "\n") for p in runs], [p.candidates_per_s for p in runs], color="tab:blue")
    bars.set_ylabel("candidates scored per second")
    bars.set_title("throughput")
    for p in report.phases:
        lat = np.sort(np.asarray(p.latencies_ms))
        if lat.size:
            cdf.plot(lat, np.arange(1, lat.size + 1) / lat.size, label=f"{p.name} ({p.clients} clients)")
    cdf.set_xscale("log")
    cdf.xaxis.set_major_formatter(ticker.ScalarFormatter())
    cdf.xaxis.set_minor_formatter(ticker.NullFormatter())
    cdf.set_xlabel("latency ms (log)")
    cdf.set_ylabel("fraction of requests")
    cdf.set_title("latency")
    cdf.grid(alpha=0.3)
    cdf.legend()
    return png_bytes(fig)


REPORT_FILES = ("loadtest.json", "loadtest.png", "loadtest.md")


def write_load_reports(report: LoadReport, out: Path) -> dict[str, Path]:
    json_name, png_name, md_name = REPORT_FILES
    files = {json_name: json_bytes(report.to_dict()), png_name: plot_load(report),
             md_name: report_markdown(report, png_name).encode()}
    return by_kind(write_files(Path(out), files))


def check_report_destination(out: Path) -> None:
    """Before the run: a folder the reports can be written to, where a report name is free or a
    previous report (a regular file), never a link or a folder a run would fail on at its end."""
    check_destination(out, "--out")
    for name in REPORT_FILES:
        path = Path(out) / name
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise ArtifactError(f"--out {out}: {name} there is not a report file (a link or not a regular file); "
                                "remove it or choose another --out")


def served_params(url: str, headers: Mapping[str, str] | None) -> dict[str, str]:
    """astro_recommend's config parameters from the server at ``url``, or DataError in one line:
    no server, a server without the key, or one that is not astro-trt's."""
    try:
        params = tc.served_config(url, headers=headers)
    except Exception as exc:  # noqa: BLE001 - whatever the client raises, the message is one line
        text = one_line(exc)
        fix = ("pass --api-key-file with the file astro-trt serve named on its 'management key' line"
               if "restricted" in text else "start one with astro-trt serve")
        raise DataError(f"no astro_recommend model config at {url} ({text}); {fix}") from None
    missing = [k for k in ("astro_config", "precision") if not params.get(k)]
    if missing:
        raise DataError(f"{url} serves an astro_recommend without {', '.join(missing)} in its config: not a model "
                        "of astro-trt; point loadtest at astro-trt serve")
    return params


def check_served_bundle(params: Mapping[str, str], bundle: Any, url: str) -> None:
    """The baseline bundle must be the served one: the same manifest digest (repositories that
    predate the digest parameter: the same model config)."""
    served = params.get("bundle_sha256", "")
    if served and served != bundle.manifest_sha256:
        raise DataError(f"--bundle {bundle.directory} (manifest sha256 {bundle.manifest_sha256[:16]}...) is not the "
                        f"bundle served at {url} ({served[:16]}...); pass the served bundle")
    try:
        same = json.loads(params["astro_config"]) == bundle.manifest["config"]
    except ValueError:
        same = False
    if not same:
        raise DataError(f"--bundle {bundle.directory} has another model config than the one served at {url}; "
                        "pass the served bundle")
    if params["precision"] not in bundle.precisions:
        raise DataError(f"--bundle {bundle.directory} has no {params['precision']} graphs, which {url} serves; "
                        "pass the served bundle")


def run_loadtest(url: str, *, grpc_url: str | None = None, protocol: str = "http,grpc", clients: int = 8,
                 duration: float = 60.0, users: int = 32, pages: int = 8, candidates: int = 256,
                 bundle_dir: Path | None = None, baseline_seconds: float = 20.0, seed: int = 0, note: str = "",
                 out_dir: Path = Path("loadtest"), progress: Callable[[str], None] = lambda _: None,
                 api_key: str | None = None) -> tuple[LoadReport, dict[str, Path]]:
    """``astro-trt loadtest``: ``clients`` concurrent clients against astro_recommend at ``url``
    (host:port of HTTP) for ``duration`` seconds per protocol, with an optional in-process baseline
    on ``bundle_dir`` (which must be the served bundle) before and after; the report and the paths
    of loadtest.{json,md,png}. ``api_key``: the operator's key (see serving/lockdown.py) for the
    served model's config and statistics. Everything is checked before the first request."""
    instance(url, "url", str, "the server's host:port")
    callback(progress, "progress")
    out_dir = as_path(out_dir, "out_dir (--out)")
    bundle_dir = None if bundle_dir is None else as_path(bundle_dir, "bundle_dir (--bundle)")
    check_workload(clients=clients, users=users, pages=pages, candidates=candidates, seed=seed)
    check_seconds(duration, "--duration")
    check_seconds(baseline_seconds, "--baseline-seconds")
    if not isinstance(url, str) or not url:
        raise DataError(f"URL {url!r}: expected host:port of the server's HTTP endpoint; pass e.g. 127.0.0.1:8000")
    if api_key is not None and not isinstance(api_key, str):
        raise DataError(f"api_key: expected the key string, got {type(api_key).__name__}; pass the key astro-trt "
                        "serve wrote (read_api_key(path))")
    check_report_destination(out_dir)
    headers = admin_headers(api_key) if api_key else None
    url = url.removeprefix("http://")
    protocols = comma_list(protocol, tc.PROTOCOLS, "--protocol", DataError)
    if grpc_url is None:
        host, _, port = url.rpartition(":")
        if not port.isdigit():
            raise DataError(f"URL {url!r} must be host:port; pass --grpc-url too")
        grpc_url = f"{host}:{int(port) + 1}"
    for what, value in (("URL", url), ("--grpc-url", grpc_url)):
        # A client built on a bad port fails in its destructor too: refuse before making one.
        host, _, port = value.removeprefix("http://").rpartition(":")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise DataError(f"{what} {value!r} must be host:port with a port in 1..65535; pass the server's address")
    params = served_params(url, headers)
    try:
        astro_config = json.loads(params["astro_config"])
    except ValueError:
        astro_config = None
    if not isinstance(astro_config, dict):
        raise DataError(f"{url} serves an astro_recommend whose astro_config is not a JSON object: not a model of "
                        "astro-trt; point loadtest at astro-trt serve")
    cfg = ASTROConfig.from_dict(astro_config, source=f"{url} astro_recommend config")
    bundle = None
    if bundle_dir is not None:
        bundle = load_served_bundle(as_path(bundle_dir, "--bundle", DataError))
        check_served_bundle(params, bundle, url)
    _server_times(url, headers)  # the statistics answer before the run, not after it
    workload = make_workload(cfg, users=users, pages=pages, candidates=candidates, seed=seed, tag="in-process")
    baselines, recommender = [], None
    if bundle is not None:
        # The same precision and ONNX Runtime threads as the served model, read from its config.
        threads = int(params["ort_threads"]) if params.get("ort_threads") else None
        recommender = Recommender(bundle, params["precision"], compute="ort", threads=threads)
        progress(f"in-process baseline ({baseline_seconds / 2:.0f} s) ...")
        baselines.append(inprocess_phase(recommender, workload, seconds=baseline_seconds / 2, name="in-process"))
    phases = []
    for proto in protocols:
        progress(f"{proto}: {clients} clients for {duration:.0f} s ...")
        # Each run's user keys are its own, so no run is served from another's cache.
        phases.append(served_phase(proto, url if proto == "http" else grpc_url, replace(workload, tag=proto),
                                   clients=clients, seconds=duration, stats_url=url, headers=headers))
    if recommender is not None:
        progress(f"in-process baseline again ({baseline_seconds / 2:.0f} s) ...")
        baselines.append(inprocess_phase(recommender, replace(workload, tag="in-process-after"),
                                         seconds=baseline_seconds / 2, name="in-process after"))
    report = LoadReport("astro_recommend", {"http": url, "grpc": grpc_url},
                        {"users": users, "pages": pages, "candidates": candidates, "seed": seed,
                         "precision": params["precision"], "config": cfg.name}, phases, baselines, note)
    paths = write_load_reports(report, out_dir)
    return report, paths


__all__ = ["REPORT_FILES", "LoadReport", "Phase", "check_report_destination", "check_served_bundle",
           "inprocess_phase", "run_loadtest", "served_params", "served_phase", "write_load_reports"]
