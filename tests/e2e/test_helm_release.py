"""The release as a user manages it: `helm upgrade` with a changed setting rolls the operator,
the metadata endpoint and the agents (the droplets run in their own pods and keep running);
`helm uninstall` removes the release and keeps the CRDs and the user's objects."""

from __future__ import annotations

import json

import pytest
from pods import (Stopwatch, assert_no_guest_restarted, create_droplet, figure, finished, guests, running_pod,
                  vm_pods)
from steps import apply_example_hosts, migration, place
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


def test_helm_upgrade_rolls_every_agent_while_droplets_run_and_one_migration_copies(e2e, ns):
    """`helm upgrade` with a changed setting rolls the operator, the metadata endpoint and, one
    node at a time, the agents (RollingUpdate): the guests live in their own pods, so none
    restarts (same pod, no container restart, its write counter went on), and the migration
    in PreCopy during the roll completes or fails with its source intact, on exactly one host."""
    e2e.require_cluster("helm upgrade of the release")
    apply_example_hosts(e2e)
    names = [f"roll-{i}" for i in range(6)]
    for i, name in enumerate(names):
        create_droplet(e2e, ns, name, size="s-1vcpu-1gb", ip=f"127.0.3.{i + 1}", rate_kibps=256)
    create_droplet(e2e, ns, "roll-mover", ip="127.0.3.99")
    for name in [*names, "roll-mover"]:
        wait_until(lambda n=name: running_pod(e2e, ns, n), 120, what=f"{ns}/{name} running in its pod")
    before = guests(e2e, ns, names)
    mover_source = e2e.kubectl("get", "-n", ns, "droplet", "roll-mover", "-o", "jsonpath={.status.host}").stdout
    # 1 MiB/s: the example's 80 MiB disk keeps the copy in PreCopy through the roll.
    lm = e2e.ferry("-n", ns, "migrate", "roll-mover", "--bandwidth", "1").stdout.strip()

    def copying():
        st = migration(e2e, ns, lm).get("status") or {}
        return st.get("phase") == "PreCopy" and (st.get("transfer") or {}).get("state") == "Copying"
    wait_until(copying, 120, interval=0.5, what=f"{lm} copying")

    old = {c: pods(e2e, c) for c in ("operator", "metadata", "agent")}
    assert len(old["operator"]) == 2 and len(old["agent"]) == len(e2e.hosts)
    settings = json.loads(e2e.kubectl("get", "configmap", "-n", e2e.namespace, f"{e2e.release}-settings",
                                      "-o", "json").stdout)["data"]
    new_value = str(int(settings["FERRY_MAX_PARALLEL"]) + 1)
    clock = Stopwatch()
    helm(e2e, "upgrade", e2e.release, "charts/ferry", "--reuse-values",
         "--set", f"settings.maxParallel={new_value}", "--wait", "--timeout", "5m")
    for kind, name in (("deployment", "operator"), ("daemonset", "metadata"), ("daemonset", "agent")):
        e2e.kubectl("rollout", "status", "-n", e2e.namespace, f"{kind}/{e2e.release}-{name}", "--timeout=180s",
                    timeout=190)

    def rolled(component: str, count: int):
        now = pods(e2e, component)
        return len(now) == count and all(now.values()) and not set(now) & set(old[component])
    wait_until(lambda: rolled("agent", len(e2e.hosts)), 180, what="new Ready agent pods on every host")
    roll_seconds = clock()
    wait_until(lambda: rolled("operator", 2), 180, what="two new Ready operator pods")
    wait_until(lambda: rolled("metadata", len(e2e.hosts)), 180, what="new Ready metadata pods on every host")
    phase_after_roll = (migration(e2e, ns, lm).get("status") or {}).get("phase")
    for host in e2e.hosts:
        e2e.kubectl("wait", f"host/{host}", "--for=jsonpath={.status.phase}=Ready", "--timeout=60s", timeout=70)

    # No guest restarted: same pod, no container restart, the write counter went on.
    after = guests(e2e, ns, names)
    restarts = assert_no_guest_restarted(before, after)
    assert all(after[n][3] > before[n][3] for n in names), "a guest stopped writing"

    st = wait_until(lambda: finished(e2e, ns, lm), 240, interval=1, what=f"{lm} finished")
    assert st["phase"] in ("Completed", "Failed"), st
    record = e2e.kubectl("get", "-n", ns, "droplet", "roll-mover", "-o", "jsonpath={.status.host}").stdout
    if st["phase"] == "Failed":
        assert record == mover_source, "a failed migration must leave the droplet on its source"
    else:
        assert record == st["targetHost"]
    # exactly one host runs it: one launcher pod, on the record's node
    wait_until(lambda: [p["spec"]["nodeName"] for p in vm_pods(e2e, ns, "roll-mover")] == [record], 60,
               what="roll-mover's one pod on its record's node")
    figure(e2e, f"helm upgrade rolled {len(e2e.hosts)} agents with {len(names) + 1} droplets running in "
                f"{roll_seconds:.0f}s; guest restarts: {restarts}")
    figure(e2e, f"migration during the roll: phase at the roll's end {phase_after_roll}, outcome {st['phase']}"
                f" {st.get('reason') or ''}, downtime {st.get('downtimeMs')} ms")


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
