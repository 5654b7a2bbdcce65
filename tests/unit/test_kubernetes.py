"""deploy/kubernetes: both overlays render with kustomize, pass the Kubernetes schemas (strict) of every
version the README names, and agree with what the services actually read and serve."""

from __future__ import annotations

import functools
import re
import shutil
import subprocess

import pytest
import yaml
from kubernetes_validate import validate
from prometheus_client import generate_latest

from llm_service.engine.stats import EngineStats
from llm_service.metrics import EngineMetrics
from tests.helpers import ROOT
from tests.service_env import env_names

KUSTOMIZE_ROOT = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "gpu")
# The versions README's "Deploy on Kubernetes" section names.
KUBERNETES_VERSIONS = ("1.32.0", "1.33.0", "1.34.0", "1.35.0", "1.36.0", "1.37.0")
MODULES = {"mmserve-vision": "vision_service", "mmserve-llm": "llm_service", "mmserve-gateway": "gateway"}


@functools.cache
def rendered(overlay: str) -> tuple[dict, ...]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with its built-in kustomize) is needed to render deploy/kubernetes"
    out = subprocess.run(
        [kubectl, "kustomize", str(KUSTOMIZE_ROOT / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


def of_kind(overlay: str, kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in rendered(overlay) if doc["kind"] == kind}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_passes_the_kubernetes_schemas(overlay, version):
    kinds = sorted(doc["kind"] for doc in rendered(overlay))
    assert kinds == sorted(
        ["ConfigMap", "PersistentVolumeClaim", "Job", "HorizontalPodAutoscaler"]
        + ["Deployment", "Service", "PodDisruptionBudget"] * 3
    )
    for doc in rendered(overlay):
        validate(doc, version, strict=True)  # raises ValidationError naming the field


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_select_their_pods_and_grpc_services_are_headless(overlay):
    deployments = of_kind(overlay, "Deployment")
    for name, service in of_kind(overlay, "Service").items():
        pod = deployments[name]["spec"]["template"]
        selector = service["spec"]["selector"]
        assert selector.items() <= pod["metadata"]["labels"].items()
        ports = {p["name"]: p["containerPort"] for c in pod["spec"]["containers"] for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, (name, port)
        # gRPC behind a ClusterIP would pin every gateway to one pod: the gateway's dns:/// resolver
        # must see each pod's address.
        headless = service["spec"].get("clusterIP") == "None"
        assert headless == (name != "mmserve-gateway"), name
    for deployment in deployments.values():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for name, budget in of_kind(overlay, "PodDisruptionBudget").items():
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_containers_run_our_services_with_settings_they_read(overlay):
    config = of_kind(overlay, "ConfigMap")["mmserve-config"]["data"]
    every = frozenset().union(*(env_names(module) for module in MODULES.values()))
    assert set(config) <= every, set(config) - every
    addresses = {name: value.split("///")[1] for name, value in config.items() if name.endswith("_ADDR")}
    services = of_kind(overlay, "Service")
    for name, address in addresses.items():
        host, port = address.split(":")
        assert int(port) in [p["port"] for p in services[host]["spec"]["ports"]], (name, address)
    for name, deployment in of_kind(overlay, "Deployment").items():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["command"] == ["python", "-m", MODULES[name]]
        own = {e["name"] for e in container.get("env", [])}
        assert own <= env_names(MODULES[name]), (name, own - env_names(MODULES[name]))
        assert container["image"] == f"mmserve:{'gpu' if overlay == 'gpu' else 'latest'}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_termination_match_the_drain(overlay):
    drain_s = int(of_kind(overlay, "ConfigMap")["mmserve-config"]["data"]["DRAIN_TIMEOUT"])
    for name, deployment in of_kind(overlay, "Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        pre_stop_s = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
        # the kubelet's SIGKILL must come after preStop + the whole drain
        assert pod["terminationGracePeriodSeconds"] > pre_stop_s + drain_s, name
        port = {p["name"]: p["containerPort"] for p in container["ports"]}
        ready = container["readinessProbe"]
        if name == "mmserve-gateway":
            assert ready["httpGet"]["path"] == "/ready"
            assert "httpGet" not in container["livenessProbe"]  # a backend outage must not restart it
        else:
            assert ready["grpc"]["port"] == port["grpc"]
            assert container["startupProbe"]["grpc"]["port"] == port["grpc"]


def test_gpu_overlay_gives_the_model_services_a_gpu_and_cpu_none():
    for overlay, wanted in (("cpu", None), ("gpu", 1)):
        for name, deployment in of_kind(overlay, "Deployment").items():
            (container,) = deployment["spec"]["template"]["spec"]["containers"]
            gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
            assert gpus == (wanted if name != "mmserve-gateway" else None), (overlay, name)
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            if gpus:
                prefix = MODULES[name].split("_")[0].upper()
                assert env[f"{prefix}_DEVICE"] == "cuda"


def test_autoscaler_targets_the_llm_on_a_metric_it_exports():
    (hpa,) = of_kind("cpu", "HorizontalPodAutoscaler").values()
    assert hpa["spec"]["scaleTargetRef"]["name"] in of_kind("cpu", "Deployment")
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    exposition = generate_latest(EngineMetrics(EngineStats()).registry).decode()
    assert re.search(rf"^{name} \d", exposition, re.M), exposition


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_reads_the_internal_secret_from_one_optional_secret(overlay):
    refs = {}
    for name, deployment in of_kind(overlay, "Deployment").items():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        (entry,) = [e for e in container["env"] if e["name"] == "MMSERVE_INTERNAL_TOKEN"]
        refs[name] = entry["valueFrom"]["secretKeyRef"]
    assert set(refs) == set(MODULES)
    # the same secret for all three, and optional: without it the stack runs with the secret off
    assert all(
        ref == {"name": "mmserve-internal-token", "key": "token", "optional": True} for ref in refs.values()
    )
