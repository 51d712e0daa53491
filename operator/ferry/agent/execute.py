"""What the agent does: the plan's actions, its reports, its warnings and the heartbeat.

``Executor.execute`` runs one droplet's actions in order; after a failure the rest of that
droplet's actions wait for the next cycle, and a failed driver call is retried on the
``ACTION_BACKOFF`` schedule (per droplet and kind of call, per migration attempt where there
is one). Destroy, stop, start, resume and cancel re-read the droplet first and refuse
unless the placement record still says what the plan assumed (the record is the lock). A
failed driver call becomes a report (status.target / status.transfer Failed with the
reason) or a Warning Event, never a crash.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

from ferry import failpoints
from ferry.agent import plan as p
from ferry.agent.observe import Observer, Snapshot
from ferry.api import constants as c
from ferry.api.meta import InvalidSpec
from ferry.api.models import Droplet, Platform
from ferry.api.phases import TargetState
from ferry.api.times import fmt
from ferry.drivers.base import Driver, DriverError, VMInfo, VMKey, VMState, host_cpu
from ferry.drivers.network import Fabric, FabricError, LoopbackFabric
from ferry.settings import Settings
from ferry.storage import Backoff, Kube, NotFound, StorageError

log = logging.getLogger("ferry.agent")

WARN_REPEAT_SECONDS = 300.0
HOST_MISSING_REPEAT_SECONDS = 60.0
# A failing driver call is retried after 2, 4, 8 ... s, at most 300 s. Exact: the retries of
# one host's calls do not herd with anyone's.
ACTION_BACKOFF = Backoff(base=2.0, cap=300.0)


class Warnings:
    """Log (and post a Warning Event on the droplet) at most once per WARN_REPEAT_SECONDS."""

    def __init__(self, host: str, kube: Kube, clock: Callable[[], float]):
        self.host = host
        self.kube = kube
        self.clock = clock
        self._warned: dict[tuple[VMKey, str], float] = {}

    def __call__(self, key: VMKey, message: str, event_reason: str | None = None) -> None:
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


#: status.target.network.fabric of a guest with its own NIC: QEMU announced its MAC from here
GUEST_NIC_FABRIC = "guest-nic/announce-self"


def _vm_view(infos: list[VMInfo]) -> list[tuple[VMKey, str, int]]:
    """What a heartbeat says of the VMs: a change of any of it is worth a beat now."""
    return sorted((i.key, i.state.value, i.restarts) for i in infos)


def _backoff_name(action: p.Action) -> str:
    mid = getattr(action, "migration_id", None)
    return f"{type(action).__name__}:{mid}" if mid else type(action).__name__


class Executor:
    def __init__(self, ctx: p.HostContext, driver: Driver, kube: Kube, observer: Observer, warn: Warnings, *,
                 wake: Callable[[], None], now: Callable[[], dt.datetime], clock: Callable[[], float],
                 fabric: Fabric | None = None):
        self.ctx = ctx
        self.driver = driver
        self.fabric: Fabric = fabric or LoopbackFabric()
        self.kube = kube
        self.observer = observer
        self.warn = warn
        self.wake = wake  # run the next cycle soon
        self.now = now
        self.clock = clock
        self._retry: dict[tuple[VMKey, str], tuple[float, int]] = {}  # (key, call) -> (retry at, failures)
        #: the last resume this agent did of each VM: (migration id, when), for the Running report
        self.resumed: dict[VMKey, tuple[str, dt.datetime]] = {}

    @property
    def host(self) -> str:
        return self.ctx.name

    def execute(self, actions: list[p.Action], snap: Snapshot) -> bool:
        """Run ``actions``; returns whether a driver call was made (the VM list may have changed)."""
        failed: set[VMKey] = set()
        driver_called = False
        for action in actions:
            if action.key in failed:
                continue
            retry_key = (action.key, _backoff_name(action))
            retry = self._retry.get(retry_key)
            if retry is not None and self.clock() < retry[0]:
                log.debug("%s of %s: waiting %.1fs after %d failures", retry_key[1], action.key,
                          retry[0] - self.clock(), retry[1])
                failed.add(action.key)
                continue
            try:
                ok = self._do(action, snap)
            except StorageError as exc:
                self.warn(action.key, f"{type(action).__name__} for {action.key}: {exc}")
                ok = False
            if isinstance(action, p.DRIVER_ACTIONS):
                driver_called = True
            if ok:
                self._retry.pop(retry_key, None)
            else:
                failed.add(action.key)
                if isinstance(action, p.DRIVER_ACTIONS):
                    n = (retry[1] if retry else 0) + 1
                    self._retry[retry_key] = (self.clock() + ACTION_BACKOFF.delay(n), n)
        return driver_called

    # --- the record is the lock ---------------------------------------------------------
    def _record(self, key: VMKey) -> tuple[bool, str | None, Droplet | None]:
        """A fresh read of the droplet's placement record: (exists, host, droplet)."""
        body = self.kube.get_or_none("Droplet", key.name, key.namespace)
        self.observer.remember("Droplet", (key.namespace, key.name), body)
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

    # --- one action ---------------------------------------------------------------------
    def _do(self, a: p.Action, snap: Snapshot) -> bool:
        if isinstance(a, p.Warn):
            self.warn(a.key, a.message, a.event_reason)
            return True
        if isinstance(a, p.ReportTarget):
            return self._report(a, "target", snap)
        if isinstance(a, p.ReportTransfer):
            return self._report(a, "transfer", snap)
        if isinstance(a, p.DestroyVM):
            exists, record, _ = self._record(a.key)
            if exists and (record is None or record == self.host):
                log.info("not destroying %s: its record names %s", a.key, record or "no host")
                return False
            vm = snap.vms.get(a.key)
            if vm is not None and vm.state != VMState.INCOMING:
                failpoints.hit("source-agent.before-destroy")
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
            failpoints.hit("target-agent.before-resume")
            ok = self._driver_call(a.key, "resume", lambda: self.driver.resume(a.key))
            if ok:
                self.resumed[a.key] = (a.migration_id, self.now())
                failpoints.hit("target-agent.after-resume")
            return ok
        if isinstance(a, p.ClaimAddress):
            return self._claim(a, snap)
        if isinstance(a, p.CancelMigration):
            if not self._require_owned(a.key, "resuming the source of"):
                return False
            log.info("cancelling migration %s of %s (%s); the source resumes", a.migration_id, a.key, a.reason)
            failpoints.hit("source-agent.before-cancel")
            return self._driver_call(a.key, "cancel", lambda: self.driver.cancel_migration(a.key))
        if isinstance(a, p.ForceComplete):
            log.info("force-complete of migration %s of %s: pausing the guest now", a.migration_id, a.key)
            try:
                self.driver.force_complete(a.key)
                return True
            except DriverError as exc:
                self.warn(a.key, f"force-complete of {a.key} failed: {exc}", event_reason="ForceCompleteFailed")
                return False
        if isinstance(a, p.PrepareIncoming):
            return self._prepare(a, snap)
        if isinstance(a, p.StartMigration):
            return self._start_migration(a, snap)
        raise TypeError(f"unknown action {a!r}")

    # --- the droplets' addresses (ferry.drivers.network) -----------------------------------
    def _claim(self, a: p.ClaimAddress, snap: Snapshot) -> bool:
        """The network cut-over: the address moves here, then status.target.network says when."""
        failpoints.hit("target-agent.before-address")
        t0 = self.clock()
        guest_nic = self._guests_own_addresses()
        try:
            if guest_nic:  # the address is the guest's: its MAC moves (QEMU's announce-self)
                self.driver.announce(a.key)  # type: ignore[attr-defined]
            else:
                self.fabric.claim(a.ip)
        except (FabricError, DriverError) as exc:
            self.warn(a.key, f"cannot move address {a.ip} of {a.key} to host {self.host}: {exc}",
                      event_reason="AddressNotMoved")
            return False
        fabric = GUEST_NIC_FABRIC if guest_nic else self.fabric.name
        ms = round((self.clock() - t0) * 1000)
        log.info("network cut-over of %s: address %s moved to host %s (%s fabric, %d ms)", a.key, a.ip, self.host,
                 fabric, ms)
        failpoints.hit("target-agent.after-address")
        network = {"attempt": a.attempt, "address": a.ip, "fabric": fabric,
                   "movedAt": fmt(self.now(), fraction=True), "ms": ms}
        ns, name = a.migration
        try:
            body = self.kube.patch_status("LiveMigration", name, {"target": {"network": network}}, ns)
        except NotFound:
            return True  # the address is here; the migration is gone
        self.observer.written(body)
        return True

    def _guests_own_addresses(self) -> bool:
        """The driver's guests have NICs of their own (qemu with taps): nothing goes on the node."""
        return bool(getattr(self.driver, "owns_addresses", False))

    def sync_addresses(self, snap: Snapshot) -> None:
        """Hold exactly the addresses of the droplets whose guests this host runs (``plan.addresses``):
        claims what a restart or a new droplet lacks, releases what moved away or was deleted. With
        guests that hold their own addresses the node holds none (it releases what it held)."""
        try:
            held = self.fabric.held()
        except FabricError as exc:
            self.warn(VMKey("", ""), f"cannot read the droplet addresses of host {self.host}: {exc}")
            return
        if self._guests_own_addresses():
            for ip in sorted(held):
                try:
                    self.fabric.release(ip)
                except FabricError as exc:
                    self.warn(VMKey("", ""), f"cannot release address {ip} on host {self.host}: {exc}")
            return
        wanted = p.addresses(self.host, snap.droplets, snap.vms)
        for ip in sorted(wanted - held):
            try:
                self.fabric.claim(ip)
                log.info("address %s claimed on host %s (%s fabric)", ip, self.host, self.fabric.name)
            except FabricError as exc:
                self.warn(VMKey("", ""), f"cannot claim address {ip} on host {self.host}: {exc}")
        for ip in sorted(p.addresses_to_release(self.host, snap.droplets, snap.vms, held)):
            try:
                self.fabric.release(ip)
                log.info("address %s released on host %s (%s fabric)", ip, self.host, self.fabric.name)
            except FabricError as exc:
                self.warn(VMKey("", ""), f"cannot release address {ip} on host {self.host}: {exc}")

    def _driver_call(self, key: VMKey, what: str, call: Callable[[], None]) -> bool:
        try:
            call()
            return True
        except DriverError as exc:
            self.warn(key, f"{what} {key} failed: {exc}", event_reason=f"{what.capitalize()}Failed")
            return False

    def _secret(self, migration: p.MigKey) -> bytes:
        return self.kube.read_secret_key(migration[0], c.transfer_secret_name(migration[1]))

    def _prepare(self, a: p.PrepareIncoming, snap: Snapshot) -> bool:
        mid = a.migration_id
        try:
            secret = self._secret(a.migration)
        except StorageError as exc:
            self.warn(a.key, f"cannot prepare incoming {a.key} for {mid}: transfer key: {exc}")
            return False
        try:
            address = self.driver.prepare_incoming(a.spec, bind_host=self.ctx.address, secret=secret,
                                                   migration_id=mid)
        except DriverError as exc:
            log.warning("preparing incoming %s for %s failed: %s", a.key, mid, exc)
            self._report(p.ReportTarget(a.key, a.migration, p.target_status(
                a.attempt, TargetState.FAILED, self.now(), error=f"prepare incoming VM: {exc}")), "target", snap)
            return False
        log.info("preparing incoming %s for %s on %s", a.key, mid, address)
        return self._report(p.ReportTarget(a.key, a.migration, p.target_status(
            a.attempt, TargetState.LISTENING, self.now(), address=address)), "target", snap)

    def _start_migration(self, a: p.StartMigration, snap: Snapshot) -> bool:
        mid = a.migration_id
        try:
            secret = self._secret(a.migration)
        except StorageError as exc:
            self.warn(a.key, f"cannot migrate {a.key} for {mid}: transfer key: {exc}")
            return False
        o = a.options
        log.info("migrating %s to %s for %s (%s, downtime budget %d ms, bandwidth %s)", a.key, a.target, mid,
                 "offline" if o.offline else "live", o.downtime_budget_ms,
                 f"{o.bandwidth_bps // p.MiB} MiB/s" if o.bandwidth_bps else "unlimited")
        failpoints.hit("source-agent.before-start-migration")
        try:
            self.driver.start_migration(a.key, a.target, secret, mid, o)
        except DriverError as exc:
            log.warning("starting migration %s of %s failed: %s", mid, a.key, exc)
            self._report(p.ReportTransfer(a.key, a.migration, p.transfer_failed(
                a.attempt, f"start migration: {exc}", self.now())), "transfer", snap)
            return False
        self.wake()  # report the first progress soon
        return True

    def _report(self, a: p.ReportTarget | p.ReportTransfer, field: str, snap: Snapshot) -> bool:
        ns, name = a.migration
        status = dict(a.status)
        if field == "target" and status.get("state") == "Running" and not status.get("resumedAt"):
            resumed = self.resumed.get(a.key)
            if resumed is not None and resumed[0] == p.migration_id(ns, name, int(status.get("attempt") or 0)):
                status["resumedAt"] = fmt(resumed[1], fraction=True)  # the resume this agent just did
        lm = snap.migrations.get(a.migration)
        previous = getattr(lm, field) if lm is not None else None
        changed = previous is None or previous.state != status.get("state") or previous.attempt != status.get("attempt")
        first_digest = bool(status.get("digest")) and (previous is None or previous.digest != status.get("digest"))
        if field == "transfer" and status.get("state") == "Completed":
            if changed:
                failpoints.hit("source-agent.before-report-completed")
            if first_digest and lm is not None and lm.target.frozen_point:
                failpoints.hit("source-agent.before-report-verified")  # the paused source, hashed after the switchover
        elif field == "target":
            if changed and status.get("state") == "Received":
                failpoints.hit("target-agent.before-report-received")
            if first_digest and status.get("frozenPoint"):
                failpoints.hit("target-agent.before-report-verified")  # the frozen point, hashed after the resume
        try:
            body = self.kube.patch_status("LiveMigration", name, {field: status}, ns)
        except NotFound:
            return False
        self.observer.written(body)
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


def platform_of(driver: Driver, settings: Settings) -> dict[str, Any]:
    """What this host offers a guest: the hypervisor's version, the CPU model and flags
    (FERRY_CPU_MODEL / FERRY_CPU_FLAGS override them, e.g. a baseline a pool of mixed hosts
    shares) and, for drivers that run a thread per vCPU, the most vCPUs a guest may have."""
    model, flags = host_cpu()
    if settings.cpu_model:
        model = settings.cpu_model
    if settings.cpu_flags:
        flags = frozenset(settings.cpu_flags.replace(",", " ").split())
    version = getattr(driver, "hypervisor_version", lambda: None)()
    cores = getattr(driver, "max_vcpus", lambda: None)()
    return Platform(getattr(driver, "name", None), version, model, flags, cores).to_dict()


class Heartbeat:
    """Host.status.agent: what this agent runs and that it is alive."""

    def __init__(self, ctx: p.HostContext, driver: Driver, kube: Kube, settings: Settings, warn: Warnings, *,
                 version: str, now: Callable[[], dt.datetime], clock: Callable[[], float]):
        self.ctx = ctx
        self.driver = driver
        self.kube = kube
        self.settings = settings
        self.warn = warn
        self.version = version
        self.now = now
        self.clock = clock
        self.due = False  # beat after this cycle: the VMs changed since the last beat
        self._last_vms: list[tuple[VMKey, str, int]] | None = None
        self._host_missing_since: float | None = None
        self._host_missing_logged = 0.0
        self._beats = 0
        self.platform = platform_of(driver, settings)

    @property
    def period(self) -> float:
        return max(0.2, self.settings.heartbeat_seconds)

    def note_vms(self, infos: list[VMInfo]) -> None:
        """The VMs seen this cycle: a beat is due if they differ from the last beat's."""
        if _vm_view(infos) != self._last_vms:
            self.due = True

    def beat(self) -> bool:
        host = self.ctx.name
        try:
            infos = self.driver.list_vms()
        except DriverError as exc:
            self.warn(VMKey("", ""), f"cannot list VMs for the heartbeat: {exc}")
            infos = []
        status = p.agent_status(self.ctx, getattr(self.driver, "name", "unknown"), self.version, infos, self.now(),
                                self.platform)
        try:
            self.kube.patch_status("Host", host, {"agent": status})
        except NotFound:
            t = self.clock()
            if self._host_missing_since is None or t - self._host_missing_logged >= HOST_MISSING_REPEAT_SECONDS:
                log.warning("Host %s does not exist: create it (kind Host, apiVersion %s, name %s); "
                            "heartbeating again in %.0fs", host, c.API_VERSION, host, self.period)
                self._host_missing_logged = t
            if self._host_missing_since is None:
                self._host_missing_since = t
            return False
        except StorageError as exc:
            log.warning("heartbeat of Host %s failed: %s", host, exc)
            return False
        if self._host_missing_since is not None or self._beats == 0:
            log.info("heartbeating Host %s every %.1fs (address %s, driver %s, %d VMs)", host,
                     self.period, self.ctx.address, status["driver"], len(infos))
        self._host_missing_since = None
        self._beats += 1
        self._last_vms = _vm_view(infos)
        self.due = False
        return True
