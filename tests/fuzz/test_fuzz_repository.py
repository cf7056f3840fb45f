"""Fuzz category "repository writer": ``write_repository`` (what ``astro-trt triton`` and
``serve`` run) copies the bundle, not its folder. Planted in a real bundle -- links to a file, a
folder or a device outside it, FIFOs, link loops, dangling links, unlisted files -- and listed
files swapped after the bundle was loaded (a link, a FIFO, new bytes, more bytes): each case is
either refused in one line or leaves the planted thing behind, and the repository's copy of the
bundle holds exactly the files its manifest lists, byte for byte. No file outside the bundle is
opened (an audit hook sees every open). An ``--out`` overlapping the bundle, either way, is
refused and the bundle stays."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from audit import opened_files, outside
from harness import Outcome, Tally, cases
from tiny_bundle import pristine_bundle

from astro_trt.engines.bundle import load_bundle
from astro_trt.errors import AstroError
from astro_trt.manifest import MANIFEST, MANIFEST_HASH
from astro_trt.serving.repository import VERSION, write_repository

pytestmark = pytest.mark.fuzz
SECRET = b"secret outside the bundle\n"
ONNX = "onnx/fp32/user_encoder.onnx"
COPY = Path("astro_recommend") / VERSION / "bundle"


def _fresh(sandbox: Path, name: str) -> Path:
    bundle = sandbox / name / "bundle"
    shutil.copytree(pristine_bundle(), bundle, symlinks=True)
    return bundle


def _sandbox(tmp_path: Path) -> Path:
    (tmp_path / "secret").write_bytes(SECRET)
    (tmp_path / "secret-dir").mkdir()
    (tmp_path / "secret-dir" / "inner").write_bytes(SECRET)
    return tmp_path


def _planted(sandbox: Path) -> dict[str, Callable[[Path], object]]:
    """Things planted in reports/ (unlisted): each must be left behind."""
    def link(target):
        return lambda p: p.symlink_to(target)
    return {
        "link to a file outside": link(sandbox / "secret"),
        "link to a folder outside": link(sandbox / "secret-dir"),
        "link to /dev/zero": link("/dev/zero"),
        "dangling link": link(sandbox / "missing"),
        "link loop": lambda p: (p.with_name(p.name + "-b").symlink_to(p), p.symlink_to(p.with_name(p.name + "-b"))),
        "FIFO": lambda p: os.mkfifo(p),
        "unlisted regular file": lambda p: p.write_bytes(SECRET),
        "unlisted folder": lambda p: (p.mkdir(), (p / "x").write_bytes(SECRET)),
    }


def _swapped(sandbox: Path) -> dict[str, Callable[[Path], object]]:
    """A listed file changed after the bundle was loaded: each must be refused."""
    def relink(target):
        return lambda p: (p.unlink(), p.symlink_to(target))
    return {
        "listed file -> link outside (same bytes)": lambda p: (shutil.copy(p, sandbox / "same"), p.unlink(),
                                                              p.symlink_to(sandbox / "same")),
        "listed file -> link to another listed file": relink("item_scorer.onnx"),
        "listed file -> link to /dev/zero": relink("/dev/zero"),
        "listed file -> FIFO": lambda p: (p.unlink(), os.mkfifo(p)),
        "listed file -> new bytes, same size": lambda p: p.write_bytes(bytes(len(p.read_bytes()))),
        "listed file -> grown": lambda p: p.write_bytes(p.read_bytes() + b"\0" * 64),
        "listed file -> removed": lambda p: p.unlink(),
        "listed folder -> link to a copy outside": lambda p: (shutil.copytree(p.parent, sandbox / "copy-dir"),
                                                             shutil.rmtree(p.parent),
                                                             p.parent.symlink_to(sandbox / "copy-dir")),
    }


def _leaks(record: list[str], sandbox: Path, bundle_dir: Path, out: Path) -> list[str]:
    """Files opened outside the bundle other than the repository being written (and its staging)."""
    written = (os.path.realpath(out), os.path.join(os.path.realpath(out.parent), f".{out.name}."))
    return [p for p in outside(record, sandbox, bundle_dir) if not p.startswith(written)]


def _copy_is_the_bundle(repo: Path, bundle) -> str | None:
    """None when the repository's bundle copy holds exactly the manifest's files with their bytes."""
    copy = repo / COPY
    found = sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*") if not p.is_dir() or p.is_symlink())
    wanted = sorted([MANIFEST, MANIFEST_HASH, *bundle.manifest["files"]])
    if found != wanted:
        return f"copied {sorted(set(found) - set(wanted))}, missing {sorted(set(wanted) - set(found))}"
    for rel in wanted:
        if (copy / rel).is_symlink() or (copy / rel).read_bytes() != (Path(bundle.directory) / rel).read_bytes():
            return f"{rel} is not the bundle's file"
    return None


def _write_and_judge(tally: Tally, case: str, sandbox: Path, bundle_dir: Path, out: Path) -> None:
    """Load the bundle and write its repository: a one-line refusal, or a repository whose bundle
    copy is exactly the manifest's files with nothing opened outside (the planted thing left
    behind), is clean."""
    with opened_files() as record:
        try:
            bundle = load_bundle(bundle_dir)
            write_repository(bundle, out)
        except AstroError as exc:
            tally.record(case, Outcome("refused", str(exc)))
            return
        except Exception as exc:  # noqa: BLE001 -- what the category looks for
            tally.record(case, Outcome("traceback", repr(exc)))
            return
    leaks = _leaks(record, sandbox, bundle_dir, out)
    wrong = _copy_is_the_bundle(out, bundle)
    tally.record(case, Outcome("traceback", f"opened {leaks}; {wrong}") if leaks or wrong
                 else Outcome("refused", "left behind"))


def test_repository_writer_copies_only_the_bundle(tmp_path):
    sandbox = _sandbox(tmp_path)
    tally = Tally("repository writer")
    for i, (name, plant) in enumerate(_planted(sandbox).items()):
        bundle_dir = _fresh(sandbox, f"planted-{i}")
        (bundle_dir / "reports").mkdir(exist_ok=True)
        plant(bundle_dir / "reports" / "p")
        _write_and_judge(tally, name, sandbox, bundle_dir, sandbox / f"planted-{i}" / "repo")
    for i, (name, swap) in enumerate(_swapped(sandbox).items()):
        bundle_dir = _fresh(sandbox, f"swapped-{i}")
        bundle = load_bundle(bundle_dir)
        swap(bundle_dir / ONNX)
        out = sandbox / f"swapped-{i}" / "repo"
        with opened_files() as record:
            outcome = tally.python(name, lambda b=bundle, o=out: write_repository(b, o))
        leaks = _leaks(record, sandbox, bundle_dir, out)
        if outcome.kind == "refused" and (leaks or out.exists() or "\n" in outcome.detail):
            tally.bad.append((name, Outcome("traceback", f"opened {leaks} or left {out}")))
    tally.check()
    assert tally.counts["refused"] == len(_planted(sandbox)) + len(_swapped(sandbox))


def test_repository_writer_refuses_an_out_overlapping_the_bundle(tmp_path):
    tally = Tally("repository writer: --out")
    parent = tmp_path / "d"
    bundle_dir = parent / "b"
    shutil.copytree(pristine_bundle(), bundle_dir)
    bundle = load_bundle(bundle_dir)
    (tmp_path / "link-to-bundle").symlink_to(bundle_dir)
    for name, out in {"the bundle": bundle_dir, "its parent": parent, "inside it": bundle_dir / "reports" / "r",
                      "a link to it": tmp_path / "link-to-bundle"}.items():
        tally.python(f"python: {name}", lambda o=out: write_repository(bundle, o, force=True))
        if name in ("its parent", "a link to it"):  # the command too (a fresh interpreter each)
            tally.cli(f"cli: {name}", ["triton", bundle_dir, "--out", out, "--force"])
    tally.check()
    assert load_bundle(bundle_dir).directory == bundle_dir.resolve()  # nothing of it was removed


def test_repository_writer_seeded_mixtures(tmp_path):
    """Several planted things at once, at random depths of reports/ or elsewhere in the bundle (an
    unlisted file outside reports/ fails the bundle's check: refused), ``cases(8)`` seeded draws."""
    sandbox = _sandbox(tmp_path)
    kinds = list(_planted(sandbox).items())
    rng = np.random.default_rng(18)
    tally = Tally("repository writer: mixtures")
    for i in range(cases(8)):
        bundle_dir = _fresh(sandbox, f"mix-{i}")
        planted = []
        for j in range(int(rng.integers(1, 5))):
            folder = bundle_dir / str(rng.choice(["reports", "reports/a/b", "reports/validate", "onnx", "checkpoint"]))
            folder.mkdir(parents=True, exist_ok=True)
            name, plant = kinds[int(rng.integers(len(kinds)))]
            plant(folder / f"p{j}")
            planted.append(f"{name} in {folder.relative_to(bundle_dir)}")
        _write_and_judge(tally, "; ".join(planted), sandbox, bundle_dir, sandbox / f"mix-{i}" / "repo")
    tally.check()
