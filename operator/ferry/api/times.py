"""RFC 3339 timestamps as Kubernetes writes them."""

from __future__ import annotations

import datetime as dt


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def fmt(t: dt.datetime | None, fraction: bool = False) -> str | None:
    if t is None:
        return None
    t = t.astimezone(dt.timezone.utc)
    if fraction:
        return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    v = value.strip()
    if v.endswith("Z"):
        v = v[:-1] + "+00:00"
    t = dt.datetime.fromisoformat(v)
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return t
