"""Every kopf handler of the operator, each a one-line delegation.

Watch events feed the world first and reconcile what they touch. There are no kopf timers:
one ferry-owned sweep (``sweep.py``, started at startup, stopped at cleanup) looks again at
whatever is due from the world: a migration waiting for its turn within 1 s, one whose
attempt runs by its next deadline (within 5 s), a finished one (its retention) within 5 s, a
host within 2 s, a droplet within 30 s. Each reconciler reads the
world, calls a pure decision and writes the result (``*_reconciler``).
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from ferry.controller import app, droplet_reconciler, host_reconciler, migration_reconciler, node_reconciler, sweep
from ferry.controller.app import RESOURCES, ctx

HOST, DROPLET, LM = RESOURCES["Host"], RESOURCES["Droplet"], RESOURCES["LiveMigration"]


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    await app.start(settings, memo, logger)
    sweep.start(memo, ctx(memo))


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    await sweep.stop(memo)


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


@kopf.on.delete(*LM)
async def migration_deleted(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    await migration_reconciler.on_delete(ctx(memo), dict(body), logger)


@kopf.on.event(*DROPLET)
async def droplet_event(type: str | None, body: kopf.Body, memo: kopf.Memo, logger: logging.Logger,
                        **_: Any) -> None:
    await droplet_reconciler.on_event(ctx(memo), type, dict(body), logger)


@kopf.on.event(*HOST)
async def host_event(type: str | None, body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    for droplet in await host_reconciler.on_event(ctx(memo), type, dict(body), logger):
        await droplet_reconciler.reconcile_droplet(ctx(memo), droplet, logger)  # its guest restarted


#: Does nothing but run: kopf stops every daemon of a replica it pauses (a standby of a
#: peering) and spawns them again when it resumes; the sweep looks only while one runs.
@kopf.daemon(*HOST, cancellation_timeout=5.0)
async def host_anchor(name: str, stopped: Any, memo: kopf.Memo, **_: Any) -> None:
    await sweep.anchor(ctx(memo), name, stopped)


@kopf.on.event("", "v1", "nodes")
async def node_event(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    await node_reconciler.on_node(ctx(memo), dict(body), logger)
