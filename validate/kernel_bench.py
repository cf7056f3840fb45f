"""Kernel benchmark: the Triton kernels against the PyTorch reference, torch SDPA with an equivalent
dense mask, and FlexAttention (block mask + score_mod), on the docs/model.md §7 shapes.

FLOPs and bytes are analytic (what the operator must do with full histories, not what an
implementation happens to do), so achieved TFLOP/s and GB/s compare implementations fairly. The
accounting and the table are plain Python; only ``run_benchmark`` needs a GPU.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from astro_trt.config import preset
from astro_trt.errors import BackendError
from astro_trt.precision import get
from astro_trt.validate.kernel_cases import Case
from astro_trt.validate.kernel_impls import implementations, make_inputs

# name fragment -> (dense fp16/bf16 tensor-core FLOP/s, HBM bytes/s), from the vendors' data sheets.
PEAKS: dict[str, tuple[float, float]] = {
    "H100 PCIe": (756e12, 2.0e12),
    "H100 NVL": (835e12, 3.9e12),
    "H100": (989e12, 3.35e12),
    "H200": (989e12, 4.8e12),
    "A100": (312e12, 2.0e12),
}
INDEX_BYTES = 8  # times, lengths and thresholds are int64


@dataclass(frozen=True)
class Result:
    case: Case
    impl: str
    ms: float | None  # None: skipped (see note)
    tflops: float | None = None
    gbps: float | None = None
    flop_frac: float | None = None
    bw_frac: float | None = None
    note: str = ""


def cases(configs: list[str], candidates: list[int], batch: int) -> list[Case]:
    out = []
    for name in configs:
        cfg = preset(name)
        shape = dict(config=name, batch=batch, blocks=cfg.num_blocks, heads=cfg.num_heads, hist=cfg.max_len,
                     head_dim=cfg.head_dim)
        out.append(Case(op="msa", **shape))
        out.extend(Case(op="candidate", cands=m, **shape) for m in candidates)
    return out


def cost(case: Case, dtype: str) -> tuple[float, float]:
    """(FLOPs, bytes) the operator needs with every history slot valid.

    FLOPs count QK^T and PV (2 * dh each per visible query-key pair): the causal self-attention has
    L(L+1)/2 pairs, each candidate L + 1 (its history and itself). Bytes: every activation read once
    and the output written once, plus event times; bias tables and temperatures are negligible.
    """
    e = get(dtype).bytes
    bnh = case.batch * case.blocks * case.heads
    times = case.batch * case.blocks * case.hist * INDEX_BYTES
    if case.op == "msa":
        pairs = case.hist * (case.hist + 1) / 2
        moved = 4 * bnh * case.hist * case.head_dim * e + times
    else:
        pairs = case.cands * (case.hist + 1)
        moved = (4 * case.cands + 2 * case.hist) * bnh * case.head_dim * e + times
    return 4.0 * case.head_dim * pairs * bnh, float(moved)


def peak_for(device_name: str, bandwidth_fallback: float | None = None) -> tuple[float | None, float | None]:
    """(peak FLOP/s, peak bytes/s) of a device by name; unknown devices get only the fallback bandwidth."""
    for fragment, peak in PEAKS.items():  # most specific first (dict order)
        if fragment.lower() in device_name.lower():
            return peak
    return None, bandwidth_fallback


def make_result(case: Case, impl: str, ms: float | None, dtype: str, peak: tuple[float | None, float | None],
                note: str = "") -> Result:
    if ms is None:
        return Result(case, impl, None, note=note)
    flops, moved = cost(case, dtype)
    tflops, gbps = flops / (ms * 1e-3) / 1e12, moved / (ms * 1e-3) / 1e9
    flop_frac = tflops * 1e12 / peak[0] if peak[0] else None
    bw_frac = gbps * 1e9 / peak[1] if peak[1] else None
    return Result(case, impl, ms, tflops, gbps, flop_frac, bw_frac, note)


def format_table(results: list[Result]) -> str:
    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    header = ("config", "op", "M", "impl", "ms", "TFLOP/s", "GB/s", "%peak FLOP", "%peak BW", "note")
    rows = [header]
    for r in results:
        c = r.case
        rows.append((c.config, c.op, str(c.cands) if c.op == "candidate" else "-", r.impl, num(r.ms, ".4f"),
                     num(r.tflops, ".2f"), num(r.gbps, ".1f"),
                     num(None if r.flop_frac is None else 100 * r.flop_frac, ".1f"),
                     num(None if r.bw_frac is None else 100 * r.bw_frac, ".1f"), r.note))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def results_json(results: list[Result]) -> list[dict]:
    return [asdict(r) for r in results]


# ---------------------------------------------------------------------------------------- GPU part
def _time_ms(fn: Callable[[], object], warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def run_benchmark(configs: list[str], candidates: list[int], dtype: str = "fp16", batch: int = 8,
                  warmup: int = 3, repeat: int = 20, dense_mask_limit_gib: float = 4.0) -> list[Result]:
    if not torch.cuda.is_available():
        raise BackendError("bench-kernels times CUDA kernels and needs an NVIDIA GPU; none is visible here "
                           "(run it on a machine with a GPU)")

    props = torch.cuda.get_device_properties(0)
    bandwidth = None
    if getattr(props, "memory_clock_rate", 0) and getattr(props, "memory_bus_width", 0):
        bandwidth = 2 * props.memory_clock_rate * 1e3 * props.memory_bus_width / 8  # DDR: two transfers a clock
    peak = peak_for(props.name, bandwidth)

    results = []
    for case in cases(configs, candidates, batch):
        args = make_inputs(case, get(dtype).torch())
        for impl, fn, dense_bytes in implementations(case, args):
            if dense_bytes > dense_mask_limit_gib * 2**30:
                results.append(make_result(case, impl, None, dtype, peak,
                                           note=f"skipped: dense mask {dense_bytes / 2**30:.1f} GiB"))
                continue
            try:
                ms = _time_ms(fn, warmup, repeat)
            except Exception as exc:  # one failing baseline must not hide the others' numbers
                results.append(make_result(case, impl, None, dtype, peak, note=f"failed: {type(exc).__name__}"))
                torch.cuda.empty_cache()
                continue
            results.append(make_result(case, impl, ms, dtype, peak))
        del args
        torch.cuda.empty_cache()
    return results
