"""Prometheus metrics of the operator (prometheus_client)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.migrations = Counter("ferry_migrations_total", "LiveMigrations that ended, by result",
                                  ["result"], registry=r)
        self.attempts = Counter("ferry_migration_attempts_total", "Migration attempts that ended, by result",
                                ["result"], registry=r)
        self.duration = Histogram("ferry_migration_duration_seconds", "Start of copy to Completed",
                                  buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600), registry=r)
        self.downtime = Histogram("ferry_migration_downtime_seconds", "Guest pause at cut-over",
                                  buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 5), registry=r)
        self.bytes = Counter("ferry_migration_bytes_total", "Bytes copied by completed migrations", registry=r)
        self.queued = Gauge("ferry_migrations_queued", "LiveMigrations waiting (Pending/Announced)", registry=r)
        self.in_flight = Gauge("ferry_migrations_in_flight", "LiveMigrations copying or cutting over", registry=r)
        self.hosts_ready = Gauge("ferry_hosts_ready", "Hosts with a fresh agent heartbeat", registry=r)

    def serve(self, port: int) -> None:
        start_http_server(port, registry=self.registry)
