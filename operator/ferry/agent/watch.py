"""The agent's view of the API: list + watch streams in threads, each keeping a ``Table``.

A ``Reflector`` lists its kind with a label selector (all namespaces), then watches from the
list's resourceVersion and applies every event to its ``Table``; after each change it calls
``notify(kind, key)`` so the agent loop wakes at once. Recovery: a watch the server ends is
resumed from the last resourceVersion; 410 Gone relists; any other error backs off
(0.5 s doubling to 15 s) and retries. A watch that ends at once without events counts as
an error (no hot loop). Threads are daemons: the agent process may exit at any moment.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ferry.storage import Conflict, Kube

log = logging.getLogger("ferry.agent")

Key = tuple[str, str]  # (namespace or "", name)


def key_of(body: Mapping[str, Any]) -> Key:
    meta = body.get("metadata") or {}
    return (meta.get("namespace") or "", meta.get("name") or "")


def _rv(body: Mapping[str, Any] | None) -> str:
    return ((body or {}).get("metadata") or {}).get("resourceVersion") or ""


def newer(a: Mapping[str, Any], b: Mapping[str, Any] | None) -> bool:
    """Whether ``a`` is at least as new as ``b`` (resourceVersions compared as numbers when
    both are numbers, as etcd makes them; otherwise the later arrival wins)."""
    ra, rb = _rv(a), _rv(b)
    if b is None or not (ra.isdigit() and rb.isdigit()):
        return True
    return int(ra) >= int(rb)


class Table:
    """Objects of one stream by key; thread-safe; never goes back to an older version."""

    def __init__(self) -> None:
        self._items: dict[Key, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def replace(self, bodies: Iterable[dict[str, Any]]) -> set[Key]:
        with self._lock:
            old = self._items
            self._items = {key_of(b): b for b in bodies}
            return set(old) | set(self._items)

    def apply(self, event_type: str, body: dict[str, Any]) -> Key:
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

    def snapshot(self) -> dict[Key, dict[str, Any]]:
        with self._lock:
            return dict(self._items)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


class Reflector:
    def __init__(self, connect: Callable[[], Kube], kind: str, selector: str, table: Table,
                 notify: Callable[[str, Key], None], stop: threading.Event, *, namespace: str | None = None,
                 watch_timeout_seconds: int = 60, backoff_cap: float = 15.0):
        self.connect = connect
        self.kind = kind
        self.selector = selector
        self.table = table
        self.notify = notify
        self.stop = stop
        self.namespace = namespace
        self.watch_timeout_seconds = watch_timeout_seconds
        self.backoff_cap = backoff_cap
        self.synced = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> threading.Thread:
        self.thread = threading.Thread(target=self.run, name=f"watch-{self.kind}-{self.selector}", daemon=True)
        self.thread.start()
        return self.thread

    def run(self) -> None:
        kube: Kube | None = None
        rv: str | None = None
        failures = 0
        while not self.stop.is_set():
            try:
                if kube is None:
                    kube = self.connect()
                if rv is None:
                    items, rv = kube.list_with_version(self.kind, self.namespace, self.selector)
                    for key in self.table.replace(items):
                        self.notify(self.kind, key)
                    if not self.synced.is_set():
                        log.debug("watching %s %s: %d objects", self.kind, self.selector, len(items))
                    self.synced.set()
                started, events = time.monotonic(), 0
                for event_type, obj in kube.watch(self.kind, self.namespace, self.selector, rv,
                                                  timeout_seconds=self.watch_timeout_seconds):
                    if self.stop.is_set():
                        return
                    events += 1
                    rv = _rv(obj) or rv
                    if event_type in ("ADDED", "MODIFIED", "DELETED"):
                        self.notify(self.kind, self.table.apply(event_type, obj))
                if events == 0 and time.monotonic() - started < 1.0:
                    raise RuntimeError("the watch ended at once")
                failures = 0
            except Conflict:
                rv = None  # 410 Gone: relist
            except Exception as exc:  # noqa: BLE001 - any failure: back off and retry
                failures += 1
                delay = min(self.backoff_cap, 0.5 * 2 ** min(failures - 1, 10))
                level = logging.WARNING if failures in (1, 5) or failures % 20 == 0 else logging.DEBUG
                log.log(level, "watch %s (%s) failed (%s), retrying in %.1fs", self.kind, self.selector, exc, delay)
                self.stop.wait(delay)
