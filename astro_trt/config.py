"""The model configuration: the one definition of every size the model, the exporter, the
engines and the tests agree on. Written into checkpoints and bundle manifests as JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from astro_trt.errors import ConfigError


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
        positive = (
            "num_items", "num_behaviors", "num_scenarios", "d_model", "num_heads", "num_layers",
            "num_blocks", "max_len", "num_tasks", "ffn_dim",
        )
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"config '{self.name}': {key} must be a positive integer, got {value!r}")
        if self.num_behaviors < 2:
            raise ConfigError(
                f"config '{self.name}': num_behaviors must be >= 2 (id 0 is padding), got {self.num_behaviors}"
            )
        if self.d_model % self.num_heads:
            raise ConfigError(
                f"config '{self.name}': d_model={self.d_model} is not divisible by num_heads={self.num_heads}; "
                "choose num_heads that divides d_model"
            )
        for key, low in (("num_pos_buckets", 2), ("num_time_buckets", 3)):
            if getattr(self, key) < low:
                raise ConfigError(f"config '{self.name}': {key} must be >= {low}, got {getattr(self, key)}")
        if self.time_bucket_max < 2:
            raise ConfigError(f"config '{self.name}': time_bucket_max must be >= 2, got {self.time_bucket_max}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"config '{self.name}': dropout must be in [0, 1), got {self.dropout}")
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
        try:
            return cls(**data)
        except TypeError as exc:  # pragma: no cover - guarded by the key checks above
            raise ConfigError(f"{source}: {exc}") from exc

    @classmethod
    def load(cls, path: str | Path) -> ASTROConfig:
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found; a checkpoint directory needs config.json") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); fix or regenerate it"
            ) from None
        return cls.from_dict(data, source=str(path))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    def replace(self, **changes: Any) -> ASTROConfig:
        return dataclasses.replace(self, **changes)


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


__all__ = ["ASTROConfig", "PRESETS", "preset"]
