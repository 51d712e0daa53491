"""List + watch loop that keeps a DropletCache current (the informer pattern).

Runs in its own thread (the API client blocks) and hands every update to `deliver`,
which the server points at `loop.call_soon_threadsafe`, so the cache is only ever
touched by the asyncio loop. The source is anything with `list()`, `watch()` and
`close()` (see `ferry.storage.droplet_source.DropletSource`; tests use a fake).

Recovery:
- the watch ends normally (server-side timeout): re-watch from the last resourceVersion;
- 410 Gone (resourceVersion compacted): relist at once, then watch from the list's version;
- any other error (connection refused, reset, 5xx, bad JSON): back off exponentially
  (0.5 s doubling to 30 s, jittered) and re-watch from the last version (a relist if
  that version is gone by then);
- a watch that ends immediately without events also counts as a failure (no hot loop).
A relist replaces the whole cache, so deletions missed while disconnected are applied.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Protocol

from ferry.metadata.cache import DropletCache, DropletRecord, record_from_object

log = logging.getLogger("ferry.metadata")


class WatchExpired(Exception):
    """410 Gone: the resourceVersion is too old; only a relist can continue."""


class DeliveryClosed(Exception):
    """Raised by `deliver` when nobody takes updates any more: the reflector ends."""


class SourceError(Exception):
    """The API answered with an error (status code kept)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status


class DropletSourceProtocol(Protocol):
    def list(self) -> tuple[list[dict], str]: ...

    def watch(self, resource_version: str, timeout_seconds: int) -> Iterator[tuple[str, dict]]: ...

    def close(self) -> None: ...


def backoff_delay(failures: int, *, base: float = 0.5, cap: float = 30.0, jitter: float = 0.0) -> float:
    """Delay before retry number `failures` (1-based): base * 2^(n-1), capped, then
    scaled by (1 - jitter/2) for jitter in [0, 1] so that clients spread out."""
    if failures <= 0:
        return 0.0
    delay = min(cap, base * (2 ** min(failures - 1, 32)))
    return delay * (1.0 - max(0.0, min(jitter, 1.0)) / 2)


# ---- what the reflector hands to the cache owner ---------------------------------------


@dataclass(frozen=True)
class Replace:
    records: tuple[DropletRecord, ...]
    resource_version: str


@dataclass(frozen=True)
class Event:
    type: str  # ADDED | MODIFIED | DELETED
    record: DropletRecord
    resource_version: str | None


Update = Replace | Event


def apply_update(cache: DropletCache, update: Update) -> set[str]:
    """Apply one update to the cache (call this on the cache's owner thread)."""
    if isinstance(update, Replace):
        return cache.replace(update.records, update.resource_version)
    return cache.apply(update.type, update.record, update.resource_version)


def _parse_items(items: list[Mapping]) -> tuple[DropletRecord, ...]:
    records = []
    for obj in items:
        try:
            records.append(record_from_object(obj))
        except (ValueError, AttributeError, TypeError) as exc:
            log.warning("ignoring malformed droplet in list: %s", exc)
    return tuple(records)


def _resource_version(obj: Mapping) -> str | None:
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    rv = meta.get("resourceVersion") if isinstance(meta, Mapping) else None
    return rv if isinstance(rv, str) and rv else None


class Reflector:
    def __init__(
        self,
        source: DropletSourceProtocol,
        deliver: Callable[[Update], None],
        *,
        watch_timeout_seconds: int = 300,
        min_watch_seconds: float = 1.0,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.source = source
        self.deliver = deliver
        self.watch_timeout_seconds = watch_timeout_seconds
        self.min_watch_seconds = min_watch_seconds
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Counters, for logs and tests.
        self.lists = 0
        self.watches = 0
        self.expired = 0
        self.failures_total = 0
        self._watch_seconds = 0.0
        self.resource_version: str | None = None

    # ---- lifecycle ------------------------------------------------------------------

    def start(self) -> threading.Thread:
        self._thread = threading.Thread(target=self.run, name="ferry-metadata-watch", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        try:
            self.source.close()
        except Exception:  # pragma: no cover - best effort interrupt
            log.debug("closing the watch failed", exc_info=True)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    # ---- the loop -------------------------------------------------------------------

    def run(self) -> None:
        self.resource_version = None  # where the next watch resumes; None: list first
        failures = 0
        expired_streak = 0
        while not self._stop.is_set():
            try:
                if self.resource_version is None:
                    items, rv = self.source.list()
                    self.lists += 1
                    records = _parse_items(items)
                    self.deliver(Replace(records, rv))
                    self.resource_version = rv
                    log.info("listed %d droplets at resourceVersion %s", len(records), rv)
                events = self._watch(self.resource_version)
                if events == 0 and not self._stop.is_set() and self._watch_seconds < self.min_watch_seconds:
                    raise SourceError(0, "watch ended at once without events")
                failures = 0
                expired_streak = 0
            except WatchExpired:
                self.expired += 1
                expired_streak += 1
                log.info("watch expired (410 Gone) at resourceVersion %s; relisting", self.resource_version)
                self.resource_version = None
                if expired_streak > 1:  # Gone again right after a relist: do not spin
                    self._pause(expired_streak - 1)
            except DeliveryClosed:
                return  # the cache's owner is gone (server shutting down)
            except Exception as exc:
                if self._stop.is_set():
                    return
                failures += 1
                self.failures_total += 1
                log.warning("droplet watch failed (%s: %s); retry %d", type(exc).__name__, exc, failures)
                self._pause(failures)

    def _pause(self, failures: int) -> None:
        delay = backoff_delay(failures, base=self.backoff_base, cap=self.backoff_cap, jitter=random.random())
        self._stop.wait(delay)

    def _watch(self, rv: str) -> int:
        """Watch from `rv` until the stream ends, advancing `self.resource_version` with
        every event (so a broken stream resumes after the last one applied). Returns the
        number of events applied."""
        self.watches += 1
        log.info("watching droplets from resourceVersion %s (watch #%d)", rv, self.watches)
        started = self.clock()
        events = 0
        self._watch_seconds = 0.0
        try:
            for event_type, obj in self.source.watch(rv, self.watch_timeout_seconds):
                if self._stop.is_set():
                    break
                if event_type == "ERROR":
                    code = obj.get("code") if isinstance(obj, Mapping) else None
                    if code == 410:
                        raise WatchExpired(str(obj.get("message", "")))
                    raise SourceError(code or 0, str(obj.get("message", "watch error")) if isinstance(obj, Mapping) else "watch error")
                new_rv = _resource_version(obj)
                if event_type == "BOOKMARK":
                    self.resource_version = new_rv or self.resource_version
                    continue
                if event_type not in ("ADDED", "MODIFIED", "DELETED"):
                    log.warning("ignoring watch event of type %r", event_type)
                    continue
                try:
                    record = record_from_object(obj)
                except (ValueError, AttributeError, TypeError) as exc:
                    log.warning("ignoring malformed droplet in watch: %s", exc)
                else:
                    self.deliver(Event(event_type, record, new_rv))
                    events += 1
                self.resource_version = new_rv or self.resource_version
        finally:
            self._watch_seconds = self.clock() - started
        return events
