"""One source for each default (astro_trt/settings.py), and imports a reader can see: at module top,
the heavy optional ones through astro_trt/lazy.py's one helper."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

from astro_trt import settings
from astro_trt.cli.export import export
from astro_trt.engines.build import Profile
from astro_trt.engines.export_bundle import export_bundle

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("astro_trt", "plugins", "model", "exporter", "engines", "runtime", "validate", "serving")
# The deliberate function-local imports: the Triton kernels, whose ImportError becomes the
# project's one-line BackendError naming the extra to install.
ALLOWED_LOCAL = {("plugins/kernels/ops.py", "_kernels")}


def test_the_largest_batch_and_candidates_have_one_definition():
    cli = {p.name: p.default for p in export.params}
    library = inspect.signature(export_bundle).parameters
    for name, value in (("max_batch", settings.MAX_BATCH), ("max_candidates", settings.MAX_CANDIDATES)):
        assert cli[name] == library[name].default == getattr(Profile(), name) == value
    assert cli["precision"] == ",".join(library["precisions"].default) == ",".join(settings.EXPORT_PRECISIONS)
    # ...and no other module restates them as a literal default.
    restated = []
    for folder in STAGES:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                pairs = []
                if isinstance(node, ast.arguments):
                    positional = node.posonlyargs + node.args
                    pairs += zip(positional[len(positional) - len(node.defaults):], node.defaults, strict=True)
                    pairs += [(a, d) for a, d in zip(node.kwonlyargs, node.kw_defaults, strict=True) if d is not None]
                elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
                    pairs.append((ast.arg(arg=node.target.id), node.value))
                restated += [f"{path.relative_to(ROOT)}:{d.lineno} {a.arg}" for a, d in pairs
                             if a.arg in ("max_batch", "max_candidates") and isinstance(d, ast.Constant)]
    assert not restated, restated


def _local_imports() -> set[tuple[str, str]]:
    found = set()
    for folder in STAGES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for fn in ast.walk(ast.parse(path.read_text())):
                if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(
                        isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(fn)):
                    found.add((str(path.relative_to(ROOT)), fn.name))
    return found


def test_imports_are_at_module_top():
    extra = _local_imports() - ALLOWED_LOCAL
    assert not extra, (f"function-local imports in {sorted(extra)}: import at module top, or name a heavy optional "
                       "module with astro_trt.lazy.lazy_import at module top")


def test_a_lazy_module_loads_on_first_use_only():
    code = ("import sys; from astro_trt.lazy import lazy_import; m = lazy_import('colorsys'); "
            "before = 'colorsys' in sys.modules; m.rgb_to_hsv(0, 0, 0); print(before, 'colorsys' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]
