"""README's Python blocks run as written, so the documented API cannot drift from the code; and
the public API stays lazy (``import astro_trt`` loads no torch) and complete."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU_MARK = "# needs a GPU"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_has_the_main_job_in_about_ten_lines():
    main_job = python_blocks()[0]
    code = [line for line in main_job.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(code) <= 12
    for step in ("export_bundle(", "validate_bundle(", ".score("):
        assert step in main_job


@pytest.mark.slow
def test_readme_python_blocks_run(tmp_path, monkeypatch):
    """The main job end to end (~25 s here: one real export of the example with its six TensorRT-RTX
    engine builds, a parity run on synthetic requests, and scoring). It writes under a scratch
    directory that sees the repository's examples/, so the README's relative paths hold."""
    from astro_trt.engines.backend import BACKENDS
    from astro_trt.runtime.tensorrt import gpu_unavailable_reason

    if not any(b.is_available() for b in BACKENDS.values()):
        pytest.skip("no TensorRT back end installed: README's export builds engines")
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    blocks = python_blocks()
    assert len(blocks) >= 2
    for block in blocks:
        code = compile(block, "README.md", "exec")
        if block.startswith(GPU_MARK) and gpu_unavailable_reason() is not None:
            continue  # compiled above: at least its syntax is checked here
        exec(code, namespace)
    logits, batch = namespace["logits"], namespace["batch"]
    assert tuple(logits.shape) == (2, 100, namespace["loaded"].config.num_tasks)
    assert batch.cand_items.shape == (2, 100)
    assert namespace["report"].passed
    assert (tmp_path / "build" / "ml100k-py" / "manifest.json").is_file()


def test_import_astro_trt_loads_no_heavy_module():
    code = ("import sys, astro_trt; heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'numpy', 'click') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.stdout.strip() == "[]"


def test_every_public_name_resolves():
    import astro_trt

    assert set(astro_trt.__all__) == {"__version__", *astro_trt._API}
    for name in astro_trt._API:
        assert callable(getattr(astro_trt, name)), name
    with pytest.raises(AttributeError):
        astro_trt.no_such_name  # noqa: B018


def test_readme_and_docs_link_only_inside_the_repository():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) >= 6
    for page in pages:
        text = page.read_text()
        assert "shared/design" not in text, page
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if not target.startswith(("http://", "https://")):
                resolved = (page.parent / target).resolve()
                assert resolved.is_relative_to(ROOT), f"{page.name} links outside the repository: {target}"
                assert resolved.exists(), f"{page.name} links to missing {target}"
