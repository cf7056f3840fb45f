"""The one atomic-write mechanism every stage uses (astro_trt/artifacts.py)."""

import os
import stat

import pytest

from astro_trt.artifacts import (
    atomic_write,
    check_destination,
    copy_regular_file,
    read_regular_file,
    staged_directory,
    stale_staging,
    sweep_stale_staging,
)
from astro_trt.errors import ArtifactError


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


# ---------------------------------------------------------------------------- interrupted writers
def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def _killed_writer(tmp_path, out, kind="partial", content="half"):
    """What a writer killed with SIGKILL leaves: a staging directory whose flock nobody holds."""
    stage = tmp_path / f".{out.name}.{kind}-otherhost-999999-abc"
    stage.mkdir()
    (stage / "file").write_text(content)
    return stage


def test_staging_left_by_a_killed_writer_is_swept_by_the_next(tmp_path):
    out = tmp_path / "artifact"
    _killed_writer(tmp_path, out)
    with staged_directory(out) as stage:
        (stage / "new").write_text("complete")
    assert _leftovers(tmp_path) == [] and sorted(p.name for p in out.iterdir()) == ["new"]


def test_staging_of_a_live_writer_is_left_alone(tmp_path):
    out = tmp_path / "artifact"
    with staged_directory(out) as stage:
        # Another writer of the same output starts while this one works: it must not take our stage.
        assert sweep_stale_staging(out) == []
        assert stale_staging(out) == [(stage, False)]
        (stage / "new").write_text("complete")
    assert (out / "new").read_text() == "complete" and _leftovers(tmp_path) == []


def test_a_previous_artifact_moved_aside_by_a_killed_writer_is_put_back(tmp_path):
    out = tmp_path / "artifact"
    retired = _killed_writer(tmp_path, out, kind="old")
    (retired / "file").unlink()
    (retired / out.name).mkdir()
    (retired / out.name / "old").write_text("previous")
    assert sweep_stale_staging(out) == [retired]
    assert (out / "old").read_text() == "previous" and _leftovers(tmp_path) == []


def test_a_failed_write_removes_the_folders_it_created(tmp_path):
    out = tmp_path / "a" / "b" / "c" / "out"
    with pytest.raises(RuntimeError):
        with staged_directory(out):
            raise RuntimeError("failed mid-way")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["under-file", "proc", "sys", "file"])
def test_destinations_that_cannot_hold_an_artifact_are_refused_first(tmp_path, where):
    (tmp_path / "regular").write_text("x")
    out = {"under-file": tmp_path / "regular" / "sub" / "out", "proc": "/proc/self/astro-out",
           "sys": "/sys/astro-out", "file": tmp_path / "regular"}[where]
    with pytest.raises(ArtifactError) as info:
        check_destination(out)
    assert "\n" not in str(info.value) and str(out) in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_destination_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ArtifactError, match="not writable"):
        check_destination(locked / "out")


def test_special_files_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    (tmp_path / "dir.json").mkdir()
    (tmp_path / "link.json").symlink_to("/etc/hostname")
    for path, words in ((fifo, "FIFO"), (tmp_path / "dir.json", "directory"), ("/dev/zero", "character device")):
        with pytest.raises(ArtifactError, match=words):
            read_regular_file(path, max_bytes=100)
        with pytest.raises(ArtifactError, match=words):
            copy_regular_file(path, tmp_path / "copy", max_bytes=100)
    with pytest.raises(ArtifactError, match="symbolic link"):
        copy_regular_file(tmp_path / "link.json", tmp_path / "copy", max_bytes=100)
    (tmp_path / "big").write_bytes(b"x" * 101)
    with pytest.raises(ArtifactError, match="more than the 100"):
        read_regular_file(tmp_path / "big", max_bytes=100)
    assert not (tmp_path / "copy").exists()


def test_abandoning_writes_in_progress_undoes_them(tmp_path):
    # What the SIGTERM handler does before it exits: at any point of a write, the stage goes,
    # a previous artifact moved aside comes back, the folders created for --out go.
    from astro_trt.artifacts import _Staging, abandon_staged_writes

    out = tmp_path / "a" / "artifact"
    with pytest.raises(RuntimeError):
        with staged_directory(out) as stage:
            (stage / "new").write_text("half")
            abandon_staged_writes()
            assert not stage.exists() and not (tmp_path / "a").exists()
            raise RuntimeError("the handler exits here")
    # Killed between moving the previous artifact aside and renaming the new one in.
    out = tmp_path / "artifact"
    retired = tmp_path / ".artifact.old-host-1-x"
    (retired / out.name).mkdir(parents=True)
    (retired / out.name / "old").write_text("previous")
    state = _Staging(out, [])
    state.retired = retired
    state.abandon()
    assert (out / "old").read_text() == "previous" and _leftovers(tmp_path) == []
