"""storage.ListWatch, the list/watch transport, against a small fake API server on loopback
that speaks the Kubernetes list/watch protocol (pagination, label selectors, watch streams,
410 Gone as an HTTP status and as an ERROR event). The real API server is exercised in
tests/integration/test_agent.py and tests/integration/test_metadata.py."""

from __future__ import annotations

import threading

import pytest
from fakes import FakeAPI, page
from support import wait_until

from ferry.storage import Forbidden, Gone, StorageError


def obj(name, ip, rv, *, live=False, ns="ns1"):
    return {"apiVersion": "ferry.dev/v1alpha1", "kind": "Droplet",
            "metadata": {"name": name, "namespace": ns, "resourceVersion": str(rv),
                         "creationTimestamp": "2030-01-01T00:00:00Z",
                         "annotations": {"ferry.dev/maintenance-event": "live_migrate"} if live else {}},
            "spec": {"ip": ip}}


@pytest.fixture
def fake():
    api = FakeAPI()
    yield api
    api.stop()


def droplets(fake: FakeAPI, namespace: str | None = "ns1", selector: str | None = None, **options):
    return fake.kube().list_watch("Droplet", namespace, selector, **options)


def test_list_paginates_in_one_namespace(fake):
    fake.lists = [page([obj("a", "10.0.0.1", 1), obj("b", "10.0.0.2", 2)], "5", "tok"),
                  page([obj("c", "10.0.0.3", 3)], "5")]
    items, rv = droplets(fake, page_size=2).list()
    assert [i["metadata"]["name"] for i in items] == ["a", "b", "c"] and rv == "5"
    (p1, q1), (p2, q2) = fake.requests
    assert p1 == p2 == "/apis/ferry.dev/v1alpha1/namespaces/ns1/droplets"
    assert q1 == {"limit": "2"} and q2 == {"limit": "2", "continue": "tok"}


def test_list_all_namespaces_with_a_selector(fake):
    fake.lists = [page([], "9")]
    assert droplets(fake, None, "ferry.dev/host=a").list() == ([], "9")
    path, query = fake.requests[0]
    assert path == "/apis/ferry.dev/v1alpha1/droplets"
    assert query == {"limit": "500", "labelSelector": "ferry.dev/host=a"}


def test_list_errors(fake):
    fake.lists = [(403, {"kind": "Status", "code": 403, "message": "forbidden"}), (410, {"kind": "Status"})]
    with pytest.raises(Forbidden, match="forbidden"):
        droplets(fake).list()
    with pytest.raises(Gone):
        droplets(fake).list()


def test_watch_streams_events_with_the_right_parameters_and_raises_gone_from_the_stream(fake):
    events = [{"type": "ADDED", "object": obj("a", "10.0.0.1", 6)},
              {"type": "BOOKMARK", "object": {"kind": "Droplet", "metadata": {"resourceVersion": "7"}}},
              {"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old"}}]
    fake.watches = [(200, events, False)]
    got = []
    with pytest.raises(Gone, match="too old"):
        for event in droplets(fake, selector="ferry.dev/host=a").watch("5", 42):
            got.append(event)
    assert [t for t, _ in got] == ["ADDED", "BOOKMARK"]
    path, query = fake.requests[0]
    assert path == "/apis/ferry.dev/v1alpha1/namespaces/ns1/droplets"
    assert query == {"watch": "true", "resourceVersion": "5", "allowWatchBookmarks": "true", "timeoutSeconds": "42",
                     "labelSelector": "ferry.dev/host=a"}


def test_other_errors_in_the_stream_are_storage_errors_not_gone(fake):
    fake.watches = [(200, [{"type": "ERROR", "object": {"kind": "Status", "code": 500, "message": "etcd"}}], False),
                    (200, [{"kind": "Status", "code": 410, "message": "bare status"}], False)]
    source = droplets(fake)
    with pytest.raises(StorageError, match="etcd") as err:
        list(source.watch("1", 10))
    assert not isinstance(err.value, Gone)
    with pytest.raises(Gone, match="bare status"):  # a bare Status line instead of an event
        list(source.watch("1", 10))


def test_watch_http_errors(fake):
    fake.watches = [(410, [], False), (500, [], False)]
    source = droplets(fake)
    with pytest.raises(Gone):
        list(source.watch("1", 10))
    with pytest.raises(StorageError) as err:
        list(source.watch("1", 10))
    assert not isinstance(err.value, Gone)


def test_close_interrupts_a_blocked_watch(fake):
    fake.watches = [(200, [{"type": "ADDED", "object": obj("a", "10.0.0.1", 6)}], True)]
    source = droplets(fake)
    got, done = [], threading.Event()

    def consume():
        for event in source.watch("5", 300):
            got.append(event)
        done.set()

    threading.Thread(target=consume, daemon=True).start()
    wait_until(lambda: got, 5, interval=0.01, what="the first event")
    source.close()
    assert done.wait(3), "close() did not end the watch"
