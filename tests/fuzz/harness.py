"""The fuzz suite's one way of judging a case, shared by every category.

A case is one bad input tried through one entry point. It ends in one of four ways:

- ``refused``: the project's own error (AstroError in Python; exit status 2 with one line on the
  command line) -- the only acceptable outcome for a bad input;
- ``accepted``: no error at all (silent garbage: the worst outcome);
- ``traceback``: any other exception, or a CLI run that printed a Python traceback;
- ``hang``: a CLI run that did not finish within its time bound.

Every category records its cases in one ``Tally`` so the long run (``pytest -m fuzz`` with
``ASTRO_FUZZ_SCALE``) can print and write per-category figures (``ASTRO_FUZZ_REPORT=FILE``
appends one JSON line per category). CI runs each category at scale 1 (a few hundred cases in
all); ``ASTRO_FUZZ_SCALE=40`` gives the long run of more than 10,000.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from astro_trt.errors import AstroError

SCALE = max(1, int(os.environ.get("ASTRO_FUZZ_SCALE", "1")))
REPORT = os.environ.get("ASTRO_FUZZ_REPORT")


def cases(base: int) -> int:
    """How many cases a category tries: ``base`` in CI, ``base * ASTRO_FUZZ_SCALE`` in the long run."""
    return base * SCALE


@dataclass
class Outcome:
    kind: str  # refused | accepted | traceback | hang
    detail: str = ""


@dataclass
class Tally:
    """Outcomes of one category's cases; ``check()`` fails the test on anything but refusals."""

    category: str
    counts: Counter = field(default_factory=Counter)
    bad: list[tuple[str, Outcome]] = field(default_factory=list)

    def record(self, case: str, outcome: Outcome) -> Outcome:
        self.counts[outcome.kind] += 1
        if outcome.kind != "refused":
            self.bad.append((case, outcome))
        return outcome

    def python(self, case: str, call: Callable[[], Any], *, refuse: type[BaseException] = AstroError) -> Outcome:
        """Run ``call``; the project's error (``refuse``) is a clean refusal. The message must be one line."""
        try:
            call()
        except refuse as exc:
            message = str(exc)
            if not message or "\n" in message.strip():
                return self.record(case, Outcome("traceback", f"refusal message not one line: {message!r}"))
            return self.record(case, Outcome("refused", message))
        except Exception:  # noqa: BLE001 -- any other exception is exactly what the suite looks for
            return self.record(case, Outcome("traceback", traceback.format_exc(limit=3)))
        return self.record(case, Outcome("accepted"))

    def cli(self, case: str, argv: Sequence[str], *, timeout: float = 120, cwd: Path | None = None,
            env: dict[str, str] | None = None) -> Outcome:
        """Run ``astro-trt ARGV`` in a subprocess: exit 2 and one stderr line with no traceback is a refusal."""
        outcome = run_cli(argv, timeout=timeout, cwd=cwd, env=env)
        return self.record(case, outcome)

    def check(self) -> None:
        total = sum(self.counts.values())
        if REPORT:
            with open(REPORT, "a") as fh:
                fh.write(json.dumps({"category": self.category, "cases": total, **self.counts}) + "\n")
        assert total > 0, f"{self.category}: no case ran"
        assert not self.bad, f"{self.category}: {len(self.bad)} of {total} cases not refused cleanly:\n" + "\n".join(
            f"  {case}: {o.kind} {o.detail[:400]}" for case, o in self.bad[:10]
        )


def naming(flag: str, call: Callable[[], object]) -> Callable[[], None]:
    """``call`` must be refused with a message naming ``flag``; any other refusal is re-raised as
    a plain exception (``Tally.python`` then records it as a traceback: the wrong cause)."""
    def run() -> None:
        try:
            call()
        except AstroError as exc:
            if flag not in str(exc):
                raise RuntimeError(f"refused for another reason than {flag}: {exc}") from None
            raise
    return run


def run_cli(argv: Sequence[str], *, timeout: float = 120, cwd: Path | None = None,
            env: dict[str, str] | None = None) -> Outcome:
    cmd = [sys.executable, "-m", "astro_trt.cli", *map(str, argv)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                              env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return Outcome("hang", f"no exit within {timeout} s")
    err = proc.stderr.strip()
    if "Traceback (most recent call last)" in proc.stderr + proc.stdout:
        return Outcome("traceback", err[-600:])
    if proc.returncode == 0:
        return Outcome("accepted", proc.stdout[-300:])
    if proc.returncode != 2:
        return Outcome("traceback", f"exit {proc.returncode}: {err[-400:]}")
    lines = [line for line in err.splitlines() if line.strip()]
    # click usage errors print "Usage: ..." + a hint line + "Error: ..."; the project's own print one line.
    if len(lines) != 1 and not any(line.startswith("Error:") for line in lines):
        return Outcome("traceback", f"refusal is {len(lines)} lines: {err[-400:]}")
    return Outcome("refused", lines[-1] if lines else "")


__all__ = ["REPORT", "SCALE", "Outcome", "Tally", "cases", "naming", "run_cli"]
