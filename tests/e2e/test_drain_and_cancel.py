"""A user's maintenance: drain a host with `ferry drain`, cancel a migration mid-copy."""

from __future__ import annotations

import pytest
from pods import running_pod, vm_pods
from steps import apply_example_hosts, example_droplet, migration, place, vms_on
from support import wait_until

pytestmark = pytest.mark.e2e


def test_ferry_drain_moves_every_droplet_off_the_host(e2e, ns):
    apply_example_hosts(e2e)
    host = place(e2e, ns, "drain-1")
    e2e.kubectl("apply", "-n", ns, "-f", "-", input=example_droplet("drain-2"))
    e2e.kubectl("wait", "-n", ns, "droplet/drain-2", "--for=jsonpath={.status.phase}=Placed", "--timeout=60s")
    try:
        proc = e2e.ferry("drain", host, "--reason", "e2e drain", "--wait", timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        for name in ("drain-1", "drain-2"):
            now = e2e.kubectl("get", "-n", ns, "droplet", name, "-o", "jsonpath={.status.host}").stdout
            assert now and now != host, f"{name} still on {host}"
        # The agent of the drained host no longer runs them; each runs on exactly one host.
        wait_until(lambda: not vms_on(e2e, host, ns), 60, what=f"no droplet of {ns} left on {host}")
        for name in ("drain-1", "drain-2"):
            assert sum(name in vms_on(e2e, h, ns) for h in e2e.hosts) == 1
        # A cordoned host takes no new droplet.
        assert "maintenance" in e2e.kubectl("get", "host", host, "-o", "jsonpath={.spec}").stdout
    finally:
        e2e.ferry("uncordon", host, check=False)


def test_cancel_mid_copy_keeps_the_droplet_on_its_source(e2e, ns):
    apply_example_hosts(e2e)
    source = place(e2e, ns, "cancel-1")
    source_pod = running_pod(e2e, ns, "cancel-1") if e2e.external else None
    # 1 MiB/s: the example's disk (80 MiB at the tests' size scale) takes over a minute to copy.
    name = e2e.ferry("-n", ns, "migrate", "cancel-1", "--bandwidth", "1").stdout.strip()

    def copying():
        lm = migration(e2e, ns, name)
        st = lm.get("status") or {}
        transfer = st.get("transfer") or {}
        return st.get("phase") == "PreCopy" and transfer.get("state") == "Copying" and (st.get("progress") or 0) > 0
    wait_until(copying, 120, interval=0.5, what=f"{name} copying")

    out = e2e.ferry("-n", ns, "cancel", name).stdout
    assert "cancellation requested" in out
    e2e.kubectl("wait", "-n", ns, f"livemigration/{name}", "--for=jsonpath={.status.phase}=Cancelled",
                "--timeout=120s", timeout=130)
    lm = migration(e2e, ns, name)
    assert (lm["status"].get("progress") or 0) < 100
    assert e2e.kubectl("get", "-n", ns, "droplet", "cancel-1", "-o", "jsonpath={.status.host}").stdout == source
    target = lm["status"].get("targetHost")
    assert target and target != source
    # Still running where it was, and nowhere else (the target's incoming copy is gone).
    wait_until(lambda: "cancel-1" in vms_on(e2e, source, ns) and "cancel-1" not in vms_on(e2e, target, ns), 60,
               what=f"cancel-1 only on {source}")
    if e2e.external:  # the chart's launcher pods: the target's pod is gone, the source's never changed
        wait_until(lambda: [p["spec"]["nodeName"] for p in vm_pods(e2e, ns, "cancel-1")] == [source], 60,
                   what=f"cancel-1's one pod on {source}")
        [pod] = vm_pods(e2e, ns, "cancel-1")
        assert pod["metadata"]["uid"] == source_pod["metadata"]["uid"]
