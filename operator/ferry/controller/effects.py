"""Carrying out the machine's actions (``ferry.migration.actions``) through storage, and the
writes the reconcilers share (Events, the host label, conditions on a droplet)."""

from __future__ import annotations

import logging
import os
from typing import Any

from ferry import failpoints
from ferry.api import constants as c
from ferry.api.conditions import parse_conditions, set_condition
from ferry.api.livemigration import LiveMigration
from ferry.api.models import Droplet
from ferry.api.phases import DropletPhase
from ferry.api.times import fmt, now
from ferry.controller.app import Context
from ferry.droplets.status import completion_status
from ferry.api.meta import ObjectKey
from ferry.migration import actions as a
from ferry.storage import Conflict, NotFound, StorageError
from ferry.storage.kube import owner_reference

log = logging.getLogger("ferry.operator")

MAINTENANCE_ANNOTATIONS = (c.MAINTENANCE_ANNOTATION, c.MAINTENANCE_SINCE_ANNOTATION,
                           c.MAINTENANCE_NOT_BEFORE_ANNOTATION)


def ref(kind: str, name: str, namespace: str | None, uid: str | None) -> dict[str, Any]:
    """The object an Event is about."""
    return {"kind": kind, "apiVersion": c.API_VERSION, "metadata": {"name": name, "namespace": namespace, "uid": uid}}


async def post_event(cx: Context, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
    """Through the recorder (queued, correlated: ``controller.events``) when the operator runs
    one; posted at once otherwise."""
    if cx.events is not None:
        cx.events.record(obj, type_, reason, message)
    else:
        await cx.call(cx.kube.event, obj, type_, reason, message)


async def set_host_label(cx: Context, key: ObjectKey, host: str) -> None:
    new = await cx.call(cx.kube.patch, "Droplet", key[1], {"metadata": {"labels": {c.HOST_LABEL: host}}}, key[0])
    cx.world.observe("Droplet", "MODIFIED", new)


async def apply(cx: Context, m: LiveMigration, action: a.Action, logger: logging.Logger) -> str | None:
    """Carry out one action; returns the migration's new resourceVersion if it wrote the migration.
    (``RecomputeAllocations`` is the host reconciler's job: the migration reconciler calls it.)"""
    ns, kube, key = m.namespace, cx.kube, m.key
    if isinstance(action, a.Announce):
        new = await cx.call(kube.patch, "Droplet", action.droplet, {"metadata": {"annotations": {
            c.MAINTENANCE_ANNOTATION: c.MAINTENANCE_EVENT,
            c.MAINTENANCE_SINCE_ANNOTATION: fmt(action.since),
            c.MAINTENANCE_NOT_BEFORE_ANNOTATION: fmt(action.not_before)}}}, ns)
        cx.world.observe("Droplet", "MODIFIED", new)  # the next look must see its own announcement
    elif isinstance(action, a.ClearAnnouncement):
        try:
            new = await cx.call(kube.patch, "Droplet", action.droplet, {"metadata": {"annotations": {
                k: None for k in MAINTENANCE_ANNOTATIONS}}}, ns)
            cx.world.observe("Droplet", "MODIFIED", new)
        except NotFound:
            pass
    elif isinstance(action, a.SetLabels):
        new = await cx.call(kube.patch, "LiveMigration", m.name, {"metadata": {"labels": {
            c.SOURCE_HOST_LABEL: action.source_host, c.TARGET_HOST_LABEL: action.target_host,
            c.DROPLET_LABEL: action.droplet}}}, ns, resource_version=m.meta.resource_version)
        return new["metadata"]["resourceVersion"]
    elif isinstance(action, a.CreateSecret):
        owner = owner_reference({"apiVersion": c.API_VERSION, "kind": "LiveMigration",
                                 "metadata": {"name": m.name, "uid": m.meta.uid}})
        await cx.call(kube.create_secret, ns, action.name, {c.TRANSFER_SECRET_KEY: os.urandom(32)}, owner,
                      {c.DROPLET_LABEL: m.droplet})
        cx.world.expect.secret_created(key)
    elif isinstance(action, a.DeleteSecret):
        failpoints.hit("operator.before-secret-delete")
        await cx.call(kube.delete_secret, ns, action.name)
        cx.world.expect.secret_deleted(key)
    elif isinstance(action, (a.FlipRecord, a.ReturnRecord)):
        # Holding the droplet's lock: its reconciler (woken by the record's watch event) repairs
        # a label that does not follow the record, and without the lock it wrote the label a
        # second time while this wrote it (one more write per migration in bench_fleet).
        async with cx.object_lock(("Droplet", (ns, action.droplet))):
            await flip_record(cx, ns, action)
    elif isinstance(action, a.EmitEvent):
        if action.on == "droplet":
            d = cx.world.droplets.get((ns, m.droplet))
            obj = ref("Droplet", m.droplet, ns, d.meta.uid if d else None)
        else:
            obj = ref("LiveMigration", m.name, ns, m.meta.uid)
        await post_event(cx, obj, action.type, action.reason, action.message)
    elif isinstance(action, a.MarkDropletCondition):
        await mark_droplet_condition(cx, ns, action)
    elif isinstance(action, a.RecordLastMigration):
        last = {"name": action.migration, "completedAt": fmt(action.completed_at), "fromHost": action.from_host,
                "toHost": action.to_host, "downtimeMs": m.status.downtime_ms}
        d = cx.world.droplets.get((ns, action.droplet))
        # With the phase it has once this migration is over (Placed): one write, not two (the
        # droplet reconciler, run after the migration's status write, then finds nothing to do).
        patch = {"lastMigration": last} if d is None or not d.host else completion_status(
            d, cx.world.hosts.get(d.host), cx.world.migrations_of(d.key), m.name, last, now(),
            cx.settings.heartbeat_timeout_seconds)
        try:
            new = await cx.call(kube.patch_status, "Droplet", action.droplet, patch, ns)
            cx.world.observe("Droplet", "MODIFIED", new)
        except NotFound:
            pass
    else:  # pragma: no cover - the machine's Action union is closed
        raise TypeError(f"unknown action {action!r}")
    return None


async def flip_record(cx: Context, ns: str, action: a.FlipRecord | a.ReturnRecord) -> None:
    """The commit point of a migration (DESIGN invariant 1).

    ``status.host`` is the placement record: it moves in one write guarded by the droplet's
    resourceVersion, and only from ``from_host``. The guard is the resourceVersion the operator's
    watch last saw (no read in the guest's pause); a conflict means that copy was behind, and the
    write is tried again on a fresh read. The ``ferry.dev/host`` label follows in a second write
    (Kubernetes cannot change a label and a status subresource in one request); it is an index
    only, and the droplet reconciler repairs it if the operator dies between the two writes.
    ``ReturnRecord`` (the target failed before it ran) is the same write the other way.
    """
    back = isinstance(action, a.ReturnRecord)
    body: dict[str, Any] | None = None
    seen = cx.world.droplets.get((ns, action.droplet))
    if seen is not None and seen.host == action.from_host and seen.meta.resource_version:
        try:
            body = await _write_record(cx, ns, action, back, seen.meta.resource_version)
        except Conflict:
            body = None  # the watch's copy was behind: read it fresh
    if body is None:
        body = await cx.call(cx.kube.get, "Droplet", action.droplet, ns)
        current = Droplet.from_body(body).host
        if current != action.to_host:
            if current != action.from_host:
                raise StorageError(f"record of droplet {ns}/{action.droplet} names {current}, not {action.from_host}")
            body = await _write_record(cx, ns, action, back, body["metadata"]["resourceVersion"])
    cx.world.observe("Droplet", "MODIFIED", body)
    if not back:
        failpoints.hit("operator.after-record-write")
    labels = (body.get("metadata") or {}).get("labels") or {}
    if labels.get(c.HOST_LABEL) != action.to_host:
        await set_host_label(cx, (ns, action.droplet), action.to_host)
    if not back:
        failpoints.hit("operator.after-label-write")


async def _write_record(cx: Context, ns: str, action: a.FlipRecord | a.ReturnRecord, back: bool,
                        resource_version: str) -> dict[str, Any]:
    failpoints.hit("operator.before-record-return" if back else "operator.before-record-write")
    body = await cx.call(cx.kube.patch_status, "Droplet", action.droplet,
                         {"host": action.to_host, "phase": DropletPhase.MIGRATING,
                          "reason": "RecordReturned" if back else "RecordMoved",
                          "message": f"record {'moved back' if back else 'moved'} from {action.from_host} "
                                     f"to {action.to_host}"},
                         ns, resource_version=resource_version)
    log.info("record of droplet %s/%s moved %s%s -> %s", ns, action.droplet, "back " if back else "",
             action.from_host, action.to_host)
    return body


async def mark_droplet_condition(cx: Context, ns: str, action: a.MarkDropletCondition) -> None:
    """Set a condition on a droplet, read fresh and written guarded (retried on conflict).

    Clearing one the world's copy of the droplet does not have reads nothing: only the operator
    sets these conditions, and the world takes in its own writes (and is listed afresh by a
    replica that takes over), so the read would find it unset too (one GET per completed
    migration less: the completion clears ``OfflineMigrationNeeded``)."""
    seen = cx.world.droplets.get((ns, action.droplet))
    if not action.status and seen is not None and seen.condition(action.type) is None:
        return
    for _ in range(5):
        try:
            body = await cx.call(cx.kube.get, "Droplet", action.droplet, ns)
        except NotFound:
            return
        conds = parse_conditions((body.get("status") or {}).get("conditions"))
        if not action.status and not any(x.type == action.type for x in conds):
            return  # never set: nothing to clear
        conds = set_condition(conds, action.type, action.status, action.reason, action.message, now())
        try:
            new = await cx.call(cx.kube.patch_status, "Droplet", action.droplet,
                                {"conditions": [x.to_dict() for x in conds]}, ns,
                                resource_version=body["metadata"]["resourceVersion"])
            cx.world.observe("Droplet", "MODIFIED", new)
            return
        except Conflict:
            continue
