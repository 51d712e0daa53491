"""Object metadata and the error every parser raises."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping
from typing import Any

from ferry.api.times import parse_any


#: How every ferry component keys an object: (namespace, or "" for a cluster-scoped one; name).
ObjectKey = tuple[str, str]


class InvalidSpec(ValueError):
    """A resource cannot be used as it is; the message names the field."""


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
            created=parse_any(m.get("creationTimestamp")), deleting=bool(m.get("deletionTimestamp")),
            finalizers=tuple(m.get("finalizers") or ()),
        )


class Named:
    """``name``, ``namespace`` and ``key`` of a parsed object (every view has a ``meta``)."""

    meta: Meta

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def namespace(self) -> str:
        return self.meta.namespace or ""

    @property
    def key(self) -> ObjectKey:
        return (self.namespace, self.name)
