"""Replicas behind HAProxy: the generated configuration passes `haproxy -c` and routes by a
consistent hash of X-User-Key with retries and health checks; a missing haproxy is refused in one
line naming the package; and, on real tritonservers behind a real HAProxy, the load test over
replicas (user-keyed routing against round-robin, one replica killed mid-run) and `astro-trt
serve --replicas 2` stopped by SIGTERM or Ctrl-C with no process left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from serving_fixture import tiny_bundle

from astro_trt.cli import main
from astro_trt.errors import BackendError, DataError
from astro_trt.serving import proxy
from astro_trt.serving.client import header_key
from astro_trt.serving.proxy import Backend, HAProxy, haproxy_config, haproxy_unavailable_reason
from astro_trt.serving.server import free_port, unavailable_reason

needs_haproxy = pytest.mark.skipif(haproxy_unavailable_reason() is not None, reason=str(haproxy_unavailable_reason()))
needs_servers = pytest.mark.skipif(unavailable_reason() is not None or haproxy_unavailable_reason() is not None,
                                   reason=str(unavailable_reason() or haproxy_unavailable_reason()))

BACKENDS = [Backend(f"replica{i}", f"127.0.0.1:{9100 + i}", f"127.0.0.1:{9200 + i}") for i in range(3)]


@needs_haproxy
@pytest.mark.parametrize("routing", proxy.ROUTINGS)
def test_generated_config_passes_haproxy_check(routing):
    text = haproxy_config(BACKENDS, http="127.0.0.1:9000", grpc="127.0.0.1:9001", routing=routing)
    HAProxy(text, "http://127.0.0.1:9000/v2/health/ready").check()  # raises with haproxy's alert otherwise
    lines = [ln.strip() for ln in text.splitlines()]
    if routing == "user-key":
        assert lines.count(f"balance hdr({proxy.USER_KEY_HEADER})") == 2 and lines.count("hash-type consistent") == 2
    else:
        assert lines.count("balance roundrobin") == 2
    for needed in ("option redispatch 1", "option http-buffer-request", f"retries {proxy.RETRIES}",
                   "option httpchk GET /v2/health/ready", "retry-on conn-failure empty-response response-timeout"):
        assert needed in lines
    # every replica, on both frontends; gRPC over HTTP/2 with its health checked on the replica's HTTP port
    assert "server replica2 127.0.0.1:9102" in lines and "server replica2 127.0.0.1:9202 proto h2 port 9102" in lines


@needs_haproxy
def test_a_broken_config_is_refused_with_haproxys_line():
    with pytest.raises(BackendError, match="haproxy refused the generated configuration .*ALERT"):
        HAProxy(haproxy_config(BACKENDS, http="127.0.0.1:9000").replace("balance", "balancez"), "").check()


def test_header_key_never_carries_a_comma():
    assert header_key(b"user-42") == "user-42"
    # HAProxy's hdr() splits at commas: such keys (and non-text ones) travel as hex, still one per user
    assert header_key(b"a,1") != header_key(b"a,2") and "," not in header_key(b"a,1")
    assert header_key("é\n".encode()) == "c3a90a"


def test_config_arguments_are_checked():
    with pytest.raises(DataError, match="routing 'random' is unknown"):
        haproxy_config(BACKENDS, http="127.0.0.1:9000", routing="random")
    with pytest.raises(DataError, match="at least one replica"):
        haproxy_config([], http="127.0.0.1:9000")


def test_missing_haproxy_is_refused_in_one_line_naming_the_package(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(proxy, "SBIN", ())
    with pytest.raises(SystemExit) as exc:
        main(["serve", str(tmp_path / "no-bundle"), "--replicas", "2"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "\n" not in err
    assert err.startswith("error: haproxy is not installed") and "apt-get install haproxy" in err


@pytest.mark.parametrize("argv, message", [
    (["--replicas", "0"], "0 is not in the range"),
    (["--replicas", "1", "--kill-at", "2"], "--kill-at needs --replicas 2"),
    (["--replicas", "2", "--kill-at", "5", "--duration", "4"], "not before the end of the run"),
    (["--replicas", "2", "--routing", "random"], "--routing"),
    (["--replicas", "2", "127.0.0.1:8000"], "drop the URL"),
])
def test_loadtest_over_replicas_refuses_bad_arguments(argv, message, tmp_path, capsys):
    bundle = [] if "127.0.0.1:8000" in argv else ["--bundle", str(tmp_path / "b")]
    with pytest.raises(SystemExit) as exc:
        main(["loadtest", *argv, *bundle, "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return tiny_bundle(tmp_path_factory.mktemp("replicas"))


@needs_servers
def test_load_test_over_replicas_routes_users_and_survives_a_killed_replica(bundle_dir, tmp_path):
    out = tmp_path / "load"
    pages = 8
    main(["loadtest", "--replicas", "3", "--bundle", str(bundle_dir), "--routing", "user-key,round-robin",
          "--kill-at", "1", "--duration", "12", "--clients", "4", "--users", "12", "--pages", str(pages),
          "--candidates", "8", "--cache-mib", "1", "--protocol", "http", "--out", str(out)])
    report = json.loads((out / "replicas.json").read_text())
    runs = {r["name"]: r for r in report["runs"]}
    keyed, spread, killed = runs["user-key"], runs["round-robin"], runs["user-key, replica1 killed"]
    best = 1 - 1 / pages  # one encode per session of `pages` pages
    for run in runs.values():
        assert run["requests"] > 50 and run["replicas"] == 3
    assert keyed["failed"] == 0 and spread["failed"] == 0
    # user-keyed: every page after a session's first from the cache (the tiny state: all users fit in 1 MiB);
    # round-robin: a session's pages meet up to 3 replicas, each encoding the user once.
    assert keyed["hit_rate"] >= best - 0.05
    assert spread["hit_rate"] <= best - 0.15
    # a replica killed mid-run: nothing fails but what it held in flight (the proxy retries those too)
    assert killed["failed_outside_kill"] == 0 and killed["failed"] <= killed["in_flight_at_kill"]
    assert 0.5 < killed["killed_at_s"] < 2.0
    assert killed["hit_rate_last_third"] >= best - 0.1  # its users moved, were encoded once, and hit again
    # supervised as `serve --replicas` is: the killed replica restarted on its ports, and the proxy's
    # health check put it back on the ring (its users routed to it again, not only to its neighbour)
    [restart] = killed["restarts"]
    assert restart["replica"] == 1 and killed["killed_at_s"] < restart["ready_at_s"] < 12
    assert restart["requests_served_after"] > 0
    assert keyed["restarts"] == [] and spread["restarts"] == []
    assert report["failed_outside_kill"] == 0 and "replica1 at" in (out / "replicas.md").read_text()


def _processes_of(pid: int) -> list[int]:
    """Every process whose parent chain reaches ``pid`` (its servers, stubs and proxy)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent]
        found += children
        frontier += children
    return found


@needs_servers
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_replicas_stops_servers_and_proxy_on_a_signal(bundle_dir, sig):
    ports = [str(free_port()) for _ in range(3)]
    cmd = [sys.executable, "-m", "astro_trt.cli", "serve", str(bundle_dir), "--replicas", "2", "--http-port",
           ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2], "--cache-mib", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stdout.readline() for _ in range(4)]  # proxy HTTP and gRPC, then each replica
        assert lines[0].startswith("HTTP") and f"127.0.0.1:{ports[0]}" in lines[0], (lines, proc.stderr.read())
        assert "HAProxy, user-key routing over 2 replicas" in lines[0]
        assert lines[2].startswith("replica0") and lines[3].startswith("replica1")
        ready = urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/v2/health/ready", timeout=10)
        assert ready.status == 200
        children = _processes_of(proc.pid)
        names = {Path(f"/proc/{p}/exe").resolve().name for p in children if Path(f"/proc/{p}").exists()}
        assert {"haproxy", "tritonserver"} <= names, names
        said: list[str] = []  # serve's stderr, line by line
        reader = threading.Thread(target=lambda: said.extend(iter(proc.stderr.readline, "")), daemon=True)
        reader.start()
        if sig == signal.SIGTERM:  # once per test run: a replica killed is restarted on its port, and answers
            _kill_replica_and_wait_restart(proc, children, lines[3], said)
            children = _processes_of(proc.pid)  # the restarted replica and its stubs: none may outlive serve
        proc.send_signal(sig)
        code = proc.wait(timeout=90)
        reader.join(timeout=10)
        err = "".join(said)
        assert code == 0 and "stopped" in err, (code, err)
        left = [p for p in children if _alive(p)]
        assert left == [], [(p, Path(f"/proc/{p}/cmdline").read_bytes()[:200]) for p in left if _alive(p)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def _kill_replica_and_wait_restart(proc: subprocess.Popen, children: list[int], line: str, said: list[str]) -> None:
    """SIGKILL the tritonserver of ``line`` (serve's ``replicaN http://host:port ...`` line); serve
    must log its death (on stderr, read into ``said``) and restart it on the same port, which then
    answers ready."""
    port = line.split()[1].rpartition(":")[2]
    [victim] = [p for p in children if f"--http-port={port}\0".encode() in _cmdline(p)
                and Path(f"/proc/{p}/exe").resolve().name == "tritonserver"]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while not any("replica1 restarted" in ln for ln in said) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert any("replica1 died (killed by SIGKILL" in ln for ln in said), said
    assert any("replica1 restarted" in ln for ln in said), said
    ready = urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=10)
    assert ready.status == 200 and proc.poll() is None


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


def test_alive_helper_sees_this_process():
    assert _alive(os.getpid())


@needs_servers
def test_a_replica_that_keeps_dying_ends_supervision_naming_it_the_cause_and_its_log(bundle_dir, tmp_path):
    from astro_trt.serving.replicas import Replicas
    from astro_trt.serving.repository import PYTHON_MODELS, write_repository
    from astro_trt.serving.source import load_served_bundle

    repo = write_repository(load_served_bundle(bundle_dir), tmp_path / "models", cache_bytes=1 << 20)
    said: list[str] = []
    with Replicas(repo, models=PYTHON_MODELS, count=2) as fleet:
        fleet.servers[1].kill()
        with pytest.raises(BackendError) as exc:
            fleet.supervise(threading.Event(), progress=said.append, max_restarts=0)
        message = str(exc.value)
        assert message.startswith("replica1 died 1 times within 60 s") and "killed by SIGKILL" in message, message
        assert "\n" not in message and not said and fleet.restarted == []
        log = Path(message.rsplit("see ", 1)[1])
        assert log.is_file() and "Started HTTPService" in log.read_text()  # the dead replica's log, kept
        assert fleet.servers[0].alive()  # the other replica was left alone
    assert log.is_file()  # stopping the fleet does not remove a log a message named
