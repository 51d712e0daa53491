"""What the agent sees: three watch tables, the driver's VMs and a few GETs, as one ``Snapshot``
for the pure ``plan()``.

The tables are kept by ``ferry.storage.watch.Reflector`` threads: the droplets labelled
with this host, and the LiveMigrations naming it as source or as target. ``observe()``
adds ``driver.list_vms()``, ``query_migration`` of the VMs a migration may involve, and
direct GETs (cached ``FETCH_TTL_SECONDS``) of objects a VM or migration refers to that no
watch shows: the droplet of an incoming migration, a VM's droplet after its record moved,
a VM's migration. A map without a key means "unknown", a key with None "does not exist".
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from typing import Any

from ferry.agent import plan as p
from ferry.api import constants as c
from ferry.api.livemigration import LiveMigration
from ferry.api.meta import InvalidSpec
from ferry.api.models import Droplet
from ferry.drivers.base import Driver, DriverError, MigrationState, MigrationStats, VMKey, VMState
from ferry.storage import Backoff, Kube, StorageError
from ferry.api.meta import ObjectKey
from ferry.storage.watch import Reflector, Table, Update, newer

log = logging.getLogger("ferry.agent")

FETCH_TTL_SECONDS = 2.0
WATCH_TIMEOUT_SECONDS = 60
WATCH_BACKOFF = Backoff(base=0.5, cap=15.0, jitter=0.5)


@dataclasses.dataclass
class Snapshot:
    """The input of ``plan()`` for one cycle."""

    droplets: dict[VMKey, Droplet | None]
    migrations: dict[p.MigKey, LiveMigration | None]
    vms: dict[VMKey, p.VMObs]
    uncertain: set[VMKey]  # VMs whose stats could not be read: no actions for them this cycle


class Observer:
    def __init__(self, host: str, driver: Driver, kube: Kube, *, warn: Callable[[VMKey, str], None],
                 clock: Callable[[], float]):
        self.host = host
        self.driver = driver
        self.kube = kube
        self.warn = warn
        self.clock = clock
        self.droplets = Table()  # label ferry.dev/host=<me>
        self.lm_source = Table()  # label ferry.dev/source-host=<me>
        self.lm_target = Table()  # label ferry.dev/target-host=<me>
        self.reflectors: list[Reflector] = []
        self._fetched: dict[tuple[str, ObjectKey], tuple[float, dict[str, Any] | None]] = {}
        self._settled: dict[VMKey, tuple[VMState, str | None, MigrationStats]] = {}

    # --- the watches --------------------------------------------------------------------
    def start_watches(self, connect: Callable[[], Kube], namespace: str | None, stop: threading.Event,
                      notify: Callable[[str, ObjectKey], None]) -> None:
        """One reflector thread per table, each on its own connection; ``notify(kind, key)``
        after every change."""
        streams = [("Droplet", c.HOST_LABEL, self.droplets), ("LiveMigration", c.SOURCE_HOST_LABEL, self.lm_source),
                   ("LiveMigration", c.TARGET_HOST_LABEL, self.lm_target)]
        for kind, label, table in streams:
            selector = f"{label}={self.host}"

            def deliver(update: Update, kind: str = kind, table: Table = table) -> None:
                for key in table.apply_update(update):
                    notify(kind, key)

            r = Reflector(connect().list_watch(kind, namespace, selector), deliver, name=f"{kind} {selector}",
                          stop=stop, watch_timeout_seconds=WATCH_TIMEOUT_SECONDS, backoff=WATCH_BACKOFF, log=log)
            self.reflectors.append(r)
            r.start()

    def synced(self) -> bool:
        return all(r.synced.is_set() for r in self.reflectors)

    def migrations_table(self) -> dict[ObjectKey, dict[str, Any]]:
        merged = self.lm_source.snapshot()
        for key, body in self.lm_target.snapshot().items():
            if key not in merged or newer(body, merged[key]):
                merged[key] = body
        return merged

    def written(self, body: dict[str, Any]) -> None:
        """The answer of our own write of a LiveMigration: newer than what the tables hold."""
        for table in (self.lm_source, self.lm_target):
            table.update_if_present(body)
        meta = body.get("metadata") or {}
        self.forget("LiveMigration", (meta.get("namespace") or "", meta.get("name") or ""))

    # --- direct reads -------------------------------------------------------------------
    def fetch(self, kind: str, key: ObjectKey) -> tuple[bool, dict[str, Any] | None]:
        """(known, body) of one object by GET, cached for FETCH_TTL_SECONDS."""
        hit = self._fetched.get((kind, key))
        if hit is not None and self.clock() - hit[0] < FETCH_TTL_SECONDS:
            return True, hit[1]
        try:
            body = self.kube.get_or_none(kind, key[1], key[0] or None)
        except StorageError as exc:
            log.debug("cannot read %s %s/%s: %s", kind, key[0], key[1], exc)
            return False, None
        self.remember(kind, key, body)
        return True, body

    def remember(self, kind: str, key: ObjectKey, body: dict[str, Any] | None) -> None:
        self._fetched[(kind, key)] = (self.clock(), body)

    def forget(self, kind: str, key: ObjectKey) -> None:
        self._fetched.pop((kind, key), None)

    def forget_all(self) -> None:
        self._fetched.clear()

    # --- one snapshot -------------------------------------------------------------------
    def observe(self) -> Snapshot | None:
        """None when the driver cannot list its VMs (warned)."""
        try:
            infos = self.driver.list_vms()
        except DriverError as exc:
            self.warn(VMKey("", ""), f"cannot list VMs: {exc}")
            return None
        droplets: dict[VMKey, Droplet | None] = {}
        invalid: set[VMKey] = set()
        for (ns, name), body in self.droplets.snapshot().items():
            try:
                droplets[VMKey(ns, name)] = Droplet.from_body(body)
            except InvalidSpec as exc:
                invalid.add(VMKey(ns, name))
                self.warn(VMKey(ns, name), f"ignoring droplet with an invalid spec: {exc}")
        migrations: dict[p.MigKey, LiveMigration | None] = {}
        for key, body in self.migrations_table().items():
            try:
                migrations[key] = LiveMigration.from_body(body)
            except InvalidSpec:
                continue
        lm_keys = {VMKey(lm.namespace, lm.droplet) for lm in migrations.values() if lm is not None}
        active_keys = {VMKey(lm.namespace, lm.droplet) for lm in migrations.values()
                       if lm is not None and not lm.terminal}

        vms: dict[VMKey, p.VMObs] = {}
        uncertain: set[VMKey] = set()
        for info in infos:
            stats: MigrationStats | None = None
            if info.migration_id or info.key in lm_keys or info.state == VMState.INCOMING:
                settled = self._settled.get(info.key)
                if settled is not None and settled[:2] == (info.state, info.migration_id):
                    stats = settled[2]
                else:
                    try:
                        stats = self.driver.query_migration(info.key)
                    except DriverError as exc:
                        uncertain.add(info.key)
                        log.debug("cannot query the migration of %s: %s", info.key, exc)
            vms[info.key] = p.VMObs(info, stats)

        # Objects referred to that no watch shows: GET them (absent from the maps = unknown).
        # (Droplets of finished migrations matter only if a VM of theirs is here.)
        for key in sorted((set(vms) | active_keys) - set(droplets) - invalid):
            known, body = self.fetch("Droplet", (key.namespace, key.name))
            if not known:
                continue
            try:
                droplets[key] = Droplet.from_body(body) if body is not None else None
            except InvalidSpec:
                continue
        for vm in vms.values():
            ref = p.parse_migration_id(vm.migration_id)
            if ref is None or (ref[0], ref[1]) in migrations:
                continue
            if vm.state == VMState.INCOMING or vm.source_busy_mid is not None:
                known, body = self.fetch("LiveMigration", (ref[0], ref[1]))
                if known:
                    try:
                        migrations[(ref[0], ref[1])] = LiveMigration.from_body(body) if body is not None else None
                    except InvalidSpec:
                        continue
        return Snapshot(droplets, migrations, vms, uncertain)

    def remember_settled(self, snap: Snapshot, actions: list[p.Action]) -> None:
        """Stats that cannot change any more need no query next cycle (hundreds of VMs that
        migrated here once keep their last migration's id)."""
        touched = {a.key for a in actions}
        self._settled = {}
        for key, vm in snap.vms.items():
            s = vm.stats
            if s is None or key in touched or vm.state == VMState.INCOMING:
                continue
            if s.state not in (MigrationState.NONE, MigrationState.RECEIVED, MigrationState.FAILED,
                               MigrationState.ABORTED):
                continue
            ref = p.parse_migration_id(s.migration_id)
            lm = snap.migrations.get((ref[0], ref[1])) if ref else None
            if ref is None or lm is None or lm.terminal:
                self._settled[key] = (vm.state, vm.info.migration_id, s)
