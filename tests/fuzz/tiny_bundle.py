"""One tiny exported bundle (fp32, ONNX only) per test process, shared by the fuzz categories:
exporting it costs seconds, copying it costs milliseconds."""

from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
from functools import cache
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))  # the shared test helpers

from validate_bundle_fixture import make_bundle, random_checkpoint  # noqa: E402


@cache
def pristine_bundle() -> Path:
    """A valid bundle nobody may modify (copy it first)."""
    root = Path(tempfile.mkdtemp(prefix="astro-fuzz-bundle-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return make_bundle(root / "bundle", random_checkpoint(root / "ckpt", 7), precisions=("fp32",))


__all__ = ["pristine_bundle"]
