"""castbot in front of the public, as the manifests deploy it: every Secret a pod reads is documented and none is
committed, no password reaches a command line, MLflow asks for a login, the Bento and the Telegram bot take their
API keys from Secrets, and the NetworkPolicies deny everything but the paths castbot needs (a small evaluator of
NetworkPolicy semantics, run on the manifests' own pod labels). Offline: no cluster is needed."""

import functools
import importlib.util
import re
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import pytest
import yaml

from tests.deployments.manifests import (
    K8S,
    K8S_DEPLOYMENTS,
    NAMESPACE,
    REPO,
    by_kind,
    load_all,
    manifests,
    prefect_job,
)

pytestmark = pytest.mark.unit


def documented_secrets() -> dict[str, set[str]]:
    """{Secret: its keys} from the `kubectl create secret generic` commands in deployments/README.md."""
    text = (REPO / "deployments" / "README.md").read_text().replace("\\\n", " ")
    secrets: dict[str, set[str]] = {}
    for name, rest in re.findall(r"create secret generic ([\w-]+)(.*)", text):
        secrets.setdefault(name, set()).update(re.findall(r"--from-(?:literal|file)=(\w+)=", rest))
    return secrets


@functools.cache
def pod_specs() -> dict[str, dict]:
    """Every pod the manifests run (by workload name), and a flow run's pod as the Prefect worker builds it."""
    pods = {d["metadata"]["name"]: d["spec"]["template"] for path in manifests() for d in load_all(path)
            if d["kind"] in ("Deployment", "StatefulSet", "Job")}
    pods["flow-run"] = prefect_job(K8S_DEPLOYMENTS[0])["spec"]["template"]
    return pods


def containers(pod: dict) -> list[dict]:
    return pod["spec"].get("initContainers", []) + pod["spec"]["containers"]


def test_every_secret_the_pods_read_is_documented_and_none_is_committed():
    documented = documented_secrets()
    assert not [p for p in manifests() for d in load_all(p) if d["kind"] == "Secret"], "a Secret in git"
    for name, pod in pod_specs().items():
        for volume in pod["spec"].get("volumes", []):
            if "secret" in volume:
                keys = {item["key"] for item in volume["secret"].get("items", [])}
                assert keys <= documented.get(volume["secret"]["secretName"], set()), name
        for container in containers(pod):
            for env in container.get("env", []):
                if "secretKeyRef" in env.get("valueFrom", {}):
                    ref = env["valueFrom"]["secretKeyRef"]
                    assert ref["key"] in documented.get(ref["name"], set()), f"{name}: {ref} is not in the README"
            for source in container.get("envFrom", []):
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in documented, f"{name}: {source} is not in the README"


SECRET_ENV_NAME = re.compile(r"(PASSWORD|SECRET|TOKEN|API_KEYS?|SECRET_KEY)$")
PASSWORD_IN_URL = re.compile(r"://[^/@\s:]+:(?!\$\()[^/@\s]+@")  # user:password@, unless a $(VAR) reference


@pytest.mark.parametrize("name", sorted(pod_specs()))
def test_no_secret_on_a_command_line_or_in_a_manifest(name):
    """`ps` on the node shows a process's arguments: a password there (expanded from $(VAR) by Kubernetes or $VAR
    by a shell, or written out) is one any process of the node can read. Variables hold them instead."""
    documented = documented_secrets()
    for container in containers(pod_specs()[name]):
        from_secrets = {e["name"] for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
        for source in container.get("envFrom", []):
            from_secrets |= documented.get(source.get("secretRef", {}).get("name"), set())
        argv = " ".join(container.get("command", []) + container.get("args", []))
        for var in from_secrets:
            assert not re.search(rf"\$[({{]?{var}\b", argv), f"{name}/{container['name']}: ${var} on a command line"
        assert not PASSWORD_IN_URL.search(argv), f"{name}/{container['name']}: a password in a URL on a command line"
        for env in container.get("env", []):
            if "value" in env:
                assert not SECRET_ENV_NAME.search(env["name"]), f"{name}: {env['name']} written out, not a Secret"
                assert not PASSWORD_IN_URL.search(env["value"]), f"{name}: a password in {env['name']}"


def mlflow_auth_config(ini: Path, monkeypatch):
    """MLflow's own reader of basic_auth.ini (mlflow/server/auth/config.py), loaded without the auth app, which
    needs Flask-WTF (in the MLflow image, not in this project)."""
    import mlflow

    spec = importlib.util.spec_from_file_location(
        "mlflow_auth_config", Path(mlflow.__file__).parent / "server" / "auth" / "config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(ini))
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    return module.read_auth_config()


def mounted_file(pod: dict, container: dict, path: str) -> tuple[dict, dict]:
    """The volume a file path of the container lies on, and the volume item that puts the file there."""
    path = PurePosixPath(path)
    [mount] = [m for m in container["volumeMounts"] if path.is_relative_to(m["mountPath"])]
    [volume] = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
    source = volume.get("secret") or volume["configMap"]
    [item] = [i for i in source["items"] if i["path"] == str(path.relative_to(mount["mountPath"]))]
    return volume, item


def test_mlflow_requires_a_login_and_its_store_uris_hold_no_password(monkeypatch):
    """The server runs MLflow's basic-auth app; the backend store URI comes from MLFLOW_BACKEND_STORE_URI (an
    option's envvar in MLflow's CLI) and, like the auth database's, names no password: libpq reads PGPASSWORD.
    (Run once against a local PostgreSQL with a password: 401 without credentials, the alias moved with them.)"""
    from mlflow.cli import server as mlflow_server

    options = {p.name: p for p in mlflow_server.params}
    assert options["backend_store_uri"].envvar == "MLFLOW_BACKEND_STORE_URI"
    assert "basic-auth" in options["app_name"].type.choices
    assert "Flask-WTF" in (REPO / "deployments" / "docker" / "Dockerfile.mlflow").read_text()  # the app needs it

    pod = pod_specs()["mlflow"]
    [server] = pod["spec"]["containers"]
    argv = server["command"] + server["args"]
    assert argv[:2] == ["mlflow", "server"] and argv[argv.index("--app-name") + 1] == "basic-auth"
    assert not any(a.startswith("--backend-store-uri") or "postgresql" in a for a in argv)
    env = {e["name"]: e for e in server["env"]}
    store = urlsplit(env["MLFLOW_BACKEND_STORE_URI"]["value"])
    assert store.scheme == "postgresql" and store.username == "mlflow" and store.password is None
    secret = {name: e["valueFrom"]["secretKeyRef"] for name, e in env.items() if "valueFrom" in e}
    assert secret["PGPASSWORD"] == {"name": "mlflow-postgres", "key": "POSTGRES_PASSWORD"}
    assert secret["MLFLOW_AUTH_ADMIN_USERNAME"] == {"name": "mlflow-auth", "key": "MLFLOW_TRACKING_USERNAME"}
    assert secret["MLFLOW_AUTH_ADMIN_PASSWORD"] == {"name": "mlflow-auth", "key": "MLFLOW_TRACKING_PASSWORD"}
    assert secret["MLFLOW_FLASK_SERVER_SECRET_KEY"]["name"] == "mlflow-server"  # CSRF: the app refuses to start without

    volume, item = mounted_file(pod, server, env["MLFLOW_AUTH_CONFIG_PATH"]["value"])
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    [generator] = [g for g in kustomization["configMapGenerator"] if g["name"] == volume["configMap"]["name"]]
    assert item["key"] in generator["files"]
    config = mlflow_auth_config(K8S / "base" / item["key"], monkeypatch)
    assert config.default_permission in {"READ", "NO_PERMISSIONS"}, "signed-in users must not edit by default"
    auth_db = urlsplit(config.database_uri)
    assert auth_db.hostname == store.hostname and auth_db.password is None and auth_db.path == "/mlflow_auth"
    init = " ".join(c["args"][0] for c in pod["spec"]["initContainers"])
    assert "CREATE DATABASE mlflow_auth" in init  # created before the server starts, if missing

    # the clients: every flow run signs in with the mlflow-auth Secret's pair
    for name in ("flow-run", "castbot-train-4gpu"):
        [container] = pod_specs()[name]["spec"]["containers"]
        assert {"secretRef": {"name": "mlflow-auth"}} in container["envFrom"], name
    assert documented_secrets()["mlflow-auth"] == {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}


def test_bento_reads_its_api_keys_from_a_secret_file_and_limits_each_client(tmp_path):
    """The file the kubelet lays out from the castbot-api-keys Secret, read by the service's own code."""
    from castbot.serve.access import keys_from_env, rate_limit_from_env

    pod = pod_specs()["castbot-chat"]
    [container] = pod["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert "CASTBOT_API_KEYS" not in env, "keys written into the manifest"
    volume, item = mounted_file(pod, container, env["CASTBOT_API_KEYS_FILE"]["value"])
    assert volume["secret"]["secretName"] == "castbot-api-keys" and item["key"] == "CASTBOT_API_KEYS"
    assert volume["secret"]["defaultMode"] & 0o040 and pod["spec"]["securityContext"]["fsGroup"] == 1034
    (tmp_path / item["path"]).write_text("telegram:k3y-telegram,web:k3y-web")
    keys = keys_from_env({"CASTBOT_API_KEYS_FILE": str(tmp_path / item["path"])})
    assert sorted(keys.values()) == ["telegram", "web"]
    limit = rate_limit_from_env({"CASTBOT_RATE_LIMIT": env["CASTBOT_RATE_LIMIT"]["value"]})
    assert limit is not None and limit.requests >= 1
    # the Telegram bot is one of those clients: its key comes from its own Secret
    [telegram] = pod_specs()["castbot-telegram"]["spec"]["containers"]
    [key] = [e for e in telegram["env"] if e["name"] == "CASTBOT_API_KEY"]
    assert key["valueFrom"]["secretKeyRef"] == {"name": "castbot-telegram", "key": "CASTBOT_API_KEY"}


def test_rendered_bento_keeps_keys_and_probes_in_both_overlays(rendered):
    _, docs = rendered
    pod = by_kind(docs, "Deployment", "castbot-chat")["spec"]["template"]
    [container] = pod["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    volume, _ = mounted_file(pod, container, env["CASTBOT_API_KEYS_FILE"]["value"])
    assert volume["secret"]["secretName"] == "castbot-api-keys" and env["CASTBOT_RATE_LIMIT"]["value"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"  # 503 while the chat log is down


@functools.cache
def network_policies() -> list[dict]:
    return load_all(K8S / "base" / "network-policies.yaml")


def test_namespace_denies_all_ingress_and_egress_by_default(rendered):
    _, docs = rendered
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert {d["metadata"]["name"] for d in policies} == {d["metadata"]["name"] for d in network_policies()}
    [deny] = [d for d in policies if d["metadata"]["name"] == "default-deny"]
    assert deny["metadata"]["namespace"] == NAMESPACE
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}  # every pod, no rule
    [dns] = [d for d in policies if d["metadata"]["name"] == "dns"]
    assert dns["spec"]["podSelector"] == {} and dns["spec"]["policyTypes"] == ["Egress"]
    [rule] = dns["spec"]["egress"]
    assert rule["to"][0]["podSelector"] == {"matchLabels": {"k8s-app": "kube-dns"}}
    assert {(p["protocol"], p["port"]) for p in rule["ports"]} == {("UDP", 53), ("TCP", 53)}


# The Prefect server from prefect-helm's prefect-server chart, released as prefect-server (README): its pod labels
PREFECT_SERVER = {"app.kubernetes.io/name": "prefect-server", "app.kubernetes.io/instance": "prefect-server",
                  "app.kubernetes.io/component": "server"}
INTERNET = None  # an address outside the cluster


def selects(selector: dict, labels: dict | None) -> bool:
    assert set(selector) <= {"matchLabels"}, "matchExpressions are not modelled here"
    return labels is not None and selector.get("matchLabels", {}).items() <= labels.items()


def peer_matches(peer: dict, labels: dict | None) -> bool:
    """One `from`/`to` entry against a pod of the namespace (its labels) or the internet (None)."""
    if "ipBlock" in peer:  # pods live in private ranges: a block that excepts 10.0.0.0/8 does not reach them
        return labels is None or "10.0.0.0/8" not in peer["ipBlock"].get("except", [])
    if "namespaceSelector" in peer:
        return False  # another namespace's pods (kube-dns)
    return selects(peer["podSelector"], labels)


def admits(direction: str, pod: dict, peer: dict | None, port: int) -> bool:
    """NetworkPolicy semantics for one pod: isolated once a policy of that direction selects it, then open to
    what any rule of those policies allows (rules without ports or peers allow all ports or peers)."""
    rules_key, peers_key = {"Ingress": ("ingress", "from"), "Egress": ("egress", "to")}[direction]
    specs = [d["spec"] for d in network_policies()
             if direction in d["spec"]["policyTypes"] and selects(d["spec"]["podSelector"], pod)]
    if not specs:
        return True
    return any((rule.get("ports") is None or any(p["port"] == port and p["protocol"] == "TCP" for p in rule["ports"]))
               and (rule.get(peers_key) is None or any(peer_matches(x, peer) for x in rule[peers_key]))
               for spec in specs for rule in spec.get(rules_key, []))


def reaches(source: str | None, target: str | None, port: int) -> bool:
    labels = {**{n: p["metadata"]["labels"] for n, p in pod_specs().items()}, "prefect-server": PREFECT_SERVER}
    src, dst = labels.get(source), labels.get(target)
    assert (source is None or src) and (target is None or dst), (source, target)
    return (src is None or admits("Egress", src, dst, port)) and (dst is None or admits("Ingress", dst, src, port))


@pytest.mark.parametrize("source, target, port", [
    (INTERNET, "castbot-chat", 3000),  # the public API
    ("castbot-chat", "mlflow-postgres", 5432),  # the chat log
    ("castbot-telegram", "castbot-chat", 3000),
    ("castbot-telegram", INTERNET, 443),  # api.telegram.org
    ("flow-run", "mlflow", 5000),
    ("flow-run", "prefect-server", 4200),
    ("flow-run", "mlflow-postgres", 5432),  # the monitor reads the chat log
    ("flow-run", INTERNET, 443),  # Hugging Face hub
    ("castbot-train-4gpu", "mlflow", 5000),
    ("castbot-prefect-worker", "prefect-server", 4200),
    ("mlflow", "mlflow-postgres", 5432),
    ("mlflow", "castbot-minio", 9000),
    ("mlflow-bucket", "castbot-minio", 9000),
    ("chatlog-database", "mlflow-postgres", 5432),
])
def test_network_policies_open_the_paths_castbot_needs(source, target, port):
    assert reaches(source, target, port)


@pytest.mark.parametrize("source, target, port", [
    ("castbot-chat", "mlflow", 5000),  # a compromised Bento cannot move `champion`
    ("castbot-telegram", "mlflow", 5000),
    ("castbot-prefect-worker", "mlflow", 5000),
    (INTERNET, "mlflow", 5000),
    (INTERNET, "mlflow-postgres", 5432),
    (INTERNET, "castbot-minio", 9000),
    (INTERNET, "prefect-server", 4200),
    ("castbot-chat", INTERNET, 443),  # the public-facing pod calls nowhere out
    ("castbot-chat", "castbot-minio", 9000),
    ("castbot-chat", "prefect-server", 4200),
    ("castbot-telegram", "mlflow-postgres", 5432),
    ("castbot-telegram", "castbot-chat", 9000),
    ("flow-run", "castbot-minio", 9000),  # artifacts go through MLflow
    ("mlflow", INTERNET, 443),
    ("mlflow-postgres", INTERNET, 443),
    ("castbot-minio", INTERNET, 443),
])
def test_network_policies_close_everything_else(source, target, port):
    assert not reaches(source, target, port)
