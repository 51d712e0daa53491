"""The droplet's operator-owned status, decided purely (ferry.droplets.status)."""

from __future__ import annotations

import datetime as dt

import pytest

from ferry.api.livemigration import LiveMigration
from ferry.api.models import Droplet, Host
from ferry.api.times import fmt_api
from ferry.droplets.status import completed_by_record, completion_status, droplet_state, placement_status, state_changed
from ferry.placement import DropletRequest, HostInfo, place
from ferry.api.sizes import Resources

NOW = dt.datetime(2030, 1, 1, 12, tzinfo=dt.timezone.utc)


def droplet(**status) -> Droplet:
    return Droplet.from_body({"metadata": {"name": "web", "namespace": "team", "generation": 3},
                              "spec": {"size": "s-1vcpu-1gb", "datacenter": "nyc3"}, "status": status})


def host(heartbeat_s_ago: float | None) -> Host:
    agent = {} if heartbeat_s_ago is None else {
        "heartbeatTime": (NOW - dt.timedelta(seconds=heartbeat_s_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")}
    return Host.from_body({"metadata": {"name": "h1"}, "spec": {"datacenter": "nyc3", "capacity": {
        "cpu": 4, "memoryMiB": 8192, "diskGiB": 100}}, "status": {"agent": agent}})


def migration(phase: str) -> LiveMigration:
    return LiveMigration.from_body({"metadata": {"name": "move", "namespace": "team"}, "spec": {"droplet": "web"},
                                    "status": {"phase": phase}})


@pytest.mark.parametrize("h, migrations, expected", [
    (None, [], ("HostLost", "HostMissing")),
    (host(None), [], ("HostLost", "HostNotReady")),
    (host(60), [], ("HostLost", "HostNotReady")),
    (host(1), [migration("Completed"), migration("Announced")], ("Placed", "Placed")),
    (host(1), [migration("Completed"), migration("PreCopy")], ("Migrating", "LiveMigration")),
])
def test_the_phase_of_a_placed_droplet(h, migrations, expected):
    state = droplet_state(droplet(host="h1"), h, migrations, NOW, heartbeat_timeout=30)
    assert (state.phase, state.reason) == expected
    assert state_changed(droplet(host="h1", phase="Placed", reason="Placed", message="running on h1"), state) \
        == (expected != ("Placed", "Placed"))


def test_placement_status_placed_and_unschedulable():
    d = droplet()
    req = DropletRequest(name="team/web", datacenter="nyc3", resources=d.resources)
    fits = place(req, [HostInfo("h1", "nyc3", Resources(4, 8192, 100))], [])
    st = placement_status(d, fits, NOW)
    assert (st["host"], st["phase"], st["observedGeneration"]) == ("h1", "Placed", 3)
    assert st["conditions"] == [{"type": "Placed", "status": "True", "reason": "Placed", "message": "placed on h1",
                                 "lastTransitionTime": "2030-01-01T12:00:00Z"}]
    none = place(req, [HostInfo("h1", "nyc3", Resources(1, 256, 1))], [])
    st = placement_status(d, none, NOW)
    assert "host" not in st and st["phase"] == "Unschedulable" and st["reason"] == "NoHostFits"
    assert st["conditions"][0]["status"] == "False"


# --- addresses: the oldest claim owns spec.ip -----------------------------------------------

from ferry.droplets.status import address_condition, address_verdict  # noqa: E402


def claimant(name: str, created: str | None, ip: str | None = "10.0.0.5", deleting: bool = False,
             conditions: list | None = None) -> Droplet:
    meta: dict = {"name": name, "namespace": "team"}
    if created:
        meta["creationTimestamp"] = created
    if deleting:
        meta["deletionTimestamp"] = "2030-01-01T00:00:00Z"
    spec = {"size": "s-1vcpu-1gb", "datacenter": "nyc3", **({"ip": ip} if ip else {})}
    return Droplet.from_body({"metadata": meta, "spec": spec, "status": {"conditions": conditions or []}})


OLD = claimant("old", "2030-01-01T10:00:00Z")
NEW = claimant("new", "2030-01-01T11:00:00Z")


def test_the_newer_claim_conflicts_and_names_the_owner():
    v = address_verdict(NEW, [OLD, NEW])
    assert v.conflict and v.reason == "AddressInUse" and v.owner == "team/old"
    assert "10.0.0.5" in v.message and "team/old" in v.message
    assert not address_verdict(OLD, [OLD, NEW]).conflict


def test_the_same_address_in_another_spelling_conflicts_too():
    mapped = claimant("mapped", "2030-01-01T12:00:00Z", ip="::ffff:10.0.0.5")
    assert address_verdict(mapped, [OLD, mapped]).conflict


def test_age_decides_not_the_order_of_arrival_and_unknown_age_never_wins():
    assert address_verdict(NEW, [NEW, OLD]).conflict
    ageless = claimant("aaa", None)
    assert address_verdict(ageless, [ageless, NEW]).conflict
    same_time = [claimant("b", "2030-01-01T10:00:00Z"), claimant("a", "2030-01-01T10:00:00Z")]
    assert [address_verdict(d, same_time).conflict for d in same_time] == [True, False]


def test_a_deleting_owner_or_another_address_is_no_conflict():
    assert not address_verdict(NEW, [claimant("old", "2030-01-01T10:00:00Z", deleting=True), NEW]).conflict
    assert not address_verdict(NEW, [claimant("old", "2030-01-01T10:00:00Z", ip="10.0.0.6"), NEW]).conflict
    assert address_verdict(claimant("x", "2030-01-01T10:00:00Z", ip=None), [OLD]).reason == "NoAddress"


def test_the_condition_is_written_on_change_only_and_never_for_a_droplet_that_never_conflicted():
    assert address_condition(OLD, address_verdict(OLD, [OLD, NEW]), NOW) is None
    conds = address_condition(NEW, address_verdict(NEW, [OLD, NEW]), NOW)
    assert conds is not None and conds[0]["type"] == "AddressConflict" and conds[0]["status"] == "True"
    flagged = claimant("new", "2030-01-01T11:00:00Z", conditions=conds)
    assert address_condition(flagged, address_verdict(flagged, [OLD, flagged]), NOW) is None
    cleared = address_condition(flagged, address_verdict(flagged, [flagged]), NOW)
    assert cleared is not None and cleared[0]["status"] == "False" and cleared[0]["reason"] == "AddressUnique"


# --- a guest that restarted -------------------------------------------------------------------

from ferry.droplets.status import restart_condition  # noqa: E402


def host_reporting(restarts: int | None, at: str = "2030-01-01T11:59:00Z") -> Host:
    vm = {"namespace": "team", "name": "web", "state": "Running"}
    if restarts:
        vm.update(restarts=restarts, restartedAt=at)
    return Host.from_body({"metadata": {"name": "h1"}, "spec": {"datacenter": "nyc3", "capacity": {
        "cpu": 4, "memoryMiB": 8192, "diskGiB": 100}}, "status": {"agent": {"vms": [vm]}}})


def test_guest_restarted_is_set_from_the_host_report_and_moves_with_each_restart():
    d = droplet(host="h1")
    assert restart_condition(d, host_reporting(None), NOW) is None
    conds = restart_condition(d, host_reporting(1), NOW)
    assert conds is not None
    c = next(x for x in conds if x["type"] == "GuestRestarted")
    assert c["status"] == "True" and c["reason"] == "VMProcessDied" and "h1" in c["message"]
    assert c["lastTransitionTime"] == "2030-01-01T11:59:00Z"
    once = droplet(host="h1", conditions=conds)
    assert restart_condition(once, host_reporting(1), NOW) is None  # nothing new: no write
    again = restart_condition(once, host_reporting(2, "2030-01-01T12:00:00Z"), NOW)
    c2 = next(x for x in again if x["type"] == "GuestRestarted")
    assert "2 times" in c2["message"] and c2["lastTransitionTime"] == "2030-01-01T12:00:00Z"
    # moved away: the new host says nothing of it, the record stays
    assert restart_condition(once, host_reporting(None), NOW) is None


def test_the_flips_own_words_stand_while_the_migration_finishes():
    """The record flip writes phase Migrating with its reason (RecordMoved): kept, not rewritten
    to LiveMigration (one write per migration less); Placed once the migration is terminal."""
    d = droplet(host="h1", phase="Migrating", reason="RecordMoved", message="record moved from h0 to h1")
    state = droplet_state(d, host(1), [migration("CutOver")], NOW, 30)
    assert (state.phase, state.reason, state.message) == ("Migrating", "RecordMoved", "record moved from h0 to h1")
    assert not state_changed(d, state)
    assert droplet_state(d, host(1), [migration("Completed")], NOW, 30).phase == "Placed"
    before = droplet(host="h0", phase="Placed", reason="Placed", message="running on h0")
    assert droplet_state(before, host(1), [migration("Preparing")], NOW, 30).reason == "LiveMigration"


def migration_cut(name: str, phase: str, cut_at: dt.datetime) -> LiveMigration:
    return LiveMigration.from_body({"metadata": {"name": name, "namespace": "team"}, "spec": {"droplet": "web"},
                                    "status": {"phase": phase, "phaseTimes": {"CutOver": fmt_api(cut_at)}}})


def test_the_completion_writes_lastmigration_and_placed_in_one_patch():
    """lastMigration and the phase back to Placed were two writes; the completion's one patch
    carries both, and the droplet's own look between that write and the migration's status
    Completed (its world still says CutOver) does not write Migrating back."""
    cut = NOW - dt.timedelta(seconds=3)
    d = droplet(host="h1", phase="Migrating", reason="RecordMoved", message="record moved from h0 to h1")
    moving = migration_cut("move", "CutOver", cut)
    last = {"name": "move", "completedAt": fmt_api(NOW), "fromHost": "h0", "toHost": "h1"}
    patch = completion_status(d, host(1), [moving], "move", last, NOW, 30)
    assert patch == {"lastMigration": last, "phase": "Placed", "reason": "Placed", "message": "running on h1",
                     "observedGeneration": 3}
    written = droplet(host="h1", phase="Placed", reason="Placed", message="running on h1", lastMigration=last)
    assert completed_by_record(written, moving)
    assert not state_changed(written, droplet_state(written, host(1), [moving], NOW, 30))
    # already Placed (nothing else to say): lastMigration alone
    assert completion_status(written, host(1), [moving], "move", last, NOW, 30) == {"lastMigration": last}
    # a later migration that reuses the name is not the one the record names: it moves the droplet
    again = migration_cut("move", "CutOver", NOW + dt.timedelta(minutes=1))
    assert not completed_by_record(written, again)
    assert droplet_state(written, host(1), [again], NOW, 30).phase == "Migrating"
    assert not completed_by_record(written, migration_cut("move", "PreCopy", cut))
    # the host lost meanwhile: that is what the patch says
    assert completion_status(d, host(60), [moving], "move", last, NOW, 30)["phase"] == "HostLost"
