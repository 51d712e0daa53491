"""The operator's sweep (ferry.controller.sweep): what is due when (the pure Schedule), and
the sweep over a fake storage: it looks at what is due and only that, keeps looking without
watch events, and never looks on a replica that is not active."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from hypothesis import given, strategies as st
from test_controller import NS, stack  # noqa: F401  (the fixture)

from ferry.controller import app, migration_reconciler, sweep as sweep_mod
from ferry.controller.schedule import Schedule, migration_delay, spread

LOG = logging.getLogger("test")


def test_a_new_key_is_due_after_its_first_delay_then_every_interval():
    s = Schedule(1.0, first=3.0)
    assert s.due(["a"], 0.0) == []  # first seen: due at 3
    assert s.due(["a"], 2.9) == []
    assert s.due(["a"], 3.0) == ["a"]
    assert s.due(["a"], 3.5) == []  # claimed: due again one interval after it was claimed
    assert s.due(["a"], 4.0) == ["a"]


def test_a_look_made_elsewhere_puts_the_next_one_an_interval_later():
    s = Schedule(1.0, first=1.0)
    s.due(["a", "b"], 0.0)
    s.looked("a", 0.8)  # a watch event's reconcile
    assert s.due(["a", "b"], 1.0) == ["b"]
    assert s.due(["a", "b"], 1.8) == ["a"]


def test_most_overdue_first_and_deleted_keys_forgotten():
    s = Schedule(1.0, first=0.0)
    s.looked("late", -5.0)
    s.looked("early", -1.0)
    assert s.due(["early", "late", "new"], 0.0) == ["late", "early", "new"]
    assert s.due(["late"], 0.5) == [] and len(s) == 1  # early and new deleted: forgotten
    s.reset()
    assert len(s) == 0 and s.due(["late"], 10.0) == ["late"]  # first delay 0: due at once


def test_spread_first_delays_stay_within_offset_and_span():
    first = spread(2.0, 30.0)
    delays = [first(("ns", f"d{i}")) for i in range(1000)]
    assert all(2.0 <= d < 32.0 for d in delays)
    assert len({round(d) for d in delays}) >= 25  # spread out, not all in one instant
    assert first(("ns", "d1")) == first(("ns", "d1"))  # fixed by the key


@given(st.lists(st.tuples(st.sampled_from("abcde"), st.floats(0, 0.99)), max_size=60),
       st.floats(0.5, 5.0), st.floats(0.0, 5.0))
def test_every_key_is_looked_at_within_first_then_its_interval(events, interval, first):
    """Drift: whatever the watch events do, a key ticked every 0.1 s is never left longer than
    its interval (plus one tick) without a look, and not due again sooner than the interval."""
    s = Schedule(interval, first=first)
    keys = list("abcde")
    last: dict[str, float] = {}
    t = 0.0
    events = sorted((e[0], round(e[1] * 20, 1)) for e in events)
    by_time: dict[float, list[str]] = {}
    for k, at in events:
        by_time.setdefault(at, []).append(k)
    while t <= 30.0:
        for k in s.due(keys, t):
            if k in last:
                assert t - last[k] >= interval - 1e-9
                assert t - last[k] <= interval + 0.1 + 1e-6
            else:
                assert t <= first + 0.1 + 1e-6
            last[k] = t
        for k in by_time.get(round(t, 1), ()):
            if k in last:  # a reconcile for a watch event (after the first look)
                s.looked(k, t)
                last[k] = t
        t = round(t + 0.1, 1)


def test_the_sweep_looks_at_what_is_due_without_any_watch_event(stack):  # noqa: F811
    kube, cx = stack
    sw = sweep_mod.Sweep(cx)
    looks: list = []

    async def look(kind, key):
        looks.append((kind, key))
        cx.looked(kind, key) if kind != "Finished" else None

    sw.look = look  # what is due, not what the reconcilers do (covered elsewhere)

    async def run():
        worker = asyncio.create_task(sw._worker())
        try:
            sw.tick(100.0)  # every object new: nothing due yet
            assert sw.queue.empty() and looks == []
            sw.tick(101.0)  # the migration's first delay (1 s)
            await asyncio.wait_for(sw.queue.join(), 5)  # every look queued is done
            assert looks == [("LiveMigration", (NS, "move"))]
            sw.tick(103.0)  # the hosts' (3 s)
            await asyncio.wait_for(sw.queue.join(), 5)  # every look queued is done
            assert {x for x in looks[1:]} >= {("Host", "h1"), ("Host", "h2")}
        finally:
            worker.cancel()

    asyncio.run(run())


def test_a_replica_that_is_not_active_never_looks_and_starts_afresh_when_it_is(stack):  # noqa: F811
    kube, cx = stack
    cx.standalone = False  # in a peering: active while kopf runs a Host daemon
    sw = sweep_mod.Sweep(cx)
    sw.tick(0.0)
    sw.tick(100.0)
    assert sw.queue.empty() and not sw.was_active
    cx.anchors.add("h1")  # kopf resumed this replica: its daemons run
    sw.tick(200.0)
    assert sw.was_active and sw.queue.empty()  # everything new to it: the first delays
    sw.tick(201.0)
    assert sw.queue.get_nowait() == ("LiveMigration", (NS, "move"))
    cx.anchors.clear()  # paused again
    sw.tick(300.0)
    assert not sw.was_active and all(len(s) == 0 for s in cx.schedules.values())


def test_the_sweep_drives_a_migration_to_its_next_step_and_notes_the_look(stack):  # noqa: F811
    """The real reconciler through the sweep: a look moves a new migration on (no watch event),
    and the reconcile's own note puts its next look one interval later."""
    kube, cx = stack
    sw = sweep_mod.Sweep(cx)

    async def run():
        await sw.look("LiveMigration", (NS, "move"))

    asyncio.run(run())
    assert cx.world.migrations[(NS, "move")].phase == "Preparing"
    nxt = cx.schedules["LiveMigration"].next_look((NS, "move"))
    assert nxt is not None and nxt > time.monotonic() + 0.5  # one interval (1 s) after the look


def test_a_look_may_say_when_within_the_interval_and_a_wake_brings_it_forward():
    s = Schedule(5.0, first=1.0)
    s.looked("a", 0.0, delay=2.0)
    assert s.next_look("a") == 2.0
    s.looked("a", 0.0, delay=60.0)  # never later than the interval (the drift check)
    assert s.next_look("a") == 5.0
    s.looked("a", 0.0, delay=None)
    assert s.next_look("a") == 5.0
    s.wake("a", 1.0)
    assert s.next_look("a") == 1.0 and s.due(["a"], 1.0) == ["a"]
    s.wake("a", 9.0)  # a wake never puts a look later
    assert s.next_look("a") == 6.0


@pytest.mark.parametrize("attempt_running, requeue, expected", [
    (False, None, 1.0),   # waiting for its turn (a slot, a host): every second
    (False, 30.0, 1.0),
    (True, None, None),   # an attempt, nothing due: the schedule's interval (the drift check)
    (True, 0.0, 1.0),     # a transition: its own write's watch event looks at once; the sweep 1 s on
    (True, 2.5, 2.5),     # the next deadline
    (True, 600.0, 600.0), # capped by the schedule (Schedule.looked)
])
def test_migration_delay(attempt_running, requeue, expected):
    assert migration_delay(attempt_running, requeue) == expected


def test_a_migration_under_way_is_looked_at_by_its_deadline_and_woken_by_its_host(stack):  # noqa: F811
    """After the look that starts an attempt (Preparing, waiting for the target), the next look
    is at most the drift interval away; the host reconciler wakes it when its target host's
    phase changes, and a droplet event that moves or deletes its droplet does too."""
    from ferry.controller import droplet_reconciler, host_reconciler

    kube, cx = stack
    key = (NS, "move")
    asyncio.run(migration_reconciler.reconcile(cx, key, LOG))
    assert cx.world.migrations[key].phase == "Preparing"
    sched = cx.schedules["LiveMigration"]
    t = time.monotonic()
    assert t + 0.5 < sched.next_look(key) <= t + app.MIGRATION_DRIFT_SECONDS + 0.1
    # the target host's heartbeat goes stale: its reconcile writes NotReady and wakes the migration
    h2 = kube.obj("Host", "h2")
    h2["status"]["agent"]["heartbeatTime"] = "2020-01-01T00:00:00Z"
    cx.world.observe("Host", "MODIFIED", h2)
    asyncio.run(host_reconciler.reconcile_host(cx, "h2", LOG))
    assert kube.obj("Host", "h2")["status"]["phase"] == "NotReady"
    assert sched.next_look(key) <= time.monotonic()
    # looked at again: put back at its next deadline; then its droplet is deleted: woken
    asyncio.run(migration_reconciler.reconcile(cx, key, LOG))
    assert sched.next_look(key) > time.monotonic()
    body = kube.obj("Droplet", "web", NS)
    asyncio.run(droplet_reconciler.on_event(cx, "DELETED", body, LOG))
    assert sched.next_look(key) <= time.monotonic()
