"""Shared test fixtures: small configs, random histories and models whose learned biases and
temperatures are random (freshly initialised tables are zero and temperatures all sqrt(dh),
which would hide bugs in the bias and temperature paths).

Factories are session-scoped so hypothesis tests can use them (they hold no state)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from astro_trt.config import ASTROConfig
from astro_trt.model.astro import ASTRO, History

# Request times near 2024 in unix seconds: realistic magnitudes for the int64 time path.
BASE_TIME = 1_700_000_000


def small_config(**changes: object) -> ASTROConfig:
    base = ASTROConfig(
        name="tiny", num_items=40, num_behaviors=4, num_scenarios=2, d_model=16, num_heads=2,
        num_layers=2, num_blocks=3, max_len=8, num_tasks=2, ffn_dim=24, num_pos_buckets=6,
        num_time_buckets=8, dropout=0.0,
    )
    return base.replace(**changes)


def random_history(
    cfg: ASTROConfig, batch: int, generator: torch.Generator, lengths: torch.Tensor | None = None
) -> History:
    """A right-aligned random history; padding slots hold item 0, behaviour 0, time 0."""
    nb, seq = cfg.num_blocks, cfg.max_len
    if lengths is None:
        lengths = torch.randint(0, seq + 1, (batch, nb), generator=generator)
    # Gaps spread over 2^0..2^27 seconds so that every time bucket up to 2^26 gets used.
    gaps = (2.0 ** (torch.rand(batch, nb, seq, generator=generator) * 27)).long()
    times = BASE_TIME + gaps.cumsum(-1)
    request_time = times.amax((1, 2)) + (2.0 ** (torch.rand(batch, generator=generator) * 20)).long()
    valid = torch.arange(seq) >= (seq - lengths)[..., None]
    items = torch.randint(1, cfg.num_items + 1, (batch, nb, seq), generator=generator)
    behaviors = torch.randint(1, cfg.num_behaviors, (batch, nb, seq), generator=generator)
    return History(
        items=items * valid,
        behaviors=behaviors * valid,
        times=times * valid,
        lengths=lengths.long(),
        scenario=torch.randint(0, cfg.num_scenarios, (batch,), generator=generator),
        request_time=request_time,
    )


def cli_status(argv: list[str]) -> int:
    """``astro-trt ARGV`` through the CLI's entry point in this process: its exit status."""
    from astro_trt.cli import main

    try:
        main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def random_model(cfg: ASTROConfig, seed: int) -> ASTRO:
    """An eval-mode ASTRO with random weights, bias tables and temperatures.

    theta ~ U(-1, 3) gives tau = softplus(theta) + 0.01 in about [0.32, 3.06]: different per
    layer, block, scenario and head, yet not so small that float32 scores lose precision.
    """
    torch.manual_seed(seed)
    model = ASTRO(cfg)
    with torch.no_grad():
        model.pos_table.normal_()
        model.time_table.normal_()
        for name, param in model.named_parameters():
            if name.endswith("theta"):
                param.uniform_(-1.0, 3.0)
    return model.eval()


@pytest.fixture(scope="session")
def make_config() -> Callable[..., ASTROConfig]:
    return small_config


@pytest.fixture(scope="session")
def make_history() -> Callable[..., History]:
    return random_history


@pytest.fixture(scope="session")
def make_model() -> Callable[[ASTROConfig, int], ASTRO]:
    return random_model
