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


# ------------------------------------------------------------- atomic_write killed between write and rename
# A real writer process: the CLI's own SIGTERM handler, then atomic_write of TARGET, paused right
# after the temporary is written and before the rename (os.replace waits there), so the signal
# lands at exactly that moment. It prints the temporary's path once it is on disk.
_PAUSED_WRITER = """
import os, signal, sys, time
from pathlib import Path
from astro_trt import artifacts
from astro_trt.cli import _on_sigterm

signal.signal(signal.SIGTERM, _on_sigterm)
real_replace = os.replace

def paused(src, dst):
    print(src, flush=True)
    time.sleep(120)
    real_replace(src, dst)

os.replace = paused
artifacts.atomic_write(Path(sys.argv[1]), b"new " * 4096)
"""


def _paused_writer(target):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _PAUSED_WRITER, str(target)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    line = proc.stdout.readline().strip()  # the temporary is complete on disk now
    assert line, proc.stderr.read()
    tmp = type(target)(line)
    assert tmp.parent == target.parent and tmp.read_bytes() == b"new " * 4096
    return proc, tmp


def _kill(proc, sig):
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    return proc.returncode, err


def test_sigterm_between_write_and_rename_removes_the_temporary(tmp_path):
    import signal

    target = tmp_path / "report.json"
    target.write_bytes(b"previous")
    proc, tmp = _paused_writer(target)
    assert tmp.name.startswith(".report.json.tmp-") and tmp.name.endswith(f"-{proc.pid}")
    code, err = _kill(proc, signal.SIGTERM)
    assert code == 143 and err.strip() == "terminated"
    assert target.read_bytes() == b"previous"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # no temporary left


def test_a_temporary_left_by_a_killed_writer_is_swept_by_the_next(tmp_path, caplog):
    import signal

    target = tmp_path / "report.json"
    proc, tmp = _paused_writer(target)
    _kill(proc, signal.SIGKILL)  # no handler runs: the temporary stays
    assert tmp.exists() and not target.exists()
    atomic_write(target, b"second")
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    assert f"removed {tmp}" in caplog.text


def test_temporaries_of_live_writers_and_other_hosts_are_left_alone(tmp_path):
    import signal

    target = tmp_path / "report.json"
    other_host = tmp_path / ".report.json.tmp-otherhost-999999"
    other_host.write_bytes(b"another machine's writer (shared file system)")
    proc, tmp = _paused_writer(target)
    try:
        atomic_write(target, b"mine")  # while the other writer is paused between write and rename
        assert tmp.exists() and other_host.exists() and target.read_bytes() == b"mine"
    finally:
        code, _ = _kill(proc, signal.SIGTERM)
    assert code == 143 and not tmp.exists() and other_host.exists()


def test_abandoning_removes_the_temporaries_in_flight(tmp_path):
    from astro_trt.artifacts import _IN_FLIGHT, abandon_staged_writes

    tmp = tmp_path / ".f.tmp-host-1"
    tmp.write_bytes(b"half")
    _IN_FLIGHT.add(tmp)
    abandon_staged_writes()
    assert not tmp.exists() and tmp not in _IN_FLIGHT
