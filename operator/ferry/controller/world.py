"""The operator's view of the cluster: every Host, Droplet and LiveMigration, parsed, kept
current by watch events and by the bodies of the operator's own writes, plus its
:class:`~ferry.controller.expectations.Expectations`.

Why not kopf's indexes: an index is fed only by watch events, while the next decision must
already see the operator's own last write (the body a PATCH returns), and a late event from
a loaded queue must never replace a newer view. The world takes both, and it is loaded
whole at startup, before any handler decides, as kopf's indexes would be.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from ferry.api import constants as c
from ferry.api.livemigration import LiveMigration
from ferry.api.models import Droplet, Host
from ferry.api.sizes import Resources
from ferry.api.meta import InvalidSpec, ObjectKey
from ferry.controller.expectations import Expectations
from ferry.placement import HostInfo, Reservation

PARSERS = {"Host": Host.from_body, "Droplet": Droplet.from_body, "LiveMigration": LiveMigration.from_body}
ZERO = Resources(0, 0, 0)


class World:
    def __init__(self) -> None:
        self.hosts: dict[str, Host] = {}
        self.droplets: dict[ObjectKey, Droplet] = {}
        self.migrations: dict[ObjectKey, LiveMigration] = {}
        self.invalid: dict[tuple[str, ObjectKey], str] = {}
        self.expect = Expectations()
        self._by_address: dict[str, set[ObjectKey]] = {}  # spec.ip (normal form) -> droplets claiming it
        self._address: dict[ObjectKey, str] = {}
        #: droplet -> its migrations (keys, in the order first seen): a droplet's migrations
        #: without a scan of every migration
        self.by_droplet: dict[ObjectKey, dict[ObjectKey, None]] = {}
        #: bumped whenever something admission reads changes (a migration's phase, droplet,
        #: hosts, notBefore; a droplet's host): cached admission verdicts stay valid until then
        self.admission_version = 0
        #: host -> the droplets whose record names it, and host -> the LiveMigrations labelled
        #: as its evacuation: a host's reconcile (every 2 s, every host) reads its own share,
        #: not every droplet and migration of the fleet (that was O(hosts x objects) a round)
        self.on_host: dict[str, dict[ObjectKey, None]] = {}
        self.evacuating: dict[str, dict[ObjectKey, None]] = {}
        #: host -> the unfinished LiveMigrations whose status.sourceHost names it (the users'
        #: own too): the host is not Evacuated while one of them may still fall back to it
        self.leaving: dict[str, dict[ObjectKey, None]] = {}

    # --- watch events and own writes ------------------------------------------------------
    def observe(self, kind: str, event_type: str | None, body: dict) -> None:
        meta = body.get("metadata", {})
        key: ObjectKey = (meta.get("namespace") or "", meta.get("name", ""))
        table: dict = {"Host": self.hosts, "Droplet": self.droplets, "LiveMigration": self.migrations}[kind]
        k = key[1] if kind == "Host" else key
        if event_type == "DELETED":
            self._drop(kind, key)
            self._saw(kind, key, None)
            return
        current = table.get(k)
        if current is not None and _older(meta.get("resourceVersion"), current.meta.resource_version):
            return  # a late event (kopf's queue, or our own write seen back after a newer one)
        try:
            parsed = PARSERS[kind](body)
        except InvalidSpec as exc:
            self.invalid[(kind, key)] = str(exc)
            self._drop(kind, key)
            if kind == "Droplet":
                self._index_address(key, None)
            return
        self.invalid.pop((kind, key), None)
        table[k] = parsed
        if kind == "Droplet" and (current is None or current.host != parsed.host):
            _move(self.on_host, key, current.host if current is not None else None, parsed.host)
        elif kind == "LiveMigration":
            before = current.meta.labels.get(c.EVACUATION_LABEL) if current is not None else None
            after = parsed.meta.labels.get(c.EVACUATION_LABEL)
            if before != after or current is None:
                _move(self.evacuating, key, before, after)
            was, now_ = _leaving(current), _leaving(parsed)
            if was != now_:
                _move(self.leaving, key, was, now_)
        if kind == "LiveMigration":
            if current is None or current.droplet != parsed.droplet:
                if current is not None:
                    self._unindex(current)
                self.by_droplet.setdefault((parsed.namespace, parsed.droplet), {})[parsed.key] = None
            if current is None or _admission_view(current) != _admission_view(parsed):
                self.admission_version += 1
        elif kind == "Droplet" and (current is None or current.host != parsed.host) and self.by_droplet.get(key):
            self.admission_version += 1  # the source host of its migrations
        self._saw(kind, key, parsed)

    def resync(self, kind: str, items: Iterable[dict]) -> None:
        """A whole fresh list of ``kind``: take each item in, and drop what the list no longer
        holds. Watch events alone never say what was deleted while nobody watched (a standby
        replica's world, frozen at its start): without this a deleted migration would keep its
        concurrency slot and its reservation."""
        table: dict = {"Host": self.hosts, "Droplet": self.droplets, "LiveMigration": self.migrations}[kind]
        present = set()
        for body in items:
            meta = body.get("metadata", {})
            key: ObjectKey = (meta.get("namespace") or "", meta.get("name", ""))
            present.add(key[1] if kind == "Host" else key)
            self.observe(kind, None, body)
        for k in [k for k in table if k not in present]:
            gone_key = ("", k) if kind == "Host" else k
            self._drop(kind, gone_key)
            self._saw(kind, gone_key, None)
        for ik in [ik for ik in self.invalid if ik[0] == kind and (ik[1][1] if kind == "Host" else ik[1]) not in present]:
            del self.invalid[ik]

    def _drop(self, kind: str, key: ObjectKey) -> None:
        """Forget one object and what is indexed on it (deleted, unusable, or gone from a re-list)."""
        table: dict = {"Host": self.hosts, "Droplet": self.droplets, "LiveMigration": self.migrations}[kind]
        gone = table.pop(key[1] if kind == "Host" else key, None)
        if kind == "LiveMigration" and gone is not None:
            self._unindex(gone)
            _move(self.evacuating, key, gone.meta.labels.get(c.EVACUATION_LABEL), None)
            _move(self.leaving, key, _leaving(gone), None)
            self.admission_version += 1
        elif kind == "Droplet" and gone is not None:
            _move(self.on_host, key, gone.host, None)

    def _unindex(self, m: LiveMigration) -> None:
        d = (m.namespace, m.droplet)
        keys = self.by_droplet.get(d)
        if keys is not None:
            keys.pop(m.key, None)
            if not keys:
                del self.by_droplet[d]

    def _saw(self, kind: str, key: ObjectKey, parsed) -> None:
        if kind == "LiveMigration":
            self.expect.saw_migration(key, parsed)
        elif kind == "Droplet":
            self.expect.saw_droplet(key, parsed)
            self._index_address(key, parsed)

    def _index_address(self, key: ObjectKey, d: Droplet | None) -> None:
        old, new = self._address.pop(key, None), d.address if d is not None else None
        if old is not None and old != new:
            keys = self._by_address.get(old, set())
            keys.discard(key)
            if not keys:
                self._by_address.pop(old, None)
        if new is not None:
            self._address[key] = new
            self._by_address.setdefault(new, set()).add(key)

    # --- derived views --------------------------------------------------------------------
    def droplet_host(self, key: ObjectKey) -> str | None:
        d = self.droplets.get(key)
        if d is None:
            return None
        return d.host or self.expect.placement(key)

    def in_flight(self) -> list[LiveMigration]:
        return [m for m in self.migrations.values() if m.in_flight]

    def reservations(self, exclude: ObjectKey | None = None) -> list[Reservation]:
        """Capacity held on target hosts by migrations in flight (status.targetHost in an
        in-flight phase), including targets chosen but not seen back yet."""
        expected = self.expect.reservations(exclude)
        out = self.expect.as_reservations(exclude)
        for m in self.in_flight():
            if m.key in expected or m.key == exclude or not m.status.target_host:
                continue
            d = self.droplets.get((m.namespace, m.droplet))
            if d is None or d.host == m.status.target_host:
                continue  # record already moved: counted as allocation, not reservation
            out.append(Reservation(m.status.target_host, d.resources, f"{m.namespace}/{m.droplet}"))
        return out

    def allocated(self) -> dict[str, Resources]:
        """What the droplets whose record (or a placement not seen back) names each host use."""
        out: dict[str, Resources] = {}
        for key, d in self.droplets.items():
            h = d.host or self.expect.placement(key)
            if h:
                out[h] = out.get(h, ZERO) + d.resources
        return out

    def droplets_on(self, host: str) -> list[Droplet]:
        """The droplets whose record names ``host``."""
        return [self.droplets[k] for k in self.on_host.get(host, ()) if k in self.droplets]

    def evacuations_of(self, host: str) -> list[LiveMigration]:
        """The LiveMigrations labelled as ``host``'s evacuation (every window)."""
        return [self.migrations[k] for k in self.evacuating.get(host, ()) if k in self.migrations]

    def leaving_from(self, host: str) -> list[LiveMigration]:
        """The unfinished LiveMigrations whose source is ``host``."""
        return [self.migrations[k] for k in self.leaving.get(host, ()) if k in self.migrations]

    def allocated_on(self, host: str) -> Resources:
        """``allocated()[host]`` without the others: its droplets, and the placements on it not
        seen back yet."""
        total = ZERO
        for d in self.droplets_on(host):
            total = total + d.resources
        for key, h, _ in self.expect.placements():
            d = self.droplets.get(key)
            if h == host and d is not None and not d.host:
                total = total + d.resources
        return total

    def in_flight_by_host(self) -> tuple[dict[str, int], dict[str, int]]:
        """(outbound per source host, inbound per target host) of migrations in flight."""
        out: dict[str, int] = {}
        inb: dict[str, int] = {}
        for m in self.in_flight():
            if m.status.source_host:
                out[m.status.source_host] = out.get(m.status.source_host, 0) + 1
            if m.status.target_host:
                inb[m.status.target_host] = inb.get(m.status.target_host, 0) + 1
        for key, r in self.expect.reservations().items():
            m = self.migrations.get(key)
            if m is None or not m.in_flight:
                inb[r.host] = inb.get(r.host, 0) + 1
        return out, inb

    def host_infos(self, now: dt.datetime, heartbeat_timeout: float) -> list[HostInfo]:
        alloc = self.allocated()
        out_n, in_n = self.in_flight_by_host()
        return [
            HostInfo(
                name=h.name, datacenter=h.datacenter, capacity=h.capacity, allocated=alloc.get(h.name, ZERO),
                labels=h.meta.labels, ready=h.ready(now, heartbeat_timeout), schedulable=h.schedulable,
                in_maintenance=h.in_maintenance,
                migrations_in_flight=out_n.get(h.name, 0) + in_n.get(h.name, 0),
                inbound_migrations=in_n.get(h.name, 0), platform=h.agent.platform,
            )
            for h in self.hosts.values()
        ]

    def address_of(self, key: ObjectKey) -> str | None:
        return self._address.get(key)

    def claimants(self, address: str | None) -> list[Droplet]:
        """The droplets whose spec.ip is ``address`` (normal form)."""
        keys = self._by_address.get(address, ()) if address else ()
        return [self.droplets[k] for k in sorted(keys) if k in self.droplets]

    def migrations_of(self, droplet: ObjectKey) -> Iterable[LiveMigration]:
        return [self.migrations[k] for k in self.by_droplet.get(droplet, ()) if k in self.migrations]


def _leaving(m: LiveMigration | None) -> str | None:
    return m.status.source_host if m is not None and not m.terminal else None


def _move(index: dict[str, dict[ObjectKey, None]], key: ObjectKey, old: str | None, new: str | None) -> None:
    """``key`` leaves ``index[old]`` and joins ``index[new]`` (None: neither)."""
    if old is not None and old in index:
        index[old].pop(key, None)
        if not index[old]:
            del index[old]
    if new is not None:
        index.setdefault(new, {})[key] = None


def _admission_view(m: LiveMigration) -> tuple:
    """What admission reads of a migration (``ferry.migration.admission.MigrationRef``)."""
    return (m.phase, m.droplet, m.meta.created, m.status.source_host, m.status.target_host, m.spec.target_host,
            m.status.not_before)


def _older(candidate: str | None, current: str | None) -> bool:
    """resourceVersions are opaque to clients, but etcd's are increasing integers; compare
    them when they are, and never let a late event replace a newer view."""
    try:
        return int(candidate or 0) < int(current or 0)
    except ValueError:
        return False
