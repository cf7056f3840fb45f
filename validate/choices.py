"""The names validate's options accept, in a module light enough for the command line to import
before any command runs (validate/parity.py pulls in torch)."""

from __future__ import annotations

RUNTIMES = ("torch", "ort", "trt")
DATA_CHOICES = ("ml-100k", "synthetic")

__all__ = ["DATA_CHOICES", "RUNTIMES"]
