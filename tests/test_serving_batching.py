"""Batching across requests inside astro_recommend: requests that arrive together are served in
merged encoder and scorer calls (pages of one size, at most the profiles' batch), give the same
logits as one by one, and keep their errors to themselves; on a real tritonserver the dynamic
batcher hands the model several requests per execute()."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from serving_fixture import reference_logits, request, tiny_bundle

from astro_trt.engines.bundle import load_bundle
from astro_trt.errors import DataError
from astro_trt.serving import client as tc
from astro_trt.serving import config_pbtxt as pbtxt
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
