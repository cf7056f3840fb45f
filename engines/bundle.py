"""The deployment bundle (docs/bundle.md): writing it atomically, loading and
verifying it, and adding reports to it.

Layout::

    DIR/manifest.json, DIR/manifest.sha256     (astro_trt.manifest)
    DIR/checkpoint/{model.safetensors,config.json,metrics.json,...}   (the oracle's dense weights)
    DIR/tables/item_table.<storage>.bin[, .scales.bin]   (the item table, once per stored form;
                                              in no graph or engine; model/item_table.py)
    DIR/onnx/<precision>/<graph>.onnx
    DIR/engines/<precision>/<graph>.plan      (absent with --no-engines)
    DIR/reports/                              (validate/bench; see write_report)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from astro_trt.arguments import flag
from astro_trt.artifacts import (
    as_path,
    atomic_write,
    copy_regular_file,
    refuse_existing,
    sha256_file,
    staged_directory,
)
from astro_trt.config import ASTROConfig
from astro_trt.contract import GraphIO, TensorSpec, float_dtype, graph_io, kv_cache_layout
from astro_trt.engines.backend import BACKENDS
from astro_trt.engines.bundle_graphs import check_against_graphs
from astro_trt.errors import BundleError, ConfigError
from astro_trt.lazy import lazy_import
from astro_trt.manifest import (
    MANIFEST,
    MANIFEST_HASH,
    MAX_MANIFEST_BYTES,
    REPORTS,
    inside,
    read_manifest,
    read_manifest_digest,
    verify_files,
    write_manifest,
)
from astro_trt.model.item_table import REFERENCE_TABLE, ItemTable, TableFiles, table_shape

CHECKPOINT_DIR = "checkpoint"
# The oracle's loader imports torch: light users of bundles (the served models on a CPU) never need it.
checkpoints = lazy_import("astro_trt.model.checkpoint")


def onnx_relpath(graph: str, precision: str) -> str:
    return f"onnx/{precision}/{graph}.onnx"


def engine_relpath(graph: str, precision: str) -> str:
    return f"engines/{precision}/{graph}.plan"


def _graph_io(data: dict[str, Any]) -> GraphIO:
    def spec(t: dict[str, Any]) -> TensorSpec:
        return TensorSpec(t["name"], t["dtype"], tuple(t["shape"]))

    return GraphIO(data["name"], tuple(spec(t) for t in data["inputs"]), tuple(spec(t) for t in data["outputs"]))


@dataclass
class Bundle:
    """A loaded (and, by default, verified) bundle. Paths are absolute."""

    directory: Path
    manifest: dict[str, Any]
    config: ASTROConfig
    precisions: list[str]
    backend: str | None  # back-end name the engines were built with; None for an ONNX-only bundle
    checkpoint_dir: Path
    checkpoint_sha256: str
    manifest_sha256: str = ""  # sha256 of manifest.json: what --expect-sha256 pins
    _tables: dict[str, ItemTable] = field(default_factory=dict, repr=False)  # opened (mapped) once each

    @property
    def table_storages(self) -> list[str]:
        """The stored forms of the item table, the served default first."""
        entry = self.manifest["item_table"]
        return [entry["default"], *(s for s in entry["tables"] if s != entry["default"])]

    def table_files(self, storage: str | None = None) -> TableFiles:
        storages = self.table_storages
        storage = storages[0] if storage is None else storage
        if storage not in storages:
            raise BundleError(f"{self.directory}: no {storage!r} item table (it has {storages}); pick one of those or "
                              f"re-export with --item-table {storage}")
        return TableFiles.from_dict(self.manifest["item_table"]["tables"][storage], f"{self.directory} item_table")

    def item_table(self, storage: str | None = None) -> ItemTable:
        """The item table in ``storage`` (None: the bundle's served default), mapped: only the rows a
        lookup asks for are read. Its file was verified with the bundle (load_bundle)."""
        files = self.table_files(storage)
        if files.storage not in self._tables:
            self._tables[files.storage] = ItemTable.open(self.directory, files)
        return self._tables[files.storage]

    def checkpoint(self) -> Any:
        """The oracle: the bundle's dense checkpoint with the fp32 item table (model/checkpoint.py).
        It answers to the sha256 of the checkpoint the bundle was exported from (manifest
        ``checkpoint.sha256``): its files are the ones the manifest's hashes vouch for."""
        loaded = checkpoints.load_checkpoint(self.checkpoint_dir, item_table=self.item_table(REFERENCE_TABLE))
        if loaded.source_sha256 not in (None, self.checkpoint_sha256):
            raise BundleError(f"{self.checkpoint_dir}: the dense checkpoint was made from a checkpoint with sha256 "
                              f"{loaded.source_sha256[:16]}..., but the manifest records "
                              f"{self.checkpoint_sha256[:16]}...; re-export the bundle from its checkpoint")
        return dataclasses.replace(loaded, sha256=self.checkpoint_sha256)

    def _precision(self, precision: str) -> str:
        float_dtype(precision)  # ConfigError naming the precisions for an unknown one
        if precision not in self.precisions:
            raise BundleError(
                f"{self.directory}: no {precision} graphs in this bundle (it has {self.precisions}); "
                f"re-export with --precision {precision}"
            )
        return precision

    def attention(self, precision: str) -> str:
        """Effective attention lowering of that precision's graphs: plugin | native | reference."""
        return self.manifest["attention"]["effective"][self._precision(precision)]

    def onnx_path(self, graph: str, precision: str) -> Path:
        entry = self.manifest["onnx"][self._precision(precision)].get(graph)
        if entry is None:
            raise BundleError(f"{self.directory}: no {graph} graph for {precision}; re-export the bundle")
        return self.directory / entry["path"]

    def _engine(self, graph: str, precision: str) -> dict[str, Any] | None:
        return self.manifest.get("engines", {}).get(self._precision(precision), {}).get(graph)

    def engine_path(self, graph: str, precision: str) -> Path | None:
        entry = self._engine(graph, precision)
        return None if entry is None else self.directory / entry["path"]

    def engine_io(self, graph: str, precision: str) -> list[dict[str, Any]] | None:
        entry = self._engine(graph, precision)
        return None if entry is None else entry["io"]

    def io(self, precision: str) -> dict[str, GraphIO]:
        graphs = self.manifest["onnx"][self._precision(precision)]
        return {graph: _graph_io(entry["io"]) for graph, entry in graphs.items()}

    def profile(self, graph: str) -> dict[str, tuple[int, int, int]]:
        """Dynamic axis -> (min, opt, max) the engines of ``graph`` accept."""
        try:
            return {dim: tuple(r) for dim, r in self.manifest["profile"][graph].items()}  # type: ignore[misc]
        except KeyError:
            raise BundleError(f"{self.directory}: no profile for graph '{graph}' in the manifest") from None


def load_bundle(path: str | Path, *, verify: bool = True, expect_sha256: str | None = None) -> Bundle:
    """Read a bundle; with ``verify`` check the manifest's own hash and every file's sha256 and
    refuse (BundleError naming the file) anything missing, changed or unexpected. With
    ``expect_sha256`` (the manifest digest ``export`` and ``inspect`` print) refuse every bundle
    but that one. The manifest is schema-checked and every path in it must resolve inside the
    bundle, verified or not. A manifest its graphs contradict (table sizes, graph I/O, external
    data, profiles; engines/bundle_graphs.py) is refused either way."""
    directory = as_path(path, "bundle", BundleError).resolve()
    flag(verify, "verify")
    manifest, digest = read_manifest_digest(directory, expect_sha256=expect_sha256)
    where = f"{directory}/manifest.json"
    try:
        config = ASTROConfig.from_dict(manifest["config"], source=f"{where} config")
    except (TypeError, ValueError, OverflowError, ConfigError) as exc:
        raise BundleError(f"{where}: its config is not valid ({exc}); re-export the bundle") from None
    _check_consistent(manifest, config, where)
    if verify:
        verify_files(directory, manifest)
    else:  # unverified still never leaves the bundle
        for rel in manifest["files"]:
            inside(directory, rel)
    # After the files: the graphs read here are the ones the hashes vouch for.
    check_against_graphs(directory, manifest, config, where)
    checkpoint_dir = directory / manifest["checkpoint"]["path"]
    if not checkpoint_dir.resolve().is_relative_to(directory) or not checkpoint_dir.is_dir():
        raise BundleError(f"{where}: checkpoint path '{manifest['checkpoint']['path']}' is not a folder of the "
                          "bundle; re-export the bundle")
    backend = manifest["backend"]
    return Bundle(
        directory=directory, manifest=manifest, config=config, precisions=list(manifest["precisions"]),
        backend=backend["name"] if backend else None, checkpoint_dir=checkpoint_dir,
        checkpoint_sha256=manifest["checkpoint"]["sha256"], manifest_sha256=digest,
    )


def _check_consistent(manifest: dict[str, Any], config: ASTROConfig, where: str) -> None:
    """The I/O and KV-cache layout the manifest records are the contract's for its config: the
    gate judges requests by the config, so a config edited apart from the graphs is refused."""
    backend = manifest["backend"]
    if backend is not None and backend["name"] not in BACKENDS:
        raise BundleError(f"{where}: back end '{backend['name']}' is not one this astro-trt knows "
                          f"({sorted(BACKENDS)}); re-export the bundle")
    for precision in manifest["precisions"]:
        io = graph_io(config, precision)
        for graph, entry in manifest["onnx"][precision].items():
            if entry["io"] != io[graph].to_dict():
                raise BundleError(f"{where}: the I/O of onnx.{precision}.{graph} is not the contract of its config "
                                  f"'{config.name}'; re-export the bundle")
        for graph, spec in io.items():
            if not set(spec.dynamic_dims) <= set(manifest["profile"][graph]):
                raise BundleError(f"{where}: profile.{graph} has axes {sorted(manifest['profile'][graph])}, but the "
                                  f"graph needs {list(spec.dynamic_dims)}; re-export the bundle")
        if manifest["kv_cache"][precision] != kv_cache_layout(config, precision).to_dict():
            raise BundleError(f"{where}: kv_cache.{precision} is not the layout of its config '{config.name}'; "
                              "re-export the bundle")
    for storage, entry in manifest["item_table"]["tables"].items():
        shape = [entry["rows"], entry["dim"]]
        if shape != list(table_shape(config)):
            raise BundleError(f"{where}: config.num_items = {config.num_items} and config.d_model = {config.d_model} "
                              f"need an item table of [{config.num_items + 1}, {config.d_model}] (row 0 is padding), "
                              f"but item_table.tables.{storage} is {shape}; re-export the bundle")


def write_report(bundle_dir: str | Path, name: str, files: Mapping[str, bytes | str | Path]) -> list[Path]:
    """Add report files under ``reports/<name>/`` and record them (and their sha256) in the
    manifest, so the bundle stays verifiable. ``files`` maps a file name to its content (bytes,
    text, or a path to copy). The bundle is verified first: a report never blesses a changed bundle.
    Returns the written paths."""
    directory = Path(bundle_dir).resolve()
    manifest = read_manifest(directory)
    verify_files(directory, manifest)
    if not name or "/" in name or name.startswith("."):
        raise BundleError(f"report name '{name}' must be a plain folder name such as 'validate'")
    target = directory / REPORTS / name
    for folder in (directory / REPORTS, target):  # a link here would write outside the bundle
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            raise BundleError(f"{folder} is not a plain folder of the bundle; remove it or re-export the bundle")
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, content in files.items():
        if "/" in filename or filename.startswith("."):
            raise BundleError(f"report file name '{filename}' must be a plain file name")
        path = target / filename
        if isinstance(content, Path):
            content = content.read_bytes()
        atomic_write(path, content if isinstance(content, bytes) else content.encode())
        rel = path.relative_to(directory).as_posix()
        manifest["files"][rel] = sha256_file(path)
        manifest.setdefault("sizes", {})[rel] = path.stat().st_size
        written.append(path)
    manifest.setdefault("reports", {})[name] = sorted(
        set(manifest.get("reports", {}).get(name, [])) | {p.relative_to(directory).as_posix() for p in written}
    )
    write_manifest(directory, manifest, hash_all=False)
    return written


def copy_bundle(bundle: Bundle, target: str | Path) -> Path:
    """Copy ``bundle`` into the new folder ``target``: its manifest and exactly the files the
    manifest lists, nothing else of the folder (unlisted reports, links, FIFOs, devices stay
    behind). Each file is opened without following a link, must be a regular file inside the
    bundle, is read up to the size the manifest records (its size when the bundle was checked,
    for bundles written before sizes were recorded) and must hash to its recorded sha256."""
    target = Path(target)
    target.mkdir(parents=True)
    sources = {MANIFEST: (bundle.manifest_sha256, MAX_MANIFEST_BYTES), **{
        rel: (digest, bundle.manifest.get("sizes", {}).get(rel)) for rel, digest in bundle.manifest["files"].items()}}
    for rel, (digest, size) in sorted(sources.items()):
        source = inside(bundle.directory, rel)
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        copy_regular_file(source, target / rel, sha256=digest,
                          max_bytes=source.lstat().st_size if size is None else size)
    atomic_write(target / MANIFEST_HASH, f"{bundle.manifest_sha256}  {MANIFEST}\n".encode())
    return target


@contextmanager
def staged_bundle(out: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; on normal exit it replaces ``out`` by rename,
    on any exception (KeyboardInterrupt included) it is removed, so no partial bundle is ever at
    ``out``. The caller writes the manifest last, inside the block."""
    out = Path(out).resolve()
    refuse_existing(out, force, BundleError)
    with staged_directory(out) as stage:
        yield stage


__all__ = [
    "Bundle", "CHECKPOINT_DIR", "copy_bundle", "engine_relpath", "load_bundle", "onnx_relpath", "staged_bundle",
    "write_report",
]
