"""Peak resident memory of ONNX Runtime running the full model, measured where nothing else lives.

Each figure comes from a fresh child process (``python -m astro_trt.validate.peak_memory``) that
imports only numpy and onnxruntime, makes one CPU session, runs the graph ``runs`` times and
reports its own peak RSS: VmHWM of /proc/self/status, the high-water mark of the address space
exec made, which is what ``/usr/bin/time -v`` calls "Maximum resident set size" of a small parent.
(``getrusage`` would not do: Linux carries the forking parent's peak over into the child's, so the
figure would be the parent's torch and model.) torch, the exporter and the parent's arrays never
count. Two graphs are compared in one
run: the exported full model (a Loop over chunks of pairs, exporter/pair_chunks.py) and its plain
graph (every pair at once), each with ONNX Runtime's memory pattern on (its default) and off
(what OrtRunner uses for the full model).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from astro_trt import arguments, contract
from astro_trt.config import ASTROConfig
from astro_trt.errors import DataError
from astro_trt.lazy import lazy_import
from astro_trt.ort_session import onnx_session
from astro_trt.settings import BENCH_THREADS

# The parent exports the graphs with torch; the probe (``_child``, this module run as a fresh
# process) must load only numpy and onnxruntime, so everything else is named lazily.
torch = lazy_import("torch")
astro = lazy_import("astro_trt.model.astro")
synthetic = lazy_import("astro_trt.model.synthetic")
export = lazy_import("astro_trt.exporter.export")
graphs_module = lazy_import("astro_trt.exporter.graphs")
pair_chunks = lazy_import("astro_trt.exporter.pair_chunks")
bench = lazy_import("astro_trt.validate.bench")
resources = lazy_import("astro_trt.model.resources")


@dataclass(frozen=True)
class MemoryPoint:
    graph: str  # "exported" (the file) | "ort-prepared" (as OrtRunner runs it) | "plain" (no Loop)
    memory_pattern: bool
    peak_rss_bytes: int
    loaded_rss_bytes: int  # after the session is made, before the first run
    median_ms: float
    max_abs_vs_torch: float
    heavy_modules: tuple[str, ...] = ()  # what the probe loaded besides numpy and onnxruntime: none


def measure(graph: Path | str, feeds: Path, *, runs: int, threads: int, memory_pattern: bool,
            timeout: float = 1800.0) -> dict[str, Any]:
    """One child process over ``graph`` and the arrays in ``feeds`` (.npz, 'reference' = the
    PyTorch logits); its JSON line."""
    cmd = [sys.executable, "-m", "astro_trt.validate.peak_memory", str(graph), str(feeds), str(runs), str(threads),
           "1" if memory_pattern else "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise DataError(f"the memory probe failed (exit {done.returncode}): {done.stderr.strip()[-400:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def full_model_memory(cfg: ASTROConfig, *, users: int, candidates: int, runs: int = 5, threads: int = BENCH_THREADS,
                      plain: bool = True, seed: int = 0,
                      progress: Callable[[str], None] | None = None) -> list[MemoryPoint]:
    """Export a random ``cfg`` model's full model (fp32) and measure it on ``users`` x
    ``candidates``; ``plain`` adds its unchunked graph (refused up front where the estimate says
    it cannot fit this machine)."""
    say = progress or (lambda _msg: None)
    arguments.threads(threads, "--threads")
    resources.check_fits(cfg, users=users, candidates=candidates, purpose="the memory probe", full=False,
                         error=DataError)
    if plain:
        resources.check_fits(cfg, users=users, candidates=candidates, purpose="the plain full model (pass --no-plain)",
                   error=DataError)
    torch.manual_seed(seed)
    model = astro.ASTRO(cfg).eval()
    batch = synthetic.synthetic_batch(cfg, users, candidates, seed=seed)
    with torch.no_grad():
        reference = model.full(batch.history, batch.cand_items).numpy()
    with tempfile.TemporaryDirectory(prefix="astro-memory-") as tmp:
        say(f"exporting a random {cfg.name} full model")
        path = export.export_onnx(model, Path(tmp), graphs=(contract.FULL_MODEL,)).paths[contract.FULL_MODEL]
        # Each form as its consumer gets it (exporter/pair_chunks.py runtime_form), saved for a fresh process.
        graphs = {"exported": path, "ort-prepared": Path(tmp) / "prepared.onnx"}
        graphs["ort-prepared"].write_bytes(pair_chunks.runtime_form(path, "onnxruntime"))
        if plain:
            graphs["plain"] = Path(tmp) / "plain.onnx"
            graphs["plain"].write_bytes(pair_chunks.runtime_form(path, "onnxruntime-plain"))
        feeds = Path(tmp) / "feeds.npz"
        # The graph's own inputs: the item rows looked up as every runner looks them up.
        tensors = graphs_module.with_item_rows(model, graphs_module.named_tensors(batch.history, batch.cand_items))
        arrays = {t.name: tensors[t.name].numpy() for t in contract.graph_io(cfg, "fp32")[contract.FULL_MODEL].inputs}
        np.savez(feeds, reference=reference, **arrays)
        points = []
        for name, graph in graphs.items():
            for pattern in (True, False):
                say(f"{name} graph, memory pattern {'on' if pattern else 'off'}: {runs} runs in a fresh process")
                got = measure(graph, feeds, runs=runs, threads=threads, memory_pattern=pattern)
                points.append(MemoryPoint(name, pattern, got["peak_rss_bytes"], got["loaded_rss_bytes"],
                                          got["median_ms"], got["max_abs_vs_torch"], tuple(got["heavy_modules"])))
    return points


def to_json(cfg: ASTROConfig, users: int, candidates: int, points: Sequence[MemoryPoint]) -> dict[str, Any]:
    return {"config": cfg.name, "users": users, "candidates": candidates,
            "pairs_per_chunk": pair_chunks.full_model_pairs_per_chunk(cfg), "machine": bench.machine_info(1),
            "points": [asdict(p) for p in points]}


def _child(graph: str, feeds: str, runs: int, threads: int, memory_pattern: bool) -> dict[str, Any]:
    """The probe itself: numpy and onnxruntime only (the session made as everywhere else)."""
    arrays = dict(np.load(feeds))
    reference = arrays.pop("reference")
    session = onnx_session(graph, threads, memory_pattern=memory_pattern)
    loaded = _high_water_bytes()
    times, out = [], None
    for _ in range(runs):
        start = time.perf_counter()
        out = session.run(None, arrays)[0]
        times.append(time.perf_counter() - start)
    return {"peak_rss_bytes": _high_water_bytes(), "loaded_rss_bytes": loaded,
            "median_ms": float(np.median(times)) * 1e3,
            "max_abs_vs_torch": float(np.abs(out.astype(np.float32) - reference).max()),
            "heavy_modules": sorted(m for m in ("torch", "onnx", "astro_trt.model") if m in sys.modules)}


def _high_water_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status: the memory probe needs Linux")


if __name__ == "__main__":
    graph_arg, feeds_arg, runs_arg, threads_arg, pattern_arg = sys.argv[1:6]
    print(json.dumps(_child(graph_arg, feeds_arg, int(runs_arg), int(threads_arg), pattern_arg == "1")))
