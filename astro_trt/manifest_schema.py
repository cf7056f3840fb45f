"""The manifest's schema, checked before any field of a manifest is used: types and shapes of
every field that loading, inspecting and running a bundle read, the format version, and every
path in it (relative, normalised, no way out of the bundle). Extra fields are allowed and
ignored; a missing or mistyped one is a BundleError naming the field, never a KeyError.

Paths are judged as text here, before the file system is touched, so the error for
``../outside.onnx`` is the same whether or not that outside file exists. Where a path resolves
(symbolic links) is checked on load by astro_trt.manifest.inside.
"""

from __future__ import annotations

import math
import posixpath
import re
from typing import Any

from astro_trt import contract
from astro_trt.contract import GRAPHS, PRECISIONS
from astro_trt.errors import BundleError
from astro_trt.precision import STORAGE

FORMAT = "astro-trt-bundle"
# 2: the item table left the graphs (graph inputs are item rows; tables/ holds the table once per stored form).
FORMAT_VERSION = 2
FIX = "re-export the bundle with `astro-trt export`"
MAX_DIM = 2**31 - 1  # a profile bound beyond this is no engine's
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_PATH = 1024


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _Schema:
    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, field: str, problem: str) -> BundleError:
        return BundleError(f"{self.where}: field '{field}' {problem}; {FIX}")

    def obj(self, value: Any, field: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(field, f"must be an object, got {type(value).__name__}")
        return value

    def key(self, parent: dict[str, Any], name: str, field: str) -> Any:
        if name not in parent:
            raise self.fail(f"{field}.{name}" if field else name, "is missing")
        return parent[name]

    def text(self, value: Any, field: str, choices: tuple[str, ...] | None = None) -> str:
        if not isinstance(value, str):
            raise self.fail(field, f"must be a string, got {type(value).__name__}")
        if choices is not None and value not in choices:
            raise self.fail(field, f"is {_show(value)}, expected one of {list(choices)}")
        return value

    def integer(self, value: Any, field: str, low: int = 0, high: int = 2**63 - 1) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(field, f"must be an integer, got {type(value).__name__}")
        if not low <= value <= high:
            raise self.fail(field, f"is {_show(value)}, outside {low}..{high}")
        return value

    def number(self, value: Any, field: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise self.fail(field, f"must be a finite number, got {_show(value)}")
        return float(value)

    def array(self, value: Any, field: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(field, f"must be a list, got {type(value).__name__}")
        return value

    def sha256(self, value: Any, field: str) -> str:
        if not isinstance(value, str) or not _SHA256.fullmatch(value):
            raise self.fail(field, f"must be a sha256 hex digest, got {_show(value)}")
        return value

    def path(self, value: Any, field: str) -> str:
        """A relative, normalised POSIX path that stays inside the bundle (as text)."""
        ok = (isinstance(value, str) and 0 < len(value) <= _MAX_PATH and "\\" not in value and "\0" not in value
              and not value.startswith("/") and posixpath.normpath(value) == value
              and not any(part in ("", ".", "..") for part in value.split("/")))
        if not ok:
            raise self.fail(field, f"= {_show(value)} is not a relative, normalised path inside the bundle")
        return value


def check_manifest(manifest: Any, where: str) -> dict[str, Any]:
    """Validate ``manifest`` (parsed JSON) against the schema; returns it. ``where`` names the
    file in messages."""
    s = _Schema(where)
    m = s.obj(manifest, "(top level)")
    if m.get("format") != FORMAT:
        raise BundleError(f"{where}: not an astro-trt bundle manifest (format {_show(m.get('format'))}); {FIX}")
    version = m.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:  # not 1.0, not true
        raise BundleError(f"{where}: bundle format version {_show(version)}, this astro-trt reads version "
                          f"{FORMAT_VERSION}; {FIX}")
    tool = s.obj(s.key(m, "tool", ""), "tool")
    for name in ("version", "created"):
        s.text(s.key(tool, name, "tool"), f"tool.{name}")
    s.obj(s.key(m, "config", ""), "config")  # its fields: ASTROConfig.from_dict
    checkpoint = s.obj(s.key(m, "checkpoint", ""), "checkpoint")
    s.path(s.key(checkpoint, "path", "checkpoint"), "checkpoint.path")
    s.sha256(s.key(checkpoint, "sha256", "checkpoint"), "checkpoint.sha256")
    _backend(s, s.key(m, "backend", ""))
    precisions = s.array(s.key(m, "precisions", ""), "precisions")
    if not precisions:
        raise s.fail("precisions", "is empty")
    for i, p in enumerate(precisions):
        s.text(p, f"precisions[{i}]", PRECISIONS)
    if len(set(precisions)) != len(precisions):
        raise s.fail("precisions", f"lists a precision twice: {precisions}")
    attention = s.obj(s.key(m, "attention", ""), "attention")
    effective = s.obj(s.key(attention, "effective", "attention"), "attention.effective")
    for p in precisions:
        s.text(s.key(effective, p, "attention.effective"), f"attention.effective.{p}", contract.LOWERINGS)
    _profile(s, s.key(m, "profile", ""))
    files = s.obj(s.key(m, "files", ""), "files")
    for rel, digest in files.items():
        s.path(rel, f"files[{_show(rel)}]")
        s.sha256(digest, f"files.{rel}")
    for rel, size in s.obj(m.get("sizes", {}), "sizes").items():  # optional: bundles before it lack it
        _listed(s, files, rel, f"sizes[{_show(rel)}]")
        s.integer(size, f"sizes.{rel}")
    _item_table(s, files, s.key(m, "item_table", ""))
    kv_cache = s.obj(s.key(m, "kv_cache", ""), "kv_cache")
    onnx = s.obj(s.key(m, "onnx", ""), "onnx")
    engines = s.obj(m.get("engines", {}), "engines")
    for p in precisions:
        s.obj(s.key(kv_cache, p, "kv_cache"), f"kv_cache.{p}")
        graphs = s.obj(s.key(onnx, p, "onnx"), f"onnx.{p}")
        for graph in GRAPHS:
            entry = s.obj(s.key(graphs, graph, f"onnx.{p}"), f"onnx.{p}.{graph}")
            _listed(s, files, s.key(entry, "path", f"onnx.{p}.{graph}"), f"onnx.{p}.{graph}.path")
            _graph_io(s, s.key(entry, "io", f"onnx.{p}.{graph}"), f"onnx.{p}.{graph}.io")
            if "pairs_per_chunk" in entry:  # the full model's Loop chunk (exporter/pair_chunks.py)
                s.integer(entry["pairs_per_chunk"], f"onnx.{p}.{graph}.pairs_per_chunk", low=1)
    for p, built in engines.items():
        s.text(p, "engines (precision)", tuple(precisions))
        for graph, entry in s.obj(built, f"engines.{p}").items():
            _engine(s, files, graph, s.obj(entry, f"engines.{p}.{graph}"), f"engines.{p}.{graph}")
    if "parity" in m:
        for p, graphs in s.obj(m["parity"], "parity").items():
            for graph, err in s.obj(graphs, f"parity.{p}").items():
                s.number(err, f"parity.{p}.{graph}")
    for name, rels in s.obj(m.get("reports", {}), "reports").items():
        if "/" in name or name.startswith(".") or not name:
            raise s.fail(f"reports[{_show(name)}]", "must be a plain folder name")
        for i, rel in enumerate(s.array(rels, f"reports.{name}")):
            _listed(s, files, rel, f"reports.{name}[{i}]")
    return m


def _listed(s: _Schema, files: dict[str, Any], rel: Any, field: str) -> None:
    # A path the loader follows must be one whose sha256 the manifest records.
    if s.path(rel, field) not in files:
        raise s.fail(field, f"= {_show(rel)} is not listed in 'files', so it could not be verified")


def _item_table(s: _Schema, files: dict[str, Any], value: Any) -> None:
    """item_table: {"default": storage, "tables": {storage: {storage, rows, dim, path, scales}}}."""
    entry = s.obj(value, "item_table")
    tables = s.obj(s.key(entry, "tables", "item_table"), "item_table.tables")
    if not tables:
        raise s.fail("item_table.tables", "is empty")
    s.text(s.key(entry, "default", "item_table"), "item_table.default", tuple(tables))
    for name, table in tables.items():
        field = f"item_table.tables.{name}"
        table = s.obj(table, field)
        s.text(name, f"{field} (storage)", tuple(STORAGE))
        if s.text(s.key(table, "storage", field), f"{field}.storage") != name:
            raise s.fail(f"{field}.storage", f"is {_show(table['storage'])}, not {name!r}")
        s.integer(s.key(table, "rows", field), f"{field}.rows", 1)
        s.integer(s.key(table, "dim", field), f"{field}.dim", 1)
        _listed(s, files, s.key(table, "path", field), f"{field}.path")
        scales = table.get("scales")
        if STORAGE[name].scaled or scales is not None:
            if not STORAGE[name].scaled:
                raise s.fail(f"{field}.scales", f"is given, but {name} tables have no scales")
            _listed(s, files, s.key(table, "scales", field), f"{field}.scales")


def _backend(s: _Schema, value: Any) -> None:
    if value is None:
        return
    backend = s.obj(value, "backend")
    s.text(s.key(backend, "name", "backend"), "backend.name")
    s.text(s.key(backend, "version", "backend"), "backend.version")
    for i, t in enumerate(s.array(s.key(backend, "targets", "backend"), "backend.targets")):
        s.text(t, f"backend.targets[{i}]")
    level = s.key(backend, "opt_level", "backend")
    if level is not None:
        s.integer(level, "backend.opt_level", contract.OPT_LEVELS[0], contract.OPT_LEVELS[-1])


def _profile(s: _Schema, value: Any) -> None:
    profile = s.obj(value, "profile")
    # Which axes each graph needs is the contract's (engines/bundle.py checks it against the config).
    for graph in GRAPHS:
        ranges = s.obj(s.key(profile, graph, "profile"), f"profile.{graph}")
        if not set(ranges) <= set(contract.DYNAMIC_DIMS):
            raise s.fail(f"profile.{graph}", f"has axes {sorted(map(str, ranges))}, expected some of "
                         f"{list(contract.DYNAMIC_DIMS)}")
        for axis in ranges:
            field = f"profile.{graph}.{axis}"
            r = s.array(ranges[axis], field)
            if len(r) != 3:
                raise s.fail(field, f"must be [min, opt, max], got {_show(r)}")
            lo, opt, hi = (s.integer(v, field, 1, MAX_DIM) for v in r)
            if not lo <= opt <= hi:
                raise s.fail(field, f"= {r} is not ordered min <= opt <= max")


def _tensor(s: _Schema, value: Any, field: str) -> None:
    t = s.obj(value, field)
    s.text(s.key(t, "name", field), f"{field}.name")
    s.text(s.key(t, "dtype", field), f"{field}.dtype")
    for i, d in enumerate(s.array(s.key(t, "shape", field), f"{field}.shape")):
        if not isinstance(d, str):
            s.integer(d, f"{field}.shape[{i}]", -1, MAX_DIM)


def _graph_io(s: _Schema, value: Any, field: str) -> None:
    io = s.obj(value, field)
    s.text(s.key(io, "name", field), f"{field}.name")
    for kind in ("inputs", "outputs"):
        for i, t in enumerate(s.array(s.key(io, kind, field), f"{field}.{kind}")):
            _tensor(s, t, f"{field}.{kind}[{i}]")


def _engine(s: _Schema, files: dict[str, Any], graph: Any, entry: dict[str, Any], field: str) -> None:
    s.text(graph, field, GRAPHS)
    _listed(s, files, s.key(entry, "path", field), f"{field}.path")
    s.text(s.key(entry, "io_source", field), f"{field}.io_source")
    s.integer(s.key(entry, "bytes", field), f"{field}.bytes")
    s.number(s.key(entry, "build_seconds", field), f"{field}.build_seconds")
    for i, record in enumerate(s.array(s.key(entry, "io", field), f"{field}.io")):
        where = f"{field}.io[{i}]"
        _tensor(s, record, where)
        s.text(s.key(record, "mode", where), f"{where}.mode", ("input", "output"))
        bounds = [record.get(b) for b in ("min", "opt", "max")]
        if any(b is not None for b in bounds):  # an input's profile: all three or none
            for bound, dims in zip(("min", "opt", "max"), bounds, strict=True):
                for j, d in enumerate(s.array(dims, f"{where}.{bound}")):
                    s.integer(d, f"{where}.{bound}[{j}]", 0, MAX_DIM)


__all__ = ["FIX", "FORMAT", "FORMAT_VERSION", "check_manifest"]
