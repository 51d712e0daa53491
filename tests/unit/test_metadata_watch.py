"""The droplet watch that keeps the metadata cache current: storage.watch.Reflector's updates
parsed into cache records (malformed droplets skipped) and applied in order, a new list
replacing everything (deletions missed while not watching included), once against a
scripted source and once over HTTP through storage.ListWatch."""

from __future__ import annotations

import asyncio
import http.client
import threading

import pytest
from fakes import FakeAPI, FakeSource, page
from support import wait_until

from ferry.metadata.cache import DropletCache
from ferry.metadata.server import Event, Replace, apply_update, droplet_reflector, serve
from ferry.storage import Gone

EVENT = "ferry.dev/maintenance-event"


def obj(name, ip, rv, *, live=False, ns="default"):
    return {
        "metadata": {"name": name, "namespace": ns, "resourceVersion": str(rv),
                     "creationTimestamp": "2030-01-01T00:00:00Z",
                     "annotations": {EVENT: "live_migrate"} if live else {}},
        "spec": {"size": "s-1vcpu-1gb", "datacenter": "nyc3", "ip": ip},
    }


class Immediate:
    def delay(self, failures: int) -> float:
        return 0.0


def run_script(source):
    cache = DropletCache()
    updates = []

    def deliver(update):
        updates.append(update)
        apply_update(cache, update)

    reflector = droplet_reflector(source, deliver, backoff=Immediate(), min_watch_seconds=0)
    reflector.start()
    wait_until(source.idle.is_set, 10, interval=0.01, what="the reflector to get through the script")
    reflector.stop()
    return cache, updates, reflector


def test_list_then_events_reach_the_cache_in_order():
    source = FakeSource(
        lists=[([obj("a", "10.0.0.1", 5), obj("b", "10.0.0.2", 6)], "10")],
        watches=[[("MODIFIED", obj("a", "10.0.0.1", 11, live=True)), ("DELETED", obj("b", "10.0.0.2", 12)),
                  ("ADDED", obj("c", "10.0.0.3", 13))]],
    )
    cache, updates, _ = run_script(source)
    assert isinstance(updates[0], Replace) and updates[0].resource_version == "10"
    assert [u.type for u in updates[1:] if isinstance(u, Event)] == ["MODIFIED", "DELETED", "ADDED"]
    assert cache.lookup("10.0.0.1").state.event == "live_migrate"
    assert cache.lookup("10.0.0.2") is None
    assert cache.lookup("10.0.0.3") is not None
    assert cache.resource_version == "13"


def test_a_new_list_after_gone_applies_missed_deletions():
    source = FakeSource(
        lists=[([obj("a", "10.0.0.1", 5), obj("b", "10.0.0.2", 6, live=True)], "10"),
               ([obj("a", "10.0.0.1", 30, live=True)], "40")],
        watches=[Gone("too old")],
    )
    cache, updates, reflector = run_script(source)
    assert [type(u) for u in updates] == [Replace, Replace]
    assert cache.lookup("10.0.0.2") is None  # deleted while we were not watching
    assert cache.lookup("10.0.0.1").state.event == "live_migrate"
    assert reflector.expired == 1


def test_malformed_droplets_are_skipped_not_fatal():
    source = FakeSource(
        lists=[([{"metadata": {}}, obj("a", "10.0.0.1", 5)], "10")],
        watches=[[("ADDED", {"metadata": {"resourceVersion": "11"}}),
                  ("MODIFIED", obj("a", "10.0.0.1", 13, live=True))]],
    )
    cache, _, reflector = run_script(source)
    assert len(cache) == 1 and cache.lookup("10.0.0.1").state.event == "live_migrate"
    assert reflector.failures_total == 0
    assert source.watch_calls[-1] == "13"


@pytest.fixture
def fake():
    api = FakeAPI()
    yield api
    api.stop()


def test_over_http_a_gone_in_the_stream_lists_again(fake):
    fake.lists = [page([obj("a", "10.0.0.1", 1, ns="ns1"), obj("b", "10.0.0.2", 2, live=True, ns="ns1")], "10"),
                  page([obj("a", "10.0.0.1", 20, live=True, ns="ns1")], "20")]
    fake.watches = [
        (200, [{"type": "MODIFIED", "object": obj("b", "10.0.0.2", 11, ns="ns1")},
               {"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old"}}], False),
    ]
    cache = DropletCache()
    lock = threading.Lock()

    def deliver(update):
        with lock:
            apply_update(cache, update)

    def synced_at_20():
        with lock:
            return cache.resource_version == "20"

    reflector = droplet_reflector(fake.kube().list_watch("Droplet", "ns1"), deliver, backoff=Immediate(),
                                  min_watch_seconds=0)
    reflector.start()
    wait_until(synced_at_20, 10, interval=0.02, what="the second list")
    reflector.stop()
    with lock:
        assert cache.lookup("10.0.0.1").state.event == "live_migrate"
        assert cache.lookup("10.0.0.2") is None
    watch_versions = [q["resourceVersion"] for _, q in fake.requests if q.get("watch")]
    assert watch_versions[:2] == ["10", "20"]


def test_serve_hands_the_updates_to_its_loop_and_answers_from_the_cache():
    source = FakeSource(lists=[([obj("me", "127.0.0.1", 1)], "1")],
                        watches=[[("MODIFIED", obj("me", "127.0.0.1", 2, live=True))]])

    def get(port: int) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", "/v1/maintenance_event")
            return conn.getresponse().read().decode()
        finally:
            conn.close()

    async def main() -> str:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        started = loop.create_future()
        task = asyncio.create_task(serve("127.0.0.1:0", source, stop=stop, started=started))
        server = await started
        try:
            # The cache changes on the loop only; this thread just reads the answers.
            return await loop.run_in_executor(None, lambda: wait_until(
                lambda: get(server.port) == "live_migrate", 10, interval=0.02, what="the watched annotation"))
        finally:
            stop.set()
            await task

    assert asyncio.run(main())
    assert source.closed.is_set()  # the shutdown interrupted the watch
