"""The qemu driver in launcher pods on real nodes: a booted test guest survives its agent pod's
forced deletion (the new agent re-attaches) and live-migrates between two nodes. Its pods move (the target's pod is created on the target node while the source's still
runs, the source's is deleted only after the placement record names the target), the guest's
counter goes on (no second boot), and the Hosts' accounting follows it.

Opt-in: the release must run the qemu driver with the test guest on every node, as
``FERRY_NODES_QEMU=1 hack/nodes-e2e.sh`` sets it up (it then runs only this file and tells it
``FERRY_E2E_DRIVER=qemu``). Everything here is what a user can see: kubectl, ``ferry``, and the
guest's serial console read inside its pod.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re

import pytest
from guest_console import BOOT_BANNER, counters_in
from pods import Stopwatch, blame_guest_kernel, figure, finished, memory_bytes, qemu_serial, running_pod, vm_pods
from steps import apply_example_hosts
from support import wait_until

pytestmark = pytest.mark.e2e

SIZE, CPU, MEMORY_MIB = "s-1vcpu-1gb", 1, 1024


serial, counters = qemu_serial, counters_in


def in_pod(e2e, pod: dict, *cmd: str) -> str:
    return e2e.kubectl("exec", "-n", pod["metadata"]["namespace"], pod["metadata"]["name"], "-c", "vm", "--",
                       *cmd, timeout=60).stdout


def agent_pod(e2e, node: str) -> dict | None:
    items = json.loads(e2e.kubectl("get", "pods", "-n", e2e.namespace, "-l",
                                   f"app.kubernetes.io/instance={e2e.release},app.kubernetes.io/component=agent",
                                   "--field-selector", f"spec.nodeName={node}", "-o", "json").stdout)["items"]
    live = [a for a in items if not a["metadata"].get("deletionTimestamp")]
    return live[0] if len(live) == 1 else None


def ready(pod: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


def host_status(e2e, host: str) -> dict:
    return json.loads(e2e.kubectl("get", "host", host, "-o", "json").stdout).get("status") or {}


def test_a_booted_qemu_guest_migrates_between_two_nodes_in_its_pods(e2e, ns):
    e2e.require_cluster("the qemu driver in launcher pods")
    if os.environ.get("FERRY_E2E_DRIVER") != "qemu":
        pytest.skip("the release runs the sim driver: FERRY_NODES_QEMU=1 hack/nodes-e2e.sh runs this test")
    apply_example_hosts(e2e)
    scale = float(os.environ.get("FERRY_E2E_SIZE_SCALE", "1"))
    name = "qvm"
    e2e.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps({
        "apiVersion": "ferry.dev/v1alpha1", "kind": "Droplet", "metadata": {"name": name},
        "spec": {"size": SIZE, "datacenter": os.environ.get("FERRY_E2E_DATACENTER", "nyc3"), "ip": "127.0.7.1"}}))
    boot = Stopwatch()
    pod = wait_until(lambda: running_pod(e2e, ns, name), 180, what=f"{ns}/{name}'s QEMU in its pod")
    source = e2e.kubectl("get", "-n", ns, "droplet", name, "-o", "jsonpath={.status.host}").stdout
    [c] = pod["spec"]["containers"]
    assert pod["spec"]["nodeName"] == source
    assert os.path.basename(c["command"][0]).startswith("qemu-system-") and "-daemonize" not in c["command"]
    sc = c["securityContext"]
    assert not sc.get("privileged") and sc["capabilities"] == {"drop": ["ALL"]} and sc["allowPrivilegeEscalation"] is False
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True and not pod["spec"].get("hostPID")
    assert "limits" not in c["resources"]
    wait_until(lambda: len(counters(serial(e2e, pod))) >= 3, 180, interval=2, what="the guest to boot and count")
    booted = boot()
    # what QEMU uses in its pod (it is the container's PID 1) against what the pod requests
    status = in_pod(e2e, pod, "cat", "/proc/1/status")
    rss_kib = int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE).group(1))
    comm = in_pod(e2e, pod, "cat", "/proc/1/comm").strip()
    assert comm.startswith("qemu-system"), comm
    requests = c["resources"]["requests"]
    # the container requests the droplet's size x scale (the Host's accounting); what QEMU uses
    # beyond it is the pod's overhead (its RuntimeClass), which the scheduler adds
    assert memory_bytes(requests["memory"]) == max(1 << 20, round(MEMORY_MIB * scale * (1 << 20)))
    overhead = pod["spec"].get("overhead") or {}
    figure(e2e, f"qemu launcher pod of {SIZE} (sizeScale {scale}): requests cpu {requests['cpu']} memory "
                f"{requests['memory']} + pod overhead {overhead} (RuntimeClass {pod['spec'].get('runtimeClassName')}), "
                f"no limits; QEMU (TCG) is the pod's PID 1, RSS {rss_kib / 1024:.0f} MiB once booted; "
                f"guest counting {booted:.0f}s after the Droplet was created")
    source_pod_uid = pod["metadata"]["uid"]

    # the source's agent pod force-deleted: QEMU lives in its own pod, the new agent re-attaches
    # to it (monitor socket and pid file lock in the data directory) and drives the migration
    counted = counters(serial(e2e, pod))[-1]
    old_agent = agent_pod(e2e, source)
    restart = Stopwatch()
    e2e.kubectl("delete", "pod", "-n", e2e.namespace, old_agent["metadata"]["name"], "--grace-period=0", "--force")
    wait_until(lambda: (lambda a: a if a and a["metadata"]["name"] != old_agent["metadata"]["name"]
                                    and ready(a) else None)(agent_pod(e2e, source)), 120, interval=1,
               what=f"a new agent pod on {source}")
    # a heartbeat written well after the new pod was Ready: by the new agent (the old one's
    # container is killed by its kubelet within seconds of the forced deletion)
    since = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=5)

    def reattached():
        st = host_status(e2e, source).get("agent") or {}
        vms = {v["name"]: v for v in st.get("vms") or [] if v.get("namespace") == ns}
        beat = dt.datetime.fromisoformat(st["heartbeatTime"]) if st.get("heartbeatTime") else None
        return vms.get(name) if beat and beat > since and vms.get(name, {}).get("state") == "Running" else None
    vm = wait_until(reattached, 120, interval=1, what=f"the new agent of {source} reporting {name} Running")
    took = restart()
    assert not vm.get("restarts"), vm
    still = running_pod(e2e, ns, name)
    assert still is not None and still["metadata"]["uid"] == source_pod_uid  # the same pod, the same QEMU
    assert sum(cs.get("restartCount", 0) for cs in still["status"].get("containerStatuses") or []) == 0
    text = serial(e2e, still)
    assert text.count(BOOT_BANNER) == 1 and counters(text)[-1] > counted, (counted, counters(text)[-5:])
    figure(e2e, f"agent pod of {source} force-deleted with the qemu guest running: new agent reported it "
                f"Running (same pod, no reboot, counter {counted} -> {counters(text)[-1]}) {took:.1f}s later")

    before_alloc = {h: dict(host_status(e2e, h).get("allocated") or {}) for h in e2e.hosts}
    last_before = counters(serial(e2e, pod))[-1]

    lm = e2e.ferry("-n", ns, "migrate", name).stdout.strip()
    clock = Stopwatch()
    samples: list[tuple[str, tuple[tuple[str, str], ...]]] = []  # (record, ((node, pod uid), ...))

    def sample():
        record = e2e.kubectl("get", "-n", ns, "droplet", name, "-o", "jsonpath={.status.host}").stdout
        pods = tuple(sorted((p["spec"]["nodeName"], p["metadata"]["uid"]) for p in vm_pods(e2e, ns, name)))
        samples.append((record, pods))
        return finished(e2e, ns, lm)
    st = wait_until(sample, 300, interval=0.3, what=f"{lm} finished")
    total = clock()
    assert st["phase"] == "Completed", st
    target = st["targetHost"]
    assert target != source and target in e2e.hosts
    record = e2e.kubectl("get", "-n", ns, "droplet", name, "-o", "jsonpath={.status.host}").stdout
    assert record == target
    # the target's pod was created on the target node while the source's ran and the record named the source
    assert any(rec == source and {n for n, _ in pods} == {source, target} for rec, pods in samples), samples
    # the source's pod went only after the record named the target
    for rec, pods in samples:
        if rec == source:
            assert (source, source_pod_uid) in pods, f"source pod gone while the record named {source}: {samples}"
    new = wait_until(lambda: (lambda ps: ps[0] if len(ps) == 1 and ps[0]["spec"]["nodeName"] == target else None)(
        vm_pods(e2e, ns, name)), 60, what=f"{name}'s one pod on {target}")
    assert new["metadata"]["uid"] != source_pod_uid
    # the same guest goes on counting on the target: no boot banner, counters past the source's
    with blame_guest_kernel(e2e, ns, name):
        wait_until(lambda: len(counters(serial(e2e, new))) >= 5, 60, interval=1, what="the guest counting on the target")
        text = serial(e2e, new)
        assert BOOT_BANNER not in text, text[:2000]
        after = counters(text)
        assert after[0] > last_before and after == sorted(after), (last_before, after[:10])
    # Hosts' accounting: the droplet's size left the source's allocation and joined the target's,
    # and the pod on the target requests that size times the scale
    def moved():
        now = {h: host_status(e2e, h).get("allocated") or {} for h in (source, target)}
        return now if (now[source].get("cpu", 0) == before_alloc[source].get("cpu", 0) - CPU
                       and now[target].get("cpu", 0) == before_alloc[target].get("cpu", 0) + CPU
                       and now[source].get("memoryMiB", 0) == before_alloc[source].get("memoryMiB", 0) - MEMORY_MIB
                       and now[target].get("memoryMiB", 0) == before_alloc[target].get("memoryMiB", 0) + MEMORY_MIB) \
            else None
    alloc = wait_until(moved, 60, interval=1, what="the Hosts' allocations to follow the droplet")
    assert new["spec"]["containers"][0]["resources"]["requests"] == requests
    figure(e2e, f"qemu guest {source} -> {target}: Completed in {total:.1f}s (ferry migrate to Completed), "
                f"downtime {st.get('downtimeMs')} ms (verify {((st.get('transfer') or {}).get('verifyMs'))} ms), "
                f"{(st.get('transfer') or {}).get('bytesSent')} bytes sent; counter {last_before} before -> "
                f"{after[0]} first on the target, no reboot; allocated {source} {before_alloc[source]} -> "
                f"{alloc[source]}, {target} {before_alloc[target]} -> {alloc[target]}; "
                f"pod samples {len(samples)}, both pods seen while the record named {source}: "
                f"{sum(1 for rec, p in samples if rec == source and len(p) == 2)}")
    # QEMU's memory beyond the scaled size is covered by the pod's overhead (checked last: the
    # figures above hold either way)
    assert overhead.get("memory"), f"no pod overhead: {pod['spec'].get('runtimeClassName')}"
    assert rss_kib * 1024 <= memory_bytes(requests["memory"]) + memory_bytes(overhead["memory"]), (rss_kib, overhead)
