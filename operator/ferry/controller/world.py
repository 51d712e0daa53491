"""The operator's view of the cluster: every Host, Droplet and LiveMigration, kept current by
watch events, plus the decisions it has made but not yet seen come back (the overlay).

One active operator owns all writes, so the overlay makes back-to-back decisions safe:
two migrations scheduled within one watch round-trip never both take the last free
capacity of a host (invariant 5), and admission never exceeds the concurrency limits.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable

from ferry.api import constants as c
from ferry.api.models import Droplet, Host, InvalidSpec, Migration
from ferry.api.sizes import Resources
from ferry.placement import HostInfo, Reservation

Key = tuple[str, str]  # (namespace, name)


@dataclasses.dataclass
class PendingReservation:
    """A target chosen by this operator that the watch has not shown back yet."""

    migration: Key
    host: str
    droplet: Key
    resources: Resources


class World:
    def __init__(self) -> None:
        self.hosts: dict[str, Host] = {}
        self.droplets: dict[Key, Droplet] = {}
        self.migrations: dict[Key, Migration] = {}
        self.invalid: dict[tuple[str, Key], str] = {}
        self.pending_reservations: dict[Key, PendingReservation] = {}
        self.pending_placements: dict[Key, tuple[str, Resources]] = {}  # new droplets placed, not yet seen
        self.admitted: set[Key] = set()  # moved Announced -> Scheduling (took a slot), not yet seen so
        self.announcing: set[Key] = set()  # moved Pending -> Announced (owns its droplet), not yet seen so
        self.secrets_deleted: set[Key] = set()  # transfer Secrets this operator deleted

    # --- watch events ----------------------------------------------------------------------
    def observe(self, kind: str, event_type: str | None, body: dict) -> None:
        meta = body.get("metadata", {})
        key: Key = (meta.get("namespace") or "", meta.get("name", ""))
        table = {"Host": self.hosts, "Droplet": self.droplets, "LiveMigration": self.migrations}[kind]
        k = key[1] if kind == "Host" else key
        if event_type == "DELETED":
            table.pop(k, None)
            self.pending_reservations.pop(key, None) if kind == "LiveMigration" else None
            self.pending_placements.pop(key, None) if kind == "Droplet" else None
            self.admitted.discard(key) if kind == "LiveMigration" else None
            self.announcing.discard(key) if kind == "LiveMigration" else None
            return
        current = table.get(k)
        if current is not None and _older(meta.get("resourceVersion"), current.meta.resource_version):
            return  # a late event (kopf's queue, or our own write seen back after a newer one): keep the newer
        try:
            parsed = {"Host": Host, "Droplet": Droplet, "LiveMigration": Migration}[kind].from_body(body)
        except InvalidSpec as exc:
            self.invalid[(kind, key)] = str(exc)
            table.pop(k, None)
            return
        self.invalid.pop((kind, key), None)
        table[k] = parsed
        if kind == "Droplet" and parsed.host:
            self.pending_placements.pop(key, None)
        if kind == "LiveMigration":
            pr = self.pending_reservations.get(key)
            if pr and (parsed.terminal or parsed.status_target_host == pr.host):
                self.pending_reservations.pop(key, None)
            if parsed.phase not in (None, "Pending", "Announced"):
                self.admitted.discard(key)
            if parsed.phase not in (None, "Pending"):
                self.announcing.discard(key)

    # --- derived views --------------------------------------------------------------------
    def droplet_host(self, key: Key) -> str | None:
        d = self.droplets.get(key)
        if d is None:
            return None
        return d.host or (self.pending_placements.get(key) or (None,))[0]

    def active_migrations(self) -> list[Migration]:
        return [m for m in self.migrations.values() if m.active]

    def reservations(self, exclude: Key | None = None) -> list[Reservation]:
        """Capacity held on target hosts by migrations in flight (status.targetHost in an active phase)."""
        out: list[Reservation] = []
        seen: set[Key] = set()
        for key, pr in self.pending_reservations.items():
            if key != exclude:
                out.append(Reservation(pr.host, pr.resources, f"{pr.droplet[0]}/{pr.droplet[1]}"))
                seen.add(key)
        for m in self.active_migrations():
            key = (m.namespace, m.name)
            if key in seen or key == exclude or not m.status_target_host:
                continue
            d = self.droplets.get((m.namespace, m.droplet))
            if d is None or d.host == m.status_target_host:
                continue  # record already moved: counted as allocation, not reservation
            out.append(Reservation(m.status_target_host, d.resources, f"{m.namespace}/{m.droplet}"))
        return out

    def allocated(self) -> dict[str, Resources]:
        """What the droplets whose record (or a pending placement) names each host use."""
        out: dict[str, Resources] = {}
        zero = Resources(0, 0, 0)
        for key, d in self.droplets.items():
            h = d.host or (self.pending_placements.get(key) or (None,))[0]
            if h:
                out[h] = out.get(h, zero) + d.resources
        return out

    def in_flight_by_host(self) -> tuple[dict[str, int], dict[str, int]]:
        """(outbound per source host, inbound per target host) of active migrations."""
        out: dict[str, int] = {}
        inb: dict[str, int] = {}
        for m in self.active_migrations():
            if m.source_host:
                out[m.source_host] = out.get(m.source_host, 0) + 1
            if m.status_target_host:
                inb[m.status_target_host] = inb.get(m.status_target_host, 0) + 1
        for key, pr in self.pending_reservations.items():
            m = self.migrations.get(key)
            if m is None or not m.active:
                inb[pr.host] = inb.get(pr.host, 0) + 1
        return out, inb

    def host_infos(self, now: dt.datetime, heartbeat_timeout: float) -> list[HostInfo]:
        alloc = self.allocated()
        out_n, in_n = self.in_flight_by_host()
        zero = Resources(0, 0, 0)
        return [
            HostInfo(
                name=h.name, datacenter=h.datacenter, capacity=h.capacity, allocated=alloc.get(h.name, zero),
                labels=h.meta.labels, ready=h.ready(now, heartbeat_timeout), schedulable=h.schedulable,
                in_maintenance=h.in_maintenance,
                migrations_in_flight=out_n.get(h.name, 0) + in_n.get(h.name, 0),
                inbound_migrations=in_n.get(h.name, 0),
            )
            for h in self.hosts.values()
        ]

    def migrations_of(self, droplet: Key) -> Iterable[Migration]:
        ns, name = droplet
        return (m for m in self.migrations.values() if m.namespace == ns and m.droplet == name)

    def blocking_migration(self, m: Migration) -> Migration | None:
        """The older non-terminal migration of the same droplet that ``m`` must wait for."""
        def order(x: Migration) -> tuple:
            return (x.meta.created or dt.datetime.max.replace(tzinfo=dt.timezone.utc), x.name)

        older = [o for o in self.migrations_of((m.namespace, m.droplet))
                 if o.name != m.name and not o.terminal and order(o) < order(m)]
        return min(older, key=order, default=None)


TERMINAL = c.TERMINAL_PHASES


def _older(candidate: str | None, current: str | None) -> bool:
    """resourceVersions are opaque to clients, but etcd's are increasing integers; compare
    them when they are, and never let a late event replace a newer view."""
    try:
        return int(candidate or 0) < int(current or 0)
    except ValueError:
        return False
