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
from ferry.api.phases import QUEUED, HostPhase, Phase
from ferry.api.sizes import Resources
from ferry.api.times import fmt


@dataclasses.dataclass(frozen=True)
class Evacuation:
    droplets_left: int
    running: int
    failed: int
    completed: int
    # Every unfinished migration whose source is this host, the users' own included: until it
    # ends, its source copy is the one to fall back on (a target that fails its verification
    # after the record moved hands the droplet back), so the host is not Evacuated yet.
    outgoing: int = 0

    @property
    def done(self) -> bool:
        return self.droplets_left == 0 and self.running == 0 and self.outgoing == 0


def evacuation_name(host: str, droplet: str, window: int) -> str:
    """A stable, valid LiveMigration name for the evacuation of ``droplet`` off ``host`` in
    maintenance window ``window`` (each drain of a host is a new window, so the finished
    migrations of an earlier drain never stand in the way of a later one)."""
    digest = hashlib.sha256(f"{host}/{droplet}/{window}".encode()).hexdigest()[:6]
    base = f"evacuate-{host}-{droplet}"
    if len(base) > 230:
        base = base[:230].rstrip("-.")
    return f"{base}-w{window}-{digest}"


def maintenance_window(host: Host) -> int | None:
    """The number of the host's current maintenance window, None when not in maintenance.

    The operator records it in ``status.evacuation.window`` while the host is in maintenance
    and the last one opened in ``status.maintenanceWindow`` (kept across uncordons): a host
    put into maintenance with no open window opens the next one.
    """
    if not host.in_maintenance:
        return None
    open_ = (host.status.get("evacuation") or {}).get("window")
    if isinstance(open_, int) and not isinstance(open_, bool) and open_ >= 1:
        return open_
    last = host.status.get("maintenanceWindow")
    last = last if isinstance(last, int) and not isinstance(last, bool) and last >= 0 else 0
    return last + 1


def window_of(m: LiveMigration) -> int:
    """The maintenance window an evacuation migration belongs to (unlabelled: the first)."""
    try:
        return int(m.meta.labels.get(c.EVACUATION_WINDOW_LABEL, "1"))
    except ValueError:
        return 1


def evacuation_of(host: Host, droplets: Iterable[Droplet], migrations: Iterable[LiveMigration],
                  window: int | None = None) -> Evacuation:
    """Progress of the evacuation in ``window`` (every window when None)."""
    migrations = list(migrations)
    left = sum(1 for d in droplets if d.host == host.name)
    evac = [m for m in migrations if m.meta.labels.get(c.EVACUATION_LABEL) == host.name
            and (window is None or window_of(m) == window)]
    return Evacuation(
        droplets_left=left,
        running=sum(1 for m in evac if not m.terminal),
        failed=sum(1 for m in evac if m.phase == Phase.FAILED),
        completed=sum(1 for m in evac if m.phase == Phase.COMPLETED),
        outgoing=sum(1 for m in migrations if not m.terminal and m.status.source_host == host.name),
    )


def evacuation_plan(host: Host, droplets: Iterable[Droplet], migrations: Iterable[LiveMigration],
                    now: dt.datetime, window: int | None) -> list[dict[str, Any]]:
    """LiveMigration bodies to create so every droplet on a host in maintenance gets one.

    ``window`` is the maintenance window the operator has recorded in the host's status
    (``maintenance_window``); nothing is planned without one. A droplet that already has a
    non-terminal migration (the user's or another), or whose evacuation migration of this
    window already exists (whatever its phase: a failed one is not retried behind the
    user's back within the window), gets none.
    """
    if not host.in_maintenance or window is None:
        return []
    migrations = list(migrations)
    busy = {(m.namespace, m.droplet) for m in migrations if not m.terminal}
    existing = {(m.namespace, m.name) for m in migrations}
    start = host.maintenance_start or now
    out = []
    for d in sorted(droplets, key=lambda d: (d.namespace, d.name)):
        if d.host != host.name or d.meta.deleting or (d.namespace, d.name) in busy:
            continue
        name = evacuation_name(host.name, d.name, window)
        if (d.namespace, name) in existing:
            continue
        out.append({
            "apiVersion": c.API_VERSION, "kind": "LiveMigration",
            "metadata": {"name": name, "namespace": d.namespace,
                         "labels": {c.EVACUATION_LABEL: host.name, c.EVACUATION_WINDOW_LABEL: str(window),
                                    c.DROPLET_LABEL: d.name}},
            "spec": {"droplet": d.name, "scheduledAt": fmt(start)},
        })
    return out


def evacuation_withdrawals(host: Host, migrations: Iterable[LiveMigration]) -> list[LiveMigration]:
    """Evacuation migrations of ``host`` to withdraw because the maintenance was removed
    (or a later window replaced theirs): the queued ones (Pending, Announced), which have
    not taken a concurrency slot, reserved a target nor moved any data. Withdrawing is a
    cancel, so the machine clears the droplet's maintenance notice. The ones already in
    flight (Scheduling onwards) are left to finish: they hold a target and are moving data,
    and a finished move off a host that is healthy again costs nothing but placement,
    while a cancel would throw the copied data away.
    """
    window = maintenance_window(host)
    return [m for m in migrations
            if m.meta.labels.get(c.EVACUATION_LABEL) == host.name and window_of(m) != window
            and (m.phase is None or m.phase in QUEUED) and not m.spec.cancel and not m.meta.deleting]


def host_status(host: Host, droplets: Iterable[Droplet], migrations: Iterable[LiveMigration],
                allocated: Resources, now: dt.datetime, heartbeat_timeout: float) -> dict[str, Any]:
    """The operator-owned part of Host.status (everything but status.agent)."""
    droplets = list(droplets)
    migrations = list(migrations)
    ready = host.ready(now, heartbeat_timeout)
    window = maintenance_window(host)
    ev = evacuation_of(host, droplets, migrations, window)
    if not ready:
        phase = HostPhase.NOT_READY
    elif host.in_maintenance:
        phase = HostPhase.EVACUATED if ev.done else HostPhase.DRAINING
    elif not host.schedulable:
        phase = HostPhase.CORDONED
    else:
        phase = HostPhase.READY
    hb = host.agent.heartbeat
    # The message names no age: one that did ("last heartbeat 1s ago") changed with every look
    # and rewrote every host's status every few seconds, migrations or not (status.agent's
    # heartbeatTime is the last heartbeat).
    if hb is None:
        ready_msg = "no heartbeat from the host's agent yet"
    elif ready:
        ready_msg = f"agent heartbeats arrive within the timeout ({heartbeat_timeout:.0f}s)"
    else:
        ready_msg = f"no agent heartbeat for more than {heartbeat_timeout:.0f}s (the last at {fmt(hb)})"
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
        conds = set_condition(
            conds, "Evacuated", ev.done, "Evacuated" if ev.done else "Draining",
            "no droplet is left on this host and no migration off it is unfinished" if ev.done else
            f"{ev.droplets_left} droplet(s) left, {ev.running} migration(s) running, {ev.failed} failed, "
            f"{ev.outgoing} migration(s) off this host unfinished (the users' own included)", now)
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
        "evacuation": {"window": window, "dropletsLeft": ev.droplets_left, "migrationsRunning": ev.running,
                       "migrationsOutgoing": ev.outgoing, "migrationsFailed": ev.failed, "migrationsCompleted": ev.completed}
        if window is not None else None,
        "maintenanceWindow": window if window is not None else host.status.get("maintenanceWindow"),
        "conditions": [cnd.to_dict() for cnd in conds],
    }


def status_changed(current: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    return any(current.get(k) != v for k, v in desired.items())


#: the parts of a Host's status that are counts (the UI's): what a drain changes after every
#: step of every migration
COUNTS = frozenset({"allocated", "allocatedSummary", "droplets", "evacuation"})


def _conditions_key(conditions: Any, counted: str = "Evacuated") -> list:
    """The conditions without ``counted``'s message (it only restates the evacuation's counts)."""
    out = []
    for cnd in conditions or ():
        if isinstance(cnd, Mapping) and cnd.get("type") == counted:
            cnd = {k: v for k, v in cnd.items() if k != "message"}
        out.append(cnd)
    return out


def counts_only(current: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    """Does ``desired`` differ from ``current`` only in its counts (``COUNTS``, and the message of
    the ``Evacuated`` condition, which restates them)? Such a change may wait for the next write;
    a new phase, a condition's status or reason, or a new maintenance window may not (the window
    is recorded before any of its migrations is created, and ``Evacuated`` turning True comes
    with the phase Evacuated)."""
    changed = {k for k, v in desired.items() if current.get(k) != v}
    if "conditions" in changed:
        if _conditions_key(current.get("conditions")) != _conditions_key(desired.get("conditions")):
            return False
        changed.discard("conditions")
    if not changed <= COUNTS:
        return False
    return (desired.get("evacuation") or {}).get("window") == (current.get("evacuation") or {}).get("window")
