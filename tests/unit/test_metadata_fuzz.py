"""Fuzz the maintenance-event endpoint with raw sockets from real 127.0.0.x source
addresses: malformed request lines, huge headers, bad query strings, odd methods,
binary junk. Invariants: never a 5xx, never a hang, the server still answers correctly
afterwards, and nothing of the announced droplet's state ever reaches another address.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import threading
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from support import wait_until

from ferry.metadata.cache import DropletCache, DropletRecord, MaintenanceState
from ferry.metadata.server import MetadataServer

ANNOUNCED, QUIET, STRANGER = "127.0.0.31", "127.0.0.32", "127.0.0.39"
HOG = "127.0.0.40"  # not a droplet either; used only to exhaust its own connection slots
SECRET_SINCE = "2031-05-05T05:05:05Z"
SECRETS = (b"live_migrate", SECRET_SINCE.encode(), b"2031-05-05")


class ServerThread:
    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.cache = DropletCache()
        self.cache.replace([
            DropletRecord("default", "announced", ANNOUNCED,
                          MaintenanceState("live_migrate", SECRET_SINCE, "2031-05-05T05:15:05Z"), "2030-01-01T00:00:00Z"),
            DropletRecord("default", "quiet", QUIET, MaintenanceState(), "2030-01-01T00:00:00Z"),
        ], "1")
        self.server = MetadataServer(self.cache, "127.0.0.1", 0)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.start())
        self.ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.server.stop())
        self.loop.close()

    def start(self):
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def server():
    s = ServerThread().start()
    yield s
    s.stop()
    assert not s.thread.is_alive()


def _complete_response(buf: bytes) -> bool:
    """A whole response (headers + Content-Length body) is in `buf`."""
    head, sep, body = buf.partition(b"\r\n\r\n")
    if not sep:
        return False
    match = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    return match is None or len(body) >= int(match.group(1))


def exchange(port: int, src: str, data: bytes, *, deadline: float = 8.0) -> bytes:
    """Send raw bytes from `src` and read the answer.

    Reading stops at EOF, at one complete response, or when nothing more comes for a
    short while after something came. HTTP has no half-close, so the socket is not
    shut for writing (aiohttp, like most servers, drops a request whose client sent FIN).
    A request that looks complete (ends its header block) must get a reply before
    `deadline`: otherwise the server hung.
    """
    # (llhttp reads a PRI request line as the start of an HTTP/2 preface and waits for the rest)
    # Blank lines before a request line are ignored by HTTP servers (RFC 9112 2.2): only a
    # header block after some request line "looks complete".
    body = data.lstrip(b"\r\n")
    looks_complete = (b"\r\n\r\n" in body or b"\n\n" in body) and not body.startswith(b"PRI ")
    with socket.create_connection(("127.0.0.1", port), timeout=deadline, source_address=(src, 0)) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            pass  # the server refused early or stopped reading: read what it said
        chunks: list[bytes] = []
        sock.settimeout(deadline if looks_complete else 0.5)
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            except socket.timeout:
                if looks_complete and not chunks:
                    raise AssertionError(f"server hung on {data[:200]!r}")
                break
            if not chunk:
                break
            chunks.append(chunk)
            if _complete_response(b"".join(chunks)):
                break
            sock.settimeout(0.3)
        return b"".join(chunks)


STATUS = re.compile(rb"HTTP/1\.[01] (\d{3})")


def check(server: ServerThread, src: str, data: bytes) -> bytes:
    response = exchange(server.server.port, src, data)
    for code in STATUS.findall(response):
        assert int(code) < 500, f"{int(code)} for {data[:300]!r}: {response[:500]!r}"
    if src != ANNOUNCED:
        for secret in SECRETS:
            assert secret not in response, f"{src} learned {secret!r} from {data[:300]!r}"
    return response


def still_answers(server: ServerThread) -> None:
    ok = exchange(server.server.port, ANNOUNCED, b"GET /v1/maintenance_event HTTP/1.1\r\nHost: x\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200") and ok.endswith(b"live_migrate"), ok
    quiet = exchange(server.server.port, QUIET, b"GET /v1/maintenance_event HTTP/1.1\r\nHost: x\r\n\r\n")
    assert quiet.startswith(b"HTTP/1.1 200") and b"live_migrate" not in quiet
    nope = exchange(server.server.port, STRANGER, b"GET /v1/maintenance_event HTTP/1.1\r\nHost: x\r\n\r\n")
    assert nope.startswith(b"HTTP/1.1 404")


# ---- strategies ------------------------------------------------------------------------

sources = st.sampled_from([ANNOUNCED, QUIET, STRANGER])
methods = st.one_of(
    st.just("GET"),
    st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "TRACE", "CONNECT", "PATCH", "PRI",
                     "get", "GET GET", "G\tET", "", "BREW"]),
    st.text(max_size=12),
)
query_values = st.one_of(
    st.sampled_from(["true", "false", "TRUE", "1", "0", "-1", "3601", "1.0", "", "%", "%zz", "%00", "%ff%fe",
                     "\"etag\"", "W/\"x\"", "a" * 300]),
    st.text(max_size=20),
)
query_names = st.sampled_from(["wait_for_change", "timeout_sec", "last_etag", "alt", "recursive", "", "=", "&"])


@st.composite
def queries(draw):
    pairs = draw(st.lists(st.tuples(query_names, query_values), max_size=5))
    # never a long wait: a wait_for_change=true gets a 1 s timeout (or a bad one: 400)
    text = "&".join(f"{k}={v}" for k, v in pairs)
    if "wait_for_change=true" in text.lower() or "wait_for_change=TRUE" in text:
        text += "&timeout_sec=1"
    return text


paths = st.one_of(
    st.sampled_from(["/v1/maintenance_event", "/v1/maintenance_event.json"]),
    st.sampled_from(["/v1/maintenance_event", "/v1/maintenance_event.json", "/healthz", "/readyz", "/",
                     "*", "//v1//maintenance_event", "/v1/maintenance_event/../maintenance_event",
                     "/v1/%6daintenance_event", "http://169.254.169.254/v1/maintenance_event", "/" + "a" * 9000,
                     "/v1/maintenance_event#frag", "/\x00", "/v1/maintenance_event%00"]),
    st.text(max_size=40).map(lambda t: "/" + t),
)
versions = st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/0.9", "HTTP/1.1x", "", "FTP/1.0", "HTTP/1.1 junk"])
header_names = st.sampled_from(["Host", "X-Forwarded-For", "Forwarded", "X-Real-IP", "Content-Length",
                                "Transfer-Encoding", "Connection", "Expect", "Upgrade", "Accept-Encoding",
                                "Metadata-Flavor", "", " Host", "Host ", "X" * 5000])
header_values = st.one_of(
    st.sampled_from([ANNOUNCED, f"for={ANNOUNCED}", "chunked", "gzip, chunked", "-1", "99999999999999999999",
                     "100-continue", "keep-alive", "close", "h2c", "x" * 10000, "\x00", "a\r\nInjected: 1"]),
    st.text(max_size=30),
)
headers = st.lists(st.tuples(header_names, header_values), max_size=8)


@st.composite
def http_requests(draw):
    method = draw(methods)
    path = draw(paths)
    query = draw(st.one_of(st.none(), queries()))
    target = path + ("?" + query if query is not None else "")
    line = f"{method} {target} {draw(versions)}".rstrip()
    hs = draw(headers)
    if draw(st.integers(0, 3)):  # mostly a Host header first, else the parser stops at once
        hs.insert(0, ("Host", "169.254.169.254"))
    many = draw(st.sampled_from([0, 0, 0, 70, 200]))  # over the 64-header limit
    lines = [line] + [f"{k}: {v}" for k, v in hs] + [f"X-Pad-{i}: {i}" for i in range(many)]
    eol = draw(st.sampled_from(["\r\n", "\r\n", "\r\n", "\n", "\r"]))
    body = draw(st.binary(max_size=64))
    return (eol.join(lines) + eol + eol).encode("utf-8", "surrogateescape") + body


printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)


@st.composite
def well_formed_requests(draw):
    """Requests the parser accepts, so the fuzz reaches the handlers: odd queries
    (percent-encoded junk), odd but legal methods and headers."""
    method = draw(st.sampled_from(["GET", "GET", "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "BREW"]))
    path = draw(st.sampled_from(["/v1/maintenance_event", "/v1/maintenance_event.json", "/healthz", "/readyz",
                                 "/v1/maintenance_event/", "/v1/%6daintenance_event", "/V1/MAINTENANCE_EVENT"]))
    if draw(st.booleans()):  # valid parameters in any order, with a 1 s wait at most
        pairs = draw(st.permutations([
            ("wait_for_change", draw(st.sampled_from(["true", "false", "TRUE"]))),
            ("timeout_sec", "1"),
            ("last_etag", draw(st.sampled_from(["", '"x"', "W/\"0\""]) | printable)),
        ]))
        pairs = pairs[: draw(st.integers(0, 3))]
        if ("timeout_sec", "1") not in pairs:
            pairs.append(("timeout_sec", "1"))
    else:
        pairs = draw(st.lists(st.tuples(query_names, query_values), max_size=4))
    query = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in pairs)
    if any(k == "wait_for_change" and v.lower() == "true" for k, v in pairs) and ("timeout_sec", "1") not in pairs:
        query += "&timeout_sec=1"
    target = path + ("?" + query if query or draw(st.booleans()) else "")
    hs = [("Host", "169.254.169.254")] + draw(st.lists(st.tuples(
        st.sampled_from(["X-Forwarded-For", "Forwarded", "X-Real-IP", "Accept", "If-None-Match", "Metadata-Flavor",
                         "Cookie", "Authorization", "Range"]), printable), max_size=3))
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v.strip()}\r\n" for k, v in hs) + "\r\n"
    return head.encode()


junk = st.one_of(
    well_formed_requests(),
    well_formed_requests(),
    st.binary(max_size=512),
    st.binary(min_size=1, max_size=64).map(lambda b: b * 200),
    http_requests(),
    st.lists(http_requests(), min_size=2, max_size=3).map(b"".join),  # pipelined
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(src=sources, data=junk)
def test_fuzz_never_5xx_never_hangs_never_discloses(server, src, data):
    for secret in SECRETS:
        assume(secret not in data)  # the server may echo a malformed line back to its sender
    response = check(server, src, data)
    codes = STATUS.findall(response)
    event(f"status {codes[0].decode() if codes else 'none'}")


def test_fuzz_server_still_answers_afterwards(server):
    still_answers(server)


@pytest.mark.parametrize("data", [
    b"GET /v1/maintenance_event HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * 100_000 + b"\r\n\r\n",
    b"GET /v1/maintenance_event?" + b"a=b&" * 5000 + b" HTTP/1.1\r\n\r\n",
    b"GET /v1/maintenance_event HTTP/1.1\r\n" + b"".join(b"H%d: v\r\n" % i for i in range(1000)) + b"\r\n",
    b"GET /v1/maintenance_event HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET /v1/maintenance_event HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
    b"POST /v1/maintenance_event HTTP/1.1\r\nContent-Length: 10000000\r\n\r\n" + b"x" * 100_000,
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)),  # a TLS ClientHello
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # HTTP/2 preface
    b"GET /v1/maintenance_event?wait_for_change=true&timeout_sec=99999 HTTP/1.1\r\n\r\n",
    b"GET /v1/maintenance_event?timeout_sec=1&timeout_sec=2 HTTP/1.1\r\n\r\n",
])
@pytest.mark.parametrize("src", [ANNOUNCED, STRANGER])
def test_known_nasty_inputs(server, src, data):
    response = check(server, src, data)
    assert STATUS.search(response) is None or int(STATUS.search(response).group(1)) >= 400
    still_answers(server)


def test_long_poll_from_a_raw_socket_times_out_with_the_value(server):
    response = check(server, ANNOUNCED,
                     b"GET /v1/maintenance_event?wait_for_change=true&timeout_sec=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 200") and response.endswith(b"live_migrate")


def test_many_idle_connections_do_not_block_answers(server):
    idle = [socket.create_connection(("127.0.0.1", server.server.port), source_address=(QUIET, 0))
            for _ in range(60)]
    try:
        for s in idle[:30]:
            s.sendall(b"GET /v1/mainten")  # never finished
        still_answers(server)
    finally:
        for s in idle:
            s.close()
    still_answers(server)


def test_one_address_cannot_hold_all_the_connections(server):
    """Over the per-address limit (64) an address is turned away with 429; other
    addresses are still served; once it lets go, it is served again."""
    port = server.server.port
    held = []
    try:
        for _ in range(64):
            held.append(socket.create_connection(("127.0.0.1", port), source_address=(HOG, 0)))
            held[-1].sendall(b"GET /v1/mai")  # slowloris: never finishes
        wait_until(lambda: server.server.connections.get(HOG, 0) >= 64, 5, interval=0.01,
                   what="the server to count the 64 held connections")
        refused = exchange(port, HOG, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert refused.startswith(b"HTTP/1.1 429")
        still_answers(server)  # the droplets are not starved
    finally:
        for s in held:
            s.close()
    wait_until(lambda: not server.server.connections.get(HOG, 0), 5, interval=0.01,
               what="the server to drop the closed connections")
    assert exchange(port, HOG, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 200")


def test_malformed_requests_do_not_flood_the_log(server, caplog):
    with caplog.at_level(logging.DEBUG):
        for data in (b"\x00\x01garbage\r\n\r\n", b"GET / HTTP/1.1\r\nBad Header\r\n\r\n", b"GET /%zz HTTP/9.9\r\n\r\n"):
            check(server, STRANGER, data)
        still_answers(server)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
