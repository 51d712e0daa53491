"""The chart's alerts (templates/prometheusrule.yaml) under `promtool test rules`
(tests/alerts/ferry-alerts.test.yaml), and its scrape targets (templates/servicemonitor.yaml).

promtool comes with Debian's prometheus package (hack/setup.sh installs it)."""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess

import pytest
import yaml
from test_chart_render import CHART, ROOT, one, render

from ferry.agent.metrics import AGENT
from ferry.controller.metrics import FLEET, Metrics

ALERT_TESTS = ROOT / "tests" / "alerts" / "ferry-alerts.test.yaml"
ON = {"monitoring": {"prometheusRule": {"enabled": True}, "serviceMonitor": {"enabled": True}}}


@pytest.fixture(scope="module")
def helm(bin_dir: pathlib.Path) -> str:
    return str(bin_dir / "helm")


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool not found: hack/setup.sh installs Debian's prometheus package"
    return path


def rules_of(docs: list[dict]) -> dict:
    return {"groups": one(docs, "PrometheusRule")["spec"]["groups"]}


def exported_names() -> set[str]:
    """Every sample name ferry serves (histograms and counters with their suffixes)."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    m = Metrics()
    m.completed(1.0, 10, 2, 100)
    text = generate_latest(m.registry).decode()
    names = {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}
    return names | set(FLEET) | set(AGENT)


def test_monitoring_objects_are_off_by_default(helm: str) -> None:
    kinds = {d["kind"] for d in render(helm)}
    assert not kinds & {"PrometheusRule", "ServiceMonitor"}


def test_every_alert_passes_its_promtool_unit_test(helm: str, promtool: str, tmp_path: pathlib.Path) -> None:
    rules = rules_of(render(helm, ON))
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    check = subprocess.run([promtool, "check", "rules", "rules.yaml"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    proc = subprocess.run([promtool, "test", "rules", ALERT_TESTS.name], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    print(f"$ promtool test rules {ALERT_TESTS.name}\n{proc.stdout}{proc.stderr}")
    assert proc.returncode == 0 and "SUCCESS" in proc.stdout, proc.stdout + proc.stderr
    # each alert has a test, and each test names an alert that exists
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    tested = {t["alertname"] for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
              for t in case["alert_rule_test"]}
    assert alerts == tested == {"FerryMigrationNoProgress", "FerryHostHeartbeatLost", "FerryMigrationsFailed",
                                "FerryMigrationAttemptsFailing", "FerryEvacuationStuck"}


def test_alerts_query_only_metrics_ferry_serves_and_follow_the_values(helm: str) -> None:
    rules = rules_of(render(helm, ON))
    used = {n for g in rules["groups"] for r in g["rules"] for n in re.findall(r"\bferry_[a-z_]+", r["expr"])}
    assert used and used <= exported_names(), used - exported_names()
    custom = {"monitoring": {"prometheusRule": {"enabled": True, "noProgressMinutes": 3, "evacuationStuckMinutes": 45,
                                                "heartbeatLostSeconds": 90, "labels": {"release": "kps"}}}}
    doc = one(render(helm, custom), "PrometheusRule")
    exprs = {r["alert"]: r["expr"] for r in doc["spec"]["groups"][0]["rules"]}
    assert exprs["FerryMigrationNoProgress"].endswith("> 180")
    assert "offset 45m" in exprs["FerryEvacuationStuck"] and "> 90)" in exprs["FerryHostHeartbeatLost"]
    assert doc["metadata"]["labels"]["release"] == "kps"


def test_service_monitors_scrape_the_operator_and_every_agent(helm: str) -> None:
    docs = render(helm, ON)
    monitors = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceMonitor"}
    assert set(monitors) == {"ferry-operator", "ferry-agent"}
    svc = one(docs, "Service", "ferry-agent-metrics")
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["ports"][0]["targetPort"] == 8082
    agent_ds = one(docs, "DaemonSet", "ferry-agent")
    assert svc["spec"]["selector"] == agent_ds["spec"]["selector"]["matchLabels"]
    assert set(monitors["ferry-agent"]["spec"]["selector"]["matchLabels"].items()) <= \
        set(svc["metadata"]["labels"].items())
    op_svc = one(docs, "Service", "ferry-operator-metrics")
    assert set(monitors["ferry-operator"]["spec"]["selector"]["matchLabels"].items()) <= \
        set(op_svc["metadata"]["labels"].items())
    # agent metrics off: no agent scrape
    off = render(helm, {**ON, "settings": {"agentMetricsPort": 0}})
    assert {d["metadata"]["name"] for d in off if d["kind"] == "ServiceMonitor"} == {"ferry-operator"}
