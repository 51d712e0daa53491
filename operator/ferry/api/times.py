"""RFC 3339 timestamps as Kubernetes writes them."""

from __future__ import annotations

import datetime as dt
from typing import Any

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def utc(t: dt.datetime) -> dt.datetime:
    """``t`` in UTC; a naive datetime is a bug (ferry only handles timezone-aware times)."""
    if t.tzinfo is None:
        raise ValueError(f"naive datetime {t!r}: ferry only takes timezone-aware times")
    return t.astimezone(dt.timezone.utc)


def fmt(t: dt.datetime | None, fraction: bool = False) -> str | None:
    if t is None:
        return None
    t = t.astimezone(dt.timezone.utc)
    if fraction:
        return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def fmt_api(t: dt.datetime | None) -> str | None:
    """As status fields keep times: with a fraction only when there is one (round-trips)."""
    if t is None:
        return None
    return fmt(t, fraction=bool(t.microsecond))


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


def parse_any(value: Any) -> dt.datetime | None:
    """A time from a body (string) or from code (aware datetime); empty or malformed -> None."""
    if value is None or value == "":
        return None
    if isinstance(value, dt.datetime):
        return utc(value)
    try:
        return parse(str(value))
    except ValueError:
        return None
