"""MovieLens-100k: fetch into a local cache (offline-friendly), load, and turn into requests.

The data ships inside the RecBole wheel on PyPI; ``pip download --no-deps`` fetches just that
2 MB wheel (none of RecBole's own dependencies), whose sha256 is pinned below, and the three
atomic files are copied out of it into ``<cache>/ml-100k/``. The GroupLens ``u.data`` file works too (``source``).

Mapping (docs/model.md §7): behaviour = rating 1..5; blocks: all, rating >= 4, rating <= 2;
tasks: like (rating >= 4), love (rating == 5); scenario = 0 weekday / 1 weekend (UTC).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from astro_trt.artifacts import check_destination, sha256_file, staged_directory
from astro_trt.config import ASTROConfig
from astro_trt.errors import DataError
from astro_trt.model.requests import Request
from astro_trt.model.sequences import Strategy, UserTimeline, strategy

RECBOLE_VERSION = "1.2.1"
WHEEL_NAME = f"recbole-{RECBOLE_VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
WHEEL_DIR = "recbole/dataset_example/ml-100k"
# The files as RecBole ships them; a cached copy that no longer matches is refused.
FILE_SHA256 = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
    "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
}
INTER = "ml-100k.inter"
INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
DATASET = "ml-100k"

ML100K_STRATEGIES: tuple[Strategy, ...] = (
    strategy("all"),
    strategy("liked", (4, 5)),
    strategy("disliked", (1, 2)),
)
ML100K_TASKS = ("like", "love")


def _fix() -> str:
    return "run `astro-trt data ml-100k` (with network, or --source pointing at u.data or the RecBole wheel)"


# ------------------------------------------------------------------ cache and fetch
def default_cache_dir() -> Path:
    env = os.environ.get("ASTRO_TRT_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "astro-trt"


def dataset_dir(cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


def _download_wheel(into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           f"recbole=={RECBOLE_VERSION}", "-d", str(into), "-q"]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        detail = getattr(exc, "stderr", None) or str(exc)
        raise DataError(
            f"could not download the RecBole {RECBOLE_VERSION} wheel that holds ml-100k "
            f"({detail.strip().splitlines()[-1] if detail.strip() else exc}); {_fix()}"
        ) from None
    wheel = into / WHEEL_NAME
    if not wheel.is_file():
        raise DataError(f"pip download did not produce {WHEEL_NAME} in {into}; {_fix()}")
    return wheel


def _files_from_wheel(wheel: Path, staging: Path) -> None:
    actual = sha256_file(wheel)
    if actual != WHEEL_SHA256:
        raise DataError(
            f"{wheel}: sha256 {actual} does not match the pinned {WHEEL_SHA256} of {WHEEL_NAME}; "
            "the file is corrupted or not that wheel: delete it and run `astro-trt data ml-100k` again"
        )
    try:
        with zipfile.ZipFile(wheel) as archive:
            for name in FILE_SHA256:
                (staging / name).write_bytes(archive.read(f"{WHEEL_DIR}/{name}"))
    except (zipfile.BadZipFile, KeyError) as exc:  # pragma: no cover - the hash check comes first
        raise DataError(f"{wheel}: not a readable RecBole wheel ({exc}); {_fix()}") from None
    for name, expected in FILE_SHA256.items():
        if sha256_file(staging / name) != expected:  # pragma: no cover - implied by the wheel hash
            raise DataError(f"{name} in {wheel} does not match its pinned sha256; {_fix()}")


def _files_from_udata(source: Path, staging: Path) -> None:
    path = source / "u.data" if source.is_dir() else source
    if not path.is_file():
        raise DataError(f"{source}: no u.data file there; point --source at u.data, a folder holding it, "
                        f"or {WHEEL_NAME}")
    interactions = read_interactions(path)  # validates the format before anything is written
    body = "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in zip(
        interactions.users, interactions.items, interactions.ratings, interactions.times, strict=True))
    (staging / INTER).write_text(INTER_HEADER + body)


def fetch_ml100k(cache_dir: str | Path | None = None, *, source: str | Path | None = None,
                 force: bool = False) -> Path:
    """Make ``<cache>/ml-100k/ml-100k.inter`` (and .item/.user when from the wheel) exist and
    return that folder. ``source``: a u.data file, a folder holding u.data, or the RecBole wheel;
    otherwise the wheel is downloaded with pip. The folder is replaced atomically: a failure
    leaves the cache as it was."""
    target = dataset_dir(cache_dir) / DATASET
    if (target / INTER).is_file() and not force and source is None:
        return target
    check_destination(target.parent, "--cache-dir")  # /proc, a file, a read-only folder: one line, not OSError
    target.parent.mkdir(parents=True, exist_ok=True)
    # The download lands in its own temporary folder; the dataset folder replaces the cache's
    # through the project's one atomic mechanism.
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".ml-100k-") as tmp, \
            staged_directory(target) as staging:
        if source is None:
            _files_from_wheel(_download_wheel(Path(tmp)), staging)
        else:
            src = Path(source).expanduser()
            if not src.exists():
                raise DataError(f"--source {src} does not exist; {_fix()}")
            if src.suffix == ".whl":
                _files_from_wheel(src, staging)
            else:
                _files_from_udata(src, staging)
    return target


# ------------------------------------------------------------------ reading
@dataclass(frozen=True)
class Interactions:
    """Ratings as parallel int64 arrays, in file order."""

    users: np.ndarray
    items: np.ndarray
    ratings: np.ndarray
    times: np.ndarray
    sha256: str

    def __len__(self) -> int:
        return len(self.users)


_COLUMNS = ("user_id", "item_id", "rating", "timestamp")


def read_interactions(path: str | Path) -> Interactions:
    """Read a RecBole atomic ``.inter`` file (typed header like ``user_id:token``) or a GroupLens
    ``u.data`` file (no header; user, item, rating, timestamp), tab separated."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; {_fix()}") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a text file; expected a tab-separated ratings file") from None
    if not lines:
        raise DataError(f"{path}: empty ratings file; {_fix()}")
    columns = [0, 1, 2, 3]
    first = lines[0].split("\t")
    if any(":" in field for field in first):  # RecBole typed header
        names = [field.split(":")[0] for field in first]
        missing = [c for c in _COLUMNS if c not in names]
        if missing:
            raise DataError(f"{path}: header lacks columns {missing}; expected {list(_COLUMNS)}")
        columns = [names.index(c) for c in _COLUMNS]
        lines = lines[1:]
    try:
        rows = np.array([[int(float(f)) for f in (line.split("\t")[c] for c in columns)]
                         for line in lines if line.strip()], dtype=np.int64).reshape(-1, 4)
    except (ValueError, IndexError):
        raise DataError(f"{path}: malformed line; expected tab-separated user, item, rating, timestamp") from None
    if len(rows) == 0:
        raise DataError(f"{path}: no ratings in the file; {_fix()}")
    if rows[:, 2].min() < 1 or rows[:, 2].max() > 5:
        raise DataError(f"{path}: ratings must be 1..5, found {rows[:, 2].min()}..{rows[:, 2].max()}")
    if rows[:, 1].min() < 1:
        raise DataError(f"{path}: item ids must be >= 1 (0 is padding), found {rows[:, 1].min()}")
    return Interactions(rows[:, 0].copy(), rows[:, 1].copy(), rows[:, 2].copy(), rows[:, 3].copy(), sha256_file(path))


def load_ml100k(cache_dir: str | Path | None = None) -> Interactions:
    """The ml-100k ratings, fetched into the cache first if they are not there. A cached file
    that differs from the pinned RecBole copy is refused (unless it came from --source u.data,
    whose content was validated when it was written)."""
    folder = fetch_ml100k(cache_dir)
    inter = folder / INTER
    data = read_interactions(inter)
    if (folder / "ml-100k.item").exists() and data.sha256 != FILE_SHA256[INTER]:
        raise DataError(
            f"{inter}: sha256 {data.sha256} does not match the pinned RecBole copy; the cache is corrupted: "
            "run `astro-trt data ml-100k --force`"
        )
    return data


# ------------------------------------------------------------------ requests
SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class SplitSpec:
    """Chronological per-user split: each user's time-sorted events are cut at ``train_frac``
    and ``train_frac + valid_frac`` of their count; a request's candidates are the next
    ``candidates`` events of one window, its history every event strictly before the first."""

    candidates: int = 10
    train_frac: float = 0.8
    valid_frac: float = 0.1

    def validate(self) -> None:
        if self.candidates < 1:
            raise DataError(f"candidates per request must be >= 1, got {self.candidates}")
        if not (0 < self.train_frac and 0 < self.valid_frac and self.train_frac + self.valid_frac < 1):
            raise DataError(
                f"split fractions train={self.train_frac}, valid={self.valid_frac} must be positive "
                "and leave room for test"
            )

    def windows(self, n: int) -> dict[str, tuple[int, int]]:
        a = int(n * self.train_frac)
        b = int(n * (self.train_frac + self.valid_frac))
        return {"train": (0, a), "valid": (a, b), "test": (b, n)}


def scenario_of(unix_seconds: int) -> int:
    """0 weekday / 1 weekend, in UTC. Day 0 of the epoch (1970-01-01) was a Thursday."""
    weekday = (unix_seconds // 86400 + 3) % 7  # 0 = Monday
    return int(weekday >= 5)


def task_labels(ratings: np.ndarray) -> np.ndarray:
    """[K] ratings -> [K, 2] float32 labels: like (>= 4), love (== 5)."""
    return np.stack([ratings >= 4, ratings == 5], axis=-1).astype(np.float32)


def build_requests(interactions: Interactions, cfg: ASTROConfig, split: str, spec: SplitSpec) -> list[Request]:
    """All requests of one split, users in ascending id order, cuts in time order."""
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}'; choose one of {list(SPLITS)}")
    spec.validate()
    if cfg.num_blocks != len(ML100K_STRATEGIES) or cfg.num_tasks != len(ML100K_TASKS):
        raise DataError(f"config '{cfg.name}' has {cfg.num_blocks} blocks / {cfg.num_tasks} tasks; ml-100k needs "
                        f"{len(ML100K_STRATEGIES)} / {len(ML100K_TASKS)}: use --config ml100k")
    if cfg.num_behaviors < 6:
        raise DataError(f"config '{cfg.name}' has num_behaviors={cfg.num_behaviors}; ratings 1..5 need 6")
    if interactions.items.max() > cfg.num_items:
        raise DataError(f"item id {interactions.items.max()} exceeds config '{cfg.name}' num_items={cfg.num_items}")
    order = np.lexsort((interactions.times, interactions.users))  # by user, then time (stable)
    users = interactions.users[order]
    bounds = np.flatnonzero(np.diff(users)) + 1
    requests: list[Request] = []
    for idx in np.split(order, bounds):
        timeline = UserTimeline(interactions.items[idx], interactions.ratings[idx], interactions.times[idx],
                                ML100K_STRATEGIES)
        start, end = spec.windows(len(timeline))[split]
        for cut in range(start, end, spec.candidates):
            stop = min(cut + spec.candidates, end)
            request_time = int(timeline.times[cut])
            blocks = timeline.blocks(request_time, cfg.max_len)
            requests.append(Request(
                user=int(interactions.users[idx[0]]),
                items=blocks.items, behaviors=blocks.behaviors, times=blocks.times, lengths=blocks.lengths,
                scenario=scenario_of(request_time), request_time=request_time,
                cand_items=timeline.items[cut:stop].copy(),
                cand_labels=task_labels(timeline.behaviors[cut:stop]),
            ))
    return requests


def load_ml100k_requests(cfg: ASTROConfig, split: str, *, spec: SplitSpec | None = None,
                         cache_dir: str | Path | None = None) -> list[Request]:
    return build_requests(load_ml100k(cache_dir), cfg, split, spec or SplitSpec())


def fingerprint(interactions: Interactions, spec: SplitSpec, counts: dict[str, int] | None = None) -> dict:
    """What a checkpoint was trained and evaluated on, for its data.json."""
    out = {
        "dataset": DATASET,
        "inter_sha256": interactions.sha256,
        "ratings": len(interactions),
        "users": int(len(np.unique(interactions.users))),
        "items": int(len(np.unique(interactions.items))),
        "split": dataclasses.asdict(spec),
        "strategies": [{"name": s.name, "behaviors": sorted(s.behaviors) if s.behaviors else None}
                       for s in ML100K_STRATEGIES],
        "tasks": {"like": "rating >= 4", "love": "rating == 5"},
    }
    if counts is not None:
        out["requests"] = dict(counts)
    return out


def split_spec_of(fingerprint_json: dict) -> SplitSpec:
    """The SplitSpec a checkpoint's data.json (written by ``fingerprint``) records."""
    return SplitSpec(**fingerprint_json.get("split", {}))



__all__ = [
    "FILE_SHA256", "ML100K_STRATEGIES", "ML100K_TASKS", "SPLITS", "WHEEL_SHA256", "Interactions", "SplitSpec",
    "build_requests", "dataset_dir", "split_spec_of", "default_cache_dir", "fetch_ml100k", "fingerprint", "load_ml100k",
    "load_ml100k_requests", "read_interactions", "scenario_of", "task_labels",
]
