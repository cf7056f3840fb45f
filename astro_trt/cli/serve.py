"""`astro-trt triton` (bundle -> Triton model repository), `astro-trt serve` (a local tritonserver
on 127.0.0.1) and `astro-trt loadtest` (concurrent clients against it)."""

from __future__ import annotations

from pathlib import Path

import click

from astro_trt.errors import DataError, GateError
from astro_trt.lazy import lazy_import
from astro_trt.precision import STORAGE
from astro_trt.serving import defaults as lim
from astro_trt.serving.cache import CACHE_DTYPES, DEFAULT_CACHE_DTYPE, cache_capacity
from astro_trt.serving.defaults import DEFAULT_CACHE_BYTES, DEFAULT_ORT_THREADS
from astro_trt.serving.k8s import check_out, manifests, write_manifests
from astro_trt.serving.repository import write_repository
from astro_trt.serving.server import read_api_key, serve_bundle
from astro_trt.serving.source import load_served_bundle, served_precision

loadtest_lib = lazy_import("astro_trt.serving.loadtest")
replica_loadtest_lib = lazy_import("astro_trt.serving.replica_loadtest")

_THREADS = click.option("--ort-threads", default=DEFAULT_ORT_THREADS, show_default=True,
                        type=click.IntRange(0, lim.MAX_ORT_THREADS),
                        help="ONNX Runtime intra-op threads of astro_recommend on a CPU (0: one per core).")
_SHA = click.option("--expect-sha256", default=None,
                    help="Refuse the bundle unless its manifest has this sha256 (pins what is served).")
_PRECISION = click.option("--precision", default=None, help="Graphs to serve (default: fp32 when the bundle has it).")
_BATCHING = click.option("--batching/--no-batching", default=True, show_default=True,
                         help="astro_recommend merges concurrent requests (Triton's dynamic batcher).")
_CACHE = click.option("--cache-mib", default=DEFAULT_CACHE_BYTES >> 20, show_default=True,
                      type=click.IntRange(lim.MIN_CACHE_MIB, lim.max_cache_mib()),
                      help="astro_recommend's per-user cache of encoded state, in MiB.")
_CACHE_DTYPE = click.option("--cache-dtype", default=DEFAULT_CACHE_DTYPE, show_default=True,
                            type=click.Choice(CACHE_DTYPES),
                            help="How astro_recommend keeps each user's state: as the runtime returns it (fp32), "
                                 "or fp16, or int8 with a scale per head and block (ONNX Runtime compute).")


_ITEM_TABLE = click.option("--item-table", "item_table", default=None, type=click.Choice(tuple(STORAGE)),
                           help="Stored form of the item table to serve (one the bundle has; default: the "
                                "bundle's first, --item-table of export).")


@click.command("triton")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Model repository to write.")
@click.option("--force", is_flag=True, help="Replace an existing --out.")
@_PRECISION
@_CACHE
@_CACHE_DTYPE
@_THREADS
@_BATCHING
@_ITEM_TABLE
@click.option("--k8s", "k8s_dir", type=click.Path(path_type=Path), default=None,
              help="Also write Kubernetes manifests here (official Triton container, HAProxy, autoscaler).")
@click.option("--k8s-replicas", default=3, show_default=True, type=click.IntRange(1, lim.MAX_REPLICAS),
              help="Triton pods to start with (the autoscaler's minimum).")
@click.option("--k8s-max-replicas", default=8, show_default=True, type=click.IntRange(1, lim.MAX_REPLICAS),
              help="The autoscaler's maximum (the proxy lists this many pods).")
@click.option("--k8s-namespace", default="default", show_default=True)
@click.option("--gpus", default=1, show_default=True, type=click.IntRange(0, 16),
              help="GPUs per Triton pod (0: CPU pods).")
@_SHA
def triton(bundle_dir: Path, out: Path, force: bool, precision: str | None, cache_mib: int, cache_dtype: str,
           ort_threads: int, batching: bool, item_table: str | None, k8s_dir: Path | None, k8s_replicas: int,
           k8s_max_replicas: int, k8s_namespace: str, gpus: int, expect_sha256: str | None) -> None:
    """Write a Triton Inference Server model repository (ONNX Runtime models, gate, ensemble,
    per-user cache model) from BUNDLE_DIR; with --k8s, Kubernetes manifests that serve it."""
    if k8s_dir is not None:  # its arguments checked before the repository is written
        check_out(k8s_dir, force)
        manifests(replicas=k8s_replicas, max_replicas=k8s_max_replicas, namespace=k8s_namespace,
                  cache_bytes=cache_mib << 20, gpus=gpus, repository_bytes=0)
    bundle = load_served_bundle(bundle_dir, expect_sha256=expect_sha256)
    repo = write_repository(bundle, out, precision=precision, force=force, cache_bytes=cache_mib << 20,
                            ort_threads=ort_threads or None, cache_dtype=cache_dtype, batching=batching,
                            item_table=item_table)
    models = sorted(p.name for p in repo.iterdir() if (p / "config.pbtxt").is_file())
    click.echo(f"model repository {repo}: {', '.join(models)} (see {repo / 'README.md'})")
    click.echo(_capacity_line(bundle, precision, cache_dtype, cache_mib))
    if k8s_dir is not None:
        size = sum(p.stat().st_size for p in repo.rglob("*") if p.is_file())
        written = write_manifests(k8s_dir, replicas=k8s_replicas, max_replicas=k8s_max_replicas,
                                  namespace=k8s_namespace, cache_bytes=cache_mib << 20, gpus=gpus,
                                  repository_bytes=size, force=force)
        click.echo(f"Kubernetes manifests {written}: {', '.join(sorted(p.name for p in written.iterdir()))} "
                   "(kubectl apply -f; see README)")


def _capacity_line(bundle: object, precision: str | None, cache_dtype: str, cache_mib: int) -> str:
    """Users the per-user cache holds, in this --cache-mib and per GiB, against an fp32 cache."""
    served = served_precision(bundle, precision)
    per_user, users = cache_capacity(bundle.config, served, cache_dtype, cache_mib << 20)  # type: ignore[attr-defined]
    plain, _ = cache_capacity(bundle.config, served, DEFAULT_CACHE_DTYPE, 1)  # type: ignore[attr-defined]
    return (f"astro_recommend cache ({cache_dtype}): {per_user:,} bytes per user, {users:,} users in {cache_mib} MiB, "
            f"{(1 << 30) // per_user:,} per GiB ({plain / per_user:.2f}x the users of the runtime's own state, "
            f"{plain:,} bytes)")


@click.command("serve")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--http-port", default=8000, show_default=True, type=click.IntRange(1, lim.MAX_PORT))
@click.option("--grpc-port", default=8001, show_default=True, type=click.IntRange(1, lim.MAX_PORT))
@click.option("--metrics-port", default=8002, show_default=True, type=click.IntRange(1, lim.MAX_PORT))
@_PRECISION
@_CACHE
@_CACHE_DTYPE
@_THREADS
@_BATCHING
@_ITEM_TABLE
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(1, lim.MAX_REPLICAS),
              help="Tritonservers behind HAProxy (Debian package haproxy), users routed by their X-User-Key header.")
@_SHA
def serve(bundle_dir: Path, http_port: int, grpc_port: int, metrics_port: int, precision: str | None,
          cache_mib: int, cache_dtype: str, ort_threads: int, batching: bool, item_table: str | None, replicas: int,
          expect_sha256: str | None) -> None:
    """Serve BUNDLE_DIR with tritonserver on 127.0.0.1 (astro_recommend and astro_gate, ONNX
    Runtime on the CPU) until Ctrl-C or SIGTERM: inference, health, metadata and metrics open,
    model control off, management APIs behind a key written to a file only this user reads; a
    server that dies is restarted with its cause logged. With --replicas N, N servers behind
    HAProxy on the HTTP and gRPC ports."""
    serve_bundle(bundle_dir, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                 precision=precision, cache_bytes=cache_mib << 20, ort_threads=ort_threads or None,
                 cache_dtype=cache_dtype, batching=batching, replicas=replicas, item_table=item_table,
                 expect_sha256=expect_sha256,
                 show=click.echo,
                 progress=lambda msg: click.echo(msg, err=True))


@click.command("loadtest")
@click.argument("url", required=False)
@click.option("--grpc-url", default=None, help="gRPC endpoint (default: URL's host, port + 1).")
@click.option("--protocol", default="http,grpc", show_default=True,
              help="Comma list of http, grpc (one run each); one of them with --replicas.")
@click.option("--clients", default=8, show_default=True, type=click.IntRange(1, lim.MAX_CLIENTS),
              help="Concurrent clients.")
@click.option("--duration", default=60.0, show_default=True, type=click.FloatRange(lim.MIN_SECONDS, lim.MAX_SECONDS),
              help="Seconds per protocol.")
@click.option("--users", default=32, show_default=True, type=click.IntRange(1, lim.MAX_USERS))
@click.option("--pages", default=8, show_default=True, type=click.IntRange(1, lim.MAX_PAGES),
              help="Pages per user session.")
@click.option("--candidates", default=256, show_default=True, type=click.IntRange(1, lim.MAX_CANDIDATES),
              help="Candidates per page.")
@click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path), default=None,
              help="Also replay the requests in-process on this bundle (ONNX Runtime) as the baseline; with "
                   "--replicas, the bundle the replicas serve.")
@click.option("--baseline-seconds", default=20.0, show_default=True,
              type=click.FloatRange(lim.MIN_SECONDS, lim.MAX_SECONDS),
              help="In-process time, half before and half after the served runs.")
@click.option("--replicas", default=None, type=click.IntRange(1, lim.MAX_REPLICAS),
              help="Start N replicas of --bundle behind HAProxy once per --routing (no URL) and compare them.")
@click.option("--routing", default="user-key,round-robin,single", show_default=True,
              help="With --replicas: runs to make (user-key, round-robin; single: one replica with all the cache).")
@click.option("--kill-at", default=None, type=click.FloatRange(lim.MIN_SECONDS, lim.MAX_SECONDS),
              help="With --replicas: one more user-key run in which replica 1 is killed at this second.")
@click.option("--cache-mib", default=DEFAULT_CACHE_BYTES >> 20, show_default=True,
              type=click.IntRange(lim.MIN_CACHE_MIB, lim.max_cache_mib()),
              help="With --replicas: each replica's per-user cache, in MiB.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, lim.MAX_SEED))
@click.option("--note", default="", help="A line for the report (e.g. what else shared the machine).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("loadtest"), show_default=True,
              help="Where loadtest.{json,md,png} (replicas.{json,md} with --replicas) go.")
@click.option("--api-key-file", type=click.Path(path_type=Path), default=None,
              help="The file astro-trt serve named on its 'management key' line: the served model's config and "
                   "statistics are management APIs behind that key.")
def loadtest(url: str | None, grpc_url: str | None, protocol: str, clients: int, duration: float, users: int,
             pages: int, candidates: int, bundle_dir: Path | None, baseline_seconds: float, replicas: int | None,
             routing: str, kill_at: float | None, cache_mib: int, seed: int, note: str, out_dir: Path,
             api_key_file: Path | None) -> None:
    """N concurrent clients against astro_recommend at URL (host:port of HTTP) for a bounded time:
    requests/s, candidates/s, latency percentiles, errors. With --replicas N (and no URL): N
    replicas of --bundle behind HAProxy, user-keyed routing against round-robin and one replica,
    with cache hit rates. Exit 1 when any request failed (with --kill-at: any outside the killed
    replica's in-flight ones)."""
    api_key = None if api_key_file is None else read_api_key(api_key_file)
    say = lambda msg: click.echo(msg, err=True)  # noqa: E731
    if replicas is not None:
        _replica_loadtest(url, bundle_dir, replicas=replicas, runs=routing, kill_at=kill_at, protocol=protocol,
                          clients=clients, duration=duration, users=users, pages=pages, candidates=candidates,
                          cache_bytes=cache_mib << 20, seed=seed, note=note, out_dir=out_dir, progress=say)
        return
    if url is None:
        raise DataError("give the server's URL (host:port of HTTP), or --replicas N --bundle BUNDLE")
    report, paths = loadtest_lib.run_loadtest(
        url, grpc_url=grpc_url, protocol=protocol, clients=clients, duration=duration, users=users, pages=pages,
        candidates=candidates, bundle_dir=bundle_dir, baseline_seconds=baseline_seconds, seed=seed, note=note,
        out_dir=out_dir, progress=say, api_key=api_key)
    click.echo(paths["md"].read_text())
    click.echo(f"reports: {paths['md']}")
    if report.failed:
        raise GateError(f"loadtest: {report.failed} requests failed; see the errors in {paths['md']}")


def _replica_loadtest(url: str | None, bundle_dir: Path | None, **kwargs: object) -> None:
    if url is not None:
        raise DataError(f"--replicas starts its own servers; drop the URL {url!r}")
    if bundle_dir is None:
        raise DataError("--replicas needs --bundle BUNDLE, what the replicas serve")
    report, paths = replica_loadtest_lib.run_replica_loadtest(bundle_dir, **kwargs)  # type: ignore[arg-type]
    click.echo(paths["md"].read_text())
    click.echo(f"reports: {paths['md']}")
    if report.failed_outside_kill:
        raise GateError(f"loadtest: {report.failed_outside_kill} requests failed (outside a killed replica's "
                        f"in-flight ones); see {paths['md']}")
