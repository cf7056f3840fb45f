"""A real tritonserver (the one nvidia-pytriton ships) on 127.0.0.1 serving a tiny bundle's
repository: logits over HTTP and gRPC against the in-process ONNX Runtime runner, the per-user
cache across pages, bad requests refused with a one-line 4xx while the server keeps serving, a
server killed under load restarted, `astro-trt serve` stopped by SIGTERM, and a short load test.
One server for the module; every server is stopped in a finally."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from serving_fixture import reference_logits, request, tiny_bundle
from validate_bundle_fixture import make_bundle, random_checkpoint

from astro_trt.cli import main
from astro_trt.engines.bundle import load_bundle
from astro_trt.errors import AstroError, BackendError
from astro_trt.serving import client as tc
from astro_trt.serving import config_pbtxt as pbtxt
from astro_trt.serving.loadtest import run_loadtest, served_phase
from astro_trt.serving.lockdown import KEY_HEADER, MANAGEMENT_APIS, OPEN_APIS, tritonserver_args
from astro_trt.serving.repository import PYTHON_MODELS, write_repository
from astro_trt.serving.server import (
    LOG_NAME,
    REPO_PREFIX,
    SERVER_PREFIX,
    TritonServer,
    free_port,
    read_api_key,
    supervise,
    sweep_stale,
    unavailable_reason,
)
from astro_trt.serving.workload import make_workload

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))

# fp32 on both sides, the same ONNX graphs and ONNX Runtime: only float32 rounding differs (measured ~1e-7).
FP32_TOL = 1e-5


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return load_bundle(tiny_bundle(tmp_path_factory.mktemp("serving-server")))


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    repo = write_repository(bundle, tmp_path_factory.mktemp("served") / "models", cache_bytes=1 << 20)
    server = TritonServer(repo, models=PYTHON_MODELS, startup_timeout=120)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def clients(server):
    made = {p: tc.connect(p, server.endpoints.http if p == "http" else server.endpoints.grpc) for p in tc.PROTOCOLS}
    try:
        yield made
    finally:
        for c in made.values():
            c.close()


def _metric(server, name: str) -> float:
    text = urllib.request.urlopen(f"http://{server.endpoints.metrics}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


@pytest.mark.parametrize("protocol", tc.PROTOCOLS)
def test_pages_match_onnx_runtime_and_reuse_the_encoded_user(protocol, clients, bundle, server):
    cfg, client = bundle.config, clients[protocol]
    key = f"user-{protocol}".encode()
    first = request(cfg, candidates=20, seed=5)
    encodes = _metric(server, "astro_user_encodes_total")
    logits, encoded = tc.recommend(protocol, client, key, first)
    assert logits.shape == (1, 20, cfg.num_tasks) and logits.dtype == np.float32
    assert np.abs(logits - reference_logits(bundle, first)).max() <= FP32_TOL
    assert encoded.tolist() == [True]
    # the next page for the same user and history: scored against the cached state, not re-encoded
    second = dict(first, cand_items=request(cfg, candidates=7, seed=6)["cand_items"])
    logits2, encoded2 = tc.recommend(protocol, client, key, second)
    assert encoded2.tolist() == [False]
    assert np.abs(logits2 - reference_logits(bundle, second)).max() <= FP32_TOL
    assert _metric(server, "astro_user_encodes_total") == encodes + 1
    # the user's history changed (a new event): re-encoded, never scored against the stale cache
    changed = dict(second, hist_times=second["hist_times"].copy())
    changed["hist_times"][second["hist_times"] > 0] += 1
    logits3, encoded3 = tc.recommend(protocol, client, key, changed)
    assert encoded3.tolist() == [True]
    assert np.abs(logits3 - reference_logits(bundle, changed)).max() <= FP32_TOL


def test_a_batch_of_users_in_one_request(clients, bundle):
    arrays = request(bundle.config, users=3, candidates=9, seed=8)
    keys = np.array([[b"b0"], [b"b1"], [b"b2"]], dtype=object)
    result = clients["http"].infer(pbtxt.RECOMMEND, tc.inputs("http", {pbtxt.USER_KEY: keys, **arrays}))
    assert np.abs(result.as_numpy("logits") - reference_logits(bundle, arrays)).max() <= FP32_TOL
    assert result.as_numpy(pbtxt.ENCODED).reshape(-1).tolist() == [True, True, True]


# What each refusal must name (Triton's own checks name the tensor too).
NAMED = {"missing input": "hist_lengths", "wrong dtype": "cand_items", "wrong rank": "hist_items",
         "item id out of range": "cand_items", "history id out of range": "hist_items",
         "lengths > L": "hist_lengths", "too many candidates": "cand_items", "too many users": "batch-size"}


def _bad_requests(cfg):
    good = request(cfg, candidates=8, seed=9)
    length = cfg.max_len
    out = {
        "missing input": {k: v for k, v in good.items() if k != "hist_lengths"},
        "wrong dtype": dict(good, cand_items=good["cand_items"].astype(np.float32)),
        "wrong rank": dict(good, hist_items=good["hist_items"].reshape(1, -1)),
        "item id out of range": dict(good, cand_items=np.full_like(good["cand_items"], cfg.num_items + 1)),
        "history id out of range": dict(good, hist_items=np.full_like(good["hist_items"], -3)),
        "lengths > L": dict(good, hist_lengths=np.full_like(good["hist_lengths"], length + 1)),
        "too many candidates": dict(good, cand_items=np.ones((1, 65), dtype=np.int64)),  # profile max 64
        "too many users": {k: np.repeat(v, 9, axis=0) for k, v in good.items()},  # max_batch_size 8
    }
    return good, out


@pytest.mark.parametrize("protocol", tc.PROTOCOLS)
def test_bad_requests_get_a_one_line_4xx_and_the_server_keeps_serving(protocol, clients, bundle, server):
    from tritonclient.utils import InferenceServerException

    client = clients[protocol]
    good, bad = _bad_requests(bundle.config)
    refused = _metric(server, "astro_requests_refused_total")
    for what, tensors in bad.items():
        keys = np.array([[b"bad"]] * tensors["hist_items"].shape[0], dtype=object)
        with pytest.raises(InferenceServerException) as exc:
            client.infer(pbtxt.RECOMMEND, tc.inputs(protocol, {pbtxt.USER_KEY: keys, **tensors}))
        status, message = str(exc.value.status()), exc.value.message()
        assert status in ("400", "StatusCode.INVALID_ARGUMENT"), (what, status, message)
        assert "\n" not in message.strip() and len(message) < 600, (what, message)
        assert NAMED[what] in message, (what, message)
        logits, _ = tc.recommend(protocol, client, b"good", good)  # the next good request is served
        assert np.isfinite(logits).all()
    # the gate's refusals (not Triton's own shape and dtype checks) are counted by the model
    assert _metric(server, "astro_requests_refused_total") >= refused + 4


def test_gate_model_refuses_and_passes_checked_tensors(clients, bundle):
    from tritonclient.utils import InferenceServerException

    from astro_trt.contract import ITEM_ROWS

    good, bad = _bad_requests(bundle.config)
    result = clients["grpc"].infer(pbtxt.GATE, tc.inputs("grpc", good))
    table = bundle.item_table()
    for name, array in good.items():
        if name in ITEM_ROWS:  # the gate hands the graphs the ids' rows from the repository's table
            rows = result.as_numpy(pbtxt.CHECKED + ITEM_ROWS[name])
            np.testing.assert_array_equal(rows.reshape(*array.shape, -1), table.lookup(array))
        else:
            np.testing.assert_array_equal(result.as_numpy(pbtxt.CHECKED + name).reshape(array.shape), array)
    with pytest.raises(InferenceServerException, match="out of range") as exc:
        clients["http"].infer(pbtxt.GATE, tc.inputs("http", bad["lengths > L"]))
    assert exc.value.status() == "400"


def test_load_test_cli_against_the_server(server, bundle, tmp_path):
    out = tmp_path / "load"
    key_file = tmp_path / "key"
    key_file.write_text(server.api_key + "\n")
    main(["loadtest", server.endpoints.http, "--grpc-url", server.endpoints.grpc, "--clients", "2", "--duration", "1",
          "--users", "2", "--pages", "2", "--candidates", "8", "--bundle", str(bundle.directory),
          "--baseline-seconds", "0.5", "--out", str(out), "--api-key-file", str(key_file)])
    report = json.loads((out / "loadtest.json").read_text())
    assert report["failed_requests"] == 0
    assert [p["name"] for p in report["phases"]] == ["http", "grpc"]
    for phase in report["phases"]:
        assert phase["requests"] > 0 and phase["candidates"] == 8 * phase["requests"]
        assert 0 < phase["p50_ms"] <= phase["p99_ms"]
        # one request in --pages encodes: the rest came from the cache
        assert 0 < phase["encodes"] < phase["requests"]
        assert 0 < phase["server_compute_ms"] < phase["p99_ms"]  # Triton's own time inside the model
    assert len(report["in_process_runs"]) == 2 and report["in_process"]["requests"] > 0
    assert (out / "loadtest.png").stat().st_size > 0 and "vs in-process" in (out / "loadtest.md").read_text()


def test_server_killed_under_load_restarts_and_serves(server, bundle):
    # Last in the module: it kills the shared server (SIGKILL, as a crash) and starts it again.
    workload = make_workload(bundle.config, users=4, pages=2, candidates=8, tag="kill")
    phases = []
    load = threading.Thread(target=lambda: phases.append(
        served_phase("http", server.endpoints.http, workload, clients=2, seconds=4.0)))
    load.start()
    try:
        time.sleep(1.5)
        server.kill()
        assert not server.alive()
    finally:
        load.join(timeout=4.0 + 2 * tc.TIMEOUT_S)
    assert phases and phases[0].requests > 0 and phases[0].errors > 0  # served, then failed once killed
    server.stop()
    server.start()  # the same repository and ports
    client = tc.connect("http", server.endpoints.http)
    try:
        good = request(bundle.config, candidates=6, seed=11)
        logits, encoded = tc.recommend("http", client, b"after-restart", good)
    finally:
        client.close()
    assert encoded.tolist() == [True]
    assert np.abs(logits - reference_logits(bundle, good)).max() <= FP32_TOL


def test_a_server_that_keeps_dying_ends_supervision_naming_the_cause_and_a_kept_log(server):
    server.kill()
    said = []
    with pytest.raises(BackendError) as exc:
        supervise(server, threading.Event(), progress=said.append, max_restarts=0)
    message = str(exc.value)
    assert message.startswith("tritonserver died 1 times within 60 s") and "killed by SIGKILL" in message, message
    assert "DCGM" not in message and "\n" not in message and not said
    log = Path(message.rsplit("see ", 1)[1])
    assert log.is_file() and "Started HTTPService" in log.read_text()  # the dead server's whole log, kept
    server.start()  # the module's server again, for the tests after this one


def test_a_server_that_fails_to_start_names_the_cause_and_keeps_its_log(bundle, tmp_path):
    repo = write_repository(bundle, tmp_path / "models", cache_bytes=1 << 20)
    (repo / pbtxt.GATE / "config.pbtxt").write_text("this is not protobuf text {")
    broken = TritonServer(repo, models=PYTHON_MODELS, startup_timeout=120)
    try:
        with pytest.raises(BackendError) as exc:
            broken.start()
        message = str(exc.value)
        assert message.startswith("tritonserver exited while starting (exit status") and "DCGM" not in message
        assert pbtxt.GATE in message, message  # the real cause: the config it could not read
        assert Path(message.rsplit("see ", 1)[1]).is_file()
    finally:
        broken.stop()


def test_serve_command_prints_endpoints_and_stops_on_sigterm(bundle):
    ports = [str(free_port()) for _ in range(3)]
    cmd = [sys.executable, "-m", "astro_trt.cli", "serve", str(bundle.directory), "--http-port", ports[0],
           "--grpc-port", ports[1], "--metrics-port", ports[2]]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()  # blocks until the server is ready (or the command failed)
        assert first.startswith("HTTP") and f"127.0.0.1:{ports[0]}" in first, (first, proc.stderr.read())
        ready = urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/v2/health/ready", timeout=10)
        assert ready.status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert "stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def test_serve_refuses_a_busy_port_in_one_line(bundle):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cmd = [sys.executable, "-m", "astro_trt.cli", "serve", str(bundle.directory), "--http-port", str(port),
               "--grpc-port", str(free_port()), "--metrics-port", str(free_port())]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: tritonserver cannot start") and f"127.0.0.1:{port}" in last and "in use" in last


@pytest.fixture(scope="module")
def ensemble_server(bundle, tmp_path_factory):
    """The generated repository with user_encoder and item_scorer run by a Python stand-in of the
    ONNX Runtime backend, so that the ensemble's wiring runs on a real server."""
    import shutil
    from pathlib import Path

    from astro_trt.contract import ITEM_SCORER, USER_ENCODER

    repo = write_repository(bundle, tmp_path_factory.mktemp("ensemble") / "models")
    for graph in (USER_ENCODER, ITEM_SCORER):
        config = repo / graph / "config.pbtxt"
        text = config.read_text().replace('platform: "onnxruntime_onnx"', 'backend: "python"')
        config.write_text(text.replace("KIND_AUTO", "KIND_CPU"))
        shutil.copy(Path(__file__).with_name("serving_ort_standin.py"), repo / graph / "1" / "model.py")
    server = TritonServer(repo, models=[pbtxt.ENSEMBLE, pbtxt.GATE, USER_ENCODER, ITEM_SCORER])
    try:
        server.start()
        yield server
    finally:
        server.stop()


def test_ensemble_runs_gate_encoder_scorer(ensemble_server, bundle):
    from tritonclient.utils import InferenceServerException

    client = tc.connect("grpc", ensemble_server.endpoints.grpc)
    try:
        arrays = request(bundle.config, users=2, candidates=10, seed=12)
        result = tc.infer("grpc", client, arrays, model=pbtxt.ENSEMBLE)
        assert np.abs(result.as_numpy("logits") - reference_logits(bundle, arrays)).max() <= FP32_TOL
        assert result.get_output("kv_cache") is None  # internal to the ensemble
        _, bad = _bad_requests(bundle.config)
        with pytest.raises(InferenceServerException, match="cand_items: value") as exc:
            tc.infer("grpc", client, bad["item id out of range"], model=pbtxt.ENSEMBLE)
        assert "INVALID_ARGUMENT" in str(exc.value.status())
    finally:
        client.close()


@pytest.fixture
def unrelated_server():
    """An HTTP server that answers 200 with JSON that is not Triton's to every request."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            body = b'{"hello": "world", "parameters": {"astro_config": {"string_value": "[1, 2]"}}}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET  # noqa: N815

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_loadtest_checks_out_bundle_and_server_before_the_run(server, bundle, tmp_path, unrelated_server):
    other = make_bundle(tmp_path / "other", random_checkpoint(tmp_path / "ckpt", seed=4), precisions=("fp32",))
    existing = tmp_path / "a-file"
    existing.write_text("not a folder")
    (tmp_path / "taken" / "loadtest.json").mkdir(parents=True)
    url, key = server.endpoints.http, server.api_key
    cases = {  # what each refusal must name
        "--out under /proc": (dict(out_dir=Path("/proc/astro-x"), api_key=key), "--out"),
        "--out an existing file": (dict(out_dir=existing, api_key=key), "--out"),
        "--out with a folder named loadtest.json": (dict(out_dir=tmp_path / "taken", api_key=key), "loadtest.json"),
        "no key": (dict(out_dir=tmp_path / "r"), "--api-key-file"),
        "a wrong key": (dict(out_dir=tmp_path / "r", api_key="guess"), "--api-key-file"),
        "--bundle of another model": (dict(out_dir=tmp_path / "r", api_key=key, bundle_dir=other), "not the bundle"),
        "an unrelated server": (dict(out_dir=tmp_path / "r", api_key=key, url=unrelated_server), "not a model"),
    }
    for what, (kwargs, named) in cases.items():
        kwargs = {"url": url, **kwargs}
        began = time.monotonic()
        with pytest.raises(AstroError) as exc:
            run_loadtest(kwargs.pop("url"), duration=60, baseline_seconds=60, clients=1, users=1, pages=1,
                         candidates=4, **kwargs)
        message = str(exc.value)
        assert named in message and "\n" not in message, (what, message)
        assert time.monotonic() - began < 30, what  # refused before the 60 s run, not after it
    assert not (tmp_path / "r").exists()
    for path in ("/dev/zero", tmp_path, tmp_path / "missing", existing, None):  # a key file is a short regular file
        with pytest.raises(AstroError, match="^--api-key-file .*; pass the file astro-trt serve named"):
            read_api_key(path)
    # The command line: exit 2 and one line, naming the option.
    proc = subprocess.run([sys.executable, "-m", "astro_trt.cli", "loadtest", url, "--out", "/proc/astro-x",
                           "--api-key-file", str(tmp_path / "missing-key")], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --api-key-file")


def test_tritonserver_args_lock_every_management_api():
    args = tritonserver_args("/models", api_key="k3y", http_port=1, grpc_port=2, metrics_port=3)
    assert "--model-control-mode=none" in args and not any(a.startswith("--load-model") for a in args)
    for flag in ("--http-restricted-api", "--grpc-restricted-protocol"):
        (value,) = [a.split("=", 1)[1] for a in args if a.startswith(flag + "=")]
        apis, header = value.split(":")
        assert set(apis.split(",")) == set(MANAGEMENT_APIS) and not set(OPEN_APIS) & set(MANAGEMENT_APIS)
        assert header == f"{KEY_HEADER}=k3y"
    with pytest.raises(ValueError):
        tritonserver_args("/models", api_key="a:b", http_port=1, grpc_port=2, metrics_port=3)


def test_sweep_removes_dead_runs_but_keeps_their_logs_and_live_runs(tmp_path):
    dead = subprocess.Popen(["true"])  # a pid that has just ended
    dead.wait()
    crashed = tmp_path / f"{SERVER_PREFIX}{dead.pid}-abc"
    (crashed / "backends" / "python").mkdir(parents=True)
    (crashed / LOG_NAME).write_text("E... the cause\n")
    repo = tmp_path / f"{REPO_PREFIX}{dead.pid}-def"
    (repo / "models" / "astro_recommend").mkdir(parents=True)
    live = tmp_path / f"{REPO_PREFIX}{os.getpid()}-ghi"
    (live / "models").mkdir(parents=True)
    other = tmp_path / "astro-repo-notapid"
    other.mkdir()
    removed = sweep_stale(tmp_path)
    assert crashed / "backends" in removed and repo / "models" in removed
    assert sorted(p.name for p in crashed.iterdir()) == [LOG_NAME] and not repo.exists()
    assert (live / "models").is_dir() and other.is_dir()
