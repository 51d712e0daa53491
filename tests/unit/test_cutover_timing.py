"""The cut-over's timing: the agent sees a copy finish when it finishes (the driver's
``wait_migration`` and the agent's ``VMWaiters``), and the guest's whole pause (source pause ->
target resume) is reported next to the downtime."""

from __future__ import annotations

import datetime as dt
import os
import threading
import time

from support import wait_until

from ferry.agent.loop import VMWaiters
from ferry.agent.plan import VMObs
from ferry.api.livemigration import MigrationStatus, downtime_text
from ferry.api.reports import TargetReport, TransferReport
from ferry.drivers.base import MigrationOptions, MigrationState, MigrationStats, VMInfo, VMKey, VMSpec, VMState, Workload
from ferry.drivers.sim import SimDriver
from ferry.migration.machine import guest_pause_ms

UTC = dt.timezone.utc
T0 = dt.datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
KEY = VMKey("prod", "web")


def ms(n: float) -> dt.timedelta:
    return dt.timedelta(milliseconds=n)


# --- the reports and the status ---------------------------------------------------------------

def test_pause_and_resume_times_round_trip_through_the_reports():
    tr = TransferReport(1, "Completed", downtime_ms=8, paused_at=T0 + ms(1.5))
    assert tr.to_patch()["pausedAt"] == "2030-01-01T12:00:00.001500Z"
    assert TransferReport.from_dict(tr.to_patch()).paused_at == T0 + ms(1.5)
    tg = TargetReport(1, "Running", resumed_at=T0 + ms(140))
    assert TargetReport.from_dict(tg.to_patch()).resumed_at == T0 + ms(140)
    # a report that does not know clears a stale time (merge patch: None removes it)
    assert TargetReport(1, "Received").to_patch()["resumedAt"] is None


def test_guest_pause_is_source_pause_to_target_resume_of_this_attempt():
    tr = TransferReport(2, "Completed", downtime_ms=8, paused_at=T0)
    assert guest_pause_ms(tr, TargetReport(2, "Running", resumed_at=T0 + ms(140)), 2, 8) == 140
    # not known: a side did not say, or the reports are another attempt's
    assert guest_pause_ms(tr, TargetReport(2, "Running"), 2, 8) is None
    assert guest_pause_ms(TransferReport(2, "Completed"), TargetReport(2, "Running", resumed_at=T0), 2, 8) is None
    assert guest_pause_ms(tr, TargetReport(1, "Running", resumed_at=T0 + ms(140)), 2, 8) is None
    # the two hosts' clocks disagree: shorter than the downtime it contains is impossible
    assert guest_pause_ms(tr, TargetReport(2, "Running", resumed_at=T0 + ms(5)), 2, 8) is None


def test_the_downtime_column_names_the_whole_pause_once_known():
    assert downtime_text(None, None) is None
    assert downtime_text(8, None) == "8ms"
    assert downtime_text(8, 140) == "8ms (paused 140ms)"
    st = MigrationStatus(phase="Completed", downtime_ms=8, guest_pause_ms=140)
    d = st.to_dict()
    assert d["guestPauseMs"] == 140 and d["downtimeText"] == "8ms (paused 140ms)"
    assert MigrationStatus.from_dict(d).guest_pause_ms == 140


# --- the agent's waiters --------------------------------------------------------------------

class BlockingDriver:
    """wait_migration blocks until ``change`` is set (the migration ended) or the timeout."""

    def __init__(self) -> None:
        self.change = threading.Event()
        self.waits: list[VMKey] = []
        self.fail = False

    def wait_migration(self, key: VMKey, timeout: float) -> None:
        self.waits.append(key)
        if self.fail:
            return
        self.change.wait(timeout)


def obs(state: MigrationState, mid: str | None = "ns/lm#1", key: VMKey = KEY) -> VMObs:
    return VMObs(VMInfo(key, VMState.RUNNING, pid=1, migration_id=mid), MigrationStats(migration_id=mid, state=state))


def test_a_waiter_wakes_the_loop_when_the_copy_finishes():
    drv, woken, stop = BlockingDriver(), threading.Event(), threading.Event()
    w = VMWaiters(drv, woken.set, stop)  # type: ignore[arg-type]
    w.arm({KEY: obs(MigrationState.CONVERGING)})
    wait_until(lambda: drv.waits, 5, what="the waiter to call wait_migration")
    w.arm({KEY: obs(MigrationState.CONVERGING)})  # one waiter per VM at a time
    assert drv.waits == [KEY] and not woken.is_set()
    drv.change.set()
    wait_until(woken.is_set, 5, what="the loop to be woken")


def test_no_waiter_for_a_settled_migration_or_a_vm_without_one():
    drv, stop = BlockingDriver(), threading.Event()
    w = VMWaiters(drv, lambda: None, stop)  # type: ignore[arg-type]
    w.arm({VMKey("ns", str(s)): obs(s, key=VMKey("ns", str(s))) for s in
           (MigrationState.COMPLETED, MigrationState.RECEIVED, MigrationState.FAILED, MigrationState.ABORTED)})
    w.arm({VMKey("ns", "idle"): obs(MigrationState.NONE, mid=None, key=VMKey("ns", "idle"))})
    assert drv.waits == []


def test_a_wait_that_comes_back_at_once_is_not_repeated_before_the_poll():
    """A VM that cannot be asked makes wait_migration return at once: no busy loop."""
    drv, stop = BlockingDriver(), threading.Event()
    drv.fail = True
    clock = [100.0]
    wakes: list[int] = []
    w = VMWaiters(drv, lambda: wakes.append(1), stop, clock=lambda: clock[0])  # type: ignore[arg-type]
    w.arm({KEY: obs(MigrationState.COPYING)})
    wait_until(lambda: wakes, 5, what="the quick return to wake the loop once")
    wait_until(lambda: not w._threads[KEY].is_alive(), 5, what="the waiter to end")
    w.arm({KEY: obs(MigrationState.COPYING)})
    assert len(drv.waits) == 1
    clock[0] += 1.0
    w.arm({KEY: obs(MigrationState.COPYING)})
    wait_until(lambda: len(drv.waits) == 2, 5, what="a new waiter after the poll interval")


# --- the sim VM answers wait-migrate when its copy ends ------------------------------------------

def test_sim_wait_migration_returns_when_the_copy_ends_and_the_times_are_stamped(tmp_path):
    src = SimDriver(str(tmp_path / "a"), size_scale=1 / 512)
    dst = SimDriver(str(tmp_path / "b"), size_scale=1 / 512)
    spec = VMSpec(key=KEY, cpu=1, memory_mib=1024, disk_gib=1, workload=Workload("uniform", 512))
    try:
        src.start(spec)
        secret = os.urandom(32)
        addr = dst.prepare_incoming(spec, "127.0.0.1", secret, "prod/lm#1")
        src.wait_migration(KEY, 30)  # no migration yet: answers at once
        src.start_migration(KEY, addr, secret, "prod/lm#1", MigrationOptions(downtime_budget_ms=300))
        began = time.monotonic()
        src.wait_migration(KEY, 30)  # answers when the copy ends (steps in between do not count)
        assert time.monotonic() - began < 30, "wait_migration sat out its timeout"
        st = src.query_migration(KEY)
        assert st.state is MigrationState.COMPLETED, st.error
        assert st.paused_at is not None and st.paused_at <= time.time()
        dst.wait_migration(KEY, 30)
        assert dst.query_migration(KEY).state is MigrationState.RECEIVED
        dst.resume(KEY)
        t = dst.query_migration(KEY)
        assert t.resumed_at is not None and t.resumed_at >= st.paused_at
    finally:
        for d in (src, dst):
            for vm in d.list_vms():
                d.destroy(vm.key)
