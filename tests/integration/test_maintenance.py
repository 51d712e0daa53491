"""Host maintenance as it recurs and as operators change their minds, through the real
stack: the operator, agents (sim driver) and the API server as processes."""

from __future__ import annotations

import json
import time

from stack import Stack
from support import wait_until

IN_FLIGHT = ("Scheduling", "Preparing", "PreCopy", "CutOver")
TERMINAL = ("Completed", "Failed", "Cancelled")
MAINT = "ferry.dev/maintenance-event"


def _drain(stack: Stack, host: str) -> None:
    stack.kubectl("patch", "host", host, "--type=merge", "-p", json.dumps({"spec": {"maintenance": {"reason": "kernel"}}}))


def _uncordon(stack: Stack, host: str) -> None:
    stack.kubectl("patch", "host", host, "--type=merge", "-p", '{"spec":{"maintenance":null}}')


def _evacuations(stack: Stack, host: str) -> list[dict]:
    return stack.kubectl.json("get", "lm", "-n", stack.ns, "-l", f"ferry.dev/evacuation={host}").get("items") or []


def test_a_host_is_drained_again_and_again(stack, capsys):
    """Drain, uncordon, bring the droplets back, drain again — three times on the same host:
    every droplet is evacuated each time, and the host reaches Evacuated each time."""
    a = stack.host("a")
    stack.start_operator()
    stack.wait_hosts_ready()
    names = ["web1", "web2", "web3"]
    for n in names:
        stack.droplet(n, write_kibps=512)
    for n in names:
        assert stack.wait_running(n) == a
    b = stack.host("b")
    stack.wait_hosts_ready()
    took = []
    for window in (1, 2, 3):
        t0 = time.monotonic()
        _drain(stack, a)
        wait_until(lambda: (stack.get("host", a).get("status") or {}).get("phase") == "Evacuated"
                   and stack.get("host", a)["status"]["evacuation"]["window"] == window, 120, interval=0.3,
                   what=f"drain {window}: host evacuated")
        took.append(time.monotonic() - t0)
        st = stack.get("host", a)["status"]
        assert st["evacuation"] == {"window": window, "dropletsLeft": 0, "migrationsRunning": 0,
                                    "migrationsOutgoing": 0,
                                    "migrationsFailed": 0, "migrationsCompleted": 3}
        assert st["maintenanceWindow"] == window
        for n in names:
            d = stack.get("droplet", n)
            assert d["status"]["host"] == b
            assert MAINT not in (d["metadata"].get("annotations") or {})
            wait_until(lambda n=n: stack.vms_on(b).get(f"{stack.ns}/{n}") == "Running"
                       and f"{stack.ns}/{n}" not in stack.vms_on(a), 30, what=f"{n} only on {b}")
        this = [m for m in _evacuations(stack, a)
                if m["metadata"]["labels"].get("ferry.dev/evacuation-window") == str(window)]
        assert sorted(m["spec"]["droplet"] for m in this) == names  # exactly one each in this window
        assert len(_evacuations(stack, a)) == 3 * window            # earlier windows' are kept, not reused
        # maintenance over: the user brings the droplets back
        _uncordon(stack, a)
        wait_until(lambda: stack.get("host", a)["status"].get("phase") == "Ready", 30, what="host Ready")
        assert stack.get("host", a)["status"].get("evacuation") is None
        for n in names:
            stack.migrate(n, name=f"back-{n}-{window}", targetHost=a)
        for n in names:
            stack.wait_phase(f"back-{n}-{window}", "Completed", timeout=90)
            assert stack.get("droplet", n)["status"]["host"] == a
    with capsys.disabled():
        print("\n[recurring drain] " + ", ".join(f"drain {i + 1}: {t:.1f}s" for i, t in enumerate(took)))


def test_uncordon_in_the_middle_of_a_drain(stack):
    """The operator changes their mind: queued evacuations are withdrawn (cancelled, notice
    cleared), those already in flight finish, and no new evacuation appears afterwards."""
    stack.env.update({"FERRY_MAX_PARALLEL": "1"})
    a = stack.host("a")
    stack.start_operator()
    stack.wait_hosts_ready()
    names = [f"d{i}" for i in range(4)]
    for n in names:
        stack.droplet(n, write_kibps=8192, pattern="uniform")
    for n in names:
        assert stack.wait_running(n) == a
    stack.host("b")
    stack.wait_hosts_ready()
    _drain(stack, a)

    def one_in_flight():
        items = _evacuations(stack, a)
        flying = [m["metadata"]["name"] for m in items if (m.get("status") or {}).get("phase") in IN_FLIGHT]
        return flying if len(items) == 4 and flying else None
    wait_until(one_in_flight, 60, interval=0.1, what="one evacuation in flight, the rest queued")
    _uncordon(stack, a)
    wait_until(lambda: all((m.get("status") or {}).get("phase") in TERMINAL for m in _evacuations(stack, a)), 90,
               what="every evacuation ended")
    items = _evacuations(stack, a)
    assert len(items) == 4
    by_phase: dict[str, list[dict]] = {}
    for m in items:
        by_phase.setdefault(m["status"]["phase"], []).append(m)
    assert set(by_phase) <= {"Completed", "Cancelled"}, {k: len(v) for k, v in by_phase.items()}
    assert by_phase.get("Completed"), "the evacuation in flight at the uncordon finishes"
    assert by_phase.get("Cancelled"), "queued evacuations are withdrawn"
    for m in by_phase["Cancelled"]:
        st = m["status"]
        assert "Scheduling" not in (st.get("phaseTimes") or {}), f"{m['metadata']['name']} had started"
        d = stack.get("droplet", m["spec"]["droplet"])
        assert d["status"]["host"] == a
        assert MAINT not in (d["metadata"].get("annotations") or {}), "notice cleared"
    for m in by_phase["Completed"]:
        assert "Scheduling" in m["status"]["phaseTimes"]
    host = stack.get("host", a)["status"]
    assert host["phase"] == "Ready" and host.get("evacuation") is None
    # No new evacuation appears: the host reconciler runs every 2 s; give it several turns
    # (a pacing wait: we are checking that something does NOT happen).
    time.sleep(6)
    assert len(_evacuations(stack, a)) == 4
