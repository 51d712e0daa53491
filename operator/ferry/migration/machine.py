"""The LiveMigration state machine. PURE: no kopf, no pykube, no I/O, no clock.

``decide(obs, now, cfg)`` looks at a snapshot of everything the operator observed about one
LiveMigration (:class:`Observation`) and answers with a :class:`Decision`: the status fields
to merge, the side effects to perform (plain :data:`Action` dataclasses), when to look again
and whether the migration is finished. The kopf shell reads, calls ``decide``, applies the
actions IN ORDER, then writes ``Decision.status`` as one merge patch (skipped when empty),
and turns ``requeue_after`` into ``TemporaryError(delay=...)``. If an action fails, the shell
must not write the status: the next reconcile decides again, and every action is either
idempotent or re-emitted only while the observation does not reflect it yet.

Phases (docs/architecture.md, "The migration protocol")::

    (new) -> Pending -> Announced -> Scheduling -> Preparing -> PreCopy -> CutOver -> Completed
                \\____________\\____________\\___________\\__________\\_________\\-> Failed | Cancelled

One phase transition per decision (``requeue_after=0`` asks for the next look at once); each
transition records ``phaseTimes[phase]`` and emits an Event. Rules, in the order ``decide``
applies them:

* Terminal phases (Completed, Failed, Cancelled) never change: ``done=True``, no actions.
* Before the placement record flips: cancel (``spec.cancel`` or the LiveMigration being
  deleted) -> Cancelled; then the droplet must exist, not be deleting, have a host, that host
  must be Ready (else Failed ``HostNotReady``: the source is gone, live migration is
  impossible) and be the recorded ``sourceHost`` (else Failed ``SourceChanged``).
* After the flip (phase CutOver/PreCopy and the droplet's record names ``targetHost``) cancel
  is ignored, once, with a Warning Event ``CancelTooLate``; the migration ends Completed when
  the target reports Running (Received for a powered-off droplet).
* Pending: the only gate is one migration per droplet. :func:`admit` (computed by the shell
  over all migrations) answers ``DropletBusy`` while another migration of the same droplet
  is past Pending (:data:`OWNING_PHASES`) or is an older Pending one; the migration then
  stays Pending. Announcing takes NO concurrency slot: every migration of a host
  evacuation is announced at once, so each droplet gets its whole notice however long the
  queue behind the concurrency limits is.
* Announced: the maintenance annotation is set; ``notBefore = max(scheduledAt, announcedAt +
  notice)``; nothing moves before it. If the annotation disappears, it is re-announced and
  the notice starts again. Once ``notBefore`` has passed the migration needs a concurrency
  slot to go on (Announced -> Scheduling): :func:`admit` checks the cluster-wide limit, its
  source host's outbound limit and, when the target is already known (``spec.targetHost``),
  that host's inbound limit, oldest first, counting migrations in :data:`IN_FLIGHT_PHASES`
  (Scheduling..CutOver). While no slot is free the migration STAYS IN PHASE ANNOUNCED with
  reason ``ConcurrencyLimitReached`` (and the limit in ``message``).

  Why Announced and not Pending (the issue's wording was "stays Pending"): the droplet has
  already been told and its annotation stays up while it waits, so "Announced" is the true
  state; Pending keeps meaning "not announced yet", i.e. only ``DropletBusy``. Clients that
  want "queued for a slot" read ``phase == Announced and reason == ConcurrencyLimitReached``;
  ``WaitingForNotice`` / ``WaitingForSchedule`` mean the notice (or ``scheduledAt``) is not
  over yet. The slot is released when the migration leaves :data:`IN_FLIGHT_PHASES`
  (terminal, or back to Announced when Scheduling finds the notice not over after all);
  retries between attempts keep it (phase Scheduling).
* Scheduling: the shell passes ``place()``'s result. An explicit ``targetHost`` that fails a
  filter -> Failed with the placement message. No host fits -> wait (reason
  ``NoHostAvailable``, looking again every ``poll_seconds``) up to ``no_host_timeout_seconds``,
  then Failed: capacity is released continuously by other migrations finishing and hosts
  returning to Ready, so a short wait turns most of these into successes, while the bound
  keeps a hopeless migration from holding its concurrency slot forever. Hosts that fit but
  are at their inbound limit -> wait without a bound (``TargetsBusy``).
* Preparing -> PreCopy when the target reports Listening for the current attempt.
* PreCopy -> CutOver (+ ``FlipRecord``) only when transfer.state == Completed and
  target.state == Received for the current attempt with equal, non-empty digests; unequal
  digests fail the attempt (``DigestMismatch``).
* An attempt fails on a Failed/Aborted report from either side, the target host going
  NotReady, no progress for ``progress_timeout_seconds`` or exceeding the completion budget
  ``budget_base_seconds + budget_per_gib * image GiB``. Then: retry (phase Scheduling,
  ``nextAttemptAt = now + retry_backoff * 2^(N-1)``, target reservation released) until
  ``maxAttempts``, else Failed (``AttemptsExhausted``) with ``OfflineMigrationNeeded`` on the
  droplet and a Warning Event there.
* Reports (``status.transfer`` / ``status.target``) from another attempt are ignored.

"Progress" is any change of (transfer state, round, bytesSent, target state) for the current
attempt; the operator remembers the last change in ``status.progressMark`` {attempt,
fingerprint, at} (a field the CRD must carry, see crds/livemigrations.ferry.dev.yaml).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Any, Union

from ferry.api import times
from ferry.api.constants import (
    MAINTENANCE_ANNOTATION,
    MAINTENANCE_EVENT,
    MAINTENANCE_SINCE_ANNOTATION,
    transfer_secret_name,
)
from ferry.api.sizes import resources_for
from ferry.placement.model import PlacementResult

__all__ = [
    "ANNOUNCED",
    "CANCELLED",
    "COMPLETED",
    "CUTOVER",
    "FAILED",
    "IN_FLIGHT_PHASES",
    "PENDING",
    "PHASES",
    "PRECOPY",
    "PREPARING",
    "RESERVING_PHASES",
    "SCHEDULING",
    "TERMINAL_PHASES",
    "Action",
    "Admission",
    "Announce",
    "AttemptRecord",
    "ClearAnnouncement",
    "ConcurrencyLimits",
    "Condition",
    "CreateSecret",
    "Decision",
    "DeleteSecret",
    "DropletObs",
    "EmitEvent",
    "FlipRecord",
    "Limits",
    "MachineConfig",
    "MarkDropletCondition",
    "MigrationRef",
    "MigrationSpec",
    "MigrationStatus",
    "OWNING_PHASES",
    "Observation",
    "ProgressMark",
    "RecomputeAllocations",
    "RecordLastMigration",
    "SetLabels",
    "TargetReport",
    "TransferReport",
    "admit",
    "decide",
    "merge_patch",
    "needs_admission",
    "needs_placement",
    "reserved_target",
]

PENDING = "Pending"
ANNOUNCED = "Announced"
SCHEDULING = "Scheduling"
PREPARING = "Preparing"
PRECOPY = "PreCopy"
CUTOVER = "CutOver"
COMPLETED = "Completed"
FAILED = "Failed"
CANCELLED = "Cancelled"

PHASES = (PENDING, ANNOUNCED, SCHEDULING, PREPARING, PRECOPY, CUTOVER, COMPLETED, FAILED, CANCELLED)
TERMINAL_PHASES = frozenset({COMPLETED, FAILED, CANCELLED})
#: Phases that hold a concurrency slot: it is taken on Announced -> Scheduling (see :func:`admit`).
IN_FLIGHT_PHASES = frozenset({SCHEDULING, PREPARING, PRECOPY, CUTOVER})
#: Phases in which a migration owns its droplet: another migration of the same droplet waits
#: in Pending (``DropletBusy``) and is not announced.
OWNING_PHASES = frozenset({ANNOUNCED}) | IN_FLIGHT_PHASES
#: Phases in which ``status.targetHost`` (when set) is a capacity reservation on that host.
RESERVING_PHASES = frozenset({SCHEDULING, PREPARING, PRECOPY, CUTOVER})
_ATTEMPT_PHASES = frozenset({PREPARING, PRECOPY, CUTOVER})


# --------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class MachineConfig:
    """Operator settings the machine uses (defaults = docs/architecture.md).

    ``notice_seconds`` FERRY_NOTICE_SECONDS, ``downtime_budget_ms`` FERRY_DOWNTIME_BUDGET_MS,
    ``max_attempts`` FERRY_MAX_ATTEMPTS, ``retry_backoff_seconds`` FERRY_RETRY_BACKOFF_SECONDS,
    ``progress_timeout_seconds`` FERRY_PROGRESS_TIMEOUT_SECONDS, ``budget_seconds_per_gib``
    FERRY_BUDGET_SECONDS_PER_GIB, ``budget_base_seconds`` FERRY_BUDGET_BASE_SECONDS.
    ``poll_seconds``: longest wait before looking again while waiting on something that has
    no deadline of its own. ``no_host_timeout_seconds``: how long Scheduling waits for a host
    to fit before the migration fails.
    """

    notice_seconds: float = 600.0
    downtime_budget_ms: int = 300
    max_attempts: int = 3
    retry_backoff_seconds: float = 20.0
    progress_timeout_seconds: float = 120.0
    budget_seconds_per_gib: float = 60.0
    budget_base_seconds: float = 120.0
    poll_seconds: float = 30.0
    no_host_timeout_seconds: float = 600.0


@dataclasses.dataclass(frozen=True)
class ConcurrencyLimits:
    """FERRY_MAX_PARALLEL, FERRY_MAX_OUTBOUND_PER_HOST, FERRY_MAX_INBOUND_PER_HOST."""

    max_parallel: int = 5
    max_outbound_per_host: int = 2
    max_inbound_per_host: int = 2


# --------------------------------------------------------------------------- time helpers


def _utc(t: dt.datetime) -> dt.datetime:
    if t.tzinfo is None:
        raise ValueError(f"naive datetime {t!r}: ferry's machine only takes timezone-aware times")
    return t.astimezone(dt.timezone.utc)


def _fmt(t: dt.datetime | None) -> str | None:
    if t is None:
        return None
    return times.fmt(t, fraction=bool(t.microsecond))


def _parse(v: Any) -> dt.datetime | None:
    if v is None or v == "":
        return None
    if isinstance(v, dt.datetime):
        return _utc(v)
    return times.parse(str(v))


def _secs(td: dt.timedelta) -> float:
    return td.total_seconds()


# --------------------------------------------------------------------------- spec and status


@dataclasses.dataclass(frozen=True)
class Limits:
    """``spec.limits`` (unset fields None) or, resolved, ``status.effectiveLimits``."""

    bandwidth_mibps: int | None = None
    downtime_ms: int | None = None
    max_attempts: int | None = None

    def to_dict(self) -> dict[str, int]:
        out = {}
        if self.bandwidth_mibps is not None:
            out["bandwidthMiBps"] = self.bandwidth_mibps
        if self.downtime_ms is not None:
            out["downtimeMs"] = self.downtime_ms
        if self.max_attempts is not None:
            out["maxAttempts"] = self.max_attempts
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Limits:
        d = d or {}
        return cls(d.get("bandwidthMiBps"), d.get("downtimeMs"), d.get("maxAttempts"))


@dataclasses.dataclass(frozen=True)
class MigrationSpec:
    """``LiveMigration.spec``. ``mode`` is ``live`` or ``offline``."""

    droplet: str
    target_host: str | None = None
    scheduled_at: dt.datetime | None = None
    mode: str = "live"
    limits: Limits = Limits()
    cancel: bool = False

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MigrationSpec:
        return cls(
            droplet=d["droplet"],
            target_host=d.get("targetHost") or None,
            scheduled_at=_parse(d.get("scheduledAt")),
            mode=d.get("mode") or "live",
            limits=Limits.from_dict(d.get("limits")),
            cancel=bool(d.get("cancel", False)),
        )


@dataclasses.dataclass(frozen=True)
class AttemptRecord:
    """One entry of ``status.attempts``. ``result``: Succeeded | Failed | Cancelled (None
    while running)."""

    number: int
    start_time: dt.datetime
    end_time: dt.datetime | None = None
    result: str | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"number": self.number, "startTime": _fmt(self.start_time)}
        if self.end_time is not None:
            out["endTime"] = _fmt(self.end_time)
        if self.result is not None:
            out["result"] = self.result
        if self.reason is not None:
            out["reason"] = self.reason
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AttemptRecord:
        return cls(
            int(d["number"]),
            _parse(d.get("startTime")) or dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc),
            _parse(d.get("endTime")),
            d.get("result"),
            d.get("reason"),
        )


@dataclasses.dataclass(frozen=True)
class Condition:
    """A condition in the standard Kubernetes shape. ``status`` is "True"/"False"/"Unknown"."""

    type: str
    status: str
    reason: str = ""
    message: str = ""
    last_transition_time: dt.datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "status": self.status}
        if self.reason:
            out["reason"] = self.reason
        if self.message:
            out["message"] = self.message
        if self.last_transition_time is not None:
            out["lastTransitionTime"] = _fmt(self.last_transition_time)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Condition:
        return cls(
            d["type"],
            d.get("status", "Unknown"),
            d.get("reason") or "",
            d.get("message") or "",
            _parse(d.get("lastTransitionTime")),
        )


@dataclasses.dataclass(frozen=True)
class ProgressMark:
    """When the current attempt last made progress: ``fingerprint`` of (transfer state,
    round, bytesSent, target state) as last seen, and the time it last changed."""

    attempt: int
    fingerprint: str
    at: dt.datetime

    def to_dict(self) -> dict[str, Any]:
        return {"attempt": self.attempt, "fingerprint": self.fingerprint, "at": _fmt(self.at)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> ProgressMark | None:
        if not d or d.get("at") is None:
            return None
        return cls(int(d.get("attempt", 0)), str(d.get("fingerprint", "")), _parse(d["at"]))  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class MigrationStatus:
    """The operator-owned part of ``LiveMigration.status`` (not ``transfer``/``target``).

    ``phase`` None means the migration was never reconciled. ``placement`` is the dict of
    ``PlacementResult.to_status()``. ``to_dict``/``from_dict`` convert to and from the API
    shape (camelCase, RFC 3339 times); they round-trip exactly.
    """

    phase: str | None = None
    reason: str | None = None
    message: str | None = None
    failure_reason: str | None = None
    observed_generation: int | None = None
    source_host: str | None = None
    target_host: str | None = None
    attempt: int = 0
    attempts: tuple[AttemptRecord, ...] = ()
    next_attempt_at: dt.datetime | None = None
    announced_at: dt.datetime | None = None
    not_before: dt.datetime | None = None
    effective_mode: str | None = None
    effective_limits: Limits | None = None
    placement: Mapping[str, Any] | None = None
    phase_times: Mapping[str, dt.datetime] = dataclasses.field(default_factory=dict)
    progress: int | None = None
    downtime_ms: int | None = None
    progress_mark: ProgressMark | None = None
    conditions: tuple[Condition, ...] = ()

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)

    def to_dict(self) -> dict[str, Any]:
        """The API shape, without keys whose value is None (or an empty collection)."""
        out: dict[str, Any] = {
            "phase": self.phase,
            "reason": self.reason,
            "message": self.message,
            "failureReason": self.failure_reason,
            "observedGeneration": self.observed_generation,
            "sourceHost": self.source_host,
            "targetHost": self.target_host,
            "attempt": self.attempt or None,
            "attempts": [a.to_dict() for a in self.attempts] or None,
            "nextAttemptAt": _fmt(self.next_attempt_at),
            "announcedAt": _fmt(self.announced_at),
            "notBefore": _fmt(self.not_before),
            "effectiveMode": self.effective_mode,
            "effectiveLimits": self.effective_limits.to_dict() if self.effective_limits else None,
            "placement": dict(self.placement) if self.placement is not None else None,
            "phaseTimes": {k: _fmt(v) for k, v in self.phase_times.items()} or None,
            "progress": self.progress,
            "progressText": f"{self.progress}%" if self.progress is not None else None,
            "downtimeMs": self.downtime_ms,
            "downtimeText": f"{self.downtime_ms}ms" if self.downtime_ms is not None else None,
            "progressMark": self.progress_mark.to_dict() if self.progress_mark else None,
            "conditions": [c.to_dict() for c in self.conditions] or None,
        }
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> MigrationStatus:
        """Parse ``LiveMigration.status`` (agent-owned keys are ignored)."""
        d = d or {}
        return cls(
            phase=d.get("phase"),
            reason=d.get("reason"),
            message=d.get("message"),
            failure_reason=d.get("failureReason"),
            observed_generation=d.get("observedGeneration"),
            source_host=d.get("sourceHost"),
            target_host=d.get("targetHost"),
            attempt=int(d.get("attempt") or 0),
            attempts=tuple(AttemptRecord.from_dict(a) for a in d.get("attempts") or ()),
            next_attempt_at=_parse(d.get("nextAttemptAt")),
            announced_at=_parse(d.get("announcedAt")),
            not_before=_parse(d.get("notBefore")),
            effective_mode=d.get("effectiveMode"),
            effective_limits=Limits.from_dict(d["effectiveLimits"]) if d.get("effectiveLimits") is not None else None,
            placement=d.get("placement"),
            phase_times={k: _parse(v) for k, v in (d.get("phaseTimes") or {}).items() if v},  # type: ignore[misc]
            progress=d.get("progress"),
            downtime_ms=d.get("downtimeMs"),
            progress_mark=ProgressMark.from_dict(d.get("progressMark")),
            conditions=tuple(Condition.from_dict(c) for c in d.get("conditions") or ()),
        )


# --------------------------------------------------------------------------- agent reports


@dataclasses.dataclass(frozen=True)
class TransferReport:
    """``status.transfer`` as written by the source agent (the fields the machine reads).

    ``state``: Copying | Converging | Paused | Completed | Failed | Aborted.
    """

    attempt: int
    state: str
    round: int = 0
    bytes_sent: int = 0
    bytes_total: int = 0
    progress: int | None = None
    digest: str | None = None
    downtime_ms: int | None = None
    error: str | None = None
    updated_at: dt.datetime | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> TransferReport | None:
        if not d or d.get("attempt") is None or not d.get("state"):
            return None
        return cls(
            attempt=int(d["attempt"]),
            state=str(d["state"]),
            round=int(d.get("round") or 0),
            bytes_sent=int(d.get("bytesSent") or 0),
            bytes_total=int(d.get("bytesTotal") or 0),
            progress=d.get("progress"),
            digest=d.get("digest") or None,
            downtime_ms=d.get("downtimeMs"),
            error=d.get("error") or None,
            updated_at=_parse(d.get("updatedAt")),
        )


@dataclasses.dataclass(frozen=True)
class TargetReport:
    """``status.target`` as written by the target agent.

    ``state``: Preparing | Listening | Received | Running | Failed | Cleaned.
    """

    attempt: int
    state: str
    address: str | None = None
    digest: str | None = None
    error: str | None = None
    updated_at: dt.datetime | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> TargetReport | None:
        if not d or d.get("attempt") is None or not d.get("state"):
            return None
        return cls(
            attempt=int(d["attempt"]),
            state=str(d["state"]),
            address=d.get("address") or None,
            digest=d.get("digest") or None,
            error=d.get("error") or None,
            updated_at=_parse(d.get("updatedAt")),
        )


# --------------------------------------------------------------------------- observation


@dataclasses.dataclass(frozen=True)
class DropletObs:
    """What the operator sees of the migration's droplet.

    ``host`` is ``status.host`` (the placement record); ``host_ready`` the readiness of that
    host. ``image_gib`` is what a migration copies (disk GiB + memory GiB, after
    FERRY_SIZE_SCALE) and sizes the completion budget. ``maintenance_since`` is the time of
    ``ferry.dev/maintenance-event-since`` while ``ferry.dev/maintenance-event`` is
    ``live_migrate``, else None.
    """

    exists: bool = True
    deleting: bool = False
    host: str | None = None
    host_ready: bool = False
    power_state: str = "on"
    nested_virtualization: bool = False
    image_gib: float = 0.0
    maintenance_since: dt.datetime | None = None

    @classmethod
    def missing(cls) -> DropletObs:
        return cls(exists=False)

    @classmethod
    def from_droplet(
        cls, body: Mapping[str, Any] | None, *, host_ready: bool, size_scale: float = 1.0
    ) -> DropletObs:
        """Build from a Droplet object as the API returns it (None: the droplet is gone)."""
        if body is None:
            return cls.missing()
        meta = body.get("metadata") or {}
        spec = body.get("spec") or {}
        status = body.get("status") or {}
        ann = meta.get("annotations") or {}
        since = None
        if ann.get(MAINTENANCE_ANNOTATION) == MAINTENANCE_EVENT:
            since = _parse(ann.get(MAINTENANCE_SINCE_ANNOTATION)) or dt.datetime(
                1970, 1, 1, tzinfo=dt.timezone.utc
            )
        try:
            image_gib = resources_for(spec.get("size"), spec.get("resources")).image_gib * size_scale
        except ValueError:
            image_gib = 0.0
        return cls(
            exists=True,
            deleting=bool(meta.get("deletionTimestamp")),
            host=status.get("host") or None,
            host_ready=host_ready,
            power_state=spec.get("powerState") or "on",
            nested_virtualization=bool((spec.get("features") or {}).get("nestedVirtualization")),
            image_gib=image_gib,
            maintenance_since=since,
        )


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
class Observation:
    """Everything ``decide`` looks at for one LiveMigration.

    ``name`` is the LiveMigration's name (the transfer Secret is ``<name>-transfer``);
    ``deleting`` is its deletionTimestamp being set; ``generation`` its metadata.generation.
    ``transfer``/``target`` are the agents' reports as found (any attempt: the machine ignores
    other attempts). ``target_host_ready`` is the readiness of ``status.targetHost`` (None if
    unknown or unset). ``admission`` is required while Pending and in Announced once the
    notice is over (see :func:`needs_admission`): this migration's verdict from
    :func:`admit`. ``placement`` is required while Scheduling past any backoff (see
    :func:`needs_placement`): the result of ``place()`` for the droplet with ``source_host``
    = its host, ``target_host`` = ``spec.targetHost``, ``inbound_limit`` =
    FERRY_MAX_INBOUND_PER_HOST, and the reservations of the OTHER migrations in
    :data:`RESERVING_PHASES`.
    """

    name: str
    spec: MigrationSpec
    created_at: dt.datetime
    status: MigrationStatus = MigrationStatus()
    droplet: DropletObs = DropletObs(exists=False)
    deleting: bool = False
    generation: int | None = None
    transfer: TransferReport | None = None
    target: TargetReport | None = None
    target_host_ready: bool | None = None
    admission: Admission | None = None
    placement: PlacementResult | None = None
    secret_exists: bool = False

    @property
    def record_at_target(self) -> bool:
        """The droplet's placement record names ``status.targetHost``."""
        t = self.status.target_host
        return bool(t) and self.droplet.exists and self.droplet.host == t


# --------------------------------------------------------------------------- actions


@dataclasses.dataclass(frozen=True)
class Announce:
    """Set ``ferry.dev/maintenance-event: live_migrate``, ``-since: since`` and
    ``-not-before: not_before`` on the droplet (overwrite if present)."""

    droplet: str
    since: dt.datetime
    not_before: dt.datetime


@dataclasses.dataclass(frozen=True)
class ClearAnnouncement:
    """Remove the three maintenance annotations from the droplet (no-op if absent)."""

    droplet: str


@dataclasses.dataclass(frozen=True)
class SetLabels:
    """Label the LiveMigration ``ferry.dev/source-host``, ``ferry.dev/target-host``,
    ``ferry.dev/droplet`` (so each agent watches only its own work)."""

    droplet: str
    source_host: str
    target_host: str


@dataclasses.dataclass(frozen=True)
class CreateSecret:
    """Create the transfer Secret ``name`` (key ``key``: 32 random bytes), owned by the
    LiveMigration; an AlreadyExists answer is success."""

    name: str


@dataclasses.dataclass(frozen=True)
class DeleteSecret:
    """Delete the transfer Secret ``name`` (NotFound is success)."""

    name: str


@dataclasses.dataclass(frozen=True)
class FlipRecord:
    """THE commit point: in ONE patch guarded by the droplet's resourceVersion, set the
    droplet's ``status.host`` and label ``ferry.dev/host`` to ``to_host``, only if the
    record (read fresh) still names ``from_host``. If it already names ``to_host`` that is
    success; if it names anything else, fail the action."""

    droplet: str
    from_host: str
    to_host: str


@dataclasses.dataclass(frozen=True)
class EmitEvent:
    """Post a Kubernetes Event (``type`` Normal | Warning) on the migration or the droplet."""

    type: str
    reason: str
    message: str
    on: str = "migration"  # "migration" | "droplet"


@dataclasses.dataclass(frozen=True)
class MarkDropletCondition:
    """Set a condition on the droplet's status (``OfflineMigrationNeeded``,
    ``NestedVirtualizationRestartNeeded``); keep lastTransitionTime if status is unchanged."""

    droplet: str
    type: str
    status: bool
    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class RecordLastMigration:
    """Set the droplet's ``status.lastMigration`` {name, completedAt, fromHost, toHost}."""

    droplet: str
    migration: str
    completed_at: dt.datetime
    from_host: str
    to_host: str


@dataclasses.dataclass(frozen=True)
class RecomputeAllocations:
    """Recompute ``status.allocated``/``droplets`` of these hosts from the droplets' records."""

    hosts: tuple[str, ...]


Action = Union[
    Announce,
    ClearAnnouncement,
    SetLabels,
    CreateSecret,
    DeleteSecret,
    FlipRecord,
    EmitEvent,
    MarkDropletCondition,
    RecordLastMigration,
    RecomputeAllocations,
]


@dataclasses.dataclass(frozen=True)
class Decision:
    """What to do after one look.

    ``status``: JSON merge patch for ``.status`` (camelCase; a None value deletes the key);
    empty when nothing changed, so the shell can skip the write. ``new_status``: the full
    operator-owned status after the patch. ``actions``: apply in order, BEFORE the status
    patch; Events always come after the other actions. ``requeue_after``: seconds until the next look (0: at once; None: only on a
    change). ``done``: the migration is terminal (the shell may drop the finalizer).
    """

    status: dict[str, Any]
    new_status: MigrationStatus
    actions: tuple[Action, ...] = ()
    requeue_after: float | None = None
    done: bool = False

    @property
    def phase(self) -> str | None:
        return self.new_status.phase


# --------------------------------------------------------------------------- helpers for the shell


def needs_admission(
    obs: Observation, now: dt.datetime | None = None, cfg: MachineConfig | None = None
) -> bool:
    """True when ``decide`` may read ``obs.admission``: the migration is Pending (the
    ``DropletBusy`` gate), or Announced with its notice over (the concurrency slot).

    Without ``now`` every Announced migration counts (conservative: the shell may decide
    with a slightly later clock than it observed with). With ``now`` (and the ``cfg`` that
    ``decide`` gets) the answer is exact for ``decide(obs, now, cfg)``.
    """
    phase = obs.status.phase
    if phase == PENDING:
        return True
    if phase != ANNOUNCED:
        return False
    if now is None:
        return True
    return _notice_over(obs, _utc(now), cfg or MachineConfig())


def needs_placement(obs: Observation, now: dt.datetime) -> bool:
    """True when ``decide`` will read ``obs.placement``: Scheduling and past any backoff."""
    st = obs.status
    if st.phase != SCHEDULING:
        return False
    return st.next_attempt_at is None or _utc(now) >= st.next_attempt_at


def reserved_target(status: MigrationStatus) -> str | None:
    """The host on which this migration holds a reservation, if any."""
    if status.phase in RESERVING_PHASES and status.target_host:
        return status.target_host
    return None


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns ``old`` into ``new``: changed keys with
    their new value, removed keys with None, nested objects diffed recursively, lists whole."""
    out: dict[str, Any] = {}
    for key in old.keys() | new.keys():
        if key not in new:
            out[key] = None
        elif key not in old:
            out[key] = new[key]
        else:
            a, b = old[key], new[key]
            if isinstance(a, Mapping) and isinstance(b, Mapping):
                sub = merge_patch(a, b)
                if sub:
                    out[key] = sub
            elif a != b:
                out[key] = b
    return out


# --------------------------------------------------------------------------- admission


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
       same droplet is in :data:`OWNING_PHASES` or is an older Pending one; otherwise
       admitted, whatever the concurrency limits say: announcing takes no slot.
    2. Slot (phase Announced, queued: ``now`` is None, or ``not_before`` is set and
       ``now >= not_before``): ``ConcurrencyLimitReached`` when moving it to Scheduling
       would exceed the cluster-wide limit, its source host's outbound limit or (when its
       target is already known) its target's inbound limit, counting the migrations in
       :data:`IN_FLIGHT_PHASES` plus the older queued ones admitted in this call. A younger
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
        return m.phase == ANNOUNCED and (now is None or (m.not_before is not None and _utc(now) >= m.not_before))

    active = sorted((m for m in items if m.phase in IN_FLIGHT_PHASES), key=order)
    announced = sorted((m for m in items if m.phase == ANNOUNCED), key=order)
    pending = sorted((m for m in items if m.phase in (None, PENDING)), key=order)
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


# --------------------------------------------------------------------------- the machine


class _Builder:
    """Accumulates one decision: the new status, the actions, the requeue delay."""

    def __init__(self, obs: Observation, now: dt.datetime, cfg: MachineConfig):
        self.obs = obs
        self.now = now
        self.cfg = cfg
        self.st = obs.status
        self.actions: list[Action] = []
        self.requeue: float | None = None
        self.done = False

    # -- status edits
    def set(self, **changes: Any) -> None:
        self.st = dataclasses.replace(self.st, **changes)

    def condition(self, type_: str, status: bool, reason: str, message: str = "") -> None:
        value = "True" if status else "False"
        conds = list(self.st.conditions)
        for i, c in enumerate(conds):
            if c.type == type_:
                ltt = c.last_transition_time if c.status == value else self.now
                conds[i] = Condition(type_, value, reason, message, ltt)
                break
        else:
            conds.append(Condition(type_, value, reason, message, self.now))
        self.set(conditions=tuple(conds))

    def event(self, type_: str, reason: str, message: str, on: str = "migration") -> None:
        self.actions.append(EmitEvent(type_, reason, message, on))

    def transition(self, phase: str, reason: str, message: str, event_type: str = "Normal") -> None:
        times_ = dict(self.st.phase_times)
        times_[phase] = self.now
        self.set(phase=phase, reason=reason, message=message, phase_times=times_)
        self.event(event_type, reason, message)
        self.requeue = 0.0

    def wait(self, reason: str, message: str, delay: float | None, *, warn: bool = False) -> None:
        """Stay in the phase; a Warning Event only when the reason changes (``warn``)."""
        if warn and self.st.reason != reason:
            self.event("Warning", reason, message)
        self.set(reason=reason, message=message)
        poll = self.cfg.poll_seconds
        self.requeue = poll if delay is None else max(0.0, min(delay, poll))

    def build(self) -> Decision:
        patch = merge_patch(self.obs.status.to_dict(), self.st.to_dict())
        # Events last: if a real side effect fails, the retry does not post them twice.
        effects = [a for a in self.actions if not isinstance(a, EmitEvent)]
        events = [a for a in self.actions if isinstance(a, EmitEvent)]
        return Decision(patch, self.st, tuple(effects + events), None if self.done else self.requeue, self.done)


def decide(obs: Observation, now: dt.datetime, cfg: MachineConfig | None = None) -> Decision:
    """Decide the next step of one LiveMigration. Pure and deterministic.

    Raises ``ValueError`` on a naive ``now``, an unknown phase, or a missing ``admission``
    / ``placement`` when it is needed (:func:`needs_admission`, :func:`needs_placement`).
    """
    cfg = cfg or MachineConfig()
    now = _utc(now)
    st = obs.status
    if st.phase is not None and st.phase not in PHASES:
        raise ValueError(f"unknown phase {st.phase!r}")
    if st.phase in TERMINAL_PHASES:
        return Decision({}, st, (), None, True)

    b = _Builder(obs, now, cfg)
    _refresh(b)
    if st.phase is None:
        b.transition(PENDING, "Accepted", f"migration of droplet {obs.spec.droplet} accepted")
        return b.build()

    if _flipped(obs):
        _after_flip(b)
        return b.build()
    if st.phase in (PRECOPY, CUTOVER) and not obs.droplet.exists:
        # The record may have moved (a lost status write after FlipRecord leaves PreCopy)
        # and can no longer be seen: never call that a cancel.
        _fail(b, "DropletNotFound", f"droplet {obs.spec.droplet} not found (it disappeared during {st.phase})", droplet_event=False)
        return b.build()

    if obs.spec.cancel or obs.deleting:
        _cancel(b)
        return b.build()
    problem = _droplet_problem(obs)
    if problem is not None:
        reason, message = problem
        _fail(b, reason, message, droplet_event=obs.droplet.exists)
        return b.build()
    if st.phase in _ATTEMPT_PHASES and (not st.target_host or st.attempt < 1 or not _current_attempt(st)):
        _fail(b, "InconsistentStatus", f"phase {st.phase} without a target host or attempt record")
        return b.build()

    {
        PENDING: _pending,
        ANNOUNCED: _announced,
        SCHEDULING: _scheduling,
        PREPARING: _preparing,
        PRECOPY: _precopy,
        CUTOVER: _cutover_before_flip,
    }[st.phase](b)
    return b.build()


# -- every look


def _refresh(b: _Builder) -> None:
    obs, cfg = b.obs, b.cfg
    lim = obs.spec.limits
    eff = Limits(
        lim.bandwidth_mibps,
        lim.downtime_ms if lim.downtime_ms is not None else cfg.downtime_budget_ms,
        lim.max_attempts if lim.max_attempts is not None else cfg.max_attempts,
    )
    changes: dict[str, Any] = {"effective_limits": eff}
    if obs.generation is not None:
        changes["observed_generation"] = obs.generation
    if b.st.phase not in _ATTEMPT_PHASES:  # frozen once an attempt runs
        changes["effective_mode"] = _effective_mode(obs)
    b.set(**changes)


def _effective_mode(obs: Observation) -> str:
    if obs.spec.mode == "offline" or (obs.droplet.exists and obs.droplet.power_state == "off"):
        return "offline"
    return "live"


def _flipped(obs: Observation) -> bool:
    return obs.status.phase in (PRECOPY, CUTOVER) and obs.record_at_target


def _droplet_problem(obs: Observation) -> tuple[str, str] | None:
    d, name = obs.droplet, obs.spec.droplet
    if not d.exists:
        return "DropletNotFound", f"droplet {name} not found"
    if d.deleting:
        return "DropletDeleted", f"droplet {name} is being deleted"
    if not d.host:
        return "DropletNotPlaced", f"droplet {name} has no host (status.host is empty)"
    if not d.host_ready:
        return (
            "HostNotReady",
            f"source host {d.host} is not ready: the host running droplet {name} is gone, so live "
            "migration is impossible; the droplet has to be recovered or rebuilt elsewhere",
        )
    src = obs.status.source_host
    if src and d.host != src:
        return "SourceChanged", f"droplet {name} moved from {src} to {d.host} outside this migration"
    return None


def _current_attempt(st: MigrationStatus) -> AttemptRecord | None:
    return next((a for a in reversed(st.attempts) if a.number == st.attempt), None)


def _reports(obs: Observation) -> tuple[TransferReport | None, TargetReport | None]:
    n = obs.status.attempt
    tr = obs.transfer if obs.transfer is not None and obs.transfer.attempt == n else None
    tg = obs.target if obs.target is not None and obs.target.attempt == n else None
    return tr, tg


def _close_attempt(b: _Builder, result: str, reason: str) -> None:
    st = b.st
    if not st.attempts:
        return
    last = st.attempts[-1]
    if last.end_time is not None:
        return
    closed = dataclasses.replace(last, end_time=b.now, result=result, reason=reason)
    b.set(attempts=st.attempts[:-1] + (closed,))


def _cleanup(b: _Builder) -> None:
    """Side effects of every terminal transition: the announcement and the Secret."""
    obs = b.obs
    if obs.status.announced_at is not None and obs.droplet.exists and obs.droplet.maintenance_since is not None:
        b.actions.append(ClearAnnouncement(obs.spec.droplet))
    if obs.secret_exists:
        b.actions.append(DeleteSecret(transfer_secret_name(obs.name)))
    if b.st.condition("Announced") is not None:
        b.condition("Announced", False, "Cleared", "maintenance event withdrawn")
    b.set(progress_mark=None, next_attempt_at=None)
    b.done = True


# -- terminal transitions


def _cancel(b: _Builder) -> None:
    obs = b.obs
    why = "spec.cancel was set" if obs.spec.cancel else "the LiveMigration is being deleted"
    where = f" on {obs.droplet.host}" if obs.droplet.exists and obs.droplet.host else ""
    message = f"cancelled before the placement record moved ({why}); droplet {obs.spec.droplet} keeps running{where}"
    _close_attempt(b, "Cancelled", "Cancelled")
    b.transition(CANCELLED, "Cancelled", message)
    b.condition("Succeeded", False, "Cancelled", message)
    _cleanup(b)
    if obs.droplet.exists:
        b.event("Normal", "LiveMigrationCancelled", f"live migration {obs.name} cancelled; the droplet stays{where}", "droplet")


def _fail(
    b: _Builder, reason: str, message: str, *, droplet_event: bool = True, offline_needed: bool = False
) -> None:
    obs = b.obs
    _close_attempt(b, "Failed", reason)
    b.transition(FAILED, reason, message, "Warning")
    b.set(failure_reason=message)
    b.condition("Failed", True, reason, message)
    b.condition("Succeeded", False, reason, message)
    _cleanup(b)
    if offline_needed:
        b.actions.append(
            MarkDropletCondition(obs.spec.droplet, "OfflineMigrationNeeded", True, "LiveMigrationFailed", message)
        )
    if droplet_event and obs.droplet.exists:
        b.event(
            "Warning",
            "OfflineMigrationNeeded" if offline_needed else "LiveMigrationFailed",
            f"live migration {obs.name} failed: {message}",
            "droplet",
        )


def _complete(b: _Builder, tr: TransferReport | None) -> None:
    obs, st = b.obs, b.st
    src, dst = st.source_host or "?", st.target_host or "?"
    started = st.phase_times.get(PREPARING)
    took = f" in {_secs(b.now - started):.0f} s" if started else ""
    downtime = tr.downtime_ms if tr is not None and tr.downtime_ms is not None else st.downtime_ms
    dt_txt = f", downtime {downtime} ms" if downtime is not None else ""
    message = f"droplet {obs.spec.droplet} moved from {src} to {dst}{took}{dt_txt}"
    _close_attempt(b, "Succeeded", "Completed")
    b.transition(COMPLETED, "Completed", message)
    b.set(progress=100, downtime_ms=downtime)
    b.condition("Succeeded", True, "Completed", message)
    _cleanup(b)
    d = obs.spec.droplet
    b.actions += [
        RecordLastMigration(d, obs.name, b.now, src, dst),
        RecomputeAllocations(tuple(h for h in (src, dst) if h != "?")),
        MarkDropletCondition(d, "OfflineMigrationNeeded", False, "LiveMigrated", message),
    ]
    b.event("Normal", "LiveMigrated", message, "droplet")
    if obs.droplet.nested_virtualization:
        nested = (
            f"droplet {d} was live-migrated to {dst}: restart any nested virtual machines running inside it"
        )
        b.actions.append(MarkDropletCondition(d, "NestedVirtualizationRestartNeeded", True, "LiveMigrated", nested))
        b.event("Warning", "NestedVirtualizationRestartNeeded", nested, "droplet")


# -- attempts


def _attempt_failed(b: _Builder, reason: str, detail: str) -> None:
    st, cfg = b.st, b.cfg
    n = st.attempt
    max_attempts = (st.effective_limits.max_attempts if st.effective_limits else None) or cfg.max_attempts
    _close_attempt(b, "Failed", reason)
    if n >= max_attempts:
        src = st.source_host or b.obs.droplet.host
        message = (
            f"live migration failed after {n} attempt{'s' if n != 1 else ''} (last: {reason}: {detail}); "
            f"droplet {b.obs.spec.droplet} keeps running on {src}; an offline migration is needed"
        )
        _fail(b, "AttemptsExhausted", message, offline_needed=True)
        return
    delay = cfg.retry_backoff_seconds * 2 ** (n - 1)
    at = b.now + dt.timedelta(seconds=delay)
    message = f"attempt {n}/{max_attempts} failed ({reason}: {detail}); next attempt at {_fmt(at)}"
    b.transition(SCHEDULING, "RetryBackoff", message, "Warning")
    b.set(target_host=None, next_attempt_at=at, progress_mark=None)
    b.requeue = delay


def _failure_reported(b: _Builder, tr: TransferReport | None, tg: TargetReport | None) -> bool:
    """A Failed/Aborted report for this attempt, or the target host NotReady: fail the
    attempt and return True."""
    st = b.st
    if tg is not None and tg.state == "Failed":
        _attempt_failed(b, "TargetFailed", f"target host {st.target_host} failed: {tg.error or 'no reason given'}")
        return True
    if tr is not None and tr.state in ("Failed", "Aborted"):
        _attempt_failed(
            b, "TransferFailed", f"source host {st.source_host} {tr.state.lower()}: {tr.error or 'no reason given'}"
        )
        return True
    if b.obs.target_host_ready is False:
        _attempt_failed(b, "TargetHostNotReady", f"target host {st.target_host} is not ready")
        return True
    return False


def _fingerprint(tr: TransferReport | None, tg: TargetReport | None) -> str:
    """What counts as progress: any change of these."""
    return f"{tr.state if tr else '-'}/{tr.round if tr else 0}/{tr.bytes_sent if tr else 0}|{tg.state if tg else '-'}"


def _deadline_passed(b: _Builder, tr: TransferReport | None, tg: TargetReport | None) -> bool:
    """Progress and completion budget. Updates ``status.progressMark``; on a passed deadline
    fails the attempt and returns True, else sets ``b.requeue`` to the nearest deadline."""
    obs, st, cfg, now = b.obs, b.st, b.cfg, b.now
    fp = _fingerprint(tr, tg)
    mark = st.progress_mark
    if mark is None or mark.attempt != st.attempt or mark.fingerprint != fp:
        mark = ProgressMark(st.attempt, fp, now)
        b.set(progress_mark=mark)
    idle = _secs(now - mark.at)
    if idle >= cfg.progress_timeout_seconds:
        _attempt_failed(b, "NoProgress", f"no progress for {idle:.0f} s (limit {cfg.progress_timeout_seconds:.0f} s)")
        return True
    attempt = _current_attempt(st)
    budget = cfg.budget_base_seconds + cfg.budget_seconds_per_gib * obs.droplet.image_gib
    used = _secs(now - attempt.start_time) if attempt else 0.0
    if used >= budget:
        _attempt_failed(
            b,
            "BudgetExceeded",
            f"attempt ran {used:.0f} s, over its completion budget of {budget:.0f} s "
            f"({obs.droplet.image_gib:.2f} GiB)",
        )
        return True
    b.requeue = min(cfg.progress_timeout_seconds - idle, budget - used)
    return False


# -- phases before the flip


def _pending(b: _Builder) -> None:
    obs, cfg, now = b.obs, b.cfg, b.now
    if obs.admission is None:
        raise ValueError("decide needs obs.admission while Pending (see needs_admission)")
    if not obs.admission.admitted:  # DropletBusy: announcing takes no concurrency slot
        b.wait(
            obs.admission.reason or "DropletBusy",
            obs.admission.message or "waiting for another migration of the droplet",
            None,
        )
        return
    since = obs.droplet.maintenance_since
    if since is None:
        since = now
    nb = _not_before(obs.spec, since, cfg)
    if obs.droplet.maintenance_since is None:
        b.actions.append(Announce(obs.spec.droplet, since, nb))
    message = f"droplet {obs.spec.droplet} told via its maintenance event; data moves not before {_fmt(nb)}"
    b.set(announced_at=since, not_before=nb, source_host=obs.droplet.host)
    b.transition(ANNOUNCED, "Announced", message)
    b.condition("Announced", True, "MaintenanceEventPublished", message)
    b.event("Normal", "LiveMigrationScheduled", f"live migration announced; data moves not before {_fmt(nb)}", "droplet")


def _not_before(spec: MigrationSpec, announced_at: dt.datetime, cfg: MachineConfig) -> dt.datetime:
    nb = announced_at + dt.timedelta(seconds=cfg.notice_seconds)
    if spec.scheduled_at is not None and spec.scheduled_at > nb:
        nb = spec.scheduled_at
    return nb


def _told_since(obs: Observation, st: MigrationStatus) -> dt.datetime | None:
    """Since when the droplet has been told, as far as can be seen: the later of
    ``status.announcedAt`` and the annotation's own time (None if either is missing)."""
    if st.announced_at is None or obs.droplet.maintenance_since is None:
        return None
    return max(st.announced_at, obs.droplet.maintenance_since)


def _notice_over(obs: Observation, now: dt.datetime, cfg: MachineConfig) -> bool:
    """``_announced`` gets past the notice (and so reads ``obs.admission``) exactly when
    this is True; :func:`needs_admission` uses it too, so the two never disagree."""
    since = _told_since(obs, obs.status)
    return since is not None and now >= _not_before(obs.spec, since, cfg)


def _announced(b: _Builder) -> None:
    obs, cfg, now, st = b.obs, b.cfg, b.now, b.st
    if obs.droplet.maintenance_since is None or st.announced_at is None:
        # The annotation vanished (or was never confirmed): tell the droplet again and
        # restart the notice, so it is visible for the whole notice before data moves.
        nb = _not_before(obs.spec, now, cfg)
        b.actions.append(Announce(obs.spec.droplet, now, nb))
        b.set(announced_at=now, not_before=nb)
        b.wait("Reannounced", f"maintenance event published again; data moves not before {_fmt(nb)}", _secs(nb - now), warn=True)
        return
    since = _told_since(obs, st)
    assert since is not None
    if since != st.announced_at:  # re-announced, but that status write was lost
        b.set(announced_at=since)
    nb = _not_before(obs.spec, since, cfg)
    if nb != st.not_before:  # spec.scheduledAt changed
        b.actions.append(Announce(obs.spec.droplet, since, nb))
        b.set(not_before=nb)
    if now < nb:
        waiting_for = (
            "WaitingForSchedule"
            if obs.spec.scheduled_at is not None and obs.spec.scheduled_at >= nb
            else "WaitingForNotice"
        )
        b.wait(waiting_for, f"data moves not before {_fmt(nb)}", _secs(nb - now))
        return
    # Here _notice_over(obs, now, cfg) holds, so needs_admission(obs, now, cfg) said True.
    adm = obs.admission
    if adm is None:
        raise ValueError("decide needs obs.admission in Announced once the notice is over (see needs_admission)")
    if not adm.admitted:  # queued: told, notice over, waiting for a concurrency slot
        reason = adm.reason or "ConcurrencyLimitReached"
        what = "a concurrency slot" if reason == "ConcurrencyLimitReached" else "its droplet"
        b.wait(reason, f"notice over at {_fmt(nb)}; waiting for {what}: {adm.message or 'none free'}", None)
        return
    b.transition(SCHEDULING, "Scheduling", "notice period over and a concurrency slot taken; choosing a target host")


def _scheduling(b: _Builder) -> None:
    obs, cfg, now, st = b.obs, b.cfg, b.now, b.st
    if st.target_host is not None:  # no reservation while no attempt runs
        b.set(target_host=None)
    if st.next_attempt_at is not None and now < st.next_attempt_at:
        b.wait("RetryBackoff", st.message or f"next attempt at {_fmt(st.next_attempt_at)}", _secs(st.next_attempt_at - now))
        return
    since = _told_since(obs, st)
    earliest = _not_before(obs.spec, since, cfg) if since is not None else None
    if earliest is None or now < earliest or (st.not_before is not None and now < st.not_before):
        # Never move data unannounced or early (invariant 4): back to Announced.
        if earliest is None:
            nb = _not_before(obs.spec, now, cfg)
            b.actions.append(Announce(obs.spec.droplet, now, nb))
            b.set(announced_at=now, not_before=nb)
            b.transition(ANNOUNCED, "Reannounced", f"maintenance event published again; data moves not before {_fmt(nb)}", "Warning")
        else:  # e.g. spec.scheduledAt moved later
            nb = max(earliest, st.not_before) if st.not_before is not None else earliest
            if nb != st.not_before:
                b.actions.append(Announce(obs.spec.droplet, since, nb))  # type: ignore[arg-type]
            b.set(not_before=nb, announced_at=since)
            b.transition(ANNOUNCED, "WaitingForSchedule", f"data moves not before {_fmt(nb)}")
        return
    max_attempts = st.effective_limits.max_attempts if st.effective_limits else cfg.max_attempts
    if max_attempts is not None and st.attempt >= max_attempts:  # e.g. spec.limits lowered meanwhile
        last = st.attempts[-1].reason if st.attempts else None
        _fail(
            b,
            "AttemptsExhausted",
            f"live migration failed after {st.attempt} attempts (last: {last}); droplet {obs.spec.droplet} "
            f"keeps running on {obs.droplet.host}; an offline migration is needed",
            offline_needed=True,
        )
        return
    p = obs.placement
    if p is None:
        raise ValueError("decide needs obs.placement while Scheduling (see needs_placement)")
    placement = p.to_status()
    if p.chosen is not None:
        n = st.attempt + 1
        src = obs.droplet.host
        assert src is not None  # _droplet_problem ran
        score = next((c.score for c in p.candidates if c.host == p.chosen), None)
        score_txt = f", score {score:.2f}" if score is not None else ""
        message = (
            f"attempt {n}/{max_attempts}: moving droplet {obs.spec.droplet} from {src} to {p.chosen}"
            f"{score_txt}, {_effective_mode(obs)} mode"
        )
        b.set(
            target_host=p.chosen,
            source_host=src,
            attempt=n,
            attempts=st.attempts + (AttemptRecord(n, now),),
            next_attempt_at=None,
            placement=placement,
            progress=0,
            downtime_ms=None,
            effective_mode=_effective_mode(obs),
            progress_mark=ProgressMark(n, _fingerprint(None, None), now),
        )
        b.actions.append(SetLabels(obs.spec.droplet, src, p.chosen))
        if not obs.secret_exists:
            b.actions.append(CreateSecret(transfer_secret_name(obs.name)))
        b.transition(PREPARING, "TargetChosen", message)
        return
    b.set(placement=placement)
    if obs.spec.target_host:
        if p.target_rejected_by == "inbound":
            b.wait("TargetHostBusy", p.message, None)
            return
        _fail(b, "TargetHostRejected", p.message)
        return
    if p.rejected.get("inbound"):
        b.wait("TargetsBusy", f"hosts that fit are at their inbound migration limit; {p.message}", None)
        return
    since = st.phase_times.get(SCHEDULING, now)
    if st.next_attempt_at is not None and st.next_attempt_at > since:
        since = st.next_attempt_at
    waited = _secs(now - since)
    if waited >= cfg.no_host_timeout_seconds:
        _fail(b, "NoHostAvailable", f"{p.message} (waited {waited:.0f} s)")
        return
    b.wait("NoHostAvailable", p.message, cfg.no_host_timeout_seconds - waited, warn=True)


def _preparing(b: _Builder) -> None:
    tr, tg = _reports(b.obs)
    if _failure_reported(b, tr, tg):
        return
    if tg is not None and tg.state in ("Listening", "Received") and tg.address:
        b.transition(
            PRECOPY,
            "PreCopyStarted",
            f"target {b.st.target_host} listening on {tg.address}; copying disk and memory from {b.st.source_host}",
        )
        b.set(progress_mark=ProgressMark(b.st.attempt, _fingerprint(tr, tg), b.now))
        return
    if _deadline_passed(b, tr, tg):
        return
    b.wait("WaitingForTarget", f"waiting for target host {b.st.target_host} to prepare the incoming VM", b.requeue)


def _precopy(b: _Builder) -> None:
    tr, tg = _reports(b.obs)
    if _failure_reported(b, tr, tg):
        return
    if tr is not None and tr.progress is not None:
        b.set(progress=max(0, min(100, int(tr.progress))))
    if _ready_to_flip(b, tr, tg):
        b.transition(
            CUTOVER,
            "CutOver",
            f"copy verified (digest {tr.digest}); moving droplet {b.obs.spec.droplet} record "  # type: ignore[union-attr]
            f"from {b.st.source_host} to {b.st.target_host}",
        )
        return
    if b.st.phase != PRECOPY:  # _ready_to_flip failed the attempt
        return
    if _deadline_passed(b, tr, tg):
        return
    state = tr.state if tr is not None else "WaitingForSource"
    b.wait(state, _copy_message(tr, tg), b.requeue)


def _ready_to_flip(b: _Builder, tr: TransferReport | None, tg: TargetReport | None) -> bool:
    """Both sides done for this attempt with equal digests: emit FlipRecord, return True.
    Unequal digests fail the attempt (phase changes); otherwise False."""
    if tr is None or tg is None or tr.state != "Completed" or tg.state != "Received":
        return False
    if not tr.digest or tr.digest != tg.digest:
        _attempt_failed(b, "DigestMismatch", f"source digest {tr.digest or '(none)'} != target digest {tg.digest or '(none)'}")
        return False
    st = b.st
    b.actions.append(FlipRecord(b.obs.spec.droplet, st.source_host, st.target_host))  # type: ignore[arg-type]
    if tr.downtime_ms is not None:
        b.set(downtime_ms=tr.downtime_ms)
    return True


def _copy_message(tr: TransferReport | None, tg: TargetReport | None) -> str:
    if tr is None:
        return "waiting for the source host to start copying"
    pct = f", {tr.progress}%" if tr.progress is not None else ""
    return f"{tr.state.lower()}: round {tr.round}, {tr.bytes_sent} bytes sent{pct}; target {tg.state if tg else 'unknown'}"


def _cutover_before_flip(b: _Builder) -> None:
    tr, tg = _reports(b.obs)
    if _failure_reported(b, tr, tg):
        return
    if _ready_to_flip(b, tr, tg):
        # The flip was decided but is not visible yet: ask again (FlipRecord is guarded).
        b.wait("FlippingRecord", f"moving droplet {b.obs.spec.droplet} record to {b.st.target_host}", None)
        return
    if b.st.phase != CUTOVER:  # digests differ now: the attempt failed
        return
    # Reports no longer show a finished copy (e.g. an agent restarted): no flip without it.
    if _deadline_passed(b, tr, tg):
        return
    b.wait("WaitingForCopy", "the finished copy is not reported any more; waiting before moving the record", b.requeue)


# -- after the flip


def _after_flip(b: _Builder) -> None:
    obs, st = b.obs, b.st
    if st.phase == PRECOPY:
        # The record moved but the status write was lost: catch up, never flip again.
        b.transition(CUTOVER, "CutOver", f"droplet {obs.spec.droplet} record names {st.target_host}")
        return
    if (obs.spec.cancel or obs.deleting) and b.st.condition("CancelIgnored") is None:
        msg = f"cancel ignored: droplet {obs.spec.droplet} record already moved to {st.target_host}; finishing the migration"
        b.event("Warning", "CancelTooLate", msg)
        b.condition("CancelIgnored", True, "CancelTooLate", msg)
    if obs.droplet.deleting:
        _fail(b, "DropletDeleted", f"droplet {obs.spec.droplet} is being deleted; it was not resumed on {st.target_host}")
        return
    tr, tg = _reports(obs)
    if tg is not None and (tg.state == "Running" or (tg.state == "Received" and obs.droplet.power_state == "off")):
        _complete(b, tr)
        return
    if tg is not None and tg.state == "Failed":
        b.wait(
            "TargetResumeFailed",
            f"record names {st.target_host} but its VM failed to resume: {tg.error or 'no reason given'}",
            None,
            warn=True,
        )
        return
    b.wait("WaitingForResume", f"waiting for target host {st.target_host} to resume the droplet", None)
