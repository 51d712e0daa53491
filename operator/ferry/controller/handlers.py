"""Every kopf handler of the operator, each a one-line delegation.

Watch events feed the world first; a one-second (migrations), two-second (hosts) and
thirty-second (droplets) timer catches drift; a five-second timer on finished migrations
applies the retention. Each reconciler reads the world, calls a pure
decision and writes the result (``*_reconciler``).
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from ferry.api.livemigration import MigrationStatus
from ferry.api.phases import TERMINAL
from ferry.controller import app, droplet_reconciler, host_reconciler, migration_reconciler, node_reconciler
from ferry.controller.app import RESOURCES, ctx

HOST, DROPLET, LM = RESOURCES["Host"], RESOURCES["Droplet"], RESOURCES["LiveMigration"]


def _not_terminal(status: dict, **_: Any) -> bool:
    return MigrationStatus.from_dict(status).phase not in TERMINAL


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    await app.start(settings, memo, logger)


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    return kopf.login_via_pykube(**kwargs)


@kopf.on.probe(id="world")
def probe_world(memo: kopf.Memo, **_: Any) -> dict[str, int]:
    return app.world_summary(ctx(memo))


@kopf.on.event(*LM)
async def migration_event(type: str | None, body: kopf.Body, memo: kopf.Memo, logger: logging.Logger,
                          **_: Any) -> None:
    await migration_reconciler.on_event(ctx(memo), type, dict(body), logger)


@kopf.timer(*LM, interval=1.0, initial_delay=1.0, when=_not_terminal)
async def migration_timer(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    await migration_reconciler.reconcile(ctx(memo), (body.metadata.namespace, body.metadata.name), logger)


def _terminal(status: dict, **_: Any) -> bool:
    return not _not_terminal(status)


@kopf.timer(*LM, interval=5.0, initial_delay=5.0, when=_terminal)
async def migration_retention(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    await migration_reconciler.expire(ctx(memo), (body.metadata.namespace, body.metadata.name), logger)


@kopf.on.delete(*LM)
async def migration_deleted(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    await migration_reconciler.on_delete(ctx(memo), dict(body), logger)


@kopf.on.event(*DROPLET)
async def droplet_event(type: str | None, body: kopf.Body, memo: kopf.Memo, logger: logging.Logger,
                        **_: Any) -> None:
    await droplet_reconciler.on_event(ctx(memo), type, dict(body), logger)


#: A droplet's phase follows its migrations' transitions and its host's phase at once (the
#: migration and host reconcilers call it); this timer only catches drift. At 5 s it was 200
#: kopf timer runs a second for 1,000 droplets.
@kopf.timer(*DROPLET, interval=30.0, initial_delay=2.0)
async def droplet_timer(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    await droplet_reconciler.reconcile_droplet(ctx(memo), (body.metadata.namespace, body.metadata.name), logger)


@kopf.on.event(*HOST)
async def host_event(type: str | None, body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    for droplet in await host_reconciler.on_event(ctx(memo), type, dict(body), logger):
        await droplet_reconciler.reconcile_droplet(ctx(memo), droplet, logger)  # its guest restarted


@kopf.timer(*HOST, interval=2.0, initial_delay=3.0)
async def host_timer(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    for droplet in await host_reconciler.reconcile_host(ctx(memo), body.metadata.name, logger):
        await droplet_reconciler.reconcile_droplet(ctx(memo), droplet, logger)  # HostLost, or back


@kopf.on.event("", "v1", "nodes")
async def node_event(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    await node_reconciler.on_node(ctx(memo), dict(body), logger)
