"""`ferry metadata` against the real API server, annotation level: Droplets created with
kubectl, each with its own 127.0.0.x spec.ip; the maintenance annotation set and cleared
with `kubectl annotate`; every request sent FROM the droplet's address (the client socket
is bound to it), so the endpoint identifies droplets as it does in production.

`MetadataEndpoint` (start the process, learn its port) and `query()` (one request from a
given source address) are meant for the operator-driven tests too:

    endpoint = MetadataEndpoint.start(ferry_process, namespace)
    assert endpoint.get("127.0.0.61").body == "live_migrate"
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import pytest
from support import wait_until

pytestmark = pytest.mark.integration

EVENT = "ferry.dev/maintenance-event"
SINCE = "ferry.dev/maintenance-event-since"
NOT_BEFORE = "ferry.dev/maintenance-event-not-before"
PATH = "/v1/maintenance_event"


@dataclass
class Reply:
    status: int
    body: str
    headers: dict[str, str]


def query(port: int, source: str, path: str = PATH, *, host: str = "127.0.0.1", timeout: float = 30.0,
          method: str = "GET") -> Reply:
    """One HTTP request to the endpoint, sent from `source` (a 127.0.0.x address)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout, source_address=(source, 0))
    try:
        conn.request(method, path, headers={"Host": "169.254.169.254"})
        resp = conn.getresponse()
        return Reply(resp.status, resp.read().decode(), {k.lower(): v for k, v in resp.getheaders()})
    finally:
        conn.close()


@dataclass
class MetadataEndpoint:
    """A running `ferry metadata` process and where it listens."""

    process: Any
    port: int

    @classmethod
    def start(cls, ferry_process: Callable[..., Any], namespace: str, *extra: str) -> "MetadataEndpoint":
        proc = ferry_process("-n", namespace, "metadata", "--listen", "127.0.0.1:0", *extra)
        match = proc.wait_for_log(r"listening on http://127\.0\.0\.1:(\d+)", timeout=30)
        endpoint = cls(proc, int(match.group(1)))
        proc.wait_for_log(r"cache synced", timeout=30)
        return endpoint

    def get(self, source: str, path: str = PATH, **kwargs: Any) -> Reply:
        return query(self.port, source, path, **kwargs)

    def wait_for_body(self, source: str, body: str, path: str = PATH, timeout: float = 10.0) -> Reply:
        def matches() -> Reply | None:
            reply = self.get(source, path)
            return reply if reply.status == 200 and reply.body == body else None

        return wait_until(matches, timeout, interval=0.05, what=f"{path} from {source} to answer {body!r}")


def tcp_queues(local: tuple[str, int], remote: tuple[str, int]) -> tuple[int, int] | None:
    """(send, receive) queue of the IPv4 socket ``local`` connected to ``remote``, from
    /proc/net/tcp (send: bytes not acknowledged by the peer; receive: bytes its process has
    not read); None if there is no such socket."""

    def hex_address(ip: str, port: int) -> str:
        return f"{int.from_bytes(socket.inet_aton(ip), 'little'):08X}:{port:04X}"

    want = (hex_address(*local), hex_address(*remote))
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if (fields[1], fields[2]) == want:
                tx, rx = fields[4].split(":")
                return int(tx, 16), int(rx, 16)
    return None


class LongPoll:
    """One request in a thread, from a connection opened first so that its address is known."""

    def __init__(self, endpoint: MetadataEndpoint, source: str, path: str, timeout: float = 30.0):
        self.port = endpoint.port
        self.conn = http.client.HTTPConnection("127.0.0.1", endpoint.port, timeout=timeout,
                                               source_address=(source, 0))
        self.conn.connect()
        self.client: tuple[str, int] = self.conn.sock.getsockname()[:2]
        self.sent = threading.Event()
        self.reply: Reply | None = None
        self.answered_at: float | None = None
        self.thread = threading.Thread(target=self._run, args=(path,), daemon=True)
        self.thread.start()

    def _run(self, path: str) -> None:
        try:
            self.conn.request("GET", path, headers={"Host": "169.254.169.254"})
            self.sent.set()
            resp = self.conn.getresponse()
            self.reply = Reply(resp.status, resp.read().decode(), {k.lower(): v for k, v in resp.getheaders()})
            self.answered_at = time.monotonic()
        finally:
            self.conn.close()

    def wait_until_read_by_server(self) -> None:
        """The server's process has read the whole request: it is handled before any later change."""
        server = ("127.0.0.1", self.port)

        def read() -> bool:
            # sent, acknowledged by the server's kernel, and taken off the server's socket
            return (self.sent.is_set() and tcp_queues(self.client, server) == (0, 0)
                    and tcp_queues(server, self.client) == (0, 0))

        wait_until(read, 10, interval=0.02, what=f"the server to read the request from {self.client}")


def droplet_manifest(name: str, ip: str) -> str:
    return json.dumps({
        "apiVersion": "ferry.dev/v1alpha1", "kind": "Droplet", "metadata": {"name": name},
        "spec": {"size": "s-1vcpu-1gb", "datacenter": "nyc3", "ip": ip},
    })


def create_droplet(kubectl, namespace: str, name: str, ip: str) -> None:
    kubectl("-n", namespace, "apply", "-f", "-", input=droplet_manifest(name, ip))


def announce(kubectl, namespace: str, name: str, since: str = "2030-01-01T00:00:00Z",
             not_before: str = "2030-01-01T00:10:00Z") -> None:
    kubectl("-n", namespace, "annotate", "--overwrite", f"droplet/{name}",
            f"{EVENT}=live_migrate", f"{SINCE}={since}", f"{NOT_BEFORE}={not_before}")


def clear(kubectl, namespace: str, name: str) -> None:
    kubectl("-n", namespace, "annotate", f"droplet/{name}", f"{EVENT}-", f"{SINCE}-", f"{NOT_BEFORE}-")


def assert_no_disclosure(reply: Reply) -> None:
    assert reply.status == 404
    assert "live_migrate" not in reply.body and "2030" not in reply.body
    assert "etag" not in reply.headers


# ---- tests -----------------------------------------------------------------------------


def test_only_the_annotated_droplet_hears_of_its_migration(kubectl, namespace, ferry_process):
    create_droplet(kubectl, namespace, "web-1", "127.0.0.51")
    create_droplet(kubectl, namespace, "web-2", "127.0.0.52")
    endpoint = MetadataEndpoint.start(ferry_process, namespace)

    assert endpoint.get("127.0.0.51").body == ""
    assert endpoint.get("127.0.0.52").body == ""
    assert_no_disclosure(endpoint.get("127.0.0.59"))
    assert endpoint.get("127.0.0.1", "/readyz").status == 200

    announce(kubectl, namespace, "web-1")
    reply = endpoint.wait_for_body("127.0.0.51", "live_migrate")
    assert reply.headers["content-type"].startswith("text/plain")
    assert json.loads(endpoint.get("127.0.0.51", PATH + ".json").body) == {
        "event": "live_migrate", "since": "2030-01-01T00:00:00Z", "notBefore": "2030-01-01T00:10:00Z"}
    assert endpoint.get("127.0.0.52").body == ""
    assert json.loads(endpoint.get("127.0.0.52", PATH + ".json").body) == {
        "event": None, "since": None, "notBefore": None}
    for path in (PATH, PATH + ".json", PATH + "?wait_for_change=true&timeout_sec=1"):
        assert_no_disclosure(endpoint.get("127.0.0.59", path))

    clear(kubectl, namespace, "web-1")
    endpoint.wait_for_body("127.0.0.51", "")


def test_long_poll_wakes_within_a_second_of_the_change(kubectl, namespace, ferry_process):
    create_droplet(kubectl, namespace, "db-1", "127.0.0.53")
    endpoint = MetadataEndpoint.start(ferry_process, namespace)
    first = endpoint.get("127.0.0.53")
    assert first.body == ""

    poll = LongPoll(endpoint, "127.0.0.53", f"{PATH}?wait_for_change=true&timeout_sec=60"
                                            f"&last_etag={first.headers['etag']}")
    # Read by the server before the change: only a request that waited can answer with the change.
    poll.wait_until_read_by_server()
    assert poll.reply is None, f"the long-poll answered without a change: {poll.reply}"
    before = time.monotonic()
    announce(kubectl, namespace, "db-1")
    committed = time.monotonic()
    poll.thread.join(10)
    assert not poll.thread.is_alive(), "the long-poll did not wake"
    reply = poll.reply
    assert reply is not None and (reply.status, reply.body) == (200, "live_migrate")
    assert reply.headers["etag"] != first.headers["etag"]
    # The change is committed before kubectl returns; the answer follows within a second.
    assert poll.answered_at - committed < 1.0, f"woke {poll.answered_at - committed:.3f}s after kubectl returned"
    print(f"long-poll woke {poll.answered_at - before:.3f}s after kubectl started, "
          f"{poll.answered_at - committed:.3f}s after it returned")

    # Resuming with the ETag just seen waits for the next change (the clearing).
    again = LongPoll(endpoint, "127.0.0.53", f"{PATH}?wait_for_change=true&timeout_sec=60"
                                             f"&last_etag={reply.headers['etag']}")
    again.wait_until_read_by_server()
    assert again.reply is None, f"the long-poll answered without a change: {again.reply}"
    clear(kubectl, namespace, "db-1")
    again.thread.join(10)
    assert again.reply is not None and again.reply.body == ""


def test_cache_follows_ip_changes_and_deletions(kubectl, namespace, ferry_process):
    create_droplet(kubectl, namespace, "app-1", "127.0.0.54")
    endpoint = MetadataEndpoint.start(ferry_process, namespace)
    announce(kubectl, namespace, "app-1")
    endpoint.wait_for_body("127.0.0.54", "live_migrate")

    kubectl("-n", namespace, "patch", "droplet/app-1", "--type=merge", "-p", '{"spec": {"ip": "127.0.0.55"}}')
    endpoint.wait_for_body("127.0.0.55", "live_migrate")
    assert_no_disclosure(endpoint.get("127.0.0.54"))

    kubectl("-n", namespace, "delete", "droplet/app-1")
    wait_until(lambda: endpoint.get("127.0.0.55").status == 404, 10, interval=0.05, what="404 after deletion")


def test_cache_survives_watch_restarts_and_a_process_restart(kubectl, namespace, ferry_process):
    create_droplet(kubectl, namespace, "cache-1", "127.0.0.56")
    create_droplet(kubectl, namespace, "cache-2", "127.0.0.57")
    # The API server ends each watch after 2 s: the cache must re-watch from where it was.
    endpoint = MetadataEndpoint.start(ferry_process, namespace, "--watch-timeout", "2")
    endpoint.process.wait_for_log(r"watch #3\b", timeout=20)
    announce(kubectl, namespace, "cache-1")
    endpoint.wait_for_body("127.0.0.56", "live_migrate")
    assert endpoint.get("127.0.0.57").body == ""
    assert len(re.findall(r"listed \d+ droplets", endpoint.process.log)) == 1, "re-watched by relisting"

    # Changes made while no endpoint runs are there after a restart (list, then watch).
    endpoint.process.stop()
    clear(kubectl, namespace, "cache-1")
    announce(kubectl, namespace, "cache-2")
    endpoint = MetadataEndpoint.start(ferry_process, namespace)
    assert endpoint.get("127.0.0.56").body == ""
    assert endpoint.get("127.0.0.57").body == "live_migrate"


def test_serves_every_namespace_without_one(kubectl, namespace, ferry_process):
    """Without -n (as the DaemonSet runs) the droplets of all namespaces are served."""
    # An address no other namespace (e.g. one of an earlier run, still being deleted) uses.
    h = int(hashlib.sha256(namespace.encode()).hexdigest(), 16)
    ip = f"127.0.{100 + h % 100}.{1 + (h // 100) % 250}"
    create_droplet(kubectl, namespace, "any-1", ip)
    proc = ferry_process("metadata", "--listen", "127.0.0.1:0")
    port = int(proc.wait_for_log(r"listening on http://127\.0\.0\.1:(\d+)").group(1))
    proc.wait_for_log(r"cache synced")
    endpoint = MetadataEndpoint(proc, port)
    endpoint.wait_for_body(ip, "")
    announce(kubectl, namespace, "any-1")
    endpoint.wait_for_body(ip, "live_migrate")
