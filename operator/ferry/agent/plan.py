"""PURE decisions of the per-host agent: what to do with the VMs and migrations of one host.

``plan(host, droplets, migrations, vms, now)`` looks at plain data -- the droplets and
LiveMigrations that concern this host (typed views from ``ferry.api.models``), the VMs the
driver reports (``VMObs``: ``VMInfo`` plus the driver's ``MigrationStats``) and the time --
and returns the list of ``Action``s that move the host towards what the API asks for.
It performs no I/O; ``ferry.agent.execute`` carries the actions out. Every action is idempotent,
and the function is a function of observations only, so an agent that crashed and
restarted rebuilds everything from ``driver.list_vms()`` + ``query_migration`` + the API.

Knowledge about an object comes in three states, and the difference matters:

- ``droplets[key]`` is a ``Droplet``: we know its placement record (``status.host``);
- ``droplets[key]`` is ``None``: the droplet is gone (deleted, the API said 404);
- ``key`` not in ``droplets``: unknown (not fetched, API error): nothing destructive happens.

The same holds for ``migrations`` (keyed by ``(namespace, name)``).

The rules (docs/architecture.md, "The migration protocol"):

- The placement record is the lock. A VM whose droplet record names this host is never
  destroyed; a VM is destroyed only when its droplet is gone or its record names another
  host and no migration of this host still needs it (the incoming VM of the current
  attempt). The executor re-reads the droplet before destroying, starting or resuming.
- Target role (``status.targetHost`` is this host), attempt N: Preparing -> prepare the
  incoming VM and report Listening; PreCopy/CutOver -> report Received (+ digest) or
  Failed from the incoming VM's stats; once the record names this host and the phase is
  CutOver or Completed -> resume (or keep stopped if the droplet is powered off) and report
  Running. An incoming VM of another attempt, of a Failed/Cancelled migration or of a
  migration that no longer names this host is destroyed (report Cleaned).
- Source role (``status.sourceHost`` is this host), while the record names this host:
  PreCopy -> start the migration to ``status.target.address`` once the target listens,
  then report ``status.transfer`` (rate-limited; state changes at once). Failed,
  Cancelled or a later attempt -> cancel (the source resumes). The source copy is
  destroyed only once the record names another host (the general rule above).
- Droplets whose record names this host run when ``powerState`` is on and are stopped
  when off, unless a migration is using the VM.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Any, Union

from ferry.api.livemigration import LiveMigration
from ferry.api.models import Droplet
from ferry.api.phases import ATTEMPT, TRANSFER_FINAL, Phase, TargetState, TransferState
from ferry.api.reports import ImageProgress, TargetReport, TransferReport
from ferry.api.times import fmt
from ferry.drivers.base import (
    MigrationOptions,
    MigrationState,
    MigrationStats,
    VMInfo,
    VMKey,
    VMSpec,
    VMState,
    Workload,
)

MiB = 1024 * 1024

MigKey = tuple[str, str]  # (namespace, name) of a LiveMigration

#: source-side driver states in which the source VM is busy with (or held for) a migration
SOURCE_BUSY = frozenset({MigrationState.COPYING, MigrationState.CONVERGING, MigrationState.PAUSED,
                         MigrationState.COMPLETED})
#: phases in which the target of the current attempt keeps its incoming VM
TARGET_KEEP_PHASES = frozenset({Phase.PREPARING, Phase.PRECOPY, Phase.CUTOVER, Phase.COMPLETED})
#: phases in which the source must not resume on its own: the record may be moving
SOURCE_HOLD_PHASES = frozenset({Phase.PRECOPY, Phase.CUTOVER, Phase.COMPLETED})
#: verification states after which the source keeps its paused copy until the user decides:
#: the record moved but the copies differ, or a digest never came
UNVERIFIED = frozenset({"Mismatch", "Incomplete"})
#: target report states that mean "prepared for this attempt"
TARGET_PREPARED = frozenset({TargetState.LISTENING, TargetState.RECEIVED, TargetState.RUNNING})

TRANSFER_STATE = {
    MigrationState.NONE: TransferState.COPYING,
    MigrationState.COPYING: TransferState.COPYING,
    MigrationState.CONVERGING: TransferState.CONVERGING,
    MigrationState.PAUSED: TransferState.PAUSED,
    MigrationState.COMPLETED: TransferState.COMPLETED,
    MigrationState.RECEIVED: TransferState.COMPLETED,
    MigrationState.FAILED: TransferState.FAILED,
    MigrationState.ABORTED: TransferState.ABORTED,
}


# --- inputs -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class HostContext:
    """Who we are, plus the settings the decisions use."""

    name: str
    address: str = "127.0.0.1"
    downtime_budget_ms: int = 300
    report_interval_seconds: float = 1.0


@dataclasses.dataclass(frozen=True)
class VMObs:
    """One VM as the driver reports it; ``stats`` is None when it was not queried."""

    info: VMInfo
    stats: MigrationStats | None = None

    @property
    def key(self) -> VMKey:
        return self.info.key

    @property
    def state(self) -> VMState:
        return self.info.state

    @property
    def migration_id(self) -> str | None:
        """The migration this VM last took part in (live process first, then its stats)."""
        if self.info.migration_id:
            return self.info.migration_id
        return self.stats.migration_id if self.stats is not None else None

    @property
    def migration_state(self) -> MigrationState:
        return self.stats.state if self.stats is not None else MigrationState.NONE

    @property
    def source_busy_mid(self) -> str | None:
        """The migration id this VM is sending for (or held paused for), if any."""
        s = self.stats
        if (s is None or self.info.state == VMState.INCOMING or not s.migration_id
                or s.state not in SOURCE_BUSY or self.info.migration_id != s.migration_id):
            return None  # a VM without a live process (migration_id from its files) sends nothing
        return s.migration_id


# --- actions ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StartVM:
    spec: VMSpec
    reason: str = ""

    @property
    def key(self) -> VMKey:
        return self.spec.key


@dataclasses.dataclass(frozen=True)
class StopVM:
    key: VMKey
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class DestroyVM:
    key: VMKey
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class ResumeVM:
    """Target after the flip: run the received guest."""

    key: VMKey
    migration_id: str
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class ClaimAddress:
    """Target after its guest resumed: the network cut-over. The droplet's address moves to this
    host (``ferry.drivers.network``); the executor reports it in status.target.network. The
    Running report follows only once the address is here."""

    key: VMKey
    ip: str
    migration: MigKey
    attempt: int


@dataclasses.dataclass(frozen=True)
class PrepareIncoming:
    """Target: start the incoming VM; the executor reports Listening with its address."""

    spec: VMSpec
    migration: MigKey
    attempt: int

    @property
    def key(self) -> VMKey:
        return self.spec.key

    @property
    def migration_id(self) -> str:
        return migration_id(*self.migration, self.attempt)


@dataclasses.dataclass(frozen=True)
class StartMigration:
    """Source: send the VM to ``target``; a failure is reported as status.transfer Failed."""

    key: VMKey
    migration: MigKey
    attempt: int
    target: str
    options: MigrationOptions

    @property
    def migration_id(self) -> str:
        return migration_id(*self.migration, self.attempt)


@dataclasses.dataclass(frozen=True)
class CancelMigration:
    """Source: abort the migration ``migration_id``; the guest resumes on this host."""

    key: VMKey
    migration_id: str
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class ForceComplete:
    """Source: ``spec.forceComplete`` asked to pause the guest now and finish ``migration_id``."""

    key: VMKey
    migration_id: str


@dataclasses.dataclass(frozen=True)
class ReportTarget:
    """Merge ``status`` into LiveMigration ``migration``'s status.target."""

    key: VMKey
    migration: MigKey
    status: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class ReportTransfer:
    """Merge ``status`` into LiveMigration ``migration``'s status.transfer."""

    key: VMKey
    migration: MigKey
    status: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Warn:
    """Nothing to do but something a human should know (logged, deduplicated)."""

    key: VMKey
    message: str
    event_reason: str | None = None  # also a Warning Event with this reason on the droplet


#: the Warning Event (and, from the operator, the Droplet condition) of a guest that rebooted
#: because its VM process died
GUEST_RESTARTED = "GuestRestarted"

Action = Union[StartVM, StopVM, DestroyVM, ResumeVM, ClaimAddress, PrepareIncoming, StartMigration, CancelMigration, ForceComplete,
               ReportTarget, ReportTransfer, Warn]
DRIVER_ACTIONS = (StartVM, StopVM, DestroyVM, ResumeVM, PrepareIncoming, StartMigration, CancelMigration, ForceComplete)


# --- helpers ------------------------------------------------------------------------------

def migration_id(namespace: str, name: str, attempt: int) -> str:
    return f"{namespace}/{name}#{attempt}"


def parse_migration_id(mid: str | None) -> tuple[str, str, int] | None:
    """``"ns/lm#3"`` -> ``("ns", "lm", 3)``; None for anything else."""
    if not mid or "/" not in mid or "#" not in mid:
        return None
    ref, _, attempt = mid.rpartition("#")
    ns, _, name = ref.partition("/")
    try:
        n = int(attempt)
    except ValueError:
        return None
    return (ns, name, n) if ns and name else None


def vm_spec(droplet: Droplet, *, power_on: bool | None = None) -> VMSpec:
    r = droplet.resources
    return VMSpec(
        key=VMKey(droplet.namespace, droplet.name),
        cpu=r.cpu, memory_mib=r.memory_mib, disk_gib=r.disk_gib,
        workload=Workload(droplet.workload.pattern, droplet.workload.write_rate_kibps),
        power_on=droplet.power_on if power_on is None else power_on,
        ip=droplet.address,
    )


def migration_options(lm: LiveMigration, default_downtime_ms: int) -> MigrationOptions:
    limits = lm.status.effective_limits or lm.spec.limits
    downtime = limits.downtime_ms or lm.spec.limits.downtime_ms or default_downtime_ms
    bandwidth = limits.bandwidth_mibps or lm.spec.limits.bandwidth_mibps
    mode = lm.status.effective_mode or lm.spec.mode
    ceiling = limits.max_downtime_ms or lm.spec.limits.max_downtime_ms
    return MigrationOptions(downtime_budget_ms=int(downtime),
                            bandwidth_bps=int(bandwidth) * MiB if bandwidth else None,
                            offline=mode == "offline",
                            max_downtime_ms=max(int(ceiling), int(downtime)) if ceiling else None,
                            force_complete=lm.spec.force_complete)


def progress_percent(stats: MigrationStats) -> int:
    """0..100: the share of the data to send that is sent (holes and zero blocks are never
    sent, so ``bytesTotal`` is no measure); 100 only when Completed."""
    if stats.state in (MigrationState.COMPLETED, MigrationState.RECEIVED):
        return 100
    sent, remaining = max(0, stats.bytes_sent), max(0, stats.dirty_remaining)
    if sent + remaining <= 0:
        return 0
    return max(0, min(99, sent * 100 // (sent + remaining)))


def transfer_report(stats: MigrationStats, attempt: int, now: dt.datetime) -> TransferReport:
    """``status.transfer`` from the source's stats."""
    return TransferReport(
        attempt=attempt,
        state=TRANSFER_STATE.get(stats.state, TransferState.COPYING),
        round=stats.round,
        disk=ImageProgress(stats.disk.total, stats.disk.sent, stats.disk.remaining),
        memory=ImageProgress(stats.memory.total, stats.memory.sent, stats.memory.remaining),
        bytes_total=stats.bytes_total,
        bytes_sent=stats.bytes_sent,
        dirty_remaining=stats.dirty_remaining,
        dirty_rate_bps=stats.dirty_rate_bps,
        bandwidth_bps=stats.bandwidth_bps,
        throttle_percent=stats.throttle_percent,
        throttled_ms=stats.throttled_ms,
        max_throttle_percent=stats.max_throttle_percent,
        expected_downtime_ms=stats.expected_downtime_ms,
        eta_seconds=stats.eta_seconds,
        progress=progress_percent(stats),
        rounds=tuple(stats.rounds),
        downtime_ms=stats.downtime_ms,
        downtime_budget_ms=stats.downtime_budget_ms,
        max_downtime_ms=stats.max_downtime_ms,
        allowed_downtime_ms=stats.allowed_downtime_ms,
        downtime_steps=stats.downtime_steps,
        predicted_downtime_ms=stats.predicted_downtime_ms,
        forced=stats.forced,
        verify_ms=stats.verify_ms,
        hashed_bytes=stats.hashed_bytes,
        digest=stats.digest,
        error=stats.error,
        updated_at=now,
        channel=stats.channel,
        paused_at=epoch(stats.paused_at),
    )


def epoch(t: float | None) -> dt.datetime | None:
    """A driver's wall-clock seconds as a time."""
    return dt.datetime.fromtimestamp(t, dt.timezone.utc) if t is not None else None


def transfer_status(stats: MigrationStats, attempt: int, now: dt.datetime) -> dict[str, Any]:
    """The merge patch of ``status.transfer`` (None values clear stale fields)."""
    return transfer_report(stats, attempt, now).to_patch()


def transfer_failed(attempt: int, error: str, now: dt.datetime) -> dict[str, Any]:
    return TransferReport.failure_patch(attempt, error, now)


def target_status(attempt: int, state: TargetState, now: dt.datetime, *, address: str | None = None,
                  digest: str | None = None, error: str | None = None,
                  stats: MigrationStats | None = None, resumed_at: dt.datetime | None = None) -> dict[str, Any]:
    """``status.target``; ``stats`` (the incoming VM's) adds the frozen point and its hash, and
    when the guest was resumed if the driver says (else ``resumed_at``: as reported before;
    the executor stamps a resume it just did, ``Executor.resumed``)."""
    if stats is None:
        return TargetReport(attempt, state, address, digest, error, now, resumed_at=resumed_at).to_patch()
    return TargetReport(attempt, state, address, digest, error, now, stats.frozen_point, stats.verify_ms,
                        stats.hashed_bytes, resumed_at=epoch(stats.resumed_at) or resumed_at).to_patch()


def _comparable(d: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (d or {}).items() if v is not None and v != [] and k != "updatedAt"}


def transfer_due(lm: LiveMigration, new: Mapping[str, Any], now: dt.datetime, interval: float) -> bool:
    """Whether ``new`` should be written now: at once on a new attempt or state, otherwise
    when something changed and the last report is ``interval`` seconds old."""
    old = lm.transfer
    if old.attempt != new["attempt"] or old.state != new["state"]:
        return True
    if _comparable(old.to_patch()) == _comparable(new):
        return False
    if new["state"] in TRANSFER_FINAL:
        return True  # e.g. the digest or downtime arrives with the final state: never wait
    return old.updated_at is None or (now - old.updated_at).total_seconds() >= interval


def _same_target(lm: LiveMigration, attempt: int, state: str) -> bool:
    return lm.target.attempt == attempt and lm.target.state == state


# --- the decision -------------------------------------------------------------------------

def plan(host: HostContext, droplets: Mapping[VMKey, Droplet | None],
         migrations: Mapping[MigKey, LiveMigration | None], vms: Mapping[VMKey, VMObs],
         now: dt.datetime) -> list[Action]:
    """Everything this host should do now, in execution order (grouped by droplet)."""
    me = host.name
    by_droplet: dict[VMKey, list[LiveMigration]] = {}
    for lm in migrations.values():
        if lm is not None and me in (lm.status.source_host, lm.status.target_host):
            by_droplet.setdefault(VMKey(lm.namespace, lm.droplet), []).append(lm)
    keys: set[VMKey] = set(vms) | set(by_droplet)
    keys |= {k for k, d in droplets.items() if d is not None and d.host == me}
    actions: list[Action] = []
    for key in sorted(keys):
        lms = sorted(by_droplet.get(key, ()), key=lambda m: m.name)
        actions.extend(_plan_droplet(host, key, droplets, migrations, vms.get(key), lms, now))
    return actions


def _plan_droplet(host: HostContext, key: VMKey, droplets: Mapping[VMKey, Droplet | None],
                  migrations: Mapping[MigKey, LiveMigration | None], vm: VMObs | None,
                  lms: list[LiveMigration], now: dt.datetime) -> list[Action]:
    me = host.name
    known = key in droplets
    d = droplets.get(key)
    owned = d is not None and d.host == me
    elsewhere = known and (d is None or (d.host is not None and d.host != me))
    out: list[Action] = []
    destroyed = False  # planned a DestroyVM for this key
    claimed = False  # a migration of this host decided about this VM: no power management

    # 1. An incoming VM: the current attempt of a migration to this host keeps it, the
    #    rest is torn down (unless the record names this host: then it is adopted).
    if vm is not None and vm.state == VMState.INCOMING:
        claimed = True
        ref = parse_migration_id(vm.migration_id)
        owner_key = (ref[0], ref[1]) if ref else None
        owner = migrations.get(owner_key) if owner_key else None
        owner_known = owner_key is None or owner_key in migrations
        current = (owner is not None and ref is not None and owner.status.target_host == me
                   and owner.status.attempt == ref[2] and owner.phase in TARGET_KEEP_PHASES)
        if current or not owner_known:
            pass  # the target logic below handles the current attempt; unknown: wait
        elif owned:
            if vm.migration_state == MigrationState.RECEIVED:
                out.append(ResumeVM(key, vm.migration_id or "", "its record names this host"))
                if d is not None and not d.power_on:
                    out.append(StopVM(key, "powerState off"))
            else:
                out.append(Warn(key, f"incoming VM of {vm.migration_id or 'no migration'} holds unverified data "
                                     "but the droplet's record names this host; leaving it alone"))
        elif elsewhere:
            reason = "its migration no longer needs it" if d is not None else "its droplet was deleted"
            out.append(DestroyVM(key, f"incoming VM of {vm.migration_id or 'no migration'}: {reason}"))
            destroyed = True

    # 2. Target role.
    serving: str | None = None
    for lm in lms:
        if lm.status.target_host != me or lm.status.attempt < 1:
            continue
        acts, took = _target(host, key, lm, d, known, owned, elsewhere, vm, destroyed, now)
        if serving is not None and any(isinstance(a, DRIVER_ACTIONS) for a in acts):
            # one droplet, one incoming VM: the operator allows one active migration per droplet
            acts = [Warn(key, f"{lm.namespace}/{lm.name} also targets this host; serving {serving} only")]
        elif any(isinstance(a, DRIVER_ACTIONS) for a in acts):
            serving = f"{lm.namespace}/{lm.name}"
        out.extend(acts)
        claimed = claimed or took
        destroyed = destroyed or any(isinstance(a, DestroyVM) for a in acts)

    # 3. Source role (only while the record names this host).
    source_mid = vm.source_busy_mid if vm is not None else None
    handled: set[str] = set()
    for lm in lms:
        if lm.status.source_host != me or lm.status.attempt < 1:
            continue
        acts, mids = _source(host, key, lm, owned, vm, source_mid, _known(source_mid, migrations), now)
        out.extend(acts)
        handled |= mids
    if source_mid is not None:
        claimed = True
        if owned and source_mid not in handled and _orphaned(me, source_mid, migrations):
            out.append(CancelMigration(key, source_mid, "its migration is gone"))

    # 4. The lock rule, then power management. A source copy held paused for a cut-over stays
    #    until the target reports it runs: if the target dies first, the operator moves the
    #    record back and this copy (the only one with the guest's memory) resumes.
    if (vm is not None and elsewhere and not destroyed and vm.state != VMState.INCOMING
            and not (d is not None and _held_for_cutover(me, vm, lms))):
        where = f"its record names {d.host}" if d is not None else "its droplet was deleted"
        out.append(DestroyVM(key, where))
    elif owned and not claimed and not any(isinstance(a, DRIVER_ACTIONS) for a in out):
        assert d is not None
        out.extend(_power(key, d, vm, lms, me))
    return out


def _held_for_cutover(me: str, vm: VMObs, lms: list[LiveMigration]) -> bool:
    """This VM is the paused source of the current attempt of a migration in PreCopy/CutOver
    whose target has not reported Running yet, or (a frozen point, qemu) whose verdict is not
    in yet, or whose verification found the copies different (kept until the user decides)."""
    ref = parse_migration_id(vm.source_busy_mid)
    if ref is None:
        return False
    for lm in lms:
        if not ((lm.namespace, lm.name) == (ref[0], ref[1]) and lm.status.source_host == me
                and lm.status.attempt == ref[2]):
            continue
        ver = lm.status.verification
        if lm.phase == Phase.FAILED and ver is not None and ver.state in UNVERIFIED:
            return True
        frozen = lm.target.attempt == ref[2] and lm.target.frozen_point
        if lm.phase in (Phase.PRECOPY, Phase.CUTOVER) and (
                frozen or not (lm.target.attempt == ref[2] and lm.target.state == TargetState.RUNNING)):
            return True
    return False


def _known(mid: str | None, migrations: Mapping[MigKey, LiveMigration | None]) -> bool:
    """``mid`` belongs to a migration this agent has seen (present, or None when deleted)."""
    ref = parse_migration_id(mid) if mid is not None else None
    return ref is not None and (ref[0], ref[1]) in migrations


def _orphaned(me: str, mid: str, migrations: Mapping[MigKey, LiveMigration | None]) -> bool:
    """The source-side migration ``mid`` belongs to no migration of this host any more."""
    ref = parse_migration_id(mid)
    if ref is None:
        return True
    if (ref[0], ref[1]) not in migrations:
        return False  # unknown: wait
    owner = migrations[(ref[0], ref[1])]
    return owner is None or (owner.status.source_host != me and owner.phase not in SOURCE_HOLD_PHASES)


def _power(key: VMKey, d: Droplet, vm: VMObs | None, lms: list[LiveMigration], me: str) -> list[Action]:
    if vm is None or vm.state == VMState.STOPPED:
        if not d.power_on and vm is not None:
            return []
        if vm is None:
            expecting = [lm for lm in lms if lm.status.target_host == me and lm.phase in (Phase.PRECOPY, Phase.CUTOVER)]
            if expecting:
                return [Warn(key, f"the droplet's record names this host but the incoming VM of "
                                  f"{expecting[0].namespace}/{expecting[0].name} is missing; not starting an empty one")]
        if any(lm.status.source_host == me and lm.phase in (Phase.PRECOPY, Phase.CUTOVER) for lm in lms):
            # No VM to send, or a source VM that died mid-migration: never boot it again while the
            # attempt may still commit its copy (the target then runs the guest, and a rebooted
            # source would run it too). The attempt fails first (reported) or the record moves.
            return []
        if not d.power_on:  # define it (images, no guest): a powered-off droplet has a disk too
            return [StartVM(vm_spec(d), "placed on this host, powered off")]
        if vm is not None and vm.info.crashed:
            why = f"the VM process of droplet {key} died on host {me}: starting it again, the guest reboots"
            return [Warn(key, why, GUEST_RESTARTED), StartVM(vm_spec(d), "its VM process died")]
        return [StartVM(vm_spec(d), "powerState on" if vm is not None else "placed on this host")]
    if vm.state == VMState.RUNNING and not d.power_on:
        return [StopVM(key, "powerState off")]
    if vm.state == VMState.PAUSED and not d.power_on:
        return [StopVM(key, "powerState off")]
    return []


def _flipped(lm: LiveMigration, n: int) -> bool:
    """The record (which names this host: the caller checks) moved for attempt ``n`` of ``lm``:
    the operator says CutOver, or it has not written that yet but the source reported the copy
    Completed (the operator moves the record only then, and writes the phase after the move). The
    guest resumes as soon as the record names this host, not one status write later: it is paused
    meanwhile."""
    if lm.phase in (Phase.CUTOVER, Phase.COMPLETED):
        return True
    return (lm.phase == Phase.PRECOPY and lm.transfer.attempt == n
            and lm.transfer.state == TransferState.COMPLETED)


def _target(host: HostContext, key: VMKey, lm: LiveMigration, d: Droplet | None, known: bool, owned: bool,
            elsewhere: bool, vm: VMObs | None, destroyed: bool, now: dt.datetime) -> tuple[list[Action], bool]:
    """Actions of the target role for ``lm``; the bool says whether it decided about the VM."""
    me, n = host.name, lm.status.attempt
    ref = (lm.namespace, lm.name)
    mid = migration_id(lm.namespace, lm.name, n)
    rep = lm.target
    has_vm = vm is not None and vm.migration_id == mid and not destroyed
    out: list[Action] = []

    if lm.phase == Phase.PREPARING:
        if has_vm and vm is not None and vm.state == VMState.INCOMING and rep.attempt == n and rep.state in TARGET_PREPARED:
            return out, True
        if rep.attempt == n and rep.state == TargetState.FAILED:
            return out, has_vm  # reported; the operator fails the attempt
        if not known or d is None:
            return out, False  # need the droplet's size; a deleted droplet fails the migration upstream
        if owned:
            if not _same_target(lm, n, TargetState.FAILED):
                out.append(ReportTarget(key, ref, target_status(
                    n, TargetState.FAILED, now, error=f"droplet {key} already runs on target host {me}")))
            return out, False
        if vm is not None and vm.state != VMState.INCOMING and not destroyed and elsewhere:
            out.append(DestroyVM(key, f"a stale copy is in the way of incoming {mid}"))
        out.append(PrepareIncoming(vm_spec(d), ref, n))
        return out, True

    if lm.phase in SOURCE_HOLD_PHASES:
        if not has_vm:
            if lm.phase != Phase.COMPLETED and rep.attempt == n and rep.state in (TargetState.PREPARING, TargetState.LISTENING, TargetState.RECEIVED):
                out.append(ReportTarget(key, ref, target_status(
                    n, TargetState.FAILED, now, address=rep.address, error=f"the incoming VM of {mid} is gone from host {me}")))
            return out, False
        assert vm is not None
        st = vm.migration_state
        stats = vm.stats
        if vm.state == VMState.INCOMING:
            if st == MigrationState.RECEIVED and vm.info.pid is None:
                # received, never resumed, and its process is gone: so is the guest's memory.
                # Failed (even after the flip): the operator moves the record back and the
                # source, which still holds its paused copy, resumes.
                if not _same_target(lm, n, TargetState.FAILED):
                    out.append(ReportTarget(key, ref, target_status(
                        n, TargetState.FAILED, now, address=rep.address if rep.attempt == n else None,
                        error=f"the incoming VM of {mid} died on host {me} before it ran")))
            elif st == MigrationState.RECEIVED:
                if owned and _flipped(lm, n):
                    out.append(ResumeVM(key, mid, f"the record names {me}"))
                    if d is not None and not d.power_on:
                        out.append(StopVM(key, "powerState off (offline migration)"))
                    if d is not None and owned_address(d):
                        out.append(ClaimAddress(key, owned_address(d), ref, n))
                    out.append(ReportTarget(key, ref, target_status(
                        n, TargetState.RUNNING, now, address=rep.address if rep.attempt == n else None,
                        digest=stats.digest if stats else None, stats=stats)))
                elif not (rep.attempt == n and rep.state in (TargetState.RECEIVED, TargetState.RUNNING)):
                    out.append(ReportTarget(key, ref, target_status(
                        n, TargetState.RECEIVED, now, address=rep.address if rep.attempt == n else None,
                        digest=stats.digest if stats else None, stats=stats)))
            elif st in (MigrationState.FAILED, MigrationState.ABORTED):
                if not _same_target(lm, n, TargetState.FAILED):
                    error = (stats.error if stats else None) or f"incoming migration {st.value.lower()}"
                    out.append(ReportTarget(key, ref, target_status(
                        n, TargetState.FAILED, now, address=rep.address if rep.attempt == n else None, error=error)))
            return out, True
        # resumed already (Running, or Stopped when powered off): power management applies again.
        # A frozen point's digest arrives after the resume: reported when it is there.
        verified_late = (stats is not None and stats.frozen_point and stats.digest is not None
                         and stats.migration_id == mid and rep.attempt == n and rep.digest != stats.digest)
        if owned and (not _same_target(lm, n, TargetState.RUNNING) or verified_late):
            if d is not None and owned_address(d):
                out.append(ClaimAddress(key, owned_address(d), ref, n))  # idempotent: after a crash in between
            out.append(ReportTarget(key, ref, target_status(
                n, TargetState.RUNNING, now, address=rep.address if rep.attempt == n else None,
                digest=(stats.digest if stats else None) or rep.digest,
                stats=stats if stats is not None and stats.migration_id == mid else None,
                resumed_at=rep.resumed_at if rep.attempt == n else None)))
        return out, False

    # Pending/Announced/Scheduling (a later attempt is being set up), Failed, Cancelled:
    # the incoming VM (if any) was torn down in step 1; say so once.
    m = rep.attempt
    if m >= 1 and rep.state not in (TargetState.CLEANED, TargetState.RUNNING) and not owned:
        still_there = vm is not None and vm.migration_id == migration_id(lm.namespace, lm.name, m) and not destroyed
        if not still_there:
            out.append(ReportTarget(key, ref, target_status(m, TargetState.CLEANED, now, address=rep.address,
                                                            error=rep.error)))
    return out, False


def _source(host: HostContext, key: VMKey, lm: LiveMigration, owned: bool, vm: VMObs | None,
            source_mid: str | None, source_known: bool, now: dt.datetime) -> tuple[list[Action], set[str]]:
    """Actions of the source role for ``lm``; the set holds the migration ids it decided about.
    ``source_known``: the migration the VM's copy in progress (``source_mid``) belongs to is one
    this agent has seen, present or deleted."""
    n = lm.status.attempt
    ref = (lm.namespace, lm.name)
    mid = migration_id(lm.namespace, lm.name, n)
    stats = vm.stats if vm is not None else None
    stats_ref = parse_migration_id(stats.migration_id) if stats is not None else None
    ours = stats_ref is not None and (stats_ref[0], stats_ref[1]) == ref  # stats of some attempt of lm
    out: list[Action] = []
    handled: set[str] = set()
    if source_mid is not None and ours:
        handled.add(source_mid)
    if not owned:
        # The record moved (or is unknown): nothing to send, nothing to resume. A paused source
        # whose digest came after the switchover (qemu) still reports it while the operator
        # waits for it to compare with the target's frozen point.
        if (lm.phase == Phase.CUTOVER and stats is not None and stats.migration_id == mid
                and stats.state == MigrationState.COMPLETED and lm.transfer.attempt == n):
            out.extend(_report_transfer(host, key, lm, stats, n, now))
        return out, handled

    if lm.phase in (Phase.PRECOPY, Phase.CUTOVER) and _died_sending(vm, mid):
        if not (lm.transfer.attempt == n and lm.transfer.failed):
            out.append(ReportTransfer(key, ref, transfer_failed(
                n, f"the VM process of droplet {key} died on source host {host.name} while sending "
                   f"({stats.state.value.lower() if stats else 'copying'}); the guest's memory is lost", now)))
        return out, handled
    if lm.phase == Phase.PRECOPY:
        if stats is not None and stats.migration_id == mid:
            if lm.spec.force_complete and not stats.forced and stats.state in (
                    MigrationState.COPYING, MigrationState.CONVERGING):
                out.append(ForceComplete(key, mid))
            out.extend(_report_transfer(host, key, lm, stats, n, now))
            return out, handled
        if lm.transfer.attempt == n and lm.transfer.failed:
            return out, handled  # reported; the operator retries with a new attempt
        if vm is None or vm.state == VMState.INCOMING:
            if not (lm.transfer.attempt == n and lm.transfer.state == TransferState.FAILED):
                out.append(ReportTransfer(key, ref, transfer_failed(
                    n, f"droplet {key} has no VM on source host {host.name}", now)))
            return out, handled
        target = lm.target
        if target.attempt == n and target.state == TargetState.LISTENING and target.address:
            if source_mid is not None and source_mid != mid:
                if not source_known:
                    return out, handled  # a copy for a migration this agent has not seen: wait, as _orphaned does
                out.append(CancelMigration(key, source_mid, f"{mid} replaces it"))
                handled.add(source_mid)
            out.append(StartMigration(key, ref, n, target.address, migration_options(lm, host.downtime_budget_ms)))
        return out, handled

    if lm.phase == Phase.CUTOVER:
        if stats is not None and stats.migration_id == mid:
            out.extend(_report_transfer(host, key, lm, stats, n, now))
        return out, handled

    # Any other phase: this attempt is over or not started. Resume the source if it is still
    # held for an attempt of this migration (never in Completed: the record may be moving).
    if source_mid is not None and ours and lm.phase != Phase.COMPLETED:
        why = f"migration {lm.phase}" if lm.phase in (Phase.FAILED, Phase.CANCELLED) else f"attempt {n} replaces it"
        out.append(CancelMigration(key, source_mid, why))
    if stats is not None and ours and stats_ref is not None and (stats_ref[2] == n or lm.transfer.attempt == stats_ref[2]):
        if source_mid is None:  # once the cancel took effect, say how it ended
            out.extend(_report_transfer(host, key, lm, stats, stats_ref[2], now))
    return out, handled


def _died_sending(vm: VMObs | None, mid: str) -> bool:
    """The VM was sending ``mid`` (its last stats say so) and has no live process any more:
    it died mid-migration (an exit it was not asked for)."""
    if vm is None or vm.state != VMState.STOPPED or vm.info.pid is not None or vm.stats is None:
        return False
    return vm.stats.migration_id == mid and vm.stats.state in (MigrationState.COPYING, MigrationState.CONVERGING,
                                                                MigrationState.PAUSED)


def _report_transfer(host: HostContext, key: VMKey, lm: LiveMigration, stats: MigrationStats, attempt: int,
                     now: dt.datetime) -> list[Action]:
    new = transfer_status(stats, attempt, now)
    if transfer_due(lm, new, now, host.report_interval_seconds):
        return [ReportTransfer(key, (lm.namespace, lm.name), new)]
    return []


# --- the heartbeat ------------------------------------------------------------------------

def agent_status(host: HostContext, driver: str, version: str, vms: Iterable[VMInfo], now: dt.datetime,
                 platform: Mapping[str, Any] | None = None) -> dict:
    """``Host.status.agent``: the only part of the Host the agent writes. ``platform`` is what
    placement checks a target against (``ferry.api.models.Platform.to_dict``)."""
    out = {
        "address": host.address,
        "heartbeatTime": fmt(now, fraction=True),
        "driver": driver,
        "version": version,
        "vms": [_vm_entry(v) for v in sorted(vms, key=lambda v: v.key)],
    }
    if platform is not None:
        out["platform"] = dict(platform)
    return out


def _vm_entry(v: VMInfo) -> dict[str, Any]:
    out: dict[str, Any] = {"namespace": v.key.namespace, "name": v.key.name, "state": v.state.value}
    if v.restarts:
        out["restarts"] = v.restarts
        out["restartedAt"] = v.restarted_at
    return out


def busy(vms: Mapping[VMKey, VMObs], migrations: Mapping[MigKey, LiveMigration | None], me: str) -> bool:
    """Whether a migration is in flight here (the loop then polls the driver often)."""
    for lm in migrations.values():
        if lm is not None and lm.phase in ATTEMPT and me in (lm.status.source_host,
                                                                                         lm.status.target_host):
            return True
    for vm in vms.values():
        if vm.source_busy_mid is not None:
            return True
        if vm.state == VMState.INCOMING and vm.migration_state not in (MigrationState.FAILED, MigrationState.ABORTED):
            return True
    return False


def owned_address(d: Droplet) -> str | None:
    """The droplet's address if it is its own: a droplet flagged ``AddressConflict`` (an older
    droplet claims the same address, docs/architecture.md) never takes the address from its owner."""
    conflict = d.condition("AddressConflict")
    if conflict is not None and conflict.status == "True":
        return None
    return d.address


def addresses(me: str, droplets: Mapping[VMKey, Droplet | None], vms: Mapping[VMKey, VMObs]) -> set[str]:
    """The droplet addresses this host should hold: those of the droplets whose record names this
    host and whose guest is here and not an incoming copy (running, paused or stopped). An
    incoming VM gets its address only at the network cut-over (``ClaimAddress``), and a source
    copy keeps it until it is destroyed. A droplet of unknown state keeps what it has (the caller
    releases only addresses no known droplet of this host wants)."""
    out: set[str] = set()
    for key, vm in vms.items():
        d = droplets.get(key)
        ip = owned_address(d) if d is not None else None
        if d is not None and d.host == me and ip and vm.state != VMState.INCOMING:
            out.add(ip)
    return out


def addresses_to_release(me: str, droplets: Mapping[VMKey, Droplet | None], vms: Mapping[VMKey, VMObs],
                         held: set[str]) -> set[str]:
    """Held addresses no droplet of this host wants any more. An address of a droplet whose state
    is unknown here (its VM is here but the droplet was not read) is kept until it is known."""
    wanted = addresses(me, droplets, vms)
    unknown = {key for key in vms if key not in droplets}
    if unknown:
        return set()  # cannot tell whose an address is: release nothing this cycle
    return held - wanted
