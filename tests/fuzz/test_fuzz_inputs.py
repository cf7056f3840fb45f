"""Fuzz category "runtime inputs": seeded mutations of valid requests, every one of them a
request the input contract forbids (runtime/gate.py states it), tried through the gate itself
and through every runner that runs here (PyTorch, ONNX Runtime on a real exported bundle).
Each must be the project's DataError with a one-line message; logits for any of them would be
silent garbage, any other exception a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from harness import Tally, cases  # noqa: E402
from tiny_bundle import pristine_bundle  # noqa: E402

from astro_trt.contract import BATCH, CANDIDATES, FULL_MODEL, GRAPHS, HISTORY_INPUTS  # noqa: E402
from astro_trt.engines.bundle import load_bundle  # noqa: E402
from astro_trt.model.synthetic import synthetic_batch  # noqa: E402
from astro_trt.runtime.gate import validate_candidates, validate_history, validate_kv_cache  # noqa: E402
from astro_trt.runtime.onnxruntime import OrtRunner  # noqa: E402
from astro_trt.runtime.torch_runner import TorchRunner  # noqa: E402

pytestmark = pytest.mark.fuzz
B, M = 2, 5


@pytest.fixture(scope="module")
def setup():
    bundle = load_bundle(pristine_bundle())
    profiles = {g: bundle.profile(g) for g in GRAPHS}
    ort = OrtRunner({g: bundle.onnx_path(g, "fp32") for g in GRAPHS}, bundle.config, "fp32", profiles=profiles,
                    item_table=bundle.item_table())
    torch_runner = TorchRunner(bundle.checkpoint().model)
    return bundle.config, profiles, {"torch": torch_runner, "ort": ort}


class Case:
    """One request: history fields, candidates and a cache, as plain (mutable) values."""

    def __init__(self, cfg, seed: int, kv: np.ndarray) -> None:
        batch = synthetic_batch(cfg, B, M, seed=seed)
        self.history: object = {n: t.numpy().copy() for n, t in zip(HISTORY_INPUTS, batch.history.astuple(),
                                                                      strict=True)}
        self.cand: object = batch.cand_items.numpy().copy()
        self.kv: object = kv.copy()
        self.profile_only = False  # invalid only against a profile (ORT with the bundle's, the gate with it)

    def field(self, name: str) -> object:
        """A history field or, for "cand_items", the candidates."""
        return self.history[name] if name != "cand_items" else self.cand

    def set_field(self, name: str, value: object) -> None:
        if name == "cand_items":
            self.cand = value
        else:
            self.history[name] = value


def _event_slots(h: dict, want_events: bool) -> np.ndarray:
    length = h["hist_items"].shape[-1]
    event = np.arange(length) >= (length - h["hist_lengths"])[..., None]
    return np.argwhere(event if want_events else ~event)


def mutate(case: Case, cfg, profiles, rng: np.random.Generator) -> str:
    """Make ``case`` invalid in one randomly chosen way; returns its description."""
    h = case.history
    assert isinstance(h, dict)
    huge = [2**31, 2**40, 2**62, np.iinfo(np.int64).max]
    kind = rng.choice(KINDS)
    if kind == "id-range":
        name, low, high = [("hist_items", 1, cfg.num_items), ("hist_behaviors", 1, cfg.num_behaviors - 1)][
            rng.integers(2)]
        slots = _event_slots(h, True)
        if len(slots) == 0:
            return mutate(case, cfg, profiles, rng)
        at = tuple(slots[rng.integers(len(slots))])
        h[name][at] = rng.choice([low - 1, -1, -3, -(2**62), high + 1, high + 7, 10**6, *huge])
        return f"{name}{list(at)}={h[name][at]}"
    if kind == "padding-nonzero":
        slots = _event_slots(h, False)
        if len(slots) == 0:
            return mutate(case, cfg, profiles, rng)
        name = rng.choice(["hist_items", "hist_behaviors", "hist_times"])
        at = tuple(slots[rng.integers(len(slots))])
        h[name][at] = rng.choice([1, 2, -1, 10**9])
        return f"padding {name}{list(at)}={h[name][at]}"
    if kind == "lengths":
        at = (rng.integers(B), rng.integers(cfg.num_blocks))
        old = int(h["hist_lengths"][at])
        choices = [v for v in range(-2, cfg.max_len + 3) if v != old] + [cfg.max_len + 100, -(2**40)]
        h["hist_lengths"][at] = rng.choice(choices)
        return f"hist_lengths{list(at)} {old}->{h['hist_lengths'][at]}"
    if kind == "times":
        slots = _event_slots(h, True)
        if len(slots) == 0:
            return mutate(case, cfg, profiles, rng)
        b, k, j = slots[rng.integers(len(slots))]
        how = rng.choice(["negative", "after-request", "unordered"])
        if how == "negative":
            h["hist_times"][b, k, j] = rng.choice([-1, -(2**62)])
        elif how == "after-request":
            h["hist_times"][b, k, j] = h["request_time"][b] + rng.choice([1, 10**6])
            h["hist_times"][b, k, j:] = h["hist_times"][b, k, j]  # keep the block ordered
        else:
            first = cfg.max_len - int(h["hist_lengths"][b, k])
            if j == first:
                return mutate(case, cfg, profiles, rng)
            h["hist_times"][b, k, j] = h["hist_times"][b, k, j - 1] - rng.choice([1, 1000])
        return f"hist_times[{b}, {k}, {j}] {how}"
    if kind == "scenario":
        h["scenario"][rng.integers(B)] = rng.choice([-1, cfg.num_scenarios, 10**6, -(2**63)])
        return f"scenario={h['scenario'].tolist()}"
    if kind == "request-time":
        b = rng.integers(B)
        has_events = h["hist_lengths"][b].max() > 0
        h["request_time"][b] = rng.choice([-1, -(2**62)]) if not has_events or rng.random() < 0.5 \
            else h["hist_times"][b].max() - 1
        return f"request_time[{b}]={h['request_time'][b]}"
    if kind == "dtype":
        name = rng.choice([*HISTORY_INPUTS, "cand_items"])
        target = rng.choice(["float32", "float64", "bool", "complex", "str", "object", "float16"])
        value = case.field(name)
        with np.errstate(over="ignore"):  # large times do not fit float16: inf is as wrong a dtype as any
            converted = value.astype(target) if target not in ("str", "object") else value.astype(
                {"str": "U8", "object": object}[target])
        if target == "object":
            converted.flat[0] = "x"
        case.set_field(name, converted)
        return f"{name} as {target}"
    if kind == "shape":
        name = rng.choice([*HISTORY_INPUTS, "cand_items"])
        value = case.field(name)
        how = rng.choice(["drop-axis", "add-axis", "batch+1", "batch-1", "axis-1"])
        if how == "drop-axis" and value.ndim > 1:
            value = value[..., 0]
        elif how == "add-axis":
            value = value[..., None]
        elif how == "batch+1":
            value = np.concatenate([value, value[:1]])
        elif how == "batch-1":
            value = value[:1]
        elif value.ndim > 1:  # one slot fewer on the last axis
            value = value[..., :-1]
            if name == "cand_items":
                value = value[:1]  # M - 1 alone is valid: break the batch too
        else:
            value = value[:0] if name != "hist_items" else value[..., :-1]
        case.set_field(name, value)
        return f"{name} {how} -> {np.shape(value)}"
    if kind == "empty-batch":
        for name in HISTORY_INPUTS:
            h[name] = h[name][:0]
        case.cand = np.asarray(case.cand)[:0]
        return "empty batch"
    if kind == "container":
        how = rng.choice(["missing", "none", "list", "ragged", "string", "tensor-like"])
        if how == "missing":
            del h[rng.choice(list(HISTORY_INPUTS))]
        elif how == "none":
            case.history = None
        elif how == "list":
            case.history = [h[n] for n in HISTORY_INPUTS]
        elif how == "ragged":
            h["hist_lengths"] = [[1, 2], [3]]
        elif how == "string":
            case.history = "hist_items"
        else:
            h["scenario"] = {"not": "an array"}
        return f"history container {how}"
    if kind == "unsigned":
        name = rng.choice(["hist_items", "cand_items"])
        value = case.field(name).astype(np.uint64)
        value.flat[rng.integers(value.size)] = np.uint64(2**64 - int(rng.integers(1, 4)))
        case.set_field(name, value)
        return f"{name} uint64 beyond int64"
    if kind == "candidates":
        cand = case.cand
        assert isinstance(cand, np.ndarray)
        how = rng.choice(["range", "empty", "over-profile"])
        if how == "range":
            cand[rng.integers(B), rng.integers(M)] = rng.choice([0, -1, -3, cfg.num_items + 1, 10**6, *huge])
        elif how == "empty":
            case.cand = cand[:, :0]
        else:
            limit = profiles[FULL_MODEL][CANDIDATES][2]
            case.cand = np.ones((B, limit + int(rng.integers(1, 50))), dtype=np.int64)
            case.profile_only = True
        return f"cand_items {how}"
    if kind == "batch-over-profile":
        extra = profiles[FULL_MODEL][BATCH][2] + 1 - B
        for name in HISTORY_INPUTS:
            h[name] = np.concatenate([h[name]] + [h[name][:1]] * extra)
        case.cand = np.concatenate([np.asarray(case.cand)] + [np.asarray(case.cand)[:1]] * extra)
        case.kv = np.concatenate([np.asarray(case.kv)] + [np.asarray(case.kv)[:1]] * extra)
        case.profile_only = True
        return f"batch {B + extra} over the profile"
    # kv_cache
    kv = case.kv
    assert isinstance(kv, np.ndarray)
    how = rng.choice(["nan", "inf", "-inf", "float16", "float64", "int", "batch-1", "drop-axis", "list"])
    if how in ("nan", "inf", "-inf"):
        kv.flat[rng.integers(kv.size)] = float(how)
    elif how in ("float16", "float64"):
        case.kv = kv.astype(how)
    elif how == "int":
        case.kv = kv.astype(np.int64)
    elif how == "batch-1":
        case.kv = kv[:1]
    elif how == "drop-axis":
        case.kv = kv[..., 0]
    else:
        case.kv = [[1.0, 2.0], [3.0]]
    return f"kv_cache {how}"


KINDS = ["id-range", "padding-nonzero", "lengths", "times", "scenario", "request-time", "dtype", "shape",
         "empty-batch", "container", "unsigned", "candidates", "batch-over-profile", "kv_cache"]


def tensorize(case: Case) -> None:
    """Hand the (mutated) arrays over as torch tensors instead, as a PyTorch caller would."""
    import torch

    def convert(value: object) -> object:
        ok = isinstance(value, np.ndarray) and value.dtype.name in ("int64", "int32", "float32", "float64",
                                                                      "float16", "bool")
        return torch.from_numpy(np.ascontiguousarray(value)) if ok else value

    if isinstance(case.history, dict):
        case.history = {k: convert(v) for k, v in case.history.items()}
    case.cand, case.kv = convert(case.cand), convert(case.kv)


def _entries(case: Case, cfg, profiles, runners) -> dict[str, dict[str, Callable[[], object]]]:
    """entry point -> call, grouped by tally. A mutation of the cache only concerns the scorer;
    one that breaks only the profile only concerns what is bounded by it."""
    h, cand, kv = case.history, case.cand, case.kv

    def gate() -> None:
        arrays = validate_history(cfg, h, profiles[FULL_MODEL])
        validate_candidates(cfg, cand, arrays["hist_items"].shape[0], profiles[FULL_MODEL])
        validate_kv_cache(cfg, kv, "fp32", arrays["hist_items"].shape[0])

    out: dict[str, dict[str, Callable[[], object]]] = {"gate": {"gate": gate}}
    for name, runner in runners.items():
        if case.profile_only and name == "torch":
            continue  # PyTorch has no engine profile: that request is valid for it
        out[name] = {"score": lambda r=runner: r.score(kv, h, cand), "full": lambda r=runner: r.full(h, cand)}
        out[name]["encode"] = lambda r=runner: r.encode(h)
    return out


def _touches_history(description: str) -> bool:
    return not description.startswith(("kv_cache", "cand_items")) and "cand_items" not in description


def test_valid_requests_pass_every_entry(setup):
    # Control: the unmutated requests run everywhere, so every refusal below is the mutation's.
    cfg, profiles, runners = setup
    kv = runners["ort"].encode(Case(cfg, 0, np.zeros(1)).history).kv_cache
    for seed in range(3):
        case = Case(cfg, seed, kv)
        case.kv = runners["ort"].encode(case.history).kv_cache
        for group in _entries(case, cfg, profiles, runners).values():
            for call in group.values():
                call()


def test_fuzz_runtime_inputs(setup):
    cfg, profiles, runners = setup
    rng = np.random.default_rng(20261125)
    tallies = {k: Tally(f"runtime inputs ({k})") for k in ("gate", "torch", "ort")}
    kv_by_seed = {}
    for i in range(cases(120)):
        seed = int(rng.integers(8))
        if seed not in kv_by_seed:
            kv_by_seed[seed] = runners["ort"].encode(Case(cfg, seed, np.zeros(1)).history).kv_cache
        case = Case(cfg, seed, kv_by_seed[seed])
        what = mutate(case, cfg, profiles, rng)
        if rng.random() < 0.25:
            tensorize(case)
            what += " (as torch tensors)"
        for group, calls in _entries(case, cfg, profiles, runners).items():
            for entry, call in calls.items():
                # encode reads the history only: a candidates or cache mutation is no fault of it.
                if entry == "encode" and not _touches_history(what):
                    continue
                if entry == "full" and what.startswith("kv_cache"):
                    continue
                tallies[group].python(f"#{i} {what} via {group}.{entry}", call)
    for tally in tallies.values():
        tally.check()
