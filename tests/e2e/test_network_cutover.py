"""The droplet keeps its address through a migration, measured from outside the nodes.

On the real nodes (hack/nodes-e2e.sh: each node its own network namespace on the bridge ferrybr0,
this test in the machine's namespace at 10.250.0.1), a droplet gets an address on that segment
(FERRY_E2E_DROPLET_SUBNET, e.g. 10.250.0: .200 and up), and a client here sends a UDP probe every
10 ms to its guest's service through the whole migration. It reports probes lost and the longest
gap next to the downtime ferry reports, and checks where the address is on the nodes: on the
source's eth0 before, on the target's after (label eth0:ferry), never on both once it is over. A
cancelled migration leaves the address, and the answers, on the source.

Elsewhere it skips: local dev keeps droplets on loopback addresses, where nothing moves
(tests/integration/test_network.py covers that path)."""

from __future__ import annotations

import datetime as dt
import json
import os

import pytest
from pods import figure
from probe import Probe
from steps import apply_example_hosts, place
from support import wait_until

pytestmark = pytest.mark.e2e

PORT = int(os.environ.get("FERRY_E2E_SIM_SERVICE_PORT", "7077"))


def subnet(e2e) -> str:
    e2e.require_cluster("the network cut-over")
    prefix = os.environ.get("FERRY_E2E_DROPLET_SUBNET", "")
    if not prefix or not e2e.node_exec:
        pytest.skip("needs droplet addresses on the nodes' shared segment (FERRY_E2E_DROPLET_SUBNET, set by "
                    "hack/nodes-e2e.sh) and FERRY_E2E_NODE_EXEC")
    return prefix


def addresses_on(e2e, node: str) -> dict[str, str]:
    out = json.loads(e2e.on_node(node, "ip", "-j", "-4", "addr", "show", "dev", "eth0").stdout)
    return {a["local"]: a.get("label", "") for link in out for a in link.get("addr_info", [])}


def holders(e2e, ip: str) -> list[str]:
    return [h for h in e2e.hosts if ip in addresses_on(e2e, h)]


def migrate(e2e, ns: str, droplet: str, name: str, **spec) -> None:
    e2e.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps({
        "apiVersion": "ferry.dev/v1alpha1", "kind": "LiveMigration", "metadata": {"name": name},
        "spec": {"droplet": droplet, **spec}}))


def lm_status(e2e, ns: str, name: str) -> dict:
    return json.loads(e2e.kubectl("get", "-n", ns, "livemigration", name, "-o", "json").stdout).get("status") or {}


def test_a_client_outside_the_nodes_probes_the_droplet_through_its_migration(e2e, ns):
    ip = f"{subnet(e2e)}.200"
    apply_example_hosts(e2e)
    src = place(e2e, ns, "reach", ip)
    wait_until(lambda: holders(e2e, ip) == [src], 60, what=f"{ip} on {src}'s eth0 only")
    assert addresses_on(e2e, src)[ip] == "eth0:ferry"
    with Probe(ip, PORT) as probe:
        wait_until(lambda: probe.answered_by(src), 60, what=f"the guest answering on {ip}:{PORT} from {src}")
        migrate(e2e, ns, "reach", "move")
        e2e.kubectl("wait", "-n", ns, "livemigration/move", "--for=jsonpath={.status.phase}=Completed",
                    "--timeout=240s", timeout=260)
        st = lm_status(e2e, ns, "move")
        dst = st["targetHost"]
        wait_until(lambda: probe.answered_by(dst), 20, what=f"the guest answering from {dst}")
    r = probe.result()
    net = st.get("networkCutOver") or {}
    where = ""
    if r["switch"] and net.get("movedAt"):  # the gap around the moment the address moved
        moved = dt.datetime.fromisoformat(net["movedAt"].replace("Z", "+00:00")).timestamp()
        last, first = r["switch"]
        where = (f"; last answer from {src} -> address on {dst}: {(moved - last) * 1000:.0f} ms, "
                 f"-> first answer from {dst}: {(first - moved) * 1000:.0f} ms (clocks of one machine)")
    figure(e2e, f"network cut-over (sim, node fabric, {src} -> {dst}): {Probe.line(r)}; reported downtime "
                f"{st.get('downtimeMs')} ms (budget {st.get('downtimeBudgetMs')} ms), guest paused "
                f"{st.get('guestPauseMs')} ms in all; address move {net.get('ms')} ms "
                f"at {net.get('movedAt')}{where}")
    assert r["hosts"] == [src, dst], f"answered by {r['hosts']}: one move, never both"
    assert r["boots"] == [1] and not r["seq_went_back"], r
    assert net.get("address") == ip and net.get("host") == dst and net.get("fabric") == "node"
    assert st["guestPauseMs"] >= st["downtimeMs"], st  # the nodes share the machine's clock
    wait_until(lambda: holders(e2e, ip) == [dst], 30, what=f"{ip} on {dst} only (released on {src})")
    assert addresses_on(e2e, dst)[ip] == "eth0:ferry"
    e2e.kubectl("delete", "-n", ns, "droplet", "reach", "--wait=false")
    wait_until(lambda: holders(e2e, ip) == [], 60, what=f"{ip} released when the droplet is deleted")


def test_a_cancelled_migration_leaves_the_address_on_the_source(e2e, ns):
    ip = f"{subnet(e2e)}.201"
    apply_example_hosts(e2e)
    src = place(e2e, ns, "stay", ip)
    wait_until(lambda: holders(e2e, ip) == [src], 60, what=f"{ip} on {src}")
    with Probe(ip, PORT) as probe:
        wait_until(lambda: probe.answered_by(src), 60, what="the guest answering from the source")
        migrate(e2e, ns, "stay", "stay-move", limits={"bandwidthMiBps": 1})
        e2e.kubectl("wait", "-n", ns, "livemigration/stay-move", "--for=jsonpath={.status.phase}=PreCopy",
                    "--timeout=120s", timeout=130)
        e2e.kubectl("patch", "-n", ns, "livemigration", "stay-move", "--type=merge", "-p", '{"spec":{"cancel":true}}')
        e2e.kubectl("wait", "-n", ns, "livemigration/stay-move", "--for=jsonpath={.status.phase}=Cancelled",
                    "--timeout=120s", timeout=130)
        n = len(probe.answers)
        wait_until(lambda: len(probe.answers) > n + 50, 20, what="the source answering after the cancel")
    r = probe.result()
    figure(e2e, f"cancelled migration (sim, node fabric): {Probe.line(r)}")
    assert r["hosts"] == [src], r
    assert holders(e2e, ip) == [src]
    e2e.kubectl("delete", "-n", ns, "droplet", "stay", "--wait=false")
    wait_until(lambda: holders(e2e, ip) == [], 60, what=f"{ip} released when the droplet is deleted")
