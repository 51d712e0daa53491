"""Host reconciler: readiness from heartbeats, allocation, cordon and evacuation
(the decisions are ``ferry.hosts.status``)."""

from __future__ import annotations

import logging
import time

from ferry.api.meta import ObjectKey
from ferry.api.phases import HostPhase
from ferry.api.times import now
from ferry.controller import effects
from ferry.controller.app import Context, ensure_current
from ferry.hosts.status import counts_only, evacuation_plan, evacuation_withdrawals, host_status, status_changed
from ferry.storage import Conflict, NotFound

log = logging.getLogger("ferry.operator")

#: A host's status that changed only in its counts (allocated, droplets, the evacuation's
#: counts and the Evacuated condition's message that restates them: ``hosts.status.counts_only``)
#: is written at most this often (the host's sweep interval); phase, conditions and a new
#: maintenance window at once. Decisions read the world, not these counts: they are the UI, and
#: a drain would otherwise rewrite a host after every step of each of its migrations (each
#: migration changes its two hosts' counts three times: the reservation, the record flip on
#: both sides). A change held back is written by the sweep's next look at the host.
COUNTS_MIN_INTERVAL_SECONDS = 2.0


def _held_back(cx: Context, name: str, current: dict, desired: dict) -> bool:
    """Does this change wait for a later look (counts alone, the last write too recent)?"""
    return counts_only(current, desired) and \
        time.monotonic() - cx.host_written.get(name, -1e9) < COUNTS_MIN_INTERVAL_SECONDS


async def on_event(cx: Context, event_type: str | None, body: dict, logger: logging.Logger) -> list[ObjectKey]:
    """Returns the droplets whose VM restarts the host now reports differently (their
    ``GuestRestarted`` condition is due), or all of its droplets when it was deleted."""
    name = body["metadata"]["name"]
    before = cx.world.hosts.get(name)
    cx.world.observe("Host", event_type, body)
    after = cx.world.hosts.get(name)
    # React at once to spec changes (maintenance on/off); heartbeats are the sweep's (every 2 s).
    if after is not None and (before is None or before.meta.generation != after.meta.generation):
        await reconcile_host(cx, name, logger)
    if after is None:  # deleted: its droplets are HostMissing now
        return [d.key for d in cx.world.droplets_on(name)]
    was = before.agent.restarts if before is not None else {}
    return [k for k, v in after.agent.restarts.items() if was.get(k) != v]


async def reconcile_host(cx: Context, name: str, logger: logging.Logger) -> list[ObjectKey]:
    """Returns the host's droplets when its phase changed (ready or not: their own phase
    follows it, HostLost or back), for the caller to reconcile."""
    await ensure_current(cx)
    cx.reconciled_at = time.monotonic()
    started = time.monotonic()
    cx.looked("Host", name)  # the sweep's next look at it: one interval from now
    async with cx.object_lock(("Host", name)):
        world = cx.world
        host = world.hosts.get(name)
        if host is None:
            return []
        moved: list[ObjectKey] = []
        t = now()
        allocated = world.allocated_on(name)
        for r in world.reservations():
            if r.host == name:
                allocated = allocated + r.resources
        # Its own share of the fleet (the world's indexes): its droplets, their migrations, its
        # evacuations and the unfinished migrations off it. What the decisions below read of
        # the others is nothing.
        droplets = world.droplets_on(name)
        migrations = {m.key: m for m in world.evacuations_of(name)}
        migrations.update((m.key, m) for m in world.leaving_from(name))
        for d in droplets:
            migrations.update((m.key, m) for m in world.migrations_of(d.key))
        migrations = list(migrations.values())
        desired = host_status(host, droplets, migrations, allocated, t, cx.settings.heartbeat_timeout_seconds)
        # A change held back is written by the sweep's next look (one interval from this one, so
        # never sooner than the interval after the last write): no look of its own.
        if status_changed(host.status, desired) and not _held_back(cx, name, host.status, desired):
            if host.status.get("phase") != desired["phase"]:
                moved = [d.key for d in droplets]
                _wake_migrations(cx, name, migrations)
                log.info("host %s: %s -> %s", name, host.status.get("phase"), desired["phase"])
                not_ready = desired["phase"] == HostPhase.NOT_READY
                await effects.post_event(cx, effects.ref("Host", name, None, host.meta.uid),
                                         "Warning" if not_ready else "Normal", f"Host{desired['phase']}",
                                         desired["conditions"][0]["message"] if not_ready
                                         else f"host is {desired['phase']}")
            new = await cx.call(cx.kube.patch_status, "Host", name, desired)
            cx.host_written[name] = started  # the next look (one interval on) may write again
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
        return moved


def _wake_migrations(cx: Context, name: str, migrations: list) -> None:
    """The host's phase changed (Ready, NotReady): the unfinished migrations from it and to it
    decide on its readiness; the sweep looks at them on its next tick, not at their next
    deadline."""
    for m in migrations:
        if not m.terminal:
            cx.wake("LiveMigration", m.key)
    for m in cx.world.in_flight():
        if m.status.target_host == name:
            cx.wake("LiveMigration", m.key)
