"""Checkpoints with the item table outside memory: loading maps the table where it lies in the
weights file, the digest streams and is the one recorded by earlier versions, the bundle's
dense-only copy loads with an external table, and a missing or misshapen table is named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from astro_trt.errors import CheckpointError
from astro_trt.model import checkpoint as ckpt_module
from astro_trt.model.checkpoint import (
    ITEM_TABLE_TENSOR,
    WEIGHTS_FILE,
    checkpoint_sha256,
    load_checkpoint,
    save_checkpoint,
    write_dense_checkpoint,
)
from astro_trt.model.item_table import TABLE_DIR, ItemTable, write_tables

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ml100k"


@pytest.fixture
def saved(tmp_path, make_config, make_model):
    cfg = make_config()
    model = make_model(cfg, 5)
    return save_checkpoint(tmp_path / "ckpt", model, cfg, metrics={"auc": [0.7]}), model, cfg


def _logits(model, cfg, make_history):
    h = make_history(cfg, 2, torch.Generator().manual_seed(1))
    cands = torch.tensor([[1, 2, cfg.num_items], [0, 5, 6]])
    with torch.no_grad():
        return model(h, cands), model.full(h, cands)


def _one_line(info) -> str:
    assert "\n" not in str(info.value)
    return str(info.value)


def test_loading_maps_the_table_and_gives_the_in_memory_models_logits(saved, make_history) -> None:
    path, model, cfg = saved
    loaded = load_checkpoint(path)
    table = loaded.item_table
    assert isinstance(table._stored, np.memmap) and Path(table._stored.filename) == (path / WEIGHTS_FILE).resolve()
    assert (table.rows, table.dim) == (cfg.num_items + 1, cfg.d_model)
    assert ITEM_TABLE_TENSOR not in loaded.model.state_dict()  # the model holds no copy of the rows
    for got, want in zip(_logits(loaded.model, cfg, make_history), _logits(model, cfg, make_history), strict=True):
        assert torch.equal(got, want)


def test_the_streamed_digest_is_the_one_recorded_for_the_example_checkpoint() -> None:
    weights = EXAMPLE / WEIGHTS_FILE
    header = ckpt_module._read_header(weights)
    recorded = header.metadata["astro_trt_sha256"]  # written by save_checkpoint before it streamed
    assert ckpt_module._file_digests(weights, header) == (recorded, checkpoint_sha256(weights))
    assert ckpt_module._tensor_digest_of_file(weights, header) == recorded  # the path for other layouts
    assert ckpt_module._tensor_digest(load_file(str(weights)), header.metadata) == recorded
    assert load_checkpoint(EXAMPLE).sha256 == checkpoint_sha256(weights)


def test_float_chunks_are_the_rows_in_order(saved) -> None:
    path, model, cfg = saved
    chunks = list(load_checkpoint(path).item_table.float_chunks(6))
    assert [len(c) for c in chunks] == [6] * 6 + [5]  # 41 rows
    assert np.concatenate(chunks).tobytes() == model.item_embedding.weight.detach().numpy().tobytes()


def _bundle_like(saved, tmp_path):
    """A dense-only checkpoint copy and the fp32 table beside it, as a bundle holds them."""
    path, _, cfg = saved
    bundle = tmp_path / "bundle"
    names = write_dense_checkpoint(path, bundle / "checkpoint")
    rows = load_checkpoint(path).item_table.float_chunks()
    written = write_tables(rows, cfg.num_items + 1, cfg.d_model, bundle / TABLE_DIR, ["fp32", "int8"])
    return bundle, names, {name: ItemTable.open(bundle, files) for name, (files, _) in written.items()}


def test_the_dense_only_copy_loads_with_the_bundles_table(saved, tmp_path, make_history) -> None:
    path, model, cfg = saved
    bundle, names, tables = _bundle_like(saved, tmp_path)
    dense = bundle / "checkpoint"
    assert sorted(names) == sorted(p.name for p in dense.iterdir()) == ["config.json", "metrics.json", WEIGHTS_FILE]
    with safe_open(str(dense / WEIGHTS_FILE), "pt") as fh:
        assert ITEM_TABLE_TENSOR not in fh.keys()
        meta = fh.metadata()
    assert meta["astro_trt_item_table"] == "external"
    assert meta["astro_trt_source_sha256"] == checkpoint_sha256(path)
    # The copy is the dense weights only: a small fraction of the checkpoint, here with 41 items.
    table_bytes = 4 * (cfg.num_items + 1) * cfg.d_model
    assert (dense / WEIGHTS_FILE).stat().st_size < (path / WEIGHTS_FILE).stat().st_size - table_bytes + 4096
    loaded = load_checkpoint(dense, item_table=tables["fp32"])
    for got, want in zip(_logits(loaded.model, cfg, make_history), _logits(model, cfg, make_history), strict=True):
        assert torch.equal(got, want)
    # The int8 table runs the same model on its dequantized rows: close, not equal.
    quantized = load_checkpoint(dense, item_table=tables["int8"])
    got, want = _logits(quantized.model, cfg, make_history)[0], _logits(model, cfg, make_history)[0]
    assert not torch.equal(got, want) and torch.allclose(got, want, atol=0.05)


def test_the_dense_only_copy_without_a_table_names_the_fix(saved, tmp_path) -> None:
    bundle, _, _ = _bundle_like(saved, tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(bundle / "checkpoint")
    assert "dense-only" in _one_line(info) and "through its bundle" in str(info.value)
    with pytest.raises(CheckpointError, match="already a dense-only copy"):
        write_dense_checkpoint(bundle / "checkpoint", tmp_path / "again")


def test_a_table_whose_shape_disagrees_with_the_config_is_named(saved, tmp_path) -> None:
    path, _, cfg = saved
    bundle, _, _ = _bundle_like(saved, tmp_path)
    wrong = ItemTable.from_array(np.zeros((cfg.num_items, cfg.d_model), np.float32))
    for target in (bundle / "checkpoint", path):
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(target, item_table=wrong)
        message = _one_line(info)
        assert f"[{cfg.num_items}, {cfg.d_model}]" in message and f"[{cfg.num_items + 1}, {cfg.d_model}]" in message
    with pytest.raises(CheckpointError, match="item_table is a ndarray, not an ItemTable"):
        load_checkpoint(path, item_table=np.zeros((cfg.num_items + 1, cfg.d_model), np.float32))


def test_an_edited_dense_copy_is_refused_by_its_own_digest(saved, tmp_path) -> None:
    bundle, _, tables = _bundle_like(saved, tmp_path)
    weights = bundle / "checkpoint" / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="digest recorded"):
        load_checkpoint(bundle / "checkpoint", item_table=tables["fp32"])


def test_an_unknown_table_mode_is_refused(saved, tmp_path) -> None:
    bundle, _, tables = _bundle_like(saved, tmp_path)
    weights = bundle / "checkpoint" / WEIGHTS_FILE
    raw = weights.read_bytes()
    # The same length, so every offset stays valid and only the mode differs.
    assert raw.count(b'"external"') == 1
    weights.write_bytes(raw.replace(b'"external"', b'"internal"'))
    with pytest.raises(CheckpointError, match="item table mode 'internal'"):
        load_checkpoint(bundle / "checkpoint", item_table=tables["fp32"])


def test_a_large_checkpoint_table_is_read_by_position_with_the_same_logits(saved, make_history, monkeypatch) -> None:
    from astro_trt.model import item_table

    path, model, cfg = saved
    monkeypatch.setattr(item_table, "MAP_BYTES", 0)  # as a 10^7-row table: not mapped at all
    loaded = load_checkpoint(path)
    assert loaded.item_table._reader is not None and not isinstance(loaded.item_table._stored, np.ndarray)
    for got, want in zip(_logits(loaded.model, cfg, make_history), _logits(model, cfg, make_history), strict=True):
        assert torch.equal(got, want)
