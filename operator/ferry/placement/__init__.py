"""Placement: filter and score hosts for a droplet, and explain the decision. PURE.

Used both to place new droplets (``DropletRequest.source_host`` None) and to pick migration
targets (``source_host`` set; ``target_host`` for an explicit ``spec.targetHost``)::

    from ferry.placement import DropletRequest, HostInfo, Reservation, place
    result = place(request, hosts, reservations, strategy="spread")
    result.chosen, result.message, result.to_status()

Imports nothing from kopf, pykube or the network.
"""

from ferry.api.sizes import Resources
from ferry.placement.model import (
    FILTER_PHRASES,
    FILTERS,
    STRATEGIES,
    Candidate,
    DropletRequest,
    HostInfo,
    PlacementResult,
    Reservation,
)
from ferry.placement.scorer import (
    DEFAULT_MIGRATION_PENALTY,
    DEFAULT_WEIGHTS,
    HostVerdict,
    check_host,
    place,
    reserved_by_host,
)

__all__ = [
    "DEFAULT_MIGRATION_PENALTY",
    "DEFAULT_WEIGHTS",
    "FILTERS",
    "FILTER_PHRASES",
    "STRATEGIES",
    "Candidate",
    "DropletRequest",
    "HostInfo",
    "HostVerdict",
    "PlacementResult",
    "Reservation",
    "Resources",
    "check_host",
    "place",
    "reserved_by_host",
]
