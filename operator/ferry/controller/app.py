"""The operator's shared state (kept in kopf's memo) and its startup: settings, API client,
metrics, and the world loaded whole before any handler decides."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import logging
import time
from typing import Any, cast

import kopf

from ferry.api import constants as c
from ferry.api.phases import QUEUED
from ferry.api.times import now
from ferry.controller.events import POSTERS as EVENT_POSTERS, EventRecorder
from ferry.controller.metrics import Metrics
from ferry.controller.schedule import Schedule, spread
from ferry.controller.world import World
from ferry.settings import Settings
from ferry.storage import Kube

log = logging.getLogger("ferry.operator")

RESOURCES = {
    "Host": (c.GROUP, c.VERSION, "hosts"),
    "Droplet": (c.GROUP, c.VERSION, "droplets"),
    "LiveMigration": (c.GROUP, c.VERSION, "livemigrations"),
}


@dataclasses.dataclass
class SlotVerdicts:
    """The slot gate's verdicts for every queued migration, as of ``version`` (see
    ``migration_reconciler.admission``)."""

    version: Any = None
    verdicts: dict[str, Any] = dataclasses.field(default_factory=dict)
    valid_until: Any = None  # the next notBefore still ahead: then queued() changes
    computed: int = 0


#: A migration whose attempt runs is looked at again at its next deadline and at least this
#: often (``schedule.migration_delay``); one waiting for its turn every second.
MIGRATION_DRIFT_SECONDS = 5.0


def sweep_schedules() -> dict[str, Schedule]:
    """The sweep's intervals and first delays (``controller/sweep.py``), as kopf's timers had
    them, but for migrations whose attempt runs: a migration waiting for its turn is looked at
    again within a second, one whose attempt runs at its next deadline and within 5 s (its
    agents' reports are watch events; its hosts and droplet wake it), a finished one (its
    retention) within 5 s, a host (heartbeats) within 2 s, a droplet (drift) within 30 s. A new
    droplet's first look is spread over its interval: a fleet seen at once is not due at once."""
    return {"LiveMigration": Schedule(MIGRATION_DRIFT_SECONDS, first=1.0), "Finished": Schedule(5.0, first=5.0),
            "Host": Schedule(2.0, first=3.0), "Droplet": Schedule(30.0, first=spread(2.0, 30.0))}


@dataclasses.dataclass
class Context:
    """Everything handlers share."""

    settings: Settings
    kube: Kube
    world: World
    metrics: Metrics
    lock: asyncio.Lock  # serialises decisions that read and update the world's expectations
    object_locks: dict[Any, asyncio.Lock]
    #: monotonic time of the last reconcile: only the active replica of a peering reconciles, and
    #: a standby's world is frozen at its start, so a standby must not serve the fleet's gauges
    reconciled_at: float = 0.0
    reloading: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    slot_verdicts: SlotVerdicts = dataclasses.field(default_factory=SlotVerdicts)
    #: Events queued and correlated as Kubernetes' recorder does; None: posted at once
    events: EventRecorder | None = None
    #: monotonic time of each host's last status write (counts are written at most once a second)
    host_written: dict[str, float] = dataclasses.field(default_factory=dict)
    gauges_at: float = -1e9  # monotonic time the migration gauges were last counted
    #: when each object is next due for the sweep's look (``controller/sweep.py``)
    schedules: dict[str, Schedule] = dataclasses.field(default_factory=sweep_schedules)
    #: kopf never pauses a standalone operator; in a peering, the Hosts whose kopf daemon runs
    #: (kopf stops them all while this replica is a standby)
    standalone: bool = True
    anchors: set[str] = dataclasses.field(default_factory=set)

    def active(self) -> bool:
        """Does this replica reconcile? (The sweep looks only then.)"""
        return self.standalone or bool(self.anchors)

    def looked(self, kind: str, key: Any, delay: float | None = None) -> None:
        """``key`` was just reconciled: the sweep's next look at it is one interval (or
        ``delay``) away."""
        self.schedules[kind].looked(key, time.monotonic(), delay)

    def wake(self, kind: str, key: Any) -> None:
        """Something ``key``'s decision reads changed: the sweep looks at it on its next tick."""
        self.schedules[kind].wake(key, time.monotonic())

    def object_lock(self, key: Any) -> asyncio.Lock:
        lock = self.object_locks.get(key)
        if lock is None:
            lock = self.object_locks[key] = asyncio.Lock()
        return lock

    async def call(self, fn, *args, **kwargs):
        """Run a (blocking) storage call off the event loop."""
        return await asyncio.to_thread(fn, *args, **kwargs)


class NoDiffBase(kopf.DiffBaseStorage):
    """kopf's diff-base (the "last handled" essence of an object) kept nowhere.

    kopf reads it only to tell creations and updates apart for ``on.create``/``on.update``/
    ``on.resume`` handlers, and ferry has none: it reconciles every object from the world on
    every event. Stored in an annotation (as it was), it cost a write of every LiveMigration
    whenever its labels or annotations changed (2.7 writes per migration in bench_fleet, each
    bumping the resourceVersion that guards the operator's status writes: conflicts). Here the
    last-handled essence is always the current one: kopf sees no change (its ``NOOP`` cause),
    writes nothing, and still adds the finalizer and runs the ``on.delete`` handler, which
    depend on the finalizer and the deletion timestamp, not on this diff.

    The essence itself is empty: kopf's own ``build`` deep-copies the whole object (status
    included) for each of the two sides it compares, and its progress storage copies each again,
    four copies per watch event to find out that nothing changed (about a tenth of the
    operator's CPU in bench_fleet's profile). ferry registers no field handlers; were one added,
    its fields would be kept (kopf's own essence then)."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        if extra_fields:
            return super().build(body=body, extra_fields=extra_fields)
        return cast(kopf.BodyEssence, {})

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return self.build(body=body)

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


def ctx(memo: kopf.Memo) -> Context:
    return memo["ferry"]


async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger) -> None:
    """Configure kopf and build the Context. Settings: ``memo["settings"]`` (put there by
    ``ferry.controller.main.run``), else the environment (e.g. under ``KopfRunner``)."""
    cfg: Settings = memo.get("settings") or Settings.from_env()
    settings.persistence.finalizer = c.FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="ferry.dev")
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.posting.enabled = False  # ferry posts its own, meaningful Events
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.execution.max_workers = 8
    # No cap on kopf's per-object workers (its default). A worker lives while its object's
    # events keep coming (and 5 s more), and every migration under way writes its status every
    # few seconds: with a cap (it was 200), the first 200 objects kept their workers and a
    # thousand migrations created at once waited minutes without a phase. A worker is one
    # asyncio task; their API calls queue for asyncio's default executor (Context.call).
    settings.queueing.worker_limit = None
    # A deleted Host's finalizer goes once kopf sees its daemon (``sweep.anchor``) exited,
    # polling every this many seconds (default 60).
    settings.background.cancellation_polling = 1.0
    kube = Kube.connect()
    metrics = Metrics()
    if cfg.metrics_port > 0:
        metrics.serve(cfg.metrics_port, log)
    world = World()
    cx = memo["ferry"] = Context(settings=cfg, kube=kube, world=world, metrics=metrics, lock=asyncio.Lock(),
                                 object_locks={}, standalone=bool(settings.peering.standalone))
    # Load the whole world before any handler decides: after a restart, a migration must never
    # be judged against a world that has not seen its droplet or its hosts yet.
    await load_world(cx)
    cx.reconciled_at = time.monotonic()
    # The Events' own threads: posting them never waits for, nor holds up, the decisions' calls
    # (asyncio's default executor has min(32, cores + 4) threads for every other API call).
    pool = concurrent.futures.ThreadPoolExecutor(EVENT_POSTERS, thread_name_prefix="ferry-events")
    loop = asyncio.get_running_loop()
    cx.events = EventRecorder(kube, lambda fn, *args: loop.run_in_executor(pool, functools.partial(fn, *args)),
                              posters=EVENT_POSTERS)
    memo["ferry_events_task"] = asyncio.create_task(cx.events.run(), name="ferry-events")
    if cfg.metrics_port > 0:
        refresh_metrics(cx)
        memo["ferry_metrics_task"] = asyncio.create_task(_refresh_metrics_forever(cx), name="ferry-metrics")
    logger.info("ferry operator starting: %s", cfg)


async def load_world(cx: Context) -> None:
    """List every kind and make the world exactly that (objects deleted meanwhile dropped)."""
    for kind in ("Host", "Droplet", "LiveMigration"):
        items = await asyncio.to_thread(cx.kube.list, kind, None if kind == "Host" else (cx.settings.namespace or None))
        for body in items:
            body.setdefault("kind", kind)
        cx.world.resync(kind, items)


async def ensure_current(cx: Context) -> None:
    """Before deciding: a replica that reconciled nothing for ACTIVE_SECONDS was a standby (its
    world is as old as its start, and kopf's re-list after the takeover never reports what was
    deleted meanwhile) or idle: list the world again first. The active replica never pays."""
    if time.monotonic() - cx.reconciled_at <= ACTIVE_SECONDS:
        return
    async with cx.reloading:
        if time.monotonic() - cx.reconciled_at <= ACTIVE_SECONDS:
            return  # another handler reloaded it while this one waited
        log.info("reconciling again after %.0fs without: listing the world afresh",
                 time.monotonic() - cx.reconciled_at)
        await load_world(cx)
        cx.reconciled_at = time.monotonic()


METRICS_REFRESH_SECONDS = 1.0


def refresh_metrics(cx: Context) -> None:
    """The fleet's gauges from the world as it is now (in the loop: the world is not shared)."""
    w = cx.world
    cx.metrics.refresh(w.hosts.values(), w.migrations.values(), now(), cx.settings.heartbeat_timeout_seconds)
    # also kept by the migration events, at most twice a second: here the last change is never missed
    cx.metrics.queued.set(sum(1 for m in w.migrations.values() if m.phase in (None, *QUEUED)))
    cx.metrics.in_flight.set(sum(1 for m in w.migrations.values() if m.in_flight))


#: A replica that reconciled nothing for this long serves no fleet gauges (it is a standby;
#: the active one's sweep reconciles every host every 2 s and every migration under way every 1 s).
ACTIVE_SECONDS = 10.0


async def _refresh_metrics_forever(cx: Context) -> None:
    while True:
        await asyncio.sleep(METRICS_REFRESH_SECONDS)  # a period, not a wait for a condition
        try:
            if time.monotonic() - cx.reconciled_at <= ACTIVE_SECONDS:
                refresh_metrics(cx)
            else:
                cx.metrics.refresh((), (), now(), cx.settings.heartbeat_timeout_seconds)
        except Exception:  # noqa: BLE001 - metrics must never stop the operator; logged with traceback
            log.exception("refreshing the metrics failed")


def world_summary(cx: Context) -> dict[str, int]:
    w = cx.world
    return {"hosts": len(w.hosts), "droplets": len(w.droplets), "migrations": len(w.migrations)}
