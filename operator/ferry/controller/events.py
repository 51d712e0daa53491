"""Events posted the way Kubernetes' own recorder posts them (client-go ``tools/record``).

- **Off the decision path.** ``EventRecorder.record`` only queues; background tasks post
  (client-go's broadcaster: a channel and a goroutine), ``POSTERS`` of them, each owning a
  share of the objects (an object's Events stay in order). A reconcile never waits for
  its Events, and still queues them only after the status that tells the same story was
  written (so a conflicting write never duplicates them).
- **Correlated** (``EventCorrelator``, client-go's defaults), decided by the pure
  ``Correlator`` below:
  - an Event identical to one posted for the same object in the last 10 minutes (type,
    reason, message) is not posted again: the posted one's ``count`` and
    ``lastTimestamp`` are patched (client-go's ``eventLogger``);
  - more than 10 Events of one object with the same type and reason but different messages
    within 10 minutes are combined: the next ones become one Event ``(combined from similar
    events): <message>`` whose count goes up (client-go's ``EventAggregator``);
  - per object, a token bucket of 25 Events refilled one every 5 minutes; an Event over it
    is dropped and counted in ``dropped`` (client-go's ``EventSourceObjectSpamFilter``).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from typing import Any, Callable

log = logging.getLogger("ferry.operator")

#: client-go tools/record defaults
MAX_SIMILAR = 10
AGGREGATE_SECONDS = 600.0
SPAM_BURST = 25
SPAM_REFILL_SECONDS = 300.0
LRU_ENTRIES = 4096
COMBINED = "(combined from similar events): "


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What to do with one Event: ``post`` a new one (``message`` may be the combined one),
    ``repeat`` the one posted under ``key`` with ``count``, or ``drop`` it."""

    action: str  # "post" | "repeat" | "drop"
    key: tuple
    message: str
    count: int = 1


class Correlator:
    """Pure bookkeeping of client-go's EventCorrelator; ``clock`` in seconds."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._similar: collections.OrderedDict = collections.OrderedDict()  # (obj, type, reason) -> (t0, messages)
        self._posted: collections.OrderedDict = collections.OrderedDict()  # dedup key -> (t0, count)
        self._buckets: collections.OrderedDict = collections.OrderedDict()  # obj -> (tokens, t)

    def judge(self, obj: tuple, type_: str, reason: str, message: str) -> Verdict:
        t = self.clock()
        if not self._take_token(obj, t):
            return Verdict("drop", (obj, type_, reason, message), message)
        agg = (obj, type_, reason)
        first, messages = self._similar.get(agg, (t, set()))
        if t - first > AGGREGATE_SECONDS:
            first, messages = t, set()
        messages.add(message)
        _put(self._similar, agg, (first, messages))
        if len(messages) > MAX_SIMILAR:
            key, message = (obj, type_, reason, COMBINED), COMBINED + message
        else:
            key = (obj, type_, reason, message)
        seen = self._posted.get(key)
        if seen is not None and t - seen[0] <= AGGREGATE_SECONDS:
            _put(self._posted, key, (seen[0], seen[1] + 1))
            return Verdict("repeat", key, message, seen[1] + 1)
        _put(self._posted, key, (t, 1))
        return Verdict("post", key, message)

    def _take_token(self, obj: tuple, t: float) -> bool:
        tokens, last = self._buckets.get(obj, (float(SPAM_BURST), t))
        tokens = min(float(SPAM_BURST), tokens + (t - last) / SPAM_REFILL_SECONDS)
        ok = tokens >= 1.0
        _put(self._buckets, obj, (tokens - 1.0 if ok else tokens, t))
        return ok


def _put(lru: collections.OrderedDict, key: Any, value: Any) -> None:
    lru[key] = value
    lru.move_to_end(key)
    while len(lru) > LRU_ENTRIES:
        lru.popitem(last=False)


#: Events are posted by this many tasks at once, each owning a share of the objects (so the
#: Events of one object keep their order and their correlation). One task posted ~15 Events a
#: second on a busy machine: a thousand migrations' ~9,000 transition Events came minutes late.
POSTERS = 4


class EventRecorder:
    """Queues Events and posts them from ``posters`` tasks (``run``), through ``kube.event`` and
    ``kube.event_repeat`` called with ``call`` (off the event loop). An object's Events all go
    through one task, in the order they were recorded."""

    def __init__(self, kube: Any, call: Callable, correlator: Correlator | None = None,
                 posters: int = POSTERS) -> None:
        self.kube = kube
        self.call = call
        self.correlator = correlator or Correlator()
        self.queues: list[asyncio.Queue] = [asyncio.Queue() for _ in range(max(1, posters))]
        self.names: collections.OrderedDict = collections.OrderedDict()  # dedup key -> (namespace, name)
        self.dropped = 0
        self.posted = 0
        self.repeated = 0

    def record(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        meta = obj.get("metadata", {})
        shard = hash((meta.get("namespace"), meta.get("name"))) % len(self.queues)
        self.queues[shard].put_nowait((obj, type_, reason, message))

    async def join(self) -> None:
        """Until every Event recorded so far is posted (or dropped)."""
        for q in self.queues:
            await q.join()

    async def run(self) -> None:
        await asyncio.gather(*(self._poster(q) for q in self.queues))

    async def _poster(self, queue: asyncio.Queue) -> None:
        while True:
            item = await queue.get()
            try:
                await self._post(*item)
            except Exception:  # noqa: BLE001 - an Event must never stop the operator; logged with traceback
                log.exception("posting an event failed")
            finally:
                queue.task_done()

    async def _post(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        meta = obj.get("metadata", {})
        ident = (obj.get("kind"), meta.get("namespace"), meta.get("name"), meta.get("uid"))
        v = self.correlator.judge(ident, type_, reason, message)
        if v.action == "drop":
            self.dropped += 1
            log.debug("event %s on %s dropped (more than %d per object)", reason, meta.get("name"), SPAM_BURST)
            return
        if v.action == "repeat" and v.key in self.names:
            ns, name = self.names[v.key]
            await self.call(self.kube.event_repeat, ns, name, v.count)
            self.repeated += 1
            return
        name = await self.call(self.kube.event, obj, type_, reason, v.message)
        self.posted += 1
        if name:
            _put(self.names, v.key, (meta.get("namespace") or "default", name))
