"""The LiveMigration state machine. PURE: no kopf, no pykube, no I/O, no clock.

``decide(obs, now, cfg)`` looks at one migration's :class:`Observation` and answers with a
:class:`Decision`: the status to merge, the side effects (``ferry.migration.actions``), when
to look again and whether the migration is finished. The shell applies the actions IN
ORDER, then writes ``Decision.status`` as one merge patch; if an action fails it writes
nothing and the next look decides again. One phase transition per decision; each records
``phaseTimes[phase]`` and emits an Event. The rules, phase by phase, are in
docs/architecture.md ("The migration protocol"); each step function below says its part.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from ferry.api.conditions import set_condition
from ferry.api.constants import VERIFICATION_FAILED, transfer_secret_name
from ferry.api.livemigration import AttemptRecord, Limits, MigrationSpec, MigrationStatus, ProgressMark, Verification
from ferry.api.patch import merge_patch
from ferry.api.phases import ATTEMPT, TERMINAL, TRANSFER_FINAL, Phase, TargetState, TransferState
from ferry.api.reports import TargetReport, TransferReport, peer_lost
from ferry.api.times import fmt_api, utc
from ferry.migration.actions import (
    Action,
    Announce,
    ClearAnnouncement,
    CreateSecret,
    DeleteSecret,
    EmitEvent,
    FlipRecord,
    MarkDropletCondition,
    RecomputeAllocations,
    RecordLastMigration,
    ReturnRecord,
    SetLabels,
)
from ferry.migration.observation import MachineConfig, Observation

_PHASES = frozenset(Phase)


def _secs(td: dt.timedelta) -> float:
    return td.total_seconds()


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
    if phase == Phase.PENDING:
        return True
    if phase != Phase.ANNOUNCED:
        return False
    if now is None:
        return True
    return _notice_over(obs, utc(now), cfg or MachineConfig())


def needs_placement(obs: Observation, now: dt.datetime) -> bool:
    """True when ``decide`` will read ``obs.placement``: Scheduling and past any backoff."""
    st = obs.status
    if st.phase != Phase.SCHEDULING:
        return False
    return st.next_attempt_at is None or utc(now) >= st.next_attempt_at


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
        self.set(conditions=set_condition(self.st.conditions, type_, status, reason, message, self.now))

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
    now = utc(now)
    st = obs.status
    if st.phase is not None and st.phase not in _PHASES:
        raise ValueError(f"unknown phase {st.phase!r}")
    if st.phase in TERMINAL:
        return Decision({}, st, (), None, True)

    b = _Builder(obs, now, cfg)
    _refresh(b)
    if st.phase is None:
        b.transition(Phase.PENDING, "Accepted", f"migration of droplet {obs.spec.droplet} accepted")
        return b.build()

    if _flipped(obs):
        _after_flip(b)
        return b.build()
    if st.phase in (Phase.PRECOPY, Phase.CUTOVER) and not obs.droplet.exists:
        # The record may have moved (a lost status write after FlipRecord leaves PreCopy)
        # and can no longer be seen: never call that a cancel.
        _fail(b, "DropletNotFound", f"droplet {obs.spec.droplet} not found (it disappeared during {st.phase})", droplet_event=False)
        return b.build()

    if obs.spec.cancel or obs.deleting:
        _cancel(b)
        return b.build()
    if _source_host_silent(b):
        return b.build()
    problem = _droplet_problem(obs)
    if problem is not None:
        reason, message = problem
        _fail(b, reason, message, droplet_event=obs.droplet.exists)
        return b.build()
    if st.phase in ATTEMPT and (not st.target_host or st.attempt < 1 or not _current_attempt(st)):
        _fail(b, "InconsistentStatus", f"phase {st.phase} without a target host or attempt record")
        return b.build()

    {
        Phase.PENDING: _pending,
        Phase.ANNOUNCED: _announced,
        Phase.SCHEDULING: _scheduling,
        Phase.PREPARING: _preparing,
        Phase.PRECOPY: _precopy,
        Phase.CUTOVER: _cutover_before_flip,
    }[st.phase](b)
    return b.build()


# -- every look


def _refresh(b: _Builder) -> None:
    obs, cfg = b.obs, b.cfg
    lim = obs.spec.limits
    budget = lim.downtime_ms if lim.downtime_ms is not None else cfg.downtime_budget_ms
    eff = Limits(
        lim.bandwidth_mibps,
        budget,
        lim.max_attempts if lim.max_attempts is not None else cfg.max_attempts,
        max(budget, lim.max_downtime_ms or 0),  # the ceiling of the downtime steps; the budget: no steps
    )
    changes: dict[str, Any] = {"effective_limits": eff}
    if obs.generation is not None:
        changes["observed_generation"] = obs.generation
    if b.st.phase not in ATTEMPT:  # frozen once an attempt runs
        changes["effective_mode"] = _effective_mode(obs)
    b.set(**changes)


def _effective_mode(obs: Observation) -> str:
    if obs.spec.mode == "offline" or (obs.droplet.exists and obs.droplet.power_state == "off"):
        return "offline"
    return "live"


def _flipped(obs: Observation) -> bool:
    return obs.status.phase in (Phase.PRECOPY, Phase.CUTOVER) and obs.record_at_target


def _source_host_silent(b: _Builder) -> bool:
    """The droplet's host looks NotReady but has been silent for less than
    ``host_lost_seconds``: wait (a Warning Event once) rather than fail for good. After an API
    server outage every heartbeat is stale at once; the agents catch up within a beat."""
    d, cfg = b.obs.droplet, b.cfg
    if not d.exists or d.deleting or not d.host or d.host_ready or d.host_silent_seconds is None:
        return False
    left = cfg.host_lost_seconds - d.host_silent_seconds
    if left <= 0:
        return False
    b.wait("SourceHostNotReady", f"source host {d.host} sends no heartbeat; it is called lost (HostNotReady) "
                                 f"after {cfg.host_lost_seconds:.0f} s of silence", left, warn=True)
    return True


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
    ours = obs.status.announced_at is not None or obs.droplet_owned_by_other is False
    if ours and obs.droplet.exists and obs.droplet.maintenance_since is not None:
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
    b.transition(Phase.CANCELLED, "Cancelled", message)
    b.condition("Succeeded", False, "Cancelled", message)
    _cleanup(b)
    if obs.droplet.exists:
        b.event("Normal", "LiveMigrationCancelled", f"live migration {obs.name} cancelled; the droplet stays{where}", "droplet")


def _fail(
    b: _Builder, reason: str, message: str, *, droplet_event: bool = True, offline_needed: bool = False
) -> None:
    obs = b.obs
    _close_attempt(b, "Failed", reason)
    b.transition(Phase.FAILED, reason, message, "Warning")
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


def network_cut_over(tg: TargetReport | None, attempt: int, host: str) -> dict[str, Any] | None:
    """The target's account of this attempt's network cut-over, as status.networkCutOver."""
    net = tg.network if tg is not None else None
    if not net or net.get("attempt") != attempt or not net.get("address"):
        return None
    out = {"address": net.get("address"), "host": host, "fabric": net.get("fabric"), "movedAt": net.get("movedAt"),
           "ms": net.get("ms")}
    return {k: v for k, v in out.items() if v is not None}


def guest_pause_ms(tr: TransferReport | None, tg: TargetReport | None, attempt: int,
                   downtime_ms: int | None) -> int | None:
    """The guest's whole pause: the source paused it for the final copy (its clock) -> the target
    resumed it (its clock). None when either side did not say, or when the two hosts' clocks
    make it shorter than the downtime it contains (they disagree)."""
    if tr is None or tg is None or tr.attempt != attempt or tg.attempt != attempt:
        return None
    if tr.paused_at is None or tg.resumed_at is None:
        return None
    ms = round((tg.resumed_at - tr.paused_at).total_seconds() * 1000)
    return ms if ms >= (downtime_ms or 0) else None


def _complete(b: _Builder, tr: TransferReport | None, tg: TargetReport | None = None) -> None:
    obs, st = b.obs, b.st
    src, dst = st.source_host or "?", st.target_host or "?"
    started = st.phase_times.get(Phase.PREPARING)
    took = f" in {_secs(b.now - started):.0f} s" if started else ""
    downtime = tr.downtime_ms if tr is not None and tr.downtime_ms is not None else st.downtime_ms
    pause = guest_pause_ms(tr, tg, st.attempt, downtime)
    dt_txt = f", downtime {downtime} ms" if downtime is not None else ""
    if pause is not None:
        dt_txt += f" (the guest was paused {pause} ms in all, until it ran on {dst})"
    ver = st.verification
    checked = "; verified after the resume (frozen point)" if ver is not None and ver.method == "frozen-point" else ""
    net = network_cut_over(tg, st.attempt, dst)
    net_txt = f", address {net['address']} on {dst} since {net.get('movedAt', '?')}" if net else ""
    message = f"droplet {obs.spec.droplet} moved from {src} to {dst}{took}{dt_txt}{net_txt}{checked}"
    _close_attempt(b, "Succeeded", "Completed")
    b.transition(Phase.COMPLETED, "Completed", message)
    b.set(progress=100, downtime_ms=downtime, network_cut_over=net, guest_pause_ms=pause)
    if net:
        b.event("Normal", "NetworkCutOver",
                f"address {net['address']} of droplet {obs.spec.droplet} moved to {dst} at {net.get('movedAt', '?')} "
                f"({net.get('fabric', '?')} fabric, {net.get('ms', '?')} ms)")
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
    b.set(verification=None)  # a verification belongs to the attempt that moved the record
    message = f"attempt {n}/{max_attempts} failed ({reason}: {detail}); next attempt at {fmt_api(at)}"
    b.transition(Phase.SCHEDULING, "RetryBackoff", message, "Warning")
    b.set(target_host=None, next_attempt_at=at, progress_mark=None)
    b.requeue = delay


#: How long one side's "my peer went away" waits for the other side's own account before the
#: attempt is closed: the side that saw the connection drop did not fail itself.
WITNESS_SECONDS = 5.0


def _failure_reported(b: _Builder, tr: TransferReport | None, tg: TargetReport | None) -> bool:
    """A Failed/Aborted report for this attempt, or the target host NotReady: fail the
    attempt, naming the side that failed, and return True.

    A side whose error says only that its peer closed or broke the connection
    (``ferry.api.reports.peer_lost``) is a witness, not the culprit: the attempt names the
    other side when it reports its own failure (``SourceFailed``/``TargetFailed``), waits up
    to WITNESS_SECONDS for that account, and otherwise says ``ConnectionLost`` (the link, or a
    side that went silent)."""
    st = b.st
    if tr is not None and tr.state == TransferState.FAILED and (tr.error or "").startswith("NotConverging"):
        # Another attempt would meet the same guest at the same rate: no retry. The user can
        # raise limits.maxDowntimeMs, lower the guest's load, or force-complete.
        _fail(b, "NotConverging",
              f"source host {st.source_host}: {tr.error}; dirty rate {_mib(tr.dirty_rate_bps)} MiB/s, "
              f"link {_mib(tr.bandwidth_bps)} MiB/s, throttle {tr.max_throttle_percent or 0}%, "
              f"{tr.downtime_steps or 0} downtime steps; the droplet keeps running on {st.source_host} "
              f"(raise spec.limits.maxDowntimeMs, or set spec.forceComplete to pause it and finish)",
              offline_needed=True)
        return True
    src_failed = tr is not None and tr.failed
    tgt_failed = tg is not None and tg.state == TargetState.FAILED
    source_word = f"source host {st.source_host} {tr.state.lower()}: {tr.error or 'no reason given'}" if src_failed else ""  # type: ignore[union-attr]
    target_word = f"target host {st.target_host} failed: {tg.error or 'no reason given'}" if tgt_failed else ""  # type: ignore[union-attr]
    if src_failed or tgt_failed:
        src_witness = src_failed and peer_lost(tr.error)  # type: ignore[union-attr]
        tgt_witness = tgt_failed and peer_lost(tg.error)  # type: ignore[union-attr]
        if src_failed and not src_witness:
            _attempt_failed(b, "SourceFailed", source_word + (f" (target host saw: {tg.error})" if tgt_failed else ""))  # type: ignore[union-attr]
        elif tgt_failed and not tgt_witness:
            _attempt_failed(b, "TargetFailed", target_word + (f" (source host saw: {tr.error})" if src_failed else ""))  # type: ignore[union-attr]
        elif src_failed and tgt_failed:
            _attempt_failed(b, "ConnectionLost", f"both sides lost the connection: {source_word}; {target_word}")
        else:
            return _await_witness(b, tr, tg, source_word or target_word)
        return True
    if b.obs.target_host_ready is False:
        _attempt_failed(b, "TargetHostNotReady", f"target host {st.target_host} is not ready")
        return True
    return False


def _await_witness(b: _Builder, tr: TransferReport | None, tg: TargetReport | None, seen: str) -> bool:
    """One side saw its peer go: give the other side WITNESS_SECONDS (from when the operator
    first saw this) to say why, then close the attempt as ConnectionLost."""
    st, now = b.st, b.now
    fp = _fingerprint(tr, tg)
    mark = st.progress_mark
    if mark is None or mark.attempt != st.attempt or mark.fingerprint != fp:
        mark = ProgressMark(st.attempt, fp, now)
        b.set(progress_mark=mark)
    waited = _secs(now - mark.at)
    if waited >= WITNESS_SECONDS:
        _attempt_failed(b, "ConnectionLost", f"{seen}; the other side reported no failure of its own within "
                                             f"{WITNESS_SECONDS:.0f} s")
        return True
    b.wait("PeerLost", f"{seen}; waiting up to {WITNESS_SECONDS:.0f} s for the other side's account "
                       "before naming the side that failed", WITNESS_SECONDS - waited)
    return True


def _mib(v: int | None) -> str:
    return f"{(v or 0) / 1048576:.1f}"


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
    message = f"droplet {obs.spec.droplet} told via its maintenance event; data moves not before {fmt_api(nb)}"
    b.set(announced_at=since, not_before=nb, source_host=obs.droplet.host)
    b.transition(Phase.ANNOUNCED, "Announced", message)
    b.condition("Announced", True, "MaintenanceEventPublished", message)
    b.event("Normal", "LiveMigrationScheduled", f"live migration announced; data moves not before {fmt_api(nb)}", "droplet")


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
        b.wait("Reannounced", f"maintenance event published again; data moves not before {fmt_api(nb)}", _secs(nb - now), warn=True)
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
        b.wait(waiting_for, f"data moves not before {fmt_api(nb)}", _secs(nb - now))
        return
    # Here _notice_over(obs, now, cfg) holds, so needs_admission(obs, now, cfg) said True.
    adm = obs.admission
    if adm is None:
        raise ValueError("decide needs obs.admission in Announced once the notice is over (see needs_admission)")
    if not adm.admitted:  # queued: told, notice over, waiting for a concurrency slot
        reason = adm.reason or "ConcurrencyLimitReached"
        what = "a concurrency slot" if reason == "ConcurrencyLimitReached" else "its droplet"
        b.wait(reason, f"notice over at {fmt_api(nb)}; waiting for {what}: {adm.message or 'none free'}", None)
        return
    b.transition(Phase.SCHEDULING, "Scheduling", "notice period over and a concurrency slot taken; choosing a target host")


def _scheduling(b: _Builder) -> None:
    obs, cfg, now, st = b.obs, b.cfg, b.now, b.st
    if st.target_host is not None:  # no reservation while no attempt runs
        b.set(target_host=None)
    if st.next_attempt_at is not None and now < st.next_attempt_at:
        b.wait("RetryBackoff", st.message or f"next attempt at {fmt_api(st.next_attempt_at)}", _secs(st.next_attempt_at - now))
        return
    since = _told_since(obs, st)
    earliest = _not_before(obs.spec, since, cfg) if since is not None else None
    if earliest is None or now < earliest or (st.not_before is not None and now < st.not_before):
        # Never move data unannounced or early (invariant 4): back to Announced.
        if earliest is None:
            nb = _not_before(obs.spec, now, cfg)
            b.actions.append(Announce(obs.spec.droplet, now, nb))
            b.set(announced_at=now, not_before=nb)
            b.transition(Phase.ANNOUNCED, "Reannounced", f"maintenance event published again; data moves not before {fmt_api(nb)}", "Warning")
        else:  # e.g. spec.scheduledAt moved later
            nb = max(earliest, st.not_before) if st.not_before is not None else earliest
            if nb != st.not_before:
                b.actions.append(Announce(obs.spec.droplet, since, nb))  # type: ignore[arg-type]
            b.set(not_before=nb, announced_at=since)
            b.transition(Phase.ANNOUNCED, "WaitingForSchedule", f"data moves not before {fmt_api(nb)}")
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
            attempts=st.attempts + (AttemptRecord(n, now, target_host=p.chosen),),
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
        b.transition(Phase.PREPARING, "TargetChosen", message)
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
    since = st.phase_times.get(Phase.SCHEDULING, now)
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
    if tg is not None and tg.state in (TargetState.LISTENING, TargetState.RECEIVED) and tg.address:
        b.transition(
            Phase.PRECOPY,
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
    _check_outlook(b, tr)
    if _ready_to_flip(b, tr, tg):
        what = ("target froze its copy at the switchover (checked against the paused source after the resume)"
                if tg is not None and tg.frozen_point else f"copy verified (digest {tr.digest})")  # type: ignore[union-attr]
        b.transition(
            Phase.CUTOVER,
            "CutOver",
            f"{what}; moving droplet {b.obs.spec.droplet} record from {b.st.source_host} to {b.st.target_host}",
        )
        return
    if b.st.phase != Phase.PRECOPY:  # _ready_to_flip failed the attempt
        return
    if _deadline_passed(b, tr, tg):
        return
    state = tr.state if tr is not None else "WaitingForSource"
    b.wait(state, _copy_message(tr, tg), b.requeue)


def _ready_to_flip(b: _Builder, tr: TransferReport | None, tg: TargetReport | None) -> bool:
    """Both sides done for this attempt and the copy checked as far as it is checked before the
    record moves: emit FlipRecord, return True. Unequal digests fail the attempt (phase
    changes); otherwise False.

    Two shapes (docs/architecture.md, "What verified means"): digests compared here, before the
    flip (sim: in-stream; qemu offline: both disks hashed), or the target froze its disk at the
    switchover (``tg.frozen_point``, qemu live): the record moves on the frozen point, the guest
    resumes on the target, and the digests are compared after that (``_verify_after_flip``); the
    source keeps its paused copy until the verdict."""
    if tr is None or tg is None or tr.state != TransferState.COMPLETED or tg.state != TargetState.RECEIVED:
        return False
    frozen = tg.frozen_point
    if (not frozen or (tr.digest and tg.digest)) and (not tr.digest or tr.digest != tg.digest):
        _attempt_failed(b, "DigestMismatch", f"source digest {tr.digest or '(none)'} != target digest {tg.digest or '(none)'}")
        return False
    st = b.st
    b.actions.append(FlipRecord(b.obs.spec.droplet, st.source_host, st.target_host))  # type: ignore[arg-type]
    if tr.downtime_ms is not None:
        _record_downtime(b, tr)
    if frozen:
        b.set(verification=_verification(b, tr, tg, "frozen-point", "Pending",
                                          "the target froze its disk at the switchover; the record moves on that "
                                          "point and the guest resumes, then both sides are hashed and compared"))
        b.condition("Verified", False, "VerificationPending", "the copy is checked after the guest resumes")
    else:
        method = "in-stream" if tr.verify_ms is None else "before-flip"
        b.set(verification=_verification(b, tr, tg, method, "Verified", f"digests equal ({tr.digest})", at=b.now))
        b.condition("Verified", True, "DigestsEqual", f"{method}: source and target digests equal ({tr.digest})")
    return True


def _verification(b: _Builder, tr: TransferReport | None, tg: TargetReport | None, method: str, state: str,
                  message: str, at: dt.datetime | None = None) -> Verification:
    return Verification(
        method=method, state=state,
        source_digest=tr.digest if tr else None, target_digest=tg.digest if tg else None,
        source_verify_ms=tr.verify_ms if tr else None, target_verify_ms=tg.verify_ms if tg else None,
        source_hashed_bytes=tr.hashed_bytes if tr else None, target_hashed_bytes=tg.hashed_bytes if tg else None,
        downtime_ms=b.st.downtime_ms, at=at, message=message)


def _record_downtime(b: _Builder, tr: TransferReport) -> None:
    """The measured downtime next to its budget; ``DowntimeBudgetExceeded`` and a Warning
    Event when it is over (a forced completion says so; downtime steps name the ceiling)."""
    st = b.st
    budget = (st.effective_limits.downtime_ms if st.effective_limits else None) or b.cfg.downtime_budget_ms
    downtime = int(tr.downtime_ms or 0)
    b.set(downtime_ms=downtime, downtime_budget_ms=budget)
    why = []
    if tr.forced:
        why.append("force-complete paused the guest whatever the budget")
    if tr.downtime_steps:
        why.append(f"{tr.downtime_steps} downtime steps raised the allowed downtime to {tr.allowed_downtime_ms} ms "
                   f"(ceiling {tr.max_downtime_ms} ms)")
    if tr.predicted_downtime_ms is not None:
        why.append(f"{tr.predicted_downtime_ms} ms were expected at the pause")
    detail = f"downtime {downtime} ms, budget {budget} ms" + (f" ({'; '.join(why)})" if why else "")
    if tr.forced and (st.condition("ForceCompleted") is None):
        b.condition("ForceCompleted", True, "ForceCompleted", detail)
        b.event("Normal", "ForceCompleted", f"force-completed: {detail}")
    if downtime > budget:
        over = st.condition("DowntimeBudgetExceeded")
        if over is None or over.status != "True":
            b.event("Warning", "DowntimeBudgetExceeded", detail)
        b.condition("DowntimeBudgetExceeded", True, "ForceCompleted" if tr.forced else "OverBudget", detail)
    else:
        b.condition("DowntimeBudgetExceeded", False, "WithinBudget", detail)


def _check_outlook(b: _Builder, tr: TransferReport | None) -> None:
    """During the copy: is the reported ETA still within the attempt's completion budget?
    ``CompletionAtRisk`` (and one Warning Event) when it is not, cleared when it is again."""
    if tr is None or tr.attempt != b.st.attempt or tr.eta_seconds is None or tr.state in TRANSFER_FINAL:
        return
    attempt = _current_attempt(b.st)
    if attempt is None:
        return
    budget = b.cfg.budget_base_seconds + b.cfg.budget_seconds_per_gib * b.obs.droplet.image_gib
    used = _secs(b.now - attempt.start_time)
    left = budget - used
    cond = b.st.condition("CompletionAtRisk")
    at_risk = tr.eta_seconds > left
    if at_risk:
        msg = (f"ETA {tr.eta_seconds:.0f} s but {max(0.0, left):.0f} s left of the attempt's {budget:.0f} s budget "
               f"(round {tr.round}, expected downtime {tr.expected_downtime_ms} ms, "
               f"allowed {tr.allowed_downtime_ms or tr.downtime_budget_ms} ms)")
        if cond is None or cond.status != "True":
            b.event("Warning", "CompletionAtRisk", msg)
            b.condition("CompletionAtRisk", True, "EtaOverBudget", msg)
    elif cond is not None and cond.status == "True":
        b.condition("CompletionAtRisk", False, "EtaWithinBudget", f"ETA {tr.eta_seconds:.0f} s, {left:.0f} s left")


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
    if b.st.phase != Phase.CUTOVER:  # digests differ now: the attempt failed
        return
    # Reports no longer show a finished copy (e.g. an agent restarted): no flip without it.
    if _deadline_passed(b, tr, tg):
        return
    b.wait("WaitingForCopy", "the finished copy is not reported any more; waiting before moving the record", b.requeue)


# -- after the flip


def _after_flip(b: _Builder) -> None:
    obs, st = b.obs, b.st
    if st.phase == Phase.PRECOPY:
        # The record moved but the status write was lost (e.g. a conflict with an agent's report,
        # likely when the source's digest lands at the flip): catch up, never flip again, and
        # record what that write held: the downtime and, for a frozen point, the pending check.
        tr, tg = _reports(obs)
        b.transition(Phase.CUTOVER, "CutOver", f"droplet {obs.spec.droplet} record names {st.target_host}")
        _recorded_at_flip(b, tr, tg)
        return
    if (obs.spec.cancel or obs.deleting) and b.st.condition("CancelIgnored") is None:
        msg = f"cancel ignored: droplet {obs.spec.droplet} record already moved to {st.target_host}; finishing the migration"
        b.event("Warning", "CancelTooLate", msg)
        b.condition("CancelIgnored", True, "CancelTooLate", msg)
    if obs.droplet.deleting:
        _fail(b, "DropletDeleted", f"droplet {obs.spec.droplet} is being deleted; it was not resumed on {st.target_host}")
        return
    tr, tg = _reports(obs)
    _recorded_at_flip(b, tr, tg)
    if tg is not None and (tg.state == TargetState.RUNNING or (tg.state == TargetState.RECEIVED and obs.droplet.power_state == "off")):
        if _verify_after_flip(b, tr, tg):
            _complete(b, tr, tg)
        return
    if tg is not None and tg.state == TargetState.FAILED:
        # The target says its copy never ran (it reports Failed only then): the source still
        # holds the paused guest with its memory, so the record goes back and the source resumes
        # (the attempt then fails as any before the flip). Never reboot a guest that has a copy.
        msg = (f"target host {st.target_host} failed before it ran the droplet ({tg.error or 'no reason given'}); "
               f"moving the record back to {st.source_host}, which resumes it")
        b.actions.append(ReturnRecord(obs.spec.droplet, st.target_host, st.source_host))  # type: ignore[arg-type]
        b.wait("RecordReturned", msg, None, warn=True)
        return
    b.wait("WaitingForResume", f"waiting for target host {st.target_host} to resume the droplet", None)


def _recorded_at_flip(b: _Builder, tr: TransferReport | None, tg: TargetReport | None) -> None:
    """What the flip's status write records, if that write was lost: the measured downtime
    and, for a frozen point, the pending verification."""
    if b.st.downtime_ms is None and tr is not None and tr.downtime_ms is not None:
        _record_downtime(b, tr)
    if b.st.verification is None and tg is not None and tg.frozen_point:
        b.set(verification=_verification(b, tr, tg, "frozen-point", "Pending",
                                          "the target froze its disk at the switchover; the record moved on that "
                                          "point, then both sides are hashed and compared"))
        b.condition("Verified", False, "VerificationPending", "the copy is checked after the guest resumes")


def _verify_after_flip(b: _Builder, tr: TransferReport | None, tg: TargetReport) -> bool:
    """The target runs. True when the copy is verified (or was before the flip); a frozen point
    waits here for both digests (reason ``Verifying``), then either verifies or fails the
    migration loudly (``VerificationFailed``, or ``VerificationIncomplete`` when a digest did not
    come within the attempt's completion budget): the guest runs on the target, and the source
    keeps its paused copy until the user decides (the agents' hold rule)."""
    ver = b.st.verification
    if not tg.frozen_point or (ver is not None and ver.state == "Verified"):
        return True
    obs, st = b.obs, b.st
    src, dst, d = st.source_host, st.target_host, obs.spec.droplet
    if tr is None or not tr.digest or not tg.digest:
        flipped = st.phase_times.get(Phase.CUTOVER) or b.now
        waited = _secs(b.now - flipped)
        allowed = b.cfg.budget_base_seconds + b.cfg.budget_seconds_per_gib * obs.droplet.image_gib
        missing = " and ".join(w for w, have in ((f"source {src}", tr is not None and tr.digest),
                                                   (f"target {dst}", tg.digest)) if not have)
        if waited >= allowed:
            msg = (f"the copy was not verified: no digest from {missing} within {allowed:.0f} s of the record moving. "
                   f"Droplet {d} runs on {dst}; its source copy is kept paused on {src}. {_recovery(b)}")
            b.set(verification=_verification(b, tr, tg, "frozen-point", "Incomplete", msg, at=b.now))
            b.condition("Verified", False, "VerificationIncomplete", msg)
            _fail(b, "VerificationIncomplete", msg)
            b.actions.append(MarkDropletCondition(d, "MigrationUnverified", True, "VerificationIncomplete", msg))
            return False
        msg = (f"droplet {d} runs on {dst}; checking its disk as received at the switchover against the paused "
               f"source on {src} (waiting for the digest of {missing})")
        b.set(verification=_verification(b, tr, tg, "frozen-point", "Pending", msg))
        b.wait("Verifying", msg, allowed - waited)
        return False
    if tr.digest == tg.digest:
        msg = (f"frozen point verified after the resume: digests equal ({tg.digest}); hashed source "
               f"{_mib(tr.hashed_bytes)} MiB in {tr.verify_ms} ms, target {_mib(tg.hashed_bytes)} MiB in "
               f"{tg.verify_ms} ms, none of it in the {st.downtime_ms} ms downtime")
        b.set(verification=_verification(b, tr, tg, "frozen-point", "Verified", msg, at=b.now))
        b.condition("Verified", True, "DigestsEqual", msg)
        return True
    msg = (f"the copies differ: the target's disk as received at the switchover (digest {tg.digest}, "
           f"on {dst}) is not the paused source's ({tr.digest}, on {src}). The record had already moved: "
           f"droplet {d} runs on {dst}; its source copy is kept paused on {src}, so nothing is lost. {_recovery(b)}")
    b.set(verification=_verification(b, tr, tg, "frozen-point", "Mismatch", msg, at=b.now))
    b.condition("Verified", False, "DigestMismatch", msg)
    _fail(b, VERIFICATION_FAILED, msg)
    b.actions.append(MarkDropletCondition(d, "MigrationUnverified", True, "DigestMismatch", msg))
    return False


def _recovery(b: _Builder) -> str:
    st, name, d = b.st, b.obs.name, b.obs.spec.droplet
    return (f"To keep the copy on {st.target_host}: delete LiveMigration {name} (the paused source copy is then "
            f"removed). To go back to the source copy as it was at the switchover (what the guest did on "
            f"{st.target_host} since is lost): see docs/architecture.md, \"A verification that fails\" "
            f"(droplet {d}).")
