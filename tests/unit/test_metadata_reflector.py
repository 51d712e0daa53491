"""The list/watch loop that keeps the metadata cache current, against a scripted fake
source: re-watch from the last resourceVersion, relist on 410 Gone, back off on errors."""

from __future__ import annotations

import threading
import time
from collections import deque

import pytest

from ferry.metadata.cache import DropletCache
from ferry.metadata.reflector import (
    DeliveryClosed,
    Event,
    Reflector,
    Replace,
    SourceError,
    WatchExpired,
    apply_update,
    backoff_delay,
)

EVENT = "ferry.dev/maintenance-event"


def obj(name, ip, rv, *, live=False, ns="default"):
    return {
        "metadata": {"name": name, "namespace": ns, "resourceVersion": str(rv),
                     "creationTimestamp": "2030-01-01T00:00:00Z",
                     "annotations": {EVENT: "live_migrate"} if live else {}},
        "spec": {"ip": ip},
    }


def bookmark(rv):
    return ("BOOKMARK", {"metadata": {"resourceVersion": str(rv)}})


class FakeSource:
    """Plays a script: each list()/watch() call takes the next entry (a value, a list of
    events, or an exception). When the script is over, watch() blocks until close()."""

    def __init__(self, lists, watches):
        self.lists = deque(lists)
        self.watches = deque(watches)
        self.list_calls = 0
        self.watch_calls: list[str] = []
        self.closed = threading.Event()
        self.idle = threading.Event()  # set when the script is exhausted

    def list(self):
        self.list_calls += 1
        if not self.lists:
            self.idle.set()
            self.closed.wait(10)
            raise SourceError(0, "closed")
        step = self.lists.popleft()
        if isinstance(step, Exception):
            raise step
        return step

    def watch(self, resource_version, timeout_seconds):
        self.watch_calls.append(resource_version)
        if not self.watches:
            self.idle.set()
            self.closed.wait(10)
            return
        step = self.watches.popleft()
        if isinstance(step, Exception):
            raise step
        for event in step:
            if isinstance(event, Exception):
                raise event
            yield event

    def close(self):
        self.closed.set()


def run_script(source, **options):
    cache = DropletCache()
    updates = []

    def deliver(update):
        updates.append(update)
        apply_update(cache, update)

    options.setdefault("backoff_base", 0.001)
    options.setdefault("min_watch_seconds", 0)
    reflector = Reflector(source, deliver, **options)
    started = time.monotonic()
    reflector.start()
    assert source.idle.wait(10), "the reflector did not get through the script"
    elapsed = time.monotonic() - started
    reflector.stop()
    assert not reflector._thread.is_alive()
    return cache, updates, reflector, elapsed


def test_list_then_watch_events_in_order():
    source = FakeSource(
        lists=[([obj("a", "10.0.0.1", 5), obj("b", "10.0.0.2", 6)], "10")],
        watches=[[("MODIFIED", obj("a", "10.0.0.1", 11, live=True)), ("DELETED", obj("b", "10.0.0.2", 12)),
                  ("ADDED", obj("c", "10.0.0.3", 13))]],
    )
    cache, updates, reflector, _ = run_script(source)
    assert isinstance(updates[0], Replace) and updates[0].resource_version == "10"
    assert [u.type for u in updates[1:]] == ["MODIFIED", "DELETED", "ADDED"]
    assert cache.lookup("10.0.0.1").state.event == "live_migrate"
    assert cache.lookup("10.0.0.2") is None
    assert cache.lookup("10.0.0.3") is not None
    assert cache.resource_version == "13"
    assert source.watch_calls == ["10", "13"]  # after the stream ended: re-watch from the last event


def test_bookmarks_advance_the_resume_version_without_touching_the_cache():
    source = FakeSource(lists=[([obj("a", "10.0.0.1", 5)], "10")],
                        watches=[[bookmark(50)], [("MODIFIED", obj("a", "10.0.0.1", 51, live=True))]])
    cache, updates, _, _ = run_script(source)
    assert source.watch_calls == ["10", "50", "51"]
    assert sum(isinstance(u, Event) for u in updates) == 1
    assert source.list_calls == 1


def test_410_gone_in_the_stream_relists_and_applies_missed_deletions():
    source = FakeSource(
        lists=[([obj("a", "10.0.0.1", 5), obj("b", "10.0.0.2", 6, live=True)], "10"),
               ([obj("a", "10.0.0.1", 30, live=True)], "40")],
        watches=[[("ERROR", {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old"})]],
    )
    cache, updates, reflector, _ = run_script(source)
    assert source.list_calls == 2  # the second one after Gone
    assert [type(u).__name__ for u in updates] == ["Replace", "Replace"]
    assert cache.lookup("10.0.0.2") is None  # deleted while we were not watching
    assert cache.lookup("10.0.0.1").state.event == "live_migrate"
    assert source.watch_calls == ["10", "40"]
    assert reflector.expired == 1


def test_410_on_the_watch_request_relists():
    source = FakeSource(lists=[([], "10"), ([obj("a", "10.0.0.1", 41)], "41")],
                        watches=[WatchExpired("gone")])
    cache, _, _, _ = run_script(source)
    assert source.watch_calls == ["10", "41"]
    assert cache.lookup("10.0.0.1") is not None


def test_a_dropped_watch_backs_off_and_resumes_from_the_last_version_without_relisting():
    source = FakeSource(
        lists=[([obj("a", "10.0.0.1", 5)], "10")],
        watches=[[("MODIFIED", obj("a", "10.0.0.1", 11, live=True)), ConnectionResetError("reset")],
                 ConnectionRefusedError("refused"), SourceError(500, "etcd down"),
                 [("MODIFIED", obj("a", "10.0.0.1", 12))]],
    )
    cache, _, reflector, _ = run_script(source)
    assert source.list_calls == 1
    assert source.watch_calls == ["10", "11", "11", "11", "12"]
    assert reflector.failures_total == 3
    assert cache.lookup("10.0.0.1").state.event is None


def test_a_failing_list_is_retried_with_backoff():
    source = FakeSource(lists=[SourceError(503, "unavailable"), ConnectionRefusedError(), ([], "7")], watches=[])
    _, updates, reflector, _ = run_script(source)
    assert source.list_calls == 3
    assert reflector.failures_total == 2
    assert updates == [Replace((), "7")]


def test_watches_that_end_at_once_do_not_spin():
    # Six empty watches that return immediately: each counts as a failure and waits.
    source = FakeSource(lists=[([], "1")], watches=[[] for _ in range(6)])
    _, _, reflector, elapsed = run_script(source, backoff_base=0.02, min_watch_seconds=0.5)
    assert reflector.failures_total == 6
    # 0.02 * (1+2+4+8+16+32) * [0.5..1] >= 0.63 s
    assert elapsed >= 0.6


def test_repeated_gone_right_after_relist_backs_off():
    source = FakeSource(lists=[([], "1"), ([], "2"), ([], "3"), ([], "4")],
                        watches=[WatchExpired("x"), WatchExpired("x"), WatchExpired("x")])
    _, _, reflector, elapsed = run_script(source, backoff_base=0.05)
    assert reflector.expired == 3 and source.list_calls == 4
    assert elapsed >= 0.05 * (1 + 2) * 0.5


def test_malformed_objects_are_skipped_not_fatal():
    source = FakeSource(
        lists=[([{"metadata": {}}, obj("a", "10.0.0.1", 5)], "10")],
        watches=[[("ADDED", {"metadata": {"resourceVersion": "11"}}), ("WEIRD", obj("z", "10.0.0.9", 12)),
                  ("MODIFIED", obj("a", "10.0.0.1", 13, live=True))]],
    )
    cache, _, reflector, _ = run_script(source)
    assert len(cache) == 1 and cache.lookup("10.0.0.1").state.event == "live_migrate"
    assert cache.lookup("10.0.0.9") is None
    assert reflector.failures_total == 0
    assert source.watch_calls[-1] == "13"


def test_deliver_closed_ends_the_loop():
    source = FakeSource(lists=[([], "1")], watches=[])

    def deliver(_update):
        raise DeliveryClosed()

    reflector = Reflector(source, deliver, backoff_base=0.001)
    thread = reflector.start()
    thread.join(5)
    assert not thread.is_alive()
    assert source.watch_calls == []


def test_stop_interrupts_a_blocked_watch_promptly():
    source = FakeSource(lists=[([], "1")], watches=[])
    reflector = Reflector(source, lambda u: None)
    thread = reflector.start()
    assert source.idle.wait(5)
    started = time.monotonic()
    reflector.stop()
    assert not thread.is_alive() and time.monotonic() - started < 2


@pytest.mark.parametrize(
    "failures, jitter, expected",
    [(0, 0, 0), (1, 0, 0.5), (2, 0, 1.0), (3, 0, 2.0), (7, 0, 30.0), (100, 0, 30.0), (1, 1, 0.25), (100, 1, 15.0)],
)
def test_backoff_delay(failures, jitter, expected):
    assert backoff_delay(failures, jitter=jitter) == pytest.approx(expected)
