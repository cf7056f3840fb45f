"""Batching across requests inside astro_recommend: requests that arrive together are served in
merged encoder and scorer calls (pages of one size, at most the profiles' batch), give the same
logits as one by one, and keep their errors to themselves; on a real tritonserver the dynamic
batcher hands the model several requests per execute()."""

from __future__ import annotations

import threading
import urllib.request

import numpy as np
import pytest
from serving_fixture import reference_logits, request, tiny_bundle

from astro_trt.engines.bundle import load_bundle
from astro_trt.errors import DataError
from astro_trt.serving import client as tc
from astro_trt.serving import config_pbtxt as pbtxt
from astro_trt.serving import service
from astro_trt.serving.compute import make_compute
from astro_trt.serving.lockdown import admin_headers
from astro_trt.serving.repository import PYTHON_MODELS, write_repository
from astro_trt.serving.server import TritonServer, unavailable_reason
from astro_trt.serving.service import Page, Recommender

# fp32 on both sides, the same graphs and ONNX Runtime; merging users into one call changes only
# float32 summation order (measured ~1e-7).
FP32_TOL = 1e-5


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return load_bundle(tiny_bundle(tmp_path_factory.mktemp("batching")))


class Counting:
    """The real runner (ONNX Runtime), counting its encoder and scorer calls and the users in each."""

    def __init__(self, inner):
        self.inner = inner
        self.encodes: list[int] = []
        self.scores: list[int] = []

    def encode_checked(self, feeds):
        self.encodes.append(len(feeds["hist_item_emb"]))
        return self.inner.encode_checked(feeds)

    def score_checked(self, kv_cache, feeds):
        self.scores.append(len(feeds["cand_item_emb"]))
        return self.inner.score_checked(kv_cache, feeds)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _recommender(bundle):
    engine = Counting(make_compute(bundle, "fp32", "ort"))
    return Recommender(bundle, "fp32", cache_bytes=1 << 20, engine=engine), engine


def _one(cfg, key: bytes, candidates: int, seed: int, users: int = 1):
    keys = np.array([[key + b"%d" % u] for u in range(users)], dtype=object)
    return keys, request(cfg, users=users, candidates=candidates, seed=seed)


def test_same_size_pages_merge_into_one_encode_and_one_score(bundle):
    rec, engine = _recommender(bundle)
    cfg = bundle.config
    limit = rec.batch_limit  # the tiny bundle's profiles: 8 users
    requests = [_one(cfg, b"u%d-" % i, 12, seed=i) for i in range(limit + 2)]  # one more than fits, + a 2nd
    requests.append(_one(cfg, b"other-", 20, seed=50))  # another page size: its own call
    pages = rec.pages(requests)
    for (_, tensors), page in zip(requests, pages, strict=True):
        assert isinstance(page, Page) and page.encoded.tolist() == [True]
        assert np.abs(page.logits - reference_logits(bundle, tensors)).max() <= FP32_TOL
    # 11 requests: 8 + 2 of 12 candidates (the profiles' batch bounds a call), 1 of 20
    assert sorted(engine.encodes) == sorted(engine.scores) == [1, 2, limit]
    # the same users' next pages: all cached, one scorer call, no encode
    engine.encodes.clear(), engine.scores.clear()
    again = [(k, dict(t, cand_items=t["cand_items"][:, :7])) for k, t in requests[:4]]
    pages = rec.pages(again)
    assert engine.encodes == [] and engine.scores == [4]
    assert all(p.encoded.tolist() == [False] for p in pages)
    assert rec.encodes == limit + 3


def test_a_user_twice_in_one_batch_is_encoded_once(bundle):
    rec, engine = _recommender(bundle)
    keys, first = _one(bundle.config, b"twice", 9, seed=3)
    second = dict(first, cand_items=request(bundle.config, candidates=9, seed=4)["cand_items"])
    pages = rec.pages([(keys, first), (keys, second)])
    assert engine.encodes == [1] and engine.scores == [2]
    assert [p.encoded.tolist() for p in pages] == [[True], [False]]
    assert np.abs(pages[1].logits - reference_logits(bundle, second)).max() <= FP32_TOL


def test_a_bad_request_fails_alone(bundle):
    rec, engine = _recommender(bundle)
    cfg = bundle.config
    good = [_one(cfg, b"g%d-" % i, 10, seed=10 + i, users=1 + i % 2) for i in range(3)]
    keys, tensors = _one(cfg, b"bad-", 10, seed=20)
    bad_ids = (keys, dict(tensors, cand_items=np.full_like(tensors["cand_items"], cfg.num_items + 1)))
    no_key = (np.array([[b""]], dtype=object), tensors)
    pages = rec.pages([good[0], bad_ids, good[1], no_key, good[2]])
    assert isinstance(pages[1], DataError) and "cand_items" in str(pages[1])
    assert isinstance(pages[3], DataError) and "empty key" in str(pages[3])
    for (_, t), page in zip(good, (pages[0], pages[2], pages[4]), strict=True):
        assert np.abs(page.logits - reference_logits(bundle, t)).max() <= FP32_TOL
    assert engine.scores == [4]  # the three good requests (4 users) in one call

    # A failure inside a merged call (not the gate's): retried request by request, only its own fails.
    poisoned = _one(cfg, b"poison-", 10, seed=30)
    real_score = engine.inner.score_checked
    poison = poisoned[1]["cand_items"]

    def score(kv_cache, feeds):  # fails whenever the poisoned page is among those scored
        if any((row == poison[0]).all() for row in np.asarray(feeds["cand_items"])):
            raise RuntimeError("scorer failed")
        return real_score(kv_cache, feeds)

    engine.inner.score_checked = score
    pages = rec.pages([good[0], poisoned, good[1]])
    assert isinstance(pages[1], RuntimeError)
    assert isinstance(pages[0], Page) and isinstance(pages[2], Page)
    assert np.abs(pages[2].logits - reference_logits(bundle, good[1][1])).max() <= FP32_TOL


def test_requests_of_one_layout_pass_one_gate_and_a_refusal_is_still_their_own(bundle, monkeypatch):
    rec, engine = _recommender(bundle)
    cfg = bundle.config
    gated = []
    real_check = service.check_request

    def counting_check(cfg_, tensors, profiles):  # the real gate, counting the users each pass checks
        gated.append(len(tensors["hist_items"]))
        return real_check(cfg_, tensors, profiles)

    monkeypatch.setattr(service, "check_request", counting_check)
    good = [_one(cfg, b"m%d-" % i, 11, seed=60 + i, users=1 + i % 2) for i in range(4)]  # 6 users, one layout
    pages = rec.pages(good)
    assert gated == [6] and engine.scores == [6]  # one gate pass, one scorer call
    for (_, tensors), page in zip(good, pages, strict=True):
        assert np.abs(page.logits - reference_logits(bundle, tensors)).max() <= FP32_TOL

    # A refused request inside the chunk: the merged pass fails, each request is gated alone and
    # only the bad one gets the gate's message, with its own row index (0), not its merged one.
    gated.clear(), engine.scores.clear()
    keys, tensors = _one(cfg, b"late-", 11, seed=70)
    late = dict(tensors, request_time=tensors["request_time"] * 0 + 1)  # before its history's events
    pages = rec.pages([good[0], good[1], (keys, late), good[2]])
    assert gated == [5, 1, 2, 1, 1]
    assert isinstance(pages[2], DataError) and "after request_time[0]" in str(pages[2])
    assert engine.scores == [4] and all(isinstance(pages[i], Page) for i in (0, 1, 3))


def test_gate_chunks_keep_what_cannot_merge_apart():
    def req(users: int, m: int, dtype=np.int64, extra: dict | None = None):
        return None, {"hist_items": np.zeros((users, 3, 5), dtype), "cand_items": np.zeros((users, m), dtype),
                      **(extra or {})}

    requests = [req(1, 8), req(2, 8), req(1, 9), req(3, 8), req(1, 8, np.int32), req(9, 8), req(3, 8),
                req(1, 8, extra={"scenario": np.zeros(2, np.int64)}), req(2, 8)]
    # same page size and dtypes merge up to 8 users (0, 1, 3, then 6 and 8 in the next chunk); another page
    # size (2), dtype (4), a batch above the limit (5) and a request whose tensors disagree on it (7) go alone
    assert service.gate_chunks(requests, 8) == [[0, 1, 3], [6, 8], [2], [4], [5], [7]]


def test_single_page_api_still_raises(bundle):
    rec, _ = _recommender(bundle)
    keys, tensors = _one(bundle.config, b"x", 8, seed=5)
    with pytest.raises(DataError, match="cand_items"):
        rec.page(keys, dict(tensors, cand_items=tensors["cand_items"] * 0))


def test_recommend_config_batches_with_ragged_pages(bundle, tmp_path):
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import text_format
    for batching in (True, False):
        repo = write_repository(bundle, tmp_path / f"r{batching}", batching=batching)
        text = (repo / pbtxt.RECOMMEND / "config.pbtxt").read_text()
        config = text_format.Parse(text, model_config_pb2.ModelConfig())
        assert config.HasField("dynamic_batching") is batching
        ragged = {i.name for i in config.input if i.allow_ragged_batch}
        assert ragged == ({"cand_items"} if batching else set())
        if batching:
            assert config.dynamic_batching.max_queue_delay_microseconds == pbtxt.QUEUE_DELAY_US
    with pytest.raises(DataError, match="batching"):
        write_repository(bundle, tmp_path / "bad", batching="yes")


def test_served_requests_are_merged_and_a_bad_one_fails_alone(bundle, tmp_path):
    if unavailable_reason():
        pytest.skip(unavailable_reason())
    from tritonclient.utils import InferenceServerException
    cfg = bundle.config
    repo = write_repository(bundle, tmp_path / "models", cache_bytes=1 << 20)
    with TritonServer(repo, models=PYTHON_MODELS, startup_timeout=120) as server:
        url = server.endpoints.http
        jobs = [(b"s%d" % i, request(cfg, candidates=8 + 4 * (i % 2), seed=40 + i)) for i in range(12)]
        jobs[5] = (b"bad", dict(jobs[5][1], hist_lengths=np.full_like(jobs[5][1]["hist_lengths"], cfg.max_len + 1)))
        results: dict[int, object] = {}
        start = threading.Barrier(len(jobs))

        def call(i: int) -> None:
            client = tc.connect("http", url)
            try:
                start.wait()
                results[i] = tc.recommend("http", client, *jobs[i])
            except InferenceServerException as exc:
                results[i] = exc
            finally:
                client.close()

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=2 * tc.TIMEOUT_S)
        bad = results[5]
        assert isinstance(bad, InferenceServerException) and bad.status() == "400" and "hist_lengths" in str(bad)
        for i, (_, tensors) in enumerate(jobs):
            if i != 5:
                logits, encoded = results[i]
                assert encoded.tolist() == [True]
                assert np.abs(logits - reference_logits(bundle, tensors)).max() <= FP32_TOL
        client = tc.connect("http", url)
        try:
            # Statistics are a management API: the operator's key opens them (lockdown.py).
            stats = client.get_inference_statistics(pbtxt.RECOMMEND,
                                                     headers=admin_headers(server.api_key))["model_stats"][0]
        finally:
            client.close()
        # 12 requests reached the model in fewer executions: the batcher handed several over at once.
        assert int(stats["inference_count"]) == 12
        assert int(stats["execution_count"]) < 12
        # the counters, updated once per execute(), add up per request: 11 users encoded, 1 refused
        metrics = urllib.request.urlopen(f"http://{server.endpoints.metrics}/metrics", timeout=10).read().decode()
        values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith("astro_")}
        assert values["astro_user_encodes_total"] == 11 and values["astro_cache_hits_total"] == 0
        assert values["astro_requests_refused_total"] == 1 and values["astro_cache_bytes"] > 0


@pytest.mark.parametrize("argv, message", [
    (["127.0.0.1:8000", "--bundle", "b"], "starts its own servers; drop the URL"),
    (["--replicas", "2", "--bundle", "b"], "drop --replicas"),
    ([], "--compare-batching needs --bundle BUNDLE"),
    (["--bundle", "b", "--rounds", "0"], "--rounds"),
])
def test_compare_batching_refuses_bad_arguments(argv, message, tmp_path, capsys):
    from astro_trt.cli import main
    with pytest.raises(SystemExit) as exc:
        main(["loadtest", "--compare-batching", *argv, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_compare_batching_serves_both_modes_in_one_command(bundle, tmp_path):
    if unavailable_reason():
        pytest.skip(unavailable_reason())
    import json

    from astro_trt.cli import main
    out = tmp_path / "ab"
    main(["loadtest", "--compare-batching", "--bundle", str(bundle.directory), "--rounds", "1", "--duration", "1.5",
          "--clients", "8", "--users", "4", "--pages", "2", "--candidates", "8", "--cache-mib", "1",
          "--protocol", "http", "--out", str(out)])
    report = json.loads((out / "batching.json").read_text())
    runs = {r["mode"]: r for r in report["runs"]}
    assert report["failed_requests"] == 0 and set(runs) == {"batching", "no batching"}
    assert all(r["requests"] > 20 and r["round"] == 1 for r in runs.values())
    # Triton's own statistics tell the servers apart: one request per execute() without the batcher
    assert runs["no batching"]["requests_per_execute"] == 1.0 and runs["batching"]["requests_per_execute"] > 1.0
    [pair] = report["pairs"]
    assert pair["ratio"] == pytest.approx(runs["batching"]["requests_per_s"] / runs["no batching"]["requests_per_s"])
    assert report["spread"]["pairs"] == 1 and "| 1 | http |" in (out / "batching.md").read_text()
