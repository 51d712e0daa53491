"""The maintenance-event endpoint over a cache fed from plain data.

Each droplet has its own 127.0.0.x address and the CLIENT socket is bound to it, so the
server identifies the asker by the real TCP source address, as in production.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
from support import wait_until_async

from ferry.metadata.cache import DropletCache, DropletRecord, MaintenanceState
from ferry.metadata.server import MetadataServer, parse_listen, parse_query, BadQuery, Query

LIVE = MaintenanceState("live_migrate", "2030-01-01T00:00:00Z", "2030-01-01T00:10:00Z")
NONE = MaintenanceState()
A, B, C, STRANGER = "127.0.0.21", "127.0.0.22", "127.0.0.23", "127.0.0.99"


def rec(name, ip, state=NONE):
    return DropletRecord("default", name, ip, state, "2030-01-01T00:00:00Z")


def world():
    cache = DropletCache()
    cache.replace([rec("a", A, LIVE), rec("b", B), rec("c", C)], "1")
    return cache


class Client:
    """HTTP from a chosen source address (one session per address)."""

    def __init__(self, port: int):
        self.port = port
        self.sessions: dict[str, aiohttp.ClientSession] = {}

    def session(self, src: str) -> aiohttp.ClientSession:
        if src not in self.sessions:
            self.sessions[src] = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(local_addr=(src, 0), force_close=True),
                timeout=aiohttp.ClientTimeout(total=30),
            )
        return self.sessions[src]

    async def get(self, src: str, path: str, *, method: str = "GET", headers=None):
        async with self.session(src).request(method, f"http://127.0.0.1:{self.port}{path}", headers=headers) as r:
            return r.status, await r.text(), r.headers

    async def close(self):
        for s in self.sessions.values():
            await s.close()


def serving(cache: DropletCache, **options):
    """Decorator body: run `test(server, client, cache)` against a live server."""

    def wrap(test):
        async def main():
            server = MetadataServer(cache, "127.0.0.1", 0, **options)
            await server.start()
            client = Client(server.port)
            try:
                await asyncio.wait_for(test(server, client, cache), 30)
            finally:
                await client.close()
                await server.stop()

        asyncio.run(main())

    return wrap


# ---- plain answers ---------------------------------------------------------------------


def test_each_droplet_gets_its_own_answer_by_source_address():
    @serving(world())
    async def _(server, client, cache):
        status, body, headers = await client.get(A, "/v1/maintenance_event")
        assert (status, body) == (200, "live_migrate")
        assert headers["Content-Type"].startswith("text/plain")
        assert headers["ETag"]
        status, body, headers = await client.get(B, "/v1/maintenance_event")
        assert (status, body) == (200, "")
        assert headers["Content-Type"].startswith("text/plain")


def test_unknown_address_gets_404_and_learns_nothing():
    @serving(world())
    async def _(server, client, cache):
        unknown_path = await client.get(STRANGER, "/nope")
        for path in ("/v1/maintenance_event", "/v1/maintenance_event.json",
                     "/v1/maintenance_event?wait_for_change=true&timeout_sec=1",
                     f"/v1/maintenance_event?wait_for_change=true&last_etag=x"):
            started = time.monotonic()
            status, body, headers = await client.get(STRANGER, path)
            assert status == 404
            assert time.monotonic() - started < 0.9  # no waiting for strangers
            assert "live_migrate" not in body and "ETag" not in headers
            assert body == unknown_path[1]  # same 404 as a path that does not exist


def test_x_forwarded_for_is_never_trusted():
    @serving(world())
    async def _(server, client, cache):
        status, body, _ = await client.get(STRANGER, "/v1/maintenance_event",
                                           headers={"X-Forwarded-For": A, "X-Real-IP": A, "Forwarded": f"for={A}"})
        assert status == 404 and "live_migrate" not in body
        status, body, _ = await client.get(B, "/v1/maintenance_event", headers={"X-Forwarded-For": A})
        assert (status, body) == (200, "")


def test_json_variant():
    @serving(world())
    async def _(server, client, cache):
        status, body, headers = await client.get(A, "/v1/maintenance_event.json")
        assert status == 200 and headers["Content-Type"].startswith("application/json")
        assert json.loads(body) == {"event": "live_migrate", "since": "2030-01-01T00:00:00Z",
                                    "notBefore": "2030-01-01T00:10:00Z"}
        status, body, _ = await client.get(B, "/v1/maintenance_event.json")
        assert json.loads(body) == {"event": None, "since": None, "notBefore": None}


def test_unknown_paths_404_other_methods_405_head_allowed():
    @serving(world())
    async def _(server, client, cache):
        for path in ("/", "/v1", "/v1/maintenance_event/", "/v1/maintenance_events", "/metadata/v1/id"):
            assert (await client.get(A, path))[0] == 404
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            status, body, headers = await client.get(A, "/v1/maintenance_event", method=method)
            assert status == 405 and "live_migrate" not in body
            assert "GET" in headers["Allow"]
        status, body, _ = await client.get(A, "/v1/maintenance_event", method="HEAD")
        assert status == 200 and body == ""


@pytest.mark.parametrize(
    "query",
    ["wait_for_change=yes", "wait_for_change=", "timeout_sec=0", "timeout_sec=3601", "timeout_sec=-1",
     "timeout_sec=1.5", "timeout_sec=abc", "timeout_sec=%EF%BC%91", "timeout_sec=99999999999999999999",
     "wait_for_change=true&wait_for_change=false", "last_etag=" + "a" * 500, "last_etag=%00"],
)
def test_bad_query_values_are_400_without_waiting(query):
    @serving(world())
    async def _(server, client, cache):
        started = time.monotonic()
        status, body, _ = await client.get(A, f"/v1/maintenance_event?{query}")
        assert status == 400, (query, status, body)
        assert "live_migrate" not in body
        assert time.monotonic() - started < 1


def test_not_ready_until_the_first_list():
    cache = DropletCache()

    @serving(cache)
    async def _(server, client, cache):
        assert (await client.get(A, "/readyz"))[0] == 503
        assert (await client.get(A, "/healthz"))[0] == 200
        status, _, headers = await client.get(A, "/v1/maintenance_event")
        assert status == 503 and headers["Retry-After"]
        cache.replace([rec("a", A, LIVE)], "1")
        assert (await client.get(A, "/readyz"))[:2] == (200, "ready\n")
        assert (await client.get(A, "/v1/maintenance_event"))[:2] == (200, "live_migrate")


def test_health_endpoints_disclose_nothing():
    @serving(world())
    async def _(server, client, cache):
        for path in ("/healthz", "/readyz"):
            status, body, headers = await client.get(STRANGER, path)
            assert status == 200
            assert "live_migrate" not in body and "127.0.0" not in body and len(body) < 10
            assert "ETag" not in headers
            assert "Server" not in headers


# ---- long-poll -------------------------------------------------------------------------


def test_long_poll_wakes_within_a_second_with_new_value_and_etag():
    @serving(world())
    async def _(server, client, cache):
        _, body, headers = await client.get(B, "/v1/maintenance_event")
        assert body == ""
        etag = headers["ETag"]
        poll = asyncio.create_task(client.get(B, "/v1/maintenance_event?wait_for_change=true&timeout_sec=20"))
        await wait_until_async(lambda: server.endpoint.waiting == 1)
        assert not poll.done()
        changed_at = time.monotonic()
        cache.apply("MODIFIED", rec("b", B, LIVE))
        status, body, headers = await poll
        assert time.monotonic() - changed_at < 1.0
        assert (status, body) == (200, "live_migrate")
        assert headers["ETag"] != etag


def test_long_poll_is_not_woken_by_other_droplets_or_by_no_op_changes():
    @serving(world())
    async def _(server, client, cache):
        poll = asyncio.create_task(client.get(B, "/v1/maintenance_event?wait_for_change=true&timeout_sec=1"))
        await wait_until_async(lambda: server.endpoint.waiting == 1)
        cache.apply("MODIFIED", rec("c", C, LIVE))  # another droplet
        cache.apply("MODIFIED", rec("b", B))  # same answer
        started = time.monotonic()
        status, body, headers = await poll
        assert (status, body) == (200, "")  # timed out: the unchanged value
        assert time.monotonic() - started > 0.5


def test_long_poll_timeout_returns_the_unchanged_value_and_same_etag():
    @serving(world())
    async def _(server, client, cache):
        _, _, headers = await client.get(A, "/v1/maintenance_event")
        started = time.monotonic()
        status, body, headers2 = await client.get(A, "/v1/maintenance_event?wait_for_change=true&timeout_sec=1")
        elapsed = time.monotonic() - started
        assert (status, body) == (200, "live_migrate")
        assert headers2["ETag"] == headers["ETag"]
        assert 0.9 <= elapsed < 3


def test_last_etag_resume_never_misses_a_change():
    @serving(world())
    async def _(server, client, cache):
        _, body, headers = await client.get(B, "/v1/maintenance_event")
        old = headers["ETag"]
        # The value changes while the client is not connected ...
        cache.apply("MODIFIED", rec("b", B, LIVE))
        # ... so resuming with the old ETag answers at once with the new value.
        started = time.monotonic()
        status, body, headers = await client.get(B, f"/v1/maintenance_event?wait_for_change=true&last_etag={old}")
        assert (status, body) == (200, "live_migrate")
        assert time.monotonic() - started < 1
        new = headers["ETag"]
        assert new != old
        # Also with the ETag unquoted, as some clients strip it.
        status, body, _ = await client.get(B, f"/v1/maintenance_event?wait_for_change=true&last_etag={old.strip(chr(34))}")
        assert body == "live_migrate"
        # With the current ETag, it waits for the next change.
        poll = asyncio.create_task(client.get(B, f"/v1/maintenance_event?wait_for_change=true&last_etag={new}&timeout_sec=20"))
        await wait_until_async(lambda: server.endpoint.waiting == 1)
        cache.apply("MODIFIED", rec("b", B))
        status, body, headers = await poll
        assert (status, body) == (200, "") and headers["ETag"] not in (old, new)


def test_value_flipping_back_still_changes_the_etag():
    @serving(world())
    async def _(server, client, cache):
        _, _, h1 = await client.get(B, "/v1/maintenance_event")
        cache.apply("MODIFIED", rec("b", B, LIVE))
        cache.apply("MODIFIED", rec("b", B))
        status, body, h2 = await client.get(B, f"/v1/maintenance_event?wait_for_change=true&last_etag={h1['ETag']}")
        assert body == "" and h2["ETag"] != h1["ETag"]  # answered at once: something happened


def test_json_long_poll_wakes_on_since_change_but_plain_does_not():
    @serving(world())
    async def _(server, client, cache):
        j = asyncio.create_task(client.get(A, "/v1/maintenance_event.json?wait_for_change=true&timeout_sec=20"))
        t = asyncio.create_task(client.get(A, "/v1/maintenance_event?wait_for_change=true&timeout_sec=1"))
        await wait_until_async(lambda: server.endpoint.waiting == 2)
        renewed = MaintenanceState("live_migrate", "2030-02-01T00:00:00Z", "2030-02-01T00:10:00Z")
        cache.apply("MODIFIED", rec("a", A, renewed))
        status, body, _ = await j
        assert json.loads(body)["since"] == "2030-02-01T00:00:00Z"
        assert not t.done()
        status, body, _ = await t
        assert body == "live_migrate"


def test_long_poll_of_a_deleted_droplet_gets_404():
    @serving(world())
    async def _(server, client, cache):
        poll = asyncio.create_task(client.get(C, "/v1/maintenance_event?wait_for_change=true&timeout_sec=20"))
        await wait_until_async(lambda: server.endpoint.waiting == 1)
        cache.apply("DELETED", rec("c", C))
        status, body, headers = await poll
        assert status == 404 and "ETag" not in headers


def test_many_waiters_one_change_wakes_them_all():
    @serving(world())
    async def _(server, client, cache):
        polls = [asyncio.create_task(client.get(B, "/v1/maintenance_event?wait_for_change=true&timeout_sec=20"))
                 for _ in range(20)]
        await wait_until_async(lambda: server.endpoint.waiting == 20)
        cache.apply("MODIFIED", rec("b", B, LIVE))
        results = await asyncio.gather(*polls)
        assert {(s, b) for s, b, _ in results} == {(200, "live_migrate")}


def test_waiters_per_address_are_capped_with_429():
    @serving(world(), max_waiters_per_address=3)
    async def _(server, client, cache):
        polls = [asyncio.create_task(client.get(B, "/v1/maintenance_event?wait_for_change=true&timeout_sec=20"))
                 for _ in range(3)]
        await wait_until_async(lambda: server.endpoint.waiting == 3)
        status, _, _ = await client.get(B, "/v1/maintenance_event?wait_for_change=true&timeout_sec=20")
        assert status == 429
        # another droplet is not affected, nor a plain GET
        assert (await client.get(B, "/v1/maintenance_event"))[0] == 200
        other = asyncio.create_task(client.get(C, "/v1/maintenance_event?wait_for_change=true&timeout_sec=20"))
        await wait_until_async(lambda: server.endpoint.waiting == 4)
        cache.apply("MODIFIED", rec("b", B, LIVE))
        cache.apply("MODIFIED", rec("c", C, LIVE))
        await asyncio.gather(*polls, other)


def test_client_that_leaves_stops_waiting():
    @serving(world())
    async def _(server, client, cache):
        poll = asyncio.create_task(client.get(B, "/v1/maintenance_event?wait_for_change=true&timeout_sec=60"))
        await wait_until_async(lambda: server.endpoint.waiting == 1)
        poll.cancel()
        await wait_until_async(lambda: server.endpoint.waiting == 0, timeout=5)


def test_shutdown_answers_waiting_long_polls_instead_of_hanging():
    async def main():
        cache = world()
        server = MetadataServer(cache, "127.0.0.1", 0)
        await server.start()
        client = Client(server.port)
        try:
            poll = asyncio.create_task(client.get(B, "/v1/maintenance_event?wait_for_change=true&timeout_sec=600"))
            await wait_until_async(lambda: server.endpoint.waiting == 1)
            started = time.monotonic()
            await server.stop()
            status, body, _ = await asyncio.wait_for(poll, 10)
            assert (status, body) == (200, "")
            assert time.monotonic() - started < 5
        finally:
            await client.close()

    asyncio.run(main())


# ---- pure helpers ----------------------------------------------------------------------


def test_parse_query_defaults_and_limits():
    assert parse_query([]) == Query(False, 300, None)
    assert parse_query([("wait_for_change", "TRUE"), ("timeout_sec", "3600"), ("last_etag", '"abc"')]) == \
        Query(True, 3600, "abc")
    assert parse_query([("recursive", "true"), ("alt", "text")]) == Query()  # unknown names ignored
    with pytest.raises(BadQuery):
        parse_query([("timeout_sec", "3601")])


def test_parse_listen():
    assert parse_listen("127.0.0.1:8169") == ("127.0.0.1", 8169)
    assert parse_listen("[::1]:80") == ("::1", 80)
    assert parse_listen("169.254.169.254:80") == ("169.254.169.254", 80)
    for bad in ("8169", ":80", "127.0.0.1:", "127.0.0.1:x", "127.0.0.1:70000"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def _ipv6_loopback() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_ipv6_listen_and_identity():
    async def main():
        cache = DropletCache()
        cache.replace([DropletRecord("default", "six", "::1", LIVE, "2030-01-01T00:00:00Z")], "1")
        server = MetadataServer(cache, "::1", 0)
        await server.start()
        try:
            async with aiohttp.ClientSession() as s:
                async with s.get(f"http://[::1]:{server.port}/v1/maintenance_event") as r:
                    assert (r.status, await r.text()) == (200, "live_migrate")
        finally:
            await server.stop()

    asyncio.run(main())
