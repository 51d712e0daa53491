"""The droplet cache behind the maintenance-event endpoint: pure, fed with plain data."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferry.metadata.cache import (
    NO_EVENT,
    DropletCache,
    DropletRecord,
    MaintenanceState,
    normalize_ip,
    record_from_object,
    state_from_annotations,
)

EVENT = "ferry.dev/maintenance-event"
SINCE = "ferry.dev/maintenance-event-since"
NOT_BEFORE = "ferry.dev/maintenance-event-not-before"
LIVE = MaintenanceState("live_migrate", "2030-01-01T00:00:00Z", "2030-01-01T00:10:00Z")


def droplet(name, ip, *, ns="default", event=None, since=None, not_before=None, created="2030-01-01T00:00:00Z"):
    annotations = {}
    if event is not None:
        annotations[EVENT] = event
    if since is not None:
        annotations[SINCE] = since
    if not_before is not None:
        annotations[NOT_BEFORE] = not_before
    return {
        "apiVersion": "ferry.dev/v1alpha1",
        "kind": "Droplet",
        "metadata": {"name": name, "namespace": ns, "annotations": annotations, "creationTimestamp": created,
                     "resourceVersion": "1"},
        "spec": {"size": "s-1vcpu-1gb", "datacenter": "nyc3", **({"ip": ip} if ip is not None else {})},
    }


def rec(name, ip, state=NO_EVENT, *, ns="default", created="2030-01-01T00:00:00Z"):
    return DropletRecord(ns, name, ip, state, created)


# ---- parsing at the boundary -----------------------------------------------------------


def test_record_from_object_reads_ip_and_annotations():
    r = record_from_object(droplet("a", "10.0.0.5", event="live_migrate", since="2030-01-01T00:00:00Z",
                                   not_before="2030-01-01T00:10:00Z"))
    assert r.key == ("default", "a")
    assert r.ip == "10.0.0.5"
    assert r.state == LIVE
    assert r.state.text == "live_migrate"
    assert r.state.as_json() == {"event": "live_migrate", "since": "2030-01-01T00:00:00Z",
                                 "notBefore": "2030-01-01T00:10:00Z"}


def test_no_annotation_is_no_event_with_null_json_fields():
    r = record_from_object(droplet("a", "10.0.0.5"))
    assert r.state == NO_EVENT
    assert r.state.text == ""
    assert r.state.as_json() == {"event": None, "since": None, "notBefore": None}


@pytest.mark.parametrize("value", ["", "Live Migrate", "live-migrate!", "x" * 100, 7, None, "<script>"])
def test_junk_event_values_read_as_no_event(value):
    assert state_from_annotations({EVENT: value, SINCE: "2030-01-01T00:00:00Z"}) == NO_EVENT


def test_invalid_timestamps_become_null_but_the_event_stays():
    s = state_from_annotations({EVENT: "live_migrate", SINCE: "yesterday", NOT_BEFORE: "2030-13-45"})
    assert s == MaintenanceState("live_migrate", None, None)


@pytest.mark.parametrize(
    "raw, expected",
    [("10.0.0.1", "10.0.0.1"), (" 10.0.0.1 ", "10.0.0.1"), ("::ffff:127.0.0.5", "127.0.0.5"),
     ("::1", "::1"), ("fe80::1%eth0", "fe80::1"), ("300.1.1.1", None), ("", None), (None, None),
     ("abc", None), (12, None)],
)
def test_normalize_ip(raw, expected):
    assert normalize_ip(raw) == expected


def test_droplet_without_name_is_rejected():
    with pytest.raises(ValueError):
        record_from_object({"metadata": {"namespace": "x"}, "spec": {}})


def test_droplet_without_or_with_bad_ip_is_kept_but_unreachable():
    cache = DropletCache()
    cache.replace([record_from_object(droplet("a", None)), record_from_object(droplet("b", "not-an-ip"))], "1")
    assert len(cache) == 2
    assert cache.lookup(None) is None
    assert cache.lookup("not-an-ip") is None


# ---- events ----------------------------------------------------------------------------


def test_added_modified_deleted():
    cache = DropletCache()
    assert cache.replace([], "1") == set()
    assert cache.synced
    assert cache.apply("ADDED", rec("a", "10.0.0.1"), "2") == {"10.0.0.1"}
    first = cache.lookup("10.0.0.1")
    assert first.state == NO_EVENT
    assert cache.resource_version == "2"

    assert cache.apply("MODIFIED", rec("a", "10.0.0.1", LIVE), "3") == {"10.0.0.1"}
    second = cache.lookup("10.0.0.1")
    assert second.state == LIVE
    assert second.text_rev > first.text_rev and second.json_rev > first.json_rev

    # A modification that does not touch the answer (e.g. status) changes nothing.
    assert cache.apply("MODIFIED", rec("a", "10.0.0.1", LIVE), "4") == set()
    assert cache.lookup("10.0.0.1") == second

    assert cache.apply("DELETED", rec("a", "10.0.0.1", LIVE), "5") == {"10.0.0.1"}
    assert cache.lookup("10.0.0.1") is None
    assert len(cache) == 0


def test_text_revision_only_moves_when_the_plain_body_changes():
    cache = DropletCache()
    cache.replace([rec("a", "10.0.0.1", LIVE)], "1")
    before = cache.lookup("10.0.0.1")
    resent = MaintenanceState("live_migrate", "2030-02-01T00:00:00Z", "2030-02-01T00:10:00Z")
    assert cache.apply("MODIFIED", rec("a", "10.0.0.1", resent)) == {"10.0.0.1"}
    after = cache.lookup("10.0.0.1")
    assert after.text_rev == before.text_rev  # plain long-polls stay asleep
    assert after.json_rev > before.json_rev  # json long-polls wake


def test_ip_change_moves_the_answer():
    cache = DropletCache()
    cache.replace([rec("a", "10.0.0.1", LIVE)], "1")
    assert cache.apply("MODIFIED", rec("a", "10.0.0.2", LIVE)) == {"10.0.0.1", "10.0.0.2"}
    assert cache.lookup("10.0.0.1") is None
    assert cache.lookup("10.0.0.2").state == LIVE


def test_duplicate_ip_oldest_claim_wins_whatever_the_event_order():
    old = rec("old", "10.0.0.9", NO_EVENT, created="2030-01-01T00:00:00Z")
    new = rec("new", "10.0.0.9", LIVE, created="2030-06-01T00:00:00Z")
    for order in ([old, new], [new, old]):
        cache = DropletCache()
        cache.replace([], "1")
        for r in order:
            cache.apply("ADDED", r)
        answer = cache.lookup("10.0.0.9")
        assert answer.key == ("default", "old")
        assert answer.state == NO_EVENT  # the newcomer's event is not shown to the owner
        assert cache.conflicts() == {"10.0.0.9": [("default", "old"), ("default", "new")]}
    # The owner goes away: the remaining claimant answers, with a new ETag revision.
    before = cache.lookup("10.0.0.9")
    assert cache.apply("DELETED", old) == {"10.0.0.9"}
    after = cache.lookup("10.0.0.9")
    assert after.key == ("default", "new") and after.state == LIVE
    assert after.text_rev > before.text_rev


def test_same_name_in_two_namespaces_are_two_droplets():
    cache = DropletCache()
    cache.replace([rec("a", "10.0.0.1", ns="x"), rec("a", "10.0.0.2", LIVE, ns="y")], "1")
    assert cache.lookup("10.0.0.1").state == NO_EVENT
    assert cache.lookup("10.0.0.2").state == LIVE
    cache.apply("DELETED", rec("a", "10.0.0.1", ns="x"))
    assert cache.lookup("10.0.0.2").state == LIVE


def test_relist_applies_deletions_missed_while_disconnected_and_keeps_unchanged_revisions():
    cache = DropletCache()
    cache.replace([rec("a", "10.0.0.1"), rec("b", "10.0.0.2", LIVE), rec("c", "10.0.0.3")], "10")
    keep = cache.lookup("10.0.0.1")
    changed = cache.replace([rec("a", "10.0.0.1"), rec("c", "10.0.0.3", LIVE), rec("d", "10.0.0.4")], "20")
    assert changed == {"10.0.0.2", "10.0.0.3", "10.0.0.4"}
    assert cache.lookup("10.0.0.1") == keep
    assert cache.lookup("10.0.0.2") is None
    assert cache.lookup("10.0.0.3").state == LIVE
    assert cache.resource_version == "20"


def test_unknown_event_type_is_refused():
    with pytest.raises(ValueError):
        DropletCache().apply("BOOKMARK", rec("a", "10.0.0.1"))


def test_listeners_hear_exactly_the_changed_addresses():
    cache = DropletCache()
    heard = []
    cache.subscribe(heard.append)
    cache.replace([rec("a", "10.0.0.1")], "1")
    cache.apply("MODIFIED", rec("a", "10.0.0.1"))  # no change: no call
    cache.apply("MODIFIED", rec("a", "10.0.0.1", LIVE))
    cache.unsubscribe(heard.append)
    cache.apply("DELETED", rec("a", "10.0.0.1", LIVE))
    assert heard == [{"10.0.0.1"}, {"10.0.0.1"}]


# ---- property: any event sequence ends where a fresh list of the final state does --------

IPS = ["10.0.0.1", "10.0.0.2", "10.0.0.3", None]
NAMES = [("x", "a"), ("x", "b"), ("y", "a"), ("y", "c")]
STATES = [NO_EVENT, LIVE, MaintenanceState("live_migrate", None, None)]
CREATED = ["2030-01-01T00:00:00Z", "2030-01-02T00:00:00Z"]

ops = st.lists(
    st.tuples(st.sampled_from(["ADDED", "MODIFIED", "DELETED"]), st.sampled_from(NAMES),
              st.sampled_from(IPS), st.sampled_from(STATES), st.sampled_from(CREATED)),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_events_converge_to_the_same_answers_as_a_relist(sequence):
    cache = DropletCache()
    cache.replace([], "0")
    world: dict = {}
    for kind, (ns, name), ip, state, created in sequence:
        r = DropletRecord(ns, name, ip, state, created)
        if kind == "DELETED":
            world.pop(r.key, None)
        else:
            world[r.key] = r
        cache.apply(kind, r)
    fresh = DropletCache()
    fresh.replace(list(world.values()), "1")
    for ip in IPS:
        a, b = cache.lookup(ip), fresh.lookup(ip)
        assert (a is None) == (b is None)
        if a is not None:
            assert (a.key, a.state) == (b.key, b.state)
            # invariant: the answering droplet is the oldest claimant of that address
            claimants = [r for r in world.values() if r.ip == ip]
            assert a.key == min(claimants, key=lambda r: r.claim_order).key
    # and relisting the same world onto the event-fed cache changes no answer at all
    assert cache.replace(list(world.values()), "2") == set()


def test_revisions_never_repeat_for_an_address():
    rnd = random.Random(7)
    cache = DropletCache()
    cache.replace([], "0")
    seen: dict[str, set[int]] = {}
    last: dict[str, int] = {}
    for _ in range(2000):
        ip = rnd.choice(IPS[:3])
        name = rnd.choice(NAMES)
        kind = rnd.choice(["ADDED", "MODIFIED", "DELETED"])
        cache.apply(kind, DropletRecord(name[0], name[1], ip, rnd.choice(STATES), rnd.choice(CREATED)))
        a = cache.lookup(ip)
        if a is None:
            continue
        if last.get(ip) != a.json_rev:
            assert a.json_rev not in seen.setdefault(ip, set()), "an ETag revision came back"
            seen[ip].add(a.json_rev)
            last[ip] = a.json_rev
