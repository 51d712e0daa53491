"""Pure parts of the user commands: --at parsing, request bodies, which migration to explain."""

from __future__ import annotations

import datetime as dt

import pytest

from ferry.cli import user

NOW = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
UTC = dt.timezone.utc


def migration(name, phase, *, ns="team", droplet_="web-1", created="2030-01-02T03:00:05Z", **status):
    return {"metadata": {"name": name, "namespace": ns, "creationTimestamp": created},
            "spec": {"droplet": droplet_}, "status": {"phase": phase, **status}}


# --- --at -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("+10m", NOW + dt.timedelta(minutes=10)),
    ("+30s", NOW + dt.timedelta(seconds=30)),
    ("+1h30m", NOW + dt.timedelta(minutes=90)),
    ("+2d", NOW + dt.timedelta(days=2)),
    ("10M", NOW + dt.timedelta(minutes=10)),
    ("now", NOW),
    ("2030-05-06T07:08:09Z", dt.datetime(2030, 5, 6, 7, 8, 9, tzinfo=UTC)),
    ("2030-05-06t07:08:09z", dt.datetime(2030, 5, 6, 7, 8, 9, tzinfo=UTC)),
    ("2030-05-06T09:08:09+02:00", dt.datetime(2030, 5, 6, 7, 8, 9, tzinfo=UTC)),
    ("2030-05-06T07:08:09.5Z", dt.datetime(2030, 5, 6, 7, 8, 9, 500000, tzinfo=UTC)),
])
def test_parse_when_accepts(text, expected):
    assert user.parse_when(text, NOW) == expected


@pytest.mark.parametrize("text", ["", "tomorrow", "10", "+10x", "+", "-10m", "2030-05-06", "12:00", "+10m garbage",
                                  "2030-13-01T00:00:00Z"])
def test_parse_when_rejects_with_a_hint(text):
    with pytest.raises(ValueError, match="RFC 3339"):
        user.parse_when(text, NOW)


# --- request bodies ---------------------------------------------------------------------------------

def test_minimal_migration_request():
    body = user.migration_request("web-1")
    assert body == {
        "apiVersion": "ferry.dev/v1alpha1", "kind": "LiveMigration",
        "metadata": {"generateName": "web-1-", "labels": {"ferry.dev/droplet": "web-1"}},
        "spec": {"droplet": "web-1", "mode": "live"},
    }


def test_full_migration_request():
    body = user.migration_request("web-1", name="move-it", target="host-b", at=NOW, bandwidth_mibps=50,
                                  downtime_ms=150, max_attempts=2, offline=True)
    assert body["metadata"]["name"] == "move-it" and "generateName" not in body["metadata"]
    assert body["spec"] == {"droplet": "web-1", "mode": "offline", "targetHost": "host-b",
                            "scheduledAt": "2030-01-02T03:04:05Z",
                            "limits": {"bandwidthMiBps": 50, "downtimeMs": 150, "maxAttempts": 2}}


def test_droplet_name_too_long_for_a_label_gets_no_label():
    name = "d" * 64
    assert "labels" not in user.migration_request(name)["metadata"]
    assert user.migration_request("d" * 63)["metadata"]["labels"] == {"ferry.dev/droplet": "d" * 63}


def test_drain_and_uncordon_patches():
    assert user.drain_patch("kernel", None) == {"spec": {"maintenance": {"reason": "kernel", "start": None}}}
    assert user.drain_patch("kernel", NOW)["spec"]["maintenance"]["start"] == "2030-01-02T03:04:05Z"
    assert user.UNCORDON_PATCH == {"spec": {"maintenance": None, "schedulable": True}}


def test_pick_migration_prefers_the_active_one_then_the_newest():
    old_active = migration("a", "PreCopy", created="2030-01-01T00:00:00Z")
    newer_done = migration("b", "Failed", created="2030-01-02T00:00:00Z")
    newest_done = migration("c", "Completed", created="2030-01-02T01:00:00Z")
    other = migration("d", "PreCopy", droplet_="other", created="2030-01-03T00:00:00Z")
    assert user.pick_migration([newer_done, old_active, other], "web-1") is old_active
    assert user.pick_migration([newer_done, newest_done, other], "web-1") is newest_done
    assert user.pick_migration([other], "web-1") is None
