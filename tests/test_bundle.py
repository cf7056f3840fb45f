"""The bundle: atomic writing, verification on load (a byte changed in any file is refused),
reports, and the Bundle accessors - on a small bundle of contract-shaped graphs and real
TensorRT-RTX plans (when installed), without the exporter."""

from __future__ import annotations

import json

import numpy as np
import pytest
from contract_graphs import TINY, write_contract_graph

from astro_trt.contract import GRAPHS, ITEM_SCORER, USER_ENCODER, graph_io, kv_cache_layout
from astro_trt.engines.backend import TENSORRT_RTX
from astro_trt.engines.build import Profile, build_engine
from astro_trt.engines.bundle import engine_relpath, load_bundle, onnx_relpath, staged_bundle, write_report
from astro_trt.errors import BundleError
from astro_trt.manifest import MANIFEST, MANIFEST_HASH, build_manifest, write_manifest
from astro_trt.model.item_table import TABLE_DIR, write_tables

PROFILE = Profile(max_batch=2, max_candidates=16)


def _write_bundle(out, *, engines: bool):
    io = graph_io(TINY, "fp32")
    with staged_bundle(out) as stage:
        (stage / "checkpoint").mkdir()
        (stage / "checkpoint" / "config.json").write_text(TINY.to_json())
        (stage / "checkpoint" / "model.safetensors").write_bytes(b"weights")
        rows = np.random.default_rng(0).standard_normal((TINY.num_items + 1, TINY.d_model)).astype(np.float32)
        tables = write_tables([rows[:7], rows[7:]], TINY.num_items + 1, TINY.d_model, stage / TABLE_DIR, ["fp32"])
        onnx, built = {}, {}
        for graph in GRAPHS:
            write_contract_graph(io[graph], stage / onnx_relpath(graph, "fp32"))
            onnx[graph] = {"path": onnx_relpath(graph, "fp32"), "io": io[graph].to_dict(), "opset": 18}
        if engines:  # one engine keeps the test fast; the others are ONNX-only
            e = build_engine(TENSORRT_RTX, stage / onnx_relpath(ITEM_SCORER, "fp32"), io[ITEM_SCORER], PROFILE,
                             opt_level=0)
            (stage / "engines" / "fp32").mkdir(parents=True)
            (stage / engine_relpath(ITEM_SCORER, "fp32")).write_bytes(e.plan)
            built[ITEM_SCORER] = {"path": engine_relpath(ITEM_SCORER, "fp32"), "io": e.io, "io_source": e.io_source,
                                  "build_seconds": e.seconds, "bytes": len(e.plan)}
        manifest = build_manifest(
            config=TINY.to_dict(), checkpoint={"path": "checkpoint", "sha256": "ab" * 32},
            backend={"name": "tensorrt-rtx", "version": "x", "targets": ["portable"], "opt_level": 0},
            precisions=["fp32"], attention={"requested": "auto", "effective": {"fp32": "reference"}},
            profile={g: {d: list(r) for d, r in PROFILE.for_graph(io[g]).items()} for g in GRAPHS},
            kv_cache={"fp32": kv_cache_layout(TINY, "fp32").to_dict()}, onnx={"fp32": onnx},
            engines={"fp32": built} if built else {}, parity={"fp32": dict.fromkeys(GRAPHS, 0.0)},
            item_table={"default": "fp32", "tables": {"fp32": tables["fp32"][0].to_dict()}},
        )
        write_manifest(stage, manifest)
    return out


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return _write_bundle(tmp_path_factory.mktemp("b") / "bundle", engines=TENSORRT_RTX.is_available())


def test_load_gives_the_contract_back(bundle_dir):
    bundle = load_bundle(bundle_dir)
    assert bundle.config == TINY and bundle.precisions == ["fp32"] and bundle.backend == "tensorrt-rtx"
    assert bundle.io("fp32") == graph_io(TINY, "fp32")
    assert bundle.attention("fp32") == "reference"
    assert bundle.profile(USER_ENCODER) == {"batch": (1, 1, 2)}
    assert bundle.profile(ITEM_SCORER) == {"batch": (1, 1, 2), "candidates": (1, 16, 16)}
    assert bundle.onnx_path(USER_ENCODER, "fp32").is_file()
    assert bundle.engine_path(USER_ENCODER, "fp32") is None
    assert (bundle.checkpoint_dir / "config.json").is_file()
    with pytest.raises(BundleError, match="re-export with --precision fp16"):
        bundle.onnx_path(USER_ENCODER, "fp16")


def test_every_file_is_hashed_and_a_changed_byte_anywhere_is_refused(bundle_dir, tmp_path):
    files = sorted(p for p in bundle_dir.rglob("*") if p.is_file())
    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    assert {p.relative_to(bundle_dir).as_posix() for p in files} == set(manifest["files"]) | {MANIFEST, MANIFEST_HASH}
    for path in files:
        rel = path.relative_to(bundle_dir).as_posix()
        original = path.read_bytes()
        changed = bytearray(original)
        changed[len(changed) // 2] ^= 0x01
        path.write_bytes(bytes(changed))
        try:
            with pytest.raises(BundleError, match="manifest" if rel.startswith("manifest") else rel):
                load_bundle(bundle_dir)
        finally:
            path.write_bytes(original)
    load_bundle(bundle_dir)  # restored: loads again


def test_missing_and_unexpected_files_are_refused(bundle_dir):
    target = bundle_dir / onnx_relpath(USER_ENCODER, "fp32")
    data = target.read_bytes()
    target.unlink()
    try:
        with pytest.raises(BundleError, match=r"onnx/fp32/user_encoder.onnx is missing"):
            load_bundle(bundle_dir)
    finally:
        target.write_bytes(data)
    extra = bundle_dir / "onnx" / "fp32" / "extra.onnx"
    extra.write_bytes(b"x")
    try:
        with pytest.raises(BundleError, match="unexpected file"):
            load_bundle(bundle_dir)
        assert load_bundle(bundle_dir, verify=False).precisions == ["fp32"]
    finally:
        extra.unlink()


def test_reports_are_added_to_the_manifest_and_verified(tmp_path):
    out = _write_bundle(tmp_path / "b", engines=False)
    (written,) = write_report(out, "validate", {"parity.json": '{"passed": true}'})
    assert written == out / "reports" / "validate" / "parity.json"
    bundle = load_bundle(out)
    assert bundle.manifest["reports"] == {"validate": ["reports/validate/parity.json"]}
    written.write_text('{"passed": false}')
    with pytest.raises(BundleError, match="reports/validate/parity.json changed"):
        load_bundle(out)
    (out / "reports" / "notes.txt").write_text("unlisted reports are ignored, not trusted")
    written.write_text('{"passed": true}')
    load_bundle(out)


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_or_failed_write_leaves_nothing(tmp_path, error):
    out = tmp_path / "bundle"
    with pytest.raises(error), staged_bundle(out) as stage:
        (stage / "half-written.onnx").write_bytes(b"x" * 100)
        raise error()
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force_and_is_replaced_whole(tmp_path):
    out = _write_bundle(tmp_path / "b", engines=False)
    with pytest.raises(BundleError, match="--force"):
        _write_bundle(out, engines=False)
    (out / "stale.txt").write_text("old")
    with staged_bundle(out, force=True) as stage:
        (stage / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["b"]
