"""The agent's pure decision function: table-driven cases and invariants over random worlds."""

from __future__ import annotations

import dataclasses

import pytest
from fakes import NOW, droplet, key, lm, stats, treport, ts, vm
from hypothesis import given, settings
from hypothesis import strategies as st

from ferry.agent import plan as p
from ferry.drivers.base import MigrationState as M
from ferry.drivers.base import VMState as V

A = p.HostContext("a", "127.0.0.1", downtime_budget_ms=300, report_interval_seconds=1.0)
B = p.HostContext("b", "127.0.0.2", downtime_budget_ms=300, report_interval_seconds=1.0)
MID1, MID2 = "ns/move#1", "ns/move#2"
ADDR = "127.0.0.2:4000"


def summary(actions: list[p.Action]) -> list[str]:
    out = []
    for a in actions:
        if isinstance(a, p.StartVM):
            out.append(f"{'start' if a.spec.power_on else 'define'} {a.key}")
        elif isinstance(a, p.StopVM):
            out.append(f"stop {a.key}")
        elif isinstance(a, p.DestroyVM):
            out.append(f"destroy {a.key}")
        elif isinstance(a, p.ResumeVM):
            out.append(f"resume {a.key}")
        elif isinstance(a, p.ClaimAddress):
            out.append(f"claim {a.ip} {a.migration[0]}/{a.migration[1]}#{a.attempt}")
        elif isinstance(a, p.PrepareIncoming):
            out.append(f"prepare {a.key} {a.migration_id}")
        elif isinstance(a, p.StartMigration):
            out.append(f"migrate {a.key} {a.migration_id} -> {a.target}")
        elif isinstance(a, p.CancelMigration):
            out.append(f"cancel {a.key} {a.migration_id}")
        elif isinstance(a, p.ReportTarget):
            out.append(f"target {a.migration[0]}/{a.migration[1]}#{a.status['attempt']} {a.status['state']}")
        elif isinstance(a, p.ReportTransfer):
            out.append(f"transfer {a.migration[0]}/{a.migration[1]}#{a.status['attempt']} {a.status['state']}")
        elif isinstance(a, p.Warn):
            out.append(f"warn {a.key}")
        else:  # pragma: no cover
            raise AssertionError(a)
    return out


def world(droplets=(), gone=(), migrations=(), gone_migrations=(), vms=()):
    d = {key(x.name): x for x in droplets}
    d.update({key(n): None for n in gone})
    m = {(x.namespace, x.name): x for x in migrations}
    m.update({("ns", n): None for n in gone_migrations})
    v = {x.key: x for x in vms}
    return d, m, v


def run(host, **kw):
    d, m, v = world(**kw)
    return p.plan(host, d, m, v, NOW)


LISTEN1 = treport(1, "Listening", ADDR)

# (id, host, world, expected actions)
CASES = [
    # --- droplets placed here -------------------------------------------------------------
    ("new droplet starts", A, dict(droplets=[droplet(host="a")]), ["start ns/web"]),
    ("powered-off droplet without VM: defined, not run", A, dict(droplets=[droplet(host="a", power="off")]),
     ["define ns/web"]),
    ("powered-off droplet with its VM: nothing", A,
     dict(droplets=[droplet(host="a", power="off")], vms=[vm(state=V.STOPPED, pid=None)]), []),
    ("running + powerState off stops", A, dict(droplets=[droplet(host="a", power="off")], vms=[vm()]),
     ["stop ns/web"]),
    ("stopped + powerState on starts", A, dict(droplets=[droplet(host="a")], vms=[vm(state=V.STOPPED, pid=None)]),
     ["start ns/web"]),
    ("running + on: nothing", A, dict(droplets=[droplet(host="a")], vms=[vm()]), []),
    ("paused by someone else + on: left alone", A, dict(droplets=[droplet(host="a")], vms=[vm(state=V.PAUSED)]), []),
    ("record unplaced: nothing", A, dict(droplets=[droplet(host=None)], vms=[vm()]), []),
    # --- the lock rule ----------------------------------------------------------------------
    ("record names another host: destroy", A, dict(droplets=[droplet(host="c")], vms=[vm()]), ["destroy ns/web"]),
    ("droplet deleted: destroy", A, dict(gone=["web"], vms=[vm()]), ["destroy ns/web"]),
    ("droplet unknown: nothing", A, dict(vms=[vm()]), []),
    ("deleted droplet's VM is destroyed even after an old completed migration here", B,
     dict(gone=["web"], migrations=[lm(phase="Completed", target_report=treport(1, "Running"))],
          vms=[vm(mid=MID1, st=stats(MID1, M.RECEIVED))]), ["destroy ns/web"]),
    # --- target role --------------------------------------------------------------------------
    ("target prepares", B, dict(droplets=[droplet(host="a")], migrations=[lm(phase="Preparing")]),
     ["prepare ns/web ns/move#1"]),
    ("target prepared and reported: nothing", B,
     dict(droplets=[droplet(host="a")], migrations=[lm(phase="Preparing", target_report=LISTEN1)],
          vms=[vm(state=V.INCOMING, mid=MID1, st=stats(MID1, M.NONE))]), []),
    ("target prepared but report lost: prepare again (idempotent)", B,
     dict(droplets=[droplet(host="a")], migrations=[lm(phase="Preparing")],
          vms=[vm(state=V.INCOMING, mid=MID1, st=stats(MID1, M.NONE))]), ["prepare ns/web ns/move#1"]),
    ("target needs the droplet's size: unknown droplet waits", B, dict(migrations=[lm(phase="Preparing")]), []),
    ("target already failed this attempt: no retry", B,
     dict(droplets=[droplet(host="a")], migrations=[lm(phase="Preparing", target_report=treport(1, "Failed"))]), []),
    ("target: droplet already here", B, dict(droplets=[droplet(host="b")], vms=[vm()],
                                             migrations=[lm(phase="Preparing")]), ["target ns/move#1 Failed"]),
    ("stale incoming of attempt 1 replaced for attempt 2", B,
     dict(droplets=[droplet(host="a")], migrations=[lm(phase="Preparing", attempt=2, target_report=LISTEN1)],
          vms=[vm(state=V.INCOMING, mid=MID1, st=stats(MID1, M.FAILED))]),
     ["destroy ns/web", "prepare ns/web ns/move#2"]),
    ("leftover non-incoming copy replaced", B,
     dict(droplets=[droplet(host="a")], migrations=[lm(phase="Preparing")], vms=[vm(state=V.STOPPED, pid=None)]),
     ["destroy ns/web", "prepare ns/web ns/move#1"]),
    ("target copying: nothing", B,
     dict(droplets=[droplet(host="a")], migrations=[lm(phase="PreCopy", target_report=LISTEN1)],
          vms=[vm(state=V.INCOMING, mid=MID1, st=stats(MID1, M.COPYING))]), []),
    ("target received: report digest", B,
     dict(droplets=[droplet(host="a")], migrations=[lm(phase="PreCopy", target_report=LISTEN1)],
          vms=[vm(state=V.INCOMING, mid=MID1, st=stats(MID1, M.RECEIVED, digest="abc"))]),
     ["target ns/move#1 Received"]),
    ("target received and reported: nothing", B,
     dict(droplets=[droplet(host="a")], migrations=[lm(phase="CutOver", target_report=treport(1, "Received"))],
          vms=[vm(state=V.INCOMING, mid=MID1, st=stats(MID1, M.RECEIVED, digest="abc"))]), []),
    ("target does not resume before the record flips, even in CutOver", B,
     dict(droplets=[droplet(host="a")], migrations=[lm(phase="CutOver", target_report=treport(1, "Received"))],
          vms=[vm(state=V.INCOMING, mid=MID1, st=stats(MID1, M.RECEIVED))]), []),
    ("target does not resume in PreCopy even if the record names it", B,
     dict(droplets=[droplet(host="b")], migrations=[lm(phase="PreCopy", target_report=treport(1, "Received"))],
          vms=[vm(state=V.INCOMING, mid=MID1, st=stats(MID1, M.RECEIVED))]), []),
    ("record flipped, the operator's CutOver not written yet (source Completed): resume at once", B,
     dict(droplets=[droplet(host="b")],
          migrations=[lm(phase="PreCopy", target_report=treport(1, "Received"),
                         transfer={"attempt": 1, "state": "Completed", "digest": "abc"})],
          vms=[vm(state=V.INCOMING, mid=MID1, st=stats(MID1, M.RECEIVED, digest="abc"))]),
     ["resume ns/web", "target ns/move#1 Running"]),
    ("PreCopy, source Completed, record still at the source: no resume", B,
     dict(droplets=[droplet(host="a")],
          migrations=[lm(phase="PreCopy", target_report=treport(1, "Received"),
                         transfer={"attempt": 1, "state": "Completed", "digest": "abc"})],
          vms=[vm(state=V.INCOMING, mid=MID1, st=stats(MID1, M.RECEIVED, digest="abc"))]), []),
    ("PreCopy, the record names the target but the source's Completed is of another attempt: no resume", B,
     dict(droplets=[droplet(host="b")],
          migrations=[lm(phase="PreCopy", target_report=treport(1, "Received"),
                         transfer={"attempt": 0, "state": "Completed", "digest": "abc"})],
          vms=[vm(state=V.INCOMING, mid=MID1, st=stats(MID1, M.RECEIVED, digest="abc"))]), []),
    ("record flipped in CutOver: resume, report Running", B,
     dict(droplets=[droplet(host="b")], migrations=[lm(phase="CutOver", target_report=treport(1, "Received"))],
          vms=[vm(state=V.INCOMING, mid=MID1, st=stats(MID1, M.RECEIVED, digest="abc"))]),
     ["resume ns/web", "target ns/move#1 Running"]),
    ("offline, powered off: resume then stop, report Running", B,
     dict(droplets=[droplet(host="b", power="off")],
          migrations=[lm(phase="CutOver", mode="offline", target_report=treport(1, "Received"))],
          vms=[vm(state=V.INCOMING, mid=MID1, st=stats(MID1, M.RECEIVED))]),
     ["resume ns/web", "stop ns/web", "target ns/move#1 Running"]),
    # --- the network cut-over: after the resume, before the Running report ---------------------
    ("record flipped, droplet with an address: resume, claim it, report Running", B,
     dict(droplets=[droplet(host="b", ip="10.250.0.200")],
          migrations=[lm(phase="CutOver", target_report=treport(1, "Received"))],
          vms=[vm(state=V.INCOMING, mid=MID1, st=stats(MID1, M.RECEIVED, digest="abc"))]),
     ["resume ns/web", "claim 10.250.0.200 ns/move#1", "target ns/move#1 Running"]),
    ("resumed, crashed before the claim: claim, then report Running", B,
     dict(droplets=[droplet(host="b", ip="10.250.0.200")],
          migrations=[lm(phase="CutOver", target_report=treport(1, "Received"))],
          vms=[vm(mid=MID1, st=stats(MID1, M.RECEIVED))]), ["claim 10.250.0.200 ns/move#1", "target ns/move#1 Running"]),
    ("received before the flip: no claim", B,
     dict(droplets=[droplet(host="a", ip="10.250.0.200")],
          migrations=[lm(phase="CutOver", target_report=treport(1, "Received"))],
          vms=[vm(state=V.INCOMING, mid=MID1, st=stats(MID1, M.RECEIVED))]), []),
    ("Running reported: no claim again", B,
     dict(droplets=[droplet(host="b", ip="10.250.0.200")],
          migrations=[lm(phase="Completed", target_report=treport(1, "Running"))],
          vms=[vm(mid=MID1, st=stats(MID1, M.RECEIVED))]), []),
    ("resumed but report lost: report Running", B,
     dict(droplets=[droplet(host="b")], migrations=[lm(phase="CutOver", target_report=treport(1, "Received"))],
          vms=[vm(mid=MID1, st=stats(MID1, M.RECEIVED))]), ["target ns/move#1 Running"]),
    ("completed here, then powered off: stop", B,
     dict(droplets=[droplet(host="b", power="off")],
          migrations=[lm(phase="Completed", target_report=treport(1, "Running"))],
          vms=[vm(mid=MID1, st=stats(MID1, M.RECEIVED))]), ["stop ns/web"]),
    ("incoming failed: report Failed", B,
     dict(droplets=[droplet(host="a")], migrations=[lm(phase="PreCopy", target_report=LISTEN1)],
          vms=[vm(state=V.INCOMING, mid=MID1, st=stats(MID1, M.FAILED, error="digest mismatch"))]),
     ["target ns/move#1 Failed"]),
    ("incoming VM vanished: report Failed", B,
     dict(droplets=[droplet(host="a")], migrations=[lm(phase="PreCopy", target_report=LISTEN1)]),
     ["target ns/move#1 Failed"]),
    ("migration failed: destroy incoming, report Cleaned", B,
     dict(droplets=[droplet(host="a")], migrations=[lm(phase="Failed", target_report=LISTEN1)],
          vms=[vm(state=V.INCOMING, mid=MID1, st=stats(MID1, M.COPYING))]),
     ["destroy ns/web", "target ns/move#1 Cleaned"]),
    ("cancelled, VM already gone: report Cleaned once", B,
     dict(droplets=[droplet(host="a")], migrations=[lm(phase="Cancelled", target_report=LISTEN1)]),
     ["target ns/move#1 Cleaned"]),
    ("cleaned already: nothing", B,
     dict(droplets=[droplet(host="a")], migrations=[lm(phase="Cancelled", target_report=treport(1, "Cleaned"))]), []),
    ("attempt moved on (Scheduling #2): clean attempt 1", B,
     dict(droplets=[droplet(host="a")], migrations=[lm(phase="Scheduling", attempt=2, target_report=LISTEN1)],
          vms=[vm(state=V.INCOMING, mid=MID1, st=stats(MID1, M.COPYING))]),
     ["destroy ns/web", "target ns/move#1 Cleaned"]),
    ("retargeted elsewhere: destroy incoming, the report is not ours any more", B,
     dict(droplets=[droplet(host="a")], migrations=[lm(phase="Preparing", attempt=2, target="c",
                                                       target_report=LISTEN1)],
          vms=[vm(state=V.INCOMING, mid=MID1, st=stats(MID1, M.COPYING))]), ["destroy ns/web"]),
    ("incoming of a deleted migration: destroyed", B,
     dict(droplets=[droplet(host="a")], gone_migrations=["move"],
          vms=[vm(state=V.INCOMING, mid=MID1, st=stats(MID1, M.COPYING))]), ["destroy ns/web"]),
    ("incoming of an unknown migration: wait", B,
     dict(droplets=[droplet(host="a")], vms=[vm(state=V.INCOMING, mid=MID1, st=stats(MID1, M.COPYING))]), []),
    ("failed migration but the record names this host: never destroyed, adopted", B,
     dict(droplets=[droplet(host="b")], migrations=[lm(phase="Failed", target_report=treport(1, "Received"))],
          vms=[vm(state=V.INCOMING, mid=MID1, st=stats(MID1, M.RECEIVED))]), ["resume ns/web"]),
    ("unverified incoming with the record here: warn, keep", B,
     dict(droplets=[droplet(host="b")], gone_migrations=["move"],
          vms=[vm(state=V.INCOMING, mid=MID1, st=stats(MID1, M.COPYING))]), ["warn ns/web"]),
    ("record here, incoming expected but missing: no empty VM", B,
     dict(droplets=[droplet(host="b")], migrations=[lm(phase="CutOver", target_report=treport(1, "Received"))]),
     ["target ns/move#1 Failed", "warn ns/web"]),
    # --- source role ----------------------------------------------------------------------------
    ("source waits for the target", A,
     dict(droplets=[droplet(host="a")], migrations=[lm(phase="PreCopy")], vms=[vm()]), []),
    ("source waits for this attempt's target", A,
     dict(droplets=[droplet(host="a")], migrations=[lm(phase="PreCopy", attempt=2, target_report=LISTEN1)],
          vms=[vm()]), []),
    ("source starts", A, dict(droplets=[droplet(host="a")], migrations=[lm(phase="PreCopy", target_report=LISTEN1)],
                              vms=[vm()]), [f"migrate ns/web ns/move#1 -> {ADDR}"]),
    ("source: no VM", A, dict(droplets=[droplet(host="a")], migrations=[lm(phase="PreCopy", target_report=LISTEN1)]),
     ["transfer ns/move#1 Failed"]),
    ("source failed to start before: no restart", A,
     dict(droplets=[droplet(host="a")], vms=[vm()],
          migrations=[lm(phase="PreCopy", target_report=LISTEN1,
                         transfer={"attempt": 1, "state": "Failed", "updatedAt": ts(5)})]), []),
    ("source copying, first report", A,
     dict(droplets=[droplet(host="a")], migrations=[lm(phase="PreCopy", target_report=LISTEN1)],
          vms=[vm(mid=MID1, st=stats(MID1, M.COPYING, remaining=600, sent=400))]), ["transfer ns/move#1 Copying"]),
    ("source completed: report at once", A,
     dict(droplets=[droplet(host="a")],
          migrations=[lm(phase="PreCopy", target_report=LISTEN1,
                         transfer={"attempt": 1, "state": "Copying", "updatedAt": ts(0.1)})],
          vms=[vm(state=V.PAUSED, mid=MID1, st=stats(MID1, M.COMPLETED, digest="abc"))]),
     ["transfer ns/move#1 Completed"]),
    ("source replaces a busy older attempt", A,
     dict(droplets=[droplet(host="a")], migrations=[lm(phase="PreCopy", attempt=2, target_report=treport(2, "Listening", ADDR))],
          vms=[vm(mid=MID1, st=stats(MID1, M.COPYING))]),
     ["cancel ns/web ns/move#1", f"migrate ns/web ns/move#2 -> {ADDR}"]),
    ("source busy for a migration it has never seen: waits, cancels nothing", A,
     dict(droplets=[droplet(host="a")], migrations=[lm(phase="PreCopy", target_report=LISTEN1)],
          vms=[vm(mid="ns/other#2", st=stats("ns/other#2", M.COPYING))]), []),
    ("source busy for a deleted migration: that copy is cancelled", A,
     dict(droplets=[droplet(host="a")], migrations=[lm(phase="PreCopy", target_report=LISTEN1)],
          gone_migrations=["other"], vms=[vm(mid="ns/other#2", st=stats("ns/other#2", M.COPYING))]),
     ["cancel ns/web ns/other#2", f"migrate ns/web ns/move#1 -> {ADDR}"]),
    ("source in CutOver holds, never cancels", A,
     dict(droplets=[droplet(host="a")],
          migrations=[lm(phase="CutOver", transfer={"attempt": 1, "state": "Completed", "digest": "abc",
                                                    "updatedAt": ts(3)})],
          vms=[vm(state=V.PAUSED, mid=MID1, st=stats(MID1, M.COMPLETED, digest="abc"))]),
     ["transfer ns/move#1 Completed"]),  # the report gains the fields it lacked, nothing else
    ("source in Completed (stale record) never resumes", A,
     dict(droplets=[droplet(host="a")], migrations=[lm(phase="Completed")],
          vms=[vm(state=V.PAUSED, mid=MID1, st=stats(MID1, M.COMPLETED))]), []),
    ("migration failed: cancel, the source resumes", A,
     dict(droplets=[droplet(host="a")], migrations=[lm(phase="Failed")],
          vms=[vm(mid=MID1, st=stats(MID1, M.CONVERGING))]), ["cancel ns/web ns/move#1"]),
    ("cancelled after completion: cancel", A,
     dict(droplets=[droplet(host="a")], migrations=[lm(phase="Cancelled")],
          vms=[vm(state=V.PAUSED, mid=MID1, st=stats(MID1, M.COMPLETED))]), ["cancel ns/web ns/move#1"]),
    ("attempt moved on: cancel the old one", A,
     dict(droplets=[droplet(host="a")], migrations=[lm(phase="Scheduling", attempt=2)],
          vms=[vm(mid=MID1, st=stats(MID1, M.COPYING))]), ["cancel ns/web ns/move#1"]),
    ("after the cancel: report Aborted", A,
     dict(droplets=[droplet(host="a")],
          migrations=[lm(phase="Failed", transfer={"attempt": 1, "state": "Copying", "updatedAt": ts(5)})],
          vms=[vm(mid=MID1, st=stats(MID1, M.ABORTED))]), ["transfer ns/move#1 Aborted"]),
    ("orphaned source migration (migration deleted): cancel", A,
     dict(droplets=[droplet(host="a")], gone_migrations=["move"], vms=[vm(mid=MID1, st=stats(MID1, M.COPYING))]),
     ["cancel ns/web ns/move#1"]),
    ("source migration of an unknown migration: wait", A,
     dict(droplets=[droplet(host="a")], vms=[vm(mid=MID1, st=stats(MID1, M.COPYING))]), []),
    ("source VM died after its copy completed: not booted again while the migration may commit it", A,
     dict(droplets=[droplet(host="a")], migrations=[lm(phase="PreCopy", target_report=treport(1, "Received"))],
          vms=[vm(state=V.STOPPED, pid=None, st=stats(MID1, M.COMPLETED))]), ["transfer ns/move#1 Completed"]),
    ("source VM died, the attempt failed: booted again", A,
     dict(droplets=[droplet(host="a")], migrations=[lm(phase="Scheduling", attempt=2, target_report=treport(1, "Failed"))],
          vms=[vm(state=V.STOPPED, pid=None, st=stats(MID1, M.FAILED))]), ["start ns/web"]),
    ("record flipped, target not running yet: the source keeps its paused copy", A,
     dict(droplets=[droplet(host="b")], migrations=[lm(phase="CutOver", target_report=treport(1, "Received"))],
          vms=[vm(state=V.PAUSED, mid=MID1, st=stats(MID1, M.COMPLETED))]), []),
    ("record flipped, target runs: the source copy is destroyed", A,
     dict(droplets=[droplet(host="b")], migrations=[lm(phase="CutOver", target_report=treport(1, "Running"))],
          vms=[vm(state=V.PAUSED, mid=MID1, st=stats(MID1, M.COMPLETED))]), ["destroy ns/web"]),
    ("record flipped, migration Completed: the source copy is destroyed", A,
     dict(droplets=[droplet(host="b")], migrations=[lm(phase="Completed", target_report=treport(1, "Running"))],
          vms=[vm(state=V.PAUSED, mid=MID1, st=stats(MID1, M.COMPLETED))]), ["destroy ns/web"]),
    ("record moved back (target failed): the source resumes", A,
     dict(droplets=[droplet(host="a")], migrations=[lm(phase="Scheduling", attempt=2, target_report=treport(1, "Failed"))],
          vms=[vm(state=V.PAUSED, mid=MID1, st=stats(MID1, M.COMPLETED))]), ["cancel ns/web ns/move#1"]),
    ("target's received copy lost its process before it ran: Failed, even after the flip", B,
     dict(droplets=[droplet(host="b")], migrations=[lm(phase="CutOver", target_report=treport(1, "Received"))],
          vms=[vm(state=V.INCOMING, mid=None, st=stats(MID1, M.RECEIVED), pid=None)]), ["target ns/move#1 Failed"]),
    ("record unknown after the flip: keep the source copy", A,
     dict(migrations=[lm(phase="CutOver")], vms=[vm(state=V.PAUSED, mid=MID1, st=stats(MID1, M.COMPLETED))]), []),
    ("source busy, powered off meanwhile: no stop", A,
     dict(droplets=[droplet(host="a", power="off")], migrations=[lm(phase="PreCopy", target_report=LISTEN1)],
          vms=[vm(mid=MID1, st=stats(MID1, M.COPYING))]), ["transfer ns/move#1 Copying"]),
    ("offline source: stopped VM migrates", A,
     dict(droplets=[droplet(host="a", power="off")],
          migrations=[lm(phase="PreCopy", mode="offline", target_report=LISTEN1)],
          vms=[vm(state=V.STOPPED, pid=None)]), [f"migrate ns/web ns/move#1 -> {ADDR}"]),
]


@pytest.mark.parametrize("host,kw,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plan(host, kw, expected):
    assert summary(run(host, **kw)) == expected


def test_prepare_uses_the_droplet_spec():
    [a] = run(B, droplets=[droplet(host="a", power="off")], migrations=[lm(phase="Preparing", attempt=3)])
    assert isinstance(a, p.PrepareIncoming)
    assert (a.spec.cpu, a.spec.memory_mib, a.spec.disk_gib) == (1, 1024, 25)
    assert a.spec.workload == p.Workload("hotspot", 64)
    assert a.spec.power_on is False
    assert a.migration == ("ns", "move") and a.attempt == 3 and a.migration_id == "ns/move#3"


@pytest.mark.parametrize("limits,mode,expected", [
    (None, None, p.MigrationOptions(300, None, False)),
    ({"downtimeMs": 50, "bandwidthMiBps": 8}, "live", p.MigrationOptions(50, 8 * p.MiB, False)),
    ({"downtimeMs": 1000}, "offline", p.MigrationOptions(1000, None, True)),
])
def test_migration_options(limits, mode, expected):
    [a] = run(A, droplets=[droplet(host="a")], vms=[vm()],
              migrations=[lm(phase="PreCopy", target_report=LISTEN1, limits=limits, mode=mode)])
    assert isinstance(a, p.StartMigration)
    assert a.options == expected


def test_default_downtime_comes_from_the_host_settings():
    host = dataclasses.replace(A, downtime_budget_ms=777)
    [a] = run(host, droplets=[droplet(host="a")], vms=[vm()], migrations=[lm(phase="PreCopy", target_report=LISTEN1)])
    assert a.options.downtime_budget_ms == 777


def test_target_reports_carry_address_and_digest():
    acts = run(B, droplets=[droplet(host="a")], migrations=[lm(phase="PreCopy", target_report=LISTEN1)],
               vms=[vm(state=V.INCOMING, mid=MID1, st=stats(MID1, M.RECEIVED, digest="abc"))])
    [r] = acts
    assert r.status["attempt"] == 1 and r.status["state"] == "Received"
    assert r.status["address"] == ADDR and r.status["digest"] == "abc" and r.status["error"] is None
    assert r.status["updatedAt"].endswith("Z") and "." in r.status["updatedAt"]


def test_transfer_report_fields():
    s = stats(MID1, M.CONVERGING, total=1000, sent=1400, remaining=250, rounds=25)
    s = dataclasses.replace(s, dirty_rate_bps=5, bandwidth_bps=7, throttle_percent=20, max_throttle_percent=40,
                            throttled_ms=99, expected_downtime_ms=12, eta_seconds=1.23456)
    r = p.transfer_status(s, 1, NOW)
    assert r["state"] == "Converging" and r["round"] == 25
    assert r["bytesTotal"] == 1000 and r["bytesSent"] == 1400 and r["dirtyRemaining"] == 250
    assert r["disk"] == {"total": 500, "sent": 700, "remaining": 125}
    assert r["progress"] == 84  # 1400 of 1400 + 250
    # bounded: the first round (the bulk copy) and the latest 19; fields a driver did not fill are absent
    assert len(r["rounds"]) == 20 and [x["round"] for x in r["rounds"][:2]] == [1, 7]
    assert set(r["rounds"][0]) == {"round", "bytes", "dirtyBytes", "ms"}
    assert (r["dirtyRateBps"], r["bandwidthBps"], r["throttlePercent"], r["maxThrottlePercent"], r["throttledMs"],
            r["expectedDowntimeMs"], r["etaSeconds"]) == (5, 7, 20, 40, 99, 12, 1.235)
    assert r["digest"] is None and r["error"] is None  # None clears a stale value in a merge patch
    assert r["channel"] is None  # the driver did not say
    assert p.transfer_status(dataclasses.replace(s, channel="aes-256-gcm"), 1, NOW)["channel"] == "aes-256-gcm"


@pytest.mark.parametrize("state,sent,remaining,expected", [
    (M.COPYING, 0, 0, 0), (M.COPYING, 0, 1000, 0), (M.COPYING, 999, 1, 99), (M.COPYING, 1000, 0, 99),
    (M.COMPLETED, 1000, 0, 100), (M.FAILED, 600, 400, 60), (M.CONVERGING, 5000, 0, 99),
])
def test_progress(state, sent, remaining, expected):
    assert p.progress_percent(stats(MID1, state, total=100000, sent=sent, remaining=remaining)) == expected


@pytest.mark.parametrize("age,state,changed,due", [
    (0.2, "Copying", True, False),  # rate limit
    (1.5, "Copying", True, True),
    (5.0, "Copying", False, False),  # nothing new: no write at all
    (0.1, "Paused", True, True),  # state change: at once
])
def test_transfer_rate_limit(age, state, changed, due):
    old = p.transfer_status(stats(MID1, M.COPYING, remaining=600), 1, NOW)
    old["updatedAt"] = ts(age)
    migration = lm(phase="PreCopy", transfer=old)
    new = p.transfer_status(stats(MID1, {"Copying": M.COPYING, "Paused": M.PAUSED}[state],
                                  remaining=500 if changed else 600), 1, NOW)
    assert p.transfer_due(migration, new, NOW, 1.0) is due


def test_a_written_report_is_not_written_again():
    """Planning again on the world our own writes produced gives no more reports (idempotence)."""
    base = dict(droplets=[droplet(host="a")], vms=[vm(mid=MID1, st=stats(MID1, M.COPYING, remaining=600))])
    [r] = run(A, migrations=[lm(phase="PreCopy", target_report=LISTEN1)], **base)
    assert run(A, migrations=[lm(phase="PreCopy", target_report=LISTEN1, transfer=dict(r.status))], **base) == []


@pytest.mark.parametrize("mid,expected", [
    ("ns/lm#3", ("ns", "lm", 3)), ("a-b/c.d#12", ("a-b", "c.d", 12)), ("ns/lm", None), ("lm#1", None),
    ("ns/lm#x", None), (None, None), ("", None),
])
def test_parse_migration_id(mid, expected):
    assert p.parse_migration_id(mid) == expected


def test_agent_status():
    s = p.agent_status(A, "sim", "1.2", [vm("b").info, vm("a", state=V.INCOMING).info], NOW)
    assert s == {"address": "127.0.0.1", "heartbeatTime": "2030-01-01T12:00:00.000000Z", "driver": "sim",
                 "version": "1.2", "vms": [{"namespace": "ns", "name": "a", "state": "Incoming"},
                                           {"namespace": "ns", "name": "b", "state": "Running"}]}


def test_busy():
    assert p.busy({}, {("ns", "move"): lm(phase="PreCopy")}, "a")
    assert not p.busy({}, {("ns", "move"): lm(phase="Completed")}, "a")
    assert not p.busy({}, {("ns", "move"): lm(phase="PreCopy", source="x", target="y")}, "a")
    assert p.busy({key(): vm(mid=MID1, st=stats(MID1, M.COPYING))}, {}, "a")
    assert not p.busy({key(): vm(mid=MID1, st=stats(MID1, M.ABORTED))}, {}, "a")


# --- invariants over random worlds -----------------------------------------------------------

HOSTS = ("a", "b", "c")
PHASES = ("Pending", "Announced", "Scheduling", "Preparing", "PreCopy", "CutOver", "Completed", "Failed", "Cancelled")
TSTATES = (None, "Preparing", "Listening", "Received", "Running", "Failed", "Cleaned")
XSTATES = (None, "Copying", "Converging", "Paused", "Completed", "Failed", "Aborted")


@st.composite
def worlds(draw):
    names = draw(st.lists(st.sampled_from(["w1", "w2", "w3"]), unique=True, max_size=3))
    droplets, gone = [], []
    migrations, gone_migrations = [], []
    vms = []
    for name in names:
        kind = draw(st.sampled_from(["placed", "gone", "unknown"]))
        if kind == "placed":
            droplets.append(droplet(name, host=draw(st.sampled_from((*HOSTS, None))),
                                    power=draw(st.sampled_from(["on", "off"]))))
        elif kind == "gone":
            gone.append(name)
        for i in range(draw(st.integers(0, 2))):
            mname = f"{name}-m{i}"
            if draw(st.booleans()):
                gone_migrations.append(mname)
                continue
            n = draw(st.integers(1, 3))
            tr = draw(st.sampled_from(TSTATES))
            xs = draw(st.sampled_from(XSTATES))
            migrations.append(lm(mname, name, phase=draw(st.sampled_from(PHASES)), attempt=n,
                                 source=draw(st.sampled_from(HOSTS)), target=draw(st.sampled_from(HOSTS)),
                                 target_report=treport(draw(st.integers(1, n)), tr, ADDR) if tr else None,
                                 transfer={"attempt": draw(st.integers(1, n)), "state": xs,
                                           "updatedAt": ts(draw(st.sampled_from([0.1, 3.0])))} if xs else None,
                                 mode=draw(st.sampled_from([None, "offline"]))))
        if draw(st.booleans()):
            ours = [f"ns/{x.name}#{x.status.attempt}" for x in migrations if x.droplet == name]
            mid = draw(st.sampled_from([None, f"ns/{name}-m0#1", f"ns/{name}-m1#2", *ours, *ours]))
            state = draw(st.sampled_from(list(V)))
            mstate = draw(st.sampled_from(list(M)))
            vms.append(vm(name, state=state, mid=mid, st=stats(mid, mstate) if mid else None,
                          pid=draw(st.sampled_from([None, 7]))))
    return dict(droplets=droplets, gone=gone, migrations=migrations, gone_migrations=gone_migrations, vms=vms)


@settings(max_examples=700, deadline=None)
@given(w=worlds(), me=st.sampled_from(HOSTS))
def test_invariants(w, me):
    host = p.HostContext(me)
    d, m, v = world(**w)
    actions = p.plan(host, d, m, v, NOW)
    for a in actions:
        known = a.key in d
        record = d[a.key].host if known and d[a.key] is not None else None
        if isinstance(a, p.DestroyVM):
            # the lock: never destroy a VM whose record names this host, nor on a guess
            assert known and record != me, (a, record)
            assert d[a.key] is None or record is not None
        if isinstance(a, (p.StartVM, p.ResumeVM, p.CancelMigration)):
            # only the host the record names runs (or resumes) the droplet
            assert known and record == me, (a, record)
        if isinstance(a, p.CancelMigration):
            ref = p.parse_migration_id(a.migration_id)
            owner = m.get((ref[0], ref[1]), "unknown")
            assert owner != "unknown"
            assert owner is None or owner.phase not in ("CutOver", "Completed") or owner.status.attempt != ref[2] \
                or owner.status.source_host != me, (a, owner)
        if isinstance(a, p.ResumeVM):
            ref = p.parse_migration_id(a.migration_id)
            owner = m.get((ref[0], ref[1])) if ref else None
            if owner is not None and owner.status.target_host == me and owner.status.attempt == ref[2]:
                # never while the copy of that attempt may still be running; once the record
                # names this host (asserted above) any other phase means the VM is adopted
                assert owner.phase not in ("Preparing", "PreCopy"), (a, owner.phase)
        if isinstance(a, p.ReportTarget):
            assert m[a.migration].status.target_host == me
        if isinstance(a, p.ReportTransfer):
            assert m[a.migration].status.source_host == me
        if isinstance(a, (p.PrepareIncoming,)):
            assert m[a.migration].status.target_host == me and m[a.migration].phase == "Preparing"
            assert record != me
        if isinstance(a, p.StartMigration):
            lmv = m[a.migration]
            assert lmv.status.source_host == me and lmv.phase == "PreCopy" and record == me
            assert lmv.target.attempt == lmv.status.attempt and lmv.target.state == "Listening"
    # at most one driver action of each kind per droplet and per cycle
    seen = [(type(a).__name__, a.key) for a in actions if isinstance(a, p.DRIVER_ACTIONS)]
    assert len(seen) == len(set(seen)), seen


def test_a_vm_whose_process_died_is_started_again_with_a_warning_event():
    dead = vm(state=V.STOPPED, pid=None)
    dead = p.VMObs(dataclasses.replace(dead.info, crashed=True), dead.stats)
    actions = run(A, droplets=[droplet(host="a")], vms=[dead])
    assert summary(actions) == ["warn ns/web", "start ns/web"]
    assert actions[0].event_reason == p.GUEST_RESTARTED and "reboots" in actions[0].message
    # a VM stopped on purpose (powerState off, then on) starts without one
    assert summary(run(A, droplets=[droplet(host="a")], vms=[vm(state=V.STOPPED, pid=None)])) == ["start ns/web"]


def test_a_source_vm_that_died_mid_copy_reports_the_source_failed():
    from ferry.drivers.base import MigrationStats

    dead = vm(state=V.STOPPED, pid=None, st=MigrationStats(migration_id=MID1, state=M.COPYING))
    dead = p.VMObs(dataclasses.replace(dead.info, crashed=True), dead.stats)
    actions = run(A, droplets=[droplet(host="a")], migrations=[lm(target_report=LISTEN1)], vms=[dead])
    # not booted again while the attempt may still commit (the operator fails it first)
    assert summary(actions) == ["transfer ns/move#1 Failed"]
    assert "VM process" in actions[0].status["error"] and "died on source host a" in actions[0].status["error"]


def _forced(lm_obj):
    return dataclasses.replace(lm_obj, spec=dataclasses.replace(lm_obj.spec, force_complete=True))


@pytest.mark.parametrize("state,forced,expected", [
    (M.COPYING, False, True),
    (M.CONVERGING, False, True),
    (M.CONVERGING, True, False),  # already forced: not asked again
    (M.PAUSED, False, False),  # paused already: nothing to force
    (M.COMPLETED, False, False),
])
def test_force_complete_asks_the_running_source_once(state, forced, expected):
    s = dataclasses.replace(stats(MID1, state), forced=forced)
    d, m, v = world(droplets=[droplet(host="a")], vms=[vm(mid=MID1, st=s)])
    mig = _forced(lm(phase="PreCopy", target_report=LISTEN1))
    acts = p.plan(A, d, {(mig.namespace, mig.name): mig}, v, NOW)
    assert any(isinstance(a, p.ForceComplete) and a.migration_id == MID1 for a in acts) is expected


def test_force_complete_and_the_ceiling_travel_in_the_options():
    mig = _forced(lm(phase="PreCopy", target_report=LISTEN1, limits={"downtimeMs": 50, "maxDowntimeMs": 400}))
    d, m, v = world(droplets=[droplet(host="a")], vms=[vm()])
    [a] = p.plan(A, d, {(mig.namespace, mig.name): mig}, v, NOW)
    assert a.options.force_complete is True and a.options.max_downtime_ms == 400


# --- qemu: the frozen point, verified after the resume --------------------------------------

def _frozen_target(state: str, digest: str | None = None) -> dict:
    r = treport(1, state, ADDR, digest)
    r["frozenPoint"] = True
    return r


def _with_verification(lm_obj, state: str):
    body = {"apiVersion": "ferry.dev/v1alpha1", "kind": "LiveMigration",
            "metadata": {"name": lm_obj.name, "namespace": lm_obj.namespace, "resourceVersion": "2", "uid": "u"},
            "spec": {"droplet": lm_obj.droplet},
            "status": {**lm_obj.status.to_dict(), "verification": {"method": "frozen-point", "state": state},
                       "target": lm_obj.target.to_patch(), "transfer": lm_obj.transfer.to_patch()}}
    return type(lm_obj).from_body(body)


def _paused_source(digest: str | None = None):
    s = stats(MID1, M.COMPLETED, digest=digest)
    return vm(state=V.PAUSED, mid=MID1, st=s)


def test_the_source_keeps_its_copy_while_the_frozen_point_is_verified_and_reports_its_late_digest():
    transfer = {"attempt": 1, "state": "Completed", "updatedAt": ts(0)}
    m = lm(phase="CutOver", target_report=_frozen_target("Running"), transfer=transfer)
    acts = run(A, droplets=[droplet(host="b")], migrations=[m], vms=[_paused_source("sha256:aa")])
    assert summary(acts) == ["transfer ns/move#1 Completed"]  # no destroy: the verdict is not in
    assert acts[0].status["digest"] == "sha256:aa"
    # reported already (no digest yet): nothing to write, still no destroy
    src = _paused_source()
    m2 = lm(phase="CutOver", target_report=_frozen_target("Running"), transfer=p.transfer_status(src.stats, 1, NOW))
    assert summary(run(A, droplets=[droplet(host="b")], migrations=[m2], vms=[src])) == []


@pytest.mark.parametrize("state,expected", [("Mismatch", []), ("Incomplete", []), ("Verified", ["destroy ns/web"])])
def test_after_a_failed_verification_the_source_copy_is_kept(state, expected):
    phase = "Completed" if state == "Verified" else "Failed"
    m = _with_verification(lm(phase=phase, target_report=_frozen_target("Running", "sha256:bb")), state)
    assert summary(run(A, droplets=[droplet(host="b")], migrations=[m], vms=[_paused_source("sha256:aa")])) == expected
    # the user deletes the migration to keep the target's copy: the paused source goes
    assert summary(run(A, droplets=[droplet(host="b")], gone_migrations=["move"],
                       vms=[_paused_source("sha256:aa")])) == ["destroy ns/web"]


def test_the_target_reports_the_frozen_points_digest_once_it_is_hashed():
    s = stats(MID1, M.RECEIVED, digest="sha256:aa")
    s.frozen_point, s.verify_ms, s.hashed_bytes = True, 800, 64 << 20
    m = lm(phase="CutOver", target_report=_frozen_target("Running"))
    acts = run(B, droplets=[droplet(host="b")], migrations=[m], vms=[vm(mid=MID1, st=s)])
    assert summary(acts) == ["target ns/move#1 Running"]
    assert acts[0].status["digest"] == "sha256:aa" and acts[0].status["verifyMs"] == 800
    assert acts[0].status["frozenPoint"] is True and acts[0].status["hashedBytes"] == 64 << 20
    done = lm(phase="CutOver", target_report=_frozen_target("Running", "sha256:aa"))
    assert summary(run(B, droplets=[droplet(host="b")], migrations=[done], vms=[vm(mid=MID1, st=s)])) == []
# --- which addresses a host holds (plan.addresses) -------------------------------------------------

IP = "10.250.0.200"


@pytest.mark.parametrize("name, host, world_kw, want", [
    ("running here", "a", dict(droplets=[droplet(host="a", ip=IP)], vms=[vm()]), {IP}),
    ("stopped here: still its address", "a", dict(droplets=[droplet(host="a", ip=IP)],
                                                  vms=[vm(state=V.STOPPED, pid=None)]), {IP}),
    ("no address", "a", dict(droplets=[droplet(host="a")], vms=[vm()]), set()),
    ("incoming copy: only at the cut-over", "b", dict(droplets=[droplet(host="b", ip=IP)],
                                                      vms=[vm(state=V.INCOMING, mid=MID1)]), set()),
    ("record moved away: the paused source holds it no more", "a",
     dict(droplets=[droplet(host="b", ip=IP)], vms=[vm(state=V.PAUSED, mid=MID1)]), set()),
    ("placed here, VM not started yet", "a", dict(droplets=[droplet(host="a", ip=IP)]), set()),
])
def test_addresses_are_those_of_the_guests_the_record_places_here(name, host, world_kw, want):
    d, _, v = world(**world_kw)
    assert p.addresses(host, d, v) == want


def test_addresses_released_only_when_every_vm_here_is_known():
    d, _, v = world(droplets=[droplet(host="b", ip=IP)], vms=[vm()])
    assert p.addresses_to_release("a", d, v, {IP, "10.250.0.201"}) == {IP, "10.250.0.201"}
    d2, _, v2 = world(vms=[vm()])  # the droplet of a VM here was not read: release nothing
    assert p.addresses_to_release("a", d2, v2, {IP}) == set()
    d3, _, v3 = world(droplets=[droplet(host="a", ip=IP)], vms=[vm()])
    assert p.addresses_to_release("a", d3, v3, {IP}) == set()


def test_a_droplet_in_address_conflict_never_takes_the_address():
    body = __import__("fakes").droplet_body(host="b", ip=IP)
    body["status"]["conditions"] = [{"type": "AddressConflict", "status": "True", "reason": "AddressInUse"}]
    from ferry.api.models import Droplet

    d = Droplet.from_body(body)
    assert p.owned_address(d) is None
    dd, _, v = world(droplets=[d], vms=[vm()])
    assert p.addresses("b", dd, v) == set()
    acts = run(B, droplets=[d], migrations=[lm(phase="CutOver", target_report=treport(1, "Received"))],
               vms=[vm(state=V.INCOMING, mid=MID1, st=stats(MID1, M.RECEIVED))])
    assert summary(acts) == ["resume ns/web", "target ns/move#1 Running"]
