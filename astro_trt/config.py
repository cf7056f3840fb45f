"""The model configuration: the one definition of every size the model, the exporter, the
engines and the tests agree on. Written into checkpoints and bundle manifests as JSON."""

from __future__ import annotations

import dataclasses
import json
import math
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from astro_trt.artifacts import read_regular_file
from astro_trt.errors import ArtifactError, ConfigError, one_line


@dataclass(frozen=True)
class ASTROConfig:
    """Sizes of one ASTRO model (notation of docs/model.md).

    Id conventions: item ids 1..num_items (0 = padding); behaviour ids 1..num_behaviors-1
    (0 = padding); behaviour id ``num_behaviors`` is TARGET, the candidate token's behaviour.
    """

    name: str
    num_items: int
    num_behaviors: int
    num_scenarios: int
    d_model: int
    num_heads: int
    num_layers: int
    num_blocks: int
    max_len: int
    num_tasks: int
    ffn_dim: int
    num_pos_buckets: int = 32
    num_time_buckets: int = 32
    time_bucket_max: int = 2**26
    dropout: float = 0.1
    layer_norm_eps: float = 1e-5
    task_names: tuple[str, ...] = ()
    block_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Tuples, not lists, so that the config stays hashable after a JSON round trip.
        object.__setattr__(self, "task_names", tuple(self.task_names))
        object.__setattr__(self, "block_names", tuple(self.block_names))
        self.validate()

    # ----------------------------------------------------------------- derived sizes
    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def target_behavior(self) -> int:
        """Behaviour id of candidate tokens: the last row of the behaviour embedding."""
        return self.num_behaviors

    @property
    def fuse_hidden(self) -> int:
        """Hidden width of the bit-wise gate's squeeze-excitation (docs/model.md §5: Nb*d/4)."""
        return max(1, self.num_blocks * self.d_model // 4)

    # ----------------------------------------------------------------- validation
    def validate(self) -> None:
        _check_types(self)
        if self.num_behaviors < 2:
            raise ConfigError(
                f"config '{self.name}': num_behaviors must be >= 2 (id 0 is padding), got {self.num_behaviors}"
            )
        if self.d_model % self.num_heads:
            raise ConfigError(
                f"config '{self.name}': d_model={self.d_model} is not divisible by num_heads={self.num_heads}; "
                "choose num_heads that divides d_model"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"config '{self.name}': dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.layer_norm_eps <= MAX_LAYER_NORM_EPS:
            raise ConfigError(f"config '{self.name}': layer_norm_eps must be in (0, {MAX_LAYER_NORM_EPS}] "
                              f"(it keeps LayerNorm's variance away from zero), got {self.layer_norm_eps}")
        if self.task_names and len(self.task_names) != self.num_tasks:
            raise ConfigError(
                f"config '{self.name}': {len(self.task_names)} task_names for num_tasks={self.num_tasks}"
            )
        if self.block_names and len(self.block_names) != self.num_blocks:
            raise ConfigError(
                f"config '{self.name}': {len(self.block_names)} block_names for num_blocks={self.num_blocks}"
            )

    # ----------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["task_names"] = list(self.task_names)
        out["block_names"] = list(self.block_names)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> ASTROConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown config keys {unknown}; known keys are {sorted(known)}")
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise ConfigError(f"{source}: missing config keys {missing}")
        for key in ("task_names", "block_names"):
            # A string is a sequence too; tuple("like") would silently become four names.
            if key in data and not isinstance(data[key], list | tuple):
                raise ConfigError(f"{source}: {key} must be a list of strings, got {type(data[key]).__name__}")
        try:
            return cls(**data)
        except ConfigError as exc:
            message = str(exc)
            raise ConfigError(message if message.startswith(source) else f"{source}: {message}") from None
        except TypeError as exc:  # pragma: no cover - guarded by the key checks above
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: str | Path, *, follow_symlinks: bool = True) -> ASTROConfig:
        return cls.from_dict(read_config_json(path, follow_symlinks=follow_symlinks), source=str(path))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    def replace(self, **changes: Any) -> ASTROConfig:
        return dataclasses.replace(self, **changes)


# Upper bounds of every integer field. They are far above any model this tool is meant for (the
# largest preset uses at most a tenth of each) and keep a config from asking for what no machine
# has: a time_bucket_max of 2^70 does not fit the int64 times, num_layers 10^6 builds a model for
# minutes before anything checks memory. What a config may allocate as a whole is bounded by the
# machine (model/resources.py).
LIMITS: dict[str, tuple[int, int]] = {
    "num_items": (1, 100_000_000),
    "num_behaviors": (2, 100_000),
    "num_scenarios": (1, 100_000),
    "d_model": (1, 16_384),
    "num_heads": (1, 256),
    "num_layers": (1, 256),
    "num_blocks": (1, 64),
    "max_len": (1, 16_384),
    "num_tasks": (1, 1_024),
    "ffn_dim": (1, 65_536),
    # Bucket thresholds are computed exactly with big integers (plugins/buckets.py): 1024 buckets
    # up to 2^40 s (35,000 years) take a quarter of a second, 4096 up to 2^62 minutes.
    "num_pos_buckets": (2, 1_024),
    "num_time_buckets": (3, 1_024),
    "time_bucket_max": (2, 2**40),
}
MAX_LAYER_NORM_EPS = 1.0
MAX_NAME_CHARS = 200
# config.json of the largest preset is under 1 KB; names lists add little.
MAX_CONFIG_BYTES = 1_000_000
# JSON nesting a config could need: the object and its name lists.
_MAX_NESTING = 8
_TOO_DEEP = object()


def _check_types(cfg: ASTROConfig) -> None:
    """Every field has the JSON type it needs, and every number is finite and inside LIMITS."""
    name = cfg.name
    if not _is_label(name):
        raise ConfigError(f"config name must be a string of 1..{MAX_NAME_CHARS} characters without control "
                          f"characters, got {_short(name)}")
    for key, (low, high) in LIMITS.items():
        value = getattr(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"config '{name}': {key} must be a positive integer, got {type(value).__name__} "
                              f"{_short(value)}; write it without quotes or a decimal point")
        if value < low:
            floor = "a positive integer" if low == 1 else f">= {low}"
            raise ConfigError(f"config '{name}': {key} must be {floor}, got {value}")
        if value > high:
            raise ConfigError(f"config '{name}': {key} must be <= {high} (a bound on what one model may ask "
                              f"for), got {_short(value)}")
    for key in ("dropout", "layer_norm_eps"):
        value = getattr(cfg, key)
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise ConfigError(f"config '{name}': {key} must be a finite number, got {type(value).__name__} "
                              f"{_short(value)}")
    for key in ("task_names", "block_names"):
        for item in getattr(cfg, key):
            if not _is_label(item):
                raise ConfigError(f"config '{name}': {key} must hold strings of 1..{MAX_NAME_CHARS} characters "
                                  f"without control characters, got {_short(item)}")


def _is_label(value: Any) -> bool:
    """A name fit for a one-line message: a non-empty string without control or line-separator
    characters."""
    return (isinstance(value, str) and 0 < len(value) <= MAX_NAME_CHARS
            and not any(unicodedata.category(c)[0] == "C" or unicodedata.category(c) in ("Zl", "Zp") for c in value))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of parsed JSON, giving up past ``limit``."""
    if limit < 0 or not isinstance(value, dict | list):
        return 0
    items = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(v, limit - 1) for v in items), default=0)


def read_config_json(path: str | Path, *, follow_symlinks: bool = True) -> Any:
    """Parsed config.json: a regular UTF-8 file of sane size and nesting, or a one-line ConfigError.
    A FIFO, a device or a directory named config.json is refused without blocking, and so is a
    symlink with ``follow_symlinks=False`` (a checkpoint's own file, which must not point elsewhere)."""
    path = Path(path)
    try:
        raw = read_regular_file(path, max_bytes=MAX_CONFIG_BYTES, follow_symlinks=follow_symlinks)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found; pass an existing config.json "
                          "(a checkpoint directory holds one)") from None
    except ArtifactError as exc:
        raise ConfigError(f"{exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); write config.json as UTF-8 JSON") from None
    try:
        data = json.loads(text, parse_constant=reject_json_constant)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); fix or regenerate it"
        ) from None
    except RecursionError:
        data = _TOO_DEEP
    except ValueError as exc:
        raise ConfigError(f"{path}: not a usable config JSON ({one_line(exc)}); fix or regenerate it") from None
    if data is _TOO_DEEP or _depth(data, _MAX_NESTING) > _MAX_NESTING - 1:
        raise ConfigError(f"{path}: JSON nested deeper than a config ever is; fix or regenerate it")
    return data


def reject_json_constant(token: str) -> None:
    """``json.loads(parse_constant=...)``: NaN and Infinity are not JSON numbers."""
    raise ValueError(f"{token} is not a JSON number")


# The reference configurations of docs/model.md §7. Item and behaviour vocabularies of the two
# paper-scale presets are synthetic-data sizes (the paper's data is private).
PRESETS: dict[str, ASTROConfig] = {
    "ml100k": ASTROConfig(
        name="ml100k", num_items=1682, num_behaviors=6, num_scenarios=2, d_model=64, num_heads=4,
        num_layers=2, num_blocks=3, max_len=50, num_tasks=2, ffn_dim=128,
        task_names=("like", "love"), block_names=("all", "liked", "disliked"),
    ),
    "climber": ASTROConfig(
        name="climber", num_items=100_000, num_behaviors=8, num_scenarios=4, d_model=128, num_heads=4,
        num_layers=2, num_blocks=4, max_len=50, num_tasks=4, ffn_dim=256,
    ),
    "climber-large": ASTROConfig(
        name="climber-large", num_items=100_000, num_behaviors=8, num_scenarios=4, d_model=256,
        num_heads=8, num_layers=12, num_blocks=4, max_len=200, num_tasks=4, ffn_dim=512,
    ),
}


def preset(name: str) -> ASTROConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown config preset '{name}'; choose one of {sorted(PRESETS)}") from None


__all__ = ["ASTROConfig", "LIMITS", "PRESETS", "preset", "read_config_json"]
