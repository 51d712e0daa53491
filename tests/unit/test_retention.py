"""PURE retention of finished LiveMigrations: a TTL after finishing and the newest N per droplet."""

from __future__ import annotations

import datetime as dt

from hypothesis import given, strategies as st

from ferry.api.livemigration import LiveMigration
from ferry.migration.retention import expired, finished_at

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def z(t: dt.datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def lm(name: str, droplet: str, phase: str, finished_min: float | None, ns: str = "ns") -> LiveMigration:
    times = {"Pending": z(T0)}
    if finished_min is not None:
        times[phase] = z(T0 + dt.timedelta(minutes=finished_min))
    return LiveMigration.from_body({"metadata": {"name": name, "namespace": ns, "creationTimestamp": z(T0)},
                                    "spec": {"droplet": droplet}, "status": {"phase": phase, "phaseTimes": times}})


def names(ms) -> list[str]:
    return [m.name for m in ms]


def test_ttl_after_finishing_like_a_job():
    ms = [lm("old", "web", "Completed", 0), lm("new", "web", "Failed", 50), lm("running", "web", "PreCopy", None)]
    now = T0 + dt.timedelta(minutes=60)
    assert names(expired(ms, now, ttl_seconds=30 * 60, keep_per_droplet=0)) == ["old"]
    assert names(expired(ms, now, ttl_seconds=5 * 60, keep_per_droplet=0)) == ["old", "new"]
    assert expired(ms, now, ttl_seconds=0, keep_per_droplet=0) == []  # 0: kept forever


def test_newest_n_per_droplet_and_never_a_running_one():
    ms = [lm(f"web-{i}", "web", "Completed", i) for i in range(5)] + [lm("db-0", "db", "Cancelled", 0),
                                                                        lm("web-run", "web", "Announced", None)]
    assert names(expired(ms, T0, ttl_seconds=0, keep_per_droplet=2)) == ["web-0", "web-1", "web-2"]
    assert names(expired(ms, T0, ttl_seconds=0, keep_per_droplet=1)) == ["web-0", "web-1", "web-2", "web-3"]


def test_protected_ones_stay():
    ms = [lm("evac", "web", "Failed", 0), lm("mine", "web", "Completed", 1)]
    assert names(expired(ms, T0 + dt.timedelta(days=9), 60, 0, protected=lambda m: m.name == "evac")) == ["mine"]


def test_the_same_droplet_name_in_two_namespaces_is_two_droplets():
    ms = [lm("a", "web", "Completed", 0, ns="one"), lm("b", "web", "Completed", 1, ns="two")]
    assert expired(ms, T0, 0, 1) == []


def test_finished_at_falls_back_to_the_last_phase_time():
    m = LiveMigration.from_body({"metadata": {"name": "x", "namespace": "ns"}, "spec": {"droplet": "web"},
                                 "status": {"phase": "Cancelled", "phaseTimes": {"Pending": z(T0)}}})
    assert finished_at(m) == T0
    assert finished_at(lm("r", "web", "PreCopy", None)) is None


@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from(["Completed", "Failed", "PreCopy"]),
                          st.integers(0, 100)), max_size=30),
       st.integers(0, 4), st.integers(0, 120))
def test_never_a_running_one_and_at_least_n_kept(items, keep, age_min):
    ms = [lm(f"m{i}", d, p, t if p != "PreCopy" else None) for i, (d, p, t) in enumerate(items)]
    gone = {m.name for m in expired(ms, T0 + dt.timedelta(minutes=100), age_min * 60, keep)}
    assert all(m.terminal for m in ms if m.name in gone)
    if age_min == 0 and keep:
        for d in "abc":
            finished = [m for m in ms if m.droplet == d and m.terminal]
            assert len([m for m in finished if m.name not in gone]) == min(keep, len(finished))
