"""A node's cordon as its Host's maintenance (PURE).

``kubectl cordon``/``drain`` mark a node ``spec.unschedulable``. A host node that takes no new
pods should take no new droplets and give its droplets away the way ferry does: by live
migration. So a cordon of the node named like a Host puts that Host into maintenance (the
operator then evacuates it; its launcher pods, which a PodDisruptionBudget keeps from being
evicted, leave as their droplets migrate, and `kubectl drain` completes). An uncordon ends that
maintenance, and only that one: a maintenance a user set with ``ferry drain`` (another reason)
is theirs to end.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

CORDON_REASON = "node cordoned"


def cordon_patch(node_unschedulable: bool, host_spec: Mapping[str, Any]) -> dict[str, Any] | None:
    """The merge patch of the Host's spec that follows its node's cordon, or None."""
    maintenance = host_spec.get("maintenance") or None
    if node_unschedulable and maintenance is None:
        return {"spec": {"maintenance": {"reason": CORDON_REASON, "start": None}}}
    if not node_unschedulable and maintenance is not None and maintenance.get("reason") == CORDON_REASON:
        return {"spec": {"maintenance": None}}
    return None
