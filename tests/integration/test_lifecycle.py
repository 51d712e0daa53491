"""The operator, agents (sim driver) and the real API server together: the LiveMigration
lifecycle end to end, with DESIGN's invariants checked on the way."""

from __future__ import annotations

import signal

import pytest
from stack import Stack
from support import wait_until


@pytest.fixture
def stack(ferry_process, kubectl, namespace):
    s = Stack(ferry_process, kubectl, namespace)
    yield s
    s.close()


def test_live_migration_completes_and_moves_the_record(stack):
    a, b = stack.host("a"), stack.host("b")
    stack.start_operator()
    stack.wait_hosts_ready()
    stack.droplet("web", write_kibps=512)
    src = stack.wait_running("web")
    stack.migrate("web")
    st = stack.wait_phase("move", "Completed", timeout=120)
    dst = b if src == a else a
    assert st["sourceHost"] == src and st["targetHost"] == dst
    d = stack.get("droplet", "web")
    assert d["status"]["host"] == dst
    assert d["metadata"]["labels"]["ferry.dev/host"] == dst
    assert "ferry.dev/maintenance-event" not in (d["metadata"].get("annotations") or {})
    assert st["transfer"]["digest"] and st["transfer"]["digest"] == st["target"]["digest"]
    assert st["progress"] == 100
    # exactly one host runs it: the target, and the source copy is gone
    wait_until(lambda: stack.vms_on(dst).get(f"{stack.ns}/web") == "Running" and
               f"{stack.ns}/web" not in stack.vms_on(src), 30, what="source copy destroyed, target running")
    for phase in ("Pending", "Announced", "Scheduling", "Preparing", "PreCopy", "CutOver", "Completed"):
        assert phase in st["phaseTimes"], phase
    reasons = {e["reason"] for e in stack.events("LiveMigration", "move")}
    assert {"TargetChosen", "PreCopyStarted", "CutOver", "Completed"} <= reasons, reasons
    assert d["status"]["lastMigration"]["toHost"] == dst
