"""Typed views of Host and Droplet, parsed once at the boundary (LiveMigration:
``ferry.api.livemigration``).

Handlers, agents, the CLI and the metadata endpoint never dig through raw dicts: they call
``Host.from_body`` / ``Droplet.from_body`` and work with these frozen views. A spec that
cannot be parsed raises ``InvalidSpec`` with a message naming the field.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping
from typing import Any

from ferry.api import constants as c
from ferry.api.addresses import claim_order, normalize_ip
from ferry.api.conditions import Condition, find, parse_conditions
from ferry.api.meta import InvalidSpec, Meta, Named
from ferry.api.sizes import Resources, resources_for
from ferry.api.times import EPOCH, fmt, parse, parse_any


ZERO = Resources(0, 0, 0)


def _resources(d: Any, where: str) -> Resources:
    try:
        return Resources.from_dict(d, what=where)
    except ValueError as exc:
        raise InvalidSpec(str(exc)) from None


@dataclasses.dataclass(frozen=True)
class Platform:
    """What a host offers a guest, as its agent reports it (``status.agent.platform``) and as
    placement compares it: a guest runs on a target only under the same driver, a hypervisor
    at least as new, a CPU with every flag it uses and (qemu) enough cores for its vCPUs."""

    driver: str | None = None
    hypervisor_version: str | None = None
    cpu_model: str | None = None
    cpu_flags: frozenset[str] = frozenset()
    cores: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"hypervisorVersion": self.hypervisor_version, "cpuModel": self.cpu_model,
                "cpuFlags": sorted(self.cpu_flags), "cores": self.cores}

    @classmethod
    def from_agent(cls, agent: Mapping[str, Any]) -> Platform | None:
        raw = agent.get("platform")
        if not isinstance(raw, Mapping):
            return None
        flags = raw.get("cpuFlags")
        cores = raw.get("cores")
        model = raw.get("cpuModel")
        version = raw.get("hypervisorVersion")
        return cls(
            driver=agent.get("driver") if isinstance(agent.get("driver"), str) else None,
            hypervisor_version=version if isinstance(version, str) and version else None,
            cpu_model=model if isinstance(model, str) and model else None,
            cpu_flags=frozenset(f for f in flags if isinstance(f, str)) if isinstance(flags, list) else frozenset(),
            cores=cores if isinstance(cores, int) and not isinstance(cores, bool) and cores > 0 else None,
        )


@dataclasses.dataclass(frozen=True)
class AgentReport:
    address: str | None
    heartbeat: dt.datetime | None
    driver: str | None
    vms: tuple[tuple[str, str, str], ...]  # (namespace, name, state)
    platform: Platform | None = None
    #: (namespace, name) -> (crash restarts, time of the last) of the VMs that rebooted after
    #: their process died (``vms[].restarts`` / ``restartedAt``)
    restarts: Mapping[tuple[str, str], tuple[int, dt.datetime | None]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Host(Named):
    meta: Meta
    datacenter: str
    capacity: Resources
    schedulable: bool
    maintenance_reason: str | None
    maintenance_start: dt.datetime | None
    agent: AgentReport
    status: Mapping[str, Any]

    @property
    def in_maintenance(self) -> bool:
        return self.maintenance_reason is not None

    def ready(self, now: dt.datetime, timeout_seconds: float) -> bool:
        hb = self.agent.heartbeat
        return hb is not None and (now - hb).total_seconds() <= timeout_seconds

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Host:
        spec = body.get("spec") or {}
        status = body.get("status") or {}
        agent = status.get("agent") or {}
        maint = spec.get("maintenance")
        return cls(
            meta=Meta.from_body(body),
            datacenter=spec.get("datacenter", ""),
            capacity=_resources(spec.get("capacity"), "spec.capacity"),
            schedulable=bool(spec.get("schedulable", True)),
            maintenance_reason=(maint.get("reason") or "maintenance") if maint else None,
            maintenance_start=parse(maint.get("start")) if maint else None,
            agent=AgentReport(
                address=agent.get("address"), heartbeat=parse(agent.get("heartbeatTime")),
                driver=agent.get("driver"),
                vms=tuple((v.get("namespace", ""), v.get("name", ""), v.get("state", ""))
                          for v in agent.get("vms") or []),
                platform=Platform.from_agent(agent),
                restarts={(v.get("namespace", ""), v.get("name", "")): (v["restarts"], parse_any(v.get("restartedAt")))
                          for v in agent.get("vms") or []
                          if isinstance(v.get("restarts"), int) and not isinstance(v["restarts"], bool)
                          and v["restarts"] > 0},
            ),
            status=status,
        )


@dataclasses.dataclass(frozen=True)
class Workload:
    pattern: str = "uniform"
    write_rate_kibps: int = 0


@dataclasses.dataclass(frozen=True)
class Droplet(Named):
    meta: Meta
    size: str | None
    resources: Resources
    datacenter: str
    power_on: bool
    ip: str | None
    nested_virtualization: bool
    host_selector: Mapping[str, str]
    workload: Workload
    host: str | None  # the placement record (status.host)
    phase: str | None
    status: Mapping[str, Any]
    conditions: tuple[Condition, ...] = ()

    def condition(self, type_: str) -> Condition | None:
        return find(self.conditions, type_)

    @property
    def address(self) -> str | None:
        """``spec.ip`` in its normal form (``ferry.api.addresses``); None when absent or invalid."""
        return normalize_ip(self.ip)

    @property
    def claim_order(self) -> tuple[str, str, str]:
        """Who owns an address two droplets claim: the smallest of these (the oldest)."""
        return claim_order(fmt(self.meta.created) or "", self.namespace, self.name)

    @property
    def announced(self) -> bool:
        return self.meta.annotations.get(c.MAINTENANCE_ANNOTATION) == c.MAINTENANCE_EVENT

    @property
    def maintenance_since(self) -> dt.datetime | None:
        """Since when the droplet has been told (its ``-since`` annotation; the epoch when
        that is missing or malformed), None when no maintenance event is announced."""
        if not self.announced:
            return None
        return parse_any(self.meta.annotations.get(c.MAINTENANCE_SINCE_ANNOTATION)) or EPOCH

    @property
    def maintenance_not_before(self) -> dt.datetime | None:
        if not self.announced:
            return None
        return parse_any(self.meta.annotations.get(c.MAINTENANCE_NOT_BEFORE_ANNOTATION))

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Droplet:
        spec = body.get("spec") or {}
        status = body.get("status") or {}
        try:
            r = resources_for(spec.get("size"), spec.get("resources"))
        except ValueError as exc:
            raise InvalidSpec(f"spec.size/spec.resources: {exc}") from None
        wl = spec.get("workload") or {}
        return cls(
            meta=Meta.from_body(body),
            size=spec.get("size"),
            resources=r,
            datacenter=spec.get("datacenter", ""),
            power_on=spec.get("powerState", "on") != "off",
            ip=spec.get("ip"),
            nested_virtualization=bool((spec.get("features") or {}).get("nestedVirtualization")),
            host_selector=dict((spec.get("hostSelector") or {}).get("matchLabels") or {}),
            workload=Workload(wl.get("pattern", "uniform"), int(wl.get("writeRateKiBps") or 0)),
            host=status.get("host") or None,
            phase=status.get("phase"),
            status=status,
            conditions=parse_conditions(status.get("conditions")),
        )
