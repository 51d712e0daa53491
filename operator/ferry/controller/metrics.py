"""Prometheus metrics of the operator (prometheus_client).

Counters and histograms count what ended (outcomes by reason; downtime, duration and rounds
of completed migrations). The fleet's state (per host: droplets, allocation, migrations in
flight, heartbeat, evacuation; per migration in flight: when it last made progress) is a
snapshot that ``refresh`` rebuilds from the operator's world about once a second and every
scrape reads whole: a host or a migration that is gone, or no longer in flight, has no
series any more (the label sets stay bounded by what exists now). The data plane of each
migration (bytes, rates, throttle, round) is served by its source host's agent
(``ferry.agent.metrics``).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ferry.api.livemigration import LiveMigration
from ferry.api.models import Host
from ferry.api.phases import IN_FLIGHT
from ferry.exposition import Snapshot, serve

MIB = 1 << 20
GIB = 1 << 30

#: Terminal (result, reason) pairs that exist from the start at 0, so that increase() sees the
#: first one (a counter series born at 1 shows no increase). Other reasons appear when they occur.
OUTCOMES = (("Completed", "Completed"), ("Cancelled", "Cancelled"), ("Failed", "AttemptsExhausted"))
#: Attempt results and the reasons the state machine gives a failed attempt.
ATTEMPT_OUTCOMES = (("Succeeded", "Completed"), ("Cancelled", "Cancelled"),
                    *(("Failed", r) for r in ("SourceFailed", "TargetFailed", "ConnectionLost", "TargetHostNotReady", "NoProgress",
                                              "BudgetExceeded", "DigestMismatch")))

#: name -> (help, label names) of the snapshot's gauges.
FLEET = {
    "ferry_host_droplets": ("Droplets whose placement record names the host", ("host",)),
    "ferry_host_capacity_cpus": ("vCPUs of the host (spec.capacity)", ("host",)),
    "ferry_host_capacity_memory_bytes": ("Memory of the host (spec.capacity)", ("host",)),
    "ferry_host_capacity_disk_bytes": ("Disk of the host (spec.capacity)", ("host",)),
    "ferry_host_allocated_cpus": ("vCPUs allocated to droplets on the host (status.allocated)", ("host",)),
    "ferry_host_allocated_memory_bytes": ("Memory allocated to droplets on the host", ("host",)),
    "ferry_host_allocated_disk_bytes": ("Disk allocated to droplets on the host", ("host",)),
    "ferry_host_migrations_in_flight": ("Migrations in flight from (outbound) or to (inbound) the host",
                                        ("host", "direction")),
    "ferry_host_ready": ("1 if the host's agent heartbeat is fresh", ("host",)),
    "ferry_host_heartbeat_timestamp_seconds": ("Time of the host agent's last heartbeat (Unix seconds)", ("host",)),
    "ferry_host_maintenance": ("1 if the host is in maintenance (being evacuated)", ("host",)),
    "ferry_host_evacuation_droplets_remaining": ("Droplets still on a host in maintenance", ("host",)),
    "ferry_migration_last_progress_timestamp_seconds": (
        "When a migration in flight last made progress (Unix seconds): its transfer or target report "
        "changed, or it entered its phase", ("namespace", "migration", "droplet", "phase")),
}


def _ts(t: dt.datetime) -> float:
    return t.timestamp()


def _num(v: object) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def fleet_samples(hosts: Iterable[Host], migrations: Iterable[LiveMigration], now: dt.datetime,
                  heartbeat_timeout: float) -> dict[str, list[tuple[tuple[str, ...], float]]]:
    """PURE: metric name -> [(label values, value)] of the fleet's state now."""
    out: dict[str, list[tuple[tuple[str, ...], float]]] = {name: [] for name in FLEET}
    migrations = list(migrations)
    outbound: dict[str, int] = {}
    inbound: dict[str, int] = {}
    for m in migrations:
        if m.phase not in IN_FLIGHT:
            continue
        if m.status.source_host:
            outbound[m.status.source_host] = outbound.get(m.status.source_host, 0) + 1
        if m.status.target_host:
            inbound[m.status.target_host] = inbound.get(m.status.target_host, 0) + 1
        out["ferry_migration_last_progress_timestamp_seconds"].append(
            ((m.namespace, m.name, m.droplet, str(m.phase)), _ts(_last_progress(m, now))))
    for h in hosts:
        k = (h.name,)
        st = h.status
        alloc = st.get("allocated") if isinstance(st.get("allocated"), dict) else {}
        out["ferry_host_droplets"].append((k, _num(st.get("droplets")) or 0.0))
        out["ferry_host_capacity_cpus"].append((k, float(h.capacity.cpu)))
        out["ferry_host_capacity_memory_bytes"].append((k, float(h.capacity.memory_mib * MIB)))
        out["ferry_host_capacity_disk_bytes"].append((k, float(h.capacity.disk_gib * GIB)))
        out["ferry_host_allocated_cpus"].append((k, _num(alloc.get("cpu")) or 0.0))
        out["ferry_host_allocated_memory_bytes"].append((k, (_num(alloc.get("memoryMiB")) or 0.0) * MIB))
        out["ferry_host_allocated_disk_bytes"].append((k, (_num(alloc.get("diskGiB")) or 0.0) * GIB))
        out["ferry_host_migrations_in_flight"] += [((h.name, "outbound"), float(outbound.get(h.name, 0))),
                                                   ((h.name, "inbound"), float(inbound.get(h.name, 0)))]
        out["ferry_host_ready"].append((k, 1.0 if h.ready(now, heartbeat_timeout) else 0.0))
        if h.agent.heartbeat is not None:
            out["ferry_host_heartbeat_timestamp_seconds"].append((k, _ts(h.agent.heartbeat)))
        out["ferry_host_maintenance"].append((k, 1.0 if h.in_maintenance else 0.0))
        if h.in_maintenance:
            ev = st.get("evacuation") if isinstance(st.get("evacuation"), dict) else {}
            left = _num(ev.get("dropletsLeft"))
            out["ferry_host_evacuation_droplets_remaining"].append((k, left if left is not None else
                                                                    _num(st.get("droplets")) or 0.0))
    return out


def _last_progress(m: LiveMigration, now: dt.datetime) -> dt.datetime:
    """The progress mark of the current attempt, else when the migration entered its phase."""
    mark = m.status.progress_mark
    entered = m.status.phase_times.get(m.phase) if m.phase else None
    if mark is not None and mark.attempt == m.status.attempt:
        return max(mark.at, entered) if entered else mark.at
    return entered or m.meta.created or now


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.migrations = Counter("ferry_migrations_total", "LiveMigrations that ended, by result and reason",
                                  ["result", "reason"], registry=r)
        self.attempts = Counter("ferry_migration_attempts_total",
                                "Migration attempts that ended, by result and reason", ["result", "reason"], registry=r)
        for result, reason in OUTCOMES:
            self.migrations.labels(result, reason)
        for result, reason in ATTEMPT_OUTCOMES:
            self.attempts.labels(result, reason)
        self.duration = Histogram("ferry_migration_duration_seconds", "Start of copy to Completed",
                                  buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600), registry=r)
        self.downtime = Histogram("ferry_migration_downtime_seconds", "Guest pause at cut-over",
                                  buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 5), registry=r)
        self.rounds = Histogram("ferry_migration_rounds", "Pre-copy rounds of completed migrations (the pause included)",
                                buckets=(1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 50, 100, 200), registry=r)
        self.bytes = Counter("ferry_migration_bytes_total", "Bytes copied by completed migrations", registry=r)
        self.queued = Gauge("ferry_migrations_queued", "LiveMigrations waiting (Pending/Announced)", registry=r)
        self.in_flight = Gauge("ferry_migrations_in_flight", "LiveMigrations copying or cutting over", registry=r)
        self.hosts_ready = Gauge("ferry_hosts_ready", "Hosts with a fresh agent heartbeat", registry=r)
        self._fleet = Snapshot(FLEET)
        r.register(self._fleet)

    def refresh(self, hosts: Iterable[Host], migrations: Iterable[LiveMigration], now: dt.datetime,
                heartbeat_timeout: float) -> None:
        """Rebuild the fleet's gauges (call from the operator's loop; scrapes read the result)."""
        self._fleet.set(fleet_samples(hosts, migrations, now, heartbeat_timeout))

    def completed(self, seconds: float | None, downtime_ms: int | None, rounds: int | None,
                  bytes_sent: int | None) -> None:
        if seconds is not None:
            self.duration.observe(seconds)
        if downtime_ms is not None:
            self.downtime.observe(downtime_ms / 1000)
        if rounds:
            self.rounds.observe(rounds)
        if bytes_sent:
            self.bytes.inc(bytes_sent)

    def serve(self, port: int, log: logging.Logger) -> bool:
        return serve(self.registry, port, log, "operator")

