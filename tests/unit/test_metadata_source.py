"""The pykube list/watch layer of the metadata cache against a small fake API server on
loopback that speaks the Kubernetes list/watch protocol (pagination, watch streams,
410 Gone as HTTP status and as an ERROR event). The real API server is exercised in
tests/integration/test_metadata.py."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pykube
import pytest

from ferry.metadata.cache import DropletCache
from ferry.metadata.reflector import Reflector, SourceError, WatchExpired, apply_update
from ferry.storage.droplet_source import DropletSource


def obj(name, ip, rv, *, live=False, ns="ns1"):
    return {"apiVersion": "ferry.dev/v1alpha1", "kind": "Droplet",
            "metadata": {"name": name, "namespace": ns, "resourceVersion": str(rv),
                         "creationTimestamp": "2030-01-01T00:00:00Z",
                         "annotations": {"ferry.dev/maintenance-event": "live_migrate"} if live else {}},
            "spec": {"ip": ip}}


class FakeAPI:
    """Scripted responses. `lists` and `watches` are queues of handlers' outputs:
    a list page is (status, body); a watch is (status, [event dicts], hold_open)."""

    def __init__(self):
        self.requests: list[tuple[str, dict]] = []
        self.lists: list = []
        self.watches: list = []
        self.release = threading.Event()
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                api.requests.append((url.path, query))
                if query.get("watch") == "true":
                    status, events, hold = api.watches.pop(0) if api.watches else (200, [], True)
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    if status != 200:
                        body = json.dumps({"kind": "Status", "code": status, "message": "nope"}).encode()
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        self.wfile.write(body)
                        return
                    # Like kube-apiserver: chunked transfer, one event per chunk.
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    try:
                        for event in events:
                            data = json.dumps(event).encode() + b"\n"
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                            self.wfile.flush()
                        if hold:
                            api.release.wait(20)
                        self.wfile.write(b"0\r\n\r\n")
                    except OSError:
                        pass
                    self.close_connection = True
                    return
                status, body = api.lists.pop(0)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def api(self) -> pykube.HTTPClient:
        return pykube.HTTPClient(pykube.KubeConfig.from_url(self.url))

    def stop(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    api = FakeAPI()
    yield api
    api.stop()


def page(items, rv, token=None):
    return (200, {"kind": "DropletList", "metadata": {"resourceVersion": rv, **({"continue": token} if token else {})},
                  "items": items})


def test_list_paginates_in_one_namespace(fake):
    fake.lists = [page([obj("a", "10.0.0.1", 1), obj("b", "10.0.0.2", 2)], "5", "tok"),
                  page([obj("c", "10.0.0.3", 3)], "5")]
    items, rv = DropletSource(fake.api(), "ns1", page_size=2).list()
    assert [i["metadata"]["name"] for i in items] == ["a", "b", "c"] and rv == "5"
    (p1, q1), (p2, q2) = fake.requests
    assert p1 == p2 == "/apis/ferry.dev/v1alpha1/namespaces/ns1/droplets"
    assert q1 == {"limit": "2"} and q2 == {"limit": "2", "continue": "tok"}


def test_list_all_namespaces(fake):
    fake.lists = [page([], "9")]
    assert DropletSource(fake.api(), None).list() == ([], "9")
    assert fake.requests[0][0] == "/apis/ferry.dev/v1alpha1/droplets"


def test_list_errors(fake):
    fake.lists = [(403, {"kind": "Status", "code": 403, "message": "forbidden"}), (410, {"kind": "Status"})]
    with pytest.raises(SourceError) as err:
        DropletSource(fake.api(), "ns1").list()
    assert err.value.status == 403 and "forbidden" in str(err.value)
    with pytest.raises(WatchExpired):
        DropletSource(fake.api(), "ns1").list()


def test_watch_streams_events_with_the_right_parameters(fake):
    events = [{"type": "ADDED", "object": obj("a", "10.0.0.1", 6)},
              {"type": "BOOKMARK", "object": {"kind": "Droplet", "metadata": {"resourceVersion": "7"}}},
              {"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old"}}]
    fake.watches = [(200, events, False)]
    got = list(DropletSource(fake.api(), "ns1").watch("5", 42))
    assert [t for t, _ in got] == ["ADDED", "BOOKMARK", "ERROR"]
    assert got[2][1]["code"] == 410
    path, query = fake.requests[0]
    assert path == "/apis/ferry.dev/v1alpha1/namespaces/ns1/droplets"
    assert query == {"watch": "true", "resourceVersion": "5", "allowWatchBookmarks": "true", "timeoutSeconds": "42"}


def test_watch_http_errors(fake):
    fake.watches = [(410, [], False), (500, [], False)]
    source = DropletSource(fake.api(), "ns1")
    with pytest.raises(WatchExpired):
        list(source.watch("1", 10))
    with pytest.raises(SourceError):
        list(source.watch("1", 10))


def test_close_interrupts_a_blocked_watch(fake):
    fake.watches = [(200, [{"type": "ADDED", "object": obj("a", "10.0.0.1", 6)}], True)]
    source = DropletSource(fake.api(), "ns1")
    got, done = [], threading.Event()

    def consume():
        for event in source.watch("5", 300):
            got.append(event)
        done.set()

    threading.Thread(target=consume, daemon=True).start()
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    assert got, "the first event never arrived"
    started = time.monotonic()
    source.close()
    assert done.wait(3), "close() did not end the watch"
    assert time.monotonic() - started < 3


def test_reflector_over_http_relists_after_gone(fake):
    fake.lists = [page([obj("a", "10.0.0.1", 1), obj("b", "10.0.0.2", 2, live=True)], "10"),
                  page([obj("a", "10.0.0.1", 20, live=True)], "20")]
    fake.watches = [
        (200, [{"type": "MODIFIED", "object": obj("b", "10.0.0.2", 11)},
               {"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old"}}], False),
    ]
    cache = DropletCache()
    lock = threading.Lock()

    def deliver(update):
        with lock:
            apply_update(cache, update)

    reflector = Reflector(DropletSource(fake.api(), "ns1"), deliver, backoff_base=0.01, min_watch_seconds=0)
    reflector.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with lock:
            if cache.resource_version == "20":
                break
        time.sleep(0.02)
    reflector.stop()
    with lock:
        assert cache.resource_version == "20"
        assert cache.lookup("10.0.0.1").state.event == "live_migrate"
        assert cache.lookup("10.0.0.2") is None
    watch_versions = [q["resourceVersion"] for _, q in fake.requests if q.get("watch")]
    assert watch_versions[:2] == ["10", "20"]
