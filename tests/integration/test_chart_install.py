"""The chart against the real API server: server-side dry run of ``helm template`` output,
``helm install`` creating every object, ``helm upgrade`` changing settings, ``helm uninstall``
removing everything but the CRDs. No kubelet or scheduler runs here, so pods stay Pending: the
assertions are about objects."""

from __future__ import annotations

import json
import pathlib
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from support import wait_until

from rbac import CHART, render_chart, to_yaml

pytestmark = pytest.mark.integration

CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering",
                  "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}


@pytest.fixture
def helm(bin_dir: pathlib.Path, kubeconfig: str) -> Any:
    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(bin_dir / "helm"), "--kubeconfig", kubeconfig, *args],
                              capture_output=True, text=True, timeout=180)
        if check:
            assert proc.returncode == 0, f"helm {' '.join(args)}: {proc.stderr}"
        return proc
    return run


@pytest.fixture
def release() -> str:
    return f"r{uuid.uuid4().hex[:6]}"


@pytest.fixture
def kopf_crds(kubectl: Any) -> None:
    """The chart's crds/ beyond ferry's own (the conftest applies crds/): kopf's peering CRDs."""
    path = str(CHART / "crds" / "kopf-peerings.yaml")
    kubectl("apply", "--server-side", "--force-conflicts", "-f", path)
    kubectl("wait", "--for", "condition=established", "--timeout", "60s", "-f", path)


def exists(kubectl: Any, doc: dict[str, Any]) -> bool:
    args = ["get", f"{doc['kind']}.{doc['apiVersion'].split('/')[0]}" if "/" in doc["apiVersion"] else doc["kind"],
            doc["metadata"]["name"], "-o", "name"]
    if doc["kind"] not in CLUSTER_SCOPED:
        args += ["-n", doc["metadata"]["namespace"]]
    return kubectl(*args, check=False).returncode == 0


@pytest.mark.parametrize("values", [
    {},
    {"settings": {"driver": "qemu"}, "metadata": {"addressSetup": {"enabled": True}}},
    {"operator": {"peering": {"enabled": False}, "replicas": 1}, "settings": {"metricsPort": 0},
     "admissionPolicy": {"enabled": False}},
    {"rbac": {"secretNamespaces": ["{ns}"]}, "metadata": {"port": 8169}},
], ids=["defaults", "qemu-and-address-setup", "standalone-no-metrics", "scoped-secrets"])
def test_server_accepts_the_rendered_chart(kubectl: Any, kopf_crds: None, namespace: str, release: str,
                                           values: dict[str, Any]) -> None:
    values = json.loads(json.dumps(values).replace("{ns}", namespace))
    docs = render_chart(namespace, release, values)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap"} <= kinds
    proc = kubectl("apply", "--dry-run=server", "-f", "-", input=to_yaml(docs), check=False)
    assert proc.returncode == 0, proc.stderr
    # One line per object, each accepted by admission and validation of the real server.
    assert len(proc.stdout.strip().splitlines()) == len(docs), proc.stdout


def test_server_rejects_what_the_chart_would_never_render(kubectl: Any, kopf_crds: None, namespace: str,
                                                          release: str) -> None:
    # The dry run above can fail: a corrupted Deployment is refused by the same check.
    docs = render_chart(namespace, release)
    dep = next(d for d in docs if d["kind"] == "Deployment")
    dep["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = 70000
    proc = kubectl("apply", "--dry-run=server", "-f", "-", input=to_yaml(docs), check=False)
    assert proc.returncode != 0 and "containerPort" in proc.stderr


@pytest.fixture
def installed(helm: Any, kubectl: Any, namespace: str, release: str) -> Iterator[dict[str, Any]]:
    proc = helm("install", release, str(CHART), "-n", namespace, "--timeout", "120s")
    manifest = helm("get", "manifest", release, "-n", namespace).stdout
    docs = [d for d in yaml.safe_load_all(manifest) if d]
    yield {"notes": proc.stdout, "docs": docs}
    helm("uninstall", release, "-n", namespace, "--timeout", "120s", check=False)


def test_install_creates_every_object_and_uninstall_removes_them_but_keeps_the_crds(
        helm: Any, kubectl: Any, namespace: str, release: str, installed: dict[str, Any]) -> None:
    docs = installed["docs"]
    assert {d["kind"] for d in docs} >= {
        "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "Service", "Deployment", "DaemonSet",
        "PodDisruptionBudget", "ClusterKopfPeering", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
    missing = [f"{d['kind']}/{d['metadata']['name']}" for d in docs if not exists(kubectl, d)]
    assert not missing, f"not created: {missing}"
    for crd in ("hosts.ferry.dev", "droplets.ferry.dev", "livemigrations.ferry.dev", "clusterkopfpeerings.kopf.dev"):
        kubectl("get", "crd", crd)
    # NOTES tell the user what to do next.
    for hint in ("kubectl label node", "kind: Host", "examples/droplet.yaml", "kubectl get lm -w"):
        assert hint in installed["notes"], hint
    # The controllers accept the workloads: the operator's ReplicaSet creates its two pods
    # (Pending: no scheduler or kubelet here).
    operator = f"{release}-ferry-operator"

    def operator_pods() -> list[dict[str, Any]]:
        pods = json.loads(kubectl("get", "pods", "-n", namespace, "-l", "app.kubernetes.io/component=operator",
                                  "-o", "json").stdout)["items"]
        return pods if len(pods) == 2 else []

    pods = wait_until(operator_pods, 60, what="the operator's two pods")
    for pod in pods:
        assert pod["spec"]["serviceAccountName"] == operator
        [c] = pod["spec"]["containers"]
        assert c["securityContext"]["runAsNonRoot"] is True

    helm("uninstall", release, "-n", namespace, "--timeout", "120s")
    wait_until(lambda: not [d for d in docs if exists(kubectl, d)], 60, what="every chart object to be deleted")
    for crd in ("hosts.ferry.dev", "droplets.ferry.dev", "livemigrations.ferry.dev", "clusterkopfpeerings.kopf.dev"):
        kubectl("get", "crd", crd)   # Helm never deletes crds/


def test_upgrade_changes_a_setting_and_rolls_the_operator_and_the_agents(
        helm: Any, kubectl: Any, namespace: str, release: str, installed: dict[str, Any]) -> None:
    def get(kind: str, name: str) -> dict[str, Any]:
        return json.loads(kubectl("get", kind, name, "-n", namespace, "-o", "json").stdout)

    before = get("deployment", f"{release}-ferry-operator")["spec"]["template"]["metadata"]["annotations"]
    helm("upgrade", release, str(CHART), "-n", namespace, "--reuse-values", "--set", "settings.noticeSeconds=30")
    assert get("configmap", f"{release}-ferry-settings")["data"]["FERRY_NOTICE_SECONDS"] == "30"
    after = get("deployment", f"{release}-ferry-operator")["spec"]["template"]["metadata"]["annotations"]
    assert after["checksum/settings"] != before["checksum/settings"]
    # the VMs live in their own pods: the agents roll too, surging one node at a time
    assert get("daemonset", f"{release}-ferry-agent")["spec"]["updateStrategy"] == {
        "type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}


def test_bad_values_fail_the_install_and_create_nothing(helm: Any, kubectl: Any, namespace: str, release: str) -> None:
    proc = helm("install", release, str(CHART), "-n", namespace, "--set", "settings.maxParallel=0", check=False)
    assert proc.returncode != 0 and "maxParallel" in proc.stderr, proc.stderr
    assert release not in helm("list", "-n", namespace, "-q").stdout
    assert kubectl("get", "clusterrole", f"{release}-ferry-operator", check=False).returncode != 0
    assert kubectl("get", "deployments", "-n", namespace, "-o", "name").stdout.strip() == ""

