"""PURE: a Droplet's operator-owned status (placement outcome and phase), from the
operator's view of the world."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable
from typing import Any

from ferry.api.conditions import set_condition
from ferry.api.livemigration import LiveMigration
from ferry.api.models import Droplet, Host
from ferry.api.phases import DropletPhase
from ferry.placement.model import PlacementResult


@dataclasses.dataclass(frozen=True)
class DropletState:
    phase: DropletPhase
    reason: str
    message: str


def placement_status(d: Droplet, result: PlacementResult, now: dt.datetime) -> dict[str, Any]:
    """The status written when a new droplet is placed (``result.chosen``) or fits nowhere."""
    placed = result.chosen is not None
    message = f"placed on {result.chosen}" if placed else result.message
    reason = "Placed" if placed else "NoHostFits"
    conds = set_condition(d.conditions, "Placed", placed, reason, message, now)
    status: dict[str, Any] = {"phase": DropletPhase.PLACED if placed else DropletPhase.UNSCHEDULABLE,
                              "reason": reason, "message": message, "placement": result.to_status(),
                              "observedGeneration": d.meta.generation,
                              "conditions": [c.to_dict() for c in conds]}
    if placed:
        status["host"] = result.chosen
    return status


def droplet_state(d: Droplet, host: Host | None, migrations: Iterable[LiveMigration], now: dt.datetime,
                  heartbeat_timeout: float) -> DropletState:
    """The phase of a placed droplet: where it runs, whether that host lives, whether it moves."""
    if host is None:
        return DropletState(DropletPhase.HOST_LOST, "HostMissing", f"host {d.host} does not exist")
    if not host.ready(now, heartbeat_timeout):
        return DropletState(DropletPhase.HOST_LOST, "HostNotReady",
                            f"host {d.host} is not ready (no agent heartbeat); the droplet cannot be "
                            "live-migrated until its host is back")
    moving = next((m for m in migrations if m.in_flight), None)
    if moving is not None:
        return DropletState(DropletPhase.MIGRATING, "LiveMigration", f"being live-migrated by {moving.name}")
    return DropletState(DropletPhase.PLACED, "Placed", f"running on {d.host}")


def state_changed(d: Droplet, state: DropletState) -> bool:
    return (d.phase, d.status.get("reason"), d.status.get("message")) != (state.phase, state.reason, state.message)
