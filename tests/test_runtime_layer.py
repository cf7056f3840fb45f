"""The runtime layer (runtime/): one family of runners, a request gated once by the public call or
by the served model, and on the TensorRT path moved to the device once. Gate calls are counted at
the gate's boundary (runtime/gate.py, the module every runner and the served model call through)."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from serving_fixture import reference_logits, request, tiny_bundle

from astro_trt.contract import GRAPH_SPECS, GRAPHS, HISTORY_INPUTS, SPLIT_GRAPHS
from astro_trt.engines.bundle import load_bundle
from astro_trt.engines.device_table import DeviceItemTable, upload
from astro_trt.model.astro import History
from astro_trt.runtime import gate
from astro_trt.runtime.onnxruntime import OrtRunner
from astro_trt.runtime.tensorrt import TrtRunner
from astro_trt.serving.service import Recommender

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ("validate_history", "validate_candidates", "validate_kv_cache")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return load_bundle(tiny_bundle(tmp_path_factory.mktemp("runtime")))


@pytest.fixture
def calls(monkeypatch) -> Counter:
    """Every check of the gate, counted by name (the checks still run)."""
    seen: Counter = Counter()
    for name in CHECKS:
        real = getattr(gate, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            seen[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(gate, name, counted)
    return seen


class _CpuSession:
    """engines/runtime.py Session's two methods, on the CPU: ``to_device`` is the session's own
    upload with the item table "on the device" (the real DeviceItemTable, here in CPU memory; it
    counts the crossings), ``run`` runs the graph on ONNX Runtime. Enough to drive the real
    TrtRunner, whose every line runs here, without a GPU."""

    device = torch.device("cpu")

    def __init__(self, bundle) -> None:
        self.ort = OrtRunner.from_bundle(bundle, "fp32", 1, only=SPLIT_GRAPHS)
        self.host_table = bundle.item_table()
        self.item_rows = DeviceItemTable(self.host_table, self.device)
        self.crossings = 0

    def to_device(self, arrays):
        self.crossings += 1
        return upload(arrays, self.device, self.item_rows)

    def run(self, graph, feeds):
        return torch.from_numpy(self.ort._run(graph, {n: t.numpy() for n, t in feeds.items()}))


def _trt_runner_on_cpu(bundle) -> TrtRunner:
    runner = TrtRunner.__new__(TrtRunner)
    runner.session = _CpuSession(bundle)
    super(TrtRunner, runner).__init__(bundle.config, "fp32", {g: bundle.profile(g) for g in SPLIT_GRAPHS},
                                      item_table=runner.session.host_table)
    return runner


def _history(arrays) -> History:
    return History(*(torch.from_numpy(arrays[n]) for n in HISTORY_INPUTS))


@pytest.mark.parametrize("path", ["ort", "trt"])
def test_a_served_page_is_gated_once_and_crosses_once(bundle, calls, path):
    runner = _trt_runner_on_cpu(bundle) if path == "trt" else None
    rec = Recommender(bundle, "fp32", compute="ort", threads=1, cache_bytes=1 << 20, engine=runner)
    arrays = request(bundle.config, users=2, candidates=5, seed=4)
    want = reference_logits(bundle, arrays)
    calls.clear()
    keys = np.array([[b"a"], [b"b"]], dtype=object)
    for encoded in (True, False):  # the first page encodes both users, the second serves them from the cache
        page = rec.page(keys, arrays)
        assert page.encoded.tolist() == [encoded, encoded]
        # fp32 ONNX Runtime both ways on the same graphs; only the batching of the encoder differs.
        np.testing.assert_allclose(page.logits, want, rtol=0, atol=1e-5)
    assert calls == Counter(validate_history=2, validate_candidates=2), calls  # once per page each
    if path == "trt":
        assert runner.session.crossings == 2  # one upload per page, read by both the encoder and the scorer


@pytest.mark.parametrize("path", ["ort", "trt"])
def test_each_public_call_gates_once_and_scores_its_own_state_in_place(bundle, calls, path):
    runner = _trt_runner_on_cpu(bundle) if path == "trt" else OrtRunner.from_bundle(bundle, "fp32", 1,
                                                                                    only=SPLIT_GRAPHS)
    arrays = request(bundle.config, users=2, candidates=3, seed=7)
    history, cand = _history(arrays), torch.from_numpy(arrays["cand_items"])
    calls.clear()
    state = runner.encode(history)
    assert calls == Counter(validate_history=1)
    before = runner.session.crossings if path == "trt" else 0
    logits = runner.score(state, history, cand)
    # Its own state is bound as it is: no cache gate, and on TensorRT only the candidates cross.
    assert calls == Counter(validate_history=2, validate_candidates=1), calls
    if path == "trt":
        assert runner.session.crossings == before + 1
    np.testing.assert_allclose(logits, reference_logits(bundle, arrays), rtol=0, atol=1e-5)
    # A bare cache (here the state's own, as numpy) is a foreign one: it passes the cache gate.
    runner.score(np.asarray(state), history, cand)
    assert calls["validate_kv_cache"] == 1


def test_no_back_end_calls_the_gate():
    """Below the public call nothing checks again: the back ends and the engines' executor never
    name the gate (the base class, runtime/runner.py, is the one caller)."""
    for rel in ("runtime/onnxruntime.py", "runtime/tensorrt.py", "runtime/torch_runner.py", "engines/runtime.py",
                "serving/compute.py"):
        tree = ast.parse((ROOT / rel).read_text())
        named = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
            n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} | {
            a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        assert not named & {"gate", *CHECKS}, (rel, named & {"gate", *CHECKS})


def test_the_graph_registry_drives_the_calls(bundle):
    runner = OrtRunner.from_bundle(bundle, "fp32", 1)
    arrays = request(bundle.config, users=1, candidates=4, seed=2)
    history, cand = _history(arrays), torch.from_numpy(arrays["cand_items"])
    state = runner.call(GRAPHS[0], history)
    args = {"encode": (history,), "score": (state, history, cand), "full": (history, cand)}
    out = {g: runner.call(g, *args[GRAPH_SPECS[g].call]) for g in GRAPHS[1:]}
    # The split and the full model agree (fp32, the export check's own tolerance).
    np.testing.assert_allclose(out[GRAPHS[1]], out[GRAPHS[2]], atol=1e-4)
