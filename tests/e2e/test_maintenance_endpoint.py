"""The maintenance-event endpoint as a droplet sees it: asked from the droplet's own address
on the host it runs on (the metadata DaemonSet's pod on that node answers)."""

from __future__ import annotations

import random

import pytest
from steps import apply_example_hosts, migration, place
from support import wait_until

pytestmark = pytest.mark.e2e


def _get(e2e, node: str, source: str) -> tuple[int, str]:
    """GET the endpoint on NODE from address SOURCE: (status, body)."""
    proc = e2e.on_node(node, "curl", "-s", "--max-time", "5", "--interface", source, "-o", "-",
                       "-w", "\n%{http_code}", f"{e2e.metadata_url}/v1/maintenance_event", check=False)
    body, _, code = proc.stdout.rpartition("\n")
    return int(code or 0), body


def node_ip(e2e, node: str) -> str:
    ip = e2e.kubectl("get", "node", node, "-o",
                     "jsonpath={.status.addresses[?(@.type==\"InternalIP\")].address}").stdout
    assert ip
    return ip


def test_droplet_is_told_live_migrate_during_the_notice(e2e, ns):
    e2e.require_cluster("asking the metadata DaemonSet from a droplet's address on its node")
    apply_example_hosts(e2e)
    # An address from a range nothing on the machine routes; it exists on the node only.
    ip = f"10.253.{random.randint(0, 255)}.{random.randint(2, 254)}"
    host = place(e2e, ns, "asker", ip=ip)
    e2e.on_node(host, "ip", "addr", "add", f"{ip}/32", "dev", "lo")
    try:
        assert _get(e2e, host, ip) == (200, "")

        name = e2e.ferry("-n", ns, "migrate", "asker").stdout.strip()
        def told():  # the phase of the migration when the droplet first hears live_migrate
            if _get(e2e, host, ip) == (200, "live_migrate"):
                return (migration(e2e, ns, name).get("status") or {}).get("phase") or "New"
        phase = wait_until(told, e2e.notice_seconds + 30, interval=0.3, what="live_migrate from the droplet's address")
        # Told during the notice, before any data moved.
        assert phase in ("New", "Pending", "Announced"), phase
        e2e.kubectl("wait", "-n", ns, f"livemigration/{name}", "--for=jsonpath={.status.phase}=Completed",
                    "--timeout=180s", timeout=190)

        # The copy went to the target node's own address (the agents' host network), from
        # another node's.
        lm = migration(e2e, ns, name)
        target = lm["status"]["targetHost"]
        assert target != host
        assert lm["status"]["target"]["address"].rsplit(":", 1)[0] == node_ip(e2e, target) != node_ip(e2e, host)

        # An address that is no droplet's: the node's own.
        assert _get(e2e, host, node_ip(e2e, host))[0] == 404
    finally:
        e2e.on_node(host, "ip", "addr", "del", f"{ip}/32", "dev", "lo", check=False)
