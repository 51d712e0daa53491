"""The agent's loop: observe (``observe.py``), ``plan()`` (``plan.py``), execute (``execute.py``),
heartbeat.

One loop thread does everything that changes anything; the watch threads only fill tables
and wake it. A cycle runs at once on a watch event, every ``POLL_SECONDS`` while a
migration is in flight here (to report progress), and every ``RESYNC_SECONDS`` otherwise.
A VM whose migration is under way also has a waiter thread (``VMWaiters``) blocked in the
driver's ``wait_migration``: when the copy finishes (source Completed, target Received) the
loop wakes at once, so the reports that let the record move go out within milliseconds of
the pause rather than at the next poll (the guest is paused until the record moves).
Actions of a droplet whose stats could not be read are dropped for that cycle. The
heartbeat (Host.status.agent) goes out every ``FERRY_HEARTBEAT_SECONDS`` and whenever the
VM list changed. Nothing here is needed after a restart: the driver and the API hold all
state.
"""

from __future__ import annotations

import datetime as dt
import logging
import queue
import threading
import time
from collections.abc import Callable

from ferry import __version__
from ferry.agent import plan as p
from ferry.agent.execute import Executor, Heartbeat, Warnings
from ferry.agent.metrics import AgentMetrics
from ferry.agent.observe import Observer
from ferry.api.times import now as utcnow
from ferry.drivers.base import MIGRATION_SETTLED, Driver, VMKey
from ferry.drivers.network import Fabric
from ferry.settings import Settings
from ferry.storage import Kube
from ferry.api.meta import ObjectKey

log = logging.getLogger("ferry.agent")

POLL_SECONDS = 0.25
RESYNC_SECONDS = 5.0
WAIT_SECONDS = 10.0  # a waiter's longest wait_migration call
#: how long the loop gathers wake tokens after the first one (a burst of watch events is one cycle)
GATHER_SECONDS = 0.005


class VMWaiters:
    """One thread per VM with a migration under way, blocked in ``driver.wait_migration``
    until the migration ends; then it wakes the loop and ends (the next cycle arms a new one if
    the migration is still under way, e.g. after the wait's timeout). A wait that returns at
    once (the VM cannot be asked) is not repeated before ``POLL_SECONDS``. Only the end wakes
    the loop: a wake-up at every step (Converging, Paused) would write a report while the
    guest is paused, in the way of the ones the record flip waits for."""

    def __init__(self, driver: Driver, wake: Callable[[], None], stop: threading.Event,
                 clock: Callable[[], float] = time.monotonic):
        self.driver, self.wake, self.stop, self.clock = driver, wake, stop, clock
        self._threads: dict[VMKey, threading.Thread] = {}
        self._quick: dict[VMKey, float] = {}  # when a wait came back at once

    def arm(self, vms: dict[VMKey, p.VMObs]) -> None:
        now = self.clock()
        for key, vm in vms.items():
            st = vm.stats
            if st is None or st.state in MIGRATION_SETTLED or not vm.migration_id:
                continue
            t = self._threads.get(key)
            if t is not None and t.is_alive():
                continue
            quick = self._quick.get(key)
            if quick is not None and now - quick < POLL_SECONDS:
                continue
            t = threading.Thread(target=self._wait, args=(key,), name=f"wait {key}", daemon=True)
            self._threads[key] = t
            t.start()
        for key in [k for k, t in self._threads.items() if not t.is_alive() and k not in vms]:
            self._threads.pop(key, None)
            self._quick.pop(key, None)

    def _wait(self, key: VMKey) -> None:
        began = self.clock()
        try:
            self.driver.wait_migration(key, WAIT_SECONDS)
        except Exception:  # noqa: BLE001 - a waiter only speeds the loop up; the poll still runs
            log.debug("waiting on the migration of %s failed", key, exc_info=True)
        ended = self.clock()
        if ended - began < 0.05:
            self._quick[key] = ended
        else:
            self._quick.pop(key, None)
        if not self.stop.is_set():
            self.wake()


class Agent:
    def __init__(self, host: str, driver: Driver, kube: Kube, settings: Settings, *, address: str = "127.0.0.1",
                 connect: Callable[[], Kube] | None = None, version: str = __version__,
                 now: Callable[[], dt.datetime] = utcnow, clock: Callable[[], float] = time.monotonic,
                 fabric: Fabric | None = None):
        self.ctx = p.HostContext(host, address, settings.downtime_budget_ms, settings.report_interval_seconds)
        self.driver = driver
        self.connect = connect or (lambda: kube)
        self.namespace = settings.namespace or None
        self.now = now
        self.clock = clock
        self.wake: queue.Queue[tuple[str, ObjectKey] | None] = queue.Queue()
        warn = Warnings(host, kube, clock)
        self.observer = Observer(host, driver, kube, warn=warn, clock=clock)
        self.executor = Executor(self.ctx, driver, kube, self.observer, warn, wake=lambda: self.wake.put(None),
                                 now=now, clock=clock, fabric=fabric)
        self.heartbeats = Heartbeat(self.ctx, driver, kube, settings, warn, version=version, now=now, clock=clock)
        self.metrics = AgentMetrics(host)
        self.cycles = 0
        self.last_vms: dict[VMKey, p.VMObs] = {}

    @property
    def host(self) -> str:
        return self.ctx.name

    def cycle(self) -> bool:
        """Observe, plan, execute; returns whether a migration is in flight here."""
        self.cycles += 1
        snap = self.observer.observe()
        if snap is None:
            return False
        self.executor.sync_addresses(snap)
        actions = [a for a in p.plan(self.ctx, snap.droplets, snap.migrations, snap.vms, self.now())
                   if a.key not in snap.uncertain]
        if self.executor.execute(actions, snap):
            self.heartbeats.due = True
        self.observer.remember_settled(snap, actions)
        self.heartbeats.note_vms([vm.info for vm in snap.vms.values()])
        self.metrics.refresh(snap.vms, snap.migrations)
        self.last_vms = snap.vms
        return p.busy(snap.vms, snap.migrations, self.host)

    def heartbeat(self) -> bool:
        return self.heartbeats.beat()

    def run(self, stop: threading.Event) -> None:
        """Until ``stop`` is set (and ``wake`` gets a token to notice at once)."""
        self.observer.start_watches(self.connect, self.namespace, stop, lambda kind, key: self.wake.put((kind, key)))
        waiters = VMWaiters(self.driver, lambda: self.wake.put(None), stop, self.clock)
        next_heartbeat = 0.0
        in_flight = False
        announced = False
        while not stop.is_set():
            if self.clock() >= next_heartbeat:
                self.heartbeat()
                next_heartbeat = self.clock() + self.heartbeats.period
            if self.observer.synced():
                if not announced:
                    log.info("agent of host %s in sync: %d droplets, %d migrations here", self.host,
                             len(self.observer.droplets), len(self.observer.migrations_table()))
                    announced = True
                try:
                    in_flight = self.cycle()
                except Exception:  # noqa: BLE001 - a bug must not stop heartbeats; logged with traceback
                    log.exception("agent cycle failed; retrying")
                    in_flight = False
                waiters.arm(self.last_vms)
                if self.heartbeats.due:
                    self.heartbeat()
                    next_heartbeat = self.clock() + self.heartbeats.period
            timeout = POLL_SECONDS if in_flight or not self.observer.synced() else RESYNC_SECONDS
            self._wait(min(timeout, max(0.0, next_heartbeat - self.clock())), stop)

    def _wait(self, timeout: float, stop: threading.Event) -> None:
        """Until a wake token or ``timeout``; a burst of tokens is one wake-up. A token
        naming an object drops its cached GET."""
        try:
            item = self.wake.get(timeout=timeout)
        except queue.Empty:
            return
        items = [item]
        deadline = self.clock() + GATHER_SECONDS
        while not stop.is_set():
            try:
                items.append(self.wake.get(timeout=max(0.0, deadline - self.clock())))
            except queue.Empty:
                break
        for it in items:
            if it is not None:
                self.observer.forget(*it)
