"""The one line a failed gate exits with (status 1, through GateError in ``main``)."""

from __future__ import annotations


def gate_failure(summary: str) -> str:
    """``summary`` is a report's own summary, printed in full just before: its first line says what
    failed, the fix is to read the lines above it."""
    return f"{summary.splitlines()[0]}; the failed checks and the report are listed above"
