"""The one way a module names a heavy optional dependency (torch, onnx, tensorrt, ...) without
paying for it at import: ``torch = lazy_import("torch")`` at module top, imported on first
attribute access. Modelled on Polygraphy's ``mod.lazy_import``. Everything else is imported at
module top as usual, so a reader (and tests/test_layering.py) sees what depends on what."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule(ModuleType):
    """A stand-in for module ``name`` that imports it the first time an attribute is read."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._lazy_module: ModuleType | None = None

    def _load(self) -> ModuleType:
        if self._lazy_module is None:
            self._lazy_module = importlib.import_module(self.__name__)
        return self._lazy_module

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._load(), attr)

    def __dir__(self) -> list[str]:
        return dir(self._load())


def lazy_import(name: str) -> Any:
    """Module ``name``, imported when first used (an ImportError surfaces at that use)."""
    return LazyModule(name)


__all__ = ["lazy_import"]
