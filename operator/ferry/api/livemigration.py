"""``LiveMigration``: its spec, the operator-owned status, and the whole object as one view.

``MigrationStatus.to_dict``/``from_dict`` convert to and from the API shape (camelCase,
RFC 3339 times) and round-trip exactly; the operator writes the difference between two
of them as one merge patch (:func:`ferry.api.patch.merge_patch`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping
from typing import Any

from ferry.api.conditions import Condition, find, parse_conditions
from ferry.api.meta import InvalidSpec, Meta, Named
from ferry.api.phases import IN_FLIGHT, TERMINAL, Phase
from ferry.api.reports import NO_TARGET, NO_TRANSFER, TargetReport, TransferReport, as_int, as_map, as_str
from ferry.api.times import EPOCH, fmt_api, parse_any


def parse_phase(v: Any) -> Phase | None:
    """The CRD admits only known phases; anything else (an older or buggy writer) reads as none."""
    try:
        return Phase(v)
    except ValueError:
        return None


@dataclasses.dataclass(frozen=True)
class Limits:
    """``spec.limits`` (unset fields None) or, resolved, ``status.effectiveLimits``."""

    bandwidth_mibps: int | None = None
    downtime_ms: int | None = None
    max_attempts: int | None = None
    max_downtime_ms: int | None = None  # ceiling of the downtime steps (resolved: never below downtime_ms)

    def to_dict(self) -> dict[str, int]:
        out = {"bandwidthMiBps": self.bandwidth_mibps, "downtimeMs": self.downtime_ms,
               "maxAttempts": self.max_attempts, "maxDowntimeMs": self.max_downtime_ms}
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Limits:
        m = as_map(d)
        return cls(as_int(m.get("bandwidthMiBps")), as_int(m.get("downtimeMs")), as_int(m.get("maxAttempts")),
                   as_int(m.get("maxDowntimeMs")))


@dataclasses.dataclass(frozen=True)
class MigrationSpec:
    """``LiveMigration.spec``. ``mode`` is ``live`` or ``offline``."""

    droplet: str
    target_host: str | None = None
    scheduled_at: dt.datetime | None = None
    mode: str = "live"
    limits: Limits = Limits()
    cancel: bool = False
    force_complete: bool = False  # pause now and finish the copy, whatever the downtime budget

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> MigrationSpec:
        d = as_map(d)
        if not d.get("droplet") or not isinstance(d.get("droplet"), str):
            raise InvalidSpec("spec.droplet: required")
        try:
            scheduled = parse_any(d.get("scheduledAt"))
        except ValueError as exc:
            raise InvalidSpec(f"spec.scheduledAt: {exc}") from None
        return cls(
            droplet=d["droplet"],
            target_host=d.get("targetHost") or None,
            scheduled_at=scheduled,
            mode=d.get("mode") or "live",
            limits=Limits.from_dict(d.get("limits")),
            cancel=bool(d.get("cancel", False)),
            force_complete=d.get("forceComplete") is True,
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
    target_host: str | None = None  # where this attempt went (a retry avoids it when another host fits)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"number": self.number, "startTime": fmt_api(self.start_time),
                               "endTime": fmt_api(self.end_time), "result": self.result, "reason": self.reason,
                               "targetHost": self.target_host}
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_dict(cls, d: Any) -> AttemptRecord | None:
        m = as_map(d)
        number = as_int(m.get("number"))
        if number is None:
            return None
        return cls(number, parse_any(m.get("startTime")) or EPOCH, parse_any(m.get("endTime")),
                   as_str(m.get("result")), as_str(m.get("reason")), as_str(m.get("targetHost")))


@dataclasses.dataclass(frozen=True)
class ProgressMark:
    """When the current attempt last made progress: ``fingerprint`` of (transfer state,
    round, bytesSent, target state) as last seen, and the time it last changed."""

    attempt: int
    fingerprint: str
    at: dt.datetime

    def to_dict(self) -> dict[str, Any]:
        return {"attempt": self.attempt, "fingerprint": self.fingerprint, "at": fmt_api(self.at)}

    @classmethod
    def from_dict(cls, d: Any) -> ProgressMark | None:
        m = as_map(d)
        at = parse_any(m.get("at"))
        if at is None:
            return None
        return cls(as_int(m.get("attempt")) or 0, str(m.get("fingerprint", "")), at)


@dataclasses.dataclass(frozen=True)
class Verification:
    """``status.verification``: what was checked about the copy, how, when, at what cost.

    ``method``: ``in-stream`` (sim: every block checked against its hash as it arrived, then the
    image digests of disk and memory compared before the record moved), ``before-flip`` (qemu,
    offline: both disks hashed before the record moved; no guest was running), ``frozen-point``
    (qemu, live: the target froze its disk at the switchover, the record moved and the guest
    resumed, then the frozen point and the paused source were hashed and compared: outside the
    downtime). ``state``: ``Pending`` (frozen point: the guest runs, the digests are not both
    in), ``Verified`` (equal), ``Mismatch`` (different: the migration failed loudly, the source
    keeps its paused copy), ``Incomplete`` (a digest never came within the time allowed; the
    source keeps its copy). Digests, milliseconds hashing and bytes read per side; the downtime
    the guest saw; ``at``: when the verdict was reached."""

    method: str
    state: str
    source_digest: str | None = None
    target_digest: str | None = None
    source_verify_ms: int | None = None
    target_verify_ms: int | None = None
    source_hashed_bytes: int | None = None
    target_hashed_bytes: int | None = None
    downtime_ms: int | None = None
    at: dt.datetime | None = None
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"method": self.method, "state": self.state, "sourceDigest": self.source_digest,
               "targetDigest": self.target_digest, "sourceVerifyMs": self.source_verify_ms,
               "targetVerifyMs": self.target_verify_ms, "sourceHashedBytes": self.source_hashed_bytes,
               "targetHashedBytes": self.target_hashed_bytes, "downtimeMs": self.downtime_ms,
               "at": fmt_api(self.at), "message": self.message}
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_dict(cls, d: Any) -> Verification | None:
        m = as_map(d)
        method, state = as_str(m.get("method")), as_str(m.get("state"))
        if method is None or state is None:
            return None
        return cls(method, state, as_str(m.get("sourceDigest")), as_str(m.get("targetDigest")),
                   as_int(m.get("sourceVerifyMs")), as_int(m.get("targetVerifyMs")),
                   as_int(m.get("sourceHashedBytes")), as_int(m.get("targetHashedBytes")),
                   as_int(m.get("downtimeMs")), parse_any(m.get("at")), as_str(m.get("message")))


@dataclasses.dataclass(frozen=True)
class MigrationStatus:
    """The operator-owned part of ``LiveMigration.status`` (not ``transfer``/``target``).

    ``phase`` None means the migration was never reconciled. ``placement`` is the dict of
    ``PlacementResult.to_status()``.
    """

    phase: Phase | None = None
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
    downtime_budget_ms: int | None = None  # the budget downtime_ms is measured against
    progress_mark: ProgressMark | None = None
    conditions: tuple[Condition, ...] = ()
    verification: Verification | None = None
    #: the completed attempt's network cut-over {address, host, fabric, movedAt, ms}
    network_cut_over: Mapping[str, Any] | None = None
    #: the guest's whole pause: the source paused it for the final copy -> the target resumed it
    #: (downtime_ms is the copy's part of it; the rest is the record flip); None when not known
    guest_pause_ms: int | None = None

    def condition(self, type_: str) -> Condition | None:
        return find(self.conditions, type_)

    @property
    def reserved_target(self) -> str | None:
        """The host on which this migration holds a capacity reservation, if any."""
        return self.target_host if self.phase in IN_FLIGHT and self.target_host else None

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
            "nextAttemptAt": fmt_api(self.next_attempt_at),
            "announcedAt": fmt_api(self.announced_at),
            "notBefore": fmt_api(self.not_before),
            "effectiveMode": self.effective_mode,
            "effectiveLimits": self.effective_limits.to_dict() if self.effective_limits else None,
            "placement": dict(self.placement) if self.placement is not None else None,
            "phaseTimes": {k: fmt_api(v) for k, v in self.phase_times.items()} or None,
            "progress": self.progress,
            "progressText": f"{self.progress}%" if self.progress is not None else None,
            "downtimeMs": self.downtime_ms,
            "downtimeText": downtime_text(self.downtime_ms, self.guest_pause_ms),
            "guestPauseMs": self.guest_pause_ms,
            "downtimeBudgetMs": self.downtime_budget_ms,
            "progressMark": self.progress_mark.to_dict() if self.progress_mark else None,
            "conditions": [c.to_dict() for c in self.conditions] or None,
            "verification": self.verification.to_dict() if self.verification else None,
            "networkCutOver": dict(self.network_cut_over) if self.network_cut_over else None,
        }
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> MigrationStatus:
        """Parse ``LiveMigration.status`` (the agents' keys are parsed by ``ferry.api.reports``).
        Lenient: a field of the wrong type (an older or buggy writer) reads as absent."""
        d = as_map(d)
        limits = d.get("effectiveLimits")
        attempts = d.get("attempts")
        placement = d.get("placement")
        return cls(
            phase=parse_phase(d.get("phase")),
            reason=as_str(d.get("reason")),
            message=as_str(d.get("message")),
            failure_reason=as_str(d.get("failureReason")),
            observed_generation=as_int(d.get("observedGeneration")),
            source_host=as_str(d.get("sourceHost")),
            target_host=as_str(d.get("targetHost")),
            attempt=as_int(d.get("attempt")) or 0,
            attempts=tuple(a for x in attempts if (a := AttemptRecord.from_dict(x)))
            if isinstance(attempts, list) else (),
            next_attempt_at=parse_any(d.get("nextAttemptAt")),
            announced_at=parse_any(d.get("announcedAt")),
            not_before=parse_any(d.get("notBefore")),
            effective_mode=as_str(d.get("effectiveMode")),
            effective_limits=Limits.from_dict(limits) if isinstance(limits, Mapping) else None,
            placement=placement if isinstance(placement, Mapping) else None,
            phase_times={k: t for k, v in as_map(d.get("phaseTimes")).items() if (t := parse_any(v))},
            progress=as_int(d.get("progress")),
            downtime_ms=as_int(d.get("downtimeMs")),
            downtime_budget_ms=as_int(d.get("downtimeBudgetMs")),
            progress_mark=ProgressMark.from_dict(d.get("progressMark")),
            conditions=parse_conditions(d.get("conditions") if isinstance(d.get("conditions"), list) else None),
            verification=Verification.from_dict(d.get("verification")),
            network_cut_over=as_map(d.get("networkCutOver")) or None,
            guest_pause_ms=as_int(d.get("guestPauseMs")),
        )


def downtime_text(downtime_ms: int | None, guest_pause_ms: int | None) -> str | None:
    """The Downtime printer column: "87ms", or "87ms (paused 140ms)" once the guest's whole pause
    is known."""
    if downtime_ms is None:
        return None
    return f"{downtime_ms}ms" + (f" (paused {guest_pause_ms}ms)" if guest_pause_ms is not None else "")


@dataclasses.dataclass(frozen=True)
class LiveMigration(Named):
    """A whole LiveMigration, parsed once at the boundary.

    ``transfer``/``target`` are the agents' reports as found (any attempt; ``NO_TRANSFER`` /
    ``NO_TARGET``, attempt 0, when nothing was reported).
    """

    meta: Meta
    spec: MigrationSpec
    status: MigrationStatus
    transfer: TransferReport = NO_TRANSFER
    target: TargetReport = NO_TARGET

    @property
    def droplet(self) -> str:
        return self.spec.droplet

    @property
    def phase(self) -> Phase | None:
        return self.status.phase

    @property
    def in_flight(self) -> bool:
        return self.status.phase in IN_FLIGHT

    @property
    def terminal(self) -> bool:
        return self.status.phase in TERMINAL

    @classmethod
    def from_body(cls, body: Mapping[str, Any], *, lenient: bool = False) -> LiveMigration:
        """Raises InvalidSpec on an unusable spec; ``lenient`` (for display) reads it as far
        as it goes instead."""
        status = as_map(body.get("status"))
        try:
            spec = MigrationSpec.from_dict(body.get("spec"))
        except InvalidSpec:
            if not lenient:
                raise
            raw = as_map(body.get("spec"))
            spec = MigrationSpec(droplet=as_str(raw.get("droplet")) or "", target_host=as_str(raw.get("targetHost")),
                                 limits=Limits.from_dict(raw.get("limits")), cancel=raw.get("cancel") is True)
        return cls(
            meta=Meta.from_body(body),
            spec=spec,
            status=MigrationStatus.from_dict(status),
            transfer=TransferReport.from_dict(status.get("transfer")) or NO_TRANSFER,
            target=TargetReport.from_dict(status.get("target")) or NO_TARGET,
        )
