"""The package's layering, read from its import statements (no import runs):

- only astro_trt/cli/ imports click: every stage is a library the CLI calls;
- no module imports a later stage. The stages run config/contract (astro_trt/) -> plugins -> model
  -> exporter -> engines -> runtime -> validate -> serving; astro_trt/cli/ may import any of them, and
  astro_trt/__init__.py is the public facade whose names resolve lazily (PEP 562), so both are
  outside the order.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# folder -> stage rank; astro_trt/ (config, contract, errors, manifest, ...) comes first.
STAGES = ("astro_trt", "plugins", "model", "exporter", "engines", "runtime", "validate", "serving")
FACADES = {Path("astro_trt/__init__.py")}


def _stage(module: str) -> str | None:
    """The stage folder of an absolute module name, 'cli' for the CLI, None outside astro_trt."""
    parts = module.split(".")
    if parts[0] != "astro_trt":
        return None
    if len(parts) > 1 and (parts[1] in STAGES or parts[1] == "cli"):
        return parts[1]
    return "astro_trt"


def violations(folder: str, rel: Path, source: str) -> list[str]:
    """What breaks the two rules in one module of ``folder`` (its path ``rel`` for the message)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        else:  # relative imports stay inside their own package
            continue
        for module in modules:
            if module.split(".")[0] == "click":
                found.append(f"{rel}:{node.lineno} imports click (commands belong in astro_trt/cli/)")
            stage = _stage(module)
            if stage == "cli" or (stage is not None and STAGES.index(stage) > STAGES.index(folder)):
                found.append(f"{rel}:{node.lineno} ({folder}) imports {module}, a later stage")
    return found


def _modules() -> list[tuple[str, Path]]:
    out = []
    for folder in STAGES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT)
            if rel.parts[:2] != ("astro_trt", "cli") and rel not in FACADES:
                out.append((folder, rel))
    return out


def test_the_walk_sees_every_stage() -> None:
    seen = {folder for folder, _ in _modules()}
    assert seen == set(STAGES)
    assert len(_modules()) > 60, len(_modules())  # the whole package, not an empty glob


def test_the_checker_flags_both_rules() -> None:
    bad = "import click\nfrom astro_trt.validate.parity import validate_bundle\nimport astro_trt.cli\n"
    found = violations("engines", Path("engines/x.py"), bad)
    assert len(found) == 3, found
    ok = "from astro_trt.exporter import export\nfrom astro_trt.errors import BundleError\nfrom . import x\n"
    assert violations("engines", Path("engines/x.py"), ok) == []


def test_no_library_module_imports_click_or_a_later_stage() -> None:
    found = [v for folder, rel in _modules() for v in violations(folder, rel, (ROOT / rel).read_text())]
    assert not found, "\n".join(found)


def test_command_modules_load_no_heavy_module() -> None:
    """`astro-trt COMMAND --help` imports only the command's module: none may pull in torch, onnx
    or onnxruntime at import time (the library they call imports them when the command runs)."""
    import subprocess
    import sys

    from astro_trt.cli import COMMANDS

    modules = sorted({module for module, _attr, _help in COMMANDS.values()})
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print([m for m in ('torch', 'onnx', 'onnxruntime', 'tensorrt_rtx', 'triton') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", (modules, out.stdout)
