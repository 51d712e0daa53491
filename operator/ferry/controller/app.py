"""The ferry operator: kopf configuration, shared state and the program entry point.

Handlers live with the resource they serve (``ferry.controller.droplets``,
``ferry.controller.hosts``, ``ferry.controller.migrations``); each reads the operator's
view of the world, calls a pure decision function and writes the result through
``ferry.storage``. This module wires them together.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from typing import Any

import kopf

from ferry.api import constants as c
from ferry.controller.metrics import Metrics
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
class Context:
    """Everything handlers share, kept in kopf's memo."""

    settings: Settings
    kube: Kube
    world: World
    metrics: Metrics
    lock: asyncio.Lock  # serialises decisions that read and update the world's overlay
    object_locks: dict[Any, asyncio.Lock]

    def object_lock(self, key: Any) -> asyncio.Lock:
        lock = self.object_locks.get(key)
        if lock is None:
            lock = self.object_locks[key] = asyncio.Lock()
        return lock

    async def call(self, fn, *args, **kwargs):
        """Run a (blocking) storage call off the event loop."""
        return await asyncio.to_thread(fn, *args, **kwargs)


def ctx(memo: kopf.Memo) -> Context:
    return memo["ferry"]


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    cfg = Settings.from_env()
    settings.persistence.finalizer = c.FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="ferry.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="ferry.dev", key="last-handled-configuration")
    settings.posting.enabled = False  # ferry posts its own, meaningful Events
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.execution.max_workers = 8
    settings.batching.worker_limit = 200
    kube = Kube.connect()
    metrics = Metrics()
    if (port := _metrics_port(cfg)) > 0:
        metrics.serve(port)
        logger.info("metrics on :%d/metrics", port)
    world = World()
    # Load the whole world before any handler decides: after a restart, a migration must never
    # be judged against a world that has not seen its droplet or its hosts yet.
    namespace = os.environ.get("FERRY_OPERATOR_NAMESPACE") or cfg.namespace or None
    for kind in ("Host", "Droplet", "LiveMigration"):
        items = await asyncio.to_thread(kube.list, kind, None if kind == "Host" else namespace)
        for body in items:
            body.setdefault("kind", kind)
            world.observe(kind, None, body)
    memo["ferry"] = Context(settings=cfg, kube=kube, world=world, metrics=metrics, lock=asyncio.Lock(),
                            object_locks={})
    logger.info("ferry operator starting: %s", cfg)


def _metrics_port(cfg: Settings) -> int:
    override = os.environ.get("FERRY_OPERATOR_METRICS_PORT_OVERRIDE")
    return int(override) if override else cfg.metrics_port


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    return kopf.login_via_pykube(**kwargs)


@kopf.on.probe(id="world")
def probe_world(memo: kopf.Memo, **_: Any) -> dict[str, int]:
    w = ctx(memo).world
    return {"hosts": len(w.hosts), "droplets": len(w.droplets), "migrations": len(w.migrations)}


def run(*, kubeconfig: str | None, namespace: str | None, standalone: bool, peering_name: str,
        liveness: str | None, metrics_port: int | None, priority: int = 0) -> None:
    """Block running the operator until SIGTERM/SIGINT."""
    if kubeconfig:
        os.environ["KUBECONFIG"] = kubeconfig
    if metrics_port is not None:
        os.environ["FERRY_OPERATOR_METRICS_PORT_OVERRIDE"] = str(metrics_port)
    if namespace:
        os.environ["FERRY_OPERATOR_NAMESPACE"] = namespace
    Settings.from_env()  # fail fast, in one line, on bad settings
    # Importing the handler modules registers them with kopf.
    from ferry.controller import droplets, hosts, migrations  # noqa: F401

    kopf.configure(verbose=False)  # kopf's handler on the root logger, replacing click's basicConfig one
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if type(h).__name__ == "_KopfStreamHandler"]
    logging.getLogger("kopf").setLevel(logging.WARNING)  # per-handler "succeeded" lines are noise
    kopf.run(
        standalone=standalone,
        peering_name=None if standalone else peering_name,
        clusterwide=not namespace,
        namespaces=[namespace] if namespace else (),
        liveness_endpoint=liveness,
        priority=priority,
    )
