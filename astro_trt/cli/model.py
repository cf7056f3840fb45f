"""The `data` and `train` commands (registered in astro_trt/cli/__init__.py)."""

from __future__ import annotations

from pathlib import Path

import click

from astro_trt.config import ASTROConfig, preset
from astro_trt.lazy import lazy_import

movielens = lazy_import("astro_trt.model.movielens")
training = lazy_import("astro_trt.model.train")

DATASETS = ("ml-100k",)


@click.command()
@click.argument("dataset", type=click.Choice(DATASETS))
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Where datasets live (default: $ASTRO_TRT_DATA or ~/.cache/astro-trt).")
@click.option("--source", type=click.Path(exists=True), default=None,
              help="Use local data instead of downloading: u.data, a folder holding it, or the RecBole wheel.")
@click.option("--force", is_flag=True, help="Fetch again even if the cache already holds the dataset.")
def data(dataset: str, cache_dir: str | None, source: str | None, force: bool) -> None:
    """Fetch DATASET into the local cache (checksum-verified) and summarise it."""
    folder = movielens.fetch_ml100k(cache_dir, source=source, force=force)
    ratings = movielens.read_interactions(folder / movielens.INTER)
    click.echo(
        f"{dataset}: {len(ratings)} ratings, {len(set(ratings.users.tolist()))} users, "
        f"{len(set(ratings.items.tolist()))} items in {folder} (sha256 {ratings.sha256[:12]})"
    )


@click.command()
@click.option("--data", "dataset", type=click.Choice(DATASETS), default="ml-100k", show_default=True)
@click.option("--config", "config_name", default="ml100k", show_default=True,
              help="A config preset name or a config.json path.")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Checkpoint directory to write.")
@click.option("--epochs", type=int, default=20, show_default=True, help="Upper bound; early stopping may end sooner.")
@click.option("--patience", type=int, default=3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--candidates", type=int, default=10, show_default=True, help="Candidates per request (K).")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None)
@click.option("--no-progress", is_flag=True, help="No progress bar (logs only).")
def train(dataset: str, config_name: str, out: str, epochs: int, patience: int, seed: int, batch_size: int,
          lr: float, candidates: int, cache_dir: str | None, no_progress: bool) -> None:
    """Train ASTRO on the CPU and write a checkpoint with test metrics against a baseline."""
    cfg = ASTROConfig.load(config_name) if Path(config_name).suffix == ".json" else preset(config_name)
    options = training.TrainOptions(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, patience=patience)
    training.train_ml100k(cfg, out, options, candidates=candidates, cache_dir=cache_dir, progress=not no_progress,
                          log=click.echo)
    click.echo(f"checkpoint written to {out}")
