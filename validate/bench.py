"""Throughput of the split (encode the user once, score M candidates against the cache) against
the naive path (the full model: one sequence [history ; candidate] per pair), in the same
runtime and the same process, on synthetic requests at the configured sizes.

One request is U users with M candidates each. All paths (naive, split, and the peers: the same
split in another framework) are timed in turn, repetition by repetition, so that drift of the
machine (other processes, frequency) hits them alike; warm-up calls are excluded.

The naive path has no work shared between candidates, so its cost is linear in the number of
(user, candidate) pairs; where one call over every pair would not fit the memory budget it is
timed on the first K candidates of each user and its latency scaled by M / K (the report says so).
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from astro_trt.arguments import max_threads
from astro_trt.choices import split_list
from astro_trt.config import ASTROConfig
from astro_trt.contract import GRAPHS
from astro_trt.engines.bundle import write_report
from astro_trt.errors import DataError
from astro_trt.model.synthetic import synthetic_batch
from astro_trt.reports import by_kind, json_bytes, markdown_table, plot_throughput, write_files
from astro_trt.runtime.onnxruntime import OrtRunner
from astro_trt.settings import ORT_THREADS

DEFAULT_CANDIDATES = (64, 256, 1024)
DEFAULT_USERS = (1, 8, 32)
# One naive call may hold this much in intermediate tensors (other processes share the machine).
NAIVE_BUDGET_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class Latency:
    """Per-request latency in milliseconds over the timed repetitions."""

    p50: float
    p90: float
    p99: float
    mean: float
    samples: int

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Latency:
        ms = np.asarray(seconds, dtype=np.float64) * 1e3
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        return cls(float(p50), float(p90), float(p99), float(ms.mean()), int(ms.size))


@dataclass(frozen=True)
class BenchPoint:
    candidates: int  # per user
    naive: Latency  # per request; scaled by candidates / naive_sampled when sampled
    split: Latency
    users: int = 1
    naive_sampled: int | None = None  # candidates per user the naive path actually ran, when fewer
    peers: Mapping[str, Latency] = field(default_factory=dict)  # the same split in other runtimes

    @property
    def scored(self) -> int:
        return self.users * self.candidates

    def per_second(self, latency: Latency) -> float:
        """Candidates scored per second at ``latency``'s median (the naive path, the split or a peer)."""
        return self.scored / (latency.p50 / 1e3)

    @property
    def naive_per_second(self) -> float:
        return self.per_second(self.naive)

    @property
    def split_per_second(self) -> float:
        return self.per_second(self.split)

    @property
    def gain(self) -> float:
        """How many times more candidates per second the split scores (median latencies)."""
        return self.naive.p50 / self.split.p50

    def speedup_over(self, peer: str) -> float:
        """How many times faster this runtime's split is than ``peer``'s (median latencies)."""
        return self.peers[peer].p50 / self.split.p50

    def to_dict(self) -> dict[str, Any]:
        return {
            "users": self.users, "candidates": self.candidates, "naive_ms": asdict(self.naive),
            "split_ms": asdict(self.split), "naive_sampled_candidates": self.naive_sampled,
            "naive_candidates_per_s": self.naive_per_second, "split_candidates_per_s": self.split_per_second,
            "gain": self.gain,
            "peers": {name: {"split_ms": asdict(lat), "candidates_per_s": self.per_second(lat),
                             "speedup_of_split": self.speedup_over(name)} for name, lat in self.peers.items()},
        }


@dataclass
class BenchResult:
    config: ASTROConfig
    runtime: str
    precision: str
    source: str  # where the graphs came from (bundle path or "random <preset>")
    warmup: int
    repetitions: int
    threads: int | None
    points: list[BenchPoint] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)
    peer_notes: dict[str, str] = field(default_factory=dict)  # peer -> why it did not run, or how it ran
    profile: dict[str, Any] = field(default_factory=dict)  # "M=256" -> graph -> per-op breakdown
    ceiling: dict[str, Any] = field(default_factory=dict)  # int8: "M=1024" -> scorers vs bare MatMuls (ceiling.py)

    def predicted_gain(self, candidates: int, *, head: bool = False) -> float:
        """ASTRO's arithmetic (docs/model.md §6): per candidate, layer and block the naive path
        processes L+1 tokens (projections and FFN ~ (L+1) d^2, attention ~ (L+1)^2 d) where the
        scorer processes one token attending to L+1 keys (~ d^2 + (L+1) d); the encoder runs once
        per request (~ L d^2 + L^2 d). The fusion head, identical in both, is left out unless
        ``head``: both paths pay it per candidate, and with it the count is the ceiling a measured
        gain can reach when every path runs at the same multiply-add rate. Integer counts, so
        leaving the head out gives exactly the per-block ratio."""
        c = self.config
        length, d, f, nb = c.max_len, c.d_model, c.ffn_dim, c.num_blocks
        tokens_cost = 3 * d * d + 2 * d * f  # q, k, v projections + FFN, per token (no W_O)
        fusion = nb * tokens_cost + 2 * nb * d * c.fuse_hidden + nb * d * d + d * c.num_tasks if head else 0
        stacks = c.num_layers * nb
        naive = candidates * (stacks * ((length + 1) * tokens_cost + (length + 1) ** 2 * 2 * d) + fusion)
        split = (candidates * (stacks * (tokens_cost + (length + 1) * 2 * d) + fusion)
                 + stacks * (length * tokens_cost + length**2 * 2 * d))
        return naive / split

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(), "runtime": self.runtime, "precision": self.precision,
            "source": self.source, "warmup": self.warmup, "repetitions": self.repetitions, "threads": self.threads,
            "machine": self.machine, "peer_notes": self.peer_notes,
            "points": [dict(p.to_dict(), predicted_gain=self.predicted_gain(p.candidates),
                            predicted_gain_with_head=self.predicted_gain(p.candidates, head=True))
                       for p in self.points],
            "profile": self.profile,
            **({"ceiling": self.ceiling} if self.ceiling else {}),
        }


def machine_info(threads: int | None) -> dict[str, Any]:
    """What a reader needs to compare figures across machines: CPU, cores, threads, versions,
    and the load average when the run started (other processes sharing the cores)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    versions = {}
    for package in ("astro-trt", "onnxruntime", "torch", "onnx", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu": cpu, "logical_cores": os.cpu_count(), "usable_cores": max_threads(), "threads": threads,
        "python": platform.python_version(), "platform": platform.platform(), "versions": versions,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def naive_pairs_limit(cfg: ASTROConfig, budget_bytes: int = NAIVE_BUDGET_BYTES) -> int:
    """(user, candidate) pairs one naive call may take within ``budget_bytes``: per pair, a few live
    float32 score/bias tensors [Nb, H, L+1, L+1] and FFN activations [Nb, L+1, max(d, f)]."""
    s = cfg.max_len + 1
    per_pair = 4 * 4 * (cfg.num_blocks * cfg.num_heads * s * s + cfg.num_blocks * s * max(cfg.d_model, cfg.ffn_dim))
    return max(1, budget_bytes // per_pair)


def time_interleaved(
    calls: Mapping[str, Callable[[], Any]], *, warmup: int, repetitions: int
) -> dict[str, list[float]]:
    """Seconds per call of each, timed in turn after ``warmup`` untimed calls of each."""
    if repetitions < 1 or warmup < 0:
        raise DataError(f"need repetitions >= 1 and warmup >= 0, got {repetitions} and {warmup}")
    for _ in range(warmup):
        for call in calls.values():
            call()
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repetitions):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def parse_counts(text: str, option: str = "--candidates", example: str = "64,256,1024") -> list[int]:
    """A comma list of positive counts (``--candidates``, ``--users``), or a one-line DataError."""
    try:
        values = [int(v) for v in split_list(text) or ()]  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise DataError(f"{option} '{text}': expected comma-separated integers such as {example}") from None
    if not values or any(v < 1 for v in values):
        raise DataError(f"{option} '{text}': every count must be a positive integer")
    return values


def parse_candidates(text: str) -> list[int]:
    return parse_counts(text)


def parse_users(text: str) -> list[int]:
    return parse_counts(text, "--users", "1,8,32")


def run_bench(
    runner: Any,
    cfg: ASTROConfig,
    candidates: Sequence[int] = DEFAULT_CANDIDATES,
    *,
    source: str,
    users: Sequence[int] = (1,),
    peers: Mapping[str, Any] | None = None,
    naive_pairs: int | None = None,
    warmup: int = 1,
    repetitions: int = 5,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> BenchResult:
    """Time ``runner`` (runtime/runner.py: encode/score/full) on synthetic requests of U users x M
    candidates, with ``peers`` (name -> runner) timing the same split alongside. The naive path
    takes at most ``naive_pairs`` pairs per call (default: the memory budget of the config)."""
    threads = getattr(runner, "threads", None)
    result = BenchResult(cfg, runner.runtime, runner.precision, source, warmup, repetitions, threads,
                         machine=machine_info(threads))
    limit = naive_pairs or naive_pairs_limit(cfg)
    for u in users:
        for m in candidates:
            # Every slot a real candidate: padded slots would cost the same and count as nothing.
            batch = synthetic_batch(cfg, u, m, seed=seed + m + 7919 * u, empty_block_prob=0.0)
            history, cand = batch.history, batch.cand_items
            sample = m if u * m <= limit else max(1, limit // u)
            naive_cand = cand[:, :sample]
            calls: dict[str, Callable[[], Any]] = {
                "naive": lambda r=runner, h=history, c=naive_cand: r.full(h, c),
                "split": lambda r=runner, h=history, c=cand: r.score(r.encode(h), h, c),
            }
            for name, peer in (peers or {}).items():
                calls[name] = lambda r=peer, h=history, c=cand: r.score(r.encode(h), h, c)
            if progress:
                progress(f"U={u} M={m}: {', '.join(calls)}, {warmup} warm-up + {repetitions} timed each"
                         + (f" (naive on {sample} candidates per user, scaled)" if sample < m else ""))
            seconds = time_interleaved(calls, warmup=warmup, repetitions=repetitions)
            naive_s = [t * m / sample for t in seconds.pop("naive")]
            split_s = seconds.pop("split")
            result.points.append(BenchPoint(
                m, Latency.of(naive_s), Latency.of(split_s), users=u, naive_sampled=sample if sample < m else None,
                peers={name: Latency.of(t) for name, t in seconds.items()}))
    return result


def _machine_line(result: BenchResult) -> str:
    m = result.machine
    if not m:
        return ""
    versions = ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items() if v)
    load = m.get("load_average_at_start")
    load_text = f"; load average at start {load[0]:.2f} (other processes share the cores)" if load else ""
    return (f"Machine: {m.get('cpu')}, {m.get('usable_cores')} usable of {m.get('logical_cores')} logical cores, "
            f"{m.get('threads') or 'default'} threads; Python {m.get('python')}, {versions}{load_text}.\n")


def bench_markdown(result: BenchResult, plot_name: str) -> str:
    c = result.config
    peers = list(dict.fromkeys(name for p in result.points for name in p.peers))
    rows = []
    for p in result.points:
        naive = f"{p.naive.p50:.2f}" + ("*" if p.naive_sampled else "")
        row = [p.users, p.candidates, naive, p.split.p50, p.split.p90, p.split.p99,
               f"{p.naive_per_second:,.0f}", f"{p.split_per_second:,.0f}", f"{p.gain:.1f}x",
               f"{result.predicted_gain(p.candidates):.0f}x", f"{result.predicted_gain(p.candidates, head=True):.0f}x"]
        for name in peers:
            row += [f"{p.peers[name].p50:.2f}", f"{p.speedup_over(name):.2f}x"] if name in p.peers else ["", ""]
        rows.append(row)
    headers = ["users", "M", "naive p50 ms", "split p50 ms", "p90", "p99", "naive cand/s", "split cand/s", "gain",
               "arithmetic", "with head"]
    for name in peers:
        headers += [f"{name} split p50 ms", f"{result.runtime} vs {name}"]
    sampled = [p for p in result.points if p.naive_sampled]
    sample_note = ("\n\\* naive timed on the first "
                   + ", ".join(f"{p.naive_sampled} (U={p.users}, M={p.candidates})" for p in sampled)
                   + " candidates per user and scaled to M: it shares no work between candidates, and one call "
                     "over every pair would not fit the memory budget.\n") if sampled else ""
    notes = "".join(f"- {name}: {note}\n" for name, note in result.peer_notes.items())
    return f"""# astro-trt bench: split vs naive

Config `{c.name}`: d={c.d_model}, H={c.num_heads}, N_L={c.num_layers}, Nb={c.num_blocks}, L={c.max_len},
T={c.num_tasks}. Runtime `{result.runtime}` ({result.precision}, {result.threads or 'default'} threads),
graphs from {result.source}. One request = U users with M candidates each; latencies per request over
{result.repetitions} timed repetitions after {result.warmup} warm-up, all paths in turn.
{_machine_line(result)}
{markdown_table(headers, rows)}
{sample_note}
"arithmetic" counts multiply-adds without the fusion head (identical in both paths), "with head"
with it: the second is what equal efficiency of both paths would give. A peer column is the same
split (encoder + scorer) in that runtime on the same requests; "{result.runtime} vs" is how many
times faster this runtime's split is.
{notes}
![throughput vs candidates]({plot_name})

{ceiling_markdown(result.ceiling, result.threads)}{_profile_markdown(result)}{_gap_explanation(result)}
"""


def ceiling_markdown(ceiling: Mapping[str, Any], threads: int | None) -> str:
    """The int8 report section (validate/ceiling.py's figures): one row per timed thing and M."""
    if not ceiling:
        return ""
    rows = []
    for point, figures in ceiling.items():
        for name, ms in figures["ms"].items():
            shares = [f"{v * 100:.0f}% of {k.split(' of ')[1]}" for k, v in figures["share"].items()
                      if k.startswith(f"{name} of ")]
            rows.append((point, name, f"{ms:.2f}", f"{figures['gops'][name]:.1f}", "; ".join(shares)))
    speedups = "; ".join(f"{p}: {f['int8_speedup']:.2f}x (Amdahl estimate from the bare rates: "
                         f"{f['int8_estimate']:.2f}x)" for p, f in ceiling.items() if "int8_speedup" in f)
    return ("## The int8 scorer against its ceiling (one user, same run)\n\n"
            f"Scorers and bare MatMuls timed in turn, {threads or 'default'} ONNX Runtime thread(s); GOP/s "
            "counts two operations per multiply-add (the scorer's by the arithmetic above, with the head). "
            "The bare MatMuls are the scorer's per-token weight products at its shapes: q, k, v, "
            "the FFN's two, called until they do the scorer's multiply-adds (ms is for all the calls). "
            "The Amdahl estimate: the fp32 scorer with its weight multiply-adds at the bare int8 instead of "
            "the bare fp32 rate and everything else unchanged (validate/ceiling.py).\n\n"
            + markdown_table(["point", "timed", "ms", "GOP/s", "share of the bare rate"], rows)
            + (f"\n\nint8 scorer over the fp32 scorer: {speedups}.\n\n" if speedups else "\n\n"))


def _profile_markdown(result: BenchResult) -> str:
    if not result.profile:
        return ""
    parts = ["## Where the time goes (ONNX Runtime profile, per operator type)\n\n"
             "Each graph run 3 times; per node the fastest run, summed by operator type.\n"]
    for point, graphs in result.profile.items():
        for graph, prof in graphs.items():
            rows = [(op, f"{us / 1e3:.3f}", f"{us / max(prof['total_us'], 1) * 100:.1f}%")
                    for op, us in prof["ops"][:12]]
            parts.append(f"\n### {point}, {graph}: {prof['total_us'] / 1e3:.2f} ms in {prof['nodes']} nodes\n\n"
                         + markdown_table(["operator", "ms", "share"], rows) + "\n")
    return "".join(parts) + "\n"


def _gap_explanation(result: BenchResult) -> str:
    """The section that explains measured gain against the arithmetic; its heading follows the
    figures, since small configs can beat the arithmetic (the naive path's attention tensors are
    memory-bound) while large ones fall short of it."""
    c = result.config
    below = [p.candidates for p in result.points if p.gain < result.predicted_gain(p.candidates)]
    above = [p.candidates for p in result.points if p.candidates not in below]
    heading = (
        "## Why the measured gain is below the arithmetic" if not above else
        "## Measured gain against the arithmetic\n\n"
        f"Above the arithmetic at M = {', '.join(map(str, above))}: the naive path materializes attention "
        "scores and biases of shape [M, Nb, H, L+1, L+1] per layer, so it is bound by memory traffic, not "
        "by multiply-adds." + (f" Below it at M = {', '.join(map(str, below))}, for the reasons that follow."
                               if below else "")
    )
    return heading + f"""

The "arithmetic" column counts multiply-adds (docs/model.md §6): per candidate and layer the naive path
pushes L+1 = {c.max_len + 1} tokens per block through projections and FFN (~(L+1)·d² each) and
attention (~(L+1)²·d), the split pushes one token that attends to L+1 keys (~d² + (L+1)·d), and
the user encoder runs once per request. So the naive path does about L+1 times the work per
candidate. Where measured gains fall short of it, the reasons are:

- the split's per-candidate work is small matrix-vector-like products (one token per block), which
  run far below the machine's peak, while the naive path runs large, efficient GEMMs;
- the split pays fixed costs per request that do not shrink with M: the encoder, two session calls
  instead of one, and the kv_cache crossing from one graph to the next (here a host copy);
- the fusion head and embedding lookups cost the same per candidate in both paths, which caps the
  ratio (Amdahl);
- at small M the split's fixed costs dominate; the gain grows with M until the scorer's per-candidate
  cost dominates.
"""


def bench_series(result: BenchResult) -> Mapping[str, tuple[list[int], list[float]]]:
    series: dict[str, tuple[list[int], list[float]]] = {}
    for u in dict.fromkeys(p.users for p in result.points):
        points = [p for p in result.points if p.users == u]
        xs = [p.candidates for p in points]
        tag = f", {u} user{'s' if u > 1 else ''}/request"
        series[f"naive (full model per pair){tag}"] = (xs, [p.naive_per_second for p in points])
        series[f"split (encode once + score M){tag}"] = (xs, [p.split_per_second for p in points])
        for name in dict.fromkeys(n for p in points for n in p.peers):
            with_peer = [p for p in points if name in p.peers]
            series[f"{name} split{tag}"] = ([p.candidates for p in with_peer],
                                            [p.per_second(p.peers[name]) for p in with_peer])
    return series


BENCH_REPORT = "bench"  # the folder of a bundle's reports/ that `astro-trt bench` writes


def bench_files(result: BenchResult) -> dict[str, bytes]:
    """bench.{json,md,png}, rendered."""
    title = f"{result.config.name} on {result.runtime} ({result.precision})"
    return {
        "bench.json": json_bytes(result.to_dict()),
        "bench.md": bench_markdown(result, "bench.png").encode(),
        "bench.png": plot_throughput(bench_series(result), title),
    }


def write_bench_reports(result: BenchResult, reports_dir: Path) -> dict[str, Path]:
    """The bench report in a plain directory; {"json", "md", "png"} -> path."""
    return by_kind(write_files(reports_dir, bench_files(result)))


def write_bench_to_bundle(result: BenchResult, bundle_dir: Path) -> dict[str, Path]:
    """The bench report under BUNDLE/reports/bench/, recorded in the manifest."""
    files = bench_files(result)
    return by_kind(dict(zip(files, write_report(bundle_dir, BENCH_REPORT, files), strict=True)))


__all__ = [
    "BenchPoint", "BenchResult", "DEFAULT_CANDIDATES", "DEFAULT_USERS", "Latency", "bench_markdown", "machine_info",
    "naive_pairs_limit", "parse_candidates", "parse_users", "run_bench", "time_interleaved",
    "write_bench_reports", "write_bench_to_bundle",
]


def operator_profile(trace: Path, graph_runs: int) -> dict[str, Any]:
    """An ONNX Runtime profile file -> {"total_us", "nodes", "ops": [(op type, us), ...]}, per node
    the fastest of its runs (the others shared the cores with whatever else ran), summed by type."""
    events = json.loads(Path(trace).read_text())
    per_node: dict[str, list[float]] = {}
    op_of: dict[str, str] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per_node.setdefault(e["name"], []).append(float(e["dur"]))
            op_of[e["name"]] = e["args"]["op_name"]
    by_op: dict[str, float] = {}
    for name, durations in per_node.items():
        by_op[op_of[name]] = by_op.get(op_of[name], 0.0) + min(durations[-graph_runs:])
    ops = sorted(by_op.items(), key=lambda kv: -kv[1])
    return {"total_us": sum(by_op.values()), "nodes": len(per_node), "ops": ops}


def profile_ort(
    graphs: Mapping[str, Path], cfg: ASTROConfig, precision: str, candidates: Sequence[int], *,
    threads: int | None = None, naive_pairs: int | None = None, runs: int = 3, seed: int = 0, item_table: Any = None,
) -> dict[str, Any]:
    """Per-operator breakdown of the encoder, scorer and full model at each M (one user), from
    separate profiling sessions so that the timed sessions run without the profiler; ``item_table``
    looks the requests' item ids up (the runner's own)."""
    limit = naive_pairs or naive_pairs_limit(cfg)
    out: dict[str, Any] = {}
    for m in candidates:
        batch = synthetic_batch(cfg, 1, m, seed=seed + m, empty_block_prob=0.0)
        with tempfile.TemporaryDirectory(prefix="astro-profile-") as tmp:
            runner = OrtRunner(graphs, cfg, precision, threads or ORT_THREADS, profile_dir=Path(tmp),
                               unchunked_full=True, item_table=item_table)
            naive_cand = batch.cand_items[:, :min(m, limit)]
            for _ in range(runs):
                kv = runner.encode(batch.history)
                runner.score(kv, batch.history, batch.cand_items)
                runner.full(batch.history, naive_cand)
            traces = runner.end_profiling()
            label = f"M={m}" + (f" (naive on {naive_cand.shape[1]})" if naive_cand.shape[1] < m else "")
            out[label] = {g: operator_profile(traces[g], runs) for g in GRAPHS}
    return out
