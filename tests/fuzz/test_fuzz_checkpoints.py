"""Fuzz category "checkpoints": hostile or broken checkpoint directories.

Each case builds a checkpoint directory from a good one and hands it to what `export` does with
a checkpoint: ``load_checkpoint`` and then ``copy_checkpoint`` into a fresh folder (the bundle's
copy). A clean outcome is the project's one-line error. Host files that a checkpoint merely
*contains* (``passwd.json -> /etc/passwd`` beside the real documents) are not an error: there the
clean outcome is that the host file is never copied, and the case is recorded as refused only
when the copy holds exactly the checkpoint's own documents and no byte of the host file.

Classes: the weights truncated at many offsets; byte flips in the safetensors header and in the
tensor data; tensors of the wrong shape or dtype; a pickle renamed .safetensors; directories,
FIFOs, devices and symlinks in place of every file; config keys missing, of the wrong type or
absurd; host-file symlinks next to the documents. A sample goes through the CLI.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import random_model, small_config
from harness import Outcome, Tally, cases

from astro_trt.errors import AstroError
from astro_trt.model.checkpoint import copy_checkpoint, load_checkpoint, save_checkpoint

pytestmark = pytest.mark.fuzz

HOST_FILES = ("/etc/passwd", "/etc/hostname", "/proc/self/environ", "/dev/zero", "/dev/urandom")


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    cfg = small_config()
    return save_checkpoint(tmp_path_factory.mktemp("good") / "ckpt", random_model(cfg, 0), cfg,
                           metrics={"test": {"model": {}}}, extra={"data": {"dataset": "synthetic"}})


class Workspace:
    """A fresh copy of the good checkpoint per case, and a fresh target for its copy."""

    def __init__(self, good: Path, root: Path) -> None:
        self.good, self.root, self.count = good, root, 0

    def fresh(self) -> tuple[Path, Path]:
        self.count += 1
        case = self.root / f"c{self.count}"
        ckpt = case / "ckpt"
        shutil.copytree(self.good, ckpt)
        target = case / "copy"
        target.mkdir()
        return ckpt, target


def _load_and_copy(ckpt: Path, target: Path) -> Callable[[], None]:
    def call() -> None:
        load_checkpoint(ckpt)
        copy_checkpoint(ckpt, target)
    return call


def _header_len(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


def _flip(path: Path, rng: random.Random, *, header: bool) -> bool:
    """XOR one byte of the header (or of the tensor data) with a random mask. False when the flip
    changes nothing a reader sees (a padding space turned into another whitespace): no case."""
    data = bytearray(path.read_bytes())
    end = _header_len(bytes(data))
    index = rng.randrange(0, end) if header else rng.randrange(end, len(data))
    data[index] ^= rng.randrange(1, 256)
    if header and 8 <= index:
        try:
            if json.loads(bytes(data[8:end])) == json.loads(path.read_bytes()[8:end]):
                return False
        except (UnicodeDecodeError, ValueError):
            pass
    path.write_bytes(bytes(data))
    return True


def _special(kind: str, path: Path) -> None:
    """Put a directory, a FIFO, a device link, a host-file link or a dangling link at ``path``."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()
    if kind == "dir":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "dangling":
        path.symlink_to(path.parent / "nowhere")
    else:  # a symlink to a host file or device
        path.symlink_to(kind)


def test_fuzz_checkpoints(good, tmp_path):
    tally = Tally("checkpoints")
    ws = Workspace(good, tmp_path)
    rng = random.Random(int(os.environ.get("ASTRO_FUZZ_SEED", "14")))
    weights = good / "model.safetensors"
    size = weights.stat().st_size

    # Truncated at many offsets: inside the length prefix, the header and the data.
    head = _header_len(weights.read_bytes())
    offsets = sorted({0, 1, 7, 8, 9, head - 1, head, size - 1} | {rng.randrange(0, size) for _ in range(cases(20))})
    for offset in offsets:
        ckpt, target = ws.fresh()
        with open(ckpt / "model.safetensors", "r+b") as fh:
            fh.truncate(offset)
        tally.python(f"truncated at {offset}", _load_and_copy(ckpt, target))

    # Byte flips in the header and in the tensor data.
    for header in (True, False):
        tried = 0
        while tried < cases(20):
            ckpt, target = ws.fresh()
            if not _flip(ckpt / "model.safetensors", rng, header=header):
                continue
            tried += 1
            tally.python(f"{'header' if header else 'data'} byte flip", _load_and_copy(ckpt, target))

    # Tensors of the wrong shape or dtype, and extra or missing tensors (written without metadata,
    # as another tool would).
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    names = sorted(tensors)
    for _ in range(cases(10)):
        ckpt, target = ws.fresh()
        changed = dict(tensors)
        name = rng.choice(names)
        how = rng.choice(["shape", "dtype", "drop", "extra", "scalar"])
        if how == "shape":
            changed[name] = torch.zeros(*(d + rng.randint(1, 3) for d in changed[name].shape) or (2,))
        elif how == "dtype":
            changed[name] = changed[name].to(rng.choice([torch.float16, torch.float64, torch.int32, torch.bfloat16]))
        elif how == "drop":
            del changed[name]
        elif how == "extra":
            changed["extra.weight"] = torch.zeros(3)
        else:
            changed[name] = torch.tensor(1.0)
        save_file(changed, ckpt / "model.safetensors")
        tally.python(f"tensor {name}: {how}", _load_and_copy(ckpt, target))

    # A pickle (torch.save) renamed model.safetensors, in both of torch's formats.
    for legacy in (False, True):
        ckpt, target = ws.fresh()
        torch.save(tensors, ckpt / "model.safetensors", _use_new_zipfile_serialization=not legacy)
        tally.python(f"pickle renamed .safetensors (legacy={legacy})", _load_and_copy(ckpt, target))

    # Directories, FIFOs, devices and links in place of each file of the checkpoint.
    kinds = ["dir", "fifo", "dangling", *HOST_FILES]
    for filename in ("config.json", "model.safetensors", "metrics.json", "data.json"):
        for kind in kinds:
            ckpt, target = ws.fresh()
            _special(kind, ckpt / filename)
            tally.python(f"{filename} is {kind}", _load_and_copy(ckpt, target))
    # A link to a good copy of the file is refused as well: the copy never goes through a link.
    for filename in ("config.json", "model.safetensors", "data.json"):
        ckpt, target = ws.fresh()
        (ckpt / filename).rename(ckpt.parent / filename)
        (ckpt / filename).symlink_to(ckpt.parent / filename)
        tally.python(f"{filename} is a link to a good copy", _load_and_copy(ckpt, target))

    # config.json edited: keys missing, wrong types, absurd values, other fields than trained.
    base = json.loads((good / "config.json").read_text())
    edits: list[tuple[str, object]] = [
        ("max_len", 9), ("max_len", 2000), ("layer_norm_eps", -1e-5), ("layer_norm_eps", 1e-3),
        ("time_bucket_max", 2**70), ("num_pos_buckets", 6.0), ("layer_norm_eps", "1e-5"), ("dropout", None),
        ("num_layers", True), ("num_layers", 10**6), ("name", "other"), ("task_names", "ab"),
    ]
    for _ in range(cases(10)):
        key = rng.choice(sorted(base))
        edits.append((key, rng.choice([None, -1, 0, 2**63, 1.5, "x", [], {}, float("inf"), True])))
    for key, value in edits:
        same_number = (isinstance(value, int | float) and isinstance(base[key], int | float)
                       and not isinstance(value, bool) and not isinstance(base[key], bool))
        if base[key] == value and (type(base[key]) is type(value) or same_number):
            continue  # the trained value drawn again (0 for a dropout of 0.0 included): no case
        ckpt, target = ws.fresh()
        data = {**base, key: value}
        (ckpt / "config.json").write_text(json.dumps(data))
        tally.python(f"config {key}={value!r}"[:80], _load_and_copy(ckpt, target))
    for key in ("num_items", "d_model", "max_len"):
        ckpt, target = ws.fresh()
        (ckpt / "config.json").write_text(json.dumps({k: v for k, v in base.items() if k != key}))
        tally.python(f"config without {key}", _load_and_copy(ckpt, target))

    # Host files beside the documents: never copied, never read.
    for host in HOST_FILES:
        for name in ("passwd.json", "extra.json", "notes.txt", "model.safetensors.bak"):
            ckpt, target = ws.fresh()
            (ckpt / name).symlink_to(host)
            tally.record(f"{name} -> {host}", _host_file_outcome(ckpt, target, host))
    tally.check()


def _host_file_outcome(ckpt: Path, target: Path, host: str) -> Outcome:
    try:
        load_checkpoint(ckpt)
        copied = copy_checkpoint(ckpt, target)
    except AstroError as exc:
        return Outcome("refused", str(exc))
    except Exception as exc:  # noqa: BLE001 -- what the suite looks for
        return Outcome("traceback", repr(exc))
    present = sorted(p.name for p in target.iterdir())
    expected = ["config.json", "data.json", "metrics.json", "model.safetensors"]
    if present != expected or sorted(copied) != expected or any(p.is_symlink() for p in target.iterdir()):
        return Outcome("accepted", f"copied {present} (from a checkpoint holding a link to {host})")
    return Outcome("refused", f"{host} not copied")


def test_fuzz_checkpoints_cli(good, tmp_path):
    """A sample through `astro-trt export`: a host-file link is left out of the bundle, a FIFO
    document is refused without hanging, with one line, and nothing is left at --out."""
    from astro_trt.engines.bundle import load_bundle

    tally = Tally("checkpoints")
    flags = ["--no-engines", "--precision", "fp32", "--max-batch", "2", "--max-candidates", "8"]
    ws = Workspace(good, tmp_path)
    ckpt, _ = ws.fresh()
    _special("fifo", ckpt / "data.json")
    out = tmp_path / "fifo-out"
    outcome = tally.cli("data.json is a FIFO", ["export", ckpt, "--out", out, *flags], timeout=120)
    assert not out.exists(), outcome

    ckpt, _ = ws.fresh()
    (ckpt / "passwd.json").symlink_to("/etc/passwd")
    out = tmp_path / "passwd-out"
    from harness import run_cli

    result = run_cli(["export", ckpt, "--out", out, *flags])
    bundle = load_bundle(out, verify=True) if out.exists() else None
    leaked = bundle is None or any("passwd" in f for f in bundle.manifest["files"]) or \
        any("passwd" in p.name for p in out.rglob("*"))
    tally.record("passwd.json -> /etc/passwd through export",
                 Outcome("accepted", f"{result.kind}: {result.detail}") if leaked else Outcome("refused", "not copied"))
    tally.check()
