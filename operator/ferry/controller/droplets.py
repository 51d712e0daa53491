"""Droplet handlers: place new droplets with the scorer; keep phase and label honest."""

from __future__ import annotations

import logging
from typing import Any

import kopf

from ferry.api import constants as c
from ferry.api.times import fmt, now
from ferry.controller.app import RESOURCES, Context, ctx
from ferry.controller.world import Key
from ferry.placement import DropletRequest, place
from ferry.storage import Conflict, NotFound

log = logging.getLogger("ferry.operator")
DROPLET = RESOURCES["Droplet"]


@kopf.on.event(*DROPLET)
async def droplet_event(type: str | None, body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    cx = ctx(memo)
    cx.world.observe("Droplet", type, dict(body))
    if type != "DELETED":
        await reconcile_droplet(cx, (body.metadata.namespace, body.metadata.name), logger)


@kopf.timer(*DROPLET, interval=5.0, initial_delay=2.0)
async def droplet_timer(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    await reconcile_droplet(ctx(memo), (body.metadata.namespace, body.metadata.name), logger)


def _condition(type_: str, ok: bool, reason: str, message: str, previous: dict | None) -> dict[str, Any]:
    status = "True" if ok else "False"
    since = previous.get("lastTransitionTime") if previous and previous.get("status") == status else fmt(now())
    return {"type": type_, "status": status, "reason": reason, "message": message, "lastTransitionTime": since}


async def reconcile_droplet(cx: Context, key: Key, logger: logging.Logger) -> None:
    async with cx.object_lock(("Droplet", key)):
        await _reconcile(cx, key, logger)


async def _reconcile(cx: Context, key: Key, logger: logging.Logger) -> None:
    world = cx.world
    d = world.droplets.get(key)
    invalid = world.invalid.get(("Droplet", key))
    if invalid:
        logger.warning("droplet %s/%s has an invalid spec: %s", *key, invalid)
        return
    if d is None or d.meta.deleting:
        return
    prev_conds = {x.get("type"): x for x in d.status.get("conditions") or []}
    if not d.host:
        if key in world.pending_placements:
            return  # placed a moment ago; the watch has not shown it back yet
        async with cx.lock:
            t = now()
            request = DropletRequest(name=f"{key[0]}/{key[1]}", datacenter=d.datacenter, resources=d.resources,
                                     host_selector=d.host_selector)
            result = place(request, world.host_infos(t, cx.settings.heartbeat_timeout_seconds),
                           world.reservations(), strategy=cx.settings.placement_strategy)
            if result.chosen:
                world.pending_placements[key] = (result.chosen, d.resources)
        if result.chosen:
            status = {"host": result.chosen, "phase": "Placed", "reason": "Placed",
                      "message": f"placed on {result.chosen}", "placement": result.to_status(),
                      "observedGeneration": d.meta.generation,
                      "conditions": [_condition("Placed", True, "Placed", f"placed on {result.chosen}",
                                                prev_conds.get("Placed"))]}
            try:
                new = await cx.call(cx.kube.patch_status, "Droplet", key[1], status, key[0],
                                    resource_version=d.meta.resource_version)
                world.observe("Droplet", "MODIFIED", new)
            except (Conflict, NotFound) as exc:
                world.pending_placements.pop(key, None)
                log.info("placement of %s/%s not written (%s); will retry", *key, exc)
                return
            new = await cx.call(cx.kube.patch, "Droplet", key[1],
                                {"metadata": {"labels": {c.HOST_LABEL: result.chosen}}}, key[0])
            world.observe("Droplet", "MODIFIED", new)
            await cx.call(cx.kube.event, {"kind": "Droplet", "apiVersion": c.API_VERSION,
                                          "metadata": {"name": key[1], "namespace": key[0], "uid": d.meta.uid}},
                          "Normal", "Placed", f"placed on {result.chosen}: {result.message}")
            log.info("placed %s/%s on %s", *key, result.chosen)
        else:
            status = {"phase": "Unschedulable", "reason": "NoHostFits", "message": result.message,
                      "placement": result.to_status(), "observedGeneration": d.meta.generation,
                      "conditions": [_condition("Placed", False, "NoHostFits", result.message,
                                                prev_conds.get("Placed"))]}
            if d.status.get("message") != result.message or d.phase != "Unschedulable":
                new = await cx.call(cx.kube.patch_status, "Droplet", key[1], status, key[0])
                world.observe("Droplet", "MODIFIED", new)
                await cx.call(cx.kube.event, {"kind": "Droplet", "apiVersion": c.API_VERSION,
                                              "metadata": {"name": key[1], "namespace": key[0], "uid": d.meta.uid}},
                              "Warning", "NoHostFits", result.message)
        return

    # Placed: the label mirrors the record (repairs a crash between the two writes).
    if d.meta.labels.get(c.HOST_LABEL) != d.host:
        new = await cx.call(cx.kube.patch, "Droplet", key[1], {"metadata": {"labels": {c.HOST_LABEL: d.host}}},
                            key[0])
        world.observe("Droplet", "MODIFIED", new)
        d = world.droplets.get(key) or d
    host = world.hosts.get(d.host)
    active = [m for m in world.migrations_of(key) if m.active]
    if host is None:
        phase, reason, message = "HostLost", "HostMissing", f"host {d.host} does not exist"
    elif not host.ready(now(), cx.settings.heartbeat_timeout_seconds):
        phase, reason, message = ("HostLost", "HostNotReady",
                                  f"host {d.host} is not ready (no agent heartbeat); the droplet cannot be "
                                  "live-migrated until its host is back")
    elif active:
        m = active[0]
        phase, reason, message = "Migrating", "LiveMigration", f"being live-migrated by {m.name}"
    else:
        phase, reason, message = "Placed", "Placed", f"running on {d.host}"
    if (d.phase, d.status.get("reason"), d.status.get("message")) != (phase, reason, message):
        new = await cx.call(cx.kube.patch_status, "Droplet", key[1],
                            {"phase": phase, "reason": reason, "message": message,
                             "observedGeneration": d.meta.generation}, key[0])
        world.observe("Droplet", "MODIFIED", new)
