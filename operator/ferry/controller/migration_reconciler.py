"""LiveMigration reconciler: a thin shell around the pure state machine.

Every watch event and the sweep (a look within a second of the last) call ``reconcile``: build an ``Observation`` from
the world (no API reads), ``decide``, apply the decision's actions in order, then write the
status as one merge patch guarded by the migration's resourceVersion (a decision made on a
stale view is dropped and made again on a fresh read), and only then post its Events.
Deletion is held by a finalizer until the machine has reached a terminal phase.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time

import kopf

from ferry import failpoints
from ferry.api import constants as c
from ferry.api.livemigration import LiveMigration, MigrationStatus
from ferry.api.phases import ATTEMPT, OWNING, QUEUED, TERMINAL, Phase
from ferry.api.times import now
from ferry.controller import effects
from ferry.controller.app import Context, ensure_current
from ferry.controller.droplet_reconciler import reconcile_droplet
from ferry.controller.schedule import migration_delay
from ferry.api.meta import ObjectKey
from ferry.api.patch import merge_patch
from ferry.migration.actions import Announce, CreateSecret, EmitEvent, RecomputeAllocations, SetLabels
from ferry.migration.admission import Admission, ConcurrencyLimits, MigrationRef, admit
from ferry.migration.machine import Decision, decide, needs_admission, needs_placement
from ferry.migration.observation import DropletObs, MachineConfig, Observation
from ferry.migration.retention import expired, finished_at
from ferry.hosts.status import maintenance_window, window_of
from ferry.placement import DropletRequest, place
from ferry.storage import Conflict, NotFound, StorageError

log = logging.getLogger("ferry.operator")


async def on_event(cx: Context, event_type: str | None, body: dict, logger: logging.Logger) -> None:
    cx.world.observe("LiveMigration", event_type, body)
    _update_gauges(cx)
    meta = body["metadata"]
    key = (meta.get("namespace") or "", meta["name"])
    m = cx.world.migrations.get(key)
    if event_type != "DELETED" and (m is None or not m.terminal):  # None: invalid spec, logged by reconcile
        await reconcile(cx, key, logger)


async def on_delete(cx: Context, body: dict, logger: logging.Logger) -> None:
    """Hold deletion until the migration is terminal: cancelled (source keeps running) or
    completed (the record already moved). The machine sees ``deleting`` and cancels."""
    meta = body["metadata"]
    key = (meta.get("namespace") or "", meta["name"])
    cx.world.observe("LiveMigration", "MODIFIED", body)
    await reconcile(cx, key, logger)
    m = cx.world.migrations.get(key)
    if m is not None and not m.terminal:
        raise kopf.TemporaryError(f"waiting for migration {key[0]}/{key[1]} to stop (phase {m.phase})", delay=1)


async def expire(cx: Context, key: ObjectKey, logger: logging.Logger) -> None:
    """Delete the finished migrations of this migration's droplet that the retention says to
    (``ferry.migration.retention``). Called by the sweep on every finished migration (the TTL)
    and at once when one finishes (the newest-N rule: the one that finished may push out the
    oldest)."""
    m = cx.world.migrations.get(key)
    if m is None or not m.terminal:
        return
    s = cx.settings
    gone = expired(cx.world.migrations_of((m.namespace, m.droplet)), now(), s.migration_ttl_seconds,
                   s.migrations_kept_per_droplet, protected=lambda x: _in_open_window(cx, x))
    for x in gone:
        if x.meta.deleting:
            continue
        try:
            await cx.call(cx.kube.delete, "LiveMigration", x.name, x.namespace)
            logger.info("migration %s/%s finished %s ago: deleted (retention)", *x.key, now() - finished_at(x))
        except NotFound:
            pass


def _in_open_window(cx: Context, m: LiveMigration) -> bool:
    """An evacuation of its host's open maintenance window: it stays while the window is open,
    as the record that this droplet's evacuation was tried (and is not retried)."""
    host = cx.world.hosts.get(m.meta.labels.get(c.EVACUATION_LABEL, ""))
    return host is not None and maintenance_window(host) == window_of(m)


#: the queued/in-flight gauges are counted over every migration: at most this often, not on
#: every watch event (a thousand migrations send thousands of events)
GAUGES_MIN_INTERVAL_SECONDS = 0.5


def _update_gauges(cx: Context) -> None:
    t = time.monotonic()
    if t - cx.gauges_at < GAUGES_MIN_INTERVAL_SECONDS:
        return
    cx.gauges_at = t
    ms = cx.world.migrations.values()
    cx.metrics.queued.set(sum(1 for m in ms if m.phase in (None, *QUEUED)))
    cx.metrics.in_flight.set(sum(1 for m in ms if m.in_flight))


def machine_config(cx: Context) -> MachineConfig:
    s = cx.settings
    return MachineConfig(
        notice_seconds=s.notice_seconds, downtime_budget_ms=s.downtime_budget_ms, max_attempts=s.max_attempts,
        retry_backoff_seconds=s.retry_backoff_seconds, progress_timeout_seconds=s.progress_timeout_seconds,
        budget_seconds_per_gib=s.budget_seconds_per_gib, budget_base_seconds=s.budget_base_seconds,
        poll_seconds=min(30.0, max(1.0, s.heartbeat_timeout_seconds)),
        host_lost_seconds=s.host_lost_seconds or max(60.0, 5 * s.heartbeat_timeout_seconds),
    )


def observe(cx: Context, m: LiveMigration) -> Observation:
    """Everything the machine needs about one migration, from the world (no API calls)."""
    world, s, t = cx.world, cx.settings, now()
    timeout = s.heartbeat_timeout_seconds
    d = world.droplets.get((m.namespace, m.droplet))
    source = world.hosts.get(d.host) if d is not None and d.host else None
    target = world.hosts.get(m.status.target_host) if m.status.target_host else None
    obs = Observation(
        name=m.name, spec=m.spec, created_at=m.meta.created or t, status=m.status,
        droplet=DropletObs.from_droplet(d, host_ready=bool(source and source.ready(t, timeout)),
                                        size_scale=s.size_scale,
                                        host_silent_seconds=(t - source.agent.heartbeat).total_seconds()
                                        if source is not None and source.agent.heartbeat else None),
        deleting=m.meta.deleting, generation=m.meta.generation,
        transfer=m.transfer, target=m.target,
        target_host_ready=bool(target and target.ready(t, timeout)) if m.status.target_host else None,
        secret_exists=m.status.attempt >= 1 and not world.expect.has_secret_been_deleted(m.key),
        droplet_owned_by_other=any(o.key != m.key and world.expect.phase_of(o) in OWNING
                                   for o in world.migrations_of((m.namespace, m.droplet))),
    )
    # Pending: may it be announced (one migration per droplet); Announced with the notice over:
    # may it take a concurrency slot. Asked without a clock (every Announced one), because
    # decide() runs with a slightly later now() than t.
    if needs_admission(obs):
        verdict = admission(cx, m, t)
        # None: Announced, notice not over at t (decide does not read it unless it ended since)
        obs = dataclasses.replace(obs, admission=verdict or Admission(False, "ConcurrencyLimitReached",
                                                                      "waiting for a slot"))
    if needs_placement(obs, t) and d is not None:
        request = DropletRequest(name=f"{m.namespace}/{m.droplet}", datacenter=d.datacenter, resources=d.resources,
                                 host_selector=d.host_selector, source_host=d.host,
                                 platform=source.agent.platform if source is not None else None)
        result = place(request, world.host_infos(t, timeout), world.reservations(exclude=m.key),
                       strategy=s.placement_strategy, target_host=m.spec.target_host,
                       inbound_limit=s.max_inbound_per_host, avoid=_failed_targets(m))
        obs = dataclasses.replace(obs, placement=result)
    return obs


def _failed_targets(m: LiveMigration) -> dict[str, str]:
    """Hosts earlier attempts failed on, and why: a retry goes elsewhere when another host fits
    (the source is the same in every attempt; the target is what a retry can change)."""
    return {a.target_host: f"attempt {a.number} failed there: {a.reason}" for a in m.status.attempts
            if a.result == "Failed" and a.target_host}


def admission(cx: Context, m: LiveMigration, t: dt.datetime) -> Admission | None:
    """``admit``'s verdict for ``m``, without judging every migration on every reconcile.

    ``admit`` over all migrations is O(n log n), and each of n migrations asks every second:
    O(n^2). Its two gates need less: the announce gate (Pending) reads only the migrations of
    the same droplet, and the slot gate (Announced) only the Announced and in-flight ones,
    judged together oldest first. So a Pending migration is judged with its droplet's
    migrations alone (the same verdict), and the slot gate's verdicts for all are computed
    once and reused until something admission reads changes (``World.admission_version``,
    ``Expectations.version``) or the next notice ends.
    """
    world = cx.world
    s = cx.settings
    limits = ConcurrencyLimits(s.max_parallel, s.max_outbound_per_host, s.max_inbound_per_host)
    key = f"{m.namespace}/{m.name}"
    if world.expect.phase_of(m) in (None, Phase.PENDING):
        return admit([_ref(cx, x, t) for x in world.migrations_of((m.namespace, m.droplet))], limits, t).get(key)
    if world.migrations.get(m.key) is not m:
        # A decision merged into the previous one's write (``_reconcile_once``): judged on the
        # status it was made on, not the world's (not written yet), and not cached.
        refs = [_ref(cx, m if x.key == m.key else x, t) for x in world.migrations.values()
                if world.expect.phase_of(m if x.key == m.key else x) in OWNING]
        return admit(refs, limits, t).get(key)
    cache = cx.slot_verdicts
    version = (world.admission_version, world.expect.version, limits)
    if cache.version != version or (cache.valid_until is not None and t >= cache.valid_until):
        refs = [_ref(cx, x, t) for x in world.migrations.values() if world.expect.phase_of(x) in OWNING]
        cache.verdicts = admit(refs, limits, t)
        cache.version = version
        cache.valid_until = min((r.not_before for r in refs if r.phase == Phase.ANNOUNCED and r.not_before
                                 and r.not_before > t), default=None)
        cache.computed += 1
    return cache.verdicts.get(key)


def _ref(cx: Context, m: LiveMigration, t: dt.datetime) -> MigrationRef:
    world = cx.world
    d = world.droplets.get((m.namespace, m.droplet))
    return MigrationRef(
        key=f"{m.namespace}/{m.name}", droplet=f"{m.namespace}/{m.droplet}",
        phase=world.expect.phase_of(m), created_at=m.meta.created or t,
        source_host=m.status.source_host or (d.host if d else None),
        target_host=m.status.target_host or m.spec.target_host, not_before=m.status.not_before)


async def reconcile(cx: Context, key: ObjectKey, logger: logging.Logger) -> None:
    await ensure_current(cx)
    cx.reconciled_at = time.monotonic()
    look: dict = {}  # what the last decision said about the next look
    try:
        async with cx.object_lock(("LiveMigration", key)):
            for _ in range(3):  # a decision made on a stale view is retried on a fresh read
                if await _reconcile_once(cx, key, logger, look):
                    return
                try:
                    fresh = await cx.call(cx.kube.get, "LiveMigration", key[1], key[0])
                except NotFound:
                    cx.world.observe("LiveMigration", "DELETED", {"metadata": {"namespace": key[0], "name": key[1]}})
                    return
                cx.world.observe("LiveMigration", "MODIFIED", fresh)
    finally:
        # the sweep's next look at it (an error or no decision: the interval)
        cx.looked("LiveMigration", key, look.get("delay"))


async def _reconcile_once(cx: Context, key: ObjectKey, logger: logging.Logger, look: dict) -> bool:
    """One look. False when the status write met a newer version (decide again). ``look``
    gets the delay until the sweep's next look, from the last decision."""
    m = cx.world.migrations.get(key)
    if m is None:
        invalid = cx.world.invalid.get(("LiveMigration", key))
        if invalid:
            logger.warning("migration %s/%s has an invalid spec: %s", *key, invalid)
        return True
    if c.FINALIZER not in m.meta.finalizers and not m.meta.deleting and not m.terminal:
        return True  # kopf adds the finalizer first; deciding meanwhile only races its patch
    if (key[0], m.droplet) not in cx.world.droplets and not m.terminal:
        # Not in the world yet (its watch event may simply come later): ask before calling it missing.
        fresh = await cx.call(cx.kube.get_or_none, "Droplet", m.droplet, key[0])
        if fresh is not None:
            cx.world.observe("Droplet", "MODIFIED", fresh)
    if not m.terminal:
        # A host that looks NotReady here fails the migration for good (HostNotReady); make sure
        # the view is not merely old (a standby that just became active saw no heartbeat while
        # it waited): ask the API before believing it.
        t, timeout = now(), cx.settings.heartbeat_timeout_seconds
        d = cx.world.droplets.get((key[0], m.droplet))
        for name in {d.host if d else None, m.status.target_host} - {None}:
            h = cx.world.hosts.get(name)
            if h is None or not h.ready(t, timeout):
                fresh = await cx.call(cx.kube.get_or_none, "Host", name)
                if fresh is not None:
                    cx.world.observe("Host", "MODIFIED", fresh)
    # One look may hold several decisions, written as ONE status patch: a transition asks to be
    # looked at again at once (requeue 0), and the next decision is made here on the status the
    # last one left (in memory), as long as it stays mergeable (``_mergeable``). Each decision's
    # actions are applied in order before the write, as for one decision; its Events and its
    # phase timestamp are kept, so nothing of what status and Events tell is lost.
    steps: list[tuple[Observation, Decision]] = []
    cur, rv = m, m.meta.resource_version
    while len(steps) < MAX_MERGED_DECISIONS:
        async with cx.lock:  # admission, placement and the expectations decide together
            obs = observe(cx, cur)
            decision = decide(obs, now(), machine_config(cx))
            if steps and not _mergeable(steps[-1][1], obs, decision):
                break  # decided again, on the written status, by the look that write causes
            _expect(cx, cur, obs, decision)
        steps.append((obs, decision))
        try:
            for action in decision.actions:
                if isinstance(action, EmitEvent):
                    continue
                if isinstance(action, RecomputeAllocations):
                    # The sweep's next tick (0.2 s) recomputes them, after this status write: one
                    # host write for all the migrations that changed it meanwhile, and no host
                    # write waited for here (the host reconciler holds back a change of its
                    # counts alone: ``host_reconciler.COUNTS_MIN_INTERVAL_SECONDS``).
                    for h in action.hosts:
                        cx.wake("Host", h)
                    continue
                new_rv = await effects.apply(cx, cur, action, logger)
                if new_rv:  # our own write to this LiveMigration (labels): guard the status with it
                    rv = new_rv
                    cur = dataclasses.replace(cur, meta=dataclasses.replace(cur.meta, resource_version=new_rv))
        except Conflict:  # the labels' write met a newer version: decide again on a fresh read
            cx.world.expect.forget_migration(key)
            return False
        except StorageError as exc:
            logger.warning("migration %s/%s: %s; will retry", *key, exc)
            cx.world.expect.forget_migration(key)
            return True
        if decision.done or decision.requeue_after != 0 or not decision.status:
            break
        cur = dataclasses.replace(cur, status=decision.new_status)
    first, (_, decision) = steps[0][0], steps[-1]
    look["delay"] = migration_delay(decision.new_status.phase in ATTEMPT, decision.requeue_after)
    status = merge_patch(m.status.to_dict(), decision.new_status.to_dict()) if len(steps) > 1 else decision.status
    if not status and not any(d.actions for _, d in steps):
        return True
    if status:
        if decision.new_status.phase in TERMINAL:
            failpoints.hit("operator.before-release")
        try:
            new = await cx.call(cx.kube.patch_status, "LiveMigration", key[1], status, key[0], resource_version=rv)
        except Conflict:
            cx.world.expect.forget_migration(key)
            return False
        except NotFound:
            return True
        cx.world.observe("LiveMigration", "MODIFIED", new)
    # Events only once the status that tells the same story is written: never twice.
    for obs, d in steps:
        for action in d.actions:
            if isinstance(action, EmitEvent):
                await effects.apply(cx, m, action, logger)
        if d.new_status.phase != obs.status.phase:
            _log_transition(key, obs.status.phase, d.new_status)
            _count(cx, obs, d)
    if decision.new_status.phase != first.status.phase:
        await reconcile_droplet(cx, (key[0], m.droplet), logger)  # its phase follows at once
        if decision.new_status.phase in TERMINAL:
            await expire(cx, key, logger)
    return True


#: at most this many decisions in one status write (a migration created with no notice and a
#: free slot goes Pending, Announced, Scheduling, Preparing and waits for its target: one write)
MAX_MERGED_DECISIONS = 6
#: actions a decision merged into the previous one's write may carry: writes that are
#: idempotent and that the next look (the world, updated by each write) can see
_MERGEABLE_ACTIONS = (Announce, SetLabels, CreateSecret, EmitEvent, RecomputeAllocations)


def _mergeable(previous: Decision, obs: Observation, decision: Decision) -> bool:
    """May ``decision`` (made on ``previous``'s status, not yet written) share its write?

    Only after a transition (``previous`` asked to look again at once), and only while no
    attempt runs: Pending, Announced and Scheduling, whose actions are announcing, labelling
    and the Secret. From Preparing on, only a decision without effects that stays in its phase
    (the reason it waits for, e.g. WaitingForTarget right after TargetChosen): the copy, the
    flip and the record's writes each get their own status write, as they always had.
    """
    if previous.done or previous.requeue_after != 0 or not decision.status:
        return False
    if obs.status.phase in (None, Phase.PENDING, Phase.ANNOUNCED, Phase.SCHEDULING):
        return all(isinstance(x, _MERGEABLE_ACTIONS) for x in decision.actions)
    return decision.new_status.phase == obs.status.phase and all(isinstance(x, EmitEvent) for x in decision.actions)


def _log_transition(key: ObjectKey, before: Phase | None, st: MigrationStatus) -> None:
    """One line per phase transition, naming the migration (and, for JSON logs, as fields)."""
    log.info("migration %s/%s: %s -> %s (%s: %s)", *key, before or "New", st.phase, st.reason, st.message,
             extra={"migration": f"{key[0]}/{key[1]}", "phase": str(st.phase),
                    "previous_phase": str(before) if before else None, "reason": st.reason, "attempt": st.attempt})


def _expect(cx: Context, m: LiveMigration, obs: Observation, decision: Decision) -> None:
    """Remember what this decision takes until the watch shows it back."""
    before, st = obs.status, decision.new_status
    if before.phase == Phase.PENDING and st.phase == Phase.ANNOUNCED:
        cx.world.expect.announced(m.key)  # owns its droplet from now on (DropletBusy for the others)
    if before.phase == Phase.ANNOUNCED and st.phase == Phase.SCHEDULING:
        cx.world.expect.admitted(m.key)  # holds a concurrency slot from now on
    target = st.reserved_target
    if target and target != before.target_host:
        d = cx.world.droplets.get((m.namespace, m.droplet))
        if d is not None:
            cx.world.expect.reserved(m.key, target, d.key, d.resources)


def _count(cx: Context, obs: Observation, decision: Decision) -> None:
    st = decision.new_status
    if st.phase in TERMINAL:
        cx.metrics.migrations.labels(st.phase, st.reason or st.phase).inc()
        if st.phase == Phase.COMPLETED:
            started = st.phase_times.get(Phase.PREPARING)
            ended = st.phase_times.get(Phase.COMPLETED)
            tr = obs.transfer if obs.transfer is not None and obs.transfer.attempt == st.attempt else None
            cx.metrics.completed((ended - started).total_seconds() if started and ended else None,
                                 st.downtime_ms, tr.round if tr else None, tr.bytes_sent if tr else None)
    before = {x.number for x in obs.status.attempts if x.result}
    for x in st.attempts:
        if x.result and x.number not in before:
            cx.metrics.attempts.labels(x.result, x.reason or x.result).inc()
