"""Every runner passes the input gate before it runs: the reproductions of requests that ONNX
Runtime used to score silently (a negative id wraps to another item) or refuse with its own
INVALID_ARGUMENT, refused alike by PyTorch and ONNX Runtime with the project's DataError."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from validate_bundle_fixture import make_bundle, random_checkpoint

from astro_trt.contract import FULL_MODEL, GRAPHS, USER_ENCODER
from astro_trt.engines.bundle import load_bundle
from astro_trt.errors import DataError
from astro_trt.model.synthetic import synthetic_batch
from astro_trt.runtime.gate import gate
from astro_trt.runtime.onnxruntime import OrtRunner
from astro_trt.runtime.torch_runner import TorchRunner


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("gate")
    return load_bundle(make_bundle(root / "bundle", random_checkpoint(root / "ckpt", 3), precisions=("fp32",)))


@pytest.fixture(scope="module")
def runners(bundle):
    ort = OrtRunner({g: bundle.onnx_path(g, "fp32") for g in GRAPHS}, bundle.config, "fp32",
                    item_table=bundle.item_table(), profiles={g: bundle.profile(g) for g in GRAPHS})
    return {"torch": TorchRunner(bundle.checkpoint().model), "ort": ort}


@pytest.fixture(scope="module")
def request_(bundle):
    return synthetic_batch(bundle.config, 2, 5, seed=1)


def _history(batch, **changes):
    h = batch.history
    fields = {"items": h.items, "behaviors": h.behaviors, "times": h.times, "lengths": h.lengths,
              "scenario": h.scenario, "request_time": h.request_time}
    out = {k: v.clone() for k, v in fields.items()}
    for name, (index, value) in changes.items():
        out[name][index] = value
    return type(h)(**out)


def _last_event(batch) -> tuple[int, int, int]:
    lengths = batch.history.lengths
    b, k = (int(i) for i in torch.nonzero(lengths >= 1)[0])
    return b, k, batch.history.items.shape[-1] - 1


def test_valid_requests_agree_across_runners(runners, request_):
    # Control: the gate lets the contract's requests through, so the refusals below are not vacuous.
    kv = {name: r.encode(request_.history) for name, r in runners.items()}
    split = {name: r.score(kv[name], request_.history, request_.cand_items) for name, r in runners.items()}
    full = runners["ort"].full(request_.history, request_.cand_items)
    # fp32 ONNX Runtime against fp32 PyTorch on a tiny model: the export check's own tolerance.
    np.testing.assert_allclose(split["ort"], split["torch"], atol=1e-4)
    np.testing.assert_allclose(full, split["torch"], atol=1e-4)
    # The caches are one contract: either runtime scores the other's (a torch tensor reaches ORT as numpy).
    crossed = runners["ort"].score(kv["torch"], request_.history, request_.cand_items)
    np.testing.assert_allclose(crossed, split["torch"], atol=1e-4)


def test_onnx_runtime_alone_wraps_a_negative_id_silently(runners, request_, bundle):
    # Why the gate must stand before the graph: ORT's Gather reads row num_behaviors+1-3 of the
    # behaviour table for id -3 (item ids never reach a graph: the runner's table lookup refuses them).
    ort = runners["ort"]
    arrays = gate(bundle.config, request_.history)
    slot = (0, int(np.argmax(arrays["hist_lengths"][0])), bundle.config.max_len - 1)  # an event slot
    feeds = ort.put(arrays)
    feeds["hist_behaviors"] = arrays["hist_behaviors"].copy()
    feeds["hist_behaviors"][slot] = -3
    raw = ort._run(USER_ENCODER, feeds)
    feeds["hist_behaviors"][slot] = bundle.config.num_behaviors + 1 - 3
    wrapped = ort._run(USER_ENCODER, feeds)
    np.testing.assert_array_equal(raw, wrapped)
    with pytest.raises(DataError, match="item ids span -3"):
        ort.item_table.lookup(np.array([-3]))


@pytest.mark.parametrize("runtime", ["torch", "ort"])
@pytest.mark.parametrize("call", ["score", "full"])
def test_negative_candidate_id_is_refused(runners, request_, runtime, call):
    runner = runners[runtime]
    cand = request_.cand_items.clone()
    cand[0, 1] = -3
    with pytest.raises(DataError, match=r"cand_items: value -3 out of range 1\.\.50 at \[0, 1\]"):
        if call == "score":
            runner.score(runner.encode(request_.history), request_.history, cand)
        else:
            runner.full(request_.history, cand)


@pytest.mark.parametrize("runtime", ["torch", "ort"])
@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("lengths", "L+100", r"hist_lengths: value 108 out of range 0\.\.8 at \[0, 0\]"),
        ("times", -5, r"hist_times: value -5 out of range 0\.\.\d+ at \[\d, \d, 7\] \(unix seconds\)"),
        ("items", 10**6, r"hist_items: value 1000000 out of range 0\.\.50 at \[\d, \d, 7\]"),
        ("scenario", 2, r"scenario: value 2 out of range 0\.\.1 at \[0\]"),
        ("request_time", -1, r"request_time: value -1 out of range"),
    ],
)
def test_issue_reproductions_are_refused_by_every_runner_and_entry(runners, request_, runtime, field, value, message):
    b, k, j = _last_event(request_)
    index = {"lengths": (0, 0), "scenario": 0, "request_time": 0}.get(field, (b, k, j))
    if value == "L+100":
        value = request_.history.items.shape[-1] + 100
    history = _history(request_, **{field: (index, value)})
    runner = runners[runtime]
    good_kv = runner.encode(request_.history)
    for call in (lambda: runner.encode(history), lambda: runner.full(history, request_.cand_items),
                 lambda: runner.score(good_kv, history, request_.cand_items)):
        with pytest.raises(DataError, match=message):
            call()


def test_item_id_beyond_the_table_is_the_projects_error_not_onnx_runtimes(runners, request_):
    cand = request_.cand_items.clone()
    cand[1, 4] = 10**6
    with pytest.raises(DataError, match=r"cand_items: value 1000000 out of range 1\.\.50 at \[1, 4\].*send only"):
        runners["ort"].full(request_.history, cand)


def test_kv_cache_of_another_batch_dtype_or_with_nan_is_refused(runners, request_):
    ort = runners["ort"]
    kv = ort.encode(request_.history).kv_cache
    with pytest.raises(DataError, match="kv_cache: dtype float16, expected float32"):
        ort.score(kv.astype(np.float16), request_.history, request_.cand_items)
    with pytest.raises(DataError, match=r"kv_cache: shape \[1, .*expected \[2, "):
        ort.score(kv[:1], request_.history, request_.cand_items)
    bad = kv.copy()
    bad[1, 0, 0, 0, 0, 0, 0] = np.inf
    with pytest.raises(DataError, match=r"kv_cache: non-finite value inf at \[1, 0, 0, 0, 0, 0, 0\]"):
        ort.score(bad, request_.history, request_.cand_items)
    with pytest.raises(DataError, match="kv_cache: dtype float64"):
        runners["torch"].score(torch.from_numpy(kv).double(), request_.history, request_.cand_items)


def test_onnx_runtime_with_a_bundles_profiles_holds_batch_and_candidates_to_them(runners, bundle):
    ort = runners["ort"]
    limit = bundle.profile(FULL_MODEL)["candidates"][2]
    big = synthetic_batch(bundle.config, 1, limit + 1, seed=2)
    with pytest.raises(DataError, match=rf"candidates {limit + 1} is outside the engine profile 1\.\.{limit}"):
        ort.full(big.history, big.cand_items)
    many = synthetic_batch(bundle.config, bundle.profile(FULL_MODEL)["batch"][2] + 1, 2, seed=3)
    with pytest.raises(DataError, match="--max-batch"):
        ort.encode(many.history)
