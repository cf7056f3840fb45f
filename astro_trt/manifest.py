"""The bundle manifest: what every stage shares about a deployment bundle.

``DIR/manifest.json`` describes the bundle (tool and back-end versions, model config, checkpoint
sha256, precisions, attention lowering, every engine's I/O with min/opt/max shapes, the KV-cache
contract) and lists the sha256 of every file in it. ``DIR/manifest.sha256`` holds the sha256 of
manifest.json itself (``sha256sum -c`` format), so a change to any byte of any file, the manifest
included, is caught on load.

Reports: files under ``reports/`` are trusted only when listed in ``files`` (``write_report`` in
astro_trt.engines.bundle adds them); unlisted files there are ignored, everything else unlisted is
refused.

A loader never leaves the bundle: the manifest is checked against its schema (paths as text,
astro_trt.manifest_schema) before any field is used, and every path is resolved (symbolic links
included) and refused unless it lands inside the bundle on a regular file, with one wording
whatever lies outside. Pinning: ``expect_sha256`` (the digest ``export`` and ``inspect`` print,
what manifest.sha256 holds) refuses any bundle but the approved one.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import stat
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from astro_trt.artifacts import atomic_write, read_regular_file, sha256_file
from astro_trt.config import reject_json_constant
from astro_trt.errors import ArtifactError, BundleError
from astro_trt.manifest_schema import FIX as _FIX
from astro_trt.manifest_schema import FORMAT, FORMAT_VERSION, check_manifest

MANIFEST = "manifest.json"
MANIFEST_HASH = "manifest.sha256"
REPORTS = "reports"
# A manifest lists a few hundred files; anything this large is not one of ours.
MAX_MANIFEST_BYTES = 16 * 2**20


def tool_info() -> dict[str, Any]:
    versions = {"python": platform.python_version()}
    for package in ("astro-trt", "torch", "onnx", "onnxruntime", "onnxscript"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return {"name": "astro-trt", "version": versions.get("astro-trt", "unknown"), "versions": versions,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def build_manifest(**sections: Any) -> dict[str, Any]:
    """The manifest skeleton plus the given sections (config, checkpoint, backend, precisions,
    attention, profile, kv_cache, onnx, engines, parity, ...). ``files`` is filled on write."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "tool": tool_info(), **sections, "files": {}}


def _bundle_files(directory: Path) -> list[str]:
    """Every entry of the bundle that is not a directory (files, links of any kind, FIFOs...),
    relative, without following links out of it."""
    out = []
    for root, dirs, names in os.walk(directory, followlinks=False):
        here = Path(root)
        links = [d for d in dirs if (here / d).is_symlink()]  # reported as entries, never descended
        for name in [*names, *links]:
            rel = (here / name).relative_to(directory).as_posix()
            if rel not in (MANIFEST, MANIFEST_HASH):
                out.append(rel)
    return sorted(out)


def inside(directory: str | Path, rel: str) -> Path:
    """``directory / rel`` once it is sure to resolve (links followed) to a regular file inside
    the bundle; else BundleError. The wording never tells whether something outside exists."""
    root = Path(directory).resolve()
    path = root / rel
    try:
        target = path.resolve()
        within = target.is_relative_to(root) and target != root
    except (OSError, RuntimeError):  # a link loop
        within = False
    if not within:
        raise BundleError(f"{root}: {rel} does not resolve to a path inside the bundle (a link out of it "
                          f"or a loop); {_FIX}")
    try:
        mode = target.stat().st_mode
    except OSError:
        raise BundleError(f"{root}: {rel} is missing; {_FIX}") from None
    if not stat.S_ISREG(mode):
        raise BundleError(f"{root}: {rel} is not a regular file; {_FIX}")
    return path


def _read(directory: Path, name: str) -> bytes:
    try:
        return read_regular_file(inside(directory, name), max_bytes=MAX_MANIFEST_BYTES)
    except ArtifactError:
        raise BundleError(f"{directory}: {name} is larger than {MAX_MANIFEST_BYTES >> 20} MiB or not a regular file, "
                          f"not a manifest; {_FIX}") from None


def check_digest(value: str) -> str:
    """A pin as given on the command line: 64 hex digits (any case, spaces around ignored)."""
    digest = str(value).strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise BundleError(f"expected sha256 {value!r} is not 64 hex digits; pin the manifest digest that "
                          "`astro-trt export` or `astro-trt inspect` printed")
    return digest


def write_manifest(directory: str | Path, manifest: dict[str, Any], *, hash_all: bool = True) -> dict[str, Any]:
    """Hash the bundle's files into ``manifest['files']`` (every file when ``hash_all``, else keep
    the existing list) and write manifest.json and manifest.sha256. Returns the manifest written."""
    directory = Path(directory)
    if hash_all:
        manifest["files"] = {rel: sha256_file(directory / rel) for rel in _bundle_files(directory)}
    body = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    atomic_write(directory / MANIFEST, body)
    atomic_write(directory / MANIFEST_HASH, f"{hashlib.sha256(body).hexdigest()}  {MANIFEST}\n".encode())
    return manifest


def read_manifest_digest(directory: str | Path, *, expect_sha256: str | None = None) -> tuple[dict[str, Any], str]:
    """Read, self-check and schema-check the manifest (not the files; see verify_files); with
    ``expect_sha256`` refuse any manifest but that one. Returns (manifest, its sha256)."""
    directory = Path(directory)
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "no such bundle directory"
        raise BundleError(f"{directory}: {what}; pass a bundle written by `astro-trt export CKPT --out DIR`")
    pin = None if expect_sha256 is None else check_digest(expect_sha256)
    for name in (MANIFEST, MANIFEST_HASH):
        if not os.path.lexists(directory / name):
            raise BundleError(f"{directory}: {name} is missing, so this is not a complete bundle; {_FIX}")
    body = _read(directory, MANIFEST)
    digest = hashlib.sha256(body).hexdigest()
    if pin is not None and digest != pin:
        raise BundleError(f"{directory}: manifest sha256 {digest} is not the expected {pin}, so this is not the "
                          "approved bundle; deploy the approved bundle or pin this one after reviewing it")
    # Exactly what write_manifest wrote (sha256sum -c format): a truncated or edited line is a change too.
    if _read(directory, MANIFEST_HASH) != f"{digest}  {MANIFEST}\n".encode():
        raise BundleError(f"{directory}: {MANIFEST} (or {MANIFEST_HASH}) changed since it was written; {_FIX}")
    try:
        manifest = json.loads(body, parse_constant=reject_json_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, NaN, deep nesting
        raise BundleError(f"{directory / MANIFEST}: not valid JSON ({str(exc)[:120]}); {_FIX}") from None
    return check_manifest(manifest, str(directory / MANIFEST)), digest


def read_manifest(directory: str | Path, *, expect_sha256: str | None = None) -> dict[str, Any]:
    """Read, self-check and schema-check the manifest (not the files; see verify_files)."""
    return read_manifest_digest(directory, expect_sha256=expect_sha256)[0]


def manifest_digest(directory: str | Path) -> str:
    """sha256 of DIR/manifest.json: the digest to pin a bundle with (``--expect-sha256``)."""
    return hashlib.sha256(_read(Path(directory), MANIFEST)).hexdigest()


def verify_files(directory: str | Path, manifest: dict[str, Any]) -> None:
    """Every listed file exists with its recorded sha256, and no unlisted file sits outside reports/."""
    directory = Path(directory)
    files: dict[str, str] = manifest["files"]
    for rel, expected in sorted(files.items()):
        path = inside(directory, rel)
        if sha256_file(path) != expected:
            raise BundleError(f"{directory}: {rel} changed since export (sha256 mismatch); {_FIX}")
    unexpected = [rel for rel in _bundle_files(directory) if rel not in files and not rel.startswith(REPORTS + "/")]
    if unexpected:
        raise BundleError(f"{directory}: unexpected file(s) {unexpected} not in the manifest; remove them or {_FIX}")


__all__ = [
    "FORMAT", "FORMAT_VERSION", "MANIFEST", "MANIFEST_HASH", "REPORTS", "build_manifest", "check_digest", "inside",
    "manifest_digest", "read_manifest", "read_manifest_digest", "tool_info", "verify_files", "write_manifest",
]
