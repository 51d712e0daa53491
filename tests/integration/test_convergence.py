"""Convergence within stated bounds, force-complete and the downtime budget, over the real
stack (API server, operator, agents, sim VM processes)."""

from __future__ import annotations

import time

import pytest
from support import wait_until


def _conditions(st: dict) -> dict[str, dict]:
    return {c["type"]: c for c in st.get("conditions") or []}


def test_force_complete_finishes_a_busy_guest_and_reports_its_downtime(stack):
    """A guest writing 4x the link rate against a 5 ms budget: `spec.forceComplete` pauses it
    now; the copy finishes, the downtime lands in status next to the budget, over it."""
    a, b = stack.host("a"), stack.host("b")
    stack.start_operator()
    stack.wait_hosts_ready()
    stack.droplet("web", write_kibps=4096, pattern="uniform")
    src = stack.wait_running("web")
    t0 = time.monotonic()
    stack.migrate("web", limits={"bandwidthMiBps": 1, "downtimeMs": 5})
    # a copy that drags: past the bulk round, re-copying what the guest keeps dirtying
    wait_until(lambda: stack.lm().get("phase") == "PreCopy" and (stack.lm().get("transfer") or {}).get("round", 0) >= 3,
               90, what="copy in its third round")
    stack.kubectl("patch", "lm", "move", "-n", stack.ns, "--type=merge", "-p", '{"spec":{"forceComplete":true}}')
    st = stack.wait_phase("move", "Completed", timeout=90)
    total = time.monotonic() - t0
    tr = st["transfer"]
    assert tr["forced"] is True and tr["digest"] == st["target"]["digest"]
    assert st["downtimeMs"] == tr["downtimeMs"] and st["downtimeBudgetMs"] == 5
    cond = _conditions(st)
    assert cond["ForceCompleted"]["status"] == "True"
    over = st["downtimeMs"] > 5
    assert cond["DowntimeBudgetExceeded"]["status"] == ("True" if over else "False")
    reasons = {e["reason"]: e["type"] for e in stack.events("LiveMigration", "move")}
    assert reasons.get("ForceCompleted") == "Normal"
    if over:
        assert reasons.get("DowntimeBudgetExceeded") == "Warning"
    dst = b if src == a else a
    assert stack.get("droplet", "web")["status"]["host"] == dst
    print(f"\nforce-complete, busy guest (4 MiB/s on a 1 MiB/s link, budget 5 ms): downtime {st['downtimeMs']} ms "
          f"(predicted {tr.get('predictedDowntimeMs')} ms), rounds {tr['round']}, total {total:.1f} s")


@pytest.mark.parametrize("ceiling", [200])
def test_a_guest_dirtying_3x_the_link_ends_within_bounds_never_stuck(stack, ceiling):
    """3x the link rate: Completed with the allowed downtime within the ceiling, or Failed
    NotConverging with the figures and a Warning Event. Never stuck."""
    stack.host("a"), stack.host("b")
    stack.start_operator()
    stack.wait_hosts_ready()
    stack.droplet("web", write_kibps=3072, pattern="uniform")
    stack.wait_running("web")
    t0 = time.monotonic()
    stack.migrate("web", limits={"bandwidthMiBps": 1, "downtimeMs": 50, "maxDowntimeMs": ceiling, "maxAttempts": 1})
    st = stack.wait_phase("move", ("Completed", "Failed"), timeout=180)
    total = time.monotonic() - t0
    tr = st.get("transfer") or {}
    assert st["effectiveLimits"]["maxDowntimeMs"] == ceiling
    if st["phase"] == "Completed":
        assert tr["allowedDowntimeMs"] <= ceiling and tr["maxDowntimeMs"] == ceiling
        assert st["downtimeBudgetMs"] == 50 and st["downtimeMs"] == tr["downtimeMs"]
        assert _conditions(st)["DowntimeBudgetExceeded"]["status"] == ("True" if st["downtimeMs"] > 50 else "False")
    else:
        assert st["reason"] == "NotConverging", st
        assert "MiB/s" in st["failureReason"] and "ceiling" in st["failureReason"]
        reasons = {e["reason"]: e["type"] for e in stack.events("LiveMigration", "move")}
        assert reasons.get("NotConverging") == "Warning"
    print(f"\n3x link rate: {st['phase']} in {total:.1f} s, rounds {tr.get('round')}, max throttle "
          f"{tr.get('maxThrottlePercent')}%, downtime steps {tr.get('downtimeSteps')}, allowed "
          f"{tr.get('allowedDowntimeMs')} ms (ceiling {ceiling} ms), downtime {st.get('downtimeMs')} ms")
