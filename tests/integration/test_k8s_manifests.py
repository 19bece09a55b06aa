"""The Kubernetes manifests (deploy/k8s), checked offline: no cluster and no API server.

Every variant is rendered with `kubectl kustomize`; every built-in object is validated with
kubernetes-validate in strict mode (unknown fields fail) at the oldest and newest Kubernetes versions
claimed; the custom resources go through their projects' own models: KEDA's ScaledObject and
Prometheus Operator's PodMonitor through cloudcoil's pydantic models, KServe's InferenceService
through the field map of KServe's SDK models (tests/integration/data/README.md says why not the SDK
itself). Then the invariants across objects: probe paths exist in the app, the autoscalers' metric is
one the server exports, ports and selectors line up, the drain fits the grace period, the CPU limit
gives the threads intended, and T, the target in-flight requests per replica, is one number.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pydantic
import pytest
import yaml
from cloudcoil.models.keda.v1alpha1 import ScaledObject
from cloudcoil.models.prometheus_operator.v1 import PodMonitor
from prometheus_client import CollectorRegistry

from service import cores
from service.config import Settings
from service.metrics import Metrics
from service.server import HUNG_EXIT_MARGIN_S
from tests.conftest import REPO

pytestmark = pytest.mark.integration

K8S = REPO / "deploy" / "k8s"
DATA = Path(__file__).resolve().parent / "data"
VARIANTS = ("overlays/cpu", "overlays/gpu", "examples/cpu-keda", "examples/gpu-keda", "examples/cpu-hpa",
            "examples/gpu-hpa")  # fmt: skip
# The oldest and newest Kubernetes versions the manifests claim (docs/scale-out.md).
K8S_VERSIONS = ("1.25.0", "1.37.0")
CUSTOM_KINDS = {"ScaledObject", "PodMonitor"}
# Seconds between the server's own hung-work exit and SIGKILL, at least.
KILL_MARGIN_S = 5
IMAGE_UID = 10001  # USER in docker/Dockerfile and docker/Dockerfile.cuda


# ---- rendering -------------------------------------------------------------------------------------


@cache
def render(variant: str) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        message = "kubectl (with its built-in kustomize) is not on PATH"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    done = subprocess.run([kubectl, "kustomize", str(K8S / variant)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def one(docs: tuple[dict[str, Any], ...], kind: str) -> dict[str, Any]:
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in pod_spec["containers"] if c["name"] == name]
    return found


def server_pod(docs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    spec: dict[str, Any] = one(docs, "Deployment")["spec"]["template"]["spec"]
    return spec


def env_of(spec: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in spec.get("env", [])}


def load(path: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((K8S / path).read_text())
    return data


def kserve() -> dict[str, Any]:
    return load("kserve/inferenceservice.yaml")


def rayservice() -> dict[str, Any]:
    return load("ray/rayservice.yaml")


def ray_serve_config() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(rayservice()["spec"]["serveConfigV2"])
    return data


def target_in_flight(variant: str) -> str:
    """T of a variant: its overlay's local-config ConfigMap (dropped from the rendered output)."""
    overlay = "overlays/" + variant.split("/")[-1].split("-")[0]
    value: str = load(f"{overlay}/scaling-target.yaml")["data"]["targetInFlightPerReplica"]
    return value


def test_every_kustomization_is_rendered_here():
    found = {str(p.parent.relative_to(K8S)) for p in K8S.rglob("kustomization.yaml")}
    components = {d for d in found if d.startswith("components/")}
    assert found - components - {"base"} == set(VARIANTS)
    # Every component is used by some variant that is rendered.
    used = {c for v in VARIANTS for c in components if f"../../{c}" in (K8S / v / "kustomization.yaml").read_text()}
    assert used == components == {"components/keda", "components/hpa"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_renders_the_server_and_its_autoscaler(variant):
    docs = render(variant)
    kinds = sorted(doc["kind"] for doc in docs)
    expected = ["Deployment", "PersistentVolumeClaim", "PodDisruptionBudget", "PodMonitor", "Service"]
    autoscaler = {"keda": ["ScaledObject"], "hpa": ["HorizontalPodAutoscaler"]}.get(variant.split("-")[-1], [])
    assert kinds == sorted(expected + autoscaler)
    # The local-config ConfigMap holding T is a build-time value, never applied.
    assert all(doc["kind"] != "ConfigMap" for doc in docs)
    namespaces = {doc["metadata"].get("namespace") for doc in docs}
    assert len(namespaces) == 1 and None not in namespaces, namespaces
    # An autoscaler owns the replica count; without one the Deployment says it.
    assert ("replicas" in one(docs, "Deployment")["spec"]) == (not autoscaler)


# ---- schemas ---------------------------------------------------------------------------------------


def validate_builtin(doc: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_builtin_objects_validate_strictly(variant, version):
    checked = 0
    for doc in render(variant):
        if doc["kind"] in CUSTOM_KINDS:
            continue
        validate_builtin(doc, version)
        checked += 1
    assert checked >= 4  # Service, PVC, Deployment, PDB (+ the HPA)


def test_strict_validation_catches_an_unknown_field():
    deployment = json.loads(json.dumps(one(render("overlays/cpu"), "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}  # misspelt
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_builtin(deployment, K8S_VERSIONS[0])


def strict_model_check(model: type[pydantic.BaseModel], doc: dict[str, Any]) -> None:
    """The pydantic model accepts the document and drops nothing: cloudcoil's models ignore unknown
    fields, so a field they do not know (a misspelling) shows as a difference after the round trip."""
    parsed = model.model_validate(doc)
    again = parsed.model_dump(mode="json", by_alias=True, exclude_unset=True)
    assert again == doc, f"{model.__name__} dropped or changed fields"


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v.endswith("keda")])
def test_scaled_object_passes_kedas_models(variant):
    strict_model_check(ScaledObject, one(render(variant), "ScaledObject"))


def test_kedas_models_reject_a_broken_scaled_object():
    good = one(render("examples/cpu-keda"), "ScaledObject")
    broken = json.loads(json.dumps(good))
    broken["spec"]["minReplicaCount"] = "two"
    with pytest.raises(pydantic.ValidationError):
        ScaledObject.model_validate(broken)
    misspelt = json.loads(json.dumps(good))
    misspelt["spec"]["minReplicas"] = misspelt["spec"].pop("minReplicaCount")  # the HPA's name, not KEDA's
    with pytest.raises(AssertionError):
        strict_model_check(ScaledObject, misspelt)


@pytest.mark.parametrize("variant", ["overlays/cpu", "overlays/gpu"])
def test_pod_monitor_passes_prometheus_operators_models(variant):
    strict_model_check(PodMonitor, one(render(variant), "PodMonitor"))


@cache
def kserve_classes() -> dict[str, dict[str, str]]:
    classes: dict[str, dict[str, str]] = json.loads((DATA / "kserve-v1beta1-models.json").read_text())["classes"]
    return classes


SCALARS: dict[str, type | tuple[type, ...]] = {"str": str, "int": int, "bool": bool, "float": (int, float)}


def check_kserve(value: Any, type_name: str, path: str, pod_parts: dict[str, Any]) -> None:
    """Walk a document against KServe's SDK field map: unknown fields and wrong scalar types fail.
    Kubernetes types met on the way are collected in pod_parts, for kubernetes-validate."""
    if type_name in SCALARS:
        assert isinstance(value, SCALARS[type_name]) and not (type_name == "int" and isinstance(value, bool)), path
    elif type_name.startswith("list["):
        assert isinstance(value, list), path
        for index, item in enumerate(value):
            check_kserve(item, type_name[5:-1], f"{path}[{index}]", pod_parts)
    elif type_name.startswith("dict("):
        assert isinstance(value, dict), path
    elif type_name in kserve_classes():
        assert isinstance(value, dict), path
        fields = kserve_classes()[type_name]
        for key, item in value.items():
            assert key in fields, f"{path}.{key}: not a field of KServe's {type_name}"
            check_kserve(item, fields[key], f"{path}.{key}", pod_parts)
    else:  # a Kubernetes type (V1Container, V1ObjectMeta, ...)
        pod_parts[path] = value


def as_pod(spec: dict[str, Any], version: str) -> None:
    """Validates a pod spec's Kubernetes parts as a Pod."""
    validate_builtin({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": spec}, version)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_inference_service_passes_kserves_models(version):
    isvc = kserve()
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    pod_parts: dict[str, Any] = {}
    check_kserve(isvc, "V1beta1InferenceService", "", pod_parts)
    predictor = isvc["spec"]["predictor"]
    predictor_fields = kserve_classes()["V1beta1PredictorSpec"].items()
    pod_fields = {key for key, t in predictor_fields if re.match(r"(list\[)?V1[A-Z]", t)}
    collected = {re.sub(r"\[\d+\]$", "", path) for path in pod_parts}
    assert collected == {f".spec.predictor.{key}" for key in pod_fields & set(predictor)} | {".metadata"}
    # The predictor's pod-spec fields are a Kubernetes PodSpec's: validate them as one.
    as_pod({key: predictor[key] for key in pod_fields & set(predictor)}, version)


def test_kserve_field_map_catches_an_unknown_field():
    isvc = kserve()
    isvc["spec"]["predictor"]["scaleTargets"] = 4
    with pytest.raises(AssertionError, match="scaleTargets"):
        check_kserve(isvc, "V1beta1InferenceService", "", {})


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rayservice_pods_validate_strictly(version):
    ray = rayservice()
    assert (ray["apiVersion"], ray["kind"]) == ("ray.io/v1", "RayService")
    cluster = ray["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for template in templates:
        as_pod(template["spec"], version)


# ---- invariants ------------------------------------------------------------------------------------


@cache
def app_paths() -> frozenset[str]:
    from service.api.app import create_app

    return frozenset(create_app(Settings(device="cpu")).openapi()["paths"])


def probes(spec: dict[str, Any]) -> dict[str, str]:
    kinds = ("startupProbe", "readinessProbe", "livenessProbe")
    return {kind: spec[kind]["httpGet"]["path"] for kind in kinds if kind in spec}


@pytest.mark.parametrize("variant", ["overlays/cpu", "overlays/gpu"])
def test_probes(variant):
    server = container(server_pod(render(variant)), "resnet-serve")
    paths = probes(server)
    ready, live = "/health/ready", "/health/live"
    assert paths == {"startupProbe": ready, "readinessProbe": ready, "livenessProbe": live}
    assert set(paths.values()) <= app_paths()
    for kind in paths:
        assert server[kind]["httpGet"]["port"] == "http"
    # The start-up budget covers load, export or graph capture, and warm-up: minutes, not seconds.
    startup = server["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    live = server["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= 60


def test_kserve_probe_paths_exist_in_the_app():
    isvc_container = kserve()["spec"]["predictor"]["containers"][0]
    paths = probes(isvc_container)
    assert paths["readinessProbe"] == "/v2/health/ready"
    assert set(paths.values()) <= app_paths()


def exported_metric_names() -> set[str]:
    registry = CollectorRegistry()
    Metrics(registry, max_batch_size=8).init_model("m", queue_capacity=8)
    return {sample.name for family in registry.collect() for sample in family.samples}


def test_autoscaler_metrics_are_exported_by_the_server():
    exported = exported_metric_names()
    query = one(render("examples/cpu-keda"), "ScaledObject")["spec"]["triggers"][0]["metadata"]["query"]
    hpa_metric = one(render("examples/cpu-hpa"), "HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["metric"]
    (adapter_rule,) = load("components/hpa/prometheus-adapter-values.yaml")["rules"]["custom"]
    used = set(re.findall(r"\bresnet_serve_\w+", query + adapter_rule["seriesQuery"]))
    assert used == {"resnet_serve_inflight_requests"}
    assert used <= exported
    # The adapter serves the metric under the name the HPA asks for.
    assert adapter_rule["name"]["as"] == hpa_metric["name"] and hpa_metric["name"] in exported


@pytest.mark.parametrize("variant", VARIANTS)
def test_ports_and_selectors_line_up(variant):
    docs = render(variant)
    deployment = one(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    spec = server_pod(docs)
    ports = {p["name"]: p["containerPort"] for p in container(spec, "resnet-serve")["ports"]}
    env = env_of(container(spec, "resnet-serve"))
    assert ports == {"http": int(env["RESNET_SERVE_PORT"])}

    service = one(docs, "Service")
    (service_port,) = service["spec"]["ports"]
    target = service_port["targetPort"]
    assert ports.get(target, target) == ports["http"]
    monitor = one(docs, "PodMonitor")
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= set(ports)
    assert {e["path"] for e in monitor["spec"]["podMetricsEndpoints"]} == {"/metrics"}

    selectors = {
        "Deployment": deployment["spec"]["selector"]["matchLabels"],
        "Service": service["spec"]["selector"],
        "PodDisruptionBudget": one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        "PodMonitor": monitor["spec"]["selector"]["matchLabels"],
    }
    for constraint in spec["topologySpreadConstraints"]:
        selectors[f"spread {constraint['topologyKey']}"] = constraint["labelSelector"]["matchLabels"]
    for owner, selector in selectors.items():
        assert selector.items() <= pod_labels.items(), f"{owner}'s selector misses the pods: {selector}"
    assert {c["topologyKey"] for c in spec["topologySpreadConstraints"]} >= {"topology.kubernetes.io/zone"}

    if variant.endswith("keda"):
        # The query selects this variant's pods: its namespace and the instance label PodMonitor copies.
        query = one(docs, "ScaledObject")["spec"]["triggers"][0]["metadata"]["query"]
        matchers = dict(re.findall(r'(\w+)="([^"]*)"', query))
        assert "app.kubernetes.io/instance" in monitor["spec"]["podTargetLabels"]
        assert matchers == {
            "namespace": deployment["metadata"]["namespace"],
            "app_kubernetes_io_instance": pod_labels["app.kubernetes.io/instance"],
        }
    for kind in ("ScaledObject", "HorizontalPodAutoscaler"):
        for scaler in (d for d in docs if d["kind"] == kind):
            assert scaler["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
            assert scaler["metadata"]["namespace"] == deployment["metadata"]["namespace"]


@pytest.mark.parametrize("variant", ["overlays/cpu", "overlays/gpu"])
def test_drain_fits_the_grace_period(variant):
    spec = server_pod(render(variant))
    server = container(spec, "resnet-serve")
    env = env_of(server)
    request_timeout = float(env["RESNET_SERVE_REQUEST_TIMEOUT_S"])
    grace = float(env["RESNET_SERVE_SHUTDOWN_GRACE_S"])
    # Every admitted request may run to its own deadline within the drain.
    assert grace >= request_timeout
    command = server["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    assert pre_stop >= 3  # long enough for endpoint removal to reach the proxies
    budget = pre_stop + max(grace, request_timeout) + HUNG_EXIT_MARGIN_S + KILL_MARGIN_S
    assert spec["terminationGracePeriodSeconds"] >= budget


def test_kserve_and_ray_drains_fit_their_grace_periods():
    predictor = kserve()["spec"]["predictor"]
    env = env_of(predictor["containers"][0])
    grace = float(env["RESNET_SERVE_SHUTDOWN_GRACE_S"])
    assert grace >= float(env["RESNET_SERVE_REQUEST_TIMEOUT_S"]) == predictor["timeout"]
    assert predictor["terminationGracePeriodSeconds"] >= grace + HUNG_EXIT_MARGIN_S + KILL_MARGIN_S
    (app,) = ray_serve_config()["applications"]
    (deployment,) = app["deployments"]
    ray_env = app["runtime_env"]["env_vars"]
    assert deployment["graceful_shutdown_timeout_s"] > float(ray_env["RESNET_SERVE_REQUEST_TIMEOUT_S"])
    for group in rayservice()["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        assert group["template"]["spec"]["terminationGracePeriodSeconds"] > deployment["graceful_shutdown_timeout_s"]


def millicores(quantity: str | int) -> int:
    text = str(quantity)
    return int(text[:-1]) if text.endswith("m") else round(float(text) * 1000)


def cpu_quota_for_limit(limit: str | int, root: Path) -> int | None:
    """What the server reads from a container with this CPU limit: the kubelet writes the limit as a
    CFS quota of limit x period (cgroup v2 cpu.max); the server's own parser reads it back."""
    period = 100_000
    root.mkdir(parents=True, exist_ok=True)
    (root / "cpu.max").write_text(f"{millicores(limit) * period // 1000} {period}\n")
    return cores.cgroup_cpu_quota(root)


@pytest.mark.parametrize("variant", ["overlays/cpu", "overlays/gpu"])
def test_cpu_limit_gives_the_intended_threads(variant, tmp_path, monkeypatch):
    server = container(server_pod(render(variant)), "resnet-serve")
    resources = server["resources"]
    # Guaranteed QoS: requests = limits, and whole CPUs, which the quota rounds up to exactly.
    assert resources["requests"] == resources["limits"]
    limit = resources["limits"]["cpu"]
    quota = cpu_quota_for_limit(limit, tmp_path / "cgroup")
    # A fractional limit would be rounded up: threads for CPU time the pod does not have.
    assert quota is not None and quota * 1000 == millicores(limit), f"CPU limit {limit} is not whole CPUs"
    # The server resolves its threads on a node with more cores than the limit: the quota caps them.
    monkeypatch.setattr(cores, "usable_cpus", lambda: quota)
    env = env_of(server)
    for key in [k for k in os.environ if k.startswith("RESNET_SERVE_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("RESNET_SERVE_"):
            monkeypatch.setenv(key, value)
    on_gpu = env["RESNET_SERVE_DEVICE"] == "cuda"
    plan = Settings().resolve(on_gpu=on_gpu)
    assert plan.torch_threads <= quota and plan.decode_workers <= quota
    if on_gpu:
        assert plan.torch_threads == min(4, quota) and plan.decode_workers == quota - 1
    else:
        # The setting measured fastest on a dedicated 2-core box: forward and decode on every CPU.
        assert plan.torch_threads == plan.decode_workers == quota
    # Explicit thread settings, where a manifest has them, may not exceed the limit either.
    for key in ("RESNET_SERVE_TORCH_THREADS", "RESNET_SERVE_DECODE_WORKERS"):
        assert int(env.get(key, quota)) <= quota


def test_ray_threads_match_the_replica_cpus():
    (app,) = ray_serve_config()["applications"]
    (deployment,) = app["deployments"]
    cpus = deployment["ray_actor_options"]["num_cpus"]
    env = app["runtime_env"]["env_vars"]
    # Ray reserves CPUs without a cgroup quota per replica, so the threads are said explicitly.
    assert int(env["RESNET_SERVE_TORCH_THREADS"]) == int(env["RESNET_SERVE_DECODE_WORKERS"]) == cpus


@pytest.mark.parametrize("variant", [v for v in VARIANTS if "-" in v])
def test_t_is_one_number_per_variant(variant):
    docs = render(variant)
    t = target_in_flight(variant)
    if variant.endswith("keda"):
        scaled = one(docs, "ScaledObject")["spec"]
        (trigger,) = scaled["triggers"]
        assert (trigger["type"], trigger["metricType"]) == ("prometheus", "AverageValue")
        assert trigger["metadata"]["threshold"] == t
        assert trigger["metadata"]["query"].startswith("sum(")  # the total, divided by replicas
        # Never to zero, on GPU least of all.
        assert scaled["minReplicaCount"] >= 1 and "idleReplicaCount" not in scaled
    else:
        hpa = one(docs, "HorizontalPodAutoscaler")["spec"]
        (metric,) = hpa["metrics"]
        assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
        assert str(metric["pods"]["target"]["averageValue"]) == t
        assert hpa["minReplicas"] >= 1


def test_t_is_the_same_in_kserve_ray_and_the_docs():
    t = int(target_in_flight("overlays/cpu"))
    predictor = kserve()["spec"]["predictor"]
    assert (predictor["scaleMetric"], predictor["scaleTarget"]) == ("concurrency", t)
    assert predictor["minReplicas"] >= 1
    (app,) = ray_serve_config()["applications"]
    assert app["import_path"] == "service.ray_serve:app"
    (deployment,) = app["deployments"]
    autoscaling = deployment["autoscaling_config"]
    assert autoscaling["target_ongoing_requests"] == t
    assert autoscaling["min_replicas"] >= 1
    assert deployment["max_ongoing_requests"] > t
    docs = (REPO / "docs" / "scale-out.md").read_text()
    assert f"**T = {t}**" in docs
    assert f"T = {target_in_flight('overlays/gpu')}" in docs


@pytest.mark.parametrize("variant", ["overlays/cpu", "overlays/gpu"])
def test_pod_is_locked_down(variant):
    spec = server_pod(render(variant))
    server = container(spec, "resnet-serve")
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == IMAGE_UID
    assert spec["automountServiceAccountToken"] is False
    context = server["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m for m in server["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    env = env_of(server)
    # Weights read-only at the directory the server reads; the ONNX cache and /tmp writable.
    weights = mounts[env["RESNET_SERVE_WEIGHTS_DIR"]]
    assert weights["readOnly"] is True
    assert volumes[weights["name"]]["persistentVolumeClaim"]["readOnly"] is True
    assert env["RESNET_SERVE_MISSING_WEIGHTS"] == "fail"
    for path in (env["RESNET_SERVE_ONNX_CACHE_DIR"], "/tmp"):
        assert not mounts[path].get("readOnly", False)
        assert "emptyDir" in volumes[mounts[path]["name"]]
    claim = volumes[weights["name"]]["persistentVolumeClaim"]["claimName"]
    pvc = one(render(variant), "PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == claim and pvc["spec"]["accessModes"] == ["ReadOnlyMany"]


def test_gpu_variant_takes_one_gpu_per_pod():
    spec = server_pod(render("overlays/gpu"))
    server = container(spec, "resnet-serve")
    assert server["image"].endswith(":cuda")
    assert env_of(server)["RESNET_SERVE_DEVICE"] == "cuda"
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert env_of(server)["RESNET_SERVE_WORKERS"] == "1"
    cpu = server_pod(render("overlays/cpu"))
    assert container(cpu, "resnet-serve")["image"].endswith(":cpu")
    assert "nvidia.com/gpu" not in container(cpu, "resnet-serve")["resources"]["limits"]


def every_server_env() -> list[tuple[str, dict[str, str]]]:
    found = [(v, env_of(container(server_pod(render(v)), "resnet-serve"))) for v in ("overlays/cpu", "overlays/gpu")]
    found.append(("kserve", env_of(kserve()["spec"]["predictor"]["containers"][0])))
    ray_env = ray_serve_config()["applications"][0]["runtime_env"]["env_vars"]
    found.append(("ray", {k: str(v) for k, v in ray_env.items()}))
    return found


def test_every_server_setting_is_one_the_server_reads(monkeypatch):
    """A misspelt RESNET_SERVE_* variable would be silently ignored; the settings refuse extras."""
    for where, env in every_server_env():
        settings = {k: v for k, v in env.items() if k.startswith("RESNET_SERVE_")}
        assert settings, where
        for key, value in settings.items():
            assert key.removeprefix("RESNET_SERVE_").lower() in Settings.model_fields, (where, key)
            monkeypatch.setenv(key, value)
        Settings()  # every value parses and validates
        for key in settings:
            monkeypatch.delenv(key)
