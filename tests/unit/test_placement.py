"""Table-driven tests of ferry.placement."""

from __future__ import annotations

import pytest

from ferry.api.sizes import Resources
from ferry.placement import (
    FILTERS,
    DropletRequest,
    HostInfo,
    Reservation,
    check_host,
    place,
)

CAP = Resources(16, 32768, 1000)
EMPTY = Resources(0, 0, 0)
REQ = DropletRequest("default/web", "nyc3", Resources(2, 4096, 80))


def host(name: str, *, alloc: Resources = EMPTY, cap: Resources = CAP, dc: str = "nyc3", **kw) -> HostInfo:
    return HostInfo(name, dc, cap, alloc, **kw)


def req(**kw) -> DropletRequest:
    base = dict(name="default/web", datacenter="nyc3", resources=Resources(2, 4096, 80))
    base.update(kw)
    return DropletRequest(**base)


# ---------------------------------------------------------------- filters


@pytest.mark.parametrize(
    "h, request_kw, filter_name, detail",
    [
        (host("a", dc="ams3"), {}, "datacenter", "wrong datacenter (host in ams3, droplet in nyc3)"),
        (host("a", ready=False), {}, "ready", "not ready (no recent agent heartbeat)"),
        (host("a", schedulable=False), {}, "schedulable", "not schedulable (cordoned)"),
        (host("a", in_maintenance=True), {}, "maintenance", "in maintenance"),
        (host("a"), {"source_host": "a"}, "source", "is the droplet's current (source) host"),
        (host("a", labels={"tier": "silver"}), {"host_selector": {"tier": "gold"}}, "hostSelector",
         "hostSelector needs tier=gold, host has tier=silver"),
        (host("a"), {"host_selector": {"tier": "gold"}}, "hostSelector", "hostSelector needs tier=gold, host has absent"),
        (host("a", alloc=Resources(15, 0, 0)), {}, "cpu", "insufficient cpu (needs 2, 1 free)"),
        (host("a", alloc=Resources(0, 30720, 0)), {}, "memory", "insufficient memory (needs 4096 MiB, 2048 free)"),
        (host("a", alloc=Resources(0, 0, 990)), {}, "disk", "insufficient disk (needs 80 GiB, 10 free)"),
        (host("a", alloc=Resources(20, 0, 0)), {}, "cpu", "insufficient cpu (needs 2, 0 free)"),  # over-committed
    ],
)
def test_each_filter(h, request_kw, filter_name, detail):
    r = req(**request_kw)
    res = place(r, [h])
    assert res.chosen is None
    assert res.rejected[filter_name] == 1 and sum(res.rejected.values()) == 1
    assert res.reason == "NoHostFits"
    v = check_host(r, h)
    assert (v.filter, v.detail) == (filter_name, detail)
    t = place(r, [h], target_host="a")
    assert t.chosen is None and t.target_rejected_by == filter_name
    assert t.message == f"target host a rejected: {detail}"


def test_first_failing_filter_wins():
    # fails datacenter, ready, schedulable, maintenance and memory: counted once, as datacenter
    h = host("a", dc="ams3", ready=False, schedulable=False, in_maintenance=True, alloc=Resources(0, 32768, 0))
    res = place(req(), [h])
    assert res.rejected == {f: (1 if f == "datacenter" else 0) for f in FILTERS}
    # ready before schedulable, maintenance, memory
    h = host("a", ready=False, schedulable=False, in_maintenance=True, alloc=Resources(0, 32768, 0))
    assert check_host(req(), h).filter == "ready"
    # cpu before memory before disk
    h = host("a", alloc=Resources(16, 32768, 1000))
    assert check_host(req(), h).filter == "cpu"
    h = host("a", alloc=Resources(0, 32768, 1000))
    assert check_host(req(), h).filter == "memory"


def test_no_fit_message_lists_counts_in_filter_order():
    hosts = [
        host("d1", dc="ams3"), host("d2", dc="ams3"), host("d3", dc="sfo2"),
        host("n1", ready=False), host("n2", ready=False),
        host("m1", alloc=Resources(0, 30000, 0)),
    ]
    res = place(req(), hosts)
    assert res.message == "no host fits: 3 wrong datacenter, 2 not ready, 1 insufficient memory"
    assert res.considered == 6 and res.feasible == 0 and res.candidates == ()


def test_no_hosts_at_all():
    res = place(req(), [])
    assert res.chosen is None and res.message == "no host fits: no hosts known" and res.considered == 0


def test_selector_matches_all_labels():
    r = req(host_selector={"tier": "gold", "zone": "a"})
    hosts = [host("x", labels={"tier": "gold"}), host("y", labels={"tier": "gold", "zone": "a", "extra": "1"})]
    assert place(r, hosts).chosen == "y"


# ---------------------------------------------------------------- reservations


def test_reservations_count_against_capacity():
    hosts = [host("a", alloc=Resources(12, 0, 0)), host("b", alloc=Resources(13, 0, 0))]
    assert place(req(), hosts).chosen == "a"
    # a: 16 - 12 - 3 reserved = 1 free < 2
    res = place(req(), hosts, [Reservation("a", Resources(3, 4096, 80), "default/other")])
    assert res.chosen == "b"
    # b: 16 - 13 - 2 reserved = 1 free < 2 (two reservations on one host add up)
    res = place(req(), hosts, [Reservation("a", Resources(3, 4096, 80), "default/other"),
                               Reservation("b", Resources(1, 0, 0), "default/third"),
                               Reservation("b", Resources(1, 0, 0), "default/fourth")])
    assert res.chosen is None and res.rejected["cpu"] == 2


def test_own_reservation_is_ignored():
    hosts = [host("a", alloc=Resources(14, 0, 0))]
    assert place(req(), hosts, [Reservation("a", Resources(2, 4096, 80), "default/web")]).chosen == "a"
    assert place(req(), hosts, [Reservation("a", Resources(2, 4096, 80))]).chosen is None


# ---------------------------------------------------------------- scoring


def test_spread_prefers_free_pack_prefers_full():
    hosts = [host("empty"), host("half", alloc=Resources(8, 16384, 500)), host("full", alloc=Resources(14, 28672, 920))]
    assert place(req(), hosts, strategy="spread").chosen == "empty"
    assert place(req(), hosts, strategy="pack").chosen == "full"


def test_scores_per_dimension():
    hosts = [host("a", alloc=Resources(6, 12288, 420))]  # after placing: 8/16, 16384/32768, 500/1000 free
    c = place(req(), hosts).candidates[0]
    assert (c.cpu, c.memory, c.disk, c.penalty) == (50.0, 50.0, 50.0, 0.0)
    assert c.score == pytest.approx(50.0)
    p = place(req(), hosts, strategy="pack").candidates[0]
    assert (p.cpu, p.memory, p.disk) == (50.0, 50.0, 50.0) and p.score == pytest.approx(50.0)


def test_weights():
    hosts = [host("cpu-rich", alloc=Resources(0, 24576, 0)), host("mem-rich", alloc=Resources(12, 0, 0))]
    assert place(req(), hosts, weights=(1, 0, 0)).chosen == "cpu-rich"
    assert place(req(), hosts, weights=(0, 1, 0)).chosen == "mem-rich"


def test_migrations_in_flight_penalty():
    hosts = [host("busy", migrations_in_flight=2), host("calm", alloc=Resources(1, 0, 0))]
    res = place(req(), hosts)
    assert res.chosen == "calm"
    busy = next(c for c in res.candidates if c.host == "busy")
    assert busy.penalty == 20.0
    assert place(req(), hosts, migration_penalty=0).chosen == "busy"


def test_tie_break_by_name_and_top_n():
    hosts = [host(n) for n in ("h3", "h1", "h4", "h2")]
    res = place(req(), hosts, top=3)
    assert res.chosen == "h1"
    assert [c.host for c in res.candidates] == ["h1", "h2", "h3"]
    assert [c.host for c in place(req(), hosts, top=1).candidates] == ["h1"]
    assert len(place(req(), hosts, top=10).candidates) == 4


def test_candidates_sorted_best_first():
    hosts = [host(f"h{i}", alloc=Resources(i, i * 1024, i * 10)) for i in range(10)]
    res = place(req(), hosts, top=5)
    scores = [c.score for c in res.candidates]
    assert scores == sorted(scores, reverse=True) and res.chosen == "h0"
    assert "chose h0" in res.message and "10 fitting of 10 hosts" in res.message


def test_inbound_limit():
    hosts = [host("a", inbound_migrations=2), host("b", alloc=Resources(10, 0, 0), inbound_migrations=1)]
    assert place(req(), hosts).chosen == "a"  # no limit given
    res = place(req(), hosts, inbound_limit=2)
    assert res.chosen == "b" and res.rejected["inbound"] == 1
    res = place(req(), hosts, inbound_limit=1)
    assert res.chosen is None and res.message == "no host fits: 2 at inbound migration limit"


# ---------------------------------------------------------------- explicit target


def test_explicit_target_honoured_even_if_not_best():
    hosts = [host("a"), host("b", alloc=Resources(10, 0, 0)), host("c", alloc=Resources(4, 0, 0)),
             host("d", alloc=Resources(6, 0, 0)), host("e", alloc=Resources(8, 0, 0))]
    res = place(req(), hosts, target_host="b", top=2)
    assert res.chosen == "b" and res.reason == "Placed"
    assert [c.host for c in res.candidates] == ["a", "c", "b"]  # appended so status explains it
    assert res.message.startswith("target host b accepted")


def test_explicit_target_not_found():
    res = place(req(), [host("a")], target_host="zz")
    assert res.chosen is None and res.target_rejected_by == "notFound"
    assert res.message == "target host zz rejected: no such host"


def test_explicit_target_example_from_the_brief():
    hosts = [host("h1"), host("h3", alloc=Resources(0, 32768 - 2048, 0))]
    res = place(req(resources=Resources(2, 4096, 80)), hosts, target_host="h3")
    assert res.message == "target host h3 rejected: insufficient memory (needs 4096 MiB, 2048 free)"
    assert res.chosen is None and res.reason == "TargetHostRejected"
    assert [c.host for c in res.candidates] == ["h1"]  # the explanation still shows who would fit


# ---------------------------------------------------------------- status and errors


def test_to_status_shape():
    res = place(req(source_host="b"), [host("a", alloc=Resources(1, 1024, 10)), host("b"), host("c", ready=False)])
    s = res.to_status()
    assert s["chosen"] == "a" and s["strategy"] == "spread" and s["considered"] == 3
    assert list(s["rejected"]) == list(FILTERS)  # every filter, zeros included (merge-patch safe)
    assert s["rejected"]["source"] == 1 and s["rejected"]["ready"] == 1
    assert s["candidates"] == [{"host": "a", "score": 85.54, "cpu": 81.25, "memory": 84.38, "disk": 91.0, "penalty": 0.0}]
    assert s["message"] == res.message


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"strategy": "random"}, "unknown placement strategy"),
        ({"top": 0}, "top must be at least 1"),
        ({"weights": (0, 0, 0)}, "weights"),
        ({"weights": (-1, 1, 1)}, "weights"),
    ],
)
def test_bad_arguments(kw, message):
    with pytest.raises(ValueError, match=message):
        place(req(), [host("a")], **kw)


@pytest.mark.parametrize("other", [host("a"), host("a", labels={"x": "y"})])
def test_duplicate_host_names_among_the_best_are_rejected(other):
    with pytest.raises(ValueError, match="unique"):
        place(req(), [host("a"), other])


def test_request_must_ask_for_something():
    with pytest.raises(ValueError, match="at least 1"):
        DropletRequest("x", "nyc3", Resources(0, 1024, 10))


def test_a_retry_avoids_the_host_an_earlier_attempt_failed_on():
    hosts = [host("h1", alloc=Resources(8, 0, 0)), host("h2")]  # h2 is the better score
    why = {"h2": "attempt 1 failed there: TargetFailed"}
    r = place(req(source_host="src"), hosts, avoid=why)
    assert r.chosen == "h1"
    assert r.avoided == why and r.to_status()["avoided"] == why
    assert "avoided h2 (attempt 1 failed there: TargetFailed)" in r.message
    assert [c.host for c in r.candidates] == ["h1"]


def test_a_retry_goes_back_to_a_failed_host_only_when_nothing_else_fits():
    why = {"h2": "attempt 1 failed there: TargetFailed"}
    r = place(req(source_host="src"), [host("h2"), host("full", alloc=CAP)], avoid=why)
    assert r.chosen == "h2"
    assert "h2 again although attempt 1 failed there: TargetFailed: no other host fits" in r.message
    # an explicit target is what the user asked for: never avoided
    assert place(req(source_host="src"), [host("h1"), host("h2")], target_host="h2", avoid=why).chosen == "h2"


# ---------------------------------------------------------------- compatibility

from ferry.api.models import Platform  # noqa: E402
from ferry.placement.model import incompatibility  # noqa: E402

SRC = Platform("sim", "0.3.1", "EPYC", frozenset({"sse2", "avx2", "aes"}))


@pytest.mark.parametrize("host_platform, vcpus, why", [
    (None, 2, None),                                                       # reports nothing: fits
    (Platform("sim", "0.3.1", "EPYC", frozenset({"sse2", "avx2", "aes"})), 2, None),
    (Platform("sim", "0.4", "Xeon", frozenset({"sse2", "avx2", "aes", "avx512f"})), 2, None),  # newer, more flags
    (Platform("qemu", "8.2.2", "EPYC", SRC.cpu_flags), 2, "driver qemu, the guest runs under sim"),
    (Platform("sim", "0.2.9", "EPYC", SRC.cpu_flags), 2, "hypervisor 0.2.9 is older than the source's 0.3.1"),
    (Platform("sim", "0.3.1", "EPYC", frozenset({"sse2"})), 2, "CPU lacks 2 flag(s) the guest uses: aes, avx2"),
])
def test_incompatibility(host_platform, vcpus, why):
    got = incompatibility(SRC, vcpus, host_platform)
    assert (got is None) == (why is None) and (why is None or got.startswith(why)), got


def test_qemu_caps_vcpus_at_the_hosts_cores_even_for_a_new_droplet():
    q = Platform("qemu", "8.2", None, frozenset(), cores=2)
    assert incompatibility(None, 4, q).startswith("2 cores, the guest has 4 vCPUs")
    assert incompatibility(None, 2, q) is None
    # models are compared only when neither side reports flags
    assert incompatibility(Platform("sim", None, "EPYC"), 1, Platform("sim", None, "Xeon")).startswith("CPU model")


def test_placement_refuses_an_incompatible_target_with_a_per_host_reason():
    old = host("old", platform=Platform("sim", "0.3.1", None, frozenset({"sse2"})))
    new = host("new", alloc=Resources(8, 0, 0), platform=Platform("sim", "0.3.1", None, SRC.cpu_flags))
    r = place(req(source_host="src", platform=SRC), [old, new])
    assert r.chosen == "new" and r.rejected["compatible"] == 1
    assert r.incompatible == {"old": "CPU lacks 2 flag(s) the guest uses: aes, avx2"}
    assert r.to_status()["incompatible"] == r.incompatible
    none = place(req(source_host="src", platform=SRC), [old])
    assert none.chosen is None and "1 incompatible (old: CPU lacks" in none.message
    t = place(req(source_host="src", platform=SRC), [old, new], target_host="old")
    assert t.chosen is None and t.target_rejected_by == "compatible"
    assert t.message == "target host old rejected: incompatible: CPU lacks 2 flag(s) the guest uses: aes, avx2"
