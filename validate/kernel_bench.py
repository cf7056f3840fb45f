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
from astro_trt.validate.kernel_cases import IMPLS, Case
from astro_trt.validate.kernel_impls import implementations, make_inputs

# name fragment -> (dense fp16/bf16 tensor-core FLOP/s, HBM bytes/s), from the vendors' data sheets
# (NVIDIA H100 Tensor Core GPU datasheet: SXM 989 TFLOPS dense fp16/bf16 tensor, 3.35 TB/s HBM3; NVIDIA
# H200 datasheet: the same compute, 4.8 TB/s HBM3e; the datasheets' 1,979 TFLOPS are with sparsity).
PEAKS: dict[str, tuple[float, float]] = {
    "H100 PCIe": (756e12, 2.0e12),
    "H100 NVL": (835e12, 3.9e12),
    "H100": (989e12, 3.35e12),
    "H200": (989e12, 4.8e12),
    "A100": (312e12, 2.0e12),
}
INDEX_BYTES = 8  # times, lengths and thresholds are int64
# The GPUs every kernel and the split get a predicted time for, before any measurement (PEAKS keys).
PREDICTED_ON = ("H100", "H200")
# float32 kernels multiply in IEEE fp32 on the CUDA cores (no TF32): H100 SXM and H200 67 TFLOPS.
FP32_FLOPS = {"H100": 67e12, "H200": 67e12}
# What a kernel must reach of the bound that limits it (docs/kernels.md).
GOALS = {"memory": 0.90, "compute": 0.60}


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


@dataclass(frozen=True)
class Prediction:
    """Time of ``flops`` and ``moved`` bytes on ``device`` at its peaks: whichever bound is slower."""

    device: str
    seconds: float
    bound: str  # "memory" or "compute"

    @property
    def goal_seconds(self) -> float:
        """The time at the goal fraction of the bounding peak (GOALS): slower than this misses the goal."""
        return self.seconds / GOALS[self.bound]


def predict(flops: float, moved: float, device: str, dtype: str) -> Prediction:
    peak_flops, peak_bw = PEAKS[device]
    if dtype == "fp32":
        peak_flops = FP32_FLOPS[device]
    memory, compute = moved / peak_bw, flops / peak_flops
    return Prediction(device, max(memory, compute), "memory" if memory >= compute else "compute")


@dataclass(frozen=True)
class Predicted:
    """One row of the predicted table: a kernel case or one half of the split, with its cost."""

    config: str
    what: str  # "msa", "candidate", "encoder", "scorer"
    cands: int
    flops: float
    moved: float
    predictions: tuple[Prediction, ...]
    measured_ms: float | None = None  # filled only by a GPU run


def predicted_kernels(cases_: list[Case], dtype: str, measured: dict[Case, float] | None = None) -> list[Predicted]:
    rows = []
    for case in cases_:
        flops, moved = cost(case, dtype)
        rows.append(Predicted(case.config, case.op, case.cands, flops, moved,
                              tuple(predict(flops, moved, d, dtype) for d in PREDICTED_ON),
                              (measured or {}).get(case)))
    return rows


def split_cost(cfg, users: int, candidates: int, dtype: str) -> dict[str, tuple[float, float]]:
    """(FLOPs, bytes) of the user encoder (``users`` histories) and of the item scorer (``candidates``
    per user), by the arithmetic of docs/model.md §6 (BenchResult.predicted_gain's terms, in FLOPs =
    2 multiply-adds): per layer and block, q/k/v projections and FFN per token, attention 4 d per
    visible pair; the scorer adds the fusion head per candidate. Bytes: the dense weights read once,
    the token embeddings read, the KV cache written by the encoder and read once per user by the
    scorer, logits written in fp32."""
    e = get(dtype).bytes
    length, d, f, nb = cfg.max_len, cfg.d_model, cfg.ffn_dim, cfg.num_blocks
    per_token = 3 * d * d + 2 * d * f
    stacks = cfg.num_layers * nb
    head_macs = nb * per_token + 2 * nb * d * cfg.fuse_hidden + nb * d * d + d * cfg.num_tasks
    head_weights = per_token + 2 * nb * d * cfg.fuse_hidden + nb * d * d + d * cfg.num_tasks
    kv = stacks * 2 * users * length * d * e
    encoder_flops = users * stacks * (2 * length * per_token + 4 * d * length * (length + 1) / 2)
    encoder_bytes = stacks * per_token * e + users * nb * length * d * e + kv
    scored = users * candidates
    scorer_flops = scored * (stacks * (2 * per_token + 4 * d * (length + 1)) + 2 * head_macs)
    scorer_bytes = (stacks * per_token + head_weights) * e + kv + scored * d * e + scored * cfg.num_tasks * 4
    return {"encoder": (float(encoder_flops), float(encoder_bytes)),
            "scorer": (float(scorer_flops), float(scorer_bytes))}


def predicted_split(configs: list[str], candidates: list[int], users: int, dtype: str) -> list[Predicted]:
    rows = []
    for name in configs:
        cfg = preset(name)
        for m in candidates:
            for what, (flops, moved) in split_cost(cfg, users, m, dtype).items():
                if what == "encoder" and m != candidates[0]:
                    continue  # the encoder does not depend on M: one row per preset
                rows.append(Predicted(name, what, 0 if what == "encoder" else m, flops, moved,
                                      tuple(predict(flops, moved, d, dtype) for d in PREDICTED_ON)))
    return rows


def format_predicted(rows: list[Predicted]) -> str:
    """The predicted table: cost, time at each device's peaks and at the goal, and the measured column."""
    header = ("config", "what", "M", "GFLOP", "MB", "FLOP/B", *(f"{d} us" for d in PREDICTED_ON), "bound",
              *(f"{d} goal us" for d in PREDICTED_ON), "measured us")
    out = [header]
    for r in rows:
        out.append((r.config, r.what, str(r.cands) if r.cands else "-", f"{r.flops / 1e9:.3f}", f"{r.moved / 1e6:.2f}",
                    f"{r.flops / r.moved:.1f}", *(f"{p.seconds * 1e6:.2f}" for p in r.predictions),
                    "/".join(dict.fromkeys(p.bound for p in r.predictions)),
                    *(f"{p.goal_seconds * 1e6:.2f}" for p in r.predictions),
                    "" if r.measured_ms is None else f"{r.measured_ms * 1e3:.2f}"))
    widths = [max(len(row[i]) for row in out) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in out)


def predicted_json(rows: list[Predicted]) -> list[dict]:
    return [{**{k: v for k, v in asdict(r).items() if k != "predictions"},
             "predicted": {p.device: {"us": p.seconds * 1e6, "bound": p.bound, "goal_us": p.goal_seconds * 1e6}
                           for p in r.predictions}} for r in rows]


def measured_triton(results: list[Result]) -> dict[Case, float]:
    """The Triton kernels' measured milliseconds by case, for the predicted table's measured column."""
    return {r.case: r.ms for r in results if r.impl == "triton" and r.ms is not None}


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
                  warmup: int = 3, repeat: int = 20, dense_mask_limit_gib: float = 4.0,
                  impls: tuple[str, ...] = IMPLS) -> list[Result]:
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
        for impl, fn, dense_bytes in implementations(case, args, impls):
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
