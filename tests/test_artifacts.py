"""The one atomic-write mechanism every stage uses (astro_trt/artifacts.py)."""

import os
import stat

import pytest

from astro_trt.artifacts import atomic_write, staged_directory


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_directory_appears_complete_with_the_users_usual_modes(tmp_path):
    out = tmp_path / "artifact"
    old_mask = os.umask(0o022)
    try:
        with staged_directory(out) as stage:
            assert not out.exists()  # nothing at the final path while writing
            (stage / "sub").mkdir()
            (stage / "sub" / "weights").write_bytes(b"w")
            os.chmod(stage / "sub" / "weights", 0o600)  # as safetensors writes it
    finally:
        os.umask(old_mask)
    assert (out / "sub" / "weights").read_bytes() == b"w"
    assert _mode(out) == 0o755 and _mode(out / "sub") == 0o755
    assert _mode(out / "sub" / "weights") == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]  # no staging leftovers


def test_failure_leaves_the_previous_artifact_untouched(tmp_path):
    out = tmp_path / "artifact"
    out.mkdir()
    (out / "old").write_text("previous")
    with pytest.raises(KeyboardInterrupt):
        with staged_directory(out) as stage:
            (stage / "new").write_text("half")
            raise KeyboardInterrupt
    assert sorted(p.name for p in out.iterdir()) == ["old"]
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]


def test_success_replaces_the_previous_artifact(tmp_path):
    out = tmp_path / "artifact"
    out.mkdir()
    (out / "old").write_text("previous")
    with staged_directory(out) as stage:
        (stage / "new").write_text("complete")
    assert sorted(p.name for p in out.iterdir()) == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]


def test_atomic_write_replaces_a_file_whole(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old")
    atomic_write(path, b"new")
    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
