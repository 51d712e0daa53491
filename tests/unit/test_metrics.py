"""The metrics' content: an agent's data plane per migration and the operator's fleet
snapshot. Bounded label sets: what is not in flight any more has no series."""

from __future__ import annotations

import dataclasses

from fakes import NOW, lm, stats, ts, vm
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ferry.agent.metrics import AgentMetrics
from ferry.api.models import Host
from ferry.controller.metrics import Metrics
from ferry.drivers.base import MigrationState as M
from ferry.drivers.base import VMState as V


def scrape(registry) -> dict[tuple[str, tuple], float]:
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def names(samples: dict) -> set[str]:
    return {name for name, _ in samples}


def test_an_agent_serves_its_sending_migration_then_forgets_it() -> None:
    m = AgentMetrics("a")
    s = dataclasses.replace(stats("ns/move#2", M.CONVERGING, total=4000, sent=3000, remaining=600, rounds=3),
                            dirty_rate_bps=5000, bandwidth_bps=9000, throttle_percent=30, expected_downtime_ms=250)
    migrations = {("ns", "move"): lm(attempt=2)}
    m.refresh({vm().key: vm(mid="ns/move#2", st=s), vm("idle").key: vm("idle"),
               vm("in").key: vm("in", V.INCOMING, mid="ns/other#1", st=stats("ns/other#1", M.COPYING))}, migrations)
    got = scrape(m.registry)
    labels = (("droplet", "web"), ("host", "a"), ("migration", "move"), ("namespace", "ns"), ("target_host", "b"))
    assert {name: got[(name, labels)] for name in names(got) if name.startswith("ferry_migration_")} == {
        "ferry_migration_processed_bytes": 3000, "ferry_migration_remaining_bytes": 600,
        "ferry_migration_total_bytes": 4000, "ferry_migration_dirty_rate_bytes_per_second": 5000,
        "ferry_migration_bandwidth_bytes_per_second": 9000, "ferry_migration_throttle_ratio": 0.3,
        "ferry_migration_round": 3, "ferry_migration_expected_downtime_seconds": 0.25, "ferry_migration_attempt": 2}
    # the incoming VM (target side) has no data-plane series here: one exporter per migration
    assert not [k for k in got if k[0].startswith("ferry_migration_") and ("migration", "other") in k[1]]
    assert got[("ferry_agent_vms", (("host", "a"), ("state", "Running")))] == 2
    assert got[("ferry_agent_vms", (("host", "a"), ("state", "Incoming")))] == 1
    # the copy completed: its series go away
    done = stats("ns/move#2", M.COMPLETED, total=4000, sent=4000, rounds=4)
    m.refresh({vm().key: vm(mid="ns/move#2", st=done)}, migrations)
    after = scrape(m.registry)
    assert not [k for k in after if k[0].startswith("ferry_migration_")]
    assert after[("ferry_agent_vms", (("host", "a"), ("state", "Running")))] == 1


def host_body(name: str, *, maintenance: bool = False, heartbeat: str | None = None, left: int = 0) -> dict:
    status = {"droplets": 3, "allocated": {"cpu": 2, "memoryMiB": 1024, "diskGiB": 50}}
    if heartbeat:
        status["agent"] = {"heartbeatTime": heartbeat, "address": "127.0.0.1"}
    if maintenance:
        status["evacuation"] = {"dropletsLeft": left}
    spec = {"datacenter": "nyc3", "capacity": {"cpu": 8, "memoryMiB": 16384, "diskGiB": 500}}
    if maintenance:
        spec["maintenance"] = {"reason": "kernel"}
    return {"apiVersion": "ferry.dev/v1alpha1", "kind": "Host", "metadata": {"name": name}, "spec": spec,
            "status": status}


def test_the_operator_serves_each_host_and_each_migration_in_flight() -> None:
    m = Metrics()
    hosts = [Host.from_body(host_body("a", maintenance=True, heartbeat=ts(2), left=2)),
             Host.from_body(host_body("b", heartbeat=ts(100))), Host.from_body(host_body("c"))]
    moving = lm(phase="PreCopy")
    m.refresh(hosts, [moving, lm("old", phase="Completed")], NOW, heartbeat_timeout=30)
    got = scrape(m.registry)
    a, b, c = (("host", "a"),), (("host", "b"),), (("host", "c"),)
    assert got[("ferry_host_droplets", a)] == 3 and got[("ferry_host_allocated_memory_bytes", a)] == 1024 << 20
    assert got[("ferry_host_capacity_disk_bytes", a)] == 500 << 30 and got[("ferry_host_allocated_cpus", a)] == 2
    assert got[("ferry_host_ready", a)] == 1 and got[("ferry_host_ready", b)] == 0 and got[("ferry_host_ready", c)] == 0
    assert got[("ferry_host_heartbeat_timestamp_seconds", b)] == NOW.timestamp() - 100
    assert ("ferry_host_heartbeat_timestamp_seconds", c) not in got  # never heartbeated
    assert got[("ferry_host_maintenance", a)] == 1 and got[("ferry_host_evacuation_droplets_remaining", a)] == 2
    assert ("ferry_host_evacuation_droplets_remaining", b) not in got
    assert got[("ferry_host_migrations_in_flight", (("direction", "outbound"), ("host", "a")))] == 1
    assert got[("ferry_host_migrations_in_flight", (("direction", "inbound"), ("host", "b")))] == 1
    progress = [k for k in got if k[0] == "ferry_migration_last_progress_timestamp_seconds"]
    assert [dict(k[1])["migration"] for k in progress] == ["move"]  # the Completed one has none
    # the host is deleted and the migration ended: their series are gone
    m.refresh(hosts[1:], [lm(phase="Completed")], NOW, heartbeat_timeout=30)
    after = scrape(m.registry)
    assert not [k for k in after if ("host", "a") in k[1]]
    assert not [k for k in after if k[0] == "ferry_migration_last_progress_timestamp_seconds"]
