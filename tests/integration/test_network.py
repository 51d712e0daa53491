"""The droplet's address through a migration (local dev: the loopback fabric, VM processes on one
machine): a client probes the guest's UDP service every 10 ms from before the migration to after
it. The guest answers from the source, then from the target, never from both, with the same boot
and a seq that never goes back; status.networkCutOver and the NetworkCutOver Event say when the
address moved. A cancelled migration leaves the source answering."""

from __future__ import annotations

import os

import pytest
from probe import Probe
from support import wait_until

pytestmark = pytest.mark.integration


def droplet_ip() -> str:
    n = os.getpid()
    return f"127.{60 + n % 100}.{(n // 100) % 250}.{1 + (n // 25000) % 250}"


def test_probes_through_a_migration_see_one_guest_move(stack):
    a, b = stack.host("a"), stack.host("b")
    stack.start_operator()
    stack.wait_hosts_ready()
    ip, port = droplet_ip(), int(stack.env["FERRY_SIM_SERVICE_PORT"])
    stack.droplet("web", write_kibps=256, ip=ip)
    src = stack.wait_running("web")
    dst = b if src == a else a
    with Probe(ip, port) as probe:
        wait_until(lambda: probe.answered_by(src), 20, what=f"the guest answering on {ip}:{port} from {src}")
        stack.migrate("web")
        st = stack.wait_phase("move", "Completed", timeout=120)
        wait_until(lambda: probe.answered_by(dst), 10, what="the guest answering from the target")
    r = probe.result()
    print(f"\nloopback fabric, sim: {Probe.line(r)}; reported downtime {st.get('downtimeMs')} ms, "
          f"guest paused {st.get('guestPauseMs')} ms in all")
    assert r["hosts"] == [src, dst], f"answered by {r['hosts']}: the guest must move once, never answer from both"
    assert r["boots"] == [1] and not r["seq_went_back"], r
    assert r["answered"] > 0 and r["lost"] < r["sent"]
    # the guest's whole pause: the source paused it, the target resumed it after the record moved
    assert st["transfer"]["pausedAt"] and st["target"]["resumedAt"]
    assert st["guestPauseMs"] >= st["downtimeMs"], st
    assert st["downtimeText"] == f"{st['downtimeMs']}ms (paused {st['guestPauseMs']}ms)"
    net = st["networkCutOver"]
    assert net["address"] == ip and net["host"] == dst and net["fabric"] == "loopback" and net["movedAt"]
    assert st["target"]["network"]["attempt"] == st["attempt"]
    ev = [e for e in stack.events("LiveMigration", "move") if e["reason"] == "NetworkCutOver"]
    assert ev and ip in ev[0]["message"] and dst in ev[0]["message"]


def test_a_cancelled_migration_leaves_the_address_answering_from_the_source(stack):
    a, b = stack.host("a"), stack.host("b")
    stack.start_operator()
    stack.wait_hosts_ready()
    ip, port = droplet_ip(), int(stack.env["FERRY_SIM_SERVICE_PORT"])
    stack.droplet("web", write_kibps=768, pattern="sequential", ip=ip)
    src = stack.wait_running("web")
    with Probe(ip, port) as probe:
        wait_until(lambda: probe.answered_by(src), 20, what="the guest answering from the source")
        stack.migrate("web", limits={"bandwidthMiBps": 1})
        stack.wait_phase("move", "PreCopy", timeout=60)
        stack.kubectl("patch", "livemigration", "move", "-n", stack.ns, "--type=merge", "-p", '{"spec":{"cancel":true}}')
        st = stack.wait_phase("move", "Cancelled", timeout=60)
        n = len(probe.answers)
        wait_until(lambda: len(probe.answers) > n + 20, 10, what="the source still answering after the cancel")
    r = probe.result()
    assert r["hosts"] == [src], r
    assert "networkCutOver" not in st
