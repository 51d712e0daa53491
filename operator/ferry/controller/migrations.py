"""LiveMigration handlers: a thin shell around the pure state machine.

Every watch event and a one-second timer call ``reconcile``: build an ``Observation`` from
the operator's view of the world, ``decide``, apply the decision's actions in order, then
write the status as one merge patch guarded by the migration's resourceVersion (a decision
made on a stale view is dropped, not written). Deletion is held by a finalizer until the
machine has reached a terminal phase (cancelled before the record flips, or completed).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import kopf

from ferry.api import constants as c
from ferry.api.times import fmt, now, parse
from ferry.controller.app import RESOURCES, Context, ctx
from ferry.controller.world import Key
from ferry.migration import machine as mm
from ferry.placement import DropletRequest, place
from ferry.storage import Conflict, NotFound, StorageError
from ferry.storage.kube import owner_reference

log = logging.getLogger("ferry.operator")
LM = RESOURCES["LiveMigration"]


def _not_terminal(status: dict, **_: Any) -> bool:
    return (status or {}).get("phase") not in c.TERMINAL_PHASES


@kopf.on.event(*LM)
async def migration_event(type: str | None, body: kopf.Body, memo: kopf.Memo, logger: logging.Logger,
                          **_: Any) -> None:
    cx = ctx(memo)
    cx.world.observe("LiveMigration", type, dict(body))
    _update_gauges(cx)
    if type != "DELETED" and _not_terminal(dict(body.get("status") or {})):
        await reconcile(cx, (body.metadata.namespace, body.metadata.name), logger)


@kopf.timer(*LM, interval=1.0, initial_delay=1.0, when=_not_terminal)
async def migration_timer(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    await reconcile(ctx(memo), (body.metadata.namespace, body.metadata.name), logger)


@kopf.on.delete(*LM)
async def migration_deleted(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    """Hold deletion until the migration is terminal: cancelled (source keeps running) or
    completed (the record already moved). The machine sees ``deleting`` and cancels."""
    cx = ctx(memo)
    key = (body.metadata.namespace, body.metadata.name)
    cx.world.observe("LiveMigration", "MODIFIED", dict(body))
    await reconcile(cx, key, logger)
    m = cx.world.migrations.get(key)
    if m is not None and not m.terminal:
        raise kopf.TemporaryError(f"waiting for migration {key[0]}/{key[1]} to stop (phase {m.phase})", delay=1)


def _update_gauges(cx: Context) -> None:
    ms = cx.world.migrations.values()
    cx.metrics.queued.set(sum(1 for m in ms if m.phase in (None, "Pending", "Announced")))
    cx.metrics.in_flight.set(sum(1 for m in ms if m.active))


def machine_config(cx: Context) -> mm.MachineConfig:
    s = cx.settings
    return mm.MachineConfig(
        notice_seconds=s.notice_seconds, downtime_budget_ms=s.downtime_budget_ms, max_attempts=s.max_attempts,
        retry_backoff_seconds=s.retry_backoff_seconds, progress_timeout_seconds=s.progress_timeout_seconds,
        budget_seconds_per_gib=s.budget_seconds_per_gib, budget_base_seconds=s.budget_base_seconds,
        poll_seconds=min(30.0, max(1.0, s.heartbeat_timeout_seconds)),
    )


def observe(cx: Context, key: Key, body: dict) -> mm.Observation:
    """Everything the machine needs about one migration, from the world (no API calls)."""
    world, s, t = cx.world, cx.settings, now()
    meta = body.get("metadata", {})
    status = body.get("status") or {}
    spec = mm.MigrationSpec.from_dict(body.get("spec") or {})
    dkey = (key[0], spec.droplet)
    d = world.droplets.get(dkey)
    d_body = None
    host_ready = False
    if d is not None:
        d_body = {"metadata": {"annotations": dict(d.meta.annotations),
                               "deletionTimestamp": "x" if d.meta.deleting else None},
                  "spec": {"size": d.size, "resources": None if d.size else d.resources.to_dict(),
                           "powerState": "on" if d.power_on else "off",
                           "features": {"nestedVirtualization": d.nested_virtualization}},
                  "status": {"host": d.host}}
        h = world.hosts.get(d.host) if d.host else None
        host_ready = bool(h and h.ready(t, s.heartbeat_timeout_seconds))
    mstatus = mm.MigrationStatus.from_dict(status)
    target_ready = None
    if mstatus.target_host:
        th = world.hosts.get(mstatus.target_host)
        target_ready = bool(th and th.ready(t, s.heartbeat_timeout_seconds))
    obs = mm.Observation(
        name=key[1], spec=spec, created_at=world.migrations[key].meta.created or t, status=mstatus,
        droplet=mm.DropletObs.from_droplet(d_body, host_ready=host_ready, size_scale=s.size_scale),
        deleting=bool(meta.get("deletionTimestamp")), generation=meta.get("generation"),
        transfer=mm.TransferReport.from_dict(status.get("transfer")),
        target=mm.TargetReport.from_dict(status.get("target")),
        target_host_ready=target_ready,
        secret_exists=mstatus.attempt >= 1 and key not in world.secrets_deleted,
    )
    # Pending: may it be announced (one migration per droplet); Announced with the notice over:
    # may it take a concurrency slot. Asked without a clock (every Announced one), because
    # decide() runs with a slightly later now() than t.
    if mm.needs_admission(obs):
        refs = []
        for m in world.migrations.values():
            dd = world.droplets.get((m.namespace, m.droplet))
            mkey, phase = (m.namespace, m.name), m.phase
            if mkey in world.admitted and phase in (None, "Pending", "Announced"):
                phase = "Scheduling"  # took a slot a moment ago, not seen back yet
            elif mkey in world.announcing and phase in (None, "Pending"):
                phase = "Announced"  # announced a moment ago (owns its droplet), not seen back yet
            refs.append(mm.MigrationRef(
                key=f"{m.namespace}/{m.name}", droplet=f"{m.namespace}/{m.droplet}", phase=phase,
                created_at=m.meta.created or t, source_host=m.source_host or (dd.host if dd else None),
                target_host=m.status_target_host or m.target_host, not_before=parse(m.status.get("notBefore"))))
        verdict = mm.admit(refs, mm.ConcurrencyLimits(s.max_parallel, s.max_outbound_per_host,
                                                      s.max_inbound_per_host), t).get(f"{key[0]}/{key[1]}")
        # None: Announced, notice not over at t (decide does not read it unless it ended since)
        obs = _replace(obs, admission=verdict or mm.Admission(False, "ConcurrencyLimitReached", "waiting for a slot"))
    if mm.needs_placement(obs, t) and d is not None:
        request = DropletRequest(name=f"{dkey[0]}/{dkey[1]}", datacenter=d.datacenter, resources=d.resources,
                                 host_selector=d.host_selector, source_host=d.host)
        result = place(request, world.host_infos(t, s.heartbeat_timeout_seconds), world.reservations(exclude=key),
                       strategy=s.placement_strategy, target_host=spec.target_host,
                       inbound_limit=s.max_inbound_per_host)
        obs = _replace(obs, placement=result)
    return obs


def _replace(obs: mm.Observation, **changes: Any) -> mm.Observation:
    import dataclasses

    return dataclasses.replace(obs, **changes)


async def reconcile(cx: Context, key: Key, logger: logging.Logger) -> None:
    async with cx.object_lock(("LiveMigration", key)):
        for _ in range(3):  # a decision made on a stale view is retried on a fresh read
            if await _reconcile_once(cx, key, logger):
                return
            try:
                fresh = await cx.call(cx.kube.get, "LiveMigration", key[1], key[0])
            except NotFound:
                cx.world.observe("LiveMigration", "DELETED", {"metadata": {"namespace": key[0], "name": key[1]}})
                return
            cx.world.observe("LiveMigration", "MODIFIED", fresh)


async def _reconcile_once(cx: Context, key: Key, logger: logging.Logger) -> bool:
    """One look. False when the status write met a newer version (decide again)."""
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
    body = _body_of(cx, key)
    async with cx.lock:  # admission, placement and the overlay decide together
        obs = observe(cx, key, body)
        decision = mm.decide(obs, now(), machine_config(cx))
        _reserve(cx, key, obs, decision)
    if not decision.status and not decision.actions:
        return True
    effects = [a for a in decision.actions if not isinstance(a, mm.EmitEvent)]
    events = [a for a in decision.actions if isinstance(a, mm.EmitEvent)]
    rv = m.meta.resource_version
    try:
        for action in effects:
            new_rv = await apply(cx, key, m, action, logger)
            if new_rv:  # our own write to this LiveMigration (labels): guard the status with it
                rv = new_rv
    except StorageError as exc:
        logger.warning("migration %s/%s: %s; will retry", *key, exc)
        _unreserve(cx, key)
        return True
    if decision.status:
        try:
            new = await cx.call(cx.kube.patch_status, "LiveMigration", key[1], decision.status, key[0],
                                resource_version=rv)
        except Conflict:
            _unreserve(cx, key)
            return False
        except NotFound:
            return True
        cx.world.observe("LiveMigration", "MODIFIED", new)
    # Events only once the status that tells the same story is written: never twice.
    for action in events:
        await apply(cx, key, m, action, logger)
    if decision.new_status.phase != obs.status.phase:
        log.info("migration %s/%s: %s -> %s (%s)", *key, obs.status.phase, decision.new_status.phase,
                 decision.new_status.message)
        _count(cx, obs, decision)
        from ferry.controller.droplets import reconcile_droplet

        await reconcile_droplet(cx, (key[0], obs.spec.droplet), logger)  # its phase follows at once
    return True


def _body_of(cx: Context, key: Key) -> dict:
    """Rebuild the migration body the machine reads from the world's parsed view."""
    m = cx.world.migrations[key]
    return {"metadata": {"name": m.name, "namespace": m.namespace, "generation": m.meta.generation,
                         "deletionTimestamp": "x" if m.meta.deleting else None},
            "spec": m.raw_spec, "status": dict(m.status)}


def _reserve(cx: Context, key: Key, obs: mm.Observation, decision: mm.Decision) -> None:
    from ferry.controller.world import PendingReservation

    st = decision.new_status
    if obs.status.phase == "Pending" and st.phase == "Announced":
        cx.world.announcing.add(key)  # owns its droplet from now on (DropletBusy for the others)
    if obs.status.phase == "Announced" and st.phase == "Scheduling":
        cx.world.admitted.add(key)  # holds a concurrency slot from now on
    target = mm.reserved_target(st)
    if target and target != obs.status.target_host:
        d = cx.world.droplets.get((key[0], obs.spec.droplet))
        if d is not None:
            cx.world.pending_reservations[key] = PendingReservation(key, target, (key[0], d.name), d.resources)


def _unreserve(cx: Context, key: Key) -> None:
    cx.world.pending_reservations.pop(key, None)
    cx.world.admitted.discard(key)
    cx.world.announcing.discard(key)


def _count(cx: Context, obs: mm.Observation, decision: mm.Decision) -> None:
    st = decision.new_status
    if st.phase in c.TERMINAL_PHASES:
        cx.metrics.migrations.labels(st.phase).inc()
        if st.phase == "Completed":
            started = st.phase_times.get("Preparing")
            ended = st.phase_times.get("Completed")
            if started and ended:
                cx.metrics.duration.observe((ended - started).total_seconds())
            if st.downtime_ms is not None:
                cx.metrics.downtime.observe(st.downtime_ms / 1000)
            if obs.transfer is not None:
                cx.metrics.bytes.inc(obs.transfer.bytes_sent)
    closed = {a.number: a.result for a in st.attempts if a.result}
    before = {a.number: a.result for a in obs.status.attempts if a.result}
    for n, result in closed.items():
        if n not in before:
            cx.metrics.attempts.labels(result).inc()


# --------------------------------------------------------------------------- actions


async def apply(cx: Context, key: Key, m: Any, action: mm.Action, logger: logging.Logger) -> str | None:
    """Carry out one action; returns the migration's new resourceVersion if it wrote the migration."""
    ns = key[0]
    kube = cx.kube
    if isinstance(action, mm.Announce):
        new = await cx.call(kube.patch, "Droplet", action.droplet, {"metadata": {"annotations": {
            c.MAINTENANCE_ANNOTATION: c.MAINTENANCE_EVENT,
            c.MAINTENANCE_SINCE_ANNOTATION: fmt(action.since),
            c.MAINTENANCE_NOT_BEFORE_ANNOTATION: fmt(action.not_before)}}}, ns)
        cx.world.observe("Droplet", "MODIFIED", new)  # the next look must see its own announcement
    elif isinstance(action, mm.ClearAnnouncement):
        try:
            new = await cx.call(kube.patch, "Droplet", action.droplet, {"metadata": {"annotations": {
                c.MAINTENANCE_ANNOTATION: None, c.MAINTENANCE_SINCE_ANNOTATION: None,
                c.MAINTENANCE_NOT_BEFORE_ANNOTATION: None}}}, ns)
            cx.world.observe("Droplet", "MODIFIED", new)
        except NotFound:
            pass
    elif isinstance(action, mm.SetLabels):
        new = await cx.call(kube.patch, "LiveMigration", key[1], {"metadata": {"labels": {
            c.SOURCE_HOST_LABEL: action.source_host, c.TARGET_HOST_LABEL: action.target_host,
            c.DROPLET_LABEL: action.droplet}}}, ns, resource_version=m.meta.resource_version)
        return new["metadata"]["resourceVersion"]
    elif isinstance(action, mm.CreateSecret):
        owner = owner_reference({"apiVersion": c.API_VERSION, "kind": "LiveMigration",
                                 "metadata": {"name": key[1], "uid": m.meta.uid}})
        await cx.call(kube.create_secret, ns, action.name, {c.TRANSFER_SECRET_KEY: os.urandom(32)}, owner,
                      {c.DROPLET_LABEL: m.droplet})
        cx.world.secrets_deleted.discard(key)
    elif isinstance(action, mm.DeleteSecret):
        await cx.call(kube.delete_secret, ns, action.name)
        cx.world.secrets_deleted.add(key)
    elif isinstance(action, mm.FlipRecord):
        await flip_record(cx, ns, action, logger)
    elif isinstance(action, mm.EmitEvent):
        if action.on == "droplet":
            d = cx.world.droplets.get((ns, m.droplet))
            obj = {"kind": "Droplet", "apiVersion": c.API_VERSION,
                   "metadata": {"name": m.droplet, "namespace": ns, "uid": d.meta.uid if d else None}}
        else:
            obj = {"kind": "LiveMigration", "apiVersion": c.API_VERSION,
                   "metadata": {"name": key[1], "namespace": ns, "uid": m.meta.uid}}
        await cx.call(kube.event, obj, action.type, action.reason, action.message)
    elif isinstance(action, mm.MarkDropletCondition):
        await mark_droplet_condition(cx, ns, action)
    elif isinstance(action, mm.RecordLastMigration):
        try:
            new = await cx.call(kube.patch_status, "Droplet", action.droplet, {"lastMigration": {
                "name": action.migration, "completedAt": fmt(action.completed_at),
                "fromHost": action.from_host, "toHost": action.to_host,
                "downtimeMs": (m.status or {}).get("downtimeMs")}}, ns)
            cx.world.observe("Droplet", "MODIFIED", new)
        except NotFound:
            pass
    elif isinstance(action, mm.RecomputeAllocations):
        from ferry.controller.hosts import reconcile_host

        for h in action.hosts:
            await reconcile_host(cx, h, logger)
    else:  # pragma: no cover - the machine's Action union is closed
        raise TypeError(f"unknown action {action!r}")
    return None


async def flip_record(cx: Context, ns: str, action: mm.FlipRecord, logger: logging.Logger) -> None:
    """The commit point of a migration (DESIGN invariant 1).

    ``status.host`` is the placement record: it moves in one write guarded by the droplet's
    resourceVersion, read fresh, and only from ``from_host``. The ``ferry.dev/host`` label
    follows in a second write (Kubernetes cannot change a label and a status subresource in
    one request); it is an index only, and the droplet reconciler repairs it if the operator
    dies between the two writes.
    """
    body = await cx.call(cx.kube.get, "Droplet", action.droplet, ns)
    current = (body.get("status") or {}).get("host")
    if current != action.to_host:
        if current != action.from_host:
            raise StorageError(f"record of droplet {ns}/{action.droplet} names {current}, not {action.from_host}")
        body = await cx.call(cx.kube.patch_status, "Droplet", action.droplet,
                             {"host": action.to_host, "phase": "Migrating", "reason": "RecordMoved",
                              "message": f"record moved from {action.from_host} to {action.to_host}"},
                             ns, resource_version=body["metadata"]["resourceVersion"])
        log.info("record of droplet %s/%s moved %s -> %s", ns, action.droplet, action.from_host, action.to_host)
    cx.world.observe("Droplet", "MODIFIED", body)
    labels = (body.get("metadata") or {}).get("labels") or {}
    if labels.get(c.HOST_LABEL) != action.to_host:
        new = await cx.call(cx.kube.patch, "Droplet", action.droplet,
                            {"metadata": {"labels": {c.HOST_LABEL: action.to_host}}}, ns)
        cx.world.observe("Droplet", "MODIFIED", new)


async def mark_droplet_condition(cx: Context, ns: str, action: mm.MarkDropletCondition) -> None:
    for _ in range(5):
        try:
            body = await cx.call(cx.kube.get, "Droplet", action.droplet, ns)
        except NotFound:
            return
        conds = list((body.get("status") or {}).get("conditions") or [])
        value = "True" if action.status else "False"
        existing = next((x for x in conds if x.get("type") == action.type), None)
        if existing is None and not action.status:
            return  # never set: nothing to clear
        new = {"type": action.type, "status": value, "reason": action.reason, "message": action.message,
               "lastTransitionTime": existing.get("lastTransitionTime")
               if existing and existing.get("status") == value else fmt(now())}
        conds = [x for x in conds if x.get("type") != action.type] + [new]
        try:
            await cx.call(cx.kube.patch_status, "Droplet", action.droplet, {"conditions": conds}, ns,
                          resource_version=body["metadata"]["resourceVersion"])
            return
        except Conflict:
            continue
