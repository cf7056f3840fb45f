"""Fuzz category "CLI arguments": bad flags and arguments for the commands that take a bundle
(inspect, validate, bench) and the others' names and presets (export, train, data): counts of
candidates that are zero, negative, huge or junk, unknown presets, data names, runtimes and
precisions, pins that are malformed or wrong, bundles that do not exist, are files, are empty
or point outside themselves. Each must exit 2 with one line (no traceback), leave no output
behind, and never open or print a file outside the bundle (a planted canary).

Cases run in-process through ``astro_trt.cli.main`` (the same code path as the installed
command, judged as the harness judges a subprocess, without paying an interpreter and torch
import per case); a few run as real subprocesses through the harness, end to end.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import string
import tempfile
import traceback
from pathlib import Path

import numpy as np
import pytest
from audit import opened_files, outside
from harness import Outcome, Tally, cases
from tiny_bundle import pristine_bundle

from astro_trt.cli import main
from astro_trt.config import PRESETS
from astro_trt.manifest import MANIFEST, MANIFEST_HASH

pytestmark = pytest.mark.fuzz
CANARY = "canary-7f3a9c-outside-the-bundle"


def run_inprocess(argv: list[str]) -> Outcome:
    """``astro-trt ARGV`` in this process, judged as harness.run_cli judges a subprocess."""
    out, err = io.StringIO(), io.StringIO()
    code: object = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    except BaseException:  # noqa: BLE001 -- an escaping exception is the traceback the suite looks for
        return Outcome("traceback", traceback.format_exc(limit=4)[-600:])
    text = err.getvalue().strip()
    if "Traceback (most recent call last)" in err.getvalue() + out.getvalue():
        return Outcome("traceback", text[-600:])
    if CANARY in err.getvalue() + out.getvalue():
        return Outcome("outside-read", "the canary's content was printed")
    if code in (0, None):
        return Outcome("accepted", out.getvalue()[-300:])
    if code != 2:
        return Outcome("traceback", f"exit {code}: {text[-400:]}")
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) != 1 and not any(line.startswith("Error:") for line in lines):
        return Outcome("traceback", f"refusal is {len(lines)} lines: {text[-400:]}")
    return Outcome("refused", lines[-1] if lines else "")


def _sandbox(root: Path) -> dict[str, Path]:
    """A valid bundle, broken ones and a canary outside them all."""
    good = root / "good"
    shutil.copytree(pristine_bundle(), good)
    canary = root / "canary.onnx"
    canary.write_text(CANARY)
    escaping = root / "escaping"
    shutil.copytree(good, escaping)
    m = json.loads((escaping / MANIFEST).read_text())
    m["onnx"]["fp32"]["user_encoder"]["path"] = "../canary.onnx"
    m["files"]["../canary.onnx"] = hashlib.sha256(canary.read_bytes()).hexdigest()
    body = json.dumps(m).encode()
    (escaping / MANIFEST).write_bytes(body)
    (escaping / MANIFEST_HASH).write_text(f"{hashlib.sha256(body).hexdigest()}  {MANIFEST}\n")
    linked = root / "linked"
    shutil.copytree(good, linked)
    (linked / "onnx/fp32/item_scorer.onnx").unlink()
    (linked / "onnx/fp32/item_scorer.onnx").symlink_to(canary)
    (root / "empty").mkdir()
    (root / "file").write_text("not a bundle")
    return {"good": good, "escaping": escaping, "linked": linked, "empty": root / "empty", "file": root / "file",
            "missing": root / "missing", "canary": canary}


def _junk(rng: np.random.Generator, n: int = 8) -> str:
    alphabet = string.ascii_letters + string.digits + " ,.-_/\\'\"é中\t"
    return "".join(rng.choice(list(alphabet)) for _ in range(int(rng.integers(1, n + 1))))


def _bad_candidates(rng: np.random.Generator, limit: int) -> str:
    """A --candidates value the bundle's profile (1..limit) or the parser must refuse."""
    pick = rng.integers(6)
    if pick == 0:
        return str(int(rng.integers(-10**9, 1)))
    if pick == 1:
        return str(int(rng.integers(limit + 1, 10**12)))
    if pick == 2:
        return _junk(rng) + "x"  # never a plain integer
    if pick == 3:
        good = [str(int(v)) for v in rng.integers(1, limit + 1, size=int(rng.integers(1, 4)))]
        return ",".join(good + [rng.choice(["0", "-1", "abc", str(10**6), "1.5", "1e3"])])
    if pick == 4:
        return ",".join(["1"] * int(rng.integers(33, 200)))
    return rng.choice(["", ",", " , ", "0x10", "2**70", str(2**70), "+-1", "nan", "inf"])


def fixed_cases(p: dict[str, Path]) -> list[tuple[str, list[str], Path | None]]:
    """(name, argv, a path that must not exist afterwards)."""
    good, bench = str(p["good"]), ["bench", str(p["good"]), "--repetitions", "1", "--warmup", "0"]
    digest = hashlib.sha256((p["good"] / MANIFEST).read_bytes()).hexdigest()
    wrong = hashlib.sha256(b"another bundle").hexdigest()
    out = p["good"].parent / "out"
    rows: list[tuple[str, list[str], Path | None]] = [
        *((f"bench --candidates {c!r}", [*bench, "--candidates", c], None)
          for c in ["0", "-1", str(10**6), "junk", "", ",", "1e3", "64,abc", "65", str(2**70)]),
        ("bench --out with bad candidates", [*bench, "--candidates", "0", "--out", str(out)], out),
        ("bench --repetitions 0", [*bench[:2], "--repetitions", "0"], None),
        ("bench --warmup -1", [*bench[:2], "--warmup", "-1"], None),
        ("bench --runtime junk", [*bench, "--runtime", "junk"], None),
        ("bench --runtime torch", [*bench, "--runtime", "torch"], None),
        ("bench --config nope", [*bench, "--config", "nope"], None),
        ("bench --precision bf16 (not in bundle)", [*bench, "--precision", "bf16", "--candidates", "4"], None),
        ("bench --precision fp64", [*bench, "--precision", "fp64", "--candidates", "4"], None),
        ("bench --attention junk", [*bench, "--attention", "junk"], None),
        ("bench --expect-sha256 wrong", [*bench, "--expect-sha256", wrong, "--candidates", "4"], None),
        ("validate --data nope", ["validate", good, "--data", "nope"], None),
        ("validate --runtime junk", ["validate", good, "--runtime", "junk"], None),
        ("validate --runtime ,", ["validate", good, "--runtime", ","], None),
        ("validate --expect-sha256 junk", ["validate", good, "--expect-sha256", "junk"], None),
        ("validate --expect-sha256 wrong", ["validate", good, "--expect-sha256", wrong], None),
        ("validate --checkpoint missing", ["validate", good, "--checkpoint", str(p["missing"])], None),
        ("inspect --expect-sha256 wrong", ["inspect", good, "--expect-sha256", wrong], None),
        ("inspect --expect-sha256 digest+1", ["inspect", good, "--expect-sha256", digest + "0"], None),
        ("export missing checkpoint", ["export", str(p["missing"]), "--out", str(out)], out),
        ("export --precision junk", ["export", str(p["good"] / "checkpoint"), "--out", str(out), "--precision",
                                     "fp64"], out),
        ("export --max-batch 0", ["export", str(p["good"] / "checkpoint"), "--out", str(out), "--max-batch", "0"],
         out),
        ("export --max-candidates -1", ["export", str(p["good"] / "checkpoint"), "--out", str(out),
                                        "--max-candidates", "-1"], out),
        ("export --backend junk", ["export", str(p["good"] / "checkpoint"), "--out", str(out), "--backend", "x"], out),
        ("export --opt-level 9", ["export", str(p["good"] / "checkpoint"), "--out", str(out), "--opt-level", "9"],
         out),
        ("export onto an existing bundle", ["export", str(p["good"] / "checkpoint"), "--out", good], None),
        ("train --config nope", ["train", "--config", "nope", "--out", str(out)], out),
        ("train --data nope", ["train", "--data", "nope", "--out", str(out)], out),
        ("data nope", ["data", "nope"], None),
        ("unknown command", ["frobnicate"], None),
        ("unknown option", ["inspect", good, "--frobnicate"], None),
    ]
    for name in ("escaping", "linked", "empty", "file", "missing"):
        for command in (["inspect"], ["inspect", "--no-verify"], ["validate"], ["bench", "--candidates", "4"]):
            rows.append((f"{' '.join(command)} on a {name} bundle",
                         [command[0], str(p[name]), *command[1:]], None))
    return rows


def random_case(p: dict[str, Path], rng: np.random.Generator) -> tuple[str, list[str], Path | None]:
    good = str(p["good"])
    pick = rng.integers(6)
    if pick == 0:
        c = _bad_candidates(rng, 64)
        return f"bench --candidates {c[:40]!r}", ["bench", good, "--candidates", c, "--repetitions", "1"], None
    if pick == 1:
        name = _junk(rng)
        name = name if name not in PRESETS else name + "?"
        return f"bench --config {name!r}", ["bench", good, "--config", name], None
    if pick == 2:
        pin = rng.choice([_junk(rng, 70), hashlib.sha256(rng.bytes(8)).hexdigest()])
        command = rng.choice(["inspect", "validate", "bench"])
        return f"{command} --expect-sha256 {pin[:20]!r}", [command, good, "--expect-sha256", pin], None
    if pick == 3:
        name = _junk(rng)
        flag = rng.choice(["--data", "--runtime"])
        return f"validate {flag} {name!r}", ["validate", good, flag, name + "?"], None
    if pick == 4:
        value = rng.choice(["0", "-1", "-5", _junk(rng) + "x", "1.5"])
        flag = rng.choice(["--repetitions", "--warmup"])
        if flag == "--warmup" and value == "0":
            value = "-1"
        return f"bench {flag} {value!r}", ["bench", good, flag, value, "--candidates", "1"], None
    name = rng.choice(["escaping", "linked", "empty", "file", "missing"])
    command = rng.choice(["inspect", "validate", "bench"])
    return f"{command} on a {name} bundle", [command, str(p[name])], None


def _judge(tally: Tally, name: str, argv: list[str], must_not_exist: Path | None, root: Path,
           p: dict[str, Path]) -> None:
    with opened_files() as record:
        outcome = run_inprocess(argv)
    allowed = Path(argv[1]) if len(argv) > 1 and Path(argv[1]).is_dir() else root / "good"
    opened = [path for path in outside(record, root, allowed) if Path(path) == p["canary"].resolve()]
    if opened and outcome.kind == "refused":
        outcome = Outcome("outside-read", f"opened {opened}")
    elif must_not_exist is not None and must_not_exist.exists() and outcome.kind == "refused":
        outcome = Outcome("partial-artifact", f"{must_not_exist} left behind")
    tally.record(name, outcome)
    if must_not_exist is not None:
        shutil.rmtree(must_not_exist, ignore_errors=True)


def test_a_valid_command_is_accepted():
    # Control: the in-process judge does see an accepted command (and the bundle is valid).
    with tempfile.TemporaryDirectory() as tmp:
        p = _sandbox(Path(tmp))
        outcome = run_inprocess(["inspect", str(p["good"])])
    assert outcome.kind == "accepted", outcome


def test_fuzz_cli_arguments():
    tally = Tally("CLI arguments")
    rng = np.random.default_rng(14)
    with tempfile.TemporaryDirectory(prefix="astro-fuzz-cli-") as tmp:
        root = Path(tmp)
        p = _sandbox(root)
        rows = fixed_cases(p)
        rows += [random_case(p, rng) for _ in range(max(0, cases(60) - len(rows)))]
        for name, argv, must_not_exist in rows:
            _judge(tally, name, argv, must_not_exist, root, p)
        # End to end, as a user runs it: a fresh interpreter, its exit status and stderr.
        for name, argv in (("subprocess: inspect an escaping bundle", ["inspect", str(p["escaping"])]),
                           ("subprocess: inspect a wrong pin", ["inspect", str(p["good"]), "--expect-sha256",
                                                                "0" * 64])):
            tally.cli(name, argv, timeout=60)
    tally.check()
