"""The agents' reports inside ``LiveMigration.status``: ``transfer`` (source agent) and
``target`` (target agent). Parsed and built here only; ``NO_TRANSFER``/``NO_TARGET`` stand
for "nothing reported".

Agents write them as merge patches (``to_patch``: every field, None clearing a stale one).
Parsing is lenient (an agent of another version may write more or less): a field of the
wrong type reads as absent, and a report without an attempt or a state is no report (None).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections.abc import Mapping, Sequence
from typing import Any

from ferry.api.phases import TargetState, TransferState
from ferry.api.times import fmt, parse_any

#: ``status.transfer.rounds`` keeps at most this many rounds: the first (the bulk copy) and
#: the latest ones.
ROUNDS_REPORTED = 20


def bounded_rounds(rounds: Sequence[Any], limit: int = ROUNDS_REPORTED) -> list[Any]:
    """The first round and the last ``limit - 1``: the story's start and its end."""
    rounds = list(rounds)
    if len(rounds) <= limit:
        return rounds
    return rounds[:1] + rounds[len(rounds) - (limit - 1):]


def as_int(v: Any) -> int | None:
    """An integer field as found in a body: bools, strings and non-finite numbers are absent."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return int(v)


def as_float(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def as_str(v: Any) -> str | None:
    return v if isinstance(v, str) and v else None


def as_map(v: Any) -> Mapping[str, Any]:
    return v if isinstance(v, Mapping) else {}


def _enum(cls: type, v: Any) -> Any:
    try:
        return cls(v)
    except ValueError:
        return None


@dataclasses.dataclass(frozen=True)
class ImageProgress:
    """``disk`` / ``memory``: bytes of one image to send, sent, still dirty."""

    total: int = 0
    sent: int = 0
    remaining: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"total": self.total, "sent": self.sent, "remaining": self.remaining}

    @classmethod
    def from_dict(cls, d: Any) -> ImageProgress:
        m = as_map(d)
        return cls(as_int(m.get("total")) or 0, as_int(m.get("sent")) or 0, as_int(m.get("remaining")) or 0)


@dataclasses.dataclass(frozen=True)
class RoundReport:
    """One entry of ``status.transfer.rounds``: bytes sent, bytes the guest dirtied meanwhile
    (what remained at its end), its duration, its start (ms since the attempt's copy began),
    the guest's dirty rate during it, the throttle in force, and ``paused``: the final round,
    sent with the guest paused (the pause). Fields an older agent did not write are None."""

    round: int
    bytes: int
    dirty_bytes: int
    ms: int
    start_ms: int | None = None
    dirty_rate_bps: int | None = None
    throttle_percent: int | None = None
    paused: bool = False

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"round": self.round, "bytes": self.bytes, "dirtyBytes": self.dirty_bytes,
                               "ms": self.ms, "startMs": self.start_ms, "dirtyRateBps": self.dirty_rate_bps,
                               "throttlePercent": self.throttle_percent, "paused": self.paused or None}
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_dict(cls, d: Any) -> RoundReport:
        m = as_map(d)
        return cls(as_int(m.get("round")) or 0, as_int(m.get("bytes")) or 0, as_int(m.get("dirtyBytes")) or 0,
                   as_int(m.get("ms")) or 0, as_int(m.get("startMs")), as_int(m.get("dirtyRateBps")),
                   as_int(m.get("throttlePercent")), m.get("paused") is True)


@dataclasses.dataclass(frozen=True)
class TransferReport:
    """``status.transfer``: the source agent's account of attempt ``attempt``."""

    attempt: int
    state: TransferState | None  # None only in NO_TRANSFER
    round: int = 0
    disk: ImageProgress | None = None
    memory: ImageProgress | None = None
    bytes_total: int = 0
    bytes_sent: int = 0
    dirty_remaining: int | None = None
    dirty_rate_bps: int | None = None
    bandwidth_bps: int | None = None
    throttle_percent: int | None = None
    throttled_ms: int | None = None
    max_throttle_percent: int | None = None
    expected_downtime_ms: int | None = None
    eta_seconds: float | None = None
    progress: int | None = None
    rounds: tuple[RoundReport, ...] = ()
    downtime_ms: int | None = None
    downtime_budget_ms: int | None = None
    max_downtime_ms: int | None = None
    allowed_downtime_ms: int | None = None
    downtime_steps: int | None = None
    predicted_downtime_ms: int | None = None
    forced: bool = False
    verify_ms: int | None = None
    hashed_bytes: int | None = None
    digest: str | None = None
    error: str | None = None
    updated_at: dt.datetime | None = None
    channel: str | None = None  # what protects the data channel: aes-256-gcm | plain (sim)
    paused_at: dt.datetime | None = None  # the source paused the guest for the final copy (its clock)

    @property
    def failed(self) -> bool:
        return self.state in (TransferState.FAILED, TransferState.ABORTED)

    def to_patch(self) -> dict[str, Any]:
        """The merge patch an agent writes: every field, None clearing a stale one."""
        return {
            "attempt": self.attempt,
            "state": self.state,
            "round": self.round,
            "disk": self.disk.to_dict() if self.disk else None,
            "memory": self.memory.to_dict() if self.memory else None,
            "bytesTotal": self.bytes_total,
            "bytesSent": self.bytes_sent,
            "dirtyRemaining": self.dirty_remaining,
            "dirtyRateBps": self.dirty_rate_bps,
            "bandwidthBps": self.bandwidth_bps,
            "throttlePercent": self.throttle_percent,
            "throttledMs": self.throttled_ms,
            "maxThrottlePercent": self.max_throttle_percent,
            "expectedDowntimeMs": self.expected_downtime_ms,
            "etaSeconds": None if self.eta_seconds is None else round(float(self.eta_seconds), 3),
            "progress": self.progress,
            "rounds": [r.to_dict() for r in bounded_rounds(self.rounds)],
            "downtimeMs": self.downtime_ms,
            "downtimeBudgetMs": self.downtime_budget_ms,
            "maxDowntimeMs": self.max_downtime_ms,
            "allowedDowntimeMs": self.allowed_downtime_ms,
            "downtimeSteps": self.downtime_steps,
            "predictedDowntimeMs": self.predicted_downtime_ms,
            "forced": self.forced or None,
            "verifyMs": self.verify_ms,
            "hashedBytes": self.hashed_bytes,
            "digest": self.digest,
            "error": self.error,
            "updatedAt": fmt(self.updated_at, fraction=True),
            "channel": self.channel,
            "pausedAt": fmt(self.paused_at, fraction=True),
        }

    @classmethod
    def failure_patch(cls, attempt: int, error: str, now: dt.datetime) -> dict[str, Any]:
        """Attempt ``attempt`` failed on the source: the figures so far stay, the digest goes."""
        return {"attempt": attempt, "state": TransferState.FAILED, "error": error, "digest": None, "progress": 0,
                "updatedAt": fmt(now, fraction=True)}

    @classmethod
    def from_dict(cls, d: Any) -> TransferReport | None:
        m = as_map(d)
        attempt, state = as_int(m.get("attempt")), _enum(TransferState, m.get("state"))
        if attempt is None or state is None:
            return None
        rounds = m.get("rounds")
        return cls(
            attempt=attempt,
            state=state,
            round=as_int(m.get("round")) or 0,
            disk=ImageProgress.from_dict(m["disk"]) if isinstance(m.get("disk"), Mapping) else None,
            memory=ImageProgress.from_dict(m["memory"]) if isinstance(m.get("memory"), Mapping) else None,
            bytes_total=as_int(m.get("bytesTotal")) or 0,
            bytes_sent=as_int(m.get("bytesSent")) or 0,
            dirty_remaining=as_int(m.get("dirtyRemaining")),
            dirty_rate_bps=as_int(m.get("dirtyRateBps")),
            bandwidth_bps=as_int(m.get("bandwidthBps")),
            throttle_percent=as_int(m.get("throttlePercent")),
            throttled_ms=as_int(m.get("throttledMs")),
            max_throttle_percent=as_int(m.get("maxThrottlePercent")),
            expected_downtime_ms=as_int(m.get("expectedDowntimeMs")),
            eta_seconds=as_float(m.get("etaSeconds")),
            progress=as_int(m.get("progress")),
            rounds=tuple(RoundReport.from_dict(r) for r in rounds) if isinstance(rounds, list) else (),
            downtime_ms=as_int(m.get("downtimeMs")),
            downtime_budget_ms=as_int(m.get("downtimeBudgetMs")),
            max_downtime_ms=as_int(m.get("maxDowntimeMs")),
            allowed_downtime_ms=as_int(m.get("allowedDowntimeMs")),
            downtime_steps=as_int(m.get("downtimeSteps")),
            predicted_downtime_ms=as_int(m.get("predictedDowntimeMs")),
            forced=m.get("forced") is True,
            verify_ms=as_int(m.get("verifyMs")),
            hashed_bytes=as_int(m.get("hashedBytes")),
            digest=as_str(m.get("digest")),
            error=as_str(m.get("error")),
            channel=as_str(m.get("channel")),
            updated_at=parse_any(m.get("updatedAt")),
            paused_at=parse_any(m.get("pausedAt")),
        )


@dataclasses.dataclass(frozen=True)
class TargetReport:
    """``status.target``: the target agent's account of attempt ``attempt``."""

    attempt: int
    state: TargetState | None  # None only in NO_TARGET
    address: str | None = None
    digest: str | None = None
    error: str | None = None
    updated_at: dt.datetime | None = None
    #: qemu: the received disk was frozen at the switchover point; ``digest`` (of that point)
    #: follows after the guest resumed, with ``verify_ms`` and ``hashed_bytes``
    frozen_point: bool = False
    verify_ms: int | None = None
    hashed_bytes: int | None = None
    #: the network cut-over {attempt, address, fabric, movedAt, ms}: written by the target agent on
    #: its own (``ferry.agent.execute``), never by ``to_patch`` (a state report leaves it as it is)
    network: Mapping[str, Any] | None = None
    resumed_at: dt.datetime | None = None  # the target resumed the guest (its clock)

    def to_patch(self) -> dict[str, Any]:
        return {"attempt": self.attempt, "state": self.state, "address": self.address, "digest": self.digest,
                "error": self.error, "updatedAt": fmt(self.updated_at, fraction=True),
                "frozenPoint": self.frozen_point or None, "verifyMs": self.verify_ms, "hashedBytes": self.hashed_bytes,
                "resumedAt": fmt(self.resumed_at, fraction=True)}

    @classmethod
    def from_dict(cls, d: Any) -> TargetReport | None:
        m = as_map(d)
        attempt, state = as_int(m.get("attempt")), _enum(TargetState, m.get("state"))
        if attempt is None or state is None:
            return None
        return cls(attempt, state, as_str(m.get("address")), as_str(m.get("digest")), as_str(m.get("error")),
                   parse_any(m.get("updatedAt")), m.get("frozenPoint") is True, as_int(m.get("verifyMs")),
                   as_int(m.get("hashedBytes")), as_map(m.get("network")) or None, parse_any(m.get("resumedAt")))


#: How the agents' errors say "my peer went away": ``PeerLost:`` (a driver that knows, e.g. the
#: qemu mirror failing to write to the target's NBD export), the exception names the transfer
#: code puts first (``ConnectionClosed: ...``), and the kernel's and QEMU's own words. A side
#: whose error is only this saw the other side (or the link) fail; it did not fail itself.
PEER_LOST_MARKERS = ("PeerLost:", "ConnectionClosed", "ConnectionResetError", "BrokenPipeError",
                     "ConnectionAbortedError", "connection closed by peer", "Connection reset by peer", "Broken pipe",
                     "Unable to write to socket")


#: How an agent's error says that its OWN VM process went away. Such a side failed itself, whatever
#: words of the OS its error quotes: a dead QEMU resets its monitor socket, so the target's "target
#: QEMU exited or is unreachable: ...: connection lost ([Errno 104] Connection reset by peer)" is
#: the target failing, not a witness of its peer.
OWN_VM_LOST_MARKERS = ("QEMU exited", "VM process exited", "VM process died")


def peer_lost(error: str | None) -> bool:
    """Whether an agent's error says only that its peer closed or broke the connection."""
    if not error or any(m in error for m in OWN_VM_LOST_MARKERS):
        return False
    return any(m in error for m in PEER_LOST_MARKERS)


#: What a LiveMigration carries while an agent has reported nothing (attempt 0 matches no attempt).
NO_TRANSFER = TransferReport(0, None)
NO_TARGET = TargetReport(0, None)
