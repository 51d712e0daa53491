"""JSON merge patches (RFC 7386): how every status write is computed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch that turns ``old`` into ``new``: changed keys with their new value,
    removed keys with None, nested objects diffed recursively, lists whole."""
    out: dict[str, Any] = {}
    for key in old.keys() | new.keys():
        if key not in new:
            out[key] = None
        elif key not in old:
            out[key] = new[key]
        else:
            a, b = old[key], new[key]
            if isinstance(a, Mapping) and isinstance(b, Mapping):
                sub = merge_patch(a, b)
                if sub:
                    out[key] = sub
            elif a != b:
                out[key] = b
    return out
