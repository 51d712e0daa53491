"""Host reconciler: readiness from heartbeats, allocation, cordon and evacuation
(the decisions are ``ferry.hosts.status``)."""

from __future__ import annotations

import logging
import time

from ferry.api.meta import ObjectKey
from ferry.api.phases import HostPhase
from ferry.api.sizes import Resources
from ferry.api.times import now
from ferry.controller import effects
from ferry.controller.app import Context
from ferry.hosts.status import evacuation_plan, evacuation_withdrawals, host_status, status_changed
from ferry.storage import Conflict, NotFound

log = logging.getLogger("ferry.operator")


async def on_event(cx: Context, event_type: str | None, body: dict, logger: logging.Logger) -> list[ObjectKey]:
    """Returns the droplets whose VM restarts the host now reports differently (their
    ``GuestRestarted`` condition is due)."""
    name = body["metadata"]["name"]
    before = cx.world.hosts.get(name)
    cx.world.observe("Host", event_type, body)
    after = cx.world.hosts.get(name)
    # React at once to spec changes (maintenance on/off); heartbeats are handled by the timer.
    if after is not None and (before is None or before.meta.generation != after.meta.generation):
        await reconcile_host(cx, name, logger)
    if after is None:
        return []
    was = before.agent.restarts if before is not None else {}
    return [k for k, v in after.agent.restarts.items() if was.get(k) != v]


async def reconcile_host(cx: Context, name: str, logger: logging.Logger) -> None:
    cx.reconciled_at = time.monotonic()
    async with cx.object_lock(("Host", name)):
        world = cx.world
        host = world.hosts.get(name)
        if host is None:
            return
        t = now()
        allocated = world.allocated().get(name, Resources(0, 0, 0))
        for r in world.reservations():
            if r.host == name:
                allocated = allocated + r.resources
        droplets = list(world.droplets.values())
        migrations = list(world.migrations.values())
        desired = host_status(host, droplets, migrations, allocated, t, cx.settings.heartbeat_timeout_seconds)
        if status_changed(host.status, desired):
            if host.status.get("phase") != desired["phase"]:
                log.info("host %s: %s -> %s", name, host.status.get("phase"), desired["phase"])
                not_ready = desired["phase"] == HostPhase.NOT_READY
                await effects.post_event(cx, effects.ref("Host", name, None, host.meta.uid),
                                         "Warning" if not_ready else "Normal", f"Host{desired['phase']}",
                                         desired["conditions"][0]["message"] if not_ready
                                         else f"host is {desired['phase']}")
            new = await cx.call(cx.kube.patch_status, "Host", name, desired)
            world.observe("Host", "MODIFIED", new)
        # The window is planned only once the status that records it is written.
        window = (desired.get("evacuation") or {}).get("window")
        for m in evacuation_withdrawals(host, migrations):
            try:
                new = await cx.call(cx.kube.patch, "LiveMigration", m.name, {"spec": {"cancel": True}}, m.namespace,
                                    resource_version=m.meta.resource_version)
                world.observe("LiveMigration", "MODIFIED", new)
                log.info("host %s: maintenance ended; withdrew queued evacuation %s/%s", name, m.namespace, m.name)
            except (NotFound, Conflict):
                pass  # gone, or moved on since this view: the next reconcile looks again
        for body in evacuation_plan(host, droplets, migrations, t, window):
            try:
                await cx.call(cx.kube.create, "LiveMigration", body, body["metadata"]["namespace"])
                log.info("evacuating %s/%s off %s: created %s", body["metadata"]["namespace"],
                         body["spec"]["droplet"], name, body["metadata"]["name"])
            except Conflict:
                pass
        cx.metrics.hosts_ready.set(sum(1 for h in world.hosts.values()
                                       if h.ready(t, cx.settings.heartbeat_timeout_seconds)))
