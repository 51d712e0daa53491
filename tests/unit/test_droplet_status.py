"""The droplet's operator-owned status, decided purely (ferry.droplets.status)."""

from __future__ import annotations

import datetime as dt

import pytest

from ferry.api.livemigration import LiveMigration
from ferry.api.models import Droplet, Host
from ferry.droplets.status import droplet_state, placement_status, state_changed
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
