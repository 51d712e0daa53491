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

    def looked(self, key: Hashable, at: float) -> None:
        """``key`` was looked at (reconciled) at ``at``: next due one interval later."""
        self._next[key] = at + self.interval

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
