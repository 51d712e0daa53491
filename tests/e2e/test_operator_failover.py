"""Operator failover with the chart's two replicas: the active one is deleted mid-migration;
the standby takes over and the migration completes, the droplet on exactly one host."""

from __future__ import annotations

import json
import os
import time

import pytest
from steps import apply_example_hosts, migration, place, vms_on
from support import wait_until

pytestmark = pytest.mark.e2e


def operator_pods(e2e) -> list[str]:
    out = e2e.kubectl("get", "pods", "-n", e2e.namespace, "-l",
                      f"app.kubernetes.io/instance={e2e.release},app.kubernetes.io/component=operator",
                      "--field-selector", "status.phase=Running", "-o", "jsonpath={.items[*].metadata.name}").stdout
    return out.split()


def peers(e2e) -> dict[str, int]:
    """Live peers of the release's ClusterKopfPeering: identity (the pod name) -> priority."""
    body = json.loads(e2e.kubectl("get", "clusterkopfpeering", e2e.release, "-o", "json").stdout)
    return {identity: info.get("priority", 0) for identity, info in (body.get("status") or {}).items()}


def active_operator(e2e) -> str | None:
    """The running operator pod with the highest priority in the peering: the one that works."""
    running = set(operator_pods(e2e))
    live = {pod: prio for pod, prio in peers(e2e).items() if pod in running}
    return max(live, key=live.get) if live else None


def record(line: str) -> None:
    print(line)
    if os.environ.get("FERRY_E2E_FIGURES"):
        with open(os.environ["FERRY_E2E_FIGURES"], "a") as f:
            f.write(line + "\n")


def test_standby_takes_over_when_the_active_operator_pod_is_deleted(e2e, ns):
    e2e.require_cluster("deleting the active operator pod")
    apply_example_hosts(e2e)
    pods = wait_until(lambda: len(operator_pods(e2e)) == 2 and operator_pods(e2e), 120,
                      what="two running operator pods")
    active = wait_until(lambda: active_operator(e2e), 60, what="an active operator in the peering")
    standby = next(p for p in pods if p != active)
    assert peers(e2e)[standby] < peers(e2e)[active]

    source = place(e2e, ns, "failover-1")
    name = e2e.ferry("-n", ns, "migrate", "failover-1", "--bandwidth", "2").stdout.strip()

    def copying():
        st = migration(e2e, ns, name).get("status") or {}
        return st.get("phase") == "PreCopy" and 0 < (st.get("progress") or 0) < 60
    wait_until(copying, 120, interval=0.5, what=f"{name} copying")
    assert name in e2e.kubectl("logs", "-n", e2e.namespace, active).stdout  # the active one drove it so far

    t0 = time.monotonic()
    e2e.kubectl("delete", "pod", "-n", e2e.namespace, active, "--wait=false")
    # The deleted replica leaves the peering on SIGTERM; the standby is then the live peer with
    # the highest priority, and kopf resumes it on that very change of the peering object.
    wait_until(lambda: active not in peers(e2e) and active_operator(e2e) == standby, 90, interval=0.2,
               what=f"standby {standby} the active operator")
    takeover = time.monotonic() - t0
    e2e.kubectl("wait", "-n", ns, f"livemigration/{name}", "--for=jsonpath={.status.phase}=Completed",
                "--timeout=240s", timeout=250)
    done = time.monotonic() - t0
    # The migration was finished by the replicas still running: the standby (or the Deployment's
    # replacement pod if it drew a higher priority and took over from the standby in turn).
    finisher = [p for p in operator_pods(e2e)
                if f"{name}: CutOver -> Completed" in e2e.kubectl("logs", "-n", e2e.namespace, p).stdout]
    assert finisher and active not in finisher
    record(f"failover: active {active} deleted -> standby {standby} active in {takeover:.1f}s "
           f"-> migration {ns}/{name} Completed {done:.1f}s after the delete (by {', '.join(finisher)})")

    lm = migration(e2e, ns, name)
    target = lm["status"]["targetHost"]
    assert target != source
    assert e2e.kubectl("get", "-n", ns, "droplet", "failover-1", "-o", "jsonpath={.status.host}").stdout == target
    wait_until(lambda: [h for h in e2e.hosts if "failover-1" in vms_on(e2e, h, ns)] == [target], 60,
               what=f"failover-1 running on {target} only")
