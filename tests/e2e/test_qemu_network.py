"""A qemu guest's own NIC through a live migration between two real nodes, measured from outside.

On the real nodes with the qemu driver (``FERRY_NODES_QEMU=1 hack/nodes-e2e.sh``: the release sets
``agent.network.vmBridge: ferryvm``, a bridge in each node's namespace that is a port of the
segment ``ferrybr0``), a droplet with an address on that segment gets a virtio-net NIC on a tap of
its node's VM bridge; the guest holds the address itself. This test, in the machine's namespace
on ``ferrybr0`` (outside the nodes), sends an ICMP echo request every 10 ms and a TCP request every
10 ms (on one connection to the guest's echo service, port 7078), and keeps one more TCP
connection open from before the migration to after it. It reports probes lost, the longest gap
and silence next to the reported downtime, and the long-lived connection's fate (it should
survive: the guest's TCP state moves with its memory).

Elsewhere it skips (the sim driver's release, or no droplet subnet on the nodes' segment).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import time

import pytest
from pods import blame_guest_kernel, figure, running_pod
from probe import IcmpProbe, LongLivedTcp, TcpProbe
from steps import apply_example_hosts
from support import wait_until

pytestmark = pytest.mark.e2e

TCP_PORT = 7078
VM_BRIDGE = "ferryvm"


def _echo_once(ip: str) -> bool:
    with contextlib.suppress(OSError):
        return LongLivedTcp(ip, TCP_PORT, timeout=1).check() == "survived"
    return False


def taps_on(e2e, node: str) -> dict[str, dict]:
    """ferry's tap devices in NODE's network namespace: name -> link (master, owner)."""
    out = json.loads(e2e.on_node(node, "ip", "-j", "-d", "link", "show").stdout)
    return {link["ifname"]: link for link in out if link["ifname"].startswith("ft")}


def eth0_addresses(e2e, node: str) -> set[str]:
    out = json.loads(e2e.on_node(node, "ip", "-j", "-4", "addr", "show", "dev", "eth0").stdout)
    return {a["local"] for link in out for a in link.get("addr_info", [])}


def qemu_droplet_with_address(e2e, ns: str, name: str, host_part: int) -> tuple[str, dict]:
    """Create droplet NAME with the address .HOST_PART of the nodes' droplet subnet on the qemu
    release, and return (its address, its running launcher pod); skip where the release or the
    nodes cannot give a guest a routable address."""
    e2e.require_cluster("the qemu guest's NIC")
    if os.environ.get("FERRY_E2E_DRIVER") != "qemu":
        pytest.skip("the release runs the sim driver: FERRY_NODES_QEMU=1 hack/nodes-e2e.sh runs this test")
    prefix = os.environ.get("FERRY_E2E_DROPLET_SUBNET", "")
    if not prefix or not e2e.node_exec:
        pytest.skip("needs droplet addresses on the nodes' segment (FERRY_E2E_DROPLET_SUBNET) and FERRY_E2E_NODE_EXEC")
    ip = f"{prefix}.{host_part}"
    apply_example_hosts(e2e)
    e2e.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps({
        "apiVersion": "ferry.dev/v1alpha1", "kind": "Droplet", "metadata": {"name": name},
        "spec": {"size": "s-1vcpu-1gb", "datacenter": os.environ.get("FERRY_E2E_DATACENTER", "nyc3"), "ip": ip}}))
    pod = wait_until(lambda: running_pod(e2e, ns, name), 180, what=f"{ns}/{name}'s QEMU in its pod")
    return ip, pod


def test_a_qemu_guest_keeps_its_address_ping_and_tcp_connections_through_a_migration(e2e, ns):
    name = "qnet"
    ip, pod = qemu_droplet_with_address(e2e, ns, name, 210)
    source = pod["spec"]["nodeName"]
    # what the launcher pod needs for the NIC: /dev/net/tun, and still no capability at all
    [c] = pod["spec"]["containers"]
    assert {"name": "tun", "hostPath": {"path": "/dev/net/tun", "type": "CharDevice"}} in pod["spec"]["volumes"]
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]} and not c["securityContext"].get("privileged")
    assert any(a.startswith("tap,id=net0,ifname=ft") for a in c["command"])
    wait_until(lambda: _echo_once(ip), 240, interval=1, what=f"the guest's echo service on {ip}:{TCP_PORT}")
    [tap] = taps_on(e2e, source).values()
    assert tap.get("master") == VM_BRIDGE, tap
    assert ip not in eth0_addresses(e2e, source)  # the guest's address, not the node's

    long_lived = LongLivedTcp(ip, TCP_PORT)
    with IcmpProbe(ip) as ping, TcpProbe(ip, TCP_PORT) as tcp:
        wait_until(lambda: len(ping.answers) >= 50 and len(tcp.answers) >= 50, 30, what="probes answered")
        lm = e2e.ferry("-n", ns, "migrate", name).stdout.strip()
        e2e.kubectl("wait", "-n", ns, f"livemigration/{lm}", "--for=jsonpath={.status.phase}=Completed",
                    "--timeout=300s", timeout=320)
        done = time.monotonic()
        st = json.loads(e2e.kubectl("get", "-n", ns, "livemigration", lm, "-o", "json").stdout)["status"]
        target = st["targetHost"]
        with blame_guest_kernel(e2e, ns, name):
            wait_until(lambda: ping.answered_since(done) >= 100 and tcp.answered_since(done) >= 100, 60,
                       what=f"answers from the guest on {target}")
    fate = long_lived.check()
    icmp, tcp_r = ping.result(), tcp.result()
    net = st.get("networkCutOver") or {}
    where = ""
    if net.get("movedAt"):  # the ICMP silence around the moment the target announced the MAC
        moved = dt.datetime.fromisoformat(net["movedAt"].replace("Z", "+00:00")).timestamp()
        last, first = icmp["silence"]
        where = (f"; last ping answer -> announce-self done: {(moved - last) * 1000:.0f} ms, -> first answer after: "
                 f"{(first - moved) * 1000:.0f} ms (clocks of one machine)")
    figure(e2e, f"qemu guest NIC ({source} -> {target}): {IcmpProbe.line(icmp)}; {TcpProbe.line(tcp_r)} "
                f"(connection errors {tcp_r['connection_errors']}); reported downtime {st.get('downtimeMs')} ms "
                f"(budget {st.get('downtimeBudgetMs')} ms), guest paused {st.get('guestPauseMs')} ms in all; cut-over {net.get('fabric')} {net.get('ms')} ms at "
                f"{net.get('movedAt')}{where}; long-lived TCP connection (opened before, used after): {fate}")
    assert fate == "survived"
    assert tcp_r["connection_errors"] == []
    assert net.get("fabric") == "guest-nic/announce-self" and net.get("address") == ip, net
    # the tap went with the source's VM; the target's is on its VM bridge
    wait_until(lambda: not taps_on(e2e, source), 60, what=f"the tap gone from {source}")
    [tap] = taps_on(e2e, target).values()
    assert tap.get("master") == VM_BRIDGE
    assert ip not in eth0_addresses(e2e, target)
    e2e.kubectl("delete", "-n", ns, "droplet", name, "--wait=false")
    wait_until(lambda: not taps_on(e2e, target), 120, what=f"the tap gone from {target} with the droplet")


def test_a_cancelled_qemu_migration_leaves_the_guest_answering_on_the_source(e2e, ns):
    name = "qstay"
    ip, pod = qemu_droplet_with_address(e2e, ns, name, 211)
    source = pod["spec"]["nodeName"]
    wait_until(lambda: _echo_once(ip), 240, interval=1, what=f"the guest's echo service on {ip}:{TCP_PORT}")
    [source_tap] = taps_on(e2e, source)
    long_lived = LongLivedTcp(ip, TCP_PORT)
    with IcmpProbe(ip) as ping, TcpProbe(ip, TCP_PORT) as tcp:
        wait_until(lambda: len(ping.answers) >= 50, 30, what="ping answered")
        e2e.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps({
            "apiVersion": "ferry.dev/v1alpha1", "kind": "LiveMigration", "metadata": {"name": "qstay-move"},
            "spec": {"droplet": name, "limits": {"bandwidthMiBps": 1}}}))
        e2e.kubectl("wait", "-n", ns, "livemigration/qstay-move", "--for=jsonpath={.status.phase}=PreCopy",
                    "--timeout=180s", timeout=190)
        target = json.loads(e2e.kubectl("get", "-n", ns, "livemigration", "qstay-move", "-o", "json").stdout
                            )["status"].get("targetHost")
        # the target's QEMU waits for the stream on its own tap meanwhile
        if target:
            wait_until(lambda: taps_on(e2e, target), 60, what=f"the target's tap on {target}")
        e2e.kubectl("patch", "-n", ns, "livemigration", "qstay-move", "--type=merge", "-p", '{"spec":{"cancel":true}}')
        e2e.kubectl("wait", "-n", ns, "livemigration/qstay-move", "--for=jsonpath={.status.phase}=Cancelled",
                    "--timeout=120s", timeout=130)
        after = time.monotonic()
        wait_until(lambda: ping.answered_since(after) >= 100 and tcp.answered_since(after) >= 100, 30,
                   what="the guest answering on the source after the cancel")
    fate = long_lived.check()
    icmp, tcp_r = ping.result(), tcp.result()
    figure(e2e, f"cancelled qemu migration ({source} -> {target}, cancelled in PreCopy): {IcmpProbe.line(icmp)}; "
                f"{TcpProbe.line(tcp_r)}; long-lived TCP connection: {fate}")
    assert fate == "survived" and tcp_r["connection_errors"] == []
    assert list(taps_on(e2e, source)) == [source_tap]  # the guest, its tap and its address stay on the source
    if target:
        wait_until(lambda: not taps_on(e2e, target), 60, what=f"the cancelled target's tap gone from {target}")
    assert running_pod(e2e, ns, name)["spec"]["nodeName"] == source
    e2e.kubectl("delete", "-n", ns, "droplet", name, "--wait=false")
    wait_until(lambda: not taps_on(e2e, source), 120, what=f"the tap gone from {source} with the droplet")
