"""Node reconciler: a cordoned host node puts its Host into maintenance, an uncordon ends it
(the decision is ``ferry.hosts.cordon``)."""

from __future__ import annotations

import logging

from ferry.controller.app import Context
from ferry.hosts.cordon import cordon_patch
from ferry.storage import Conflict, NotFound

log = logging.getLogger("ferry.operator")


async def on_node(cx: Context, body: dict, logger: logging.Logger) -> None:
    name = body.get("metadata", {}).get("name")
    host = cx.world.hosts.get(name) if name else None
    if host is None:
        return  # not a host node
    unschedulable = bool((body.get("spec") or {}).get("unschedulable"))
    seen = {"maintenance": {"reason": host.maintenance_reason}} if host.in_maintenance else {}
    if cordon_patch(unschedulable, seen) is None:
        return  # most node events are kubelet heartbeats: no read unless the world's view differs
    try:
        current = await cx.call(cx.kube.get, "Host", name)
    except NotFound:
        return
    patch = cordon_patch(unschedulable, current.get("spec") or {})
    if patch is None:
        return
    try:
        new = await cx.call(cx.kube.patch, "Host", name, patch,
                            resource_version=current["metadata"]["resourceVersion"])
    except (NotFound, Conflict):
        return  # changed meanwhile: the next node event or resync looks again
    cx.world.observe("Host", "MODIFIED", new)
    log.info("host %s: node %s -> maintenance %s", name, "cordoned" if unschedulable else "uncordoned",
             "set" if unschedulable else "ended")
