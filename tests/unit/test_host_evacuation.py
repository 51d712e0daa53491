"""PURE host evacuation: maintenance windows, the plan per window, withdrawals on uncordon."""

from __future__ import annotations

import datetime as dt

import pytest

from ferry.api.livemigration import LiveMigration
from ferry.api.models import Droplet, Host
from ferry.hosts.status import (counts_only, evacuation_name, evacuation_plan, evacuation_withdrawals, host_status,
                                maintenance_window)
from ferry.api.sizes import Resources

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def host(*, maintenance: bool, status: dict | None = None) -> Host:
    spec = {"datacenter": "nyc3", "capacity": {"cpu": 16, "memoryMiB": 32768, "diskGiB": 500}}
    if maintenance:
        spec["maintenance"] = {"reason": "kernel"}
    st = {"agent": {"heartbeatTime": T0.isoformat().replace("+00:00", "Z")}, **(status or {})}
    return Host.from_body({"metadata": {"name": "host-a", "generation": 2}, "spec": spec, "status": st})


def droplet(name: str, on: str = "host-a") -> Droplet:
    return Droplet.from_body({"metadata": {"name": name, "namespace": "ns"},
                              "spec": {"size": "s-1vcpu-1gb", "datacenter": "nyc3"}, "status": {"host": on}})


def lm(name: str, droplet_: str, phase: str | None, *, window: int | None = None, evac: bool = True,
       cancel: bool = False, source: str | None = None) -> LiveMigration:
    labels = {}
    if evac:
        labels["ferry.dev/evacuation"] = "host-a"
    if window is not None:
        labels["ferry.dev/evacuation-window"] = str(window)
    return LiveMigration.from_body({"metadata": {"name": name, "namespace": "ns", "labels": labels,
                                                 "resourceVersion": "7"},
                                    "spec": {"droplet": droplet_, "cancel": cancel},
                                    "status": {**({"phase": phase} if phase else {}),
                                               **({"sourceHost": source} if source else {})}})


def status_of(h: Host, droplets, migrations) -> dict:
    return host_status(h, droplets, migrations, Resources(0, 0, 0), T0, 30)


@pytest.mark.parametrize("maint, status, expected", [
    (False, {}, None),
    (False, {"maintenanceWindow": 3}, None),
    (True, {}, 1),                                                    # the first drain
    (True, {"maintenanceWindow": 1}, 2),                              # drained before, uncordoned since
    (True, {"maintenanceWindow": 2, "evacuation": {"window": 2}}, 2),  # the open window stays
    (True, {"evacuation": {"dropletsLeft": 1}}, 1),                   # written by an operator without windows
    (True, {"maintenanceWindow": "x"}, 1),                            # garbage reads as none
])
def test_maintenance_window(maint, status, expected):
    assert maintenance_window(host(maintenance=maint, status=status)) == expected


def test_the_status_records_the_window_and_keeps_its_number_after_uncordon():
    h = host(maintenance=True, status={"maintenanceWindow": 1})
    st = status_of(h, [], [])
    assert st["evacuation"]["window"] == 2 and st["maintenanceWindow"] == 2
    back = status_of(host(maintenance=False, status=st), [], [])
    assert back["evacuation"] is None and back["maintenanceWindow"] == 2


def test_a_finished_evacuation_of_an_earlier_window_never_blocks_a_later_one():
    """The drain-twice bug: drain, uncordon, return, drain again."""
    droplets = [droplet("web1"), droplet("web2")]
    first = [lm(evacuation_name("host-a", d.name, 1), d.name, "Completed", window=1) for d in droplets]
    h = host(maintenance=True, status={"maintenanceWindow": 1})
    plan = evacuation_plan(h, droplets, first, T0, maintenance_window(h))
    assert sorted(b["spec"]["droplet"] for b in plan) == ["web1", "web2"]
    assert {b["metadata"]["labels"]["ferry.dev/evacuation-window"] for b in plan} == {"2"}
    assert not {b["metadata"]["name"] for b in plan} & {m.name for m in first}
    # the Host's counts are this window's only
    assert status_of(h, droplets, first)["evacuation"]["migrationsCompleted"] == 0


def test_within_a_window_a_failed_evacuation_is_not_retried_behind_the_users_back():
    d = droplet("web1")
    failed = lm(evacuation_name("host-a", "web1", 2), "web1", "Failed", window=2)
    h = host(maintenance=True, status={"maintenanceWindow": 2, "evacuation": {"window": 2}})
    assert evacuation_plan(h, [d], [failed], T0, 2) == []
    assert status_of(h, [d], [failed])["evacuation"]["migrationsFailed"] == 1


def test_no_plan_without_a_recorded_window_and_none_for_a_busy_droplet():
    h = host(maintenance=True)
    assert evacuation_plan(h, [droplet("web1")], [], T0, None) == []
    users = lm("mine", "web1", "PreCopy", evac=False)
    assert evacuation_plan(h, [droplet("web1"), droplet("web2")], [users], T0, 1)[0]["spec"]["droplet"] == "web2"


def test_names_are_distinct_per_window_and_valid():
    names = {evacuation_name("host-a", "web1", w) for w in range(1, 50)}
    assert len(names) == 49
    long = evacuation_name("h" * 63, "d" * 200, 12345)
    assert len(long) <= 253 and long.endswith(long.split("-")[-1]) and "-w12345-" in long


def test_uncordon_withdraws_only_the_queued_evacuations():
    ms = [lm("p", "a", "Pending", window=1), lm("n", "b", None, window=1), lm("an", "c", "Announced", window=1),
          lm("s", "d", "Scheduling", window=1), lm("pc", "e", "PreCopy", window=1),
          lm("done", "f", "Completed", window=1), lm("already", "g", "Pending", window=1, cancel=True),
          lm("user", "h", "Pending", evac=False)]
    assert sorted(m.name for m in evacuation_withdrawals(host(maintenance=False), ms)) == ["an", "n", "p"]
    # still in maintenance: nothing of the open window is withdrawn
    h = host(maintenance=True, status={"maintenanceWindow": 1, "evacuation": {"window": 1}})
    assert evacuation_withdrawals(h, ms) == []


def test_a_host_is_not_evacuated_while_a_migration_off_it_is_unfinished():
    """CI: a user's own migration off a host that went into maintenance was in CutOver, its
    droplet's record already on the target, and the host said Evacuated: the source copy the
    migration falls back on (a target that fails after the flip) was still on it."""
    h = host(maintenance=True, status={"maintenanceWindow": 1, "evacuation": {"window": 1}})
    done = lm(evacuation_name("host-a", "web1", 1), "web1", "Completed", window=1, source="host-a")
    mine = lm("users-own", "mine", "CutOver", evac=False, source="host-a")
    st = status_of(h, [], [done, mine])
    assert st["phase"] == "Draining"
    assert st["evacuation"]["migrationsOutgoing"] == 1 and st["evacuation"]["migrationsRunning"] == 0
    ev = next(cnd for cnd in st["conditions"] if cnd["type"] == "Evacuated")
    assert ev["status"] == "False" and "1 migration(s) off this host unfinished" in ev["message"]
    finished = lm("users-own", "mine", "Completed", evac=False, source="host-a")
    st = status_of(h, [], [done, finished])
    assert st["phase"] == "Evacuated" and st["evacuation"]["migrationsOutgoing"] == 0
    # another host's migration is not this host's business
    other = lm("theirs", "x", "CutOver", evac=False, source="host-b")
    assert status_of(h, [], [done, other])["phase"] == "Evacuated"


def test_only_a_change_of_counts_may_wait_for_the_next_host_write():
    """The host reconciler holds back a status that changed only in its counts (and the
    Evacuated message that restates them); a phase, a condition's status or reason, and a new
    window are written at once (the Evacuated rule: the last migration off the host ending)."""
    h = host(maintenance=True, status={"maintenanceWindow": 1, "evacuation": {"window": 1}})
    w1, w2 = droplet("w1"), droplet("w2")
    m1 = lm(evacuation_name("host-a", "w1", 1), "w1", "PreCopy", window=1)
    m2 = lm(evacuation_name("host-a", "w2", 1), "w2", "Announced", window=1)
    before = status_of(h, [w1, w2], [m1, m2])
    # m1's record moved (w1 left the host) and m2 started: counts and the Evacuated message only
    after = status_of(h, [w2], [lm(m1.name, "w1", "Completed", window=1), lm(m2.name, "w2", "PreCopy", window=1)])
    assert before["conditions"] != after["conditions"] and before["phase"] == after["phase"] == "Draining"
    assert counts_only(before, after)
    assert counts_only(before, before)
    # the last one ends: phase Evacuated and the condition's status turn at once
    done = status_of(h, [], [lm(m1.name, "w1", "Completed", window=1), lm(m2.name, "w2", "Completed", window=1)])
    assert done["phase"] == "Evacuated" and not counts_only(after, done)
    # a new window (and the window's end) is never held back
    assert not counts_only({**after, "evacuation": None}, after)
    assert not counts_only(after, {**after, "evacuation": {**after["evacuation"], "window": 2}})
    # a host out of maintenance: allocation alone waits, readiness does not
    idle = status_of(host(maintenance=False), [w1], [])
    busier = host_status(host(maintenance=False), [w1, w2], [], Resources(2, 2048, 50), T0, 30)
    assert busier["allocatedSummary"] != idle["allocatedSummary"] and counts_only(idle, busier)
    lost = host_status(host(maintenance=False), [w1], [], Resources(0, 0, 0), T0 + dt.timedelta(minutes=5), 30)
    assert lost["phase"] == "NotReady" and not counts_only(idle, lost)
