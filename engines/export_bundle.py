"""Checkpoint -> bundle as one library call: parse the request, export every precision's graphs
(trying the attention lowerings in order), check them on ONNX Runtime, build the engines, and write
the bundle with its manifest atomically. `astro-trt export` is this function plus printing.

Everything that can be refused is refused before the checkpoint is read or a file is written."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from astro_trt import arguments, contract
from astro_trt.artifacts import (
    as_path,
    check_apart,
    check_destination,
    check_free_space,
    check_replaceable,
    refuse_existing,
)
from astro_trt.choices import comma_list
from astro_trt.engines.backend import AUTO, PORTABLE, resolve_backend, target_names
from astro_trt.engines.build import BuildSettings, Profile, attention_candidates, build_engine, check_opt_level
from astro_trt.engines.bundle import CHECKPOINT_DIR, engine_relpath, load_bundle, onnx_relpath, staged_bundle
from astro_trt.errors import AstroError, BundleError, CheckpointError, ConfigError
from astro_trt.exporter.check import check_graphs
from astro_trt.exporter.export import export_onnx
from astro_trt.manifest import MANIFEST, build_manifest, write_manifest
from astro_trt.model.checkpoint import copy_checkpoint, load_checkpoint, read_checkpoint_config, write_dense_checkpoint
from astro_trt.model.item_table import (
    REFERENCE_TABLE,
    TABLE_DIR,
    planned_table_bytes,
    table_shape,
    write_tables,
)
from astro_trt.model.resources import check_fits, parameter_lower_bound
from astro_trt.precision import STORAGE
from astro_trt.settings import EXPORT_PRECISIONS, MAX_BATCH, MAX_CANDIDATES

Progress = Callable[[str], None]
# What an engine built from the QDQ form of an int8 graph records as its source (exporter/quantize.py).
QDQ_SOURCE = "qdq: onnxruntime.quantization.quantize_static, int8 symmetric, per-channel weights"


@dataclass
class ExportedBundle:
    """What export_bundle wrote: the bundle directory (absolute) and its manifest."""

    directory: Path
    manifest: dict[str, Any]

    @property
    def precisions(self) -> list[str]:
        return list(self.manifest["precisions"])

    def parity(self, precision: str) -> dict[str, float]:
        """ONNX Runtime's max abs error against PyTorch per graph, measured at export."""
        return dict(self.manifest["parity"][precision])


def parse_precisions(value: str | Sequence[str]) -> list[str]:
    """'fp32,fp16' or ['fp32', 'fp16'] -> ['fp32', 'fp16'] (lower case, duplicates dropped)."""
    return comma_list(value, contract.PRECISIONS, "--precision")


def parse_item_tables(value: str | Sequence[str]) -> list[str]:
    """'int8' or 'fp16,int8' -> the stored forms of the item table, the served default first. The
    fp32 table is always stored (appended when not named): it is the checkpoint's own rows, which
    the oracle reads, so quantized tables are judged against it."""
    storages = comma_list(value, tuple(STORAGE), "--item-table")
    return storages if REFERENCE_TABLE in storages else [*storages, REFERENCE_TABLE]


def export_bundle(
    checkpoint: str | Path,
    out: str | Path,
    *,
    precisions: str | Sequence[str] = EXPORT_PRECISIONS,
    backend: str = "auto",
    attention: str = contract.AUTO_LOWERING,
    targets: str | Sequence[str] = "portable",
    max_batch: int = MAX_BATCH,
    max_candidates: int = MAX_CANDIDATES,
    item_tables: str | Sequence[str] = REFERENCE_TABLE,
    opt_level: int | None = None,
    timing_cache: str | Path | None = None,
    engines: bool = True,
    force: bool = False,
    progress: Progress | None = None,
) -> ExportedBundle:
    """Export ``checkpoint`` to a verified bundle at ``out``: ONNX graphs per precision, TensorRT
    engines (unless ``engines=False``), the item table once per stored form of ``item_tables``
    (the first is the one served; fp32 is always kept), the dense checkpoint copy the validator
    uses as its oracle with the fp32 table, and the manifest. ``progress`` receives one short
    status line per step. Raises an AstroError
    subclass (message "problem; fix") for anything refused; ``out`` is then left as it was."""
    say = arguments.callback(progress, "progress") or (lambda _msg: None)
    arguments.flag(engines, "engines (--no-engines)")
    arguments.flag(force, "force (--force)")
    wanted = parse_precisions(precisions)
    storages = parse_item_tables(item_tables)
    profile = Profile(max_batch=max_batch, max_candidates=max_candidates)
    # Checked here, not only by the builder: an ONNX-only export must not accept what a build would refuse.
    opt_level = check_opt_level(opt_level)
    if not engines:
        _refuse_engine_options(backend, targets, opt_level, timing_cache)
    chosen = resolve_backend(backend) if engines else None
    target_list = chosen.parse_targets(targets) if chosen else []
    lowerings = {p: attention_candidates(chosen, attention, p) for p in wanted}
    out = as_path(out, "out")
    refuse_existing(out, force, BundleError)
    check_destination(out)
    check_replaceable(out)
    cache = as_path(timing_cache, "timing_cache") if timing_cache is not None else None
    if cache is not None and chosen is not None and not chosen.timing_cache:
        say(f"note: --timing-cache {cache} is not used: {chosen.name} has no timing cache (a no-op in its API)")
    # A bundle re-exports from its own dense checkpoint and fp32 table (verified as it loads).
    checkpoint = as_path(checkpoint, "checkpoint", CheckpointError)
    source = load_bundle(checkpoint) if _is_bundle(checkpoint) else None
    # Judged from the config before the weights are read (the item table is streamed, never held).
    cfg = source.config if source is not None else read_checkpoint_config(checkpoint)
    check_fits(cfg, users=2, candidates=5, purpose="export", streaming=True)
    # The bundle's size, before any file is written: the tables, plus an ONNX graph and an engine of
    # the dense weights per graph and precision (their size does not depend on the vocabulary).
    rows, dim = table_shape(cfg)
    dense = 4 * (parameter_lower_bound(cfg) - rows * dim)
    check_free_space(out, planned_table_bytes(cfg, storages) + 2 * len(contract.GRAPHS) * len(wanted) * dense,
                     "--out", BundleError)
    ckpt = source.checkpoint() if source is not None else load_checkpoint(checkpoint)
    check_apart(out, source.directory if source is not None else ckpt.directory, "checkpoint", "bundle")
    table = source.item_table(REFERENCE_TABLE) if source is not None else ckpt.model.item_table

    start = time.perf_counter()
    with staged_bundle(out, force=force) as stage:
        # The item table first, streamed from the checkpoint into every stored form at once: the
        # rows are in no graph or engine, and never all in memory.
        say(f"item table: {rows} rows x {dim} -> {', '.join(storages)}")
        tables = write_tables(table.float_chunks(), rows, dim, stage / TABLE_DIR, storages)
        # The dense weights and the documents save_checkpoint wrote (config, metrics, data
        # fingerprint): validate reproduces the trained AUCs from them and the fp32 table.
        (stage / CHECKPOINT_DIR).mkdir()
        if source is not None:  # already dense-only: copied as it is (regular files, bounded sizes)
            copy_checkpoint(source.checkpoint_dir, stage / CHECKPOINT_DIR)
        else:
            write_dense_checkpoint(ckpt.directory, stage / CHECKPOINT_DIR, source_sha256=ckpt.sha256)
        build = BuildSettings(chosen, profile, tuple(target_list), opt_level, cache)
        parts = {p: _export_precision(ckpt.model, stage, p, lowerings[p], build, say) for p in wanted}
        manifest = build_manifest(
            config=ckpt.config.to_dict(),
            checkpoint={"path": CHECKPOINT_DIR, "sha256": ckpt.sha256,
                        "source": str(source.directory if source is not None else ckpt.directory)},
            item_table={"default": storages[0], "tables": {s: tables[s][0].to_dict() for s in storages}},
            backend=None if chosen is None else {
                "name": chosen.name, "version": chosen.version, "targets": target_list, "opt_level": opt_level,
                "capabilities": chosen.capabilities(),
            },
            precisions=wanted,
            attention={"requested": attention, "effective": {p: parts[p]["effective"] for p in wanted},
                       "fallbacks": {p: parts[p]["failures"] for p in wanted if parts[p]["failures"]}},
            profile={g: {d: list(r) for d, r in profile.for_graph(io).items()}
                     for g, io in contract.graph_io(ckpt.config, wanted[0]).items()},
            kv_cache={p: parts[p]["kv_cache"] for p in wanted},
            onnx={p: parts[p]["onnx"] for p in wanted},
            engines={p: parts[p]["engines"] for p in wanted if parts[p]["engines"]},
            parity={p: parts[p]["parity"] for p in wanted},
            export_seconds=round(time.perf_counter() - start, 2),
        )
        write_manifest(stage, manifest)
    return ExportedBundle(out.resolve(), manifest)


def _is_bundle(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


def _refuse_engine_options(backend: object, targets: object, opt_level: int | None, timing_cache: object) -> None:
    """An ONNX-only export refuses the options only engine builds read, as trtexec refuses an
    option it would ignore: a user who asked for sm89 plans must not get a bundle without them."""
    given = {"--backend": backend if backend != AUTO else None,
             "--targets": targets if target_names(targets) != [PORTABLE] else None,
             "--opt-level": opt_level, "--timing-cache": timing_cache}
    named = [f"{flag} {value!r}" for flag, value in given.items() if value is not None]
    if named:
        one = len(named) == 1
        raise ConfigError(f"{', '.join(named)}: {'an engine option' if one else 'engine options'}, but --no-engines "
                          f"(engines=False) builds no engine; drop {'it' if one else 'them'}, or drop --no-engines "
                          "to build engines")


def _export_precision(model: Any, stage: Path, precision: str, lowerings: list, build: BuildSettings,
                      say: Progress) -> dict[str, Any]:
    """Export (and build) one precision, trying the lowerings in order; returns its manifest parts."""
    failures: dict[str, str] = {}
    for index, lowering in enumerate(lowerings):
        onnx_dir = stage / "onnx" / precision
        engine_dir = stage / "engines" / precision
        # The QDQ form an int8 engine is built from: inside the stage, so that an interrupted export
        # leaves nothing behind, and removed before the manifest lists the bundle's files.
        sources_dir = Path(tempfile.mkdtemp(prefix=".engine-sources-", dir=stage))
        try:
            say(f"{precision}: export ONNX ({lowering.effective})")
            result = export_onnx(model, onnx_dir, precision=precision, attention=lowering.export_as,
                                 engine_dir=sources_dir if build.backend is not None else None)
            say(f"{precision}: ONNX Runtime parity")
            parity = check_graphs(model, result)  # ExportError on a failed check, NaN included
            engines: dict[str, Any] = {}
            for graph, io in result.io.items():
                if build.backend is None:
                    continue
                say(f"{precision}/{graph}: build")
                source = result.engine_sources.get(graph)
                built = build_engine(
                    build.backend, source or result.paths[graph], io, build.profile, targets=list(build.targets),
                    opt_level=build.opt_level, plugins=lowering.effective == contract.PLUGIN,
                    timing_cache=build.timing_cache,
                    progress=lambda phase, g=graph: say(f"{precision}/{g}: {phase}"),
                )
                path = stage / engine_relpath(graph, precision)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(built.plan)
                engines[graph] = {"path": engine_relpath(graph, precision), "io": built.io,
                                  "io_source": built.io_source, "build_seconds": round(built.seconds, 3),
                                  "bytes": len(built.plan),
                                  **({"source": QDQ_SOURCE} if source is not None else {})}
        except (AstroError, ImportError) as exc:
            if index + 1 == len(lowerings):
                raise
            failures[lowering.effective] = str(exc)
            shutil.rmtree(onnx_dir, ignore_errors=True)
            shutil.rmtree(engine_dir, ignore_errors=True)
            continue
        finally:
            shutil.rmtree(sources_dir, ignore_errors=True)
        exported = result.to_manifest()  # the exporter's own account of its graphs
        onnx = {graph: {"path": onnx_relpath(graph, precision), "io": entry["io"], "opset": exported["opset"],
                        **{k: entry[k] for k in ("op_domains", "pairs_per_chunk") if k in entry}}
                for graph, entry in exported["graphs"].items()}
        return {"effective": lowering.effective, "failures": failures, "onnx": onnx, "engines": engines,
                "parity": {g: float(e) for g, e in parity.items()}, "kv_cache": exported["kv_cache"]}
    raise AssertionError("unreachable: the last lowering either returns or raises")


__all__ = ["ExportedBundle", "export_bundle", "parse_precisions"]
