"""A manifest against what it describes, checked once when a bundle is loaded (load_bundle): a
manifest edited with its hashes recomputed must still agree with its graphs and with what this
astro-trt can run, or every later stage would trust a number the graphs contradict (an item id
the table lacks reaches ONNX Runtime as a raw error; a profile of 10^6 users is planned for).

- every ONNX path is an ONNX model of the graph it is listed as (its inputs and outputs are the
  contract's for that graph name), read without its weights (engines/graph_facts.py);
- ``config.num_behaviors`` / ``num_scenarios`` are the row counts of the tables the graphs index
  with the request's ids (the item table is in no graph: load_bundle checks its manifest entry
  against ``num_items`` and model/item_table.py its file's size);
- tensors stored outside an ONNX file name a file the manifest lists (so hashed and inside the
  bundle), at offsets within it, before ONNX Runtime or TensorRT opens anything;
- profiles stay within what an engine profile may ask for (astro_trt/settings.py MAX_PROFILE_DIM, the builder's bound),
  and the engines' recorded I/O has the manifest's profile and the contract's names.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from typing import Any

from astro_trt import precision as _precision
from astro_trt.arguments import as_path
from astro_trt.config import ASTROConfig
from astro_trt.contract import GraphIO, graph_io
from astro_trt.engines.graph_facts import ELEM_TYPES, GraphFacts, read_graph_facts
from astro_trt.errors import BundleError
from astro_trt.manifest import inside
from astro_trt.manifest_schema import FIX
from astro_trt.settings import MAX_PROFILE_DIM

# Name the exporter gives the behaviour table (model/astro.py state-dict name); a suffix (a
# quantized copy) keeps the prefix.
BEHAVIOR_TABLE = "model.behavior_embedding.weight"


def _table_sizes(cfg: ASTROConfig) -> dict[str, tuple[str, int]]:
    """Graph input whose ids index a table -> (config field, rows the table must have)."""
    return {"hist_behaviors": ("num_behaviors", cfg.num_behaviors + 1),
            "scenario": ("num_scenarios", cfg.num_scenarios)}


def check_against_graphs(directory: Any, manifest: dict[str, Any], cfg: ASTROConfig, where: str) -> None:
    """Raise BundleError naming the first manifest field its graphs or this astro-trt's bounds
    contradict."""
    _check_profiles(manifest, where)
    for precision in manifest["precisions"]:
        io = graph_io(cfg, precision)
        for graph, entry in manifest["onnx"][precision].items():
            field = f"onnx.{precision}.{graph}"
            rel = entry["path"]
            try:
                facts = read_graph_facts(inside(directory, rel))
            except (ValueError, OSError) as exc:
                raise BundleError(f"{where}: {field}.path = '{rel}' is not an ONNX model ({exc}); {FIX}") from None
            _check_io(facts, io[graph], f"{field}.path = '{rel}'", where)
            _check_tables(facts, cfg, field, where)
            _check_external(directory, manifest, facts, rel, field, where)
    for precision, graphs in manifest.get("engines", {}).items():
        for graph, entry in graphs.items():
            _check_engine_io(entry["io"], graph_io(cfg, precision)[graph], manifest["profile"][graph],
                             f"engines.{precision}.{graph}.io", where)


def check_graph_files(graphs: Mapping[str, Any], cfg: ASTROConfig, precision: str) -> None:
    """Graphs given one by one (OrtRunner): each a regular ONNX file of the graph it is given as,
    with the config's table sizes, keeping external data beside it (not above its folder, not an
    absolute path); checked before ONNX Runtime opens it."""
    io = graph_io(cfg, precision)
    for graph, value in graphs.items():
        if graph not in io:
            continue
        path = as_path(value, f"graphs[{graph!r}]", BundleError)
        field = f"graphs[{graph!r}] = {str(path)[:120]}"
        try:
            facts = read_graph_facts(path)
        except (ValueError, OSError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise BundleError(f"{field}: not an ONNX model ({reason}); pass the bundle's graph files") from None
        _check_io(facts, io[graph], field, "graphs")
        _check_tables(facts, cfg, field, "graphs")
        for external in facts.external:
            location = external.get("location", "")
            folder = path.resolve().parent
            if (not _plain(location) or posixpath.normpath(location) != location or location.startswith("..")
                    or not (folder / location).resolve().is_relative_to(folder)):  # nor through a link
                raise BundleError(f"{field}: keeps tensor data at {location[:80]!r}, not a file beside the graph; "
                                  "pass the bundle's graph files")


def _plain(location: str) -> bool:
    """A relative POSIX path as ONNX external data names its file (no drive, no NUL)."""
    return bool(location) and not location.startswith("/") and "\\" not in location and "\0" not in location


def _check_profiles(manifest: dict[str, Any], where: str) -> None:
    for graph, ranges in manifest["profile"].items():
        for axis, (_, _, high) in ranges.items():
            if high > MAX_PROFILE_DIM:
                raise BundleError(f"{where}: profile.{graph}.{axis} allows {high}, beyond the {MAX_PROFILE_DIM} an "
                                  f"engine profile may ask for; {FIX}")


def _check_io(facts: GraphFacts, io: GraphIO, field: str, where: str) -> None:
    want_in = [(t.name, ELEM_TYPES[_precision.dtype(t.dtype).onnx]) for t in io.inputs]
    want_out = [(t.name, ELEM_TYPES[_precision.dtype(t.dtype).onnx]) for t in io.outputs]
    if facts.inputs != want_in or facts.outputs != want_out:
        raise BundleError(f"{where}: {field} is not the {io.name} graph of the bundle's config (inputs "
                          f"{[n for n, _ in facts.inputs]}, outputs {[n for n, _ in facts.outputs]}; expected "
                          f"{io.input_names} -> {io.output_names} with the contract's types); {FIX}")


def _check_tables(facts: GraphFacts, cfg: ASTROConfig, field: str, where: str) -> None:
    """Every table the graph indexes with request ids (or names as an embedding table) has the
    config's row count. A graph without such tables (the tests' contract graphs) has nothing to
    contradict."""
    sizes = _table_sizes(cfg)
    found = [(dims, "hist_behaviors", 0) for key, dims in facts.initializers.items() if key.startswith(BEHAVIOR_TABLE)]
    for dims, by, axis in [*found, *facts.gathers]:
        config_field, rows = sizes.get(by, (None, 0))
        if config_field is None:
            continue
        have = dims[axis] if -len(dims) <= axis < len(dims) else None
        if have != rows:
            raise BundleError(f"{where}: config.{config_field} = {getattr(cfg, config_field)}, but the table {field} "
                              f"indexes with {by} has {have} rows ({rows} expected); {FIX}")


def _check_external(directory: Any, manifest: dict[str, Any], facts: GraphFacts, rel: str, field: str,
                    where: str) -> None:
    for external in facts.external:
        location = external.get("location", "")
        target = posixpath.join(posixpath.dirname(rel), location)
        if not _plain(location) or posixpath.normpath(target) != target or target not in manifest["files"]:
            raise BundleError(f"{where}: {field} keeps tensor data at {location[:80]!r}, which is not a file this "
                              f"manifest lists beside the graph; {FIX}")
        size = inside(directory, target).stat().st_size
        try:
            offset, length = int(external.get("offset", 0)), int(external.get("length", 0))
        except ValueError:
            offset = length = -1
        if offset < 0 or length < 0 or offset + length > size:
            raise BundleError(f"{where}: {field} reads tensor data at offset {external.get('offset')!r}, length "
                              f"{external.get('length')!r} of {target} ({size} bytes); {FIX}")


def _check_engine_io(records: list[dict[str, Any]], io: GraphIO, profile: dict[str, list[int]], field: str,
                     where: str) -> None:
    names = sorted(r["name"] for r in records)
    if names != sorted(io.input_names + io.output_names):
        raise BundleError(f"{where}: {field} has tensors {names}, not the contract's "
                          f"{sorted(io.input_names + io.output_names)}; {FIX}")
    for record in records:
        if record.get("min") is None:
            continue
        spec = io.tensor(record["name"])
        for bound, index in (("min", 0), ("opt", 1), ("max", 2)):
            want = [profile[d][index] if isinstance(d, str) else d for d in spec.shape]
            if record[bound] != want:
                raise BundleError(f"{where}: {field} {record['name']} {bound} shape {record[bound]} is not the "
                                  f"manifest's profile and config ({want}); {FIX}")


__all__ = ["check_against_graphs", "check_graph_files"]
