"""The one place the serving stage loads a bundle, so that every command (and every model in a
generated repository) refuses a changed bundle the same way."""

from __future__ import annotations

from pathlib import Path

from astro_trt.engines.bundle import Bundle, load_bundle
from astro_trt.errors import BundleError
from astro_trt.precision import REFERENCE


def load_served_bundle(path: str | Path, *, expect_sha256: str | None = None) -> Bundle:
    """A verified bundle; ``expect_sha256`` pins the manifest's hash (see engines.bundle.load_bundle)."""
    return load_bundle(path, verify=True, expect_sha256=expect_sha256)


def served_precision(bundle: Bundle, precision: str | None) -> str:
    """The precision a repository serves: the one asked for, else fp32 when the bundle has it
    (exact logits on every runtime), else the bundle's first."""
    if precision is None:
        return REFERENCE if REFERENCE in bundle.precisions else bundle.precisions[0]
    if precision not in bundle.precisions:
        raise BundleError(f"{bundle.directory} has no {precision} graphs (it has {bundle.precisions}); "
                          f"choose --precision from those or re-export with --precision {precision}")
    return precision


__all__ = ["load_served_bundle", "served_precision"]
