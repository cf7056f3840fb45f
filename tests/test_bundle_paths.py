"""A bundle never leads a loader outside itself, a structurally wrong manifest is refused by
its schema before any field is used, and a bundle can be pinned by its manifest digest.
Manifests are edited the way an attacker would: consistently, hashes recomputed."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
from validate_bundle_fixture import make_bundle, random_checkpoint

sys.path.insert(0, str(Path(__file__).parent / "fuzz"))
from audit import opened_files, outside  # noqa: E402

from astro_trt.engines.bundle import load_bundle, write_report  # noqa: E402
from astro_trt.engines.describe import describe_bundle  # noqa: E402
from astro_trt.errors import BundleError  # noqa: E402
from astro_trt.manifest import MANIFEST, MANIFEST_HASH  # noqa: E402

GRAPH = "onnx/fp32/user_encoder.onnx"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("paths")
    return make_bundle(root / "bundle", random_checkpoint(root / "ckpt", 5), precisions=("fp32",))


@pytest.fixture
def bundle(pristine, tmp_path):
    """A fresh copy in a sandbox; ``tmp_path / 'outside.onnx'`` is where outside files are planted."""
    copy = tmp_path / "bundle"
    shutil.copytree(pristine, copy)
    return copy


def rewrite(bundle: Path, manifest) -> str:
    """Write ``manifest`` (any JSON) with a matching manifest.sha256, as a consistent forger would."""
    body = (json.dumps(manifest, indent=2) + "\n").encode()
    (bundle / MANIFEST).write_bytes(body)
    digest = hashlib.sha256(body).hexdigest()
    (bundle / MANIFEST_HASH).write_text(f"{digest}  {MANIFEST}\n")
    return digest


def manifest_of(bundle: Path) -> dict:
    return json.loads((bundle / MANIFEST).read_text())


def refusal(bundle: Path, sandbox: Path, *, verify: bool = True) -> str:
    """The BundleError message of loading and inspecting ``bundle``; fails if any file of the
    sandbox outside the bundle was opened on the way."""
    with opened_files() as record:
        with pytest.raises(BundleError) as info:
            describe_bundle(bundle, verify=verify)
    assert outside(record, sandbox, bundle) == [], "a file outside the bundle was opened"
    return str(info.value)


@pytest.mark.parametrize("path", ["../outside.onnx", "/ABS/outside.onnx", "onnx/../../outside.onnx",
                                  "./onnx/fp32/user_encoder.onnx", "onnx//fp32/user_encoder.onnx"])
def test_manifest_paths_leaving_or_not_normalised_are_refused_whether_the_target_exists(bundle, tmp_path, path):
    planted = tmp_path / "outside.onnx"
    shutil.copyfile(bundle / GRAPH, planted)
    path = path.replace("/ABS", str(tmp_path))
    m = manifest_of(bundle)
    m["onnx"]["fp32"]["user_encoder"]["path"] = path
    m["files"][path] = m["files"].pop(GRAPH)  # the outside copy has exactly this sha256
    rewrite(bundle, m)
    with_target = refusal(bundle, tmp_path)
    assert "is not a relative, normalised path inside the bundle" in with_target
    planted.unlink()
    # The wording is the same without the outside file: an error never tells what lies outside.
    assert refusal(bundle, tmp_path) == with_target
    assert refusal(bundle, tmp_path, verify=False) == with_target


@pytest.mark.parametrize("target", ["outside-file", "missing", "dev-zero", "loop", "dir"])
def test_links_out_of_the_bundle_are_refused_with_one_wording(bundle, tmp_path, target):
    link = bundle / GRAPH
    if target == "dir":  # the whole onnx/ folder swapped for a link to an identical outside copy
        shutil.copytree(bundle / "onnx", tmp_path / "onnx-copy")
        shutil.rmtree(bundle / "onnx")
        (bundle / "onnx").symlink_to(tmp_path / "onnx-copy")
    else:
        shutil.copyfile(link, tmp_path / "outside.onnx")
        link.unlink()
        destination = {"outside-file": tmp_path / "outside.onnx", "missing": tmp_path / "nothing.onnx",
                       "dev-zero": Path("/dev/zero"), "loop": link}[target]
        link.symlink_to(destination)
    message = refusal(bundle, tmp_path)
    assert re.search(r"onnx/fp32/\w+\.onnx does not resolve to a path inside the bundle", message), message
    assert str(tmp_path / "outside.onnx") not in message and "zero" not in message
    assert refusal(bundle, tmp_path, verify=False) == message


def test_a_link_inside_the_bundle_to_a_listed_file_is_followed(bundle):
    m = manifest_of(bundle)
    (bundle / "onnx" / "fp32" / "alias.onnx").symlink_to("user_encoder.onnx")
    m["files"]["onnx/fp32/alias.onnx"] = m["files"][GRAPH]
    m["onnx"]["fp32"]["user_encoder"]["path"] = "onnx/fp32/alias.onnx"
    rewrite(bundle, m)
    assert load_bundle(bundle).onnx_path("user_encoder", "fp32").name == "alias.onnx"


def test_manifest_itself_linked_outside_or_a_fifo_is_refused_without_reading_or_hanging(bundle, tmp_path):
    shutil.copyfile(bundle / MANIFEST, tmp_path / "m.json")
    (bundle / MANIFEST).unlink()
    (bundle / MANIFEST).symlink_to(tmp_path / "m.json")
    assert "manifest.json does not resolve to a path inside the bundle" in refusal(bundle, tmp_path)
    (bundle / MANIFEST).unlink()
    os.mkfifo(bundle / MANIFEST)
    assert "manifest.json is not a regular file" in refusal(bundle, tmp_path)


def _set(m, keys, value):
    inner = m
    for key in keys[:-1]:
        inner = inner[key]
    inner[keys[-1]] = value
    return m


def _delete(m, *keys):
    for key in keys[:-1]:
        m = m[key]
    del m[keys[-1]]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: ["not", "an", "object"], r"field '\(top level\)' must be an object, got list"),
        (lambda m: {**m, "precisions": "fp32"}, r"field 'precisions' must be a list, got str"),
        (lambda m: {**m, "files": list(m["files"])}, r"field 'files' must be an object, got list"),
        (lambda m: _delete(m, "profile") or m, r"field 'profile' is missing"),
        (lambda m: _delete(m, "onnx", "fp32", "item_scorer", "path") or m, r"'onnx.fp32.item_scorer.path' is missing"),
        (lambda m: _delete(m, "checkpoint", "sha256") or m, r"'checkpoint.sha256' is missing"),
        (lambda m: {**m, "attention": {"effective": {"fp32": 3}}}, r"'attention.effective.fp32' must be a string"),
        (lambda m: {**m, "profile": {**m["profile"], "full_model": {"batch": [1, 9, 8], "candidates": [1, 1, 1]}}},
         r"'profile.full_model.batch' = \[1, 9, 8\] is not ordered"),
        (lambda m: {**m, "profile": {**m["profile"], "item_scorer": {"batch": [1, 4, 8]}}},
         r"profile.item_scorer has axes \['batch'\], but the graph needs \['batch', 'candidates'\]"),
        (lambda m: {**m, "profile": {**m["profile"], "user_encoder": {"users": [1, 4, 8]}}},
         r"'profile.user_encoder' has axes \['users'\], expected some of"),
        (lambda m: {**m, "format_version": 1}, r"bundle format version 1, this astro-trt reads version 2"),
        (lambda m: {**m, "format_version": "1"}, r"bundle format version '1'"),
        (lambda m: {**m, "format_version": True}, r"bundle format version True"),
        (lambda m: {**m, "config": {**m["config"], "max_len": 9}}, r"I/O of onnx.fp32.\w+ is not the contract"),
        (lambda m: {**m, "config": {**m["config"], "num_layers": "2"}}, r"config"),
        (lambda m: {**m, "backend": {"name": "evil", "version": "1", "targets": [], "opt_level": None}},
         r"back end 'evil' is not one this astro-trt knows"),
        (lambda m: _set(m, ("onnx", "fp32", "full_model", "pairs_per_chunk"), 0),
         r"'onnx.fp32.full_model.pairs_per_chunk' is 0, outside 1\.\."),
        (lambda m: _set(m, ("onnx", "fp32", "full_model", "pairs_per_chunk"), "all"),
         r"'onnx.fp32.full_model.pairs_per_chunk' must be an integer"),
    ],
    ids=["top-list", "precisions-str", "files-list", "no-profile", "no-path", "no-sha", "attention-int",
         "profile-order", "profile-missing-axis", "profile-unknown-axis",
         "version-1", "version-str", "version-bool", "config-vs-io", "config-type", "backend",
         "chunk-zero", "chunk-str"],
)
def test_structurally_wrong_manifests_with_recomputed_hash_are_bundle_errors(bundle, tmp_path, edit, message):
    rewrite(bundle, edit(manifest_of(bundle)))
    text = refusal(bundle, tmp_path)
    assert re.search(message, text), text
    assert "\n" not in text


def test_pinning_by_manifest_digest(bundle, tmp_path):
    digest = hashlib.sha256((bundle / MANIFEST).read_bytes()).hexdigest()
    assert digest == (bundle / MANIFEST_HASH).read_text().split()[0]
    assert load_bundle(bundle, expect_sha256=digest.upper()).manifest_sha256 == digest
    assert f"manifest sha256 {digest} (as expected)" in describe_bundle(bundle, expect_sha256=digest)
    # A forger who rewrites the bundle consistently passes every self-check, but not the pin.
    m = manifest_of(bundle)
    m["parity"] = {"fp32": {"user_encoder": 0.0}}
    forged = rewrite(bundle, m)
    assert load_bundle(bundle).manifest_sha256 == forged
    with pytest.raises(BundleError, match=rf"manifest sha256 {forged} is not the expected {digest}.*approved"):
        load_bundle(bundle, expect_sha256=digest)
    with pytest.raises(BundleError, match="is not 64 hex digits"):
        load_bundle(bundle, expect_sha256="abc")


def test_reports_never_written_through_a_link(bundle, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (bundle / "reports").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(BundleError, match=r"unexpected file\(s\) \['reports'\]"):
        write_report(bundle, "bench", {"bench.json": "{}"})
    (bundle / "reports").unlink()
    (bundle / "reports").mkdir()
    (bundle / "reports" / "bench").symlink_to(tmp_path / "elsewhere")  # unlisted under reports/: ignored, not used
    with pytest.raises(BundleError, match="reports/bench is not a plain folder of the bundle"):
        write_report(bundle, "bench", {"bench.json": "{}"})
    assert list((tmp_path / "elsewhere").iterdir()) == []
