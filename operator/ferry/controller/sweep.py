"""The operator's one periodic sweep: what kopf's per-object timers did, from the world.

Each kind is looked at again within its interval even when no watch event comes (drift and
time: a deadline, a heartbeat gone stale, a slot that freed): a migration waiting for its turn
every second (before, the 1 s timer), one whose attempt runs by its decision's next deadline
and within 5 s (``schedule.migration_delay``; its hosts' and droplet's reconcilers wake it
when those change), a finished one every 5 s (the retention's TTL), a host every 2 s
(heartbeat staleness, counts, the evacuation plan), a droplet every 30 s (its slow drift
check). A look made for a watch event counts: the sweep looks only at what is due
(``schedule.Schedule``), never twice at once.

Before, each of these was a kopf timer: an asyncio task per object with kopf's handler
machinery around every run (its filters, its settings and logging contexts, the progress
bookkeeping), about 40% of the operator's CPU at 300 migrations at once (py-spy). Here one
task ticks and a few workers look; the reconcilers are the same functions the timers called.

Only the active replica sweeps. kopf pauses a standby of a peering (it stops watching, and
stops its daemons); the sweep runs while kopf runs one daemon per Host (``anchor``), or always
when the operator is standalone (never paused). When it starts again (a standby that took
over) every object is new to it: looked at after the kinds' first delays, as kopf's timers
after their ``initial_delay``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ferry.controller import droplet_reconciler, host_reconciler, migration_reconciler
from ferry.controller.app import Context

log = logging.getLogger("ferry.operator")

#: how often the sweep asks what is due (a look is at most this late)
TICK_SECONDS = 0.2
#: looks made at once; their API calls share asyncio's executor with the handlers'
WORKERS = 16


def start(memo: Any, cx: Context) -> None:
    """Start the sweep (the startup handler: after the world is loaded)."""
    memo["ferry_sweep_task"] = asyncio.create_task(Sweep(cx).run(), name="ferry-sweep")


async def stop(memo: Any) -> None:
    """Stop it (the cleanup handler): a look under way is cancelled as kopf cancels a timer."""
    task = memo.get("ferry_sweep_task")
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def anchor(cx: Context, host: str, stopped: Any) -> None:
    """A kopf daemon per Host, doing nothing but exist: kopf stops them when it pauses this
    replica (a standby of a peering) and spawns them again when it resumes. While one runs the
    replica is active."""
    cx.anchors.add(host)
    try:
        await stopped.wait()
    finally:
        cx.anchors.discard(host)


class Sweep:
    def __init__(self, cx: Context) -> None:
        self.cx = cx
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.pending: set[tuple[str, Any]] = set()
        self.was_active = False
        self.looks = 0

    async def run(self) -> None:
        workers = [asyncio.create_task(self._worker(), name=f"ferry-sweep-{i}") for i in range(WORKERS)]
        try:
            while True:
                await asyncio.sleep(TICK_SECONDS)  # a period, not a wait for a condition
                try:
                    self.tick(time.monotonic())
                except Exception:  # noqa: BLE001 - the sweep must never stop; logged with traceback
                    log.exception("the sweep failed to work out what is due")
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    def tick(self, t: float) -> None:
        cx = self.cx
        if not cx.active():
            if self.was_active:
                log.info("the sweep pauses: this replica is not active")
                for s in cx.schedules.values():
                    s.reset()
            self.was_active = False
            return
        if not self.was_active:
            log.info("the sweep runs: this replica is active")
            for s in cx.schedules.values():
                s.reset()  # every object is new to it: looked at after the first delays
            self.was_active = True
        w, sc = cx.world, cx.schedules
        running = (k for k, m in w.migrations.items() if not m.terminal)
        finished = (k for k, m in w.migrations.items() if m.terminal)
        for kind, keys in (("Host", w.hosts.keys()), ("LiveMigration", running), ("Finished", finished),
                           ("Droplet", w.droplets.keys())):
            for key in sc[kind].due(keys, t):
                item = (kind, key)
                if item not in self.pending:  # still queued or being looked at: not twice
                    self.pending.add(item)
                    self.queue.put_nowait(item)

    async def _worker(self) -> None:
        while True:
            item = await self.queue.get()
            try:
                if self.cx.active():
                    await self.look(*item)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - as kopf's timers: logged, and looked at again next interval
                log.exception("sweep: looking at %s %s failed", *item)
            finally:
                self.pending.discard(item)
                self.queue.task_done()  # queue.join(): every look queued so far is done

    async def look(self, kind: str, key: Any) -> None:
        cx = self.cx
        self.looks += 1
        if kind == "LiveMigration":
            # through the module: what wraps the reconcile (the benchmark's timing) sees it
            await migration_reconciler.reconcile(cx, key, log)
        elif kind == "Finished":
            await migration_reconciler.expire(cx, key, log)
            cx.looked("Finished", key)
        elif kind == "Droplet":
            await droplet_reconciler.reconcile_droplet(cx, key, log)
        elif kind == "Host":
            for droplet in await host_reconciler.reconcile_host(cx, key, log):
                await droplet_reconciler.reconcile_droplet(cx, droplet, log)  # HostLost, or back
