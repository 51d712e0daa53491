"""Typed views of the three kinds, parsed once at the boundary.

Handlers and agents never dig through raw dicts: they call ``Host.from_body`` /
``Droplet.from_body`` / ``Migration.from_body`` and work with these frozen views. A spec
that cannot be parsed raises ``InvalidSpec`` with a message naming the field.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping
from typing import Any

from ferry.api import constants as c
from ferry.api.sizes import Resources, resources_for
from ferry.api.times import parse


class InvalidSpec(ValueError):
    """A resource's spec cannot be used; the message names the field."""


ZERO = Resources(0, 0, 0)


def _resources(d: Any, where: str) -> Resources:
    try:
        return Resources.from_dict(d, what=where)
    except ValueError as exc:
        raise InvalidSpec(str(exc)) from None


@dataclasses.dataclass(frozen=True)
class Meta:
    name: str
    namespace: str | None
    uid: str
    resource_version: str
    generation: int
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    created: dt.datetime | None
    deleting: bool
    finalizers: tuple[str, ...] = ()

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Meta:
        m = body.get("metadata", {})
        return cls(
            name=m.get("name", ""), namespace=m.get("namespace"), uid=m.get("uid", ""),
            resource_version=m.get("resourceVersion", ""), generation=int(m.get("generation") or 0),
            labels=dict(m.get("labels") or {}), annotations=dict(m.get("annotations") or {}),
            created=parse(m.get("creationTimestamp")), deleting=bool(m.get("deletionTimestamp")),
            finalizers=tuple(m.get("finalizers") or ()),
        )


@dataclasses.dataclass(frozen=True)
class AgentReport:
    address: str | None
    heartbeat: dt.datetime | None
    driver: str | None
    vms: tuple[tuple[str, str, str], ...]  # (namespace, name, state)


@dataclasses.dataclass(frozen=True)
class Host:
    meta: Meta
    datacenter: str
    capacity: Resources
    schedulable: bool
    maintenance_reason: str | None
    maintenance_start: dt.datetime | None
    agent: AgentReport
    status: Mapping[str, Any]

    @property
    def name(self) -> str:
        return self.meta.name

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
            ),
            status=status,
        )


@dataclasses.dataclass(frozen=True)
class Workload:
    pattern: str = "uniform"
    write_rate_kibps: int = 0


@dataclasses.dataclass(frozen=True)
class Droplet:
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

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def namespace(self) -> str:
        return self.meta.namespace or ""

    @property
    def announced(self) -> bool:
        return self.meta.annotations.get(c.MAINTENANCE_ANNOTATION) == c.MAINTENANCE_EVENT

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
        )


@dataclasses.dataclass(frozen=True)
class TransferReport:
    """status.transfer, written by the source agent."""

    attempt: int
    state: str | None
    digest: str | None
    error: str | None
    progress: int
    bytes_sent: int
    bytes_total: int
    downtime_ms: int | None
    updated: dt.datetime | None
    raw: Mapping[str, Any]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> TransferReport:
        d = d or {}
        return cls(int(d.get("attempt") or 0), d.get("state"), d.get("digest"), d.get("error"),
                   int(d.get("progress") or 0), int(d.get("bytesSent") or 0), int(d.get("bytesTotal") or 0),
                   d.get("downtimeMs"), parse(d.get("updatedAt")), d)


@dataclasses.dataclass(frozen=True)
class TargetReport:
    """status.target, written by the target agent."""

    attempt: int
    state: str | None
    address: str | None
    digest: str | None
    error: str | None
    updated: dt.datetime | None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> TargetReport:
        d = d or {}
        return cls(int(d.get("attempt") or 0), d.get("state"), d.get("address"), d.get("digest"),
                   d.get("error"), parse(d.get("updatedAt")))


@dataclasses.dataclass(frozen=True)
class Migration:
    meta: Meta
    droplet: str
    target_host: str | None
    scheduled_at: dt.datetime | None
    mode: str
    bandwidth_mibps: int | None
    max_attempts: int | None
    downtime_ms: int | None
    cancel: bool
    raw_spec: Mapping[str, Any]
    # status
    phase: str | None
    attempt: int
    source_host: str | None
    status_target_host: str | None
    transfer: TransferReport
    target: TargetReport
    status: Mapping[str, Any]

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def namespace(self) -> str:
        return self.meta.namespace or ""

    @property
    def active(self) -> bool:
        return self.phase in c.ACTIVE_PHASES

    @property
    def terminal(self) -> bool:
        return self.phase in c.TERMINAL_PHASES

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Migration:
        spec = body.get("spec") or {}
        status = body.get("status") or {}
        limits = spec.get("limits") or {}
        if not spec.get("droplet"):
            raise InvalidSpec("spec.droplet: required")
        return cls(
            meta=Meta.from_body(body),
            droplet=spec["droplet"],
            target_host=spec.get("targetHost") or None,
            scheduled_at=parse(spec.get("scheduledAt")),
            mode=spec.get("mode", "live"),
            bandwidth_mibps=limits.get("bandwidthMiBps"),
            max_attempts=limits.get("maxAttempts"),
            downtime_ms=limits.get("downtimeMs"),
            cancel=bool(spec.get("cancel")),
            raw_spec=spec,
            phase=status.get("phase"),
            attempt=int(status.get("attempt") or 0),
            source_host=status.get("sourceHost"),
            status_target_host=status.get("targetHost"),
            transfer=TransferReport.from_dict(status.get("transfer")),
            target=TargetReport.from_dict(status.get("target")),
            status=status,
        )
