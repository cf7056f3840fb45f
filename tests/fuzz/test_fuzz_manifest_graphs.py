"""Fuzz category "manifest contradictions": a real bundle whose manifest (and graphs) are edited
with every hash recomputed, so only the loader's check of the manifest against its graphs can
catch it: vocabulary and scenario counts apart from the tables, profiles beyond the engine
bound, an ONNX path naming another file or another graph, tensor data stored outside the bundle,
past the end of its file or in an unlisted one. Each is refused in one line naming the field by
``load_bundle`` (verified and not), ``inspect``, ``validate``, ``bench`` and the commands
``triton`` and ``validate`` -- before ONNX
Runtime sees a graph, and without opening a file outside the bundle."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from audit import opened_files, outside
from harness import Tally, cases, naming
from tiny_bundle import pristine_bundle

from astro_trt.engines.bundle import load_bundle
from astro_trt.engines.describe import describe_bundle
from astro_trt.manifest import MANIFEST, MANIFEST_HASH
from astro_trt.validate.bench_bundle import bench_bundle
from astro_trt.validate.parity import validate_bundle

pytestmark = pytest.mark.fuzz
ENCODER = "onnx/fp32/user_encoder.onnx"
ITEM_TABLE = "model.behavior_embedding.weight"  # a table the encoder graph holds (the item table is in none)


def _rewrite(bundle: Path, manifest: dict) -> None:
    """Write ``manifest`` with the hash and size of every listed file recomputed, as an attacker would."""
    manifest["files"] = {rel: hashlib.sha256((bundle / rel).read_bytes()).hexdigest() for rel in manifest["files"]}
    manifest["sizes"] = {rel: (bundle / rel).stat().st_size for rel in manifest["files"]}
    body = (json.dumps(manifest, indent=2) + "\n").encode()
    (bundle / MANIFEST).write_bytes(body)
    (bundle / MANIFEST_HASH).write_text(f"{hashlib.sha256(body).hexdigest()}  {MANIFEST}\n")


def _external(location: str, *, offset: int = 0, listed: bool = False) -> Callable[[Path, dict], None]:
    """The encoder's item table moved into ``location`` (relative to the graph), the graph saved
    with it as external data; ``listed`` puts that data file in the manifest too."""
    def edit(bundle: Path, m: dict) -> None:
        model = onnx.load(bundle / ENCODER)
        table = next(t for t in model.graph.initializer if t.name == ITEM_TABLE)
        data = bytes(table.raw_data)
        (bundle / ENCODER).parent.joinpath("table.data").write_bytes(data)
        table.ClearField("raw_data")
        table.data_location = onnx.TensorProto.EXTERNAL
        for key, value in {"location": location, "offset": str(offset), "length": str(len(data))}.items():
            table.external_data.add(key=key, value=value)
        onnx.save(model, bundle / ENCODER)
        if listed:
            m["files"]["onnx/fp32/table.data"] = ""
        else:
            (bundle / ENCODER).parent.joinpath("table.data").unlink()
    return edit


def _set(path: str, value: object) -> Callable[[Path, dict], None]:
    def edit(_bundle: Path, m: dict) -> None:
        *parents, key = path.split(".")
        for p in parents:
            m = m[p]
        m[key] = value
    return edit


def _cases(sandbox: Path) -> dict[str, tuple[str, Callable[[Path, dict], None]]]:
    """case -> (the field the refusal must name, the edit)."""
    return {
        "num_items over the table": ("config.num_items", _set("config.num_items", 5000)),
        "num_items under the table": ("config.num_items", _set("config.num_items", 10)),
        "num_behaviors apart": ("config.num_behaviors", _set("config.num_behaviors", 9)),
        "num_scenarios apart": ("config.num_scenarios", _set("config.num_scenarios", 9)),
        "profile batch 10^6": ("profile.item_scorer.batch", _set("profile.item_scorer.batch", [1, 1, 10**6])),
        "profile candidates 2^31-1": ("profile.full_model.candidates",
                                      _set("profile.full_model.candidates", [1, 1, 2**31 - 1])),
        "graph path is the config": ("onnx.fp32.user_encoder.path",
                                     _set("onnx.fp32.user_encoder.path", "checkpoint/config.json")),
        "graph path is the weights": ("onnx.fp32.item_scorer.path",
                                      _set("onnx.fp32.item_scorer.path", "checkpoint/model.safetensors")),
        "graph path is another graph": ("onnx.fp32.user_encoder.path",
                                        _set("onnx.fp32.user_encoder.path", "onnx/fp32/item_scorer.onnx")),
        "external data outside": ("onnx.fp32.user_encoder", _external("../../../secret")),
        "external data absolute": ("onnx.fp32.user_encoder", _external(str(sandbox / "secret"))),
        "external data unlisted": ("onnx.fp32.user_encoder", _external("table.data")),
        "external data past its file": ("onnx.fp32.user_encoder", _external("table.data", offset=4096, listed=True)),
    }


def test_manifest_contradicting_its_graphs_is_refused_by_every_loader(tmp_path):
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    (sandbox / "secret").write_bytes(b"\0" * 2**20)
    tally = Tally("manifest contradictions")
    for i, (name, (field, edit)) in enumerate(_cases(sandbox).items()):
        bundle = sandbox / f"b{i}"
        shutil.copytree(pristine_bundle(), bundle)
        manifest = json.loads((bundle / MANIFEST).read_text())
        edit(bundle, manifest)
        _rewrite(bundle, manifest)
        with opened_files() as record:
            tally.python(f"load: {name}", naming(field, lambda b=bundle: load_bundle(b)))
            tally.python(f"load unverified: {name}", naming(field, lambda b=bundle: load_bundle(b, verify=False)))
            tally.python(f"inspect: {name}", naming(field, lambda b=bundle: describe_bundle(b)))
            tally.python(f"validate: {name}", naming(field, lambda b=bundle: validate_bundle(b, data="synthetic")))
            tally.python(f"bench: {name}", naming(field, lambda b=bundle: bench_bundle(b)))
        leaks = outside(record, sandbox, bundle)
        assert not leaks, f"{name}: opened {leaks}"
        if i % 9 == 0:  # the commands, on two (each is a fresh interpreter)
            for command in (["triton", bundle, "--out", tmp_path / f"r{i}"],
                            ["validate", bundle, "--data", "synthetic"]):
                outcome = tally.cli(f"{command[0]}: {name}", command)
                assert outcome.kind != "refused" or field in outcome.detail, outcome.detail
    tally.check()


def test_external_data_the_manifest_lists_is_accepted(tmp_path):
    """The check refuses the contradiction, not external data: a table kept in a listed file of
    the bundle loads, and ONNX Runtime runs the graph from it."""
    import onnxruntime as ort

    bundle = tmp_path / "b"
    shutil.copytree(pristine_bundle(), bundle)
    manifest = json.loads((bundle / MANIFEST).read_text())
    _external("table.data", listed=True)(bundle, manifest)
    _rewrite(bundle, manifest)
    loaded = load_bundle(bundle)
    session = ort.InferenceSession(str(loaded.onnx_path("user_encoder", "fp32")), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == loaded.io("fp32")["user_encoder"].input_names


def test_seeded_contradictions(tmp_path):
    """``cases(12)`` seeded draws: a vocabulary, behaviour or scenario count off by a random amount,
    a profile axis drawn past the bound, or a graph path pointing at another listed file."""
    rng = np.random.default_rng(18)
    manifest0 = json.loads((pristine_bundle() / MANIFEST).read_text())
    tally = Tally("manifest contradictions: seeded")
    for i in range(cases(12)):
        bundle = tmp_path / f"b{i}"
        shutil.copytree(pristine_bundle(), bundle)
        m = json.loads(json.dumps(manifest0))
        kind = rng.choice(["num_items", "num_behaviors", "num_scenarios", "profile", "path"])
        if kind == "profile":
            graph = str(rng.choice(list(m["profile"])))
            axis = str(rng.choice(list(m["profile"][graph])))
            m["profile"][graph][axis][2] = int(rng.integers(65_537, 2**31))
            field = f"profile.{graph}.{axis}"
        elif kind == "path":
            graph = str(rng.choice(["user_encoder", "item_scorer", "full_model"]))
            own = m["onnx"]["fp32"][graph]["path"]
            m["onnx"]["fp32"][graph]["path"] = str(rng.choice([f for f in m["files"] if f != own]))
            field = f"onnx.fp32.{graph}.path"
        else:
            m["config"][kind] += int(rng.choice([-1, 1]) * rng.integers(1, 1000))
            m["config"][kind] = max(1, m["config"][kind]) if m["config"][kind] != manifest0["config"][kind] else 1
            field = kind  # a count below the config's own minimum is refused by the config check, by name
        if m == manifest0:
            continue  # the draw changed nothing (a count moved back onto itself)
        _rewrite(bundle, m)
        tally.python(f"{field} = {kind}", naming(field, lambda b=bundle: load_bundle(b)))
    tally.check()
