"""PURE: a Droplet's operator-owned status (placement outcome and phase), from the
operator's view of the world."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable
from typing import Any

from ferry.api.conditions import set_condition
from ferry.api.times import fmt_api, parse_any
from ferry.api.livemigration import LiveMigration
from ferry.api.models import Droplet, Host
from ferry.api.phases import DropletPhase, Phase
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


#: the reasons the record flip writes with a droplet's phase Migrating (controller.effects.flip_record)
FLIP_REASONS = frozenset({"RecordMoved", "RecordReturned"})


def droplet_state(d: Droplet, host: Host | None, migrations: Iterable[LiveMigration], now: dt.datetime,
                  heartbeat_timeout: float) -> DropletState:
    """The phase of a placed droplet: where it runs, whether that host lives, whether it moves."""
    if host is None:
        return DropletState(DropletPhase.HOST_LOST, "HostMissing", f"host {d.host} does not exist")
    if not host.ready(now, heartbeat_timeout):
        return DropletState(DropletPhase.HOST_LOST, "HostNotReady",
                            f"host {d.host} is not ready (no agent heartbeat); the droplet cannot be "
                            "live-migrated until its host is back")
    moving = next((m for m in migrations if m.in_flight and not completed_by_record(d, m)), None)
    if moving is not None:
        if d.phase == DropletPhase.MIGRATING and d.status.get("reason") in FLIP_REASONS:
            # the record flip's own words ("record moved from a to b"), written with the record:
            # as true as ours, and replacing them cost one more write per migration
            return DropletState(DropletPhase.MIGRATING, d.status["reason"], d.status.get("message") or "")
        return DropletState(DropletPhase.MIGRATING, "LiveMigration", f"being live-migrated by {moving.name}")
    return DropletState(DropletPhase.PLACED, "Placed", f"running on {d.host}")


def completed_by_record(d: Droplet, m: LiveMigration) -> bool:
    """Has ``m`` completed, by the droplet's ``lastMigration``, whatever its own status still says?

    The completion writes the droplet's lastMigration with its phase Placed (``completion_status``)
    just before the migration's status Completed: a look in between (the droplet's own watch
    event) must not write Migrating back. The name alone is not enough (a new migration may
    reuse a finished one's): it must also be in CutOver, the one phase a completion comes from,
    since no later than that completion."""
    last = d.status.get("lastMigration")
    if not isinstance(last, dict) or last.get("name") != m.name or m.phase != Phase.CUTOVER:
        return False
    completed, cut = parse_any(last.get("completedAt")), m.status.phase_times.get(Phase.CUTOVER)
    return completed is not None and cut is not None and completed >= cut.replace(microsecond=0)


def state_changed(d: Droplet, state: DropletState) -> bool:
    return (d.phase, d.status.get("reason"), d.status.get("message")) != (state.phase, state.reason, state.message)


def completion_status(d: Droplet, host: Host | None, migrations: Iterable[LiveMigration], finished: str,
                      last_migration: dict[str, Any], now: dt.datetime, heartbeat_timeout: float) -> dict[str, Any]:
    """The droplet's status patch when migration ``finished`` (its name) completes: its
    ``lastMigration`` and, in the same write, the phase it has once that migration is over
    (``droplet_state`` without it: Placed on its new host, as a rule), which the droplet
    reconciler would otherwise write as a second patch right after."""
    state = droplet_state(d, host, [m for m in migrations if m.name != finished], now, heartbeat_timeout)
    patch: dict[str, Any] = {"lastMigration": last_migration}
    if state_changed(d, state):
        patch.update(phase=state.phase, reason=state.reason, message=state.message,
                     observedGeneration=d.meta.generation)
    return patch


ADDRESS_CONFLICT = "AddressConflict"


@dataclasses.dataclass(frozen=True)
class AddressVerdict:
    """Whether ``d`` owns its ``spec.ip``: ``conflict`` says it does not, ``owner`` says who does."""

    conflict: bool
    reason: str
    message: str
    owner: str | None = None  # namespace/name of the droplet that owns the address


def address_verdict(d: Droplet, claimants: Iterable[Droplet]) -> AddressVerdict:
    """``d`` against every droplet claiming the same address (``claimants`` may include ``d``).

    The oldest claim owns the address (``ferry.api.addresses``); the metadata endpoint answers
    for it only, so any other claimant would never see its maintenance events."""
    addr = d.address
    if addr is None:
        return AddressVerdict(False, "NoAddress", "spec.ip is not set")
    owner = min((o for o in claimants if o.address == addr and not o.meta.deleting),
                key=lambda o: o.claim_order, default=d)
    if owner.claim_order < d.claim_order:
        who = f"{owner.namespace}/{owner.name}"
        return AddressVerdict(True, "AddressInUse",
                              f"spec.ip {addr} is already droplet {who}'s (the older claim): the metadata "
                              f"endpoint answers {addr} for {who} only, so this droplet does not see its "
                              "maintenance events; give it an address of its own", who)
    return AddressVerdict(False, "AddressUnique", f"no older droplet claims {addr}")


def address_condition(d: Droplet, verdict: AddressVerdict, now: dt.datetime) -> list[dict[str, Any]] | None:
    """The droplet's conditions with ``AddressConflict`` set, or None when nothing changes.
    A droplet that never conflicted gets no condition at all (no write for the common case)."""
    current = d.condition(ADDRESS_CONFLICT)
    if current is None and not verdict.conflict:
        return None
    want = "True" if verdict.conflict else "False"
    if current is not None and (current.status, current.reason, current.message) == (want, verdict.reason, verdict.message):
        return None
    return [c.to_dict() for c in set_condition(d.conditions, ADDRESS_CONFLICT, verdict.conflict, verdict.reason,
                                               verdict.message, now)]


GUEST_RESTARTED = "GuestRestarted"


def restart_condition(d: Droplet, host: Host | None, now: dt.datetime) -> list[dict[str, Any]] | None:
    """``GuestRestarted`` from what the droplet's host reports: True once its VM process died
    and was started again (a reboot the owner must know of), with the count and the time.
    None when nothing changes; a droplet whose guest never restarted gets no condition."""
    if host is None or d.namespace is None or d.name is None:
        return None
    seen = host.agent.restarts.get((d.namespace, d.name))
    if seen is None:
        return None  # nothing (more) to say: a condition already set stays as the record of it
    count, at = seen
    when = f" at {fmt_api(at)}" if at else ""
    message = (f"the droplet's VM process died on host {d.host} and was started again{when}: the guest rebooted "
               f"({count} time{'s' if count != 1 else ''} on this host)")
    current = d.condition(GUEST_RESTARTED)
    if current is not None and current.status == "True" and current.message == message:
        return None
    conds = set_condition(d.conditions, GUEST_RESTARTED, True, "VMProcessDied", message, at or now)
    if current is not None and current.status == "True":  # a new restart: the transition time moves too
        conds = tuple(c if c.type != GUEST_RESTARTED else dataclasses.replace(c, last_transition_time=at or now)
                      for c in conds)
    return [c.to_dict() for c in conds]
