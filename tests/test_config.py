"""ASTROConfig: JSON round trip, presets, and every validation error naming the field."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from astro_trt.config import PRESETS, ASTROConfig, preset
from astro_trt.errors import ConfigError

# Names end up in one-line messages: control and line-separator characters are refused.
_LABEL = st.characters(blacklist_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"))


@st.composite
def configs(draw: st.DrawFn) -> ASTROConfig:
    heads = draw(st.integers(1, 8))
    blocks = draw(st.integers(1, 5))
    tasks = draw(st.integers(1, 4))
    return ASTROConfig(
        name=draw(st.text(_LABEL, min_size=1, max_size=12)),
        num_items=draw(st.integers(1, 10**6)),
        num_behaviors=draw(st.integers(2, 20)),
        num_scenarios=draw(st.integers(1, 8)),
        d_model=heads * draw(st.integers(1, 64)),
        num_heads=heads,
        num_layers=draw(st.integers(1, 24)),
        num_blocks=blocks,
        max_len=draw(st.integers(1, 1000)),
        num_tasks=tasks,
        ffn_dim=draw(st.integers(1, 2048)),
        num_pos_buckets=draw(st.integers(2, 64)),
        num_time_buckets=draw(st.integers(3, 64)),
        time_bucket_max=draw(st.integers(2, 2**40)),
        dropout=draw(st.floats(0.0, 0.99)),
        layer_norm_eps=draw(st.floats(1e-12, 1e-3)),
        task_names=tuple(draw(st.lists(st.text(_LABEL, min_size=1, max_size=5), min_size=tasks, max_size=tasks))),
        block_names=draw(st.sampled_from([(), tuple(f"b{i}" for i in range(blocks))])),
    )


@settings(max_examples=60, deadline=None)
@given(configs())
def test_json_round_trip_is_identity(cfg: ASTROConfig) -> None:
    again = ASTROConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg
    assert hash(again) == hash(cfg)  # tuples survive JSON lists


def test_save_and_load_file(tmp_path) -> None:
    cfg = PRESETS["ml100k"]
    cfg.save(tmp_path / "config.json")
    assert ASTROConfig.load(tmp_path / "config.json") == cfg


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid_and_match_the_spec_table(name: str) -> None:
    cfg = preset(name)
    cfg.validate()
    # docs/model.md §7: name -> (d, H, N_L, Nb, L, T)
    table = {
        "ml100k": (64, 4, 2, 3, 50, 2),
        "climber": (128, 4, 2, 4, 50, 4),
        "climber-large": (256, 8, 12, 4, 200, 4),
    }
    got = (cfg.d_model, cfg.num_heads, cfg.num_layers, cfg.num_blocks, cfg.max_len, cfg.num_tasks)
    assert got == table[name]
    assert cfg.head_dim * cfg.num_heads == cfg.d_model
    assert cfg.fuse_hidden == cfg.num_blocks * cfg.d_model // 4
    assert cfg.target_behavior == cfg.num_behaviors


def test_ml100k_preset_follows_the_movielens_mapping() -> None:
    cfg = preset("ml100k")
    assert cfg.num_behaviors == 6  # ratings 1..5 plus padding 0; TARGET is id 6
    assert cfg.num_scenarios == 2 and cfg.task_names == ("like", "love")


def test_unknown_preset_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match="climber-large"):
        preset("nope")


BASE = PRESETS["ml100k"].to_dict()


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"d_model": 66}, ["d_model=66", "num_heads=4", "divides"]),
        ({"num_heads": 0}, ["num_heads", "positive"]),
        ({"num_items": 0}, ["num_items", "positive"]),
        ({"num_layers": -1}, ["num_layers", "positive"]),
        ({"num_blocks": 0}, ["num_blocks", "positive"]),
        ({"max_len": 0}, ["max_len", "positive"]),
        ({"num_tasks": 0, "task_names": []}, ["num_tasks", "positive"]),
        ({"ffn_dim": 0}, ["ffn_dim", "positive"]),
        ({"num_scenarios": 0}, ["num_scenarios", "positive"]),
        ({"d_model": 64.0}, ["d_model", "positive integer"]),
        ({"num_layers": True}, ["num_layers", "positive integer"]),
        ({"num_behaviors": 1}, ["num_behaviors", ">= 2"]),
        ({"num_pos_buckets": 1}, ["num_pos_buckets", ">= 2"]),
        ({"num_time_buckets": 2}, ["num_time_buckets", ">= 3"]),
        ({"time_bucket_max": 1}, ["time_bucket_max", ">= 2"]),
        ({"dropout": 1.0}, ["dropout", "[0, 1)"]),
        ({"dropout": -0.1}, ["dropout", "[0, 1)"]),
        ({"task_names": ["like"]}, ["task_names", "num_tasks=2"]),
        ({"block_names": ["a", "b"]}, ["block_names", "num_blocks=3"]),
    ],
)
def test_invalid_values_name_the_field(changes: dict, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        ASTROConfig.from_dict({**BASE, **changes})
    for word in words:
        assert word in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_key_is_named_with_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown config keys \['d_modle'\]"):
        ASTROConfig.from_dict({**BASE, "d_modle": 64})


@pytest.mark.parametrize("key", ["name", "num_items", "d_model", "ffn_dim"])
def test_missing_required_key_is_named(key: str) -> None:
    data = dict(BASE)
    del data[key]
    with pytest.raises(ConfigError, match=rf"missing config keys \['{key}'\]"):
        ASTROConfig.from_dict(data, source="x.json")


def test_optional_keys_take_their_defaults() -> None:
    required = {k: BASE[k] for k in ("name", "num_items", "num_behaviors", "num_scenarios", "d_model",
                                     "num_heads", "num_layers", "num_blocks", "max_len", "num_tasks", "ffn_dim")}
    cfg = ASTROConfig.from_dict(required)
    assert cfg.time_bucket_max == 2**26 and cfg.num_time_buckets == 32


def test_not_an_object_and_bad_json_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="expected a JSON object"):
        ASTROConfig.from_dict([1, 2])  # type: ignore[arg-type]
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON"):
        ASTROConfig.load(bad)
    with pytest.raises(ConfigError, match="not found"):
        ASTROConfig.load(tmp_path / "missing.json")
