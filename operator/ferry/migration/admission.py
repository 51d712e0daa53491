"""Admission: which migrations may be announced, and which may take a concurrency slot. Pure.

Computed by the shell over all migrations; ``decide`` reads one migration's verdict.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable

from ferry.api.phases import IN_FLIGHT, Phase
from ferry.api.times import utc


@dataclasses.dataclass(frozen=True)
class ConcurrencyLimits:
    """FERRY_MAX_PARALLEL, FERRY_MAX_OUTBOUND_PER_HOST, FERRY_MAX_INBOUND_PER_HOST."""

    max_parallel: int = 5
    max_outbound_per_host: int = 2
    max_inbound_per_host: int = 2


@dataclasses.dataclass(frozen=True)
class Admission:
    """A verdict of :func:`admit` for one migration. In Pending: may it be announced now
    (else ``reason`` ``DropletBusy``). In Announced with the notice over: may it take a
    concurrency slot and move to Scheduling now (else ``ConcurrencyLimitReached``, or
    ``DropletBusy`` if another migration of its droplet is in flight); ``message`` says
    which migration or limit."""

    admitted: bool
    reason: str = ""
    message: str = ""


@dataclasses.dataclass(frozen=True)
class MigrationRef:
    """One LiveMigration as admission sees it. ``key``: ``namespace/name``; ``droplet``:
    ``namespace/name`` of its droplet; ``source_host``: ``status.sourceHost`` or the
    droplet's current host; ``target_host``: ``status.targetHost`` or ``spec.targetHost``;
    ``not_before``: ``status.notBefore`` (when an Announced migration's notice is over)."""

    key: str
    droplet: str
    phase: str | None
    created_at: dt.datetime
    source_host: str | None = None
    target_host: str | None = None
    not_before: dt.datetime | None = None


def admit(
    migrations: Iterable[MigrationRef], limits: ConcurrencyLimits, now: dt.datetime | None = None
) -> dict[str, Admission]:
    """The two gates of a migration, oldest first (by ``created_at``, then ``key``). Pure.

    1. Announce (phase None or Pending): ``DropletBusy`` while another migration of the
       same droplet is in :data:`OWNING` or is an older Pending one; otherwise
       admitted, whatever the concurrency limits say: announcing takes no slot.
    2. Slot (phase Announced, queued: ``now`` is None, or ``not_before`` is set and
       ``now >= not_before``): ``ConcurrencyLimitReached`` when moving it to Scheduling
       would exceed the cluster-wide limit, its source host's outbound limit or (when its
       target is already known) its target's inbound limit, counting the migrations in
       :data:`IN_FLIGHT` plus the older queued ones admitted in this call. A younger
       migration blocked only by a per-host limit does not block others. ``DropletBusy``
       if another migration of its droplet is in flight (or is an older Announced one);
       that never happens when gate 1 did its job, it is checked anyway.

    Returns a verdict for every migration in phase None or Pending and every queued
    Announced one; Announced migrations whose notice is not over get none and hold nothing.
    """
    items = list(migrations)

    def order(m: MigrationRef) -> tuple[dt.datetime, str]:
        return (m.created_at, m.key)

    def queued(m: MigrationRef) -> bool:
        return m.phase == Phase.ANNOUNCED and (now is None or (m.not_before is not None and utc(now) >= m.not_before))

    active = sorted((m for m in items if m.phase in IN_FLIGHT), key=order)
    announced = sorted((m for m in items if m.phase == Phase.ANNOUNCED), key=order)
    pending = sorted((m for m in items if m.phase in (None, Phase.PENDING)), key=order)
    owner: dict[str, str] = {}
    for m in (*active, *announced):
        owner.setdefault(m.droplet, m.key)
    verdicts: dict[str, Admission] = {}

    # gate 1: one migration per droplet past Pending
    for m in pending:
        busy = owner.get(m.droplet)
        if busy is not None and busy != m.key:
            verdicts[m.key] = _busy(m, busy)
            continue
        owner[m.droplet] = m.key
        verdicts[m.key] = Admission(True, "Admitted", "")

    # gate 2: a concurrency slot for Announced -> Scheduling
    total = len(active)
    outbound: dict[str, int] = {}
    inbound: dict[str, int] = {}
    for m in active:
        if m.source_host:
            outbound[m.source_host] = outbound.get(m.source_host, 0) + 1
        if m.target_host:
            inbound[m.target_host] = inbound.get(m.target_host, 0) + 1
    running = {m.droplet: m.key for m in reversed(active)}  # the oldest in flight per droplet
    first_announced: dict[str, str] = {}
    for m in announced:
        first_announced.setdefault(m.droplet, m.key)
    for m in announced:
        if not queued(m):
            continue
        busy = running.get(m.droplet) or first_announced[m.droplet]
        if busy != m.key:
            verdicts[m.key] = _busy(m, busy)
            continue
        if total >= limits.max_parallel:
            verdicts[m.key] = Admission(
                False,
                "ConcurrencyLimitReached",
                f"{total} migrations in flight cluster-wide (limit {limits.max_parallel})",
            )
            continue
        if m.source_host and outbound.get(m.source_host, 0) >= limits.max_outbound_per_host:
            verdicts[m.key] = Admission(
                False,
                "ConcurrencyLimitReached",
                f"source host {m.source_host} already sends {outbound[m.source_host]} migrations "
                f"(limit {limits.max_outbound_per_host})",
            )
            continue
        if m.target_host and inbound.get(m.target_host, 0) >= limits.max_inbound_per_host:
            verdicts[m.key] = Admission(
                False,
                "ConcurrencyLimitReached",
                f"target host {m.target_host} already receives {inbound[m.target_host]} migrations "
                f"(limit {limits.max_inbound_per_host})",
            )
            continue
        verdicts[m.key] = Admission(True, "Admitted", "")
        total += 1
        if m.source_host:
            outbound[m.source_host] = outbound.get(m.source_host, 0) + 1
        if m.target_host:
            inbound[m.target_host] = inbound.get(m.target_host, 0) + 1
    return verdicts


def _busy(m: MigrationRef, busy: str) -> Admission:
    return Admission(False, "DropletBusy", f"droplet {m.droplet} is being migrated by {busy}; waiting for it to finish")
