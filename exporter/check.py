"""Checks of exported graphs: onnx.checker (full), then ONNX Runtime on the CPU against the fp32
PyTorch model on a synthetic batch (padding, empty blocks, every time bucket).

Sessions come from ``onnx_session`` (astro_trt/ort_session.py), the one place they are made.
ONNX Runtime's CPU provider has no bfloat16 kernels for most ops (Add, MatMul, ...); a graph it
cannot load runs in ``onnx.reference`` instead (slow, exact op semantics), and ``runner_for``
says which one ran.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import torch

from astro_trt import contract
from astro_trt.contract import GraphIO
from astro_trt.errors import ExportError
from astro_trt.exporter.graphs import named_tensors, run, with_item_rows
from astro_trt.exporter.precision import model_in_precision
from astro_trt.lazy import lazy_import
from astro_trt.model.astro import ASTRO, History
from astro_trt.model.synthetic import synthetic_batch
from astro_trt.ort_session import onnx_session
from astro_trt.precision import REFERENCE, get, is_reference
from astro_trt.tolerances import max_abs_limit

# Only a graph ONNX Runtime cannot run (bfloat16) needs these.
onnx_reference = lazy_import("onnx.reference")
ml_dtypes = lazy_import("ml_dtypes")


def runner_for(path: Path | str) -> str:
    """ "onnxruntime" if ONNX Runtime's CPU provider can run the graph, else "onnx.reference"."""
    try:
        onnx_session(path)
    except Exception as exc:  # ORT raises its own NotImplemented/Fail types
        if "NOT_IMPLEMENTED" in str(exc):
            return "onnx.reference"
        raise
    return "onnxruntime"


def run_onnx(path: Path | str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a graph on the CPU: ONNX Runtime, or onnx.reference for graphs ORT cannot run."""
    try:
        session = onnx_session(path)
    except Exception as exc:
        if "NOT_IMPLEMENTED" not in str(exc):
            raise
        evaluator = onnx_reference.ReferenceEvaluator(str(path))
        return dict(zip(evaluator.output_names, evaluator.run(None, feeds), strict=True))
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """numpy view of a tensor, bfloat16 included (through ml_dtypes, as onnx and ORT expect)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.detach().numpy()


def feeds(io: GraphIO, model: ASTRO, history: History, cand_items: torch.Tensor,
          kv_cache: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """Inputs of one contract graph from a request (and, for the scorer, a kv_cache), the item
    rows looked up in ``model``'s table."""
    by_name = with_item_rows(model, named_tensors(history, cand_items, kv_cache))
    return {name: to_numpy(by_name[name]) for name in io.input_names}


def _outputs(model: ASTRO, history: History, cand_items: torch.Tensor, kv_in: torch.Tensor) -> dict[str, torch.Tensor]:
    tensors = named_tensors(history, cand_items, kv_in)
    with torch.no_grad():
        return {name: run(model, name, tensors).float() for name in contract.GRAPHS}


def _max_abs(a: np.ndarray | torch.Tensor, b: torch.Tensor) -> float:
    a = torch.as_tensor(np.asarray(a, dtype=np.float32)) if not isinstance(a, torch.Tensor) else a.float()
    return float((a - b).abs().max())


def check_graphs(model: ASTRO, result, *, batch: int = 2, candidates: int = 5, seed: int = 0) -> dict[str, float]:
    """Full onnx.checker on each graph, then the graph on the CPU against the fp32 PyTorch model
    on ``synthetic_batch(cfg, batch, candidates, seed=seed)``.

    Returns max abs error per graph (logits; kv_cache for the encoder). Raises ExportError when a
    graph fails the checker or its error exceeds the precision's limit (astro_trt/tolerances.py).
    """
    for path in result.paths.values():
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except Exception as exc:
            raise ExportError(f"{path}: fails onnx.checker ({exc}); re-export it") from exc
    request = synthetic_batch(model.cfg, batch, candidates, seed=seed)
    errors = {}
    for name, (error, limit) in graph_errors(model, result, request.history, request.cand_items).items():
        if not error <= limit:  # also catches NaN
            raise ExportError(
                f"{result.paths[name]}: max abs error {error:.3g} against the fp32 PyTorch model exceeds the "
                f"{result.precision} tolerance {limit:.3g}; the graph does not compute the model"
            )
        errors[name] = error
    return errors


def graph_errors(model: ASTRO, result, history: History, cand_items: torch.Tensor) -> dict[str, tuple[float, float]]:
    """graph -> (max abs error of the graph on the CPU against the fp32 PyTorch model, tolerance).

    The scorer is fed the oracle's cache in the graph's dtype, so its error is its own.
    """
    oracle = copy.deepcopy(model).float().eval()
    with torch.no_grad():
        kv_oracle = oracle.encode_user(history)
    expected = _outputs(oracle, history, cand_items, kv_oracle)
    broken = [name for name, t in expected.items() if not bool(torch.isfinite(t).all())]
    if broken:
        raise ExportError(f"the PyTorch model itself outputs NaN/inf ({', '.join(broken)}), so no graph can match it: "
                          "the checkpoint's weights are broken; retrain or restore the checkpoint")
    kv_in = kv_oracle.to(get(result.precision).torch())
    limits = dict.fromkeys(expected, max_abs_limit(REFERENCE))
    if not is_reference(result.precision):
        own = _outputs(model_in_precision(oracle, result.precision, export_ops=False), history, cand_items, kv_in)
        limits = {name: max_abs_limit(result.precision, _max_abs(own[name], expected[name])) for name in own}
    out = {}
    for name, path in result.paths.items():
        inputs = feeds(result.io[name], oracle, history, cand_items, kv_in)
        got = run_onnx(path, inputs)[result.io[name].output_names[0]]
        out[name] = (_max_abs(got, expected[name]), limits[name])
    return out
