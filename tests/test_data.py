"""Data pipeline: multi-scale extraction, the ml-100k fetch/loader/split, synthetic batches, metrics.

Tests on the real ml-100k read it from the cache ($ASTRO_TRT_DATA or ~/.cache/astro-trt) and
fetch it there first (pip download of a 2 MB wheel) on a fresh machine."""

from __future__ import annotations

import calendar
import itertools
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner

from astro_trt.cli.model import data as data_command
from astro_trt.config import preset
from astro_trt.errors import DataError
from astro_trt.model import movielens
from astro_trt.model.metrics import ItemAverageBaseline, auc, evaluate, logloss
from astro_trt.model.requests import PAD_CANDIDATE, Request, batches
from astro_trt.model.sequences import extract_blocks, strategy
from astro_trt.model.synthetic import synthetic_batch

STRATEGIES = (strategy("all"), strategy("liked", (4, 5)), strategy("disliked", (1, 2)))


# ------------------------------------------------------------------ extraction
def test_extraction_right_aligned_filtered_most_recent_and_strictly_before():
    # Events given out of time order on purpose; ratings are the behaviours.
    times = np.array([50, 10, 40, 20, 30, 60, 70])
    items = np.array([5, 1, 4, 2, 3, 6, 7])
    ratings = np.array([5, 1, 4, 2, 5, 1, 3])
    # request at t=60: the event at 60 itself and the one at 70 are not history.
    blocks = extract_blocks(items, ratings, times, 60, STRATEGIES, max_len=4)
    # all: most recent 4 of items 1..5 (times 10..50), oldest first
    assert blocks.items[0].tolist() == [2, 3, 4, 5]
    assert blocks.times[0].tolist() == [20, 30, 40, 50]
    assert blocks.behaviors[0].tolist() == [2, 5, 4, 5]
    # liked (rating >= 4): items 3, 4, 5 -> right-aligned behind one padding slot
    assert blocks.items[1].tolist() == [0, 3, 4, 5]
    assert blocks.behaviors[1].tolist() == [0, 5, 4, 5]
    assert blocks.times[1].tolist() == [0, 30, 40, 50]
    # disliked (rating <= 2): items 1, 2 (item 6 with rating 1 is at t=60, not before)
    assert blocks.items[2].tolist() == [0, 0, 1, 2]
    assert blocks.lengths.tolist() == [4, 3, 2]


def test_extraction_empty_block_and_nothing_before():
    blocks = extract_blocks(np.array([1, 2]), np.array([3, 3]), np.array([100, 200]), 100, STRATEGIES, max_len=3)
    assert blocks.lengths.tolist() == [0, 0, 0]
    assert not blocks.items.any() and not blocks.times.any() and not blocks.behaviors.any()


def test_extraction_rejects_ragged_events():
    with pytest.raises(DataError, match="equal-length"):
        extract_blocks(np.array([1, 2]), np.array([3]), np.array([1, 2]), 5, STRATEGIES, max_len=3)


# ------------------------------------------------------------------ ml-100k
@pytest.fixture(scope="module")
def ml100k() -> movielens.Interactions:
    return movielens.load_ml100k()


@pytest.fixture(scope="module")
def splits(ml100k):
    cfg = preset("ml100k")
    spec = movielens.SplitSpec(candidates=10)
    return {s: movielens.build_requests(ml100k, cfg, s, spec) for s in movielens.SPLITS}


def test_ml100k_shape(ml100k):
    assert len(ml100k) == 100_000
    assert ml100k.items.min() == 1 and ml100k.items.max() == preset("ml100k").num_items
    assert set(np.unique(ml100k.ratings).tolist()) == {1, 2, 3, 4, 5}
    assert ml100k.sha256 == movielens.FILE_SHA256["ml-100k.inter"]


def test_split_has_no_leakage(ml100k, splits):
    time_of = {(u, i): t for u, i, t in zip(ml100k.users.tolist(), ml100k.items.tolist(), ml100k.times.tolist(),
                                               strict=True)}
    assert len(time_of) == len(ml100k)  # one rating per (user, item): pairs identify events
    seen: dict[tuple[int, int], str] = {}
    last_time: dict[str, dict[int, int]] = {s: {} for s in movielens.SPLITS}
    first_time: dict[str, dict[int, int]] = {s: {} for s in movielens.SPLITS}
    for split, requests in splits.items():
        for r in requests:
            valid = r.items > 0
            assert (r.times[valid] < r.request_time).all()  # history strictly before the request
            assert (r.times[~valid] == 0).all() and (r.behaviors[~valid] == 0).all()
            assert (valid.sum(axis=1) == r.lengths).all()
            assert all(valid[k, r.items.shape[1] - n :].all() for k, n in enumerate(r.lengths))  # right-aligned
            cand_times = [time_of[(r.user, int(i))] for i in r.cand_items]
            assert min(cand_times) == r.request_time
            for item in r.cand_items.tolist():
                assert (r.user, item) not in seen, "an event is a candidate twice"
                seen[(r.user, item)] = split
            last_time[split][r.user] = max(last_time[split].get(r.user, 0), max(cand_times))
            first_time[split].setdefault(r.user, min(cand_times))
    assert len(seen) == len(ml100k)  # every rating is a candidate exactly once
    for earlier, later in (("train", "valid"), ("valid", "test")):
        for user, start in first_time[later].items():
            assert last_time[earlier].get(user, 0) <= start  # windows are chronological per user


def test_labels_and_scenarios(splits):
    r = splits["test"][0]
    assert r.cand_labels.shape == (len(r.cand_items), 2)
    assert movielens.task_labels(np.array([1, 3, 4, 5])).tolist() == [[0, 0], [0, 0], [1, 0], [1, 1]]
    saturday = calendar.timegm((2024, 1, 6, 23, 59, 59))
    monday = calendar.timegm((2024, 1, 8, 0, 0, 0))
    assert movielens.scenario_of(saturday) == 1 and movielens.scenario_of(saturday + 1) == 1
    assert movielens.scenario_of(monday) == 0 and movielens.scenario_of(monday - 1) == 1


def test_wrong_config_is_refused(ml100k):
    with pytest.raises(DataError, match="--config ml100k"):
        movielens.build_requests(ml100k, preset("climber"), "train", movielens.SplitSpec())
    with pytest.raises(DataError, match="unknown split"):
        movielens.build_requests(ml100k, preset("ml100k"), "dev", movielens.SplitSpec())


def test_data_command_refuses_corrupted_wheel_and_keeps_cache(tmp_path):
    wheel = tmp_path / movielens.WHEEL_NAME
    with zipfile.ZipFile(wheel, "w") as archive:  # right layout, wrong bytes
        archive.writestr(f"{movielens.WHEEL_DIR}/ml-100k.inter", movielens.INTER_HEADER + "1\t1\t5\t100\n")
    cache = tmp_path / "cache"
    result = CliRunner().invoke(data_command, ["ml-100k", "--cache-dir", str(cache), "--source", str(wheel)])
    assert isinstance(result.exception, DataError)
    assert "does not match the pinned" in str(result.exception)
    assert not (cache / "ml-100k").exists()  # nothing half-written
    assert not list(cache.glob(".ml-100k-*"))


def test_corrupted_cached_file_is_refused(tmp_path, ml100k):
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    source = movielens.dataset_dir() / "ml-100k"
    for name in movielens.FILE_SHA256:
        (folder / name).write_bytes((source / name).read_bytes())
    text = (folder / "ml-100k.inter").read_text()
    (folder / "ml-100k.inter").write_text(text.replace("\t5\t", "\t4\t", 1))  # one rating changed
    with pytest.raises(DataError, match="--force"):
        movielens.load_ml100k(tmp_path)


def test_udata_source(tmp_path):
    udata = tmp_path / "u.data"
    udata.write_text("1\t10\t5\t1000\n1\t11\t2\t900\n2\t10\t4\t1200\n")
    cache = tmp_path / "cache"
    result = CliRunner().invoke(data_command, ["ml-100k", "--cache-dir", str(cache), "--source", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "3 ratings, 2 users, 2 items" in result.output
    loaded = movielens.load_ml100k(cache)
    assert loaded.items.tolist() == [10, 11, 10] and loaded.times.tolist() == [1000, 900, 1200]
    udata.write_text("1\t10\tfive\t1000\n")
    with pytest.raises(DataError, match="malformed"):
        movielens.fetch_ml100k(tmp_path / "other", source=udata)


# ------------------------------------------------------------------ synthetic
@pytest.mark.parametrize("name", ["ml100k", "climber"])
def test_synthetic_batch_shapes_and_ranges(name):
    cfg = preset(name)
    b = synthetic_batch(cfg, 64, 7, seed=3)
    h = b.history
    nb, length = cfg.num_blocks, cfg.max_len
    assert h.items.shape == h.behaviors.shape == h.times.shape == (64, nb, length)
    assert h.lengths.shape == (64, nb) and h.scenario.shape == h.request_time.shape == (64,)
    assert b.cand_items.shape == b.cand_mask.shape == (64, 7) and b.labels.shape == (64, 7, cfg.num_tasks)
    valid = h.items > 0
    assert (valid.sum(-1) == h.lengths).all()
    assert (valid[..., 1:] >= valid[..., :-1]).all()  # padding first, then valid slots
    assert ((h.behaviors > 0) == valid).all() and h.behaviors.max() < cfg.num_behaviors
    assert h.items.max() <= cfg.num_items
    assert (h.times[valid] < h.request_time[:, None, None].expand_as(h.times)[valid]).all()
    increasing = (h.times[..., 1:] > h.times[..., :-1]) | ~valid[..., :-1]
    assert increasing.all()
    assert {0, length} <= set(h.lengths.unique().tolist())
    assert set(h.scenario.tolist()) == set(range(cfg.num_scenarios))
    assert (b.cand_items[~b.cand_mask] == PAD_CANDIDATE).all() and b.cand_mask[:, 0].all()
    assert (b.labels[~b.cand_mask] == 0).all()
    assert (synthetic_batch(cfg, 64, 7, seed=3).history.times == h.times).all()  # seeded


def test_synthetic_times_hit_every_time_bucket():
    import torch

    from astro_trt.plugins.buckets import bucket_thresholds, bucketize

    cfg = preset("ml100k")
    h = synthetic_batch(cfg, 32, 2, seed=0).history
    times = torch.cat([h.times, h.request_time[:, None, None].expand(-1, cfg.num_blocks, 1)], dim=-1)
    valid = torch.cat([h.items > 0, torch.ones(32, cfg.num_blocks, 1, dtype=torch.bool)], dim=-1)
    dt = (times[..., :, None] - times[..., None, :]).abs()
    pair = valid[..., :, None] & valid[..., None, :]
    thr = torch.tensor(bucket_thresholds(cfg.num_time_buckets, cfg.time_bucket_max))
    assert set(bucketize(dt[pair], thr).unique().tolist()) == set(range(cfg.num_time_buckets))


# ------------------------------------------------------------------ metrics
def test_auc_hand_computed_and_ties():
    assert auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    # tie between a positive and a negative counts 1/2: pairs (p=.5 vs n=.5) 0.5, (p=.5 vs n=.1) 1
    assert auc(np.array([0.5, 0.5, 0.1]), np.array([1, 0, 0])) == pytest.approx(0.75)
    assert np.isnan(auc(np.array([1.0, 2.0]), np.array([1, 1])))


def test_auc_matches_brute_force_pairs():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, size=200).astype(float)  # many ties
    labels = rng.random(200) < 0.3
    pos, neg = scores[labels], scores[~labels]
    brute = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)])
    assert auc(scores, labels) == pytest.approx(brute, abs=1e-12)


def test_logloss_hand_computed_and_stable():
    expected = -(np.log(1 / (1 + np.exp(-2.0))) + np.log(1 - 1 / (1 + np.exp(1.0)))) / 2
    assert logloss(np.array([2.0, -1.0]), np.array([1, 0])) == pytest.approx(expected, rel=1e-12)
    assert logloss(np.array([1000.0, -1000.0]), np.array([1, 0])) == 0.0
    assert logloss(np.array([-800.0]), np.array([1])) == pytest.approx(800.0)


def test_evaluate_is_independent_of_batch_composition(splits):
    valid = splits["valid"][:300]
    baseline = ItemAverageBaseline(splits["train"], 1682, 2)
    a = evaluate(baseline, batches(valid, 7, num_candidates=10), ("like", "love"))
    b = evaluate(baseline, batches(valid, 300, num_candidates=12, shuffle_seed=1), ("like", "love"))
    for task in ("like", "love"):
        assert a[task]["count"] == b[task]["count"] == sum(len(r.cand_items) for r in valid)
        assert a[task]["auc"] == pytest.approx(b[task]["auc"], abs=1e-12)
        assert a[task]["logloss"] == pytest.approx(b[task]["logloss"], abs=1e-12)
    # an item-average predictor has real signal on ml-100k
    assert 0.65 < a["like"]["auc"] < 0.85


def test_item_average_baseline_values():
    def request(items, likes):
        n = len(items)
        zeros = np.zeros((1, 2), dtype=np.int64)
        labels = np.stack([likes, np.zeros(n)], -1).astype(np.float32)
        return Request(0, zeros, zeros, zeros, np.zeros(1, np.int64), 0, 0, np.array(items), labels)

    base = ItemAverageBaseline([request([1, 1, 2, 2], [1, 1, 0, 1])], num_items=3, num_tasks=2, smoothing=2.0)
    prior = 0.75
    p1 = (2 + 2 * prior) / (2 + 2)
    p3 = prior  # never seen: the prior
    assert base.logits[1, 0] == pytest.approx(np.log(p1 / (1 - p1)))
    assert base.logits[3, 0] == pytest.approx(np.log(p3 / (1 - p3)))
