"""The graph registry: contract.GRAPHS names the graphs, contract.GRAPH_SPECS says how each is run,
and every stage iterates them (the exporter's wrappers, the runners' methods)."""

from __future__ import annotations

import torch
from conftest import random_model, small_config

from astro_trt import contract
from astro_trt.exporter.export import example_inputs
from astro_trt.exporter.graphs import WRAPPERS, named_tensors, run, wrapper_inputs
from astro_trt.model.synthetic import synthetic_batch
from astro_trt.runtime.onnxruntime import OrtRunner
from astro_trt.runtime.tensorrt import TrtRunner
from astro_trt.runtime.torch_runner import TorchRunner


def test_every_stage_covers_every_graph():
    assert tuple(contract.GRAPH_SPECS) == contract.GRAPHS
    assert set(WRAPPERS) == set(contract.GRAPHS)
    assert contract.SPLIT_GRAPHS == (contract.USER_ENCODER, contract.ITEM_SCORER)
    io = contract.graph_io(small_config(), "fp32")
    for name, spec in contract.GRAPH_SPECS.items():
        assert io[name].output_names == [spec.output]
        # the wrapper takes every input of its graph (a superset only where tracing drops unused ones)
        assert set(io[name].input_names) <= set(wrapper_inputs(name))
        for runner in (TorchRunner, OrtRunner, TrtRunner):
            assert callable(getattr(runner, spec.call)), (runner, spec.call)


def test_the_wrappers_are_the_models_own_computation():
    # run() is the oracle the exporter's check compares graphs with: exactly the model's methods.
    model = random_model(small_config(), seed=5)
    batch = synthetic_batch(model.cfg, 3, 4, seed=1)
    with torch.no_grad():
        kv = model.encode_user(batch.history)
        want = {contract.USER_ENCODER: kv, contract.ITEM_SCORER: model.score(kv, batch.history, batch.cand_items),
                contract.FULL_MODEL: model.full(batch.history, batch.cand_items)}
        tensors = named_tensors(batch.history, batch.cand_items, kv)
        for name in contract.GRAPHS:
            assert torch.equal(run(model, name, tensors), want[name]), name
    scorer_inputs = example_inputs(model, contract.ITEM_SCORER)
    assert scorer_inputs[0].shape[1:] == contract.kv_cache_shape(model.cfg)[1:]
    assert len(example_inputs(model, contract.FULL_MODEL)) == len(contract.HISTORY_INPUTS) + 1
