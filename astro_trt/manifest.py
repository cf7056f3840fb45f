"""The bundle manifest: what every stage shares about a deployment bundle.

``DIR/manifest.json`` describes the bundle (tool and back-end versions, model config, checkpoint
sha256, precisions, attention lowering, every engine's I/O with min/opt/max shapes, the KV-cache
contract) and lists the sha256 of every file in it. ``DIR/manifest.sha256`` holds the sha256 of
manifest.json itself (``sha256sum -c`` format), so a change to any byte of any file, the manifest
included, is caught on load.

Reports: files under ``reports/`` are trusted only when listed in ``files`` (``write_report`` in
astro_trt.engines.bundle adds them); unlisted files there are ignored, everything else unlisted is
refused.
"""

from __future__ import annotations

import hashlib
import json
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from astro_trt.artifacts import atomic_write, sha256_file
from astro_trt.errors import BundleError

FORMAT = "astro-trt-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MANIFEST_HASH = "manifest.sha256"
REPORTS = "reports"
_FIX = "re-export the bundle with `astro-trt export`"


def tool_info() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

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
    out = []
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            rel = path.relative_to(directory).as_posix()
            if rel not in (MANIFEST, MANIFEST_HASH):
                out.append(rel)
    return out


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


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """Read and self-check the manifest (not the files; see verify_files)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise BundleError(f"{directory}: no such bundle directory; create one with `astro-trt export CKPT --out DIR`")
    for name in (MANIFEST, MANIFEST_HASH):
        if not (directory / name).is_file():
            raise BundleError(f"{directory}: {name} is missing, so this is not a complete bundle; {_FIX}")
    body = (directory / MANIFEST).read_bytes()
    recorded = (directory / MANIFEST_HASH).read_text(errors="replace").split()
    if not recorded or recorded[0] != hashlib.sha256(body).hexdigest():
        raise BundleError(f"{directory}: {MANIFEST} (or {MANIFEST_HASH}) changed since it was written; {_FIX}")
    try:
        manifest = json.loads(body)
    except json.JSONDecodeError as exc:
        raise BundleError(f"{directory / MANIFEST}: not valid JSON ({exc.msg}); {_FIX}") from None
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{directory / MANIFEST}: not an astro-trt bundle manifest; {_FIX}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{directory / MANIFEST}: bundle format {manifest.get('format_version')}, this astro-trt reads "
            f"format {FORMAT_VERSION}; {_FIX}"
        )
    return manifest


def verify_files(directory: str | Path, manifest: dict[str, Any]) -> None:
    """Every listed file exists with its recorded sha256, and no unlisted file sits outside reports/."""
    directory = Path(directory)
    files: dict[str, str] = manifest.get("files", {})
    for rel, expected in sorted(files.items()):
        path = directory / rel
        if not path.is_file():
            raise BundleError(f"{directory}: {rel} is missing; {_FIX}")
        if sha256_file(path) != expected:
            raise BundleError(f"{directory}: {rel} changed since export (sha256 mismatch); {_FIX}")
    unexpected = [rel for rel in _bundle_files(directory) if rel not in files and not rel.startswith(REPORTS + "/")]
    if unexpected:
        raise BundleError(f"{directory}: unexpected file(s) {unexpected} not in the manifest; remove them or {_FIX}")


__all__ = [
    "FORMAT", "FORMAT_VERSION", "MANIFEST", "MANIFEST_HASH", "REPORTS", "build_manifest",
    "read_manifest",
    "tool_info", "verify_files", "write_manifest",
]
