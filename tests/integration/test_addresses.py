"""Two droplets claiming one address: the older keeps it, the newer is flagged (condition and
Warning Event) and hears nothing from the metadata endpoint until the address is its own.

The operator, agents and metadata endpoint run as processes against the real API server;
the endpoint is asked from the address itself, as a droplet would."""

from __future__ import annotations

import pytest
from stack import Stack
from support import wait_until
from test_metadata import query

pytestmark = pytest.mark.integration

IP = "127.0.0.41"


@pytest.fixture
def stack(ferry_process, kubectl, namespace):
    s = Stack(ferry_process, kubectl, namespace, env={"FERRY_NOTICE_SECONDS": "600"})
    yield s
    s.close()


def _condition(stack: Stack, droplet: str) -> dict | None:
    conds = (stack.get("droplet", droplet).get("status") or {}).get("conditions") or []
    return next((c for c in conds if c["type"] == "AddressConflict"), None)


def test_a_second_droplet_on_a_taken_address_is_flagged_until_the_address_is_free(stack):
    stack.host("a"), stack.host("b")
    stack.start_operator()
    stack.start_metadata()
    stack.wait_hosts_ready()
    stack.droplet("first", ip=IP)
    stack.wait_running("first")
    stack.droplet("second", ip=IP)

    flagged = wait_until(lambda: (c := _condition(stack, "second")) and c["status"] == "True" and c,
                         30, what="AddressConflict on the newer droplet")
    assert flagged["reason"] == "AddressInUse"
    assert f"{stack.ns}/first" in flagged["message"], flagged
    warnings = [e for e in stack.events("Droplet", "second") if e["reason"] == "AddressConflict"]
    assert warnings and warnings[0]["type"] == "Warning", warnings
    assert _condition(stack, "first") is None, "the owner of the address is not flagged"
    stack.wait_running("second")  # flagged, not refused: it is placed and runs

    # The newer droplet is told of its maintenance by annotation, but the address answers for
    # the older one: exactly what the condition warns about.
    stack.migrate("second")
    wait_until(lambda: stack.lm().get("phase") == "Announced", 30, what="second Announced")
    assert query(stack.metadata_port, IP).body == ""

    stack.kubectl("delete", "droplet", "first", "-n", stack.ns, "--wait=true")
    cleared = wait_until(lambda: (c := _condition(stack, "second")) and c["status"] == "False" and c,
                         30, what="AddressConflict cleared once the older droplet is gone")
    assert cleared["reason"] == "AddressUnique"
    assert any(e["reason"] == "AddressConflictResolved" for e in stack.events("Droplet", "second"))
    wait_until(lambda: query(stack.metadata_port, IP).body == "live_migrate", 10,
               what="the address now answers for the droplet that holds it")
