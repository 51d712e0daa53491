"""When each object is next due for a look by the operator's sweep (``controller/sweep.py``).

Pure: no clock, no I/O, no asyncio. Times are the caller's monotonic seconds. One
``Schedule`` per kind of look (migrations under way, finished migrations, droplets, hosts),
each with its interval: an object is due ``interval`` seconds after its last look, whoever
made it (a reconcile for a watch event counts: a kopf timer would have looked again anyway).
An object the schedule has not seen yet is due after its ``first`` delay (kopf's
``initial_delay``). ``due`` is told every object that exists, so an object deleted meanwhile
is simply forgotten.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Hashable, Iterable
from typing import TypeVar

K = TypeVar("K", bound=Hashable)


class Schedule:
    def __init__(self, interval: float, first: float | Callable[[Hashable], float] | None = None) -> None:
        self.interval = interval
        self._first = interval if first is None else first
        self._next: dict[Hashable, float] = {}

    def first(self, key: Hashable) -> float:
        return self._first(key) if callable(self._first) else self._first

    def looked(self, key: Hashable, at: float, delay: float | None = None) -> None:
        """``key`` was looked at (reconciled) at ``at``: next due one interval later, or
        ``delay`` later when the look said when (never later than the interval)."""
        self._next[key] = at + (self.interval if delay is None else min(max(delay, 0.0), self.interval))

    def wake(self, key: Hashable, at: float) -> None:
        """Something ``key``'s decision reads changed elsewhere: due at ``at`` at the latest."""
        current = self._next.get(key)
        self._next[key] = at if current is None else min(current, at)

    def next_look(self, key: Hashable) -> float | None:
        return self._next.get(key)

    def due(self, keys: Iterable[K], now: float) -> list[K]:
        """The keys due at ``now`` among ``keys`` (every object of this schedule that exists),
        most overdue first. Each returned key is claimed: due again one interval later unless a
        look (``looked``) says otherwise. Keys not in ``keys`` are forgotten."""
        before, after = self._next, {}
        out: list[tuple[float, K]] = []
        for key in keys:
            at = before.get(key)
            if at is None:
                at = now + self.first(key)
            if at <= now:
                out.append((at, key))
                at = now + self.interval
            after[key] = at
        self._next = after
        out.sort(key=lambda x: x[0])
        return [k for _, k in out]

    def reset(self) -> None:
        """Forget every look (a replica that was not active: everything is new again)."""
        self._next = {}

    def __len__(self) -> int:
        return len(self._next)


def spread(offset: float, span: float) -> Callable[[Hashable], float]:
    """A first delay of ``offset`` plus a share of ``span`` fixed by the key: a thousand objects
    seen at once are not all due in the same instant, every interval after."""
    return lambda key: offset + span * (zlib.crc32(repr(key).encode()) % 1024) / 1024


def migration_delay(attempt_running: bool, requeue_after: float | None, *, waiting: float = 1.0,
                    floor: float = 1.0) -> float | None:
    """Seconds until a migration's next look by the sweep (None: its schedule's interval).

    Before an attempt runs (Pending, Announced, Scheduling) a migration waits for other
    objects (the announce gate, a concurrency slot, a host that fits or frees up): looked at
    every ``waiting`` seconds, as the 1 s timer did. While an attempt runs, what it waits for
    is its agents' reports (watch events of the migration itself), its deadlines (the
    decision's ``requeue_after``: progress timeout, completion budget, backoff, the witness
    wait) and its hosts and droplet (the host and droplet reconcilers wake it when those
    change): the look comes at its next deadline, at least ``floor`` seconds away, at most the
    schedule's interval (the drift check)."""
    if not attempt_running:
        return waiting
    if requeue_after is None:
        return None
    return max(requeue_after, floor)
