"""Each droplet's VM in its own pod (the chart's `agent.launcher: pod`): what the pod asks of its
node against the Host's accounting, and an agent pod force-deleted in the middle of a copy."""

from __future__ import annotations

import json

import pytest
from pods import (Stopwatch, assert_no_guest_restarted, create_droplet, figure, finished, guests, memory_bytes,
                  running_pod, vm_pods)
from steps import apply_example_hosts, migration
from support import wait_until

pytestmark = pytest.mark.e2e

SIZES = {"s-1vcpu-1gb": (1, 1024), "s-2vcpu-4gb": (2, 4096), "s-4vcpu-8gb": (4, 8192)}


def cpu_millis(q: str) -> int:
    return int(q[:-1]) if q.endswith("m") else int(float(q) * 1000)


def test_each_droplet_has_a_pod_on_its_host_asking_its_size_times_the_scale(e2e, ns):
    e2e.require_cluster("launcher pods")
    apply_example_hosts(e2e)
    scale = float(__import__("os").environ.get("FERRY_E2E_SIZE_SCALE", "1"))
    for i, size in enumerate(SIZES):
        create_droplet(e2e, ns, f"size-{i}", size=size, ip=f"127.0.4.{i + 1}")
    for i, (size, (cpu, mem)) in enumerate(SIZES.items()):
        name = f"size-{i}"
        pod = wait_until(lambda n=name: running_pod(e2e, ns, n), 120, what=f"{ns}/{name} in its pod")
        droplet = json.loads(e2e.kubectl("get", "-n", ns, "droplet", name, "-o", "json").stdout)
        # owned by the Droplet, on the node its placement record names
        [owner] = pod["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"]) == ("Droplet", name, droplet["metadata"]["uid"])
        assert pod["spec"]["nodeName"] == droplet["status"]["host"]
        requests = pod["spec"]["containers"][0]["resources"]["requests"]
        assert "limits" not in pod["spec"]["containers"][0]["resources"]
        want_cpu, want_mem = max(1, round(cpu * scale * 1000)), max(1 << 20, round(mem * scale * (1 << 20)))
        assert (cpu_millis(requests["cpu"]), memory_bytes(requests["memory"])) == (want_cpu, want_mem)
        figure(e2e, f"launcher pod of {size}: requests cpu {requests['cpu']} memory {requests['memory']} "
                    f"= Host accounting {cpu} vCPU / {mem} MiB x sizeScale {scale}")
    # per node: the scheduler's sum of launcher requests == the Host's allocation x scale (every
    # droplet of every namespace counts in both; droplets of an earlier test's namespace may still
    # be going, so wait until both views settle)
    def per_node() -> dict[str, tuple[int, int, int, dict]]:
        pods = [p for p in json.loads(e2e.kubectl("get", "pods", "-A", "-l", "app.kubernetes.io/component=vm",
                                                  "-o", "json").stdout)["items"]
                if p["status"].get("phase") in ("Pending", "Running") and not p["metadata"].get("deletionTimestamp")]
        out = {}
        for host in e2e.hosts:
            allocated = (json.loads(e2e.kubectl("get", "host", host, "-o", "json").stdout).get("status") or {}) \
                .get("allocated") or {}
            on_node = [p["spec"]["containers"][0]["resources"]["requests"] for p in pods
                       if p["spec"]["nodeName"] == host]
            out[host] = (len(on_node), sum(cpu_millis(r["cpu"]) for r in on_node),
                         sum(memory_bytes(r["memory"]) for r in on_node), allocated)
        return out

    def agree(view) -> bool:
        # each pod rounds its own share (at least 1m / 1 MiB): equal within one unit per pod
        return all(abs(cpu - a.get("cpu", 0) * scale * 1000) <= n
                   and abs(mem - a.get("memoryMiB", 0) * scale * (1 << 20)) <= n * (1 << 20)
                   for n, cpu, mem, a in view.values())
    view = wait_until(lambda: (lambda v: v if agree(v) else None)(per_node()), 120, interval=1,
                      what="VM pod requests per node == Host allocation x scale")
    for host, (n, cpu, mem, allocated) in view.items():
        figure(e2e, f"node {host}: {n} VM pods request cpu {cpu}m memory {mem / (1 << 20):.2f} MiB; "
                    f"Host allocated {allocated} x {scale}")


def test_agent_pod_force_deleted_mid_precopy(e2e, ns):
    """`kubectl delete pod --grace-period=0 --force` of the source's agent while it copies: the
    VMs and their copy live in their own pods; the new agent re-attaches and the migration
    ends cleanly (completed, or failed with the source intact); no guest restarted."""
    e2e.require_cluster("agent pods")
    apply_example_hosts(e2e)
    names = ["fd-0", "fd-1", "fd-2"]
    for i, name in enumerate(names):
        create_droplet(e2e, ns, name, size="s-1vcpu-1gb", ip=f"127.0.5.{i + 1}", rate_kibps=256)
    create_droplet(e2e, ns, "fd-mover", size="s-1vcpu-2gb", ip="127.0.5.99")
    for name in [*names, "fd-mover"]:
        wait_until(lambda n=name: running_pod(e2e, ns, n), 120, what=f"{ns}/{name} running in its pod")
    source = e2e.kubectl("get", "-n", ns, "droplet", "fd-mover", "-o", "jsonpath={.status.host}").stdout
    bystanders = [n for n in names if running_pod(e2e, ns, n)["spec"]["nodeName"] == source] or names
    before = guests(e2e, ns, names)
    lm = e2e.ferry("-n", ns, "migrate", "fd-mover", "--bandwidth", "1").stdout.strip()

    def copying():
        st = migration(e2e, ns, lm).get("status") or {}
        return st.get("phase") == "PreCopy" and (st.get("transfer") or {}).get("state") == "Copying" \
            and (st.get("progress") or 0) > 0
    wait_until(copying, 120, interval=0.5, what=f"{lm} copying")
    agent = json.loads(e2e.kubectl("get", "pods", "-n", e2e.namespace, "-l",
                                   f"app.kubernetes.io/instance={e2e.release},app.kubernetes.io/component=agent",
                                   "--field-selector", f"spec.nodeName={source}", "-o", "json").stdout)["items"]
    [agent] = [a for a in agent if not a["metadata"].get("deletionTimestamp")]
    clock = Stopwatch()
    e2e.kubectl("delete", "pod", "-n", e2e.namespace, agent["metadata"]["name"], "--grace-period=0", "--force")
    st = wait_until(lambda: finished(e2e, ns, lm), 240, interval=1, what=f"{lm} finished")
    assert st["phase"] in ("Completed", "Failed"), st
    record = e2e.kubectl("get", "-n", ns, "droplet", "fd-mover", "-o", "jsonpath={.status.host}").stdout
    assert record == (st["targetHost"] if st["phase"] == "Completed" else source)
    wait_until(lambda: [p["spec"]["nodeName"] for p in vm_pods(e2e, ns, "fd-mover")] == [record], 60,
               what="fd-mover's one pod on its record's node")
    after = guests(e2e, ns, names)
    restarts = assert_no_guest_restarted(before, after)
    assert all(after[n][3] > before[n][3] for n in names), "a guest stopped writing"
    figure(e2e, f"agent pod of {source} force-deleted mid-PreCopy: migration {st['phase']} {st.get('reason') or ''} "
                f"after {clock():.0f}s, downtime {st.get('downtimeMs')} ms; {len(names)} guests "
                f"({len(bystanders)} on {source}) still running, restarts {restarts}")


def test_kubectl_drain_migrates_every_droplet_off_the_node(e2e, ns):
    """`kubectl drain NODE`: the cordon puts the Host into maintenance, ferry live-migrates its
    droplets, each launcher pod (kept from eviction by its PodDisruptionBudget) goes when its
    droplet has left, and drain ends with the node empty; no guest rebooted; uncordon ends the
    maintenance."""
    e2e.require_cluster("kubectl drain of a host node")
    apply_example_hosts(e2e)
    names = [f"dr-{i}" for i in range(4)]
    for i, name in enumerate(names):
        create_droplet(e2e, ns, name, size="s-1vcpu-1gb", ip=f"127.0.6.{i + 1}", rate_kibps=256)
    for name in names:
        wait_until(lambda n=name: running_pod(e2e, ns, n), 120, what=f"{ns}/{name} running in its pod")
    before = guests(e2e, ns, names)
    nodes = [node for _, node, _, _ in before.values()]
    node = max(set(nodes), key=nodes.count)
    on_node = [n for n in names if before[n][1] == node]
    clock = Stopwatch()
    try:
        proc = e2e.kubectl("drain", node, "--ignore-daemonsets", "--delete-emptydir-data", "--timeout=300s",
                           timeout=330, check=False)
        drained = clock()
        assert proc.returncode == 0, proc.stdout + proc.stderr
        host = json.loads(e2e.kubectl("get", "host", node, "-o", "json").stdout)
        assert (host["spec"].get("maintenance") or {}).get("reason") == "node cordoned"
        outcomes = []
        for name in on_node:
            record = e2e.kubectl("get", "-n", ns, "droplet", name, "-o", "jsonpath={.status.host}").stdout
            assert record and record != node, f"{name} still on {node}"
            wait_until(lambda n=name, r=record: [p["spec"]["nodeName"] for p in vm_pods(e2e, ns, n)] == [r], 60,
                       what=f"{name}'s one pod on {record}")
            last = json.loads(e2e.kubectl("get", "-n", ns, "droplet", name, "-o", "json").stdout)["status"] \
                .get("lastMigration") or {}
            outcomes.append(f"{name} {node}->{record} downtime {last.get('downtimeMs')} ms")
        assert not vm_pods(e2e, ns) or all(p["spec"]["nodeName"] != node for p in vm_pods(e2e, ns))
        # the moved guests went on where they were (their write counters continued), the others untouched
        after = guests(e2e, ns, names)
        assert all(after[n][3] > before[n][3] for n in names), (before, after)
        assert_no_guest_restarted({n: v for n, v in before.items() if n not in on_node},
                                  {n: v for n, v in after.items() if n not in on_node})
        figure(e2e, f"kubectl drain {node}: {len(on_node)} droplets migrated off in {drained:.0f}s "
                    f"(drain to completion); " + "; ".join(outcomes))
    finally:
        e2e.kubectl("uncordon", node, check=False)
    wait_until(lambda: not json.loads(e2e.kubectl("get", "host", node, "-o", "json").stdout)["spec"].get("maintenance"),
               60, what=f"uncordon ended {node}'s maintenance")
