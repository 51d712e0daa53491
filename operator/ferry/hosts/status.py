"""PURE: a Host's status and its evacuation plan, from the operator's view of the world."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

from ferry.api import constants as c
from ferry.api.livemigration import LiveMigration
from ferry.api.models import Droplet, Host
from ferry.api.conditions import parse_conditions, set_condition
from ferry.api.phases import HostPhase, Phase
from ferry.api.sizes import Resources
from ferry.api.times import fmt


@dataclasses.dataclass(frozen=True)
class Evacuation:
    droplets_left: int
    running: int
    failed: int
    completed: int


def evacuation_name(host: str, droplet: str) -> str:
    """A stable, valid LiveMigration name for the evacuation of ``droplet`` off ``host``."""
    digest = hashlib.sha256(f"{host}/{droplet}".encode()).hexdigest()[:6]
    base = f"evacuate-{host}-{droplet}"
    if len(base) > 240:
        base = base[:240].rstrip("-.")
    return f"{base}-{digest}"


def evacuation_of(host: Host, droplets: Iterable[Droplet], migrations: Iterable[LiveMigration]) -> Evacuation:
    left = sum(1 for d in droplets if d.host == host.name)
    evac = [m for m in migrations if m.meta.labels.get(c.EVACUATION_LABEL) == host.name]
    return Evacuation(
        droplets_left=left,
        running=sum(1 for m in evac if not m.terminal),
        failed=sum(1 for m in evac if m.phase == Phase.FAILED),
        completed=sum(1 for m in evac if m.phase == Phase.COMPLETED),
    )


def evacuation_plan(host: Host, droplets: Iterable[Droplet], migrations: Iterable[LiveMigration],
                    now: dt.datetime) -> list[dict[str, Any]]:
    """LiveMigration bodies to create so every droplet on a host in maintenance gets one.

    A droplet that already has a non-terminal migration, or whose evacuation migration
    already exists (whatever its phase: a failed one is not retried behind the user's back),
    gets none.
    """
    if not host.in_maintenance:
        return []
    migrations = list(migrations)
    busy = {(m.namespace, m.droplet) for m in migrations if not m.terminal}
    existing = {(m.namespace, m.name) for m in migrations}
    start = host.maintenance_start or now
    out = []
    for d in sorted(droplets, key=lambda d: (d.namespace, d.name)):
        if d.host != host.name or d.meta.deleting or (d.namespace, d.name) in busy:
            continue
        name = evacuation_name(host.name, d.name)
        if (d.namespace, name) in existing:
            continue
        out.append({
            "apiVersion": c.API_VERSION, "kind": "LiveMigration",
            "metadata": {"name": name, "namespace": d.namespace,
                         "labels": {c.EVACUATION_LABEL: host.name, c.DROPLET_LABEL: d.name}},
            "spec": {"droplet": d.name, "scheduledAt": fmt(start)},
        })
    return out


def host_status(host: Host, droplets: Iterable[Droplet], migrations: Iterable[LiveMigration],
                allocated: Resources, now: dt.datetime, heartbeat_timeout: float) -> dict[str, Any]:
    """The operator-owned part of Host.status (everything but status.agent)."""
    droplets = list(droplets)
    migrations = list(migrations)
    ready = host.ready(now, heartbeat_timeout)
    ev = evacuation_of(host, droplets, migrations)
    if not ready:
        phase = HostPhase.NOT_READY
    elif host.in_maintenance:
        phase = HostPhase.EVACUATED if ev.droplets_left == 0 and ev.running == 0 else HostPhase.DRAINING
    elif not host.schedulable:
        phase = HostPhase.CORDONED
    else:
        phase = HostPhase.READY
    hb = host.agent.heartbeat
    if hb is None:
        ready_msg = "no heartbeat from the host's agent yet"
    else:
        age = (now - hb).total_seconds()
        ready_msg = f"last agent heartbeat {age:.0f}s ago (timeout {heartbeat_timeout:.0f}s)"
    schedulable = host.schedulable and not host.in_maintenance and ready
    conds = parse_conditions(host.status.get("conditions"))
    conds = set_condition(conds, "Ready", ready, "AgentHeartbeat" if ready else "AgentHeartbeatStale", ready_msg, now)
    conds = set_condition(conds, "Schedulable", schedulable,
              "Schedulable" if schedulable else ("Maintenance" if host.in_maintenance else
                                                 ("Cordoned" if not host.schedulable else "NotReady")),
              "accepts new droplets and incoming migrations" if schedulable else
              (f"in maintenance: {host.maintenance_reason}" if host.in_maintenance else
               "cordoned (spec.schedulable is false)" if not host.schedulable else "host is not ready"), now)
    if host.in_maintenance:
        done = ev.droplets_left == 0 and ev.running == 0
        conds = set_condition(
            conds, "Evacuated", done, "Evacuated" if done else "Draining",
            "no droplet is left on this host" if done else
            f"{ev.droplets_left} droplet(s) left, {ev.running} migration(s) running, {ev.failed} failed", now)
    else:
        conds = tuple(cnd for cnd in conds if cnd.type != "Evacuated")
    cap = host.capacity
    return {
        "phase": phase,
        "observedGeneration": host.meta.generation,
        "droplets": sum(1 for d in droplets if d.host == host.name),
        "allocated": allocated.to_dict(),
        "allocatedSummary": {"cpu": f"{allocated.cpu}/{cap.cpu}",
                             "memory": f"{allocated.memory_mib}/{cap.memory_mib}Mi"},
        "evacuation": {"dropletsLeft": ev.droplets_left, "migrationsRunning": ev.running,
                       "migrationsFailed": ev.failed, "migrationsCompleted": ev.completed}
        if host.in_maintenance else None,
        "conditions": [cnd.to_dict() for cnd in conds],
    }


def status_changed(current: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    return any(current.get(k) != v for k, v in desired.items())
