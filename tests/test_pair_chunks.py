"""The exported full model runs its (user, candidate) pairs in chunks (exporter/pair_chunks.py):
the logits must not depend on how the pairs are chunked, and the plain graph inside must be the
traced one, which is what TensorRT engines are built from."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import random_history, random_model, small_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from astro_trt import contract
from astro_trt.exporter.export import export_onnx
from astro_trt.exporter.graphs import named_tensors, with_item_rows
from astro_trt.exporter.pair_chunks import (
    chunk_pairs,
    for_onnxruntime,
    full_model_pairs_per_chunk,
    initializers,
    is_chunked,
    pairs_per_chunk,
    unchunk,
    walk_nodes,
)
from astro_trt.ort_session import onnx_session
from astro_trt.plugins.names import ONNX_DOMAIN

# fp32 graph vs the fp32 PyTorch oracle: the same arithmetic per pair, only matmul blocking and
# summation order differ with the batch ONNX Runtime sees, ~1e-7 relative on logits of order 1.
FP32_TOL = 2e-5


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cfg = small_config()
    model = random_model(cfg, seed=3)
    result = export_onnx(model, tmp_path_factory.mktemp("chunks"), graphs=(contract.FULL_MODEL,))
    return model, result, onnx.load(str(result.paths[contract.FULL_MODEL]))


def _inputs(model, users: int, candidates: int, seed: int):
    """A request and the full model's feeds for it (the item ids' rows looked up in the model)."""
    cfg = model.cfg
    history = random_history(cfg, users, torch.Generator().manual_seed(seed))
    cand = torch.randint(1, cfg.num_items + 1, (users, candidates), generator=torch.Generator().manual_seed(seed + 1))
    tensors = with_item_rows(model, named_tensors(history, cand))
    inputs = contract.graph_io(cfg, "fp32")[contract.FULL_MODEL].input_names
    return history, cand, {name: tensors[name].numpy() for name in inputs}


def _logits(model: onnx.ModelProto, feeds) -> np.ndarray:
    return onnx_session(model.SerializeToString(), threads=1).run(None, feeds)[0]


def test_the_exported_full_model_is_chunked_and_recorded(exported):
    model, result, proto = exported
    assert is_chunked(proto)
    assert result.pairs_per_chunk == full_model_pairs_per_chunk(model.cfg)
    entry = result.to_manifest()["graphs"][contract.FULL_MODEL]
    assert entry["pairs_per_chunk"] == result.pairs_per_chunk
    # The attention op sits inside the Loop's body and is still what the graph is made of.
    assert ONNX_DOMAIN in entry["op_domains"]
    assert set(entry["op_domains"]) == {n.domain or "ai.onnx" for n in walk_nodes(proto.graph)}
    # The top level keeps only the loop's bookkeeping: every weight is inside the body.
    assert not proto.graph.initializer and sum(1 for _ in initializers(proto.graph)) > 10


def test_unchunk_gives_back_the_traced_graph(exported):
    model, _, proto = exported
    plain = unchunk(proto)
    assert not is_chunked(plain) and unchunk(plain) is plain
    again = unchunk(chunk_pairs(plain, 3))

    def signature(m):
        return [(n.op_type, tuple(n.input), tuple(n.output)) for n in m.graph.node]

    assert signature(again) == signature(plain)
    assert {t.name for t in again.graph.initializer} == {t.name for t in plain.graph.initializer}
    assert [v.name for v in plain.graph.input] == contract.graph_io(model.cfg, "fp32")[contract.FULL_MODEL].input_names
    onnx.checker.check_model(plain, full_check=True)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(users=st.integers(1, 4), candidates=st.integers(1, 7), pairs=st.integers(1, 9), seed=st.integers(0, 99))
def test_logits_do_not_depend_on_the_chunking(exported, users, candidates, pairs, seed):
    """Chunks smaller than, equal to and larger than B x M, B larger than a chunk, a last chunk
    with padding slots: every pair's logits are the PyTorch full model's."""
    model, _, proto = exported
    history, cand, feeds = _inputs(model, users, candidates, seed)
    with torch.no_grad():
        want = model.full(history, cand).numpy()
    got = _logits(chunk_pairs(unchunk(proto), pairs), feeds)
    assert got.shape == (users, candidates, model.cfg.num_tasks)
    np.testing.assert_allclose(got, want, rtol=0, atol=FP32_TOL)


def test_plain_and_chunked_graphs_agree_beyond_one_chunk(exported):
    model, result, proto = exported
    users, candidates = 3, 2 * result.pairs_per_chunk // 3 + 5  # B x M spans several chunks
    _, _, feeds = _inputs(model, users, candidates, seed=11)
    np.testing.assert_allclose(_logits(proto, feeds), _logits(unchunk(proto), feeds), rtol=0, atol=FP32_TOL)


def test_chunk_pairs_refuses_what_is_not_a_full_model(exported, tmp_path):
    model, _, proto = exported
    with pytest.raises(ValueError, match=">= 1"):
        chunk_pairs(unchunk(proto), 0)
    scorer = export_onnx(model, tmp_path, graphs=(contract.ITEM_SCORER,)).paths[contract.ITEM_SCORER]
    with pytest.raises(ValueError, match="full model"):
        chunk_pairs(onnx.load(str(scorer)), 4)


def test_chunks_follow_the_sequence_length():
    # The chunk is sized by the attention estimate: longer sequences, fewer pairs at once.
    sizes = [full_model_pairs_per_chunk(small_config(max_len=n)) for n in (8, 32, 128)]
    assert sizes[0] > sizes[1] > sizes[2] >= 1


def test_engines_are_built_from_the_plain_graph(exported):
    trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt_rtx is not installed")
    from astro_trt.engines.build import _parse

    _, result, _ = exported
    logger = trt.Logger(trt.Logger.ERROR)
    network = trt.Builder(logger).create_network(0)
    assert _parse(trt.OnnxParser(network, logger), result.paths[contract.FULL_MODEL])
    kinds = {network.get_layer(i).type for i in range(network.num_layers)}
    assert trt.LayerType.TRIP_LIMIT not in kinds and trt.LayerType.LOOP_OUTPUT not in kinds
    # The file itself also parses as it is (TensorRT-RTX accepts the Loop), for whoever builds it directly.
    direct = trt.Builder(logger).create_network(0)
    assert trt.OnnxParser(direct, logger).parse_from_file(str(result.paths[contract.FULL_MODEL]))


def test_the_onnxruntime_form_merges_the_layers_duplicates_and_keeps_the_logits(exported):
    """ONNX Runtime gets the body with the attention functions inlined and the layers' identical
    time-bucket work merged (it does not do that inside a Loop body itself)."""
    import onnx.inliner

    model, result, proto = exported
    prepared = for_onnxruntime(proto)
    assert is_chunked(prepared) and pairs_per_chunk(prepared) == result.pairs_per_chunk
    assert not prepared.functions and ONNX_DOMAIN not in {n.domain for n in walk_nodes(prepared.graph)}
    inlined_only = onnx.inliner.inline_local_functions(unchunk(proto))
    # Two layers, one shared bucket chain of a dozen-plus nodes: the merge removes at least that many.
    assert len(unchunk(prepared).graph.node) <= len(inlined_only.graph.node) - 12
    assert for_onnxruntime(unchunk(proto)) is not None and not is_chunked(for_onnxruntime(unchunk(proto)))
    _, _, feeds = _inputs(model, 2, result.pairs_per_chunk, seed=5)  # two chunks
    np.testing.assert_allclose(_logits(prepared, feeds), _logits(proto, feeds), rtol=0, atol=FP32_TOL)
