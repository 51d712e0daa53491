"""Host handlers: readiness from heartbeats, allocation, cordon and evacuation."""

from __future__ import annotations

import logging
from typing import Any

import kopf

from ferry.api import constants as c
from ferry.api.sizes import Resources
from ferry.api.times import now
from ferry.controller.app import RESOURCES, Context, ctx
from ferry.hosts.status import evacuation_plan, host_status, status_changed
from ferry.storage import Conflict

log = logging.getLogger("ferry.operator")
HOST = RESOURCES["Host"]


@kopf.on.event(*HOST)
async def host_event(type: str | None, body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    cx = ctx(memo)
    before = cx.world.hosts.get(body.metadata.name)
    cx.world.observe("Host", type, dict(body))
    after = cx.world.hosts.get(body.metadata.name)
    # React at once to spec changes (maintenance on/off); heartbeats are handled by the timer.
    if after is not None and (before is None or before.meta.generation != after.meta.generation):
        await reconcile_host(cx, body.metadata.name, logger)


@kopf.timer(*HOST, interval=2.0, initial_delay=3.0)
async def host_timer(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    await reconcile_host(ctx(memo), body.metadata.name, logger)


async def reconcile_host(cx: Context, name: str, logger: logging.Logger) -> None:
    async with cx.object_lock(("Host", name)):
        world = cx.world
        host = world.hosts.get(name)
        if host is None:
            return
        t = now()
        zero = Resources(0, 0, 0)
        allocated = world.allocated().get(name, zero)
        for r in world.reservations():
            if r.host == name:
                allocated = allocated + r.resources
        droplets = list(world.droplets.values())
        migrations = list(world.migrations.values())
        desired = host_status(host, droplets, migrations, allocated, t, cx.settings.heartbeat_timeout_seconds)
        if status_changed(host.status, desired):
            if host.status.get("phase") != desired["phase"]:
                log.info("host %s: %s -> %s", name, host.status.get("phase"), desired["phase"])
                await cx.call(cx.kube.event, {"kind": "Host", "apiVersion": c.API_VERSION,
                                              "metadata": {"name": name, "namespace": None, "uid": host.meta.uid}},
                              "Warning" if desired["phase"] == "NotReady" else "Normal",
                              f"Host{desired['phase']}", desired["conditions"][0]["message"]
                              if desired["phase"] == "NotReady" else f"host is {desired['phase']}")
            new = await cx.call(cx.kube.patch_status, "Host", name, desired)
            world.observe("Host", "MODIFIED", new)
        for body in evacuation_plan(host, droplets, migrations, t):
            try:
                await cx.call(cx.kube.create, "LiveMigration", body, body["metadata"]["namespace"])
                log.info("evacuating %s/%s off %s: created %s", body["metadata"]["namespace"],
                            body["spec"]["droplet"], name, body["metadata"]["name"])
            except Conflict:
                pass
        cx.metrics.hosts_ready.set(sum(1 for h in world.hosts.values()
                                       if h.ready(t, cx.settings.heartbeat_timeout_seconds)))
