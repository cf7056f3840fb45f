"""The int8 scorer against its ceiling on this machine, measured in one run: the int8 and fp32
scorers (one user's cache, M candidates) and the bare MatMuls they are made of, fp32 ``MatMul``
and ONNX Runtime's int8 ``DynamicQuantizeMatMul``, at the scorer's own shapes, all timed in turn
(validate/bench.py ``time_interleaved``) so that drift of a shared machine hits them alike.

The scorer's rate is its multiply-adds by the bench's arithmetic (docs/model.md §6, fusion head
included) over its median time; a bare rate is the MatMuls' multiply-adds over theirs. The share
of the bare int8 rate says how much of the scorer's time is int8 arithmetic and how much is the
operators around it (attention, LayerNorm, GELU, bias adds), which stay float.

The estimate (``int8_estimate``) is the int8 speed-up Amdahl's law gives the scorer over the
measured rates while its float operators stay as they are: the fp32 scorer's time with its weight
multiply-adds re-timed from the bare fp32 rate to the bare int8 rate, everything else unchanged. It
assumes the scorer's MatMuls run at the bare rates (cache-resident weights, as the bare calls'
are); on the climber scorer the per-operator profile agrees with it (docs/precision.md).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from astro_trt.config import ASTROConfig
from astro_trt.exporter.quantize import dynamic_int8
from astro_trt.lazy import lazy_import
from astro_trt.model.synthetic import synthetic_batch
from astro_trt.ort_session import onnx_session
from astro_trt.validate.bench import time_interleaved

onnx = lazy_import("onnx")


def scorer_macs(cfg: ASTROConfig, candidates: int) -> int:
    """Multiply-adds of the scorer for one user and ``candidates`` (bench.py's arithmetic, with
    the fusion head): per candidate, layer and block the projections and FFN of one token and its
    attention over L+1 keys, then the fusion layer and the head."""
    d, f, nb = cfg.d_model, cfg.ffn_dim, cfg.num_blocks
    token = 3 * d * d + 2 * d * f
    fusion = nb * token + 2 * nb * d * cfg.fuse_hidden + nb * d * d + d * cfg.num_tasks
    return candidates * (cfg.num_layers * nb * (token + (cfg.max_len + 1) * 2 * d) + fusion)


def weight_macs(cfg: ASTROConfig, candidates: int) -> int:
    """The part of ``scorer_macs`` done by MatMuls by a weight (what int8 makes cheaper): all of it
    but the attention over L+1 keys."""
    attention = cfg.num_layers * cfg.num_blocks * (cfg.max_len + 1) * 2 * cfg.d_model
    return scorer_macs(cfg, candidates) - candidates * attention


def int8_estimate(fp32_ms: float, macs: int, fp32_gops: float, int8_gops: float) -> float:
    """The int8 speed-up over a scorer of ``fp32_ms`` if its ``macs`` weight multiply-adds went from
    the bare fp32 rate to the bare int8 rate (GOP/s) and the rest of its time stayed (Amdahl)."""
    weights = 2 * macs / (fp32_gops * 1e9) * 1e3  # ms of the fp32 scorer spent on them, at the bare rate
    rest = max(fp32_ms - weights, 0.0)
    return fp32_ms / (rest + weights * fp32_gops / int8_gops)


def matmul_shapes(cfg: ASTROConfig) -> list[tuple[int, int]]:
    """(K, N) of the weight MatMuls one scorer token goes through in a block: q, k, v (one
    quantized input for the three, exporter/quantize.py) and the FFN's two."""
    d = cfg.d_model
    return [(d, d), (d, d), (d, d), (d, cfg.ffn_dim), (cfg.ffn_dim, d)]


def _matmul_graph(rows: int, shapes: Sequence[tuple[int, int]], seed: int = 0) -> Any:
    """One graph of independent MatMuls [rows, K] x [K, N] (random weights as initializers)."""
    TensorProto, helper, numpy_helper = onnx.TensorProto, onnx.helper, onnx.numpy_helper  # noqa: N806
    rng = np.random.default_rng(seed)
    nodes, inputs, outputs, inits = [], [], [], []
    for i, (k, n) in enumerate(shapes):
        inputs.append(helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [rows, k]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [rows, n]))
        inits.append(numpy_helper.from_array((rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [f"x{i}", f"w{i}"], [f"y{i}"], name=f"matmul{i}"))
    graph = helper.make_graph(nodes, "matmuls", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def bare_matmuls(rows: int, shapes: Sequence[tuple[int, int]], threads: int, tmp: Path) -> dict[str, Any]:
    """name -> (session, feeds) of the fp32 and the int8 (quantize_dynamic, per channel) MatMuls."""
    fp32 = _matmul_graph(rows, shapes)
    paths = {"MatMul fp32": tmp / "matmul_fp32.onnx", "DynamicQuantizeMatMul int8": tmp / "matmul_int8.onnx"}
    onnx.save_model(fp32, str(paths["MatMul fp32"]))
    onnx.save_model(dynamic_int8(_matmul_graph(rows, shapes)), str(paths["DynamicQuantizeMatMul int8"]))
    rng = np.random.default_rng(1)
    feeds = {f"x{i}": rng.standard_normal((rows, k)).astype(np.float32) for i, (k, _n) in enumerate(shapes)}
    return {name: (onnx_session(path, threads), feeds) for name, path in paths.items()}


def scorer_ceiling(
    scorers: Mapping[str, Any], cfg: ASTROConfig, candidates: Sequence[int], *, threads: int,
    warmup: int = 1, repetitions: int = 5, seed: int = 0,
) -> dict[str, Any]:
    """For each M in ``candidates`` (one user): median ms and rate (GOP/s) of every scorer in
    ``scorers`` (name -> runner with encode/score, e.g. "int8" and "fp32") and of the bare fp32
    and int8 MatMuls at the scorer's shapes ([M, K] x [K, N]), each scorer's share of each bare
    rate, and the int8 scorer's speed-up over the fp32 one."""
    shapes = matmul_shapes(cfg)
    out: dict[str, Any] = {}
    for m in candidates:
        batch = synthetic_batch(cfg, 1, m, seed=seed + m, empty_block_prob=0.0)
        h, c = batch.history, batch.cand_items
        caches = {name: r.encode(h) for name, r in scorers.items()}
        # A bare call does a fraction of the scorer's work; it is repeated until it does as many
        # multiply-adds, so that both are timed over the same span of a shared machine's drift.
        per_call = m * sum(k * n for k, n in shapes)
        repeat = max(1, round(scorer_macs(cfg, m) / per_call))
        with tempfile.TemporaryDirectory(prefix="astro-ceiling-") as tmp:
            bare = bare_matmuls(m, shapes, threads, Path(tmp))
            calls = {f"scorer {name}": (lambda r=r, kv=caches[name], h=h, c=c: r.score(kv, h, c))
                     for name, r in scorers.items()}
            calls.update({name: (lambda s=s, f=f, n=repeat: [s.run(None, f) for _ in range(n)])
                          for name, (s, f) in bare.items()})
            seconds = time_interleaved(calls, warmup=warmup, repetitions=repetitions)
        ms = {name: float(np.median(t)) * 1e3 for name, t in seconds.items()}
        macs = {name: scorer_macs(cfg, m) for name in calls if name.startswith("scorer ")}
        macs.update(dict.fromkeys(bare, repeat * per_call))
        rate = {name: 2 * macs[name] / (ms[name] * 1e-3) / 1e9 for name in calls}
        point: dict[str, Any] = {"ms": ms, "gops": rate, "share": {
            f"{s} of {b}": rate[s] / rate[b] for s in calls if s.startswith("scorer ") for b in bare}}
        if "scorer int8" in ms and "scorer fp32" in ms:
            point["int8_speedup"] = ms["scorer fp32"] / ms["scorer int8"]
            point["int8_estimate"] = int8_estimate(ms["scorer fp32"], weight_macs(cfg, m), rate["MatMul fp32"],
                                                   rate["DynamicQuantizeMatMul int8"])
        out[f"M={m}"] = point
    return out


__all__ = ["bare_matmuls", "int8_estimate", "matmul_shapes", "scorer_ceiling", "scorer_macs",
           "weight_macs"]
