"""The ONNX Runtime (CPU) back end over a bundle's ONNX graphs of one precision. Each graph runs in
the form the exporter says ONNX Runtime runs it (exporter/pair_chunks.py ``runtime_form``): the
full model as its Loop over chunks of pairs, prepared for ONNX Runtime; with ``unchunked_full``
its plain graph, every pair at once, which is what the bench times as the naive path (the fastest
form of the baseline, so the reported gain is the conservative one; its memory then grows with
B x M again, and the bench bounds the pairs per call).

Imports neither torch nor onnx (onnx only when a full model is prepared): the served models run
their split graphs through this module."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from astro_trt.arguments import choice, instance
from astro_trt.arguments import threads as threads_argument
from astro_trt.config import ASTROConfig
from astro_trt.contract import CAND_ITEMS, FULL_MODEL, GRAPHS
from astro_trt.engines.bundle import load_bundle
from astro_trt.engines.bundle_graphs import check_graph_files
from astro_trt.errors import BundleError, DataError
from astro_trt.lazy import lazy_import
from astro_trt.model.resources import check_fits
from astro_trt.ort_session import onnx_session
from astro_trt.precision import names
from astro_trt.runtime.gate import Ranges
from astro_trt.runtime.runner import Runner
from astro_trt.settings import ORT_THREADS

pair_chunks = lazy_import("astro_trt.exporter.pair_chunks")  # imports onnx: only the full model needs it


def ort_session(path: Path, threads: int | None = ORT_THREADS, profile_prefix: str | None = None,
                memory_pattern: bool = True, *, form: str | None = None) -> Any:
    """A session over the graph at ``path``, in the exporter's runtime ``form`` for it (a key of
    exporter/pair_chunks.py RUNTIME_FORMS; None: the file as stored)."""
    if not Path(path).is_file():
        raise BundleError(f"ONNX graph {path} is missing; re-export the bundle")
    prepared = None if form is None else pair_chunks.runtime_form(path, form)
    return onnx_session(path if prepared is None else prepared, threads, profile_prefix,
                        memory_pattern=memory_pattern)


class OrtRunner(Runner):
    """ONNX Runtime over the graphs ``graphs`` (graph -> .onnx path; a subset runs only those) with
    ``item_table`` (an ItemTable: ``bundle.item_table()``) for the rows of the request's item ids.
    ``profiles`` (graph -> {axis: (min, opt, max)}, e.g. a bundle's) bounds B and M as the engines
    are bounded; without it ONNX Runtime takes any batch (validation runs larger batches than the
    engines serve)."""

    runtime = "ort"

    def __init__(self, graphs: Mapping[str, Path], cfg: ASTROConfig, precision: str,
                 threads: int | None = ORT_THREADS, profile_dir: Path | None = None, *,
                 profiles: Mapping[str, Ranges] | None = None, unchunked_full: bool = False,
                 only: tuple[str, ...] = GRAPHS, item_table: Any = None) -> None:
        if threads is not None:
            threads_argument(threads, "OrtRunner threads", zero_means_all=True)
        instance(cfg, "OrtRunner cfg", ASTROConfig, "the model's ASTROConfig (load_bundle(DIR).config)")
        choice(precision, "OrtRunner precision", names())
        instance(graphs, "OrtRunner graphs", Mapping, "a mapping of graph name -> ONNX path")
        missing = [g for g in only if g not in graphs]
        if missing:
            raise BundleError(f"no ONNX graph for {missing} ({precision}); re-export the bundle with every graph")
        check_graph_files({g: graphs[g] for g in only}, cfg, precision)  # before ONNX Runtime opens any
        super().__init__(cfg, precision, profiles, item_table=item_table)
        self.unchunked_full = unchunked_full
        self.threads = threads
        full_form = "onnxruntime-plain" if unchunked_full else "onnxruntime"
        # The full model: no pre-planned block on top of the arena (climber, 1 x 1024: 0.35 vs 0.50 GB).
        self.sessions = {g: ort_session(Path(graphs[g]), threads,
                                        None if profile_dir is None else str(Path(profile_dir) / g),
                                        memory_pattern=g != FULL_MODEL, form=full_form if g == FULL_MODEL else None)
                         for g in only}
        for graph, session in self.sessions.items():
            got = [i.name for i in session.get_inputs()]
            if got != self.io[graph].input_names:
                raise BundleError(
                    f"{graphs[graph]}: inputs {got} do not follow the engine contract {self.io[graph].input_names}; "
                    "re-export the bundle with this version of astro-trt"
                )

    @classmethod
    def from_bundle(cls, bundle: Any, precision: str = "fp32", threads: int | None = ORT_THREADS, *,
                    only: tuple[str, ...] = GRAPHS, profiles: bool = False, item_table: str | None = None) -> OrtRunner:
        """The bundle's ONNX graphs of ``precision`` (a loaded engines.bundle.Bundle, or its
        directory); ``profiles`` bounds B and M by the bundle's engine profiles; ``item_table``: the
        stored table to look rows up in (fp32, fp16, int8; None: the bundle's default)."""
        if not hasattr(bundle, "onnx_path"):
            bundle = load_bundle(bundle)  # a path, or a one-line BundleError for anything else
        return cls({g: bundle.onnx_path(g, precision) for g in only}, bundle.config, precision, threads,
                   profiles={g: bundle.profile(g) for g in only} if profiles else None, only=only,
                   item_table=bundle.item_table(item_table))

    def end_profiling(self) -> dict[str, Path]:
        """graph -> the profile file its session wrote (sessions made with ``profile_dir``)."""
        return {g: Path(s.end_profiling()) for g, s in self.sessions.items()}

    def _run(self, graph: str, feeds: dict[str, Any]) -> np.ndarray:
        if CAND_ITEMS in feeds and self.profiles.get(graph) is None:
            # Without a profile nothing else bounds B x M: refuse what the memory estimate says
            # this machine cannot hold (the chunked full model holds one chunk of pairs).
            users, candidates = feeds[CAND_ITEMS].shape[:2]
            check_fits(self.cfg, users=users, candidates=candidates, purpose=f"ONNX Runtime {graph}",
                       full=graph == FULL_MODEL and self.unchunked_full, error=DataError)
        return self.sessions[graph].run(None, {n: feeds[n] for n in self.io[graph].input_names})[0]


__all__ = ["OrtRunner", "ort_session"]
