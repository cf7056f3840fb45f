"""The Triton model repository written from a bundle: every config.pbtxt parses with Triton's own
ModelConfig protobuf and matches the manifest; the request path the served models share (gate,
per-user cache, ONNX Runtime) in-process."""

from __future__ import annotations

import numpy as np
import pytest
from serving_fixture import reference_logits, request, tiny_bundle

from astro_trt.cli import main
from astro_trt.contract import BATCH, CANDIDATES, ITEM_SCORER, KV_CACHE, USER_ENCODER
from astro_trt.engines.bundle import load_bundle
from astro_trt.errors import BundleError, DataError
from astro_trt.serving import config_pbtxt as pbtxt
from astro_trt.serving.cache import UserCache
from astro_trt.serving.repository import write_repository
from astro_trt.serving.service import Recommender


@pytest.fixture(scope="module")
def model_config_pb2():
    return pytest.importorskip("tritonclient.grpc.model_config_pb2",
                               reason="tritonclient is not installed; pip install 'astro-trt[serve]'")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return load_bundle(tiny_bundle(tmp_path_factory.mktemp("serving-repo")))


@pytest.fixture(scope="module")
def repo(bundle, tmp_path_factory):
    return write_repository(bundle, tmp_path_factory.mktemp("repo") / "models", cache_bytes=1 << 20)


def parse(path, model_config_pb2):
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def dims(spec) -> list[int]:
    assert spec.shape[0] == BATCH
    rest = [-1 if d == CANDIDATES else d for d in spec.shape[1:]]
    return rest or [1]


def test_every_config_parses_and_matches_the_manifest(repo, bundle, model_config_pb2):
    dtype = {"int64": model_config_pb2.TYPE_INT64, "float32": model_config_pb2.TYPE_FP32}
    configs = {p.parent.name: parse(p, model_config_pb2) for p in repo.glob("*/config.pbtxt")}
    assert set(configs) == {USER_ENCODER, ITEM_SCORER, pbtxt.GATE, pbtxt.ENSEMBLE, pbtxt.RECOMMEND}
    io = bundle.io("fp32")
    max_batch = min(bundle.profile(g)[BATCH][2] for g in (USER_ENCODER, ITEM_SCORER))
    for name, config in configs.items():
        assert config.name == name and config.max_batch_size == max_batch
        assert (repo / name / "1").is_dir()
    for graph in (USER_ENCODER, ITEM_SCORER):
        config = configs[graph]
        assert config.platform == "onnxruntime_onnx" and config.dynamic_batching is not None
        assert (repo / graph / "1" / "model.onnx").read_bytes() == bundle.onnx_path(graph, "fp32").read_bytes()
        for entries, specs in ((config.input, io[graph].inputs), (config.output, io[graph].outputs)):
            assert [e.name for e in entries] == [s.name for s in specs]
            assert [e.data_type for e in entries] == [dtype[s.dtype] for s in specs]
            assert [list(e.dims) for e in entries] == [dims(s) for s in specs]
            # [batch] tensors travel as [batch, 1] and are reshaped back to the contract's rank
            assert [list(e.reshape.shape) for e in entries if e.HasField("reshape")] == \
                   [[] for s in specs if len(s.shape) == 1]


def test_ensemble_keeps_the_kv_cache_inside(repo, bundle, model_config_pb2):
    config = parse(repo / pbtxt.ENSEMBLE / "config.pbtxt", model_config_pb2)
    assert config.platform == "ensemble"
    assert [o.name for o in config.output] == ["logits"]
    steps = config.ensemble_scheduling.step
    assert [s.model_name for s in steps] == [pbtxt.GATE, USER_ENCODER, ITEM_SCORER]
    # the encoder's kv_cache feeds the scorer and nothing else; every model input comes from the gate
    assert dict(steps[1].output_map) == {KV_CACHE: KV_CACHE}
    assert dict(steps[2].input_map)[KV_CACHE] == KV_CACHE
    io = bundle.io("fp32")
    for step, graph in ((steps[1], USER_ENCODER), (steps[2], ITEM_SCORER)):
        wired = dict(step.input_map)
        assert {n: wired[n] for n in io[graph].input_names if n != KV_CACHE} == \
               {n: pbtxt.CHECKED + n for n in io[graph].input_names if n != KV_CACHE}
    gate_outputs = {o.name for o in parse(repo / pbtxt.GATE / "config.pbtxt", model_config_pb2).output}
    assert set(dict(steps[0].output_map)) <= gate_outputs


def test_recommend_model_config(repo, bundle, model_config_pb2):
    config = parse(repo / pbtxt.RECOMMEND / "config.pbtxt", model_config_pb2)
    assert config.backend == "python" and config.instance_group[0].count == 1
    assert [i.name for i in config.input][0] == pbtxt.USER_KEY
    assert config.input[0].data_type == model_config_pb2.TYPE_STRING
    assert [o.name for o in config.output] == ["logits", pbtxt.ENCODED]
    assert list(config.output[0].dims) == [-1, bundle.config.num_tasks]
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["precision"] == "fp32" and int(params["cache_bytes"]) == 1 << 20
    # the model's own copy of the bundle verifies (every file hashed)
    assert load_bundle(repo / pbtxt.RECOMMEND / "1" / params["bundle"]).checkpoint_sha256 == bundle.checkpoint_sha256


def test_plan_configs_parse(bundle, model_config_pb2):
    # No full TensorRT bundle can be built here; its configs come from the same contract.
    io, profiles = bundle.io("fp32"), {g: bundle.profile(g) for g in (USER_ENCODER, ITEM_SCORER)}
    from google.protobuf import text_format

    text = pbtxt.graph_config(io[ITEM_SCORER], profiles, name="item_scorer_plan", platform="tensorrt_plan")
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert config.platform == "tensorrt_plan" and [i.name for i in config.input] == io[ITEM_SCORER].input_names
    ensemble = text_format.Parse(pbtxt.ensemble_config(io, profiles, suffix=pbtxt.PLAN_SUFFIX),
                                 model_config_pb2.ModelConfig())
    assert [s.model_name for s in ensemble.ensemble_scheduling.step][1:] == ["user_encoder_plan", "item_scorer_plan"]


def test_repository_refuses_to_overwrite_and_writes_a_readme(repo, bundle):
    with pytest.raises(BundleError, match="already exists"):
        write_repository(bundle, repo)
    readme = (repo / "README.md").read_text()
    for name in (pbtxt.RECOMMEND, pbtxt.ENSEMBLE, pbtxt.GATE, "docker run", "Batching"):
        assert name in readme


def test_cli_writes_a_repository_and_refuses_a_missing_bundle(bundle, tmp_path, capsys):
    main(["triton", str(bundle.directory), "--out", str(tmp_path / "r")])
    assert (tmp_path / "r" / pbtxt.RECOMMEND / "config.pbtxt").is_file()
    with pytest.raises(SystemExit) as exc:
        main(["triton", str(tmp_path / "nope"), "--out", str(tmp_path / "r2")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    assert not (tmp_path / "r2").exists()


def test_user_cache_is_bounded_in_bytes_and_refuses_stale_histories():
    cache = UserCache(capacity_bytes=100)
    cache.put(b"a", b"h1", "A", 40)
    cache.put(b"b", b"h1", "B", 40)
    assert cache.get(b"a", b"h1") == "A"  # a is now the most recent
    cache.put(b"c", b"h1", "C", 40)  # over 100 bytes: evicts b, the least recent
    assert cache.get(b"b", b"h1") is None and cache.stats.evictions == 1
    assert cache.stats.bytes == 80 and len(cache) == 2
    assert cache.get(b"a", b"h2") is None  # another history: a miss, and the stale entry is gone
    assert cache.stats.stale == 1 and len(cache) == 1 and cache.stats.bytes == 40
    cache.put(b"big", b"h", "X", 101)
    assert cache.stats.too_large == 1 and cache.get(b"big", b"h") is None


def test_recommender_encodes_once_per_history(bundle):
    recommender = Recommender(bundle, "fp32", compute="ort", cache_bytes=1 << 20)
    first = request(bundle.config, candidates=12, seed=1)
    page = recommender.page(np.array([[b"u"]], dtype=object), first)
    # fp32 ONNX Runtime on the same graphs, the same arithmetic: agreement to float32 rounding.
    assert np.abs(page.logits - reference_logits(bundle, first)).max() <= 1e-5
    assert page.encoded.tolist() == [True]
    second = dict(first, cand_items=request(bundle.config, candidates=5, seed=2)["cand_items"])
    page2 = recommender.page(np.array([[b"u"]], dtype=object), second)
    assert page2.encoded.tolist() == [False] and recommender.encodes == 1
    assert np.abs(page2.logits - reference_logits(bundle, second)).max() <= 1e-5
    changed = dict(second, hist_items=second["hist_items"].copy())
    changed["hist_items"][0, 0, -1] = 1 + changed["hist_items"][0, 0, -1] % bundle.config.num_items
    changed["hist_lengths"] = np.maximum(changed["hist_lengths"], 1)
    page3 = recommender.page(np.array([[b"u"]], dtype=object), changed)
    assert page3.encoded.tolist() == [True] and recommender.encodes == 2
    assert np.abs(page3.logits - reference_logits(bundle, changed)).max() <= 1e-5
    with pytest.raises(DataError, match="cand_items"):
        recommender.page(np.array([[b"u"]], dtype=object), dict(first, cand_items=first["cand_items"] * 0))
