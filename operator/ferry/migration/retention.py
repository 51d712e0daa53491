"""PURE: which finished LiveMigrations to delete, so they do not pile up.

Two rules, both settings: a finished migration is deleted ``ttl_seconds`` after it finished
(like a Job's ``ttlSecondsAfterFinished``; 0 keeps them forever), and of a droplet's
finished migrations only the newest ``keep_per_droplet`` are kept (0: no limit). What a
droplet needs to remember outlives them: its ``status.lastMigration``. Never deleted:
migrations still running, and the ones the caller protects (the evacuations of a host's
open maintenance window, which stand for "tried in this window, do not retry").
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable

from ferry.api.livemigration import LiveMigration


def finished_at(m: LiveMigration) -> dt.datetime | None:
    """When a terminal migration reached its terminal phase (None: not terminal)."""
    if not m.terminal or m.phase is None:
        return None
    return m.status.phase_times.get(m.phase) or max(m.status.phase_times.values(), default=None) or m.meta.created


def expired(migrations: Iterable[LiveMigration], now: dt.datetime, ttl_seconds: float, keep_per_droplet: int,
            protected: Callable[[LiveMigration], bool] = lambda m: False) -> list[LiveMigration]:
    """The finished migrations to delete now, oldest first."""
    by_droplet: dict[tuple[str, str], list[tuple[dt.datetime, LiveMigration]]] = {}
    for m in migrations:
        t = finished_at(m)
        if t is not None:
            by_droplet.setdefault((m.namespace, m.droplet), []).append((t, m))
    out: list[tuple[dt.datetime, LiveMigration]] = []
    for finished in by_droplet.values():
        finished.sort(key=lambda x: (x[0], x[1].name), reverse=True)  # newest first
        for i, (t, m) in enumerate(finished):
            too_many = keep_per_droplet > 0 and i >= keep_per_droplet
            too_old = ttl_seconds > 0 and (now - t).total_seconds() >= ttl_seconds
            if (too_many or too_old) and not protected(m):
                out.append((t, m))
    return [m for _, m in sorted(out, key=lambda x: (x[0], x[1].name))]
