"""Fuzz categories "management-api" and "hostile-bodies": a real `astro-trt serve` (one per
module) attacked as a client on the same machine, or a web page in a browser on it, would.

- management-api: every load (with a model.py that would create a marker file, also as
  text/plain with a foreign Origin: a request a page can send without a preflight), unload,
  repository index, model config, statistics, logging, trace and shared-memory call over HTTP
  and gRPC is refused without the operator's key; with the key, model control stays off. The
  marker never exists, the server never dies, astro_recommend keeps serving.
- hostile-bodies: bodies that crash Triton 2.51's own HTTP front end (10^6 nested ``[``, a 10^5
  deep array in ``data``, a shape of 2^31 x 3 x 50, candidates [2, 2^30]) and malformed JSON.
  No reply carries a traceback; a crashed server is restarted by `serve` within seconds, with the
  cause on its stderr and the named log still on disk.
- Last: SIGKILL of `serve` leaves no tritonserver or stub behind, and its temporary repository
  is swept by the next start.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from harness import Outcome, Tally
from serving_fixture import reference_logits, request
from tiny_bundle import pristine_bundle

from astro_trt.engines.bundle import load_bundle
from astro_trt.serving import client as tc
from astro_trt.serving.lockdown import KEY_HEADER, MANAGEMENT_APIS
from astro_trt.serving.server import (
    default_memory_limit,
    free_port,
    read_api_key,
    sweep_stale,
    unavailable_reason,
)

pytestmark = [pytest.mark.fuzz,
              pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))]

# Measured on this project's CPU machines: a restart takes 3-5 s; a loaded machine gets slack.
RESTART_S = 45.0
FP32_TOL = 1e-5  # as in test_serving_server.py: the same graphs and ONNX Runtime on both sides


class Served:
    def __init__(self, root: Path) -> None:
        self.bundle = load_bundle(pristine_bundle())
        self.ports = [free_port() for _ in range(3)]
        self.stderr_path = root / "serve.stderr"
        self.stderr = open(self.stderr_path, "w")  # noqa: SIM115 - read while serve runs
        cmd = [sys.executable, "-m", "astro_trt.cli", "serve", str(self.bundle.directory), "--http-port",
               str(self.ports[0]), "--grpc-port", str(self.ports[1]), "--metrics-port", str(self.ports[2]),
               "--cache-mib", "1"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
                                     stdin=subprocess.DEVNULL)
        lines = [self.proc.stdout.readline() for _ in range(4)]  # blocks until ready (or failed)
        key_line = lines[-1]
        assert key_line.startswith("management key"), (lines, self.stderr_path.read_text())
        self.key_file = Path(key_line.split()[2])
        self.key = read_api_key(self.key_file)
        self.http, self.grpc = f"127.0.0.1:{self.ports[0]}", f"127.0.0.1:{self.ports[1]}"

    def log(self) -> str:
        self.stderr.flush()
        return self.stderr_path.read_text()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.stderr.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    served = Served(tmp_path_factory.mktemp("served-surface"))
    try:
        yield served
    finally:
        served.close()


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            out += [int(p) for p in task.read_text().split()]
        except OSError:
            continue
    return out


def _server_pid(served: Served) -> int:
    found = [p for p in _children(served.proc.pid) if "tritonserver" in Path(f"/proc/{p}/cmdline").read_bytes()
             .decode(errors="replace")]
    assert len(found) == 1, found
    return found[0]


def _http(served: Served, method: str, path: str, body: bytes = b"", headers: dict | None = None,
          timeout: float = 60) -> tuple[int | str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", served.ports[0], timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        reply = conn.getresponse()
        return reply.status, reply.read().decode(errors="replace")
    except (OSError, http.client.HTTPException) as exc:
        return "closed", type(exc).__name__
    finally:
        conn.close()


def _wait_ready(served: Served, limit: float = RESTART_S) -> float:
    began = time.monotonic()
    while time.monotonic() - began < limit:
        if _http(served, "GET", "/v2/models/astro_recommend/ready", timeout=5)[0] == 200:
            return time.monotonic() - began
        time.sleep(0.25)
    raise AssertionError(f"astro_recommend not ready within {limit} s; serve said:\n{served.log()[-2000:]}")


def _serves(served: Served, key: bytes) -> None:
    """A good page is scored, and scored right (the restarted server computes the same logits)."""
    arrays = request(served.bundle.config, candidates=5, seed=3)
    client = tc.connect("http", served.http)
    try:
        logits, _ = tc.recommend("http", client, key, arrays)
    finally:
        client.close()
    assert np.abs(logits - reference_logits(served.bundle, arrays)).max() <= FP32_TOL


def _clean_reply(status: int | str, text: str) -> Outcome:
    if "Traceback" in text or 'File "' in text or "\n" in text.strip():
        return Outcome("traceback", f"{status} {text[:300]}")
    return Outcome("refused", f"{status} {text[:200]}")


def _marker_model(marker: Path) -> dict[str, str]:
    """A load request's parameters: a config and a model.py that creates ``marker`` on import."""
    source = (f"open({str(marker)!r}, 'w').write('ran')\n"
              "class TritonPythonModel:\n    def execute(self, requests):\n        return []\n")
    return {"config": json.dumps({"backend": "python", "max_batch_size": 0}),
            "file:1/model.py": base64.b64encode(source.encode()).decode()}


def test_management_api_is_closed_to_clients(served, tmp_path):
    from tritonclient.utils import InferenceServerException

    marker = tmp_path / "client-code-ran"
    before = _server_pid(served)
    load = json.dumps({"parameters": _marker_model(marker)}).encode()
    page = {"Content-Type": "text/plain", "Origin": "http://attacker.example"}
    stub_shm = sorted(r for r in os.listdir("/dev/shm") if r.startswith(f"astro{served.proc.pid}p"))
    shm = json.dumps({"key": f"/{stub_shm[0]}" if stub_shm else "/x", "offset": 0, "byte_size": 64}).encode()
    calls = [
        ("POST", "/v2/repository/models/x/load", load, {}),
        ("POST", "/v2/repository/models/x/load", load, page),
        ("POST", "/v2/repository/models/astro_recommend/load", load, page),
        ("POST", "/v2/repository/models/astro_recommend/unload", b"{}", page),
        ("POST", "/v2/repository/models/astro_gate/unload", b"{}", {}),
        ("POST", "/v2/repository/index", b"{}", {}),
        ("GET", "/v2/models/astro_recommend/config", b"", {}),
        ("GET", "/v2/models/astro_recommend/stats", b"", {}),
        ("GET", "/v2/models/stats", b"", {}),
        ("POST", "/v2/logging", json.dumps({"log_verbose_level": 3, "log_file": str(tmp_path / "l")}).encode(), page),
        ("GET", "/v2/logging", b"", {}),
        ("POST", "/v2/trace/setting", json.dumps({"trace_level": ["TIMESTAMPS"]}).encode(), page),
        ("GET", "/v2/models/astro_recommend/trace/setting", b"", {}),
        ("POST", "/v2/systemsharedmemory/region/x/register", shm, page),
        ("GET", "/v2/systemsharedmemory/status", b"", {}),
        ("POST", "/v2/cudasharedmemory/region/x/register", b'{"raw_handle":{"b64":"AA=="},"device_id":0,'
                                                           b'"byte_size":8}', {}),
        ("POST", "/v2/systemsharedmemory/unregister", b"", {}),
        # a wrong key is no key
        ("POST", "/v2/repository/models/x/load", load, {KEY_HEADER: "guess"}),
    ]
    tally = Tally("management-api")
    for method, path, body, headers in calls:
        status, text = _http(served, method, path, body, headers)
        outcome = _clean_reply(status, text)
        if outcome.kind == "refused" and (status != 403 or "restricted" not in text):
            outcome = Outcome("accepted", f"{status} {text[:200]}")
        tally.record(f"http {method} {path} {sorted(headers)}", outcome)
    client = tc.connect("grpc", served.grpc)
    try:
        grpc_calls = {
            "load": lambda: client.load_model("x", config=_marker_model(marker)["config"],
                                              files={"file:1/model.py": _marker_model(marker)["file:1/model.py"]
                                                     .encode()}),
            "unload": lambda: client.unload_model("astro_recommend"),
            "index": lambda: client.get_model_repository_index(),
            "config": lambda: client.get_model_config("astro_recommend"),
            "statistics": lambda: client.get_inference_statistics("astro_recommend"),
            "logging": lambda: client.update_log_settings({"log_verbose_level": 3}),
            "trace": lambda: client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]}),
            "shared memory": lambda: client.register_system_shared_memory("x", "/x", 64),
            "shared memory status": lambda: client.get_system_shared_memory_status(),
        }
        for name, call in grpc_calls.items():
            try:
                call()
                tally.record(f"grpc {name}", Outcome("accepted"))
            except InferenceServerException as exc:
                outcome = _clean_reply(exc.status(), exc.message())
                if outcome.kind == "refused" and "restricted" not in exc.message():
                    outcome = Outcome("accepted", f"{exc.status()} {exc.message()[:200]}")
                tally.record(f"grpc {name}", outcome)
    finally:
        client.close()
    # The operator's key opens the management APIs, but model control stays off: no load, no unload.
    admin = {KEY_HEADER: served.key}
    assert _http(served, "GET", "/v2/models/astro_recommend/stats", headers=admin)[0] == 200
    for path, body in (("/v2/repository/models/x/load", load), ("/v2/repository/models/astro_recommend/unload",
                                                                 b"{}")):
        status, text = _http(served, "POST", path, body, admin)
        outcome = _clean_reply(status, text)
        if outcome.kind == "refused" and (status != 503 or "not allowed" not in text):  # measured: 503
            outcome = Outcome("accepted", f"{status} {text[:200]}")
        tally.record(f"http POST {path} with the key", outcome)
    tally.check()
    assert len(calls) + len(grpc_calls) >= 3 * len(MANAGEMENT_APIS)
    assert not marker.exists(), "client-supplied code ran"
    assert _server_pid(served) == before and "died" not in served.log()  # no server death
    # Inference, health, metadata and metrics stay open.
    assert _http(served, "GET", "/v2/models/astro_recommend")[0] == 200
    assert _http(served, "GET", "/v2/health/live")[0] == 200
    metrics = http.client.HTTPConnection("127.0.0.1", served.ports[2], timeout=10)
    metrics.request("GET", "/metrics")
    assert metrics.getresponse().status == 200
    _serves(served, b"after-management")


def _tensor(name: str, shape: list[int], data: list[int]) -> dict:
    return {"name": name, "datatype": "INT64", "shape": shape, "data": data}


# Bodies that kill Triton 2.51's own HTTP front end before any model sees them (measured: stack
# overflow in its JSON parser, std::bad_alloc on a declared shape, a segfault when the declared
# byte size overflows), so `serve` must restart it.
CRASHERS = {
    "10^6 nested [": b"[" * 10**6,
    "10^5-deep array in data": (b'{"inputs":[{"name":"cand_items","datatype":"INT64","shape":[1,1],"data":'
                                + b"[" * 10**5 + b"1" + b"]" * 10**5 + b"}]}"),
    "shape [2^31, 3, 50]": json.dumps({"inputs": [_tensor("hist_items", [2**31, 3, 50], [1])]}).encode(),
    # 2^30 (16 GiB) as the campaign sent, or more where half the machine's memory is more than that
    "candidates [2, 2^30]": json.dumps({"inputs": [_tensor("cand_items", [2, max(2**30, default_memory_limit(
        1 << 20) // 16 + 1)], [1, 2])]}).encode(),
    "shape [1, 2^62] (its byte size overflows)": json.dumps({"inputs": [_tensor("cand_items", [1, 2**62], [1])]})
    .encode(),
}
MALFORMED = [b"", b"{", b"[]", b"null", b'{"inputs": [}', b'{"inputs": 3}', b'{"inputs": [3]}',
             b'{"inputs": [{"name": 1}]}', b'{"inputs": [{"name": "cand_items"}]}',
             b'{"inputs": [{"name": "cand_items", "datatype": "INT64", "shape": [1, 2], "data": "ab"}]}',
             b'{"inputs": [{"name": "cand_items", "datatype": "INT64", "shape": [-1, 2], "data": [1, 2]}]}',
             b'{"inputs": [{"name": "cand_items", "datatype": "INT64", "shape": [1, 2], "data": [1e999, 2]}]}',
             b'{"inputs": [{"name": "cand_items", "datatype": "FOO", "shape": [1, 1], "data": [1]}]}',
             b'{"inputs": [{"name": "cand_items", "datatype": "INT64", "shape": [1, 3], "data": [1, 2]}]}',
             b'{"outputs": [{"name": "logits"}], "inputs": []}', b"\xff\xfe\x00", b'{"inputs": [' * 1000,
             b'{"parameters": {"binary_data_output": "x"}, "inputs": []}',
             json.dumps({"inputs": [_tensor("cand_items", [2**63 - 1, 2**63 - 1], [1])]}).encode()]


def _binary_body(shape: list[int], size: int, header_length: int | None = None) -> tuple[bytes, dict[str, str]]:
    """Triton's binary tensor extension: a JSON header of ``header_length`` bytes, then raw data."""
    header = json.dumps({"inputs": [{"name": "cand_items", "datatype": "INT64", "shape": shape,
                                     "parameters": {"binary_data_size": size}}]}).encode()
    length = len(header) if header_length is None else header_length
    return header + b"\0" * 16, {"Inference-Header-Content-Length": str(length),
                                  "Content-Type": "application/octet-stream"}


# Measured: Triton checks these sizes against the body before it allocates (400 / 500, no crash).
BINARY = {"binary_data_size 2^62": _binary_body([1, 2], 2**62), "shape [2, 2^30], 16 bytes": _binary_body(
    [2, 2**30], 16), "shape [1, 2^62], 16 bytes": _binary_body([1, 2**62], 16),
    "header length 10^9": _binary_body([1, 2], 16, 10**9), "header length -5": _binary_body([1, 2], 16, -5),
    "header length 0": _binary_body([1, 2], 16, 0), "binary_data_size -16": _binary_body([1, 2], -16)}


def _grpc_bodies(served: Served, tally: Tally) -> None:
    """The same declared shapes over gRPC (built with the raw protobuf stub: tritonclient would
    refuse them): Triton's gRPC front end checks the request before it allocates (measured)."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    channel = grpc.insecure_channel(served.grpc)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    shapes = {"hist_items": [2**31, 3, 50], "cand_items": [2, 2**30], "hist_lengths": [1, 2**62]}
    try:
        for name, shape in shapes.items():
            for raw in (True, False):
                request = service_pb2.ModelInferRequest(model_name="astro_recommend")
                tensor = request.inputs.add(name=name, datatype="INT64", shape=shape)
                if raw:
                    request.raw_input_contents.append(b"\0" * 16)
                else:
                    tensor.contents.int64_contents.extend([1, 2])
                try:
                    stub.ModelInfer(request, timeout=60)
                    outcome = Outcome("accepted")
                except grpc.RpcError as exc:
                    outcome = _clean_reply(str(exc.code()), exc.details() or "")
                tally.record(f"grpc {name} {shape} {'raw' if raw else 'contents'}", outcome)
    finally:
        channel.close()


def test_hostile_bodies_are_survived_or_restarted_with_the_cause_kept(served):
    tally = Tally("hostile-bodies")
    path = "/v2/models/astro_recommend/infer"
    sent = {f"malformed #{i} {body[:40]!r}": (body, {"Content-Type": "application/json"})
            for i, body in enumerate(MALFORMED)}
    for name, (body, headers) in {**sent, **{f"binary {k}": v for k, v in BINARY.items()}}.items():
        status, text = _http(served, "POST", path, body, headers)
        outcome = _clean_reply(status, text)
        if outcome.kind == "refused" and not (isinstance(status, int) and 400 <= status < 600):
            outcome = Outcome("accepted", f"{status} {text[:200]}")  # answered, but not as an error
        tally.record(name, outcome)
    _grpc_bodies(served, tally)
    assert "died" not in served.log(), "a malformed body killed the server"
    restarts = []
    for name, body in CRASHERS.items():
        before = _server_pid(served)
        status, text = _http(served, "POST", path, body, {"Content-Type": "application/json"})
        tally.record(name, _clean_reply(status, text))
        restarts.append(_wait_ready(served))
        if _server_pid(served) != before:  # died: serve logged the cause and kept the log it names
            died = [ln for ln in served.log().splitlines() if ln.startswith("tritonserver died")][-1]
            assert re.search(r"killed by SIG[A-Z]+", died) and "DCGM" not in died, died
            log = Path(re.search(r"kept at (\S+);", died)[1])
            assert log.is_file() and log.stat().st_size > 0, died
        _serves(served, f"after {name}".encode())
    tally.check()
    assert max(restarts) < RESTART_S


def test_sigkill_of_serve_leaves_no_server_and_the_next_start_sweeps_its_repository(served):
    # Last in the module: it kills the shared `serve`.
    server = _server_pid(served)
    stubs = _children(server)
    repo = served.key_file.parent
    assert repo.is_dir() and str(served.proc.pid) in repo.name
    served.proc.send_signal(signal.SIGKILL)
    served.proc.wait(timeout=10)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in [server, *stubs]):
        time.sleep(0.1)
    alive = [p for p in [server, *stubs] if Path(f"/proc/{p}").exists()
             and "State:\tZ" not in Path(f"/proc/{p}/status").read_text()]
    assert not alive, f"orphans after SIGKILL of serve: {alive}"
    assert _http(served, "GET", "/v2/health/live", timeout=5)[0] == "closed"
    assert repo.is_dir()  # left behind by the kill ...
    removed = sweep_stale()  # ... and swept by the next start (TritonServer.start and serve call this)
    assert repo in removed or not repo.exists()
    assert not repo.exists() and not list(Path("/dev/shm").glob(f"astro{served.proc.pid}p*"))
