"""Kubernetes manifests, validated offline against the Kubernetes 1.32 schemas (kubernetes-validate, strict:
unknown fields fail) and rendered with `kubectl kustomize` where kubectl is installed. No cluster is needed.
Secrets, MLflow's login and the NetworkPolicies: test_k8s_access.py."""

import json

import jsonpatch
import pytest
import yaml

from tests.deployments.manifests import (
    K8S,
    K8S_DEPLOYMENTS,
    NAMESPACE,
    OVERLAYS,
    REPO,
    by_kind,
    load_all,
    manifests,
    prefect_job,
    validate,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("path", manifests(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_is_valid_kubernetes(path):
    docs = load_all(path)
    assert docs
    for doc in docs:
        validate(doc)


def test_rendered_overlay_is_valid_and_namespaced(rendered):
    name, docs = rendered
    for doc in docs:
        validate(doc)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == NAMESPACE, f"{name}: {doc['kind']}/{doc['metadata']['name']}"
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job")]
    assert {d["metadata"]["name"] for d in workloads} >= {"castbot-chat", "castbot-prefect-worker", "mlflow",
                                                          "mlflow-postgres", "castbot-minio", "mlflow-bucket",
                                                          "chatlog-database"}
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, workload["metadata"]["name"]
        for container in pod["containers"]:
            assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            assert "/" in container["image"] or ":" in container["image"], "image left as a bare placeholder"


def test_rendered_references_resolve(rendered):
    """Generated ConfigMaps get a hash suffix: every reference must carry it, every Service must select pods."""
    _, docs = rendered
    config_maps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    worker = by_kind(docs, "Deployment", "castbot-prefect-worker")["spec"]["template"]["spec"]
    assert worker["volumes"][0]["configMap"]["name"] in config_maps
    assert all(e["valueFrom"]["configMapKeyRef"]["name"] in config_maps
               for e in worker["containers"][0]["env"] if "valueFrom" in e)
    pods = [d["spec"]["template"]["metadata"]["labels"] for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    for service in (d for d in docs if d["kind"] == "Service"):
        selector = service["spec"]["selector"].items()
        assert any(selector <= labels.items() for labels in pods), service["metadata"]["name"]
    hpa = by_kind(docs, "HorizontalPodAutoscaler", "castbot-chat")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "castbot-chat"


def test_bento_deployment_serves_gpu_in_base_and_cpu_in_overlay(rendered):
    name, docs = rendered
    pod = by_kind(docs, "Deployment", "castbot-chat")["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert pod["metadata"]["annotations"] == {"prometheus.io/scrape": "true", "prometheus.io/port": "3000",
                                              "prometheus.io/path": "/metrics"}
    resources = container["resources"]
    if name == "base":
        assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == "1"
        assert pod["spec"]["nodeSelector"] and pod["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert container["image"].startswith("registry.example.com/castbot/castbot-chat-gpu:")
    else:
        assert "nvidia.com/gpu" not in json.dumps(pod)
        assert container["image"].startswith("registry.example.com/castbot/castbot-chat:")
        assert by_kind(docs, "HorizontalPodAutoscaler", "castbot-chat")["spec"]["minReplicas"] == 2


def chatlog_url_source(deployment: dict) -> dict:
    [env] = [e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
             if e["name"] == "CASTBOT_CHATLOG_URL"]
    assert "value" not in env, "the chat log URL holds a password: it must come from a Secret, not a literal"
    return env["valueFrom"]["secretKeyRef"]


def test_bento_gets_the_chat_log_url_from_the_secret_the_database_job_uses(rendered):
    """Every replica logs to the one PostgreSQL database that the chatlog-database Job creates."""
    _, docs = rendered
    source = chatlog_url_source(by_kind(docs, "Deployment", "castbot-chat"))
    assert source == {"name": "castbot-chatlog", "key": "CASTBOT_CHATLOG_URL"}
    job = by_kind(docs, "Job", "chatlog-database")["spec"]["template"]["spec"]["containers"][0]
    secrets = {e["valueFrom"]["secretKeyRef"]["name"] for e in job["env"] if "valueFrom" in e}
    assert secrets == {"castbot-chatlog", "mlflow-postgres"}
    assert "CREATE DATABASE chatlog OWNER chatlog" in job["args"][0]


def test_cpu_patches_apply_to_the_base():
    """The overlay's JSON patches, applied without kustomize: the result is a valid CPU-only Deployment."""
    base = {(d["kind"], d["metadata"]["name"]): d for d in load_all(K8S / "base" / "bento.yaml")}
    overlay = yaml.safe_load((OVERLAYS["cpu"] / "kustomization.yaml").read_text())
    for patch in overlay["patches"]:
        key = (patch["target"]["kind"], patch["target"]["name"])
        base[key] = jsonpatch.apply_patch(base[key], yaml.safe_load((OVERLAYS["cpu"] / patch["path"]).read_text()))
        validate(base[key])
    deployment = base[("Deployment", "castbot-chat")]
    assert "nvidia.com/gpu" not in json.dumps(deployment)
    assert chatlog_url_source(deployment)["name"] == "castbot-chatlog"
    assert deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]


def test_worker_role_can_launch_jobs_and_nothing_cluster_wide():
    docs = load_all(K8S / "base" / "prefect-worker.yaml")
    role = by_kind(docs, "Role", "castbot-prefect-worker")
    jobs = next(r for r in role["rules"] if r["resources"] == ["jobs"])
    assert {"create", "delete", "watch"} <= set(jobs["verbs"]) and jobs["apiGroups"] == ["batch"]
    assert not any(d["kind"].startswith("Cluster") for d in docs)
    binding = by_kind(docs, "RoleBinding", "castbot-prefect-worker")
    assert binding["subjects"][0]["name"] == by_kind(docs, "Deployment", "castbot-prefect-worker")[
        "spec"]["template"]["spec"]["serviceAccountName"]


@pytest.mark.parametrize("deployment", K8S_DEPLOYMENTS)
def test_prefect_job_template_renders_a_valid_job_gpu_for_training(deployment):
    job = prefect_job(deployment)
    validate(job)
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["args"] == ["prefect", "flow-run", "execute"]
    assert pod["serviceAccountName"] == "castbot-train-job"
    assert {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow.castbot.svc.cluster.local:5000"} in container["env"]
    # the chat log's URL and MLflow's credentials: from Secrets, never a literal in prefect.yaml
    assert container["envFrom"] == [{"secretRef": {"name": "castbot-chatlog", "optional": True}},
                                    {"secretRef": {"name": "mlflow-auth"}}]
    assert not any("CHATLOG" in e["name"] or "MLFLOW_TRACKING_PASSWORD" in e["name"] for e in container["env"])
    # Prefect adds its own labels to the pod (app.kubernetes.io/name among them) and keeps this one: the
    # NetworkPolicies open MLflow, Prefect and PostgreSQL to flow runs by it
    assert job["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "flow-run"
    if deployment.endswith("-monitor-k8s"):  # the monitor reads the log and the registry: no GPU to hold
        assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
        return
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["tolerations"] and pod["nodeSelector"]


def test_multi_gpu_job_runs_the_flow_under_accelerate():
    docs = load_all(K8S / "jobs" / "multi-gpu-train.yaml")
    profile = yaml.safe_load(by_kind(docs, "ConfigMap", "castbot-train-4gpu")["data"]["profile.yaml"])
    from castbot.config.profile import PipelineConfig

    config = PipelineConfig.model_validate(profile)
    assert config.training.processes == 4
    assert (REPO / config.training.accelerate_config).is_file()
    accelerate = yaml.safe_load((REPO / config.training.accelerate_config).read_text())
    container = by_kind(docs, "Job", "castbot-train-4gpu")["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == str(config.training.processes)
    assert accelerate["num_processes"] == config.training.processes
