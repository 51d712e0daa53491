"""Droplet reconciler: place new droplets with the scorer; keep phase and label honest
(the decisions are ``ferry.placement`` and ``ferry.droplets.status``)."""

from __future__ import annotations

import logging

from ferry.api import constants as c
from ferry.api.times import now
from ferry.controller import effects
from ferry.controller.app import Context
from ferry.api.meta import ObjectKey
from ferry.api.models import Droplet
from ferry.droplets.status import (ADDRESS_CONFLICT, address_condition, address_verdict, droplet_state,
                                   placement_status, restart_condition, state_changed)
from ferry.placement import DropletRequest, place
from ferry.storage import Conflict, NotFound

log = logging.getLogger("ferry.operator")


async def on_event(cx: Context, event_type: str | None, body: dict, logger: logging.Logger) -> None:
    meta = body["metadata"]
    key = (meta.get("namespace") or "", meta["name"])
    before = cx.world.address_of(key)
    was = cx.world.droplets.get(key)
    cx.world.observe("Droplet", event_type, body)
    now_ = cx.world.droplets.get(key)
    if was is not None and (now_ is None or now_.host != was.host or now_.meta.generation != was.meta.generation
                            or now_.meta.deleting != was.meta.deleting):
        # Deleted, its record moved, its spec changed: its migrations decide on it; the sweep
        # looks at them on its next tick, not at their next deadline.
        for m in cx.world.migrations_of(key):
            if not m.terminal:
                cx.wake("LiveMigration", m.key)
    if event_type != "DELETED":
        await reconcile_droplet(cx, key, logger)
    # An address this droplet gave up (deleted, or spec.ip changed) may now belong to another.
    after = cx.world.address_of(key)
    if before is not None and before != after:
        for other in cx.world.claimants(before):
            await reconcile_droplet(cx, other.key, logger)


async def reconcile_droplet(cx: Context, key: ObjectKey, logger: logging.Logger) -> None:
    async with cx.object_lock(("Droplet", key)):
        await _reconcile(cx, key, logger)
    cx.looked("Droplet", key)  # the sweep's drift check: one interval from now


async def _reconcile(cx: Context, key: ObjectKey, logger: logging.Logger) -> None:
    world = cx.world
    d = world.droplets.get(key)
    invalid = world.invalid.get(("Droplet", key))
    if invalid:
        logger.warning("droplet %s/%s has an invalid spec: %s", *key, invalid)
        return
    if d is None or d.meta.deleting:
        return
    ref = effects.ref("Droplet", key[1], key[0], d.meta.uid)
    d = await _flag_address(cx, key, d, ref)
    if not d.host:
        if world.expect.is_placing(key):
            return  # placed a moment ago; the watch has not shown it back yet
        async with cx.lock:
            t = now()
            request = DropletRequest(name=f"{key[0]}/{key[1]}", datacenter=d.datacenter, resources=d.resources,
                                     host_selector=d.host_selector)
            result = place(request, world.host_infos(t, cx.settings.heartbeat_timeout_seconds),
                           world.reservations(), strategy=cx.settings.placement_strategy)
            if result.chosen:
                world.expect.placed(key, result.chosen, d.resources)
        status = placement_status(d, result, t)
        if result.chosen:
            try:
                new = await cx.call(cx.kube.patch_status, "Droplet", key[1], status, key[0],
                                    resource_version=d.meta.resource_version)
                world.observe("Droplet", "MODIFIED", new)
            except (Conflict, NotFound) as exc:
                world.expect.forget_placement(key)
                log.info("placement of %s/%s not written (%s); will retry", *key, exc)
                return
            await effects.set_host_label(cx, key, result.chosen)
            await effects.post_event(cx, ref, "Normal", "Placed", f"placed on {result.chosen}: {result.message}")
            log.info("placed %s/%s on %s", *key, result.chosen)
        elif d.status.get("message") != result.message or d.phase != status["phase"]:
            new = await cx.call(cx.kube.patch_status, "Droplet", key[1], status, key[0])
            world.observe("Droplet", "MODIFIED", new)
            await effects.post_event(cx, ref, "Warning", "NoHostFits", result.message)
        return

    # Placed: the label mirrors the record (repairs a crash between the two writes).
    if d.meta.labels.get(c.HOST_LABEL) != d.host:
        await effects.set_host_label(cx, key, d.host)
        d = world.droplets.get(key) or d
    d = await _note_restart(cx, key, d)
    state = droplet_state(d, world.hosts.get(d.host), world.migrations_of(key), now(),
                          cx.settings.heartbeat_timeout_seconds)
    if state_changed(d, state):
        new = await cx.call(cx.kube.patch_status, "Droplet", key[1],
                            {"phase": state.phase, "reason": state.reason, "message": state.message,
                             "observedGeneration": d.meta.generation}, key[0])
        world.observe("Droplet", "MODIFIED", new)


async def _write_conditions(cx: Context, key: ObjectKey, d: Droplet, conditions: list[dict], what: str) -> bool:
    """Write the droplet's conditions, guarded by the resourceVersion it was decided on; False
    when it changed meanwhile (the next event decides again)."""
    try:
        new = await cx.call(cx.kube.patch_status, "Droplet", key[1], {"conditions": conditions}, key[0],
                            resource_version=d.meta.resource_version)
    except (Conflict, NotFound) as exc:
        log.info("%s of %s/%s not written (%s); the next event retries", what, *key, exc)
        return False
    cx.world.observe("Droplet", "MODIFIED", new)
    return True


async def _flag_address(cx: Context, key: ObjectKey, d: Droplet, ref: dict) -> Droplet:
    """Set ``AddressConflict`` when an older droplet owns this one's spec.ip (and clear it when
    that ends); a Warning Event when it turns True. Returns the droplet as written."""
    verdict = address_verdict(d, cx.world.claimants(d.address))
    conditions = address_condition(d, verdict, now())
    if conditions is None or not await _write_conditions(cx, key, d, conditions, ADDRESS_CONFLICT):
        return d
    was = d.condition(ADDRESS_CONFLICT)
    if verdict.conflict and (was is None or was.status != "True"):
        await effects.post_event(cx, ref, "Warning", ADDRESS_CONFLICT, verdict.message)
        log.warning("droplet %s/%s: %s", *key, verdict.message)
    elif not verdict.conflict and was is not None and was.status == "True":
        await effects.post_event(cx, ref, "Normal", "AddressConflictResolved", verdict.message)
    return cx.world.droplets.get(key) or d


async def _note_restart(cx: Context, key: ObjectKey, d: Droplet) -> Droplet:
    """``GuestRestarted`` on the droplet once its host reports that its VM process died and was
    started again (the agent posted the Warning Event when it restarted it)."""
    conditions = restart_condition(d, cx.world.hosts.get(d.host or ""), now())
    if conditions is None or not await _write_conditions(cx, key, d, conditions, "GuestRestarted"):
        return d
    return cx.world.droplets.get(key) or d
