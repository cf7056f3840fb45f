"""A bundle as a standard, versioned Triton model repository (version 1 of every model):

    REPO/user_encoder/     onnxruntime_onnx, the bundle's ONNX encoder (CPU or GPU)
    REPO/item_scorer/      onnxruntime_onnx, the bundle's ONNX scorer
    REPO/astro_gate/       Python: the project's input gate, passes checked tensors on
    REPO/astro_score/      ensemble astro_gate -> user_encoder -> item_scorer (one request; the
                           kv_cache stays inside the ensemble)
    REPO/astro_recommend/  Python: per-user cache of encoded state, scores every page; runs
                           ONNX Runtime on a CPU, the TensorRT runner (runtime/) on a GPU; holds
                           a copy of the bundle (verified when the model loads)
    REPO/*_plan/           tensorrt_plan twins, only for bundles built with full TensorRT
                           (Triton's TensorRT backend loads only plans of its own TensorRT; a
                           TensorRT-RTX plan is served by astro_recommend's runtime instead)
    REPO/README.md         how to start it and what each model takes and returns
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from astro_trt.arguments import choice, flag, instance
from astro_trt.artifacts import as_path, atomic_write, check_apart, refuse_existing, staged_directory
from astro_trt.contract import PRECISIONS, SPLIT_GRAPHS
from astro_trt.engines.backend import TENSORRT
from astro_trt.engines.bundle import Bundle, copy_bundle
from astro_trt.errors import BundleError
from astro_trt.serving import config_pbtxt as pbtxt
from astro_trt.serving.cache import DEFAULT_CACHE_DTYPE, check_cache_dtype
from astro_trt.serving.defaults import DEFAULT_CACHE_BYTES, DEFAULT_ORT_THREADS, check_cache_bytes, check_ort_threads
from astro_trt.serving.readme import repository_readme
from astro_trt.serving.source import served_precision

VERSION = "1"
# Models that run on the server nvidia-pytriton ships (it has only the Python backend).
PYTHON_MODELS = (pbtxt.RECOMMEND, pbtxt.GATE)


def _write(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text if isinstance(text, bytes) else text.encode())


def _model_source(name: str) -> bytes:
    return resources.files("astro_trt.serving.triton_models").joinpath(f"{name}.py").read_bytes()


def write_repository(bundle: Bundle, out: str | Path, *, precision: str | None = None, force: bool = False,
                     cache_bytes: int = DEFAULT_CACHE_BYTES, ort_threads: int | None = DEFAULT_ORT_THREADS,
                     cache_dtype: str = DEFAULT_CACHE_DTYPE, batching: bool = True,
                     item_table: str | None = None) -> Path:
    """Write the repository for ``precision`` of ``bundle`` at ``out`` (atomically: a failure
    leaves nothing there). ``ort_threads``: ONNX Runtime's intra-op threads in astro_recommend
    (None: one per core); ``batching``: astro_recommend merges concurrent requests (dynamic
    batching); ``item_table``: the stored form of the item table served (None: the bundle's default).
    The repository holds the item table once, in astro_recommend's copy of the bundle, which the
    gate maps too. Returns its absolute path."""
    instance(bundle, "bundle", Bundle, "a loaded bundle (load_bundle(DIR))")
    out = as_path(out, "out (--out)").resolve()
    flag(force, "force (--force)")
    flag(batching, "batching (--batching/--no-batching)")
    if precision is not None:  # one the bundle lacks: served_precision names the bundle's
        choice(precision, "precision (--precision)", PRECISIONS)
    cache_bytes, ort_threads = check_cache_bytes(cache_bytes), check_ort_threads(ort_threads)
    cache_dtype = check_cache_dtype(cache_dtype)
    refuse_existing(out, force, BundleError)
    check_apart(out, bundle.directory, "bundle", "repository")
    precision = served_precision(bundle, precision)
    item_table = bundle.table_files(item_table).storage  # one the bundle lacks: a BundleError naming its tables
    io = bundle.io(precision)
    profiles = {g: {k: list(v) for k, v in bundle.profile(g).items()} for g in SPLIT_GRAPHS}
    config = bundle.manifest["config"]
    # Triton's TensorRT backend loads only plans of its own TensorRT: no tensorrt_plan twins otherwise.
    plans = bundle.backend == TENSORRT.name and all(bundle.engine_path(g, precision) for g in SPLIT_GRAPHS)
    with staged_directory(out) as stage:
        # The bundle first: the graphs and plans below are taken from this checked copy, never
        # read again from the bundle's folder.
        served = copy_bundle(bundle, stage / pbtxt.RECOMMEND / VERSION / "bundle")

        def copied(path: Path) -> bytes:
            return (served / path.relative_to(bundle.directory)).read_bytes()

        for graph in SPLIT_GRAPHS:
            _write(stage / graph / "config.pbtxt",
                   pbtxt.graph_config(io[graph], profiles, name=graph, platform="onnxruntime_onnx"))
            _write(stage / graph / VERSION / "model.onnx", copied(bundle.onnx_path(graph, precision)))
            if plans:
                name = graph + pbtxt.PLAN_SUFFIX
                _write(stage / name / "config.pbtxt", pbtxt.graph_config(io[graph], profiles, name=name,
                                                                         platform="tensorrt_plan"))
                _write(stage / name / VERSION / "model.plan", copied(bundle.engine_path(graph, precision)))
        _write(stage / pbtxt.GATE / "config.pbtxt",
               pbtxt.gate_config(io, profiles, config, item_table=item_table,
                                 bundle=served.relative_to(stage).as_posix()))
        _write(stage / pbtxt.GATE / VERSION / "model.py", _model_source("gate"))
        for suffix in ("", pbtxt.PLAN_SUFFIX) if plans else ("",):
            name = pbtxt.ENSEMBLE + suffix
            _write(stage / name / "config.pbtxt", pbtxt.ensemble_config(io, profiles, suffix=suffix))
            (stage / name / VERSION).mkdir(parents=True)
        _write(stage / pbtxt.RECOMMEND / "config.pbtxt",
               pbtxt.recommend_config(io, profiles, config, precision=precision, cache_bytes=cache_bytes,
                                      ort_threads=ort_threads, cache_dtype=cache_dtype, batching=batching,
                                      item_table=item_table,
                                      bundle_sha256=bundle.manifest_sha256))
        _write(stage / pbtxt.RECOMMEND / VERSION / "model.py", _model_source("recommend"))
        _write(stage / "README.md", repository_readme(bundle, precision, io, profiles, plans=plans,
                                                      cache_bytes=cache_bytes))
    return out


__all__ = ["PYTHON_MODELS", "VERSION", "write_repository"]
