"""Kubernetes conditions: one shape, one way to set one."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Any

from ferry.api.times import fmt_api, parse_any


@dataclasses.dataclass(frozen=True)
class Condition:
    """A condition in the standard shape. ``status`` is "True" | "False" | "Unknown"."""

    type: str
    status: str
    reason: str = ""
    message: str = ""
    last_transition_time: dt.datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "status": self.status}
        if self.reason:
            out["reason"] = self.reason
        if self.message:
            out["message"] = self.message
        if self.last_transition_time is not None:
            out["lastTransitionTime"] = fmt_api(self.last_transition_time)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Condition:
        return cls(str(d.get("type", "")), str(d.get("status", "Unknown")), d.get("reason") or "",
                   d.get("message") or "", parse_any(d.get("lastTransitionTime")))


def parse_conditions(items: Iterable[Mapping[str, Any]] | None) -> tuple[Condition, ...]:
    return tuple(Condition.from_dict(c) for c in items or () if isinstance(c, Mapping) and c.get("type"))


def find(conditions: Iterable[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)


def set_condition(conditions: Iterable[Condition], type_: str, status: bool, reason: str, message: str,
                  now: dt.datetime) -> tuple[Condition, ...]:
    """``conditions`` with ``type_`` set; its lastTransitionTime moves only when its status does."""
    value = "True" if status else "False"
    out = list(conditions)
    for i, c in enumerate(out):
        if c.type == type_:
            since = c.last_transition_time if c.status == value else now
            out[i] = Condition(type_, value, reason, message, since)
            return tuple(out)
    out.append(Condition(type_, value, reason, message, now))
    return tuple(out)
