"""What a served model loads: the Triton Python-backend models (astro_gate, astro_recommend) and
the session module they run ONNX Runtime through import no torch and no onnx, so the server's
stub pays for neither (torch alone is ~1 s and hundreds of MB per model instance). Checked in a
fresh interpreter, with Triton's real ``triton_python_backend_utils`` from nvidia-pytriton."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from serving_fixture import request, tiny_bundle

from astro_trt.engines.bundle import load_bundle
from astro_trt.serving import config_pbtxt as pbtxt
from astro_trt.serving.repository import VERSION, write_repository

HEAVY = ("torch", "onnx")


def _fresh(code: str) -> dict:
    """Run ``code`` in a new interpreter; it prints one JSON line, returned here."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_session_module_imports_no_torch():
    seen = _fresh(f"""
        import json, sys
        from astro_trt.ort_session import onnx_session
        print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))
    """)
    assert seen == []


def test_served_models_import_and_score_without_torch(tmp_path):
    from astro_trt.serving.server import find_triton

    try:
        utils = find_triton().backends / "python"
    except Exception as exc:  # noqa: BLE001 - the serve extra is optional
        pytest.skip(f"tritonserver is not installed ({exc})")
    bundle = load_bundle(tiny_bundle(tmp_path))
    repo = write_repository(bundle, tmp_path / "repo", cache_bytes=1 << 20)
    arrays = request(bundle.config, candidates=5, seed=1)
    feeds = {k: v.tolist() for k, v in arrays.items()}
    seen = _fresh(f"""
        import importlib.util, json, sys
        import numpy as np
        sys.path.insert(0, {str(utils)!r})
        loaded = []
        for name in ({pbtxt.GATE!r}, {pbtxt.RECOMMEND!r}):
            path = {str(repo)!r} + "/" + name + "/{VERSION}/model.py"
            spec = importlib.util.spec_from_file_location(name + "_model", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            loaded.append(module.TritonPythonModel.__name__)
        after_import = [m for m in {HEAVY!r} if m in sys.modules]
        # What astro_recommend's initialize and execute run: the bundle it holds, ONNX Runtime, a page.
        from astro_trt.serving.service import Recommender
        from astro_trt.serving.source import load_served_bundle
        bundle = load_served_bundle({str(repo / pbtxt.RECOMMEND / VERSION / "bundle")!r})
        rec = Recommender(bundle, "fp32", compute="ort", threads=1, cache_bytes=1 << 20)
        feeds = {{k: np.asarray(v, dtype=np.int64) for k, v in json.loads({json.dumps(feeds)!r}).items()}}
        page = rec.page(np.array([[b"u"]], dtype=object), feeds)
        print(json.dumps({{"loaded": loaded, "after_import": after_import,
                          "after_scoring": [m for m in {HEAVY!r} if m in sys.modules],
                          "ort": "onnxruntime" in sys.modules, "shape": list(page.logits.shape),
                          "finite": bool(np.isfinite(page.logits).all())}}))
    """)
    assert seen["loaded"] == ["TritonPythonModel", "TritonPythonModel"]
    assert seen["after_import"] == [] and seen["after_scoring"] == []
    # The page really ran on ONNX Runtime: one user, 5 candidates, every logit finite.
    assert seen["ort"] and seen["shape"][:2] == [1, 5] and seen["finite"]


@pytest.mark.parametrize(("edit", "message"), [
    ({"cache_bytes": "lots"}, r"config.pbtxt parameter cache_bytes = 'lots' is not an integer; write the repository"),
    ({"ort_threads": "2.5"}, r"config.pbtxt parameter ort_threads = '2.5' is not an integer"),
    ({"cache_bytes": "-5"}, r"cache_bytes \(--cache-mib\) -5: must be an integer in"),
    ({"ort_threads": "100000"}, r"ort_threads \(--ort-threads\) 100000: must be an integer in 1\.\."),
])
def test_a_hand_edited_recommend_config_is_refused_in_one_line(tmp_path, edit, message):
    """astro_recommend's initialize reads its numbers from config.pbtxt: an edit that is not a
    number in range is a one-line refusal (Triton's load failure), not a Python traceback."""
    from astro_trt.errors import DataError
    from astro_trt.serving.python_backend import RecommendModel

    bundle = load_bundle(tiny_bundle(tmp_path))
    repo = write_repository(bundle, tmp_path / "repo", cache_bytes=1 << 20)
    params = {"bundle": "bundle", "precision": "fp32", "cache_bytes": str(1 << 20), "compute": "ort", **edit}
    args = {"model_config": json.dumps({"parameters": {k: {"string_value": v} for k, v in params.items()}}),
            "model_repository": str(repo / pbtxt.RECOMMEND), "model_version": str(VERSION),
            "model_name": pbtxt.RECOMMEND}
    with pytest.raises(DataError, match=message) as exc:
        RecommendModel(args, pb=None)  # refused before Triton's utilities are touched
    assert "\n" not in str(exc.value)
