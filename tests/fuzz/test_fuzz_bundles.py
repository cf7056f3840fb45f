"""Fuzz category "bundles": seeded mutations of a real exported bundle -- a byte flipped, a file
truncated, deleted or added, the manifest edited consistently (its hash recomputed: structure,
types, format version, paths leaving the bundle, config apart from the graphs), links and FIFOs
in place of files -- each loaded and inspected (verified and not). Every one must be refused
with the project's BundleError in one line, without opening any file outside the bundle (the
sandbox around it holds planted copies; an audit hook sees every open) and without changing
the bundle."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from audit import opened_files, outside
from harness import Outcome, Tally, cases
from tiny_bundle import pristine_bundle

from astro_trt.engines.bundle import load_bundle
from astro_trt.engines.describe import describe_bundle
from astro_trt.manifest import MANIFEST, MANIFEST_HASH

pytestmark = pytest.mark.fuzz
GRAPH = "onnx/fp32/user_encoder.onnx"
# Fields every load or inspect reads: removing one must be refused.
REQUIRED = [
    ("format",), ("format_version",), ("tool",), ("tool", "version"), ("tool", "created"), ("config",),
    ("config", "num_items"), ("config", "max_len"), ("checkpoint",), ("checkpoint", "path"),
    ("checkpoint", "sha256"), ("backend",), ("precisions",), ("attention",), ("attention", "effective"),
    ("attention", "effective", "fp32"), ("profile",), ("profile", "user_encoder"), ("profile", "item_scorer"),
    ("profile", "full_model", "candidates"), ("kv_cache",), ("kv_cache", "fp32"), ("onnx",), ("onnx", "fp32"),
    ("onnx", "fp32", "user_encoder"), ("onnx", "fp32", "item_scorer", "path"), ("onnx", "fp32", "full_model", "io"),
    ("onnx", "fp32", "full_model", "io", "inputs"), ("files",),
]
JUNK = [None, 0, -1, 1.5, "x", "", [], {}, True, 2**70, [1, 2], {"a": 1}]
ESCAPES = ["../outside.onnx", "{sandbox}/outside.onnx", "onnx/../../outside.onnx", "./onnx/fp32/user_encoder.onnx",
           "onnx//fp32/user_encoder.onnx", "onnx/fp32/", "", ".", "..", "onnx\\..\\..\\outside.onnx",
           "onnx/fp32/user_encoder.onnx\x00", "/etc/passwd", "~/outside.onnx"[1:] + "/../../..", "a" * 5000]


def _rewrite(bundle: Path, manifest, raw: bytes | None = None) -> None:
    body = raw if raw is not None else (json.dumps(manifest, indent=2) + "\n").encode()
    (bundle / MANIFEST).write_bytes(body)
    (bundle / MANIFEST_HASH).write_text(f"{hashlib.sha256(body).hexdigest()}  {MANIFEST}\n")


def _get(m, path):
    for key in path[:-1]:
        m = m[key]
    return m, path[-1]


def _same_kind(a, b) -> bool:
    kinds = (bool, int, float, str, list, dict, type(None))
    return next(k for k in kinds if isinstance(a, k)) is next(k for k in kinds if isinstance(b, k))


def _files(bundle: Path) -> list[str]:
    return sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if not p.is_dir() or p.is_symlink())


def mutate(bundle: Path, sandbox: Path, rng: np.random.Generator) -> tuple[str, bool]:
    """Break ``bundle`` one way. Returns (description, whether only verification catches it):
    content changes pass an unverified load by design; structure, paths and links must not."""
    m = json.loads((bundle / MANIFEST).read_text())
    files = _files(bundle)
    kind = rng.choice(KINDS)
    if kind == "flip":
        rel = files[rng.integers(len(files))] if rng.random() < 0.8 else rng.choice([MANIFEST, MANIFEST_HASH])
        data = bytearray((bundle / rel).read_bytes())
        at = int(rng.integers(len(data)))
        data[at] ^= int(rng.integers(1, 256))
        (bundle / rel).write_bytes(bytes(data))
        return f"flip byte {at} of {rel}", rel not in (MANIFEST, MANIFEST_HASH)
    if kind == "truncate":
        rel = rng.choice(files + [MANIFEST])
        data = (bundle / rel).read_bytes()
        (bundle / rel).write_bytes(data[: int(rng.integers(len(data)))])
        return f"truncate {rel}", rel != MANIFEST
    if kind == "delete":
        rel = rng.choice(files + [MANIFEST, MANIFEST_HASH])
        (bundle / rel).unlink()
        return f"delete {rel}", rel not in (MANIFEST, MANIFEST_HASH)
    if kind == "add":
        folder = rng.choice(["", "onnx", "onnx/fp32", "checkpoint", "engines/fp32", "x/y"])
        (bundle / folder).mkdir(parents=True, exist_ok=True)
        (bundle / folder / rng.choice(["extra.onnx", "model.plan", ".hidden", "passwd.json"])).write_bytes(b"x")
        return f"add a file in '{folder}'", True
    if kind == "remove-key":
        path = REQUIRED[rng.integers(len(REQUIRED))]
        parent, key = _get(m, path)
        del parent[key]
        _rewrite(bundle, m)
        return f"manifest without {'.'.join(path)}", False
    if kind == "retype":
        path = REQUIRED[rng.integers(len(REQUIRED))]
        parent, key = _get(m, path)
        if path in (("config", "num_items"), ("config", "max_len")):
            choices = [v for v in JUNK if not (isinstance(v, int) and not isinstance(v, bool) and v > 0)] + [0]
        else:
            choices = [v for v in JUNK if not _same_kind(v, parent[key])]
        if path == ("backend",):
            choices = [v for v in choices if v is not None]  # null is an ONNX-only bundle
        parent[key] = choices[rng.integers(len(choices))]
        _rewrite(bundle, m)
        return f"manifest {'.'.join(path)} = {parent[key]!r}"[:120], False
    if kind == "top-level":
        _rewrite(bundle, [[m], None, "x", 1, True][rng.integers(5)] if rng.random() < 0.8 else list(m))
        return "manifest top level not an object", False
    if kind == "json":
        raw = [b"{", b"\xff\xfe{}", b"[" * 100000 + b"]" * 100000, b'{"format": NaN}', b"", b"\xef\xbb\xbf{}",
               json.dumps({**m, "parity": {"fp32": {"full_model": float("nan")}}}).encode()][rng.integers(7)]
        _rewrite(bundle, None, raw)
        return f"manifest bytes {raw[:20]!r}", False
    if kind == "version":
        current = m["format_version"]
        value = [current + 1, current - 1, 0, -1, str(current), float(current), True, None, "astro"][rng.integers(9)]
        if rng.random() < 0.2:
            m["format"] = "other-bundle"
        else:
            m["format_version"] = value
        _rewrite(bundle, m)
        return f"format_version {value!r} / format {m['format']}", False
    if kind == "escape":
        shutil.copyfile(bundle / GRAPH, sandbox / "outside.onnx")
        path = ESCAPES[rng.integers(len(ESCAPES))].replace("{sandbox}", str(sandbox))
        where = rng.choice(["onnx", "checkpoint", "files", "reports"])
        if where == "onnx":
            graph = rng.choice(["user_encoder", "item_scorer", "full_model"])
            old = m["onnx"]["fp32"][graph]["path"]
            m["onnx"]["fp32"][graph]["path"] = path
            m["files"][path] = m["files"].pop(old)
        elif where == "checkpoint":
            m["checkpoint"]["path"] = path
        elif where == "files":
            m["files"][path] = hashlib.sha256((sandbox / "outside.onnx").read_bytes()).hexdigest()
        else:
            m["files"][path] = hashlib.sha256((sandbox / "outside.onnx").read_bytes()).hexdigest()
            m["reports"] = {"bench": [path]}
        _rewrite(bundle, m)
        return f"{where} path {path[:60]!r}", False
    if kind == "values":
        how = rng.integers(6)
        if how == 0:
            m["profile"]["full_model"]["candidates"] = [[1, 9, 8], [0, 1, 1], [-1, 1, 8], [1, 1, 2**40], [1, 1]][
                rng.integers(5)]
        elif how == 1:
            m["precisions"] = [["fp32", "fp32"], ["fp64"], [], ["fp32", "fp16"]][rng.integers(4)]
        elif how == 2:
            m["attention"]["effective"]["fp32"] = "evil"
        elif how == 3:
            m["config"][rng.choice(["max_len", "num_heads", "num_layers", "num_blocks"])] = 1  # apart from the graphs
            m["config"]["d_model"] = 16 * 3 if m["config"]["num_heads"] == 1 else m["config"]["d_model"]
        elif how == 4:
            m["checkpoint"]["sha256"] = "z" * 64
        else:
            m["backend"] = {"name": "../../evil", "version": "1", "targets": [], "opt_level": None}
        _rewrite(bundle, m)
        return f"manifest value edit {how}", False
    if kind == "link":
        rel = rng.choice([GRAPH, "onnx/fp32/full_model.onnx", "checkpoint/config.json", MANIFEST, MANIFEST_HASH,
                          "onnx", "checkpoint"])
        target = rng.choice(["copy", "missing", "/dev/zero", "loop"])
        source = bundle / rel
        copy = sandbox / f"outside-{source.name}"
        if source.is_dir():
            shutil.copytree(source, copy)
            shutil.rmtree(source)
        else:
            shutil.copyfile(source, copy)
            source.unlink()
        destination = {"copy": copy, "missing": sandbox / "nothing", "/dev/zero": Path("/dev/zero"),
                       "loop": source}[target]
        source.symlink_to(destination)
        return f"{rel} -> link to {target}", False
    # fifo
    rel = rng.choice([GRAPH, MANIFEST, MANIFEST_HASH, "checkpoint/model.safetensors"])
    (bundle / rel).unlink()
    os.mkfifo(bundle / rel)
    return f"{rel} is a FIFO", False


KINDS = ["flip", "truncate", "delete", "add", "remove-key", "retype", "top-level", "json", "version", "escape",
         "values", "link", "fifo"]


def _snapshot(bundle: Path) -> list[tuple[str, int]]:
    return [(rel, os.lstat(bundle / rel).st_size) for rel in _files(bundle)]


def _try(tally: Tally, name: str, call, sandbox: Path, bundle: Path) -> None:
    before = _snapshot(bundle)
    with opened_files() as record:
        outcome = tally.python(name, call)
    opened = outside(record, sandbox, bundle)
    if opened:
        tally.counts[outcome.kind] -= 1
        tally.record(name, Outcome("outside-read", f"opened {opened[:3]}"))
    elif _snapshot(bundle) != before:
        tally.counts[outcome.kind] -= 1
        tally.record(name, Outcome("changed-bundle", "loading changed the bundle"))


def test_pristine_bundle_loads_and_inspects_without_leaving_it():
    # Control: the unmutated copy is accepted, so each refusal below is its mutation's.
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle"
        shutil.copytree(pristine_bundle(), bundle)
        with opened_files() as record:
            load_bundle(bundle)
            assert "manifest sha256" in describe_bundle(bundle)
        assert outside(record, Path(tmp), bundle) == []
        assert any(p.endswith("user_encoder.onnx") for p in record)  # the audit does see the bundle's reads


def test_fuzz_bundles():
    rng = np.random.default_rng(9)
    tally = Tally("bundles")
    for i in range(cases(150)):
        with tempfile.TemporaryDirectory(prefix="astro-fuzz-") as tmp:
            sandbox = Path(tmp)
            bundle = sandbox / "bundle"
            shutil.copytree(pristine_bundle(), bundle)
            what, content_only = mutate(bundle, sandbox, rng)
            name = f"#{i} {what}"
            _try(tally, f"{name} via load_bundle", lambda b=bundle: load_bundle(b), sandbox, bundle)
            _try(tally, f"{name} via inspect", lambda b=bundle: describe_bundle(b), sandbox, bundle)
            if not content_only:
                _try(tally, f"{name} via inspect --no-verify", lambda b=bundle: describe_bundle(b, verify=False),
                     sandbox, bundle)
    tally.check()
