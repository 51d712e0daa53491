"""The agent's thin shell: read (watches, driver), call ``plan()``, execute, heartbeat.

One loop thread does everything that changes anything; watch threads only fill tables and
wake it. Each cycle:

1. ``driver.list_vms()`` and ``query_migration`` of the VMs a migration may involve;
2. the droplets and LiveMigrations of this host from the watch tables, plus direct GETs
   (cached ~2 s) for objects a VM or migration refers to that no watch shows (the droplet of
   an incoming migration, a VM's droplet after its record moved, a VM's migration);
3. ``plan()``; actions of a droplet whose stats could not be read are dropped this cycle;
4. execution, one droplet's actions in order; after a failure the rest of that droplet's
   actions wait for the next cycle. Destroy, stop, start, resume and cancel re-read the
   droplet first and refuse unless the placement record still says what the plan assumed
   (the record is the lock). A failed driver call becomes a report (status.target /
   status.transfer Failed with the reason) or a Warning Event, never a crash.

The loop runs again at once on a watch event, every ``POLL_SECONDS`` while a migration is in
flight here (to report progress), and every ``RESYNC_SECONDS`` otherwise. The heartbeat
(Host.status.agent) goes out every ``FERRY_HEARTBEAT_SECONDS`` and whenever the VM list
changed. Nothing here is needed after a restart: the driver and the API hold all state.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from ferry import __version__
from ferry.agent import plan as p
from ferry.agent.watch import Key, Reflector, Table, newer
from ferry.api import constants as c
from ferry.api.models import Droplet, InvalidSpec, Migration
from ferry.api.times import now as utcnow
from ferry.drivers.base import Driver, DriverError, MigrationState, MigrationStats, VMInfo, VMKey, VMState
from ferry.settings import Settings
from ferry.storage import Kube, NotFound, StorageError

log = logging.getLogger("ferry.agent")

POLL_SECONDS = 0.25
RESYNC_SECONDS = 5.0
FETCH_TTL_SECONDS = 2.0
WARN_REPEAT_SECONDS = 300.0
HOST_MISSING_REPEAT_SECONDS = 60.0
BACKOFF_CAP_SECONDS = 300.0  # a failing driver call is retried after 2, 4, 8 ... s, at most this


def _backoff_name(action: p.Action) -> str:
    """Failures back off per droplet and kind of call (per migration attempt where there is one)."""
    mid = getattr(action, "migration_id", None)
    return f"{type(action).__name__}:{mid}" if mid else type(action).__name__


@dataclasses.dataclass
class Observation:
    droplets: dict[VMKey, Droplet | None]
    migrations: dict[p.MigKey, Migration | None]
    vms: dict[VMKey, p.VMObs]
    uncertain: set[VMKey]  # VMs whose stats could not be read: no actions for them this cycle


class Agent:
    def __init__(self, host: str, driver: Driver, kube: Kube, settings: Settings, *, address: str = "127.0.0.1",
                 connect: Callable[[], Kube] | None = None, version: str = __version__,
                 now: Callable[[], dt.datetime] = utcnow, clock: Callable[[], float] = time.monotonic):
        self.ctx = p.HostContext(host, address, settings.downtime_budget_ms, settings.report_interval_seconds)
        self.driver = driver
        self.kube = kube
        self.settings = settings
        self.connect = connect or (lambda: kube)
        self.version = version
        self.now = now
        self.clock = clock
        self.namespace = settings.namespace or None
        self.droplets = Table()  # label ferry.dev/host=<me>
        self.lm_source = Table()  # label ferry.dev/source-host=<me>
        self.lm_target = Table()  # label ferry.dev/target-host=<me>
        self.wake: queue.Queue[tuple[str, Key] | None] = queue.Queue()
        self.reflectors: list[Reflector] = []
        self._fetched: dict[tuple[str, Key], tuple[float, dict[str, Any] | None]] = {}
        self._settled: dict[VMKey, tuple[VMState, str | None, MigrationStats]] = {}
        self._warned: dict[tuple[VMKey, str], float] = {}
        self._backoff: dict[tuple[VMKey, str], tuple[float, int]] = {}  # (key, call) -> (retry at, failures)
        self._host_missing_since: float | None = None
        self._host_missing_logged = 0.0
        self._heartbeats = 0
        self._last_vms: list[tuple[VMKey, str]] | None = None
        self._vms_dirty = False
        self.cycles = 0

    @property
    def host(self) -> str:
        return self.ctx.name

    # --- reading ------------------------------------------------------------------------
    def start_watches(self, stop: threading.Event) -> None:
        streams = [("Droplet", c.HOST_LABEL, self.droplets), ("LiveMigration", c.SOURCE_HOST_LABEL, self.lm_source),
                   ("LiveMigration", c.TARGET_HOST_LABEL, self.lm_target)]
        for kind, label, table in streams:
            r = Reflector(self.connect, kind, f"{label}={self.host}", table, self._notify, stop,
                          namespace=self.namespace)
            self.reflectors.append(r)
            r.start()

    def synced(self) -> bool:
        return all(r.synced.is_set() for r in self.reflectors)

    def _notify(self, kind: str, key: Key) -> None:
        self.wake.put((kind, key))

    def _fetch(self, kind: str, key: Key) -> tuple[bool, dict[str, Any] | None]:
        """(known, body) of one object by GET, cached for FETCH_TTL_SECONDS."""
        hit = self._fetched.get((kind, key))
        if hit is not None and self.clock() - hit[0] < FETCH_TTL_SECONDS:
            return True, hit[1]
        try:
            body = self.kube.get_or_none(kind, key[1], key[0] or None)
        except StorageError as exc:
            log.debug("cannot read %s %s/%s: %s", kind, key[0], key[1], exc)
            return False, None
        self._fetched[(kind, key)] = (self.clock(), body)
        return True, body

    def _migrations_table(self) -> dict[Key, dict[str, Any]]:
        merged = self.lm_source.snapshot()
        for key, body in self.lm_target.snapshot().items():
            if key not in merged or newer(body, merged[key]):
                merged[key] = body
        return merged

    def observe(self) -> Observation | None:
        try:
            infos = self.driver.list_vms()
        except DriverError as exc:
            self._warn(VMKey("", ""), f"cannot list VMs: {exc}")
            return None
        droplets: dict[VMKey, Droplet | None] = {}
        invalid: set[VMKey] = set()
        for (ns, name), body in self.droplets.snapshot().items():
            try:
                droplets[VMKey(ns, name)] = Droplet.from_body(body)
            except InvalidSpec as exc:
                invalid.add(VMKey(ns, name))
                self._warn(VMKey(ns, name), f"ignoring droplet with an invalid spec: {exc}")
        migrations: dict[p.MigKey, Migration | None] = {}
        for key, body in self._migrations_table().items():
            try:
                migrations[key] = Migration.from_body(body)
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
            known, body = self._fetch("Droplet", (key.namespace, key.name))
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
                known, body = self._fetch("LiveMigration", (ref[0], ref[1]))
                if known:
                    try:
                        migrations[(ref[0], ref[1])] = Migration.from_body(body) if body is not None else None
                    except InvalidSpec:
                        continue
        return Observation(droplets, migrations, vms, uncertain)

    # --- one cycle ----------------------------------------------------------------------
    def cycle(self) -> bool:
        """Observe, plan, execute; returns whether a migration is in flight here."""
        self.cycles += 1
        obs = self.observe()
        if obs is None:
            return False
        actions = [a for a in p.plan(self.ctx, obs.droplets, obs.migrations, obs.vms, self.now())
                   if a.key not in obs.uncertain]
        self.execute(actions, obs)
        self._remember_settled(obs, actions)
        self._note_vms([vm.info for vm in obs.vms.values()])
        return p.busy(obs.vms, obs.migrations, self.host)

    def _remember_settled(self, obs: Observation, actions: list[p.Action]) -> None:
        """Stats that cannot change any more need no query next cycle (hundreds of VMs that
        migrated here once keep their last migration's id)."""
        touched = {a.key for a in actions}
        self._settled = {}
        for key, vm in obs.vms.items():
            s = vm.stats
            if s is None or key in touched or vm.state == VMState.INCOMING:
                continue
            if s.state not in (MigrationState.NONE, MigrationState.RECEIVED, MigrationState.FAILED,
                               MigrationState.ABORTED):
                continue
            ref = p.parse_migration_id(s.migration_id)
            lm = obs.migrations.get((ref[0], ref[1])) if ref else None
            if ref is None or lm is None or lm.terminal:
                self._settled[key] = (vm.state, vm.info.migration_id, s)

    def _note_vms(self, infos: list[VMInfo]) -> None:
        current = sorted((i.key, i.state.value) for i in infos)
        if current != self._last_vms:
            self._vms_dirty = True

    # --- executing ----------------------------------------------------------------------
    def execute(self, actions: list[p.Action], obs: Observation) -> None:
        failed: set[VMKey] = set()
        for action in actions:
            if action.key in failed:
                continue
            backoff_key = (action.key, _backoff_name(action))
            retry = self._backoff.get(backoff_key)
            if retry is not None and self.clock() < retry[0]:
                log.debug("%s of %s: waiting %.1fs after %d failures", backoff_key[1], action.key,
                          retry[0] - self.clock(), retry[1])
                failed.add(action.key)
                continue
            try:
                ok = self._do(action, obs)
            except StorageError as exc:
                self._warn(action.key, f"{type(action).__name__} for {action.key}: {exc}")
                ok = False
            if isinstance(action, p.DRIVER_ACTIONS):
                self._vms_dirty = True
            if ok:
                self._backoff.pop(backoff_key, None)
            else:
                failed.add(action.key)
                if isinstance(action, p.DRIVER_ACTIONS):
                    n = (retry[1] if retry else 0) + 1
                    self._backoff[backoff_key] = (self.clock() + min(BACKOFF_CAP_SECONDS, 2.0 ** n), n)

    def _record(self, key: VMKey) -> tuple[bool, str | None, Droplet | None]:
        """A fresh read of the droplet's placement record: (exists, host, droplet)."""
        body = self.kube.get_or_none("Droplet", key.name, key.namespace)
        self._fetched[("Droplet", (key.namespace, key.name))] = (self.clock(), body)
        if body is None:
            return False, None, None
        try:
            d = Droplet.from_body(body)
        except InvalidSpec:
            return True, (body.get("status") or {}).get("host"), None
        return True, d.host, d

    def _require_owned(self, key: VMKey, what: str) -> bool:
        exists, record, _ = self._record(key)
        if exists and record == self.host:
            return True
        log.info("not %s %s: its record now names %s", what, key, record if exists else "nothing (deleted)")
        return False

    def _do(self, a: p.Action, obs: Observation) -> bool:
        if isinstance(a, p.Warn):
            self._warn(a.key, a.message)
            return True
        if isinstance(a, p.ReportTarget):
            return self._report(a, "target", obs)
        if isinstance(a, p.ReportTransfer):
            return self._report(a, "transfer", obs)
        if isinstance(a, p.DestroyVM):
            exists, record, _ = self._record(a.key)
            if exists and (record is None or record == self.host):
                log.info("not destroying %s: its record names %s", a.key, record or "no host")
                return False
            log.info("destroying %s (%s)", a.key, a.reason)
            return self._driver_call(a.key, "destroy", lambda: self.driver.destroy(a.key))
        if isinstance(a, p.StartVM):
            if not self._require_owned(a.key, "starting"):
                return False
            log.info("%s droplet %s (%s)", "starting" if a.spec.power_on else "defining", a.key, a.reason)

            def start() -> None:
                info = self.driver.start(a.spec)
                if a.spec.power_on and info.state == VMState.STOPPED and info.pid is not None:
                    self.driver.resume(a.key)  # a stopped guest in a live process (e.g. after an offline copy)

            return self._driver_call(a.key, "start", start)
        if isinstance(a, p.StopVM):
            if not self._require_owned(a.key, "stopping"):
                return False
            log.info("stopping droplet %s (%s)", a.key, a.reason)
            return self._driver_call(a.key, "stop", lambda: self.driver.stop(a.key))
        if isinstance(a, p.ResumeVM):
            if not self._require_owned(a.key, "resuming"):
                return False
            log.info("resuming %s after cut-over of %s (%s)", a.key, a.migration_id, a.reason)
            return self._driver_call(a.key, "resume", lambda: self.driver.resume(a.key))
        if isinstance(a, p.CancelMigration):
            if not self._require_owned(a.key, "resuming the source of"):
                return False
            log.info("cancelling migration %s of %s (%s); the source resumes", a.migration_id, a.key, a.reason)
            return self._driver_call(a.key, "cancel", lambda: self.driver.cancel_migration(a.key))
        if isinstance(a, p.PrepareIncoming):
            return self._prepare(a, obs)
        if isinstance(a, p.StartMigration):
            return self._start_migration(a, obs)
        raise TypeError(f"unknown action {a!r}")

    def _driver_call(self, key: VMKey, what: str, call: Callable[[], None]) -> bool:
        try:
            call()
            return True
        except DriverError as exc:
            self._warn(key, f"{what} {key} failed: {exc}", event_reason=f"{what.capitalize()}Failed")
            return False

    def _secret(self, migration: p.MigKey) -> bytes:
        return self.kube.read_secret_key(migration[0], c.transfer_secret_name(migration[1]))

    def _prepare(self, a: p.PrepareIncoming, obs: Observation) -> bool:
        mid = a.migration_id
        try:
            secret = self._secret(a.migration)
        except StorageError as exc:
            self._warn(a.key, f"cannot prepare incoming {a.key} for {mid}: transfer key: {exc}")
            return False
        try:
            address = self.driver.prepare_incoming(a.spec, bind_host=self.ctx.address, secret=secret,
                                                   migration_id=mid)
        except DriverError as exc:
            log.warning("preparing incoming %s for %s failed: %s", a.key, mid, exc)
            self._report(p.ReportTarget(a.key, a.migration, p.target_status(
                a.attempt, "Failed", self.now(), error=f"prepare incoming VM: {exc}")), "target", obs)
            return False
        log.info("preparing incoming %s for %s on %s", a.key, mid, address)
        return self._report(p.ReportTarget(a.key, a.migration, p.target_status(
            a.attempt, "Listening", self.now(), address=address)), "target", obs)

    def _start_migration(self, a: p.StartMigration, obs: Observation) -> bool:
        mid = a.migration_id
        try:
            secret = self._secret(a.migration)
        except StorageError as exc:
            self._warn(a.key, f"cannot migrate {a.key} for {mid}: transfer key: {exc}")
            return False
        o = a.options
        log.info("migrating %s to %s for %s (%s, downtime budget %d ms, bandwidth %s)", a.key, a.target, mid,
                 "offline" if o.offline else "live", o.downtime_budget_ms,
                 f"{o.bandwidth_bps // p.MiB} MiB/s" if o.bandwidth_bps else "unlimited")
        try:
            self.driver.start_migration(a.key, a.target, secret, mid, o)
        except DriverError as exc:
            log.warning("starting migration %s of %s failed: %s", mid, a.key, exc)
            self._report(p.ReportTransfer(a.key, a.migration, p.transfer_failed(
                a.attempt, f"start migration: {exc}", self.now())), "transfer", obs)
            return False
        self.wake.put(None)  # report the first progress soon
        return True

    def _report(self, a: p.ReportTarget | p.ReportTransfer, field: str, obs: Observation) -> bool:
        ns, name = a.migration
        status = dict(a.status)
        lm = obs.migrations.get(a.migration)
        previous = getattr(lm, field) if lm is not None else None
        changed = previous is None or previous.state != status.get("state") or previous.attempt != status.get("attempt")
        try:
            body = self.kube.patch_status("LiveMigration", name, {field: status}, ns)
        except NotFound:
            return False
        for table in (self.lm_source, self.lm_target):
            table.update_if_present(body)
        self._fetched.pop(("LiveMigration", (ns, name)), None)
        if changed:
            extra = ""
            if status.get("address"):
                extra += f" at {status['address']}"
            if status.get("digest"):
                extra += f", digest {status['digest'][:16]}"
            if status.get("error"):
                extra += f": {status['error']}"
            log.info("reporting %s %s/%s#%s: %s%s", field, ns, name, status.get("attempt"), status.get("state"), extra)
        else:
            log.debug("reporting %s %s/%s#%s: %s %s%%", field, ns, name, status.get("attempt"), status.get("state"),
                      status.get("progress"))
        return True

    def _warn(self, key: VMKey, message: str, event_reason: str | None = None) -> None:
        """Log (and post a Warning Event on the droplet) at most once per WARN_REPEAT_SECONDS."""
        last = self._warned.get((key, message))
        t = self.clock()
        if last is not None and t - last < WARN_REPEAT_SECONDS:
            return
        self._warned[(key, message)] = t
        log.warning("%s", message)
        if event_reason and key.name:
            obj = {"apiVersion": c.API_VERSION, "kind": "Droplet",
                   "metadata": {"name": key.name, "namespace": key.namespace}}
            self.kube.event(obj, "Warning", event_reason, f"host {self.host}: {message}", component="ferry-agent")

    # --- heartbeat ----------------------------------------------------------------------
    def heartbeat(self) -> bool:
        try:
            infos = self.driver.list_vms()
        except DriverError as exc:
            self._warn(VMKey("", ""), f"cannot list VMs for the heartbeat: {exc}")
            infos = []
        status = p.agent_status(self.ctx, getattr(self.driver, "name", "unknown"), self.version, infos, self.now())
        try:
            self.kube.patch_status("Host", self.host, {"agent": status})
        except NotFound:
            t = self.clock()
            if self._host_missing_since is None or t - self._host_missing_logged >= HOST_MISSING_REPEAT_SECONDS:
                log.warning("Host %s does not exist: create it (kind Host, apiVersion %s, name %s); "
                            "heartbeating again in %.0fs", self.host, c.API_VERSION, self.host,
                            self._heartbeat_period())
                self._host_missing_logged = t
            if self._host_missing_since is None:
                self._host_missing_since = t
            return False
        except StorageError as exc:
            log.warning("heartbeat of Host %s failed: %s", self.host, exc)
            return False
        if self._host_missing_since is not None or self._heartbeats == 0:
            log.info("heartbeating Host %s every %.1fs (address %s, driver %s, %d VMs)", self.host,
                     self._heartbeat_period(), self.ctx.address, status["driver"], len(infos))
        self._host_missing_since = None
        self._heartbeats += 1
        self._last_vms = sorted((i.key, i.state.value) for i in infos)
        self._vms_dirty = False
        return True

    def _heartbeat_period(self) -> float:
        return max(0.2, self.settings.heartbeat_seconds)

    # --- the loop -----------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Until ``stop`` is set (and ``wake`` gets a token to notice at once)."""
        self.start_watches(stop)
        next_heartbeat = 0.0
        in_flight = False
        announced = False
        while not stop.is_set():
            if self.clock() >= next_heartbeat:
                self.heartbeat()
                next_heartbeat = self.clock() + self._heartbeat_period()
            if self.synced():
                if not announced:
                    log.info("agent of host %s in sync: %d droplets, %d migrations here", self.host,
                             len(self.droplets), len(self._migrations_table()))
                    announced = True
                try:
                    in_flight = self.cycle()
                except Exception:  # noqa: BLE001 - a bug must not stop heartbeats; logged with traceback
                    log.exception("agent cycle failed; retrying")
                    in_flight = False
                if self._vms_dirty:
                    self.heartbeat()
                    next_heartbeat = self.clock() + self._heartbeat_period()
            timeout = POLL_SECONDS if in_flight or not self.synced() else RESYNC_SECONDS
            self._wait(min(timeout, max(0.0, next_heartbeat - self.clock())), stop)

    def _wait(self, timeout: float, stop: threading.Event) -> None:
        try:
            item = self.wake.get(timeout=timeout)
        except queue.Empty:
            return
        items = [item]
        deadline = self.clock() + 0.02  # batch a burst of events into one cycle
        while not stop.is_set():
            try:
                items.append(self.wake.get(timeout=max(0.0, deadline - self.clock())))
            except queue.Empty:
                break
        for it in items:
            if it is not None:
                kind, key = it
                self._fetched.pop((kind, key), None)
