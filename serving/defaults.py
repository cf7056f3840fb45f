"""Serving defaults and the bounds of every number the serving commands take, in a module the
command line can import without numpy or the bundle code: the click options and the library
functions they call check against the same figures."""

from __future__ import annotations

from astro_trt.arguments import max_threads
from astro_trt.errors import DataError
from astro_trt.model.resources import machine_memory
from astro_trt.settings import SERVED_ORT_THREADS as DEFAULT_ORT_THREADS  # settings.py says why one

# astro_recommend's per-user cache of encoded state.
DEFAULT_CACHE_BYTES = 256 << 20

# The cache is at least 1 MiB (below that not one user's state of the smallest preset fits, so
# every page would encode its user again) and at most this machine's memory (the server could
# never hold it; it would be killed by the kernel instead of refusing).
MIN_CACHE_MIB = 1
# At most the CPUs this process may run on (astro_trt.arguments.max_threads: its affinity mask):
# more intra-op threads than cores only spin (1024 started 1,896 threads and never got ready on
# 2 cores); ONNX Runtime itself accepts any int and fails (or thrashes) later.
MAX_ORT_THREADS = max_threads()
MAX_PORT = 65535
# loadtest: the workload is users x pages pages of ``candidates`` int64 ids, built before the run.
MAX_CLIENTS = 256
MAX_USERS = 100_000
MAX_PAGES = 10_000
MAX_CANDIDATES = 100_000
MAX_WORKLOAD_IDS = 1 << 27  # 1 GiB of int64 candidate ids
MIN_SECONDS, MAX_SECONDS = 0.5, 3600.0
MAX_SEED = 2**32 - 1
# serve --replicas: each replica is a whole tritonserver with its own Python stub and cache; more
# than this on one machine only splits its cores further.
MAX_REPLICAS = 64
# loadtest --compare-batching: pairs of runs (with and without batching), each a server start.
MAX_ROUNDS = 50


def max_cache_mib() -> int:
    """The largest per-user cache this machine could hold, in MiB (its memory or cgroup limit)."""
    return max(MIN_CACHE_MIB, machine_memory() >> 20)


def _bounded_int(value: object, what: str, low: int, high: int, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise DataError(f"{what} {value!r}: must be an integer in {low}..{high}; {fix}")
    return value


def check_cache_bytes(cache_bytes: object) -> int:
    """``cache_bytes`` if it is an int of 1 MiB .. this machine's memory."""
    high = max_cache_mib() << 20
    return _bounded_int(cache_bytes, "cache_bytes (--cache-mib)", MIN_CACHE_MIB << 20, high,
                        f"choose a cache between {MIN_CACHE_MIB} MiB and {high >> 20} MiB (this machine's memory)")


def check_ort_threads(ort_threads: object) -> int | None:
    """None (one ONNX Runtime thread per core) or a thread count in 1..MAX_ORT_THREADS."""
    if ort_threads is None:
        return None
    return _bounded_int(ort_threads, "ort_threads (--ort-threads)", 1, MAX_ORT_THREADS,
                        f"this machine gives this process {MAX_ORT_THREADS} CPU(s); pass None (--ort-threads 0) for "
                        "one per core, or fewer threads")


def check_port(port: object, what: str) -> int:
    return _bounded_int(port, what, 1, MAX_PORT, "choose a free TCP port")


def check_seconds(seconds: object, what: str) -> float:
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not MIN_SECONDS <= seconds <= MAX_SECONDS:
        raise DataError(f"{what} {seconds!r}: must be {MIN_SECONDS}..{MAX_SECONDS:.0f} seconds; choose a time in "
                        "that range")
    return float(seconds)


def check_replicas(replicas: object) -> int:
    return _bounded_int(replicas, "--replicas", 1, MAX_REPLICAS, "choose fewer replicas")


def check_workload(*, clients: object, users: object, pages: object, candidates: object, seed: object) -> None:
    """The load test's counts, each in its range, and a workload that fits MAX_WORKLOAD_IDS."""
    _bounded_int(clients, "--clients", 1, MAX_CLIENTS, "choose fewer concurrent clients")
    _bounded_int(users, "--users", 1, MAX_USERS, "choose fewer users")
    _bounded_int(pages, "--pages", 1, MAX_PAGES, "choose fewer pages per user")
    _bounded_int(candidates, "--candidates", 1, MAX_CANDIDATES, "choose fewer candidates per page")
    _bounded_int(seed, "--seed", 0, MAX_SEED, "choose a seed in that range")
    ids = users * pages * candidates  # type: ignore[operator]
    if ids > MAX_WORKLOAD_IDS:
        raise DataError(f"--users {users} x --pages {pages} x --candidates {candidates} = {ids} candidate ids, more "
                        f"than the {MAX_WORKLOAD_IDS} a load test builds in memory; lower one of them")


__all__ = ["DEFAULT_CACHE_BYTES", "DEFAULT_ORT_THREADS", "MAX_CANDIDATES", "MAX_CLIENTS", "MAX_ORT_THREADS",
           "MAX_PAGES", "MAX_PORT", "MAX_SECONDS", "MAX_SEED", "MAX_USERS", "MAX_WORKLOAD_IDS", "MIN_CACHE_MIB",
           "MIN_SECONDS", "check_cache_bytes", "check_ort_threads", "check_port", "check_seconds", "check_workload",
           "max_cache_mib"]
__all__ += ["MAX_REPLICAS", "MAX_ROUNDS", "check_replicas"]
