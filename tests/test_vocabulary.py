"""The item table outside the graphs, end to end through export_bundle: no graph holds it (their
size does not depend on the vocabulary), the bundle stores it once per stored form, the runners
look ids up in it, a quantized table is judged against the fp32 rows, and a bundle re-exports from
its own dense checkpoint and table."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import random_model, small_config

from astro_trt import contract
from astro_trt.engines.bundle import load_bundle
from astro_trt.engines.export_bundle import export_bundle
from astro_trt.errors import BundleError, ConfigError, DataError
from astro_trt.model.checkpoint import save_checkpoint
from astro_trt.model.synthetic import synthetic_batch
from astro_trt.runtime.onnxruntime import OrtRunner
from astro_trt.runtime.torch_runner import TorchRunner

FP32_TOL = 1e-5  # float32 graphs against the float32 oracle: reordering only (docs/tolerances.md)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """Two vocabularies of one dense model shape, and the larger with an int8 table served."""
    root = tmp_path_factory.mktemp("vocab")
    out = {}
    for items, tables in ((40, "fp32"), (4000, "int8")):
        cfg = small_config(num_items=items)
        ckpt = save_checkpoint(root / f"ckpt{items}", random_model(cfg, seed=1), cfg)
        out[items] = export_bundle(ckpt, root / f"bundle{items}", precisions="fp32", engines=False,
                                   item_tables=tables).directory
    return out


def test_no_graph_holds_the_table_and_graph_sizes_do_not_grow_with_the_vocabulary(bundles):
    small, large = (load_bundle(bundles[n]) for n in (40, 4000))
    for graph in contract.GRAPHS:
        sizes = [b.onnx_path(graph, "fp32").stat().st_size for b in (small, large)]
        assert abs(sizes[0] - sizes[1]) < 64, (graph, sizes)  # the same dense weights either way
        proto = onnx.load(str(large.onnx_path(graph, "fp32")))
        assert all(4001 not in t.dims for t in proto.graph.initializer), graph
        names = [i.name for i in proto.graph.input]
        assert "hist_items" not in names and "cand_items" not in names


def test_the_bundle_stores_each_form_once_and_serves_the_first(bundles):
    bundle = load_bundle(bundles[4000])
    assert bundle.table_storages == ["int8", "fp32"]  # fp32 is always kept: the oracle's rows
    files = sorted(p.relative_to(bundle.directory).as_posix() for p in (bundle.directory / "tables").iterdir())
    assert files == ["tables/item_table.fp32.bin", "tables/item_table.int8.bin", "tables/item_table.int8.scales.bin"]
    assert (bundle.directory / files[0]).stat().st_size == 4001 * 16 * 4
    assert (bundle.directory / files[1]).stat().st_size == 4001 * 16
    with pytest.raises(BundleError, match=r"no 'fp16' item table \(it has \['int8', 'fp32'\]\)"):
        bundle.item_table("fp16")


def test_runners_look_ids_up_and_the_int8_table_stays_close_to_the_fp32_rows(bundles):
    bundle = load_bundle(bundles[4000])
    oracle = TorchRunner(bundle.checkpoint().model)
    batch = synthetic_batch(bundle.config, 3, 20, seed=2)
    want = oracle.score(oracle.encode(batch.history), batch.history, batch.cand_items)
    exact = OrtRunner.from_bundle(bundle, "fp32", item_table="fp32")
    got = exact.score(exact.encode(batch.history), batch.history, batch.cand_items)
    np.testing.assert_allclose(got, want, rtol=0, atol=FP32_TOL)
    served = OrtRunner.from_bundle(bundle, "fp32")  # the bundle's default: the int8 table
    assert served.item_table.storage.name == "int8"
    quantized = served.score(served.encode(batch.history), batch.history, batch.cand_items)
    # Each int8 row is within half a step (max |row| / 254) of its fp32 row: the logits move, a
    # little. Rows are N(0, 0.02^2)-ish with d = 16, so a step is ~2e-4 and logits move well below 0.05.
    error = float(np.abs(quantized - want).max())
    assert 0 < error < 0.05, error


def test_ids_past_the_vocabulary_are_refused_before_any_lookup(bundles):
    bundle = load_bundle(bundles[40])
    runner = OrtRunner.from_bundle(bundle, "fp32")
    batch = synthetic_batch(bundle.config, 1, 4, seed=3)
    cand = batch.cand_items.clone()
    cand[0, 2] = 41
    with pytest.raises(DataError, match=r"cand_items: value 41 out of range 1\.\.40 at \[0, 2\]"):
        runner.score(runner.encode(batch.history), batch.history, cand)
    with pytest.raises(DataError, match=r"item ids span -1..-1 but the item table has rows 0..40"):  # never wrapped
        bundle.item_table().lookup(np.array([-1]))


def test_a_table_of_another_shape_is_refused_naming_both(bundles):
    bundle = load_bundle(bundles[40])
    other = load_bundle(bundles[4000]).item_table("fp32")
    with pytest.raises(ConfigError, match=r"\[4001, 16\].*num_items=40"):
        type(bundle.checkpoint().model)(bundle.config, item_table=other)
    with pytest.raises(DataError, match=r"OrtRunner item_table: expected the model's item table \(\[num_items \+ 1"):
        OrtRunner({g: bundle.onnx_path(g, "fp32") for g in contract.GRAPHS}, bundle.config, "fp32", item_table=other)


def test_a_bundle_re_exports_from_its_own_checkpoint_and_table(bundles, tmp_path):
    first = load_bundle(bundles[4000])
    again = load_bundle(export_bundle(first.directory, tmp_path / "again", precisions="fp32", engines=False,
                                      item_tables="fp16").directory)
    assert again.checkpoint_sha256 == first.checkpoint_sha256  # still the original checkpoint's identity
    assert again.table_storages == ["fp16", "fp32"]
    fp32 = "tables/item_table.fp32.bin"
    assert (again.directory / fp32).read_bytes() == (first.directory / fp32).read_bytes()


def test_a_bundle_whose_checkpoint_copy_came_from_another_checkpoint_is_refused(bundles, tmp_path):
    """The dense copy records the full checkpoint it was made from; the manifest must name the same."""
    import json
    import shutil

    from astro_trt.manifest import MANIFEST, write_manifest

    copy = tmp_path / "b"
    shutil.copytree(bundles[40], copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["checkpoint"]["sha256"] = "0" * 64
    write_manifest(copy, manifest)  # re-hashed: only the contradiction is left
    with pytest.raises(BundleError, match=r"made from a checkpoint with sha256 .* but the manifest records 0000"):
        load_bundle(copy).checkpoint()
