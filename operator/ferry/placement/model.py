"""Plain data for placement: what the scorer reads and what it answers.

Everything here is a frozen, slotted dataclass over built-in types, so the operator can
build them from its caches and tests can build thousands of them cheaply.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ferry.api.models import Platform
from ferry.api.sizes import Resources

__all__ = [
    "FILTERS",
    "FILTER_PHRASES",
    "STRATEGIES",
    "Candidate",
    "DropletRequest",
    "HostInfo",
    "PlacementResult",
    "Reservation",
]

#: The filters, in the fixed order they run. A host is rejected by the FIRST one it fails,
#: and counted under that name in ``PlacementResult.rejected``.
#:
#: ``datacenter``  host in another datacenter than the droplet
#: ``ready``       host NotReady (stale agent heartbeat)
#: ``schedulable`` host cordoned (``spec.schedulable: false``)
#: ``maintenance`` host in maintenance (being evacuated)
#: ``source``      the droplet's current host (migrations only)
#: ``hostSelector`` host labels do not carry every ``hostSelector.matchLabels`` pair
#: ``compatible`` host cannot run the guest as it runs now (driver, hypervisor version, CPU
#:                 flags, qemu cores; see :func:`incompatibility`)
#: ``cpu`` / ``memory`` / ``disk``  not enough free after allocations AND reservations
#: ``inbound``     host already receives ``inbound_limit`` migrations (only when a limit is
#:                 given); last, so a host rejected here would otherwise fit: worth waiting for.
FILTERS: tuple[str, ...] = (
    "datacenter",
    "ready",
    "schedulable",
    "maintenance",
    "source",
    "hostSelector",
    "compatible",
    "cpu",
    "memory",
    "disk",
    "inbound",
)

#: How ``PlacementResult.message`` words a count of hosts rejected by each filter.
FILTER_PHRASES: dict[str, str] = {
    "datacenter": "wrong datacenter",
    "ready": "not ready",
    "schedulable": "not schedulable",
    "maintenance": "in maintenance",
    "source": "source host",
    "hostSelector": "not matching hostSelector",
    "compatible": "incompatible",
    "cpu": "insufficient cpu",
    "memory": "insufficient memory",
    "disk": "insufficient disk",
    "inbound": "at inbound migration limit",
}

STRATEGIES = ("spread", "pack")


@dataclasses.dataclass(frozen=True, slots=True)
class HostInfo:
    """One host as placement sees it.

    ``allocated`` is what the droplets whose placement record names this host use;
    reservations of migrations in flight towards it are passed separately
    (:class:`Reservation`). ``migrations_in_flight`` counts active migrations from or to the
    host (scored as a penalty); ``inbound_migrations`` counts those towards it (checked
    against ``inbound_limit`` when one is given). ``labels`` are the Host's metadata labels.
    """

    name: str
    datacenter: str
    capacity: Resources
    allocated: Resources = Resources(0, 0, 0)
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    ready: bool = True
    schedulable: bool = True
    in_maintenance: bool = False
    migrations_in_flight: int = 0
    inbound_migrations: int = 0
    platform: Platform | None = None  # None: the agent reports none (every guest fits)


@dataclasses.dataclass(frozen=True, slots=True)
class Reservation:
    """Capacity held on ``host`` by a migration in flight whose target is that host.

    ``droplet`` (the same key as :attr:`DropletRequest.name`) lets ``place`` ignore the
    reservation of the very droplet being placed, e.g. when a migration picks a new target
    after a failed attempt while its old target is still recorded.
    """

    host: str
    resources: Resources
    droplet: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class DropletRequest:
    """What to place: a droplet's size, datacenter and constraints.

    ``name`` identifies the droplet (``namespace/name`` recommended). ``source_host`` is the
    host it runs on when picking a migration target (excluded by the ``source`` filter), or
    None for a new droplet. ``host_selector`` is ``spec.hostSelector.matchLabels``. Every
    dimension of ``resources`` must be at least 1.
    """

    name: str
    datacenter: str
    resources: Resources
    host_selector: Mapping[str, str] = dataclasses.field(default_factory=dict)
    source_host: str | None = None
    platform: Platform | None = None  # where the guest runs now (its source host's), for migrations

    def __post_init__(self) -> None:
        r = self.resources
        if r.cpu < 1 or r.memory_mib < 1 or r.disk_gib < 1:
            raise ValueError(f"droplet {self.name}: every resource must be at least 1, got {r}")


@dataclasses.dataclass(frozen=True, slots=True)
class Candidate:
    """A host that passed every filter, with its score (0..100 scale, higher is better).

    ``cpu``/``memory``/``disk`` are per-dimension scores: for ``spread`` the percentage of the
    host left free after placing the droplet, for ``pack`` the percentage used.
    ``score`` is their weighted mean minus ``penalty`` (per migration in flight on the host).
    """

    host: str
    score: float
    cpu: float
    memory: float
    disk: float
    penalty: float

    def to_status(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "score": round(self.score, 2),
            "cpu": round(self.cpu, 2),
            "memory": round(self.memory, 2),
            "disk": round(self.disk, 2),
            "penalty": round(self.penalty, 2),
        }


@dataclasses.dataclass(frozen=True, slots=True)
class PlacementResult:
    """The answer of ``place``: the chosen host (or None) and why.

    ``candidates`` are the best hosts, best first (at most ``top``; when an explicit target is
    chosen but not among them it is appended). ``rejected`` maps every filter name in
    :data:`FILTERS` order to how many hosts it rejected (zeros included, so a merge patch of
    ``to_status()`` always overwrites the previous counts). ``considered`` is how many hosts
    were looked at. ``reason`` is ``Placed`` | ``NoHostFits`` | ``TargetHostRejected``.
    For an explicit target, ``target_host`` names it and ``target_rejected_by`` is the filter
    that rejected it (``notFound`` if no such host), else None.
    """

    chosen: str | None
    strategy: str
    candidates: tuple[Candidate, ...]
    rejected: dict[str, int]
    considered: int
    message: str
    reason: str
    target_host: str | None = None
    target_rejected_by: str | None = None
    avoided: Mapping[str, str] = dataclasses.field(default_factory=dict)  # host -> why (retries)
    incompatible: Mapping[str, str] = dataclasses.field(default_factory=dict)  # host -> why not

    @property
    def feasible(self) -> int:
        """How many hosts passed every filter."""
        return self.considered - sum(self.rejected.values())

    def to_status(self) -> dict[str, Any]:
        """The ``status.placement`` object of docs/architecture.md (plus ``message``)."""
        return {
            "chosen": self.chosen,
            "strategy": self.strategy,
            "candidates": [c.to_status() for c in self.candidates],
            "rejected": dict(self.rejected),
            "considered": self.considered,
            "message": self.message,
            "avoided": dict(self.avoided),
            "incompatible": dict(self.incompatible),
        }


def _version(v: str) -> tuple[int, ...] | None:
    parts = []
    for x in v.split("."):
        digits = "".join(ch for ch in x if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts) or None


def incompatibility(guest: Platform | None, vcpus: int, host: Platform | None) -> str | None:
    """Why ``host`` cannot run a guest of ``vcpus`` that runs on ``guest`` now (None: it can).

    Unknown facts never reject: a host whose agent reports no platform fits every guest.
    """
    if host is None:
        return None
    if host.driver == "qemu" and host.cores is not None and vcpus > host.cores:
        return f"{host.cores} cores, the guest has {vcpus} vCPUs (qemu caps vCPUs at the host's cores)"
    if guest is None:
        return None
    if guest.driver and host.driver and guest.driver != host.driver:
        return f"driver {host.driver}, the guest runs under {guest.driver}"
    if guest.hypervisor_version and host.hypervisor_version:
        g, h = _version(guest.hypervisor_version), _version(host.hypervisor_version)
        if g and h and h < g:
            return (f"hypervisor {host.hypervisor_version} is older than the source's {guest.hypervisor_version} "
                    "(a migration stream only goes to the same or a newer version)")
    missing = guest.cpu_flags - host.cpu_flags
    if missing and host.cpu_flags:
        shown = ", ".join(sorted(missing)[:5]) + (", ..." if len(missing) > 5 else "")
        return f"CPU lacks {len(missing)} flag(s) the guest uses: {shown}"
    if not guest.cpu_flags and not host.cpu_flags and guest.cpu_model and host.cpu_model \
            and guest.cpu_model != host.cpu_model:
        return f"CPU model {host.cpu_model}, the guest runs on {guest.cpu_model}"
    return None
