"""Property tests of ferry.placement against a brute-force reference."""

from __future__ import annotations

import os
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from ferry.api.sizes import Resources
from ferry.placement import (
    FILTERS,
    DropletRequest,
    HostInfo,
    Reservation,
    check_host,
    place,
)

#: Multiply the example counts, e.g. FERRY_PROPERTY_SCALE=20 for a soak run.
SCALE = float(os.environ.get("FERRY_PROPERTY_SCALE", "1"))


def n(examples: int) -> int:
    return max(1, int(examples * SCALE))


DCS = ("nyc3", "ams3")
LABELS = st.dictionaries(st.sampled_from(["tier", "zone"]), st.sampled_from(["a", "b"]), max_size=2)


HOST_ROWS = st.tuples(
    st.tuples(st.integers(1, 32), st.integers(512, 65536), st.integers(10, 2000)),  # capacity
    st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1)),  # allocated fraction
    st.sampled_from(DCS),
    LABELS,
    st.integers(0, 15),  # flags: 3 bits of 4 make ready/schedulable/not-maintenance likely
    st.integers(0, 3),
    st.integers(0, 3),
)


def build_host(i: int, row) -> HostInfo:
    (c, m, d), (fc, fm, fd), dc, labels, flags, in_flight, inbound = row
    return HostInfo(
        name=f"h{i:02d}",
        datacenter=dc,
        capacity=Resources(c, m, d),
        allocated=Resources(int(c * fc), int(m * fm), int(d * fd)),
        labels=labels,
        ready=flags != 1,
        schedulable=flags != 2,
        in_maintenance=flags == 3,
        migrations_in_flight=in_flight,
        inbound_migrations=inbound,
    )


def host_lists(max_hosts: int = 20):
    return st.lists(HOST_ROWS, max_size=max_hosts).map(lambda rows: [build_host(i, r) for i, r in enumerate(rows)])


SIZES = st.builds(Resources, st.integers(1, 8), st.integers(256, 16384), st.integers(10, 320))


@st.composite
def requests(draw, hosts: list[HostInfo]) -> DropletRequest:
    names = [h.name for h in hosts] or ["none"]
    return DropletRequest(
        name=draw(st.sampled_from(["ns/a", "ns/b"])),
        datacenter=draw(st.sampled_from(DCS)),
        resources=draw(SIZES),
        host_selector=draw(st.sampled_from([{}, {}, {"tier": "a"}, {"tier": "a", "zone": "b"}])),
        source_host=draw(st.sampled_from([None, *names])),
    )


@st.composite
def reservations(draw, hosts: list[HostInfo]) -> list[Reservation]:
    names = [h.name for h in hosts] or ["none"]
    return draw(
        st.lists(st.builds(Reservation, st.sampled_from(names), SIZES, st.sampled_from(["ns/a", "ns/x", "ns/y", ""])),
                 max_size=6)
    )


@st.composite
def cases(draw):
    hosts = draw(host_lists())
    return (
        hosts,
        draw(requests(hosts)),
        draw(reservations(hosts)),
        draw(st.sampled_from(["spread", "pack"])),
        draw(st.sampled_from([None, 1, 2])),
    )


def reference_score(h: HostInfo, r: DropletRequest, res: list[Reservation], strategy: str, penalty: float = 10.0) -> float:
    """Independent, slow restatement of the documented formula (equal weights)."""
    used = [h.allocated.cpu, h.allocated.memory_mib, h.allocated.disk_gib]
    for x in res:
        if x.host == h.name and not (x.droplet and x.droplet == r.name):
            used = [used[0] + x.resources.cpu, used[1] + x.resources.memory_mib, used[2] + x.resources.disk_gib]
    caps = [h.capacity.cpu, h.capacity.memory_mib, h.capacity.disk_gib]
    need = [r.resources.cpu, r.resources.memory_mib, r.resources.disk_gib]
    free_after = [(c - u - n) / c for c, u, n in zip(caps, used, need)]
    dims = [100 * f if strategy == "spread" else 100 * (1 - f) for f in free_after]
    return sum(dims) / 3 - penalty * h.migrations_in_flight


@settings(max_examples=n(250), deadline=None)
@given(cases())
def test_agrees_with_brute_force(case):
    hosts, r, res, strategy, limit = case
    result = place(r, hosts, res, strategy, inbound_limit=limit)
    verdicts = {h.name: check_host(r, h, res, inbound_limit=limit) for h in hosts}
    fitting = [h for h in hosts if verdicts[h.name].filter is None]
    # counts
    assert result.considered == len(hosts)
    assert list(result.rejected) == list(FILTERS)
    for f in FILTERS:
        assert result.rejected[f] == sum(1 for v in verdicts.values() if v.filter == f)
    assert result.feasible == len(fitting)
    # never an infeasible host; None only when nothing fits
    if not fitting:
        assert result.chosen is None and result.message.startswith("no host fits")
        return
    assert result.chosen is not None and verdicts[result.chosen].filter is None
    # the best by the documented formula, ties by name
    best = max(reference_score(h, r, res, strategy) for h in fitting)
    chosen_score = reference_score(next(h for h in hosts if h.name == result.chosen), r, res, strategy)
    assert chosen_score >= best - 1e-9
    tied = sorted(h.name for h in fitting if reference_score(h, r, res, strategy) >= best - 1e-9)
    assert result.chosen == tied[0] or abs(chosen_score - reference_score(
        next(h for h in hosts if h.name == tied[0]), r, res, strategy)) < 1e-9
    # candidates: best first, all fitting, scores as documented
    scores = [c.score for c in result.candidates]
    assert scores == sorted(scores, reverse=True)
    for c in result.candidates:
        h = next(x for x in hosts if x.name == c.host)
        assert verdicts[c.host].filter is None
        assert abs(c.score - reference_score(h, r, res, strategy)) < 1e-6
        assert abs((c.cpu + c.memory + c.disk) / 3 - c.penalty - c.score) < 1e-6


@settings(max_examples=n(150), deadline=None)
@given(cases(), st.randoms(use_true_random=False))
def test_order_of_input_does_not_matter(case, rnd):
    hosts, r, res, strategy, limit = case
    a = place(r, hosts, res, strategy, inbound_limit=limit)
    hosts2, res2 = list(hosts), list(res)
    rnd.shuffle(hosts2)
    rnd.shuffle(res2)
    b = place(r, hosts2, res2, strategy, inbound_limit=limit)
    assert a == b


@settings(max_examples=n(150), deadline=None)
@given(cases(), st.data())
def test_explicit_target(case, data):
    hosts, r, res, strategy, limit = case
    names = [h.name for h in hosts] + ["nope"]
    target = data.draw(st.sampled_from(names))
    result = place(r, hosts, res, strategy, target_host=target, inbound_limit=limit)
    h = next((x for x in hosts if x.name == target), None)
    if h is None:
        assert result.chosen is None and result.target_rejected_by == "notFound"
        return
    v = check_host(r, h, res, inbound_limit=limit)
    if v.filter is None:
        assert result.chosen == target and target in [c.host for c in result.candidates]
    else:
        assert result.chosen is None
        assert result.target_rejected_by == v.filter
        assert result.message == f"target host {target} rejected: {v.detail}"


@settings(max_examples=n(100), deadline=None)
@given(host_lists(max_hosts=12), st.lists(SIZES, min_size=1, max_size=40),
       st.sampled_from(["spread", "pack"]), st.data())
def test_never_over_commits_counting_reservations(hosts, sizes, strategy, data):
    """Place droplets one by one, each adding a reservation on its host: no host ever
    exceeds its capacity beyond what it already had allocated."""
    reservations: list[Reservation] = []
    for i, size in enumerate(sizes):
        target = data.draw(st.sampled_from([None, None, None, *[h.name for h in hosts]]))
        r = DropletRequest(f"ns/d{i}", "nyc3", size)
        result = place(r, hosts, reservations, strategy, target_host=target)
        if result.chosen is not None:
            reservations.append(Reservation(result.chosen, size, r.name))
    for h in hosts:
        mine = [x.resources for x in reservations if x.host == h.name]
        if not mine:
            continue
        total = h.allocated
        for x in mine:
            total = total + x
        assert total.fits_in(h.capacity), (h, mine)
        assert h.datacenter == "nyc3" and h.ready and h.schedulable and not h.in_maintenance


def test_large_random_fleet_smoke():
    rnd = random.Random(7)
    hosts = [
        HostInfo(f"h{i:04d}", rnd.choice(DCS), Resources(32, 131072, 4000),
                 Resources(rnd.randint(0, 32), rnd.randint(0, 131072), rnd.randint(0, 4000)),
                 ready=rnd.random() > 0.05)
        for i in range(2000)
    ]
    r = DropletRequest("ns/x", "nyc3", Resources(4, 8192, 160))
    result = place(r, hosts)
    assert result.chosen is not None
    assert check_host(r, next(h for h in hosts if h.name == result.chosen)).filter is None
    assert len(result.candidates) == 3
