"""astro-trt gpu-check: its dry run on this CPU machine reaches every step's first CUDA call, the
report covers every GPU-side entry point, a missing package or a bad option is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from astro_trt.cli import main
from astro_trt.serving import gpu_check
from astro_trt.serving.gpu_check import STEP_NAMES, Step, check_packages

BUNDLE = Path(__file__).resolve().parents[1] / "build" / "ml100k"
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is what a machine without a GPU runs")
@pytest.mark.skipif(not (BUNDLE / "manifest.json").is_file(), reason="needs the example bundle (README's export)")
def test_dry_run_reaches_every_step_and_leaves_the_bundle_alone(tmp_path, capsys):
    before = (BUNDLE / "manifest.json").read_bytes()
    out = tmp_path / "check"
    main(["gpu-check", str(BUNDLE), "--out", str(out), "--dry-run"])
    report = json.loads((out / "gpu-check.json").read_text())
    status = {s["name"]: s["status"] for s in report["steps"]}
    # bench --runtime trt refuses at its GPU check, the others stop before their first CUDA call with exit 0.
    assert status == {**dict.fromkeys(STEP_NAMES, "passed"), "bench-trt": "reached-gpu"}, report["steps"]
    assert (BUNDLE / "manifest.json").read_bytes() == before  # the steps ran on OUT/bundle
    assert json.loads((out / "trt-plans.json").read_text())["plans"]  # every plan listed, with its size
    kernels = json.loads((out / "kernels.json").read_text())
    assert {r["job"]["target"] for r in kernels["resources"]} == {"sm_90"}
    assert all(r["fits"] and not r["spills"] for r in kernels["resources"])
    assert (out / "served-repo" / "astro_recommend" / "config.pbtxt").is_file()
    # The report names every GPU-side entry point and which step covers it (or that none can here).
    covered = {e["entry_point"].split(":")[0] for e in report["entry_points"]}
    assert {"plugins/kernels/ops.py", "engines/runtime.py", "serving/compute.py", "runtime/tensorrt.py"} <= covered
    md = (out / "gpu-check.md").read_text()
    assert "## GPU-side entry points" in md and "served-trt" in md
    assert "report:" in capsys.readouterr().out


def test_every_module_that_touches_cuda_is_a_listed_entry_point():
    listed = {e.split(":")[0].split(" ")[0] for e in gpu_check.GPU_ENTRY_POINTS}
    touching = set()
    for folder in ("plugins", "model", "exporter", "engines", "runtime", "validate", "serving"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            if any(s in text for s in ("torch.cuda.", "is_cuda", 'device="cuda"', "deserialize_cuda_engine")):
                touching.add(str(path.relative_to(ROOT)))
    touching -= {"serving/gpu_check.py", "engines/backend.py"}  # the check itself; the back end's CUDA-free probe
    assert touching <= listed | {"validate/kernel_impls.py"}, touching - listed


def test_a_missing_package_is_refused_in_one_line_naming_the_step_and_the_way_out():
    step = Step("served-trt", "x", ("astro_no_such_package",), 1, lambda c: [], lambda c: [])
    with pytest.raises(Exception) as exc:
        check_packages((step,))
    msg = str(exc.value)
    assert "astro_no_such_package" in msg and "--skip served-trt" in msg and "docs/device.md" in msg
    assert "\n" not in msg


def test_bad_options_exit_2_in_one_line(tmp_path, capsys):
    for argv in (["gpu-check", str(BUNDLE), "--out", str(tmp_path / "o"), "--skip", "nope"],
                 ["gpu-check", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and len(err.splitlines()) == 1, err


def test_a_hanging_step_is_ended_at_its_time_box_and_the_next_still_runs(tmp_path, monkeypatch):
    slow = Step("environment", "hangs", (), 2, lambda c: [[c.python, "-c", "import time; time.sleep(60)"]],
                lambda c: [])
    fine = Step("kernels", "ok", (), 30, lambda c: [[c.python, "-c", "print('fine')"]], lambda c: [])
    monkeypatch.setattr(gpu_check, "STEPS", (slow, fine))
    monkeypatch.setattr(gpu_check, "STEP_NAMES", ("environment", "kernels"))
    monkeypatch.setattr(gpu_check, "load_bundle", lambda _: None)  # no bundle is read
    bundle = tmp_path / "b"
    bundle.mkdir()
    report = gpu_check.run_gpu_check(bundle, tmp_path / "out")
    assert [(s["name"], s["status"]) for s in report["steps"]] == [("environment", "timeout"), ("kernels", "passed")]
    assert report["steps"][0]["seconds"] < 20 and "fine" in report["steps"][1]["tail"]
