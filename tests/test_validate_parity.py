"""The parity report end to end on a tiny ONNX-only bundle (fp32 + fp16): gates pass for the
bundle's own checkpoint and fail, naming both hashes, for a different one."""

from __future__ import annotations

import json

import pytest
from validate_bundle_fixture import make_bundle, random_checkpoint

from astro_trt.validate.gates import Gates
from astro_trt.validate.parity import validate_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    return make_bundle(root / "bundle", random_checkpoint(root / "ckpt", seed=0))


@pytest.fixture(scope="module")
def report(bundle):
    return validate_bundle(bundle, data="synthetic", runtimes=("torch", "ort", "trt"))


def test_own_checkpoint_passes_every_gate(report, bundle):
    assert report.passed, report.summary()
    names = {g.gate for g in report.gates}
    assert {"checkpoint_sha256", "logits_max_abs", "full_logits_max_abs", "auc_delta_vs_oracle",
            "split_vs_full_max_abs", "top10_overlap"} <= names
    ort32 = report.results["fp32"]["ort-fp32"]
    # ONNX Runtime runs the same float32 arithmetic in another order: ~1e-6, far inside the 1e-4 gate.
    assert ort32["logits"]["max_abs"] < 1e-5 and ort32["logits"]["cosine"] > 0.999999
    assert ort32["auc_delta_vs_oracle"]["like"] < 1e-4
    fp16 = report.results["fp16"]
    # PyTorch's own fp16 error is real (not zero) and ORT's is of the same order (the gate allows 2x + floor).
    torch_err = fp16["torch-fp16"]["logits"]["max_abs"]
    assert 1e-5 < torch_err < 0.1
    assert fp16["ort-fp16"]["error_ratio_vs_torch"] < 2.0
    # No GPU here: the TensorRT runtime is skipped with the reason, not silently dropped.
    assert any(k.startswith("trt-") for k in report.skipped)


def test_reports_written(report, bundle):
    reports = bundle / "reports" / "validate"
    assert report.paths == {"json": reports / "parity.json", "md": reports / "parity.md", "png": reports / "parity.png"}
    data = json.loads((reports / "parity.json").read_text())
    assert data["passed"] is True and data["data"] == "synthetic"
    assert data["results"]["fp32"]["ort-fp32"]["kv_cache"]["count"] > 0
    md = (reports / "parity.md").read_text()
    assert "PASSED" in md and "Kendall tau" in md and "parity.png" in md
    assert (reports / "parity.png").read_bytes()[:4] == b"\x89PNG"
    # The reports are recorded (and hashed) in the manifest, so the bundle still verifies and
    # `inspect` lists them.
    from astro_trt.engines.bundle import load_bundle

    manifest = load_bundle(bundle, verify=True).manifest
    listed = {f"reports/validate/parity.{kind}" for kind in ("json", "md", "png")}
    assert set(manifest["reports"]["validate"]) == listed and listed <= set(manifest["files"])


def test_other_checkpoint_fails_with_both_hashes(bundle, tmp_path):
    other = random_checkpoint(tmp_path / "other", seed=1)
    report = validate_bundle(bundle, data="synthetic", runtimes=("ort",), checkpoint=other)
    assert not report.passed
    failed = {g.gate: g for g in report.failed}
    sha = failed["checkpoint_sha256"]
    from astro_trt.engines.bundle import load_bundle
    from astro_trt.model.checkpoint import checkpoint_sha256

    assert checkpoint_sha256(other) in sha.detail and load_bundle(bundle).checkpoint_sha256 in sha.detail
    assert "re-export" in sha.detail
    # The numbers catch it too: another model's logits are nowhere near the bundle's graphs.
    assert "logits_max_abs" in failed and failed["logits_max_abs"].value > 0.01
    assert "FAIL by" in report.summary()


def test_tight_gate_fails_and_says_by_how_much(bundle):
    report = validate_bundle(bundle, data="synthetic", runtimes=("ort",), gates=Gates(fp32_max_abs=1e-12))
    failed = [g for g in report.failed if g.gate == "logits_max_abs" and "fp32" in g.subject]
    assert failed and failed[0].margin > 0 and "FAIL by" in failed[0].describe()


def test_cli_exit_codes(bundle, capsys):
    from astro_trt.cli import main

    with pytest.raises(SystemExit) as failed:
        main(["validate", str(bundle), "--data", "synthetic", "--runtime", "ort", "--fp32-max-abs", "1e-12"])
    assert failed.value.code == 1
    captured = capsys.readouterr()
    assert "FAIL by" in captured.out
    # The failed gate ends the run with one line of its own (GateError), after the report.
    assert captured.err.splitlines()[-1].startswith("error: parity FAILED")
    with pytest.raises(SystemExit) as bad:
        main(["validate", str(bundle), "--runtime", "tpu"])
    assert bad.value.code == 2 and "--runtime" in capsys.readouterr().err
