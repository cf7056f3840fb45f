"""Kubernetes manifests for a model repository (``astro-trt triton BUNDLE --out REPO --k8s DIR``):
the official Triton container as a StatefulSet, HAProxy in front of it routing users by a
consistent hash of X-User-Key, and an autoscaler on a served metric. No orchestrator of our own.

    DIR/triton-statefulset.yaml    tritonserver pods (ordinal = place on the proxy's ring), locked down,
                                   probes on /v2/health/*, Prometheus scrape annotations, resources
    DIR/triton-service.yaml        headless Service: stable pod names astro-triton-<i>.astro-triton
    DIR/models-pvc.yaml            the volume holding REPO (as repo/) and astro-trt's Python packages
    DIR/haproxy-configmap.yaml     haproxy.cfg (proxy.haproxy_config, servers by DNS name)
    DIR/haproxy-deployment.yaml    the proxy
    DIR/recommend-service.yaml     what clients call: ports 8000 (HTTP) and 8001 (gRPC)
    DIR/hpa.yaml                   HorizontalPodAutoscaler on astro_recommend's queue time per request
    DIR/prometheus-adapter-rules.yaml  the rule that serves that metric to the autoscaler

A StatefulSet rather than a Deployment: the proxy lists pods by their stable names up to
``max_replicas``, so a pod the autoscaler adds joins the ring in its own place and the users of
the others stay where their cache is."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from astro_trt.artifacts import atomic_write, refuse_existing, staged_directory
from astro_trt.errors import BundleError, DataError
from astro_trt.serving import lockdown
from astro_trt.serving.defaults import check_replicas
from astro_trt.serving.proxy import Backend, haproxy_config

# Triton 2.51 (NGC release 24.10) is the server the tests run (nvidia-pytriton's binary).
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"
HAPROXY_IMAGE = "haproxy:2.6"  # the HAProxy the local replicas run (Debian 12's package)
KUBERNETES_VERSION = "1.37.0"  # the API schemas the manifests are validated against (kubernetes-validate)
NAME = "astro-triton"
PROXY = "astro-haproxy"
SERVICE = "astro-recommend"
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
MOUNT = "/models"  # the volume: repo/ (the model repository) and python/ (astro-trt and its packages)
ADMIN_SECRET = "astro-triton-admin"  # kubectl create secret generic astro-triton-admin --from-literal=key=...
ADMIN_HEADER = lockdown.KEY_HEADER
METRIC = "astro_queue_ms_per_request"  # served to the HPA by the Prometheus adapter rule
QUEUE_TARGET_MS = 20  # scale out when requests wait this long on average (one page computes in ~3.5 ms on a CPU)


def triton_args(repository: str) -> list[str]:
    """tritonserver's arguments in a pod: lockdown.py's list (every model of the repository loaded
    at start and never again, management APIs behind the admin header), the key from the Secret,
    listening on the pod's addresses, metrics on."""
    return lockdown.tritonserver_args(repository, api_key="$(ASTRO_ADMIN_KEY)", http_port=PORTS["http"],
                                      grpc_port=PORTS["grpc"], metrics_port=PORTS["metrics"], address="0.0.0.0",
                                      extra=("--allow-metrics=true",))


def _meta(name: str, namespace: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/name": name,
                                                              "app.kubernetes.io/part-of": "astro-trt"}, **extra}


def _http_probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period, "failureThreshold": failures,
            "timeoutSeconds": 2}


def manifests(*, replicas: int, max_replicas: int, namespace: str, cache_bytes: int, gpus: int,
              repository_bytes: int, image: str = TRITON_IMAGE) -> dict[str, dict[str, Any]]:
    """file name -> Kubernetes object."""
    check_replicas(replicas)
    check_replicas(max_replicas)
    if max_replicas < replicas:
        raise DataError(f"--k8s-max-replicas {max_replicas} is below --k8s-replicas {replicas}; raise it")
    if isinstance(gpus, bool) or not isinstance(gpus, int) or not 0 <= gpus <= 16:
        raise DataError(f"--gpus {gpus!r}: must be an integer in 0..16 (0: CPU pods)")
    if not namespace or not all(c.isalnum() or c == "-" for c in namespace) or namespace != namespace.lower():
        raise DataError(f"--k8s-namespace {namespace!r}: must be a Kubernetes name (lower-case letters, digits, -)")
    selector = {"app.kubernetes.io/name": NAME}
    # The per-user cache, ONNX Runtime's sessions and the server itself (measured ~1.5 GiB RSS for ml100k here).
    memory_mib = (cache_bytes >> 20) + 2048
    resources: dict[str, Any] = {"requests": {"cpu": "2", "memory": f"{memory_mib}Mi"},
                                 "limits": {"memory": f"{2 * memory_mib}Mi"}}
    if gpus:
        resources["limits"]["nvidia.com/gpu"] = str(gpus)
    container = {
        "name": "tritonserver", "image": image, "command": ["tritonserver"],
        "args": triton_args(f"{MOUNT}/repo"),
        "env": [{"name": "PYTHONPATH", "value": f"{MOUNT}/python"},
                {"name": "ASTRO_ADMIN_KEY", "valueFrom": {"secretKeyRef": {"name": ADMIN_SECRET, "key": "key"}}}],
        "ports": [{"name": k, "containerPort": v} for k, v in PORTS.items()],
        # Loading the bundle (verified) and ONNX Runtime sessions takes a while: readiness decides traffic.
        "startupProbe": _http_probe("/v2/health/ready", 5, 60),
        "readinessProbe": _http_probe("/v2/health/ready", 5, 2),
        "livenessProbe": _http_probe("/v2/health/live", 10, 3),
        "resources": resources,
        "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True, "runAsUser": 1000,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "models", "mountPath": MOUNT, "readOnly": True},
                         {"name": "shm", "mountPath": "/dev/shm"}],
    }
    statefulset = {
        "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": _meta(NAME, namespace),
        "spec": {
            "serviceName": NAME, "replicas": replicas, "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": selector, "annotations": {
                    "prometheus.io/scrape": "true", "prometheus.io/port": str(PORTS["metrics"]),
                    "prometheus.io/path": "/metrics"}},
                "spec": {
                    "terminationGracePeriodSeconds": 30,
                    "containers": [container],
                    "volumes": [
                        {"name": "models", "persistentVolumeClaim": {"claimName": "astro-models", "readOnly": True}},
                        # The Python backend passes tensors through shared memory; a container's default is 64 MiB.
                        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}},
                    ]}}}}
    headless = {"apiVersion": "v1", "kind": "Service", "metadata": _meta(NAME, namespace),
                "spec": {"clusterIP": "None", "selector": selector, "publishNotReadyAddresses": False,
                         "ports": [{"name": k, "port": v, "targetPort": k} for k, v in PORTS.items()]}}
    pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": _meta("astro-models", namespace),
           "spec": {"accessModes": ["ReadOnlyMany"],
                    # The repository, astro-trt's Python packages (~1 GiB), and room for a second version.
                    "resources": {"requests": {"storage": f"{2 * (repository_bytes >> 30) + 4}Gi"}}}}
    domain = f"{NAME}.{namespace}.svc.cluster.local"
    backends = [Backend(f"replica{i}", f"{NAME}-{i}.{domain}:{PORTS['http']}",
                        f"{NAME}-{i}.{domain}:{PORTS['grpc']}") for i in range(max_replicas)]
    config = haproxy_config(backends, http=f"*:{PORTS['http']}", grpc=f"*:{PORTS['grpc']}", dns=True)
    proxy_labels = {"app.kubernetes.io/name": PROXY}
    configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(PROXY, namespace),
                 "data": {"haproxy.cfg": config}}
    proxy = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(PROXY, namespace),
        "spec": {"replicas": 2, "selector": {"matchLabels": proxy_labels}, "template": {
            "metadata": {"labels": proxy_labels},
            "spec": {"containers": [{
                "name": "haproxy", "image": HAPROXY_IMAGE,
                "args": ["haproxy", "-db", "-f", "/usr/local/etc/haproxy/haproxy.cfg"],
                "ports": [{"name": "http", "containerPort": PORTS["http"]},
                          {"name": "grpc", "containerPort": PORTS["grpc"]}],
                "readinessProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 5},
                "livenessProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 10},
                "resources": {"requests": {"cpu": "500m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
                "volumeMounts": [{"name": "config", "mountPath": "/usr/local/etc/haproxy", "readOnly": True}]}],
                "volumes": [{"name": "config", "configMap": {"name": PROXY}}]}}}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": _meta(SERVICE, namespace),
               "spec": {"selector": proxy_labels, "ports": [{"name": k, "port": PORTS[k], "targetPort": k}
                                                            for k in ("http", "grpc")]}}
    hpa = {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": _meta(NAME, namespace),
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": NAME},
                 "minReplicas": replicas, "maxReplicas": max_replicas,
                 "metrics": [{"type": "Pods", "pods": {"metric": {"name": METRIC}, "target": {
                     "type": "AverageValue", "averageValue": str(QUEUE_TARGET_MS)}}}],
                 # Scaling in moves users (their caches go cold): slowly.
                 "behavior": {"scaleDown": {"stabilizationWindowSeconds": 600}}}}
    rule = {"seriesQuery": 'nv_inference_queue_duration_us{model="astro_recommend"}',
            "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
            "name": {"as": METRIC},
            "metricsQuery": ('sum(rate(nv_inference_queue_duration_us{model="astro_recommend",<<.LabelMatchers>>}[1m]))'
                             ' by (<<.GroupBy>>) / 1000 / clamp_min(sum(rate(nv_inference_request_success{'
                             'model="astro_recommend",<<.LabelMatchers>>}[1m])) by (<<.GroupBy>>), 1)')}
    adapter = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta("astro-adapter-rules", namespace),
               "data": {"rules.yaml": _yaml({"rules": [rule]})}}
    return {"triton-statefulset.yaml": statefulset, "triton-service.yaml": headless, "models-pvc.yaml": pvc,
            "haproxy-configmap.yaml": configmap, "haproxy-deployment.yaml": proxy,
            "recommend-service.yaml": service, "hpa.yaml": hpa, "prometheus-adapter-rules.yaml": adapter}


_PLAIN = re.compile(r"[A-Za-z][A-Za-z0-9_./-]*")
_YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null"}  # YAML 1.1 reads these as bool/null


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    text = str(value)
    if _PLAIN.fullmatch(text) and text.lower() not in _YAML_WORDS:
        return text
    return json.dumps(text)  # a YAML double-quoted scalar: never read as a number, bool or null


def _yaml(value: Any, indent: int = 0) -> str:
    """YAML block style of mappings, lists and scalars; multi-line strings as literal blocks."""
    pad = "  " * indent
    lines = []
    items = value.items() if isinstance(value, Mapping) else ((None, v) for v in value)
    for key, item in items:
        head = f"{pad}{_scalar(key)}:" if key is not None else f"{pad}-"
        if isinstance(item, (Mapping, list)) and item:
            body = _yaml(item, indent + 1)
            if key is None:  # a list item: its first line goes after the dash
                lines.append(f"{head} {body.lstrip()}")
            else:
                lines.append(f"{head}\n{body}")
        elif isinstance(item, (Mapping, list)):
            lines.append(f"{head} {'{}' if isinstance(item, Mapping) else '[]'}")
        elif isinstance(item, str) and "\n" in item:
            text = "\n".join(f"{pad}  {ln}" if ln else "" for ln in item.rstrip("\n").split("\n"))
            lines.append(f"{head} |\n{text}")
        else:
            lines.append(f"{head} {_scalar(item)}")
    return "\n".join(lines)


def check_out(out: str | Path, force: bool) -> Path:
    out = Path(out).resolve()
    refuse_existing(out, force, BundleError)
    return out


def write_manifests(out: str | Path, *, replicas: int = 3, max_replicas: int = 8, namespace: str = "default",
                    cache_bytes: int, gpus: int = 1, repository_bytes: int = 0, image: str = TRITON_IMAGE,
                    force: bool = False) -> Path:
    """Write the manifests into ``out`` (atomically); returns its absolute path."""
    out = check_out(out, force)
    objects = manifests(replicas=replicas, max_replicas=max_replicas, namespace=namespace, cache_bytes=cache_bytes,
                        gpus=gpus, repository_bytes=repository_bytes, image=image)
    with staged_directory(out) as stage:
        for name, obj in objects.items():
            atomic_write(stage / name, (_yaml(obj) + "\n").encode())
    return out


__all__ = ["ADMIN_HEADER", "ADMIN_SECRET", "KUBERNETES_VERSION", "TRITON_IMAGE", "check_out", "manifests",
           "triton_args", "write_manifests"]
