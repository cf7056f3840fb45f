"""Throughput of the split (encode the user once, score M candidates against the cache) against
the naive path (the full model: one sequence [history ; candidate] per pair), in the same
runtime and the same process, on synthetic requests at the configured sizes.

One request is one user with M candidates. Both paths are timed alternately, repetition by
repetition, so that drift of the machine (other processes, frequency) hits both alike; warm-up
calls are excluded."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from astro_trt.config import ASTROConfig
from astro_trt.errors import DataError

DEFAULT_CANDIDATES = (64, 256, 1024)


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
    candidates: int
    naive: Latency
    split: Latency

    @property
    def naive_per_second(self) -> float:
        """Candidates scored per second at the median latency."""
        return self.candidates / (self.naive.p50 / 1e3)

    @property
    def split_per_second(self) -> float:
        return self.candidates / (self.split.p50 / 1e3)

    @property
    def gain(self) -> float:
        """How many times more candidates per second the split scores (median latencies)."""
        return self.naive.p50 / self.split.p50

    def to_dict(self) -> dict[str, Any]:
        return {
            "candidates": self.candidates, "naive_ms": asdict(self.naive), "split_ms": asdict(self.split),
            "naive_candidates_per_s": self.naive_per_second, "split_candidates_per_s": self.split_per_second,
            "gain": self.gain,
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

    def predicted_gain(self, candidates: int) -> float:
        """ASTRO's arithmetic (docs/model.md §6): per candidate and layer the naive path processes
        L+1 tokens per block (projections and FFN ~ (L+1) d^2, attention ~ (L+1)^2 d) where the
        scorer processes one token attending to L+1 keys (~ d^2 + (L+1) d); the encoder runs once
        per request (~ L d^2 + L^2 d). The fusion head, identical in both, is left out."""
        c = self.config
        length, d, f = c.max_len, c.d_model, c.ffn_dim
        tokens_cost = 3 * d * d + 2 * d * f  # q, k, v projections + FFN, per token (no W_O)
        naive = candidates * ((length + 1) * tokens_cost + (length + 1) ** 2 * 2 * d)
        split = candidates * (tokens_cost + (length + 1) * 2 * d) + length * tokens_cost + length**2 * 2 * d
        return naive / split

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(), "runtime": self.runtime, "precision": self.precision,
            "source": self.source, "warmup": self.warmup, "repetitions": self.repetitions, "threads": self.threads,
            "points": [dict(p.to_dict(), predicted_gain=self.predicted_gain(p.candidates)) for p in self.points],
        }


def time_alternating(
    naive: Callable[[], Any], split: Callable[[], Any], *, warmup: int, repetitions: int
) -> tuple[list[float], list[float]]:
    """Seconds per call of each, timed alternately after ``warmup`` untimed calls of each."""
    if repetitions < 1 or warmup < 0:
        raise DataError(f"need repetitions >= 1 and warmup >= 0, got {repetitions} and {warmup}")
    for _ in range(warmup):
        naive()
        split()
    naive_s, split_s = [], []
    for _ in range(repetitions):
        start = time.perf_counter()
        naive()
        naive_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        split()
        split_s.append(time.perf_counter() - start)
    return naive_s, split_s


def parse_candidates(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DataError(f"--candidates '{text}': expected comma-separated integers such as 64,256,1024") from None
    if not values or any(v < 1 for v in values):
        raise DataError(f"--candidates '{text}': every count must be a positive integer")
    return values


def run_bench(
    runner: Any,
    cfg: ASTROConfig,
    candidates: Sequence[int] = DEFAULT_CANDIDATES,
    *,
    source: str,
    warmup: int = 1,
    repetitions: int = 5,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> BenchResult:
    """Time ``runner`` (validate.runners: encode/score/full) on one synthetic user per request."""
    from astro_trt.model.synthetic import synthetic_batch

    result = BenchResult(cfg, runner.runtime, runner.precision, source, warmup, repetitions,
                         getattr(runner, "threads", None))
    for m in candidates:
        # Every slot a real candidate: padded slots would cost the same and count as nothing.
        batch = synthetic_batch(cfg, 1, m, seed=seed + m, empty_block_prob=0.0)
        history, cand = batch.history, batch.cand_items
        if progress:
            progress(f"M={m}: naive and split, {warmup} warm-up + {repetitions} timed each")
        naive_s, split_s = time_alternating(
            lambda h=history, c=cand: runner.full(h, c),
            lambda h=history, c=cand: runner.score(runner.encode(h), h, c),
            warmup=warmup, repetitions=repetitions,
        )
        result.points.append(BenchPoint(m, Latency.of(naive_s), Latency.of(split_s)))
    return result


def bench_markdown(result: BenchResult, plot_name: str) -> str:
    from astro_trt.validate.report import markdown_table

    c = result.config
    rows = [
        (p.candidates, p.naive.p50, p.naive.p90, p.naive.p99, p.split.p50, p.split.p90, p.split.p99,
         f"{p.naive_per_second:,.0f}", f"{p.split_per_second:,.0f}", f"{p.gain:.1f}x",
         f"{result.predicted_gain(p.candidates):.0f}x")
        for p in result.points
    ]
    table = markdown_table(
        ["M", "naive p50 ms", "p90", "p99", "split p50 ms", "p90", "p99", "naive cand/s", "split cand/s",
         "gain", "arithmetic"], rows)
    return f"""# astro-trt bench: split vs naive

Config `{c.name}`: d={c.d_model}, H={c.num_heads}, N_L={c.num_layers}, Nb={c.num_blocks}, L={c.max_len},
T={c.num_tasks}. Runtime `{result.runtime}` ({result.precision}, {result.threads or 'default'} threads),
graphs from {result.source}. One request = one user with M candidates; latencies per request over
{result.repetitions} timed repetitions after {result.warmup} warm-up, naive and split alternating.

{table}

![throughput vs candidates]({plot_name})

{_gap_explanation(result)}
"""


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
    xs = [p.candidates for p in result.points]
    return {
        "naive (full model per pair)": (xs, [p.naive_per_second for p in result.points]),
        "split (encode once + score M)": (xs, [p.split_per_second for p in result.points]),
    }


BENCH_REPORT = "bench"  # the folder of a bundle's reports/ that `astro-trt bench` writes


def bench_files(result: BenchResult) -> dict[str, bytes]:
    """bench.{json,md,png}, rendered."""
    from astro_trt.validate.report import json_bytes, plot_throughput

    title = f"{result.config.name} on {result.runtime} ({result.precision})"
    return {
        "bench.json": json_bytes(result.to_dict()),
        "bench.md": bench_markdown(result, "bench.png").encode(),
        "bench.png": plot_throughput(bench_series(result), title),
    }


def write_bench_reports(result: BenchResult, reports_dir: Path) -> dict[str, Path]:
    """The bench report in a plain directory; {"json", "md", "png"} -> path."""
    from astro_trt.validate.report import by_kind, write_files

    return by_kind(write_files(reports_dir, bench_files(result)))


def write_bench_to_bundle(result: BenchResult, bundle_dir: Path) -> dict[str, Path]:
    """The bench report under BUNDLE/reports/bench/, recorded in the manifest."""
    from astro_trt.engines.bundle import write_report
    from astro_trt.validate.report import by_kind

    files = bench_files(result)
    return by_kind(dict(zip(files, write_report(bundle_dir, BENCH_REPORT, files), strict=True)))


__all__ = [
    "BenchPoint", "BenchResult", "DEFAULT_CANDIDATES", "Latency", "bench_markdown", "parse_candidates", "run_bench",
    "time_alternating", "write_bench_reports", "write_bench_to_bundle",
]
