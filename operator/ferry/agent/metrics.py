"""Prometheus metrics of an agent: its host's VMs and, per migration this host is sending,
the data plane as the driver reports it (fresher than status.transfer, which is rate-limited).

Names follow KubeVirt's ``kubevirt_vmi_migration_*`` where they overlap (processed, remaining,
dirty rate). A migration's series exist while its source sends (Copying, Converging, Paused):
each cycle rebuilds the snapshot whole, so a finished, failed or cancelled migration's series
are gone at the next scrape.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from prometheus_client import CollectorRegistry

from ferry.agent import plan as p
from ferry.api.livemigration import LiveMigration
from ferry.drivers.base import MigrationState, VMKey, VMState
from ferry.exposition import Samples, Snapshot, serve

MIGRATION_LABELS = ("namespace", "migration", "droplet", "host", "target_host")

AGENT = {
    "ferry_agent_vms": ("VMs on this host by state", ("host", "state")),
    "ferry_migration_processed_bytes": ("Bytes of disk and memory sent so far by this attempt", MIGRATION_LABELS),
    "ferry_migration_remaining_bytes": ("Dirty bytes still to send", MIGRATION_LABELS),
    "ferry_migration_total_bytes": ("Bytes of disk and memory images to migrate", MIGRATION_LABELS),
    "ferry_migration_dirty_rate_bytes_per_second": ("Rate at which the guest dirties disk and memory",
                                                    MIGRATION_LABELS),
    "ferry_migration_bandwidth_bytes_per_second": ("Measured copy rate", MIGRATION_LABELS),
    "ferry_migration_throttle_ratio": ("Guest throttle now, 0 to 1 (auto-converge)", MIGRATION_LABELS),
    "ferry_migration_round": ("Pre-copy round now (1 is the bulk copy)", MIGRATION_LABELS),
    "ferry_migration_expected_downtime_seconds": ("Downtime if the guest were paused now", MIGRATION_LABELS),
    "ferry_migration_attempt": ("Attempt number of the migration", MIGRATION_LABELS),
}

#: The source is sending: the data plane's figures are live.
SENDING = frozenset({MigrationState.COPYING, MigrationState.CONVERGING, MigrationState.PAUSED})


def agent_samples(host: str, vms: Mapping[VMKey, p.VMObs],
                  migrations: Mapping[p.MigKey, LiveMigration | None]) -> Samples:
    """PURE: metric name -> [(label values, value)] of this host now."""
    out: dict[str, list[tuple[tuple[str, ...], float]]] = {name: [] for name in AGENT}
    by_state = {s: 0 for s in VMState}
    for vm in vms.values():
        by_state[vm.state] += 1
        mid = vm.source_busy_mid
        s = vm.stats
        ref = p.parse_migration_id(mid)
        if s is None or ref is None or s.state not in SENDING:
            continue
        ns, name, attempt = ref
        lm = migrations.get((ns, name))
        labels = (ns, name, vm.key.name, host, (lm.status.target_host if lm is not None else None) or "")
        values = {
            "ferry_migration_processed_bytes": s.bytes_sent,
            "ferry_migration_remaining_bytes": s.dirty_remaining,
            "ferry_migration_total_bytes": s.bytes_total,
            "ferry_migration_dirty_rate_bytes_per_second": s.dirty_rate_bps,
            "ferry_migration_bandwidth_bytes_per_second": s.bandwidth_bps,
            "ferry_migration_throttle_ratio": s.throttle_percent / 100,
            "ferry_migration_round": s.round,
            "ferry_migration_expected_downtime_seconds": s.expected_downtime_ms / 1000,
            "ferry_migration_attempt": attempt,
        }
        for metric, value in values.items():
            out[metric].append((labels, float(value)))
    out["ferry_agent_vms"] = [((host, s.value), float(n)) for s, n in by_state.items()]
    return out


class AgentMetrics:
    def __init__(self, host: str) -> None:
        self.host = host
        self.registry = CollectorRegistry()
        self._snapshot = Snapshot(AGENT)
        self.registry.register(self._snapshot)

    def refresh(self, vms: Mapping[VMKey, p.VMObs], migrations: Mapping[p.MigKey, LiveMigration | None]) -> None:
        self._snapshot.set(agent_samples(self.host, vms, migrations))

    def serve(self, port: int, log: logging.Logger) -> bool:
        return serve(self.registry, port, log, f"agent of host {self.host}")
