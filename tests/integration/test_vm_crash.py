"""A droplet's VM process dies: the owner is told (Warning Event, condition), and a failed
attempt names the side that failed. Operator, agents and sim VM processes run as processes
against the real API server; the VM process is killed with SIGKILL, as an OOM kill would."""

from __future__ import annotations

import os
import signal

import pytest
from stack import Stack
from support import wait_until

pytestmark = pytest.mark.integration


def _vm_pid(stack: Stack, host: str, droplet: str) -> int | None:
    path = stack.dirs[host] / "vms"
    for d in path.iterdir() if path.exists() else ():
        try:
            spec = (d / "vm.json").read_text()
            pid = int((d / "pid").read_text())
        except (OSError, ValueError):
            continue
        if f'"name": "{droplet}"' in spec and f'"namespace": "{stack.ns}"' in spec:
            return pid
    return None


def _condition(stack: Stack, droplet: str, type_: str) -> dict | None:
    conds = (stack.get("droplet", droplet).get("status") or {}).get("conditions") or []
    return next((c for c in conds if c["type"] == type_), None)


def test_a_source_vm_dying_mid_copy_is_reported_as_the_source_failing(stack):
    a, b = stack.host("a"), stack.host("b")
    stack.start_operator()
    stack.wait_hosts_ready()
    stack.droplet("web", write_kibps=2048, pattern="uniform")
    src = stack.wait_running("web")
    stack.migrate("web", limits={"bandwidthMiBps": 1})
    wait_until(lambda: stack.lm().get("phase") == "PreCopy" and int((stack.lm().get("transfer") or {})
                                                                     .get("bytesSent") or 0) > 0,
               60, what="copy under way")
    pid = _vm_pid(stack, src, "web")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)

    first = wait_until(lambda: next((x for x in stack.lm().get("attempts") or [] if x.get("number") == 1
                                     and x.get("result")), None), 60, what="attempt 1 closed")
    retry = [e["message"] for e in stack.events("LiveMigration", "move") if e["reason"] == "RetryBackoff"]
    print("attempt 1:", first, retry)
    assert first["result"] == "Failed" and first["reason"] == "SourceFailed", (first, retry)
    assert retry and f"source host {src}" in retry[0] and "VM process" in retry[0], retry
    restarted = wait_until(lambda: _condition(stack, "web", "GuestRestarted"), 60, what="GuestRestarted condition")
    assert restarted["status"] == "True" and src in restarted["message"], restarted
    assert any(e["reason"] == "GuestRestarted" and e["type"] == "Warning" for e in stack.events("Droplet", "web"))
    stack.wait_phase("move", "Completed", timeout=120)


def test_a_running_guest_whose_vm_dies_is_restarted_and_its_owner_told(stack):
    a = stack.host("a")
    stack.start_operator()
    stack.wait_hosts_ready()
    stack.droplet("web")
    stack.wait_running("web")
    pid = _vm_pid(stack, a, "web")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    cond = wait_until(lambda: _condition(stack, "web", "GuestRestarted"), 60, what="GuestRestarted condition")
    assert cond["status"] == "True" and cond["reason"] == "VMProcessDied" and a in cond["message"], cond
    assert "1 time " in cond["message"], cond
    new_pid = wait_until(lambda: (p := _vm_pid(stack, a, "web")) != pid and p, 30, what="a new VM process")
    assert new_pid != pid
    stack.wait_running("web")
    warnings = [e for e in stack.events("Droplet", "web") if e["reason"] == "GuestRestarted"]
    assert warnings and warnings[0]["type"] == "Warning" and "reboots" in warnings[0]["message"], warnings
