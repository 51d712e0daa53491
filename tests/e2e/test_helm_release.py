"""The release as a user manages it: `helm upgrade` with a changed setting rolls the operator
and the metadata endpoint but not the agents (OnDelete: their pods run the droplets);
`helm uninstall` removes the release and keeps the CRDs and the user's objects."""

from __future__ import annotations

import json

import pytest
from steps import apply_example_hosts, place
from support import wait_until

pytestmark = pytest.mark.e2e


def pods(e2e, component: str) -> dict[str, bool]:
    """name -> Ready of the release's pods of COMPONENT (terminating ones left out)."""
    items = json.loads(e2e.kubectl("get", "pods", "-n", e2e.namespace, "-l",
                                   f"app.kubernetes.io/instance={e2e.release},app.kubernetes.io/component={component}",
                                   "-o", "json").stdout)["items"]
    return {p["metadata"]["name"]: any(c["type"] == "Ready" and c["status"] == "True"
                                       for c in p["status"].get("conditions", []))
            for p in items if not p["metadata"].get("deletionTimestamp")}


def helm(e2e, *args: str, timeout: float = 360):
    return e2e.run("helm", "--kubeconfig", e2e.kubeconfig, "-n", e2e.namespace, *args, timeout=timeout)


def test_helm_upgrade_rolls_operator_and_metadata_but_not_agents(e2e):
    e2e.require_cluster("helm upgrade of the release")
    before = {c: pods(e2e, c) for c in ("operator", "metadata", "agent")}
    assert len(before["operator"]) == 2 and len(before["agent"]) == len(e2e.hosts)
    settings = json.loads(e2e.kubectl("get", "configmap", "-n", e2e.namespace, f"{e2e.release}-settings",
                                      "-o", "json").stdout)["data"]
    new_value = str(int(settings["FERRY_MAX_PARALLEL"]) + 1)

    helm(e2e, "upgrade", e2e.release, "charts/ferry", "--reuse-values",
         "--set", f"settings.maxParallel={new_value}", "--wait", "--timeout", "5m")
    e2e.kubectl("rollout", "status", "-n", e2e.namespace, f"deployment/{e2e.release}-operator", "--timeout=180s",
                timeout=190)
    e2e.kubectl("rollout", "status", "-n", e2e.namespace, f"daemonset/{e2e.release}-metadata", "--timeout=180s",
                timeout=190)

    settings = json.loads(e2e.kubectl("get", "configmap", "-n", e2e.namespace, f"{e2e.release}-settings",
                                      "-o", "json").stdout)["data"]
    assert settings["FERRY_MAX_PARALLEL"] == new_value

    def rolled(component: str, count: int):
        now = pods(e2e, component)
        return len(now) == count and all(now.values()) and not set(now) & set(before[component])
    wait_until(lambda: rolled("operator", 2), 180, what="two new Ready operator pods")
    wait_until(lambda: rolled("metadata", len(e2e.hosts)), 180, what="new Ready metadata pods on every host")
    # The agents' template changed, their pods did not (updateStrategy OnDelete).
    assert pods(e2e, "agent") == before["agent"]
    ds = json.loads(e2e.kubectl("get", "daemonset", "-n", e2e.namespace, f"{e2e.release}-agent",
                                "-o", "json").stdout)
    assert ds["status"].get("updatedNumberScheduled", 0) == 0
    for host in e2e.hosts:
        e2e.kubectl("wait", f"host/{host}", "--for=jsonpath={.status.phase}=Ready", "--timeout=60s", timeout=70)


@pytest.mark.last
def test_helm_uninstall_removes_the_release_and_keeps_crds_and_user_objects(e2e, ns):
    e2e.require_cluster("helm uninstall of the release")
    apply_example_hosts(e2e)
    place(e2e, ns, "keeper")

    helm(e2e, "uninstall", e2e.release, "--wait", "--timeout", "3m")

    status = e2e.run("helm", "--kubeconfig", e2e.kubeconfig, "-n", e2e.namespace, "status", e2e.release,
                     check=False)
    assert status.returncode != 0 and "not found" in status.stderr
    wait_until(lambda: not any(pods(e2e, c) for c in ("operator", "metadata", "agent")), 120,
               what="the release's pods gone")
    left = e2e.kubectl("get", "deployments,daemonsets,configmaps,serviceaccounts,services", "-n", e2e.namespace,
                       "-l", f"app.kubernetes.io/instance={e2e.release}", "-o", "name").stdout.split()
    assert left == []
    cluster_left = e2e.kubectl("get", "clusterroles,clusterrolebindings", "-o", "name").stdout.split()
    assert not [r for r in cluster_left if f"/{e2e.release}-" in r]
    for crd in ("hosts.ferry.dev", "droplets.ferry.dev", "livemigrations.ferry.dev"):
        e2e.kubectl("get", "crd", crd)
    for host in e2e.hosts:
        e2e.kubectl("get", "host", host)
    e2e.kubectl("get", "droplet", "-n", ns, "keeper")
