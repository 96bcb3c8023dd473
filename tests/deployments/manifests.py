"""Reading the Kubernetes manifests for the tests: every object file, strict validation against the Kubernetes
1.32 schemas (kubernetes-validate: unknown fields fail), `kubectl kustomize` rendering, and the Job the Prefect
worker would submit, built by prefect-kubernetes' own code."""

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deployments" / "k8s"
K8S_VERSION = "1.32.0"
NAMESPACE = "castbot"
OVERLAYS = {"base": K8S / "base", "cpu": K8S / "overlays" / "cpu"}
K8S_DEPLOYMENTS = [d["name"] for d in yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())["deployments"]
                   if d["name"].endswith("-k8s")]


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def validate(doc: dict) -> None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{doc['kind']}/{doc['metadata'].get('name')}: {exc.message} at {'.'.join(map(str, exc.path))}")


def manifests() -> list[Path]:
    """Every Kubernetes object file: not the kustomizations, not the overlays' JSON patches."""
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml" and "overlays" not in p.parts)


def by_kind(docs: list[dict], kind: str, name: str) -> dict:
    [doc] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def render(overlay: str) -> list[dict]:
    """`kubectl kustomize` of an overlay ("base" or "cpu"); fails in CI without kubectl, skips on a laptop."""
    kubectl = shutil.which("kubectl")
    if not kubectl:
        missing = pytest.fail if os.environ.get("CI") else pytest.skip  # CI must render; a laptop may lack kubectl
        missing("kubectl (with its built-in kustomize) is not installed: overlays are checked by "
                "test_cpu_patches_apply_to_the_base instead")
    result = subprocess.run([kubectl, "kustomize", str(OVERLAYS[overlay])], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def prefect_job(deployment: str) -> dict:
    """The Job the Kubernetes worker would submit for this deployment, built by prefect-kubernetes' own code."""
    from prefect.client.schemas.objects import FlowRun
    from prefect.utilities.templating import apply_values
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = json.loads((K8S / "base" / "prefect-base-job-template.json").read_text())
    spec = next(d for d in yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())["deployments"]
                if d["name"] == deployment)
    job_variables = spec["work_pool"]["job_variables"]
    assert set(job_variables) <= set(template["variables"]["properties"]), "a job variable the pool does not define"
    defaults = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
    config = KubernetesWorkerJobConfiguration(**apply_values(template["job_configuration"],
                                                             {**defaults, **job_variables}))
    config.prepare_for_flow_run(flow_run=FlowRun(flow_id=uuid.uuid4(), name="brave-otter"))
    return config.job_manifest
