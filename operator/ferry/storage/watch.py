"""The one list/watch loop (client-go's reflector) and ``Table``, a store it can feed.

A ``Reflector`` runs in its own thread over a ``ListWatch``-like source. It lists, hands
the list to ``deliver`` as ``Listed``, then watches from the list's resourceVersion and
hands every ADDED/MODIFIED/DELETED event to ``deliver`` as ``Changed``. Recovery:

- the server ends the watch (its timeout): watch again from the last resourceVersion;
- ``Gone`` (410, the version was compacted): list again at once, then watch from the new
  list's version; Gone again right after that list backs off;
- any other error: back off (``Backoff``, jittered) and watch again from the last version;
- a watch that ends within ``min_watch_seconds`` without an event counts as an error (no
  hot loop against a server that closes every watch).

The version it resumes from never goes back (numeric versions compared as numbers, as etcd
makes them; a BOOKMARK or event carrying an older one is not followed). ``deliver`` runs
in the reflector's thread; raising ``DeliveryClosed`` from it ends the loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ferry.api.meta import ObjectKey
from ferry.storage.backoff import Backoff
from ferry.storage.kube import Gone


EVENT_TYPES = ("ADDED", "MODIFIED", "DELETED")


class Source(Protocol):
    """What a reflector runs on (``storage.ListWatch``; tests use fakes)."""

    def list(self) -> tuple[list[dict[str, Any]], str]: ...

    def watch(self, resource_version: str, timeout_seconds: int) -> Iterator[tuple[str, dict[str, Any]]]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Listed:
    """A whole new list: it replaces everything seen before (deletions missed included)."""

    items: tuple[dict[str, Any], ...]
    resource_version: str


@dataclass(frozen=True)
class Changed:
    """One watch event."""

    type: str  # ADDED | MODIFIED | DELETED
    object: dict[str, Any]
    resource_version: str | None


Update = Listed | Changed


class DeliveryClosed(Exception):
    """Raised by ``deliver`` when nobody takes updates any more: the reflector ends."""


class WatchEndedAtOnce(Exception):
    """A watch ended without events before ``min_watch_seconds``: counted as a failure."""


def resource_version(body: Mapping[str, Any] | None) -> str:
    meta = body.get("metadata") if isinstance(body, Mapping) else None
    rv = meta.get("resourceVersion") if isinstance(meta, Mapping) else None
    return rv if isinstance(rv, str) else ""


def newer_version(a: str, b: str | None) -> bool:
    """Whether version ``a`` is at least as new as ``b``: compared as numbers when both are
    numbers, otherwise (opaque versions, or no ``b``) the later arrival wins."""
    if not b or not (a.isdigit() and b.isdigit()):
        return True
    return int(a) >= int(b)


def newer(a: Mapping[str, Any], b: Mapping[str, Any] | None) -> bool:
    """Whether object ``a`` is at least as new as ``b`` (by resourceVersion)."""
    return b is None or newer_version(resource_version(a), resource_version(b))


def key_of(body: Mapping[str, Any]) -> ObjectKey:
    meta = body.get("metadata") or {}
    return (meta.get("namespace") or "", meta.get("name") or "")


class Reflector:
    def __init__(
        self,
        source: Source,
        deliver: Callable[[Update], None],
        *,
        name: str = "objects",
        stop: threading.Event | None = None,
        watch_timeout_seconds: int = 300,
        min_watch_seconds: float = 1.0,
        backoff: Backoff = Backoff(base=0.5, cap=30.0, jitter=0.5),
        log: logging.Logger | None = None,
        progress_level: int = logging.DEBUG,
        clock: Callable[[], float] = time.monotonic,
    ):
        """``name`` says what is watched, in log lines; ``progress_level`` is the level of
        the "listed" and "watching" lines (failures are WARNINGs: the 1st, 5th, every 20th)."""
        self.source = source
        self.deliver = deliver
        self.name = name
        self._stop = stop if stop is not None else threading.Event()
        self.watch_timeout_seconds = watch_timeout_seconds
        self.min_watch_seconds = min_watch_seconds
        self.backoff = backoff
        self.log = log or logging.getLogger(__name__)
        self.progress_level = progress_level
        self.clock = clock
        self.synced = threading.Event()  # set once the first list is delivered
        self.thread: threading.Thread | None = None
        self.resource_version: str | None = None  # where the next watch starts; None: list first
        # Counters, for logs and tests.
        self.lists = 0
        self.watches = 0
        self.expired = 0
        self.failures_total = 0

    # ---- lifecycle ------------------------------------------------------------------

    def start(self) -> threading.Thread:
        self.thread = threading.Thread(target=self.run, name=f"watch {self.name}", daemon=True)
        self.thread.start()
        return self.thread

    def stop(self, timeout: float = 5.0) -> None:
        """End the loop: interrupt the running watch and wait up to ``timeout`` for the thread."""
        self._stop.set()
        try:
            self.source.close()
        except Exception:  # noqa: BLE001 - best effort interrupt
            self.log.debug("closing the watch of %s failed", self.name, exc_info=True)
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout)

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    # ---- the loop -------------------------------------------------------------------

    def run(self) -> None:
        self.resource_version = None
        failures = 0
        gone_in_a_row = 0
        while not self._stop.is_set():
            try:
                if self.resource_version is None:
                    self._list()
                self._watch()
                failures = 0
                gone_in_a_row = 0
            except Gone:
                self.expired += 1
                gone_in_a_row += 1
                self.log.info("watch of %s expired (410 Gone) at resourceVersion %s; listing again",
                              self.name, self.resource_version)
                self.resource_version = None
                if gone_in_a_row > 1:  # Gone again right after a list: do not spin
                    self._stop.wait(self.backoff.delay(gone_in_a_row - 1))
            except DeliveryClosed:
                return
            except Exception as exc:  # noqa: BLE001 - any failure: back off and retry
                if self._stop.is_set():
                    return
                failures += 1
                self.failures_total += 1
                delay = self.backoff.delay(failures)
                level = logging.WARNING if failures in (1, 5) or failures % 20 == 0 else logging.DEBUG
                self.log.log(level, "watch of %s failed (%s: %s); retry %d in %.1fs", self.name,
                             type(exc).__name__, exc, failures, delay)
                self._stop.wait(delay)

    def _list(self) -> None:
        items, rv = self.source.list()
        self.lists += 1
        if self._stop.is_set():
            return
        self.deliver(Listed(tuple(items), rv))
        self.resource_version = rv
        self.synced.set()
        self.log.log(self.progress_level, "listed %d %s at resourceVersion %s", len(items), self.name, rv)

    def _advance(self, rv: str) -> None:
        if rv and newer_version(rv, self.resource_version):
            self.resource_version = rv

    def _watch(self) -> None:
        """One watch from ``self.resource_version`` until the stream ends, moving the version
        on with every event, so that a broken stream resumes after the last one delivered."""
        if self._stop.is_set():
            return
        self.watches += 1
        self.log.log(self.progress_level, "watching %s from resourceVersion %s (watch #%d)", self.name,
                     self.resource_version, self.watches)
        started = self.clock()
        events = 0
        for event_type, obj in self.source.watch(self.resource_version or "", self.watch_timeout_seconds):
            if self._stop.is_set():
                return
            events += 1
            rv = resource_version(obj)
            if event_type in EVENT_TYPES:
                self.deliver(Changed(event_type, obj, rv or None))
            elif event_type != "BOOKMARK":
                self.log.warning("ignoring a watch event of type %r on %s", event_type, self.name)
            self._advance(rv)
        if events == 0 and not self._stop.is_set() and self.clock() - started < self.min_watch_seconds:
            raise WatchEndedAtOnce("the watch ended at once without events")


class Table:
    """Objects of one stream by key, fed by a reflector; thread-safe; an object never goes
    back to an older version."""

    def __init__(self) -> None:
        self._items: dict[ObjectKey, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def apply_update(self, update: Update) -> set[ObjectKey]:
        """Apply one reflector update; returns the keys it may have changed."""
        if isinstance(update, Listed):
            return self.replace(update.items)
        return {self.apply(update.type, update.object)}

    def replace(self, bodies: Iterable[dict[str, Any]]) -> set[ObjectKey]:
        with self._lock:
            old = self._items
            self._items = {key_of(b): b for b in bodies}
            return set(old) | set(self._items)

    def apply(self, event_type: str, body: dict[str, Any]) -> ObjectKey:
        key = key_of(body)
        with self._lock:
            if event_type == "DELETED":
                self._items.pop(key, None)
            elif newer(body, self._items.get(key)):
                self._items[key] = body
        return key

    def update_if_present(self, body: dict[str, Any]) -> None:
        """Our own write's answer: keep it if this stream holds the object (and it is newer)."""
        key = key_of(body)
        with self._lock:
            if key in self._items and newer(body, self._items[key]):
                self._items[key] = body

    def snapshot(self) -> dict[ObjectKey, dict[str, Any]]:
        with self._lock:
            return dict(self._items)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
