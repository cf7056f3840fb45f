"""The item table files (model/item_table.py): each storage gives back the checkpoint's rows
within its own rounding, the streamed writer equals the one-shot encode, and a truncated,
padded or misdescribed table, an id outside the table and a row that cannot be stored are each
refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from astro_trt.errors import BundleError, CheckpointError, DataError
from astro_trt.model.checkpoint import load_checkpoint, save_checkpoint
from astro_trt.model.item_table import (
    TABLE_DIR,
    ItemTable,
    TableFiles,
    chunk_rows,
    planned_table_bytes,
    write_tables,
)
from astro_trt.precision import storage

STORAGES = ("fp32", "fp16", "int8")


@pytest.fixture
def saved(tmp_path, make_config, make_model):
    cfg = make_config()
    model = make_model(cfg, 3)
    return save_checkpoint(tmp_path / "ckpt", model, cfg), model, cfg


@pytest.fixture
def weight(saved) -> np.ndarray:
    return saved[1].item_embedding.weight.detach().numpy().copy()


def _written(saved, out, storages=STORAGES, rows_per_chunk=7):
    path, _, cfg = saved
    return write_tables(load_checkpoint(path).item_table.float_chunks(rows_per_chunk), cfg.num_items + 1, cfg.d_model,
                        out / TABLE_DIR, storages)


def _one_line(info) -> str:
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------- values
def test_each_storage_gives_back_the_checkpoint_rows_within_its_rounding(saved, weight, tmp_path) -> None:
    written = _written(saved, tmp_path)
    ids = np.arange(weight.shape[0]).reshape(-1, 3) if weight.shape[0] % 3 == 0 else np.arange(weight.shape[0])
    tables = {name: ItemTable.open(tmp_path, files) for name, (files, _) in written.items()}
    rows = {name: table.lookup(ids) for name, table in tables.items()}
    want = weight[ids]
    assert all(r.dtype == np.float32 and r.shape == (*ids.shape, weight.shape[1]) for r in rows.values())
    # fp32 stores the checkpoint's bytes: equal, not close.
    assert rows["fp32"].tobytes() == want.tobytes()
    # fp16 rounds to nearest with 10 fraction bits: relative error <= 2^-11 for normal values; below
    # fp16's smallest normal (2^-14) the spacing is fixed at 2^-24, so the error there is <= 2^-25.
    assert np.all(np.abs(rows["fp16"] - want) <= np.maximum(np.abs(want) * 2.0**-11, 2.0**-25))
    # int8: x / scale rounded to the nearest integer is off by at most 1/2, i.e. scale / 2 per element
    # (scale = max |row| / 127); the float32 division and product add a few ulp of x on top.
    scale = np.abs(weight).max(axis=1) / 127
    bound = scale[ids][..., None] / 2 + 4 * np.finfo(np.float32).eps * np.abs(want)
    assert np.all(np.abs(rows["int8"] - want) <= bound)
    assert not np.array_equal(rows["int8"], want)  # the bound is not met by accident of exactness
    # The torch lookup the oracle uses is the same rows.
    for table in tables.values():
        got = table.lookup_torch(torch.as_tensor(ids))
        assert got.dtype == torch.float32 and torch.equal(got, torch.from_numpy(table.lookup(ids)))


def test_streamed_files_equal_the_one_shot_encode(saved, weight, tmp_path) -> None:
    one_shot = {name: storage(name).encode(weight, axes=(1,)) for name in STORAGES}
    for rows_per_chunk in (1, 7, 10_000):
        out = tmp_path / f"chunks-{rows_per_chunk}"
        out.mkdir()
        written = _written(saved, out, rows_per_chunk=rows_per_chunk)
        for name, (files, paths) in written.items():
            stored, scale = one_shot[name]
            assert (out / files.path).read_bytes() == stored.astype(stored.dtype.newbyteorder("<")).tobytes()
            if scale is not None:
                assert (out / files.scales).read_bytes() == scale.reshape(-1).astype("<f4").tobytes()
            assert paths == [out / files.path] + ([out / files.scales] if files.scales else [])
        # Nothing but the published files: no partial left behind.
        assert sorted(p.name for p in (out / TABLE_DIR).iterdir()) == sorted(
            p.name for _, paths in written.values() for p in paths)


def test_planned_bytes_are_the_bytes_written(saved, tmp_path) -> None:
    _, _, cfg = saved
    written = _written(saved, tmp_path)
    on_disk = sum(p.stat().st_size for _, paths in written.values() for p in paths)
    assert planned_table_bytes(cfg, STORAGES) == on_disk
    rows, d = cfg.num_items + 1, cfg.d_model
    assert on_disk == rows * d * (4 + 2 + 1) + rows * 4


def test_chunks_are_bounded_by_bytes() -> None:
    assert chunk_rows(128) == 131_072 and chunk_rows(10**9) == 1


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 9)),
              elements=st.floats(-(2.0**100), 2.0**100, width=32, allow_nan=False, allow_infinity=False)))
@example(np.array([[1e-45, -1e-45, 0.0]], np.float32))  # max |row| / 127 underflows to a zero scale
@example(np.array([[1.3951e-41, -3.0e-42, 0.0]], np.float32))  # a subnormal row (found by hypothesis)
def test_int8_round_trip_stays_within_half_a_step(weight) -> None:
    table = ItemTable.from_array(weight, "int8")
    back = table.lookup(np.arange(weight.shape[0]))
    amax = np.abs(weight).max(axis=1, keepdims=True)
    scale = (amax / 127).astype(np.float32)
    scale[scale == 0] = 1.0
    # Half a step per element (rounding to nearest), plus float32 rounding of the quotient and product.
    # A row of subnormal values has a subnormal scale, itself rounded to the subnormal spacing (not
    # relative to its size): up to 127 steps of that rounding, so 128 subnormal spacings more.
    tiny = np.finfo(np.float32).smallest_subnormal
    assert np.all(np.abs(back - weight) <= scale / 2 + 4 * np.finfo(np.float32).eps * np.abs(weight) + 128 * tiny)
    assert np.array_equal(back[amax[:, 0] == 0], weight[amax[:, 0] == 0])  # an all-zero row (padding) stays 0


# ---------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("ids", [[-1], [41], [[3, -7]], [0, 2**40]])
def test_ids_outside_the_table_are_refused_not_wrapped(ids) -> None:
    table = ItemTable.from_array(np.ones((41, 4), np.float32))
    with pytest.raises(DataError) as info:
        table.lookup(np.array(ids))
    assert "0..40" in _one_line(info)


def test_float_ids_are_refused() -> None:
    with pytest.raises(DataError, match="not integers"):
        ItemTable.from_array(np.ones((3, 2), np.float32)).lookup(np.array([1.0]))


@pytest.mark.parametrize(("target", "change"), [
    ("path", lambda b: b[:-1]), ("path", lambda b: b + b"\0" * 4), ("scales", lambda b: b[:-4]),
])
def test_a_truncated_or_padded_table_file_never_maps(saved, tmp_path, target, change) -> None:
    files = _written(saved, tmp_path)["int8"][0]
    path = tmp_path / getattr(files, target)
    size = path.stat().st_size
    path.write_bytes(change(path.read_bytes()))
    with pytest.raises(BundleError) as info:
        ItemTable.open(tmp_path, files)
    message = _one_line(info)
    assert str(path) in message and str(size) in message and "re-export" in message


def test_a_table_path_leaving_the_bundle_is_refused(saved, tmp_path) -> None:
    files = _written(saved, tmp_path)["fp32"][0]
    outside = TableFiles("fp32", files.rows, files.dim, "../elsewhere.bin", None)
    (tmp_path.parent / "elsewhere.bin").write_bytes((tmp_path / files.path).read_bytes())
    with pytest.raises(BundleError):
        ItemTable.open(tmp_path, outside)


@pytest.mark.parametrize(("entry", "words"), [
    ([], "not an object"),
    ({"storage": "fp32", "rows": 3, "dim": 2, "path": "tables/x.bin"}, "fields"),
    ({"storage": "bf16", "rows": 3, "dim": 2, "path": "x", "scales": None}, "storage 'bf16'"),
    ({"storage": "fp32", "rows": 0, "dim": 2, "path": "x", "scales": None}, "rows 0"),
    ({"storage": "fp32", "rows": 3, "dim": True, "path": "x", "scales": None}, "dim True"),
    ({"storage": "int8", "rows": 3, "dim": 2, "path": "x", "scales": None}, "needs scales"),
    ({"storage": "fp16", "rows": 3, "dim": 2, "path": "x", "scales": "y"}, "has no scales"),
])
def test_a_malformed_manifest_entry_is_named(entry, words) -> None:
    with pytest.raises(BundleError) as info:
        TableFiles.from_dict(entry, "B/manifest.json")
    message = _one_line(info)
    assert message.startswith("B/manifest.json: item table entry") and words in message


def test_entries_round_trip() -> None:
    files = TableFiles("int8", 41, 16, "tables/item_table.int8.bin", "tables/item_table.int8.scales.bin")
    assert TableFiles.from_dict(files.to_dict(), "m") == files


def _refused_write(tmp_path, chunks, rows, storages=STORAGES):
    with pytest.raises(CheckpointError) as info:
        write_tables(iter(chunks), rows, 4, tmp_path / TABLE_DIR, storages)
    assert list((tmp_path / TABLE_DIR).iterdir()) == []  # nothing published, no partial left
    return _one_line(info)


def test_non_finite_rows_are_named_and_nothing_is_published(tmp_path) -> None:
    good = np.ones((5, 4), np.float32)
    bad = good.copy()
    bad[2, 1] = np.nan
    bad[4, 0] = -np.inf
    message = _refused_write(tmp_path, [good, bad], 10)
    assert "rows [7, 9]" in message and "NaN or inf" in message


def test_a_row_count_other_than_the_configs_is_refused(tmp_path) -> None:
    rows = np.ones((5, 4), np.float32)
    assert "5 rows" in _refused_write(tmp_path, [rows], 6) and "6" in _refused_write(tmp_path, [rows], 6)
    assert "more than the 4 rows" in _refused_write(tmp_path, [rows], 4)


def test_a_row_beyond_float16_is_refused_for_an_fp16_table(tmp_path) -> None:
    rows = np.ones((5, 4), np.float32)
    rows[3, 2] = 1e6
    assert "row 3 exceeds float16" in _refused_write(tmp_path, [rows], 5, ["fp32", "fp16"])
    write_tables([rows], 5, 4, tmp_path / TABLE_DIR, ["fp32", "int8"])  # the others hold it


def test_a_chunk_of_the_wrong_width_or_dtype_is_refused(tmp_path) -> None:
    assert "float32 [k, 4]" in _refused_write(tmp_path, [np.ones((5, 3), np.float32)], 5)
    assert "float64" in _refused_write(tmp_path, [np.ones((5, 4))], 5)


# ---------------------------------------------------------------------------- disk space
def test_an_output_larger_than_the_free_space_is_refused_before_writing(tmp_path) -> None:
    import shutil

    from astro_trt.artifacts import FREE_SPACE_MARGIN, check_free_space
    from astro_trt.errors import ArtifactError

    free = shutil.disk_usage(tmp_path).free
    out = tmp_path / "not" / "yet" / "bundle"  # judged by the file system of the nearest folder
    assert check_free_space(out, 1 << 20) >= (1 << 20) + FREE_SPACE_MARGIN
    with pytest.raises(BundleError) as info:
        check_free_space(out, free, "--out", BundleError)  # the margin on top cannot fit
    message = _one_line(info)
    assert str(out) in message and "GiB free" in message and "another disk" in message
    with pytest.raises(ArtifactError):
        check_free_space(out, 1 << 62)
    assert not (tmp_path / "not").exists()


# ---------------------------------------------------------------------------- large tables: positioned reads
def test_a_large_tables_rows_are_read_by_position_and_equal_the_mapped_ones(saved, tmp_path, monkeypatch) -> None:
    from astro_trt.model import item_table

    written = _written(saved, tmp_path)
    ids = np.array([[0, 0, 40, 3], [4, 5, 6, 40]])  # repeats and a run of consecutive rows
    mapped = {name: ItemTable.open(tmp_path, files) for name, (files, _) in written.items()}
    monkeypatch.setattr(item_table, "MAP_BYTES", 0)  # every file-backed table is "large"
    for name, (files, _) in written.items():
        table = ItemTable.open(tmp_path, files)
        assert table._reader is not None and (table._scale_reader is not None) == (files.scales is not None)
        assert isinstance(mapped[name]._stored, np.memmap) and not isinstance(table._stored, np.ndarray)
        assert table.lookup(ids).tobytes() == mapped[name].lookup(ids).tobytes()
        assert table.lookup(np.arange(table.rows)).shape == (table.rows, table.dim)  # one run: one read
        assert table.lookup(np.zeros((2, 0), np.int64)).shape == (2, 0, table.dim)
        # The chunks a device copy takes are the stored rows themselves, read or mapped alike.
        mapped_table = mapped[name]
        for start, stop in ((0, 7), (7, table.rows), (5, 5)):
            got, want = table.stored_rows(start, stop), mapped_table.stored_rows(start, stop)
            assert got[0].tobytes() == np.asarray(want[0]).tobytes() and got[0].dtype == want[0].dtype
            assert (got[1] is None) == (want[1] is None) and (got[1] is None or np.array_equal(got[1], want[1]))
        with pytest.raises(DataError, match="not inside"):
            table.stored_rows(0, table.rows + 1)
    # A file cut after it was opened ends the read with a one-line error, not short rows.
    files = written["fp32"][0]
    table = ItemTable.open(tmp_path, files)
    with open(tmp_path / files.path, "r+b") as fh:
        fh.truncate(10 * files.dim * 4)
    with pytest.raises(BundleError) as info:
        table.lookup(np.array([3, 20]))
    assert "ends before row 20" in _one_line(info)


def test_a_table_or_checkpoint_the_disk_cannot_hold_is_refused_before_a_byte_is_written(
        saved, tmp_path, monkeypatch) -> None:
    from collections import namedtuple

    from astro_trt import artifacts
    from astro_trt.errors import ArtifactError

    _, model, cfg = saved
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(artifacts.shutil, "disk_usage", lambda _path: usage(1 << 40, 1 << 40, 10 << 20))
    # 64 MiB of margin on top of a few bytes of table: more than the 10 MiB free.
    with pytest.raises(ArtifactError, match=r"item table .*10\.0 MiB free"):
        write_tables([np.ones((5, 4), np.float32)], 5, 4, tmp_path / "out" / TABLE_DIR, STORAGES)
    with pytest.raises(CheckpointError, match=r"checkpoint .*10\.0 MiB free"):
        save_checkpoint(tmp_path / "ckpt2", model, cfg)
    assert not (tmp_path / "out").exists() and not (tmp_path / "ckpt2").exists()
