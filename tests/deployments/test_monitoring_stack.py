"""The Grafana dashboard and the Prometheus alert rules: structure, metric names the service really exports,
and PromQL that Prometheus's own promtool parses and evaluates (rule unit tests with synthetic series)."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "deployments" / "monitoring"
DASHBOARD = json.loads((MONITORING / "grafana-dashboard.json").read_text())
RULES = MONITORING / "castbot-alerts.yaml"


def exprs() -> list[str]:
    return [t["expr"] for p in DASHBOARD["panels"] for t in p["targets"]]


def promtool(*args: str, cwd: Path = MONITORING) -> str:
    tool = shutil.which("promtool")
    if not tool:
        missing = pytest.fail if os.environ.get("CI") else pytest.skip  # CI must check; a laptop may lack it
        missing("promtool is not installed (Debian package `prometheus`; `make system-packages` installs it)")
    result = subprocess.run([tool, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_dashboard_panels_are_complete_and_do_not_overlap():
    panels = DASHBOARD["panels"]
    assert DASHBOARD["uid"] and DASHBOARD["schemaVersion"] >= 36
    assert len({p["id"] for p in panels}) == len(panels)
    cells = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"] and panel["description"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
    [variable] = DASHBOARD["templating"]["list"]
    assert variable["type"] == "datasource" and variable["query"] == "prometheus"


@pytest.mark.parametrize("topic, pattern", [
    ("request rate", r"rate\(bentoml_service_request_total"),
    ("errors", r'http_response_code=~"5\.\."'),
    ("latency percentiles", r"histogram_quantile\(0\.99, .*bentoml_service_request_duration_seconds_bucket"),
    ("batch sizes", r"castbot_generate_batch_size_bucket"),
    ("continuous batch size", r"castbot_generated_tokens_total.*/.*castbot_decoding_steps_total"),
    ("GPU memory", r"DCGM_FI_DEV_FB_USED"),
    ("ready replicas", r"kube_deployment_status_replicas_available"),
])
def test_dashboard_shows(topic, pattern):
    assert any(re.search(pattern, e) for e in exprs()), f"no panel shows {topic}"


def test_metric_names_are_the_ones_the_service_exports():
    """castbot_* from castbot/serve/metrics.py; bentoml_service_* from BentoML's HTTP instruments and namespace."""
    import bentoml

    bentoml_dir = Path(bentoml.__file__).parent / "_internal"
    instruments = (bentoml_dir / "server" / "http" / "instruments.py").read_text()
    namespace = yaml.safe_load((bentoml_dir / "configuration" / "v2" / "default_configuration.yaml").read_text())
    assert namespace["services"]["metrics"]["namespace"] == "bentoml_service"
    # the serving metrics live in castbot/serve/metrics.py; the chat log's own (write errors) beside its store
    service = "\n".join(p.read_text() for p in sorted((REPO / "castbot").rglob("*.py")))
    text = "\n".join(exprs()) + RULES.read_text()
    for name in set(re.findall(r"\b(bentoml_service_\w+|castbot_\w+)", text)):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if base.startswith("castbot_"):
            base = base.removesuffix("_total")  # a counter's series
            assert f'"{base}"' in service, f"{name}: no module under castbot/ declares {base}"
        else:
            assert f'name="{base.removeprefix("bentoml_service_")}"' in instruments, f"{name}: not a BentoML metric"


def test_service_name_selectors_match_the_bentos():
    """BentoML labels metrics with the Bento's name (service_name="castbot-chat" on a served Bento's /metrics)."""
    bentos = [yaml.safe_load(p.read_text())["name"] for p in REPO.glob("bentofile*.yaml")]
    assert bentos
    text = "\n".join(exprs()) + RULES.read_text()
    selectors = set(re.findall(r'service_name=~?"([^"]+)"', text))
    assert selectors
    for selector in selectors:
        for bento in bentos:
            assert re.fullmatch(selector, bento), f"service_name {selector!r} misses the Bento {bento}"


def test_alert_rules_cover_errors_latency_readiness_and_the_chat_log():
    rules = {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    assert set(rules) == {"CastbotChatHighErrorRate", "CastbotChatHighLatency", "CastbotChatNoReadyReplicas",
                          "CastbotChatLogWriteErrors"}
    assert "castbot_chatlog_write_errors_total" in rules["CastbotChatLogWriteErrors"]["expr"]
    for rule in rules.values():
        assert rule["for"] and rule["labels"]["severity"] in {"page", "warn"} and rule["annotations"]["summary"]


def test_promtool_checks_and_unit_tests_the_rules():
    assert "SUCCESS: 4 rules found" in promtool("check", "rules", RULES.name)
    assert "SUCCESS" in promtool("test", "rules", "castbot-alerts.test.yaml")


def test_promtool_parses_every_dashboard_query(tmp_path):
    # Grafana fills $__rate_interval in; as recording rules, promtool parses each query as Prometheus would
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"castbot:dashboard_query_{i}", "expr": e.replace("$__rate_interval", "5m")}
        for i, e in enumerate(exprs())]}]}
    (tmp_path / "dashboard-queries.yaml").write_text(yaml.safe_dump(rules))
    assert f"SUCCESS: {len(exprs())} rules found" in promtool("check", "rules", "dashboard-queries.yaml", cwd=tmp_path)
