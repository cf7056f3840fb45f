"""Kubernetes manifests from `astro-trt triton --k8s`: every object validates offline against the
schemas of a named Kubernetes version (kubernetes-validate, strict: no unknown fields), the
proxy's configuration passes `haproxy -c`, the autoscaler and scrape annotations point at what the
server serves, and the tritonserver arguments (locked down) run on the real binary."""

from __future__ import annotations

import shutil
import urllib.error
import urllib.request

import pytest
from serving_fixture import tiny_bundle

from astro_trt.cli import main
from astro_trt.engines.bundle import load_bundle
from astro_trt.serving import k8s
from astro_trt.serving.proxy import HAProxy, haproxy_unavailable_reason
from astro_trt.serving.repository import PYTHON_MODELS, write_repository
from astro_trt.serving.server import TritonServer, unavailable_reason

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install 'astro-trt[dev]'")
yaml = pytest.importorskip("yaml")


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return tiny_bundle(tmp_path_factory.mktemp("k8s"))


@pytest.fixture(scope="module")
def written(bundle_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("k8s-out")
    main(["triton", str(bundle_dir), "--out", str(root / "repo"), "--k8s", str(root / "k8s"), "--k8s-replicas", "2",
          "--k8s-max-replicas", "4", "--k8s-namespace", "recsys", "--cache-mib", "64"])
    return {p.name: yaml.safe_load(p.read_text()) for p in (root / "k8s").iterdir()}


def test_every_manifest_validates_against_the_kubernetes_schema(written):
    assert set(written) == {"triton-statefulset.yaml", "triton-service.yaml", "models-pvc.yaml",
                            "haproxy-configmap.yaml", "haproxy-deployment.yaml", "recommend-service.yaml", "hpa.yaml",
                            "prometheus-adapter-rules.yaml"}
    for name, obj in written.items():
        kubernetes_validate.validate(obj, k8s.KUBERNETES_VERSION, strict=True)  # raises ValidationError
        assert obj["metadata"]["namespace"] == "recsys", name


def test_the_validator_catches_a_broken_manifest(written):
    broken = dict(written["hpa.yaml"], spec=dict(written["hpa.yaml"]["spec"], minReplicas="two"))
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, k8s.KUBERNETES_VERSION, strict=True)
    typo = dict(written["triton-service.yaml"], spec=dict(written["triton-service.yaml"]["spec"], clusterIp="None"))
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, k8s.KUBERNETES_VERSION, strict=True)


def test_triton_pods_are_probed_scraped_sized_and_locked_down(written):
    sts = written["triton-statefulset.yaml"]
    assert sts["spec"]["replicas"] == 2 and sts["spec"]["serviceName"] == k8s.NAME
    pod = sts["spec"]["template"]
    assert pod["metadata"]["annotations"] == {"prometheus.io/scrape": "true", "prometheus.io/port": "8002",
                                              "prometheus.io/path": "/metrics"}
    (container,) = pod["spec"]["containers"]
    assert container["image"] == k8s.TRITON_IMAGE and container["image"].startswith("nvcr.io/nvidia/tritonserver:")
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["resources"]["requests"]["memory"] == f"{64 + 2048}Mi"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    args = container["args"]
    assert "--model-control-mode=none" in args and "--model-repository=/models/repo" in args
    restricted = [a for a in args if a.startswith(("--http-restricted-api=", "--grpc-restricted-protocol="))]
    assert len(restricted) == 2
    for arg in restricted:
        assert arg.endswith(f":{k8s.ADMIN_HEADER}=$(ASTRO_ADMIN_KEY)")
        assert {"model-repository", "shared-memory"} <= set(arg.split("=", 1)[1].split(":")[0].split(","))
    # the admin value comes from a Secret, expanded by Kubernetes into the args
    env = {e["name"]: e for e in container["env"]}
    assert env["ASTRO_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]["name"] == k8s.ADMIN_SECRET


def test_autoscaler_and_proxy_follow_the_statefulset(written):
    hpa = written["hpa.yaml"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": k8s.NAME}
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 4)
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == k8s.METRIC
    rules = yaml.safe_load(written["prometheus-adapter-rules.yaml"]["data"]["rules.yaml"])["rules"]
    assert rules[0]["name"]["as"] == k8s.METRIC and "nv_inference_queue_duration_us" in rules[0]["metricsQuery"]
    config = written["haproxy-configmap.yaml"]["data"]["haproxy.cfg"]
    servers = [ln.split()[2] for ln in config.splitlines() if ln.strip().startswith("server ")]
    domain = "astro-triton.recsys.svc.cluster.local"
    assert servers[:4] == [f"astro-triton-{i}.{domain}:8000" for i in range(4)] and len(servers) == 8
    assert "balance hdr(X-User-Key)" in config and "hash-type consistent" in config
    proxy = written["haproxy-deployment.yaml"]["spec"]["template"]["spec"]
    assert proxy["volumes"][0]["configMap"]["name"] == written["haproxy-configmap.yaml"]["metadata"]["name"]
    service = written["recommend-service.yaml"]["spec"]
    assert service["selector"] == written["haproxy-deployment.yaml"]["spec"]["selector"]["matchLabels"]
    if haproxy_unavailable_reason() is None:
        HAProxy(config, "").check()  # resolvers and not-yet-resolvable pods included


@pytest.mark.parametrize("argv, message", [
    (["--k8s-replicas", "5", "--k8s-max-replicas", "4"], "below --k8s-replicas"),
    (["--k8s-namespace", "Bad_NS"], "must be a Kubernetes name"),
    (["--gpus", "-1"], "-1 is not in the range"),
])
def test_bad_k8s_arguments_are_refused_before_anything_is_written(argv, message, bundle_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["triton", str(bundle_dir), "--out", str(tmp_path / "repo"), "--k8s", str(tmp_path / "k"), *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "repo").exists() and not (tmp_path / "k").exists()


def test_locked_down_arguments_run_on_the_real_tritonserver(bundle_dir, tmp_path):
    if unavailable_reason():
        pytest.skip(unavailable_reason())
    repo = write_repository(load_bundle(bundle_dir), tmp_path / "repo", cache_bytes=1 << 20)
    for model in repo.iterdir():  # this server has only the Python backend: keep what it can load
        if model.is_dir() and model.name not in PYTHON_MODELS:
            shutil.rmtree(model)

    class PodServer(TritonServer):
        """The pod's arguments, with this machine's ports and backends."""

        def command(self, install, backends, view):
            args = [a.replace("$(ASTRO_ADMIN_KEY)", "s3cret") for a in k8s.triton_args(str(view))
                    if not a.startswith(tuple(f"--{k}-{w}" for k in ("http", "grpc", "metrics")
                                              for w in ("port", "address")))]
            ports = [f"--{kind}-{what}={value}" for kind in ("http", "grpc", "metrics")
                     for what, value in (("address", "127.0.0.1"), ("port", self.ports[kind]))]
            return [str(install.binary), *args, *ports, f"--backend-directory={backends}"]

    with PodServer(repo, models=PYTHON_MODELS, startup_timeout=120) as server:
        base = f"http://{server.endpoints.http}"
        assert urllib.request.urlopen(f"{base}/v2/models/astro_recommend/ready", timeout=10).status == 200
        unload = urllib.request.Request(f"{base}/v2/repository/models/astro_recommend/unload", data=b"{}",
                                        method="POST")
        with pytest.raises(urllib.error.HTTPError) as exc:  # restricted without the header
            urllib.request.urlopen(unload, timeout=10)
        assert exc.value.code == 403
        unload.add_header(k8s.ADMIN_HEADER, "s3cret")
        with pytest.raises(urllib.error.HTTPError) as exc:  # with it: model control none refuses unloading
            urllib.request.urlopen(unload, timeout=10)
        body = exc.value.read().decode()
        assert exc.value.code == 503 and "not allowed" in body, body
        assert urllib.request.urlopen(f"{base}/v2/models/astro_recommend/ready", timeout=10).status == 200
