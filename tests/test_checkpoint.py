"""Checkpoints: the round trip is exact, the write is atomic, and every bad checkpoint gives a
one-line error of the right class that names the file (and the tensor or field)."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from astro_trt import __version__
from astro_trt.errors import AstroError, CheckpointError, ConfigError
from astro_trt.model.astro import ASTRO
from astro_trt.model.checkpoint import checkpoint_sha256, copy_checkpoint, load_checkpoint, save_checkpoint


@pytest.fixture
def cfg(make_config):
    return make_config()


@pytest.fixture
def saved(tmp_path, cfg, make_model):
    model = make_model(cfg, 0)
    path = save_checkpoint(tmp_path / "ckpt", model, cfg, metrics={"auc": [0.7, 0.8]},
                           extra={"training": {"epochs": 3}})
    return path, model


def weights_of(path):
    return path / "model.safetensors"


def expect(error, path, *words):
    with pytest.raises(error) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    return message


# ------------------------------------------------------------------ round trip and layout
def test_round_trip_gives_identical_logits(saved, cfg, make_history) -> None:
    path, model = saved
    ckpt = load_checkpoint(path)
    assert ckpt.config == cfg and ckpt.directory == path
    assert not ckpt.model.training
    h = make_history(cfg, 2, torch.Generator().manual_seed(0))
    cands = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(ckpt.model(h, cands), model(h, cands))
        assert torch.equal(ckpt.model.full(h, cands), model.full(h, cands))
    # Loading from the weights file itself works the same.
    assert load_checkpoint(weights_of(path)).sha256 == ckpt.sha256 == checkpoint_sha256(path)


def test_directory_holds_json_files_and_safetensors_metadata(saved, cfg) -> None:
    path, _ = saved
    assert sorted(os.listdir(path)) == ["config.json", "metrics.json", "model.safetensors", "training.json"]
    assert json.loads((path / "metrics.json").read_text()) == {"auc": [0.7, 0.8]}
    assert json.loads((path / "training.json").read_text()) == {"epochs": 3}
    from safetensors import safe_open

    with safe_open(str(weights_of(path)), "pt") as fh:
        meta = fh.metadata()
    assert meta["astro_trt_version"] == __version__ and meta["config_name"] == cfg.name
    assert list(path.parent.iterdir()) == [path]  # no staging directory left behind


def test_sha256_matches_hashlib(saved) -> None:
    import hashlib

    path, _ = saved
    assert checkpoint_sha256(weights_of(path)) == hashlib.sha256(weights_of(path).read_bytes()).hexdigest()


def test_existing_checkpoint_is_replaced_whole(saved, cfg, make_model) -> None:
    path, _ = saved
    other = make_model(cfg, 1)
    save_checkpoint(path, other, cfg)  # no metrics/extra this time: the old files must go
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
    loaded = load_checkpoint(path).model
    assert torch.equal(loaded.layers[0].w_q, other.layers[0].w_q)
    assert list(path.parent.iterdir()) == [path]


def test_failed_save_leaves_the_old_checkpoint_untouched(saved, cfg) -> None:
    path, _ = saved
    before = checkpoint_sha256(path)
    with pytest.raises(CheckpointError, match="bad.json"):
        save_checkpoint(path, ASTRO(cfg), cfg, extra={"bad": {"x": object()}})
    with pytest.raises(CheckpointError, match="extra key"):
        save_checkpoint(path, ASTRO(cfg), cfg, extra={"../escape": {}})
    with pytest.raises(CheckpointError, match="item_embedding.weight"):  # weights of another config
        save_checkpoint(path, ASTRO(cfg.replace(num_items=cfg.num_items + 1)), cfg)
    assert checkpoint_sha256(path) == before
    assert sorted(os.listdir(path)) == ["config.json", "metrics.json", "model.safetensors", "training.json"]
    assert list(path.parent.iterdir()) == [path]


# ------------------------------------------------------------------ missing and not-safetensors
def test_missing_directory_and_file(tmp_path, saved) -> None:
    expect(CheckpointError, tmp_path / "nowhere", "nowhere", "no such checkpoint")
    path, _ = saved
    weights_of(path).unlink()
    expect(CheckpointError, path, "model.safetensors", "not found")


def test_missing_or_invalid_config_json(saved) -> None:
    path, _ = saved
    config = path / "config.json"
    data = json.loads(config.read_text())
    config.write_text("{")
    expect(ConfigError, path, "config.json", "not valid JSON")
    config.write_text(json.dumps({**data, "num_heads": 3}))
    expect(ConfigError, path, "config.json", "num_heads=3")
    del data["d_model"]
    config.write_text(json.dumps(data))
    expect(ConfigError, path, "config.json", "d_model")
    config.unlink()
    expect(ConfigError, path, "config.json", "not found")


@pytest.mark.parametrize("cut", ["prefix", "header", "data", "last_byte"])
def test_truncated_file(saved, cut) -> None:
    path, _ = saved
    raw = weights_of(path).read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    keep = {"prefix": 5, "header": 8 + header_len // 2, "data": 8 + header_len + 100, "last_byte": len(raw) - 1}[cut]
    weights_of(path).write_bytes(raw[:keep])
    message = expect(CheckpointError, path, "model.safetensors", "truncated")
    if cut in ("data", "last_byte"):
        assert "tensor '" in message  # names the first tensor whose bytes are missing


def test_torch_pickle_is_refused_without_unpickling(saved, cfg) -> None:
    path, model = saved
    torch.save(model.state_dict(), weights_of(path))
    expect(CheckpointError, path, "model.safetensors", "not a safetensors file", "torch.save")


@pytest.mark.parametrize("blob", [os.urandom(4096), b"\x80\x04K\x01." * 10, b"{}" * 20, b""])
def test_random_or_empty_bytes(saved, blob) -> None:
    path, _ = saved
    weights_of(path).write_bytes(blob)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert "model.safetensors" in str(info.value) and "\n" not in str(info.value)


def test_not_a_safetensors_path(tmp_path) -> None:
    other = tmp_path / "weights.pt"
    other.write_bytes(b"x")
    expect(CheckpointError, other, "weights.pt", ".safetensors")


# ------------------------------------------------------------------ weights that do not fit the config
def resave(path, tensors) -> None:
    save_file(tensors, str(weights_of(path)))


def test_missing_tensor_is_named(saved) -> None:
    path, model = saved
    tensors = dict(model.state_dict())
    del tensors["layers.1.w_k"]
    resave(path, tensors)
    expect(CheckpointError, path, "lacks tensors", "'layers.1.w_k'")


def test_unexpected_tensor_is_named(saved) -> None:
    path, model = saved
    resave(path, {**model.state_dict(), "extra.bias": torch.zeros(3)})
    expect(CheckpointError, path, "unexpected tensors", "'extra.bias'")


def test_fewer_layers_names_num_layers(saved, cfg, make_model) -> None:
    path, _ = saved
    resave(path, make_model(cfg.replace(num_layers=1), 0).state_dict())
    expect(CheckpointError, path, "'layers.1.", "1 layers", "num_layers=2")


@pytest.mark.parametrize(
    ("field", "value", "tensor"),
    [
        ("num_items", 33, "item_embedding.weight"),
        ("ffn_dim", 20, "layers.0.w_1"),
        ("num_scenarios", 3, "layers.0.theta"),
        ("num_time_buckets", 5, "time_table"),
        ("num_tasks", 4, "fusion.head_2.weight"),
    ],
)
def test_shape_mismatch_names_tensor_and_field(saved, cfg, make_model, field, value, tensor) -> None:
    path, _ = saved
    resave(path, make_model(cfg.replace(**{field: value}), 0).state_dict())
    message = expect(CheckpointError, path, f"'{tensor}'", field)
    assert f"weights imply {value}" in message


def test_wrong_dtype_is_named(saved) -> None:
    path, model = saved
    tensors = dict(model.state_dict())
    tensors["pos_table"] = tensors["pos_table"].half()
    resave(path, tensors)
    expect(CheckpointError, path, "'pos_table'", "F16", "float32")


# ---------------------------------------------------------------------------- recorded config, digest, copy
@pytest.fixture
def ckpt_dir(saved):
    return saved[0]


@pytest.mark.parametrize(("key", "value"), [("max_len", 9), ("time_bucket_max", 1000), ("layer_norm_eps", 1e-3)])
def test_fields_the_shapes_cannot_reveal_are_checked_against_the_recorded_config(ckpt_dir, key, value) -> None:
    config = json.loads((ckpt_dir / "config.json").read_text())
    (ckpt_dir / "config.json").write_text(json.dumps({**config, key: value}))
    expect(ConfigError, ckpt_dir, key, f"trained with {config[key]!r}")


def test_a_negative_layer_norm_eps_is_a_config_error(ckpt_dir) -> None:
    config = json.loads((ckpt_dir / "config.json").read_text())
    (ckpt_dir / "config.json").write_text(json.dumps({**config, "layer_norm_eps": -1e-5}))
    expect(ConfigError, ckpt_dir, "layer_norm_eps", "(0, 1.0]")


def test_a_flipped_weight_byte_is_refused(ckpt_dir) -> None:
    data = bytearray((ckpt_dir / "model.safetensors").read_bytes())
    data[-3] ^= 0x01  # the low mantissa bits of the last float: parses, shapes fine, values differ
    (ckpt_dir / "model.safetensors").write_bytes(bytes(data))
    expect(CheckpointError, ckpt_dir, "digest recorded")


def test_links_in_a_checkpoint_are_refused_before_anything_is_read(ckpt_dir, tmp_path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("config.json", "model.safetensors"):
        (ckpt_dir / name).rename(outside / name)  # a good file, reached through a link
        (ckpt_dir / name).symlink_to(outside / name)
        expect(AstroError, ckpt_dir, "symbolic link")
        (ckpt_dir / name).unlink()
        (outside / name).rename(ckpt_dir / name)


def test_copy_takes_the_checkpoints_own_documents_only(ckpt_dir, tmp_path) -> None:
    (ckpt_dir / "passwd.json").symlink_to("/etc/passwd")
    (ckpt_dir / "notes.json").write_text("{}")  # not written by save_checkpoint: not part of it
    target = tmp_path / "copy"
    target.mkdir()
    names = copy_checkpoint(ckpt_dir, target)
    assert sorted(names) == sorted(p.name for p in target.iterdir())
    assert "passwd.json" not in names and "notes.json" not in names and "model.safetensors" in names
    assert (target / "model.safetensors").read_bytes() == (ckpt_dir / "model.safetensors").read_bytes()
