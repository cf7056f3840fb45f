"""`astro-trt triton` (bundle -> Triton model repository), `astro-trt serve` (a local tritonserver
on 127.0.0.1) and `astro-trt loadtest` (concurrent clients against it)."""

from __future__ import annotations

import signal
import tempfile
import threading
from pathlib import Path

import click

from astro_trt.errors import BackendError, DataError, GateError

_THREADS = click.option("--ort-threads", default=1, show_default=True, type=click.IntRange(0),
                        help="ONNX Runtime intra-op threads of astro_recommend on a CPU (0: one per core).")
_SHA = click.option("--expect-sha256", default=None,
                    help="Refuse the bundle unless its manifest has this sha256 (pins what is served).")
_PRECISION = click.option("--precision", default=None, help="Graphs to serve (default: fp32 when the bundle has it).")
_CACHE = click.option("--cache-mib", default=256, show_default=True, type=click.IntRange(0),
                      help="astro_recommend's per-user cache of encoded state, in MiB.")


@click.command("triton")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Model repository to write.")
@click.option("--force", is_flag=True, help="Replace an existing --out.")
@_PRECISION
@_CACHE
@_THREADS
@_SHA
def triton(bundle_dir: Path, out: Path, force: bool, precision: str | None, cache_mib: int, ort_threads: int,
           expect_sha256: str | None) -> None:
    """Write a Triton Inference Server model repository (ONNX Runtime models, gate, ensemble,
    per-user cache model) from BUNDLE_DIR."""
    from astro_trt.serving.repository import write_repository
    from astro_trt.serving.source import load_served_bundle

    bundle = load_served_bundle(bundle_dir, expect_sha256=expect_sha256)
    repo = write_repository(bundle, out, precision=precision, force=force, cache_bytes=cache_mib << 20,
                            ort_threads=ort_threads or None)
    models = sorted(p.name for p in repo.iterdir() if (p / "config.pbtxt").is_file())
    click.echo(f"model repository {repo}: {', '.join(models)} (see {repo / 'README.md'})")


@click.command("serve")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--http-port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--grpc-port", default=8001, show_default=True, type=click.IntRange(1, 65535))
@click.option("--metrics-port", default=8002, show_default=True, type=click.IntRange(1, 65535))
@_PRECISION
@_CACHE
@_THREADS
@_SHA
def serve(bundle_dir: Path, http_port: int, grpc_port: int, metrics_port: int, precision: str | None,
          cache_mib: int, ort_threads: int, expect_sha256: str | None) -> None:
    """Serve BUNDLE_DIR with tritonserver on 127.0.0.1 (astro_recommend and astro_gate, ONNX
    Runtime on the CPU) until Ctrl-C or SIGTERM."""
    from astro_trt.serving.repository import PYTHON_MODELS, write_repository
    from astro_trt.serving.server import TritonServer, find_triton
    from astro_trt.serving.source import load_served_bundle

    find_triton()  # before any work: say how to install it
    bundle = load_served_bundle(bundle_dir, expect_sha256=expect_sha256)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with tempfile.TemporaryDirectory(prefix="astro-repo-") as tmp:
            repo = write_repository(bundle, Path(tmp) / "models", precision=precision, cache_bytes=cache_mib << 20,
                                    ort_threads=ort_threads or None)
            server = TritonServer(repo, models=PYTHON_MODELS, http_port=http_port, grpc_port=grpc_port,
                                  metrics_port=metrics_port, cancel=stop)
            click.echo("starting tritonserver ...", err=True)
            with server:
                for line in server.endpoints.lines():
                    click.echo(line)
                click.echo(f"models   {', '.join(PYTHON_MODELS)} (Ctrl-C stops)", err=True)
                while not stop.wait(0.5):
                    if not server.alive():
                        raise BackendError(f"tritonserver exited ({server.last_error()}); see {server.log_path}")
            click.echo("stopped", err=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@click.command("loadtest")
@click.argument("url")
@click.option("--grpc-url", default=None, help="gRPC endpoint (default: URL's host, port + 1).")
@click.option("--protocol", default="http,grpc", show_default=True, help="Comma list of http, grpc (one run each).")
@click.option("--clients", default=8, show_default=True, type=click.IntRange(1, 256), help="Concurrent clients.")
@click.option("--duration", default=60.0, show_default=True, type=click.FloatRange(0.5, 3600),
              help="Seconds per protocol.")
@click.option("--users", default=32, show_default=True, type=click.IntRange(1))
@click.option("--pages", default=8, show_default=True, type=click.IntRange(1), help="Pages per user session.")
@click.option("--candidates", default=256, show_default=True, type=click.IntRange(1), help="Candidates per page.")
@click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path), default=None,
              help="Also replay the requests in-process on this bundle (ONNX Runtime) as the baseline.")
@click.option("--baseline-seconds", default=20.0, show_default=True, type=click.FloatRange(0.5, 3600),
              help="In-process time, half before and half after the served runs.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--note", default="", help="A line for the report (e.g. what else shared the machine).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("loadtest"), show_default=True,
              help="Where loadtest.{json,md,png} go.")
def loadtest(url: str, grpc_url: str | None, protocol: str, clients: int, duration: float, users: int, pages: int,
             candidates: int, bundle_dir: Path | None, baseline_seconds: float, seed: int, note: str,
             out_dir: Path) -> None:
    """N concurrent clients against astro_recommend at URL (host:port of HTTP) for a bounded time:
    requests/s, candidates/s, latency percentiles, errors. Exit 1 when any request failed."""
    import json
    from dataclasses import replace

    from astro_trt.config import ASTROConfig
    from astro_trt.serving import client as tc
    from astro_trt.serving.loadtest import LoadReport, inprocess_phase, served_phase, write_load_reports
    from astro_trt.serving.workload import make_workload

    url = url.removeprefix("http://")
    protocols = list(dict.fromkeys(p.strip() for p in protocol.split(",") if p.strip()))
    if not protocols or any(p not in tc.PROTOCOLS for p in protocols):
        raise DataError(f"--protocol {protocol!r}: choose a comma list of {list(tc.PROTOCOLS)}")
    if grpc_url is None:
        host, _, port = url.rpartition(":")
        if not port.isdigit():
            raise DataError(f"URL {url!r} must be host:port; pass --grpc-url too")
        grpc_url = f"{host}:{int(port) + 1}"
    try:
        params = tc.served_config(url)
    except Exception as exc:  # noqa: BLE001 - whatever the client raises, the message is one line
        raise DataError(f"no astro_recommend model at {url} ({str(exc).splitlines()[0]}); "
                        "start one with astro-trt serve") from None
    cfg = ASTROConfig.from_dict(json.loads(params["astro_config"]), source=f"{url} astro_recommend config")
    workload = make_workload(cfg, users=users, pages=pages, candidates=candidates, seed=seed, tag="in-process")
    baselines, recommender = [], None
    if bundle_dir is not None:
        from astro_trt.serving.service import Recommender
        from astro_trt.serving.source import load_served_bundle

        bundle = load_served_bundle(bundle_dir)
        # The same precision and ONNX Runtime threads as the served model, read from its config.
        threads = int(params["ort_threads"]) if params.get("ort_threads") else None
        recommender = Recommender(bundle, params["precision"], compute="ort", threads=threads)
        click.echo(f"in-process baseline ({baseline_seconds / 2:.0f} s) ...", err=True)
        baselines.append(inprocess_phase(recommender, workload, seconds=baseline_seconds / 2, name="in-process"))
    phases = []
    for proto in protocols:
        click.echo(f"{proto}: {clients} clients for {duration:.0f} s ...", err=True)
        # Each run's user keys are its own, so no run is served from another's cache.
        phases.append(served_phase(proto, url if proto == "http" else grpc_url, replace(workload, tag=proto),
                                   clients=clients, seconds=duration, stats_url=url))
    if recommender is not None:
        click.echo(f"in-process baseline again ({baseline_seconds / 2:.0f} s) ...", err=True)
        baselines.append(inprocess_phase(recommender, replace(workload, tag="in-process-after"),
                                         seconds=baseline_seconds / 2, name="in-process after"))
    report = LoadReport("astro_recommend", {"http": url, "grpc": grpc_url},
                        {"users": users, "pages": pages, "candidates": candidates, "seed": seed,
                         "precision": params["precision"], "config": cfg.name}, phases, baselines, note)
    paths = write_load_reports(report, out_dir)
    click.echo(paths["md"].read_text())
    click.echo(f"reports: {paths['md']}")
    if report.failed:
        raise GateError(f"loadtest: {report.failed} requests failed; see the errors in {paths['md']}")
