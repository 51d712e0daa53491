"""The maintenance-event HTTP endpoint (`ferry metadata`).

    GET /v1/maintenance_event        text/plain: "live_migrate" or "" (DigitalOcean's contract)
    GET /v1/maintenance_event.json   {"event", "since", "notBefore"} (nulls when none)
        ?wait_for_change=true[&timeout_sec=N][&last_etag=E]   long-poll (GCE conventions)
    GET /healthz, /readyz             liveness / first list done; no droplet data

The asking droplet is the request's SOURCE address (the TCP peer; headers such as
X-Forwarded-For are never read), matched against Droplet.spec.ip. An address that is
no droplet's gets the same 404 as an unknown path. Answers come from the watch-backed
`DropletCache`; no API request is made per HTTP request. The cache is kept current by
`ferry.storage.watch.Reflector` in its own thread, which hands every update to the event
loop (`loop.call_soon_threadsafe`): the cache is only ever touched by the loop.

Long-poll: without `last_etag`, or with the current ETag, the request waits until the
answer of THIS representation changes (or timeout_sec passes: then the unchanged value);
with any other `last_etag` it answers at once, so a client that resumes with the ETag it
last saw never misses a change. ETags are opaque keyed hashes, new per process.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import signal
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ferry import logs
from ferry.metadata.cache import Answer, DropletCache, DropletRecord, normalize_ip, record_from_object
from ferry.storage import Backoff, Kube
from ferry.storage.watch import Changed, DeliveryClosed, Listed, Reflector, Source, Update

log = logging.getLogger("ferry.metadata")

EVENT_PATH = "/v1/maintenance_event"
EVENT_JSON_PATH = "/v1/maintenance_event.json"

DEFAULT_TIMEOUT_SEC = 300
MAX_TIMEOUT_SEC = 3600
MAX_ETAG_LENGTH = 128
MAX_WAITERS_PER_ADDRESS = 32
# Open connections one source address may hold (keep-alive, long-polls, half-sent
# requests): a droplet cannot starve the others of sockets. Over it: 429 and close.
MAX_CONNECTIONS_PER_ADDRESS = 64


class _ClientErrorFilter(logging.Filter):
    """aiohttp logs every malformed request with a traceback at ERROR level: a junk
    client could flood the log. Those are the client's errors (answered with a 4xx);
    keep only real server errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, HttpProcessingError) and 400 <= (exc.code or 400) < 500)


http_log = logging.getLogger("ferry.metadata.http")
http_log.addFilter(_ClientErrorFilter())

# Limits of the HTTP parser: a metadata request is one short line and a few headers.
SERVER_LIMITS = {
    "max_line_size": 4096,
    "max_field_size": 4096,
    "max_headers": 64,
    "keepalive_timeout": 75.0,
    "handler_cancellation": True,  # a long-poll whose client left stops waiting
    "logger": http_log,
}


# ---- query parsing (pure) --------------------------------------------------------------


class BadQuery(ValueError):
    pass


@dataclass(frozen=True)
class Query:
    wait_for_change: bool = False
    timeout_sec: int = DEFAULT_TIMEOUT_SEC
    last_etag: str | None = None


_KNOWN = ("wait_for_change", "timeout_sec", "last_etag")


def parse_query(pairs: Iterable[tuple[str, str]], *, max_timeout: int = MAX_TIMEOUT_SEC) -> Query:
    """Validate the query parameters. Unknown names are ignored; a known one given twice,
    or with a bad value, is a BadQuery (-> 400)."""
    seen: dict[str, str] = {}
    for name, value in pairs:
        if name in _KNOWN:
            if name in seen:
                raise BadQuery(f"{name} given more than once")
            seen[name] = value
    wait = seen.get("wait_for_change", "false").lower()
    if wait not in ("true", "false"):
        raise BadQuery("wait_for_change must be true or false")
    timeout = DEFAULT_TIMEOUT_SEC
    if "timeout_sec" in seen:
        raw = seen["timeout_sec"]
        if not (raw.isascii() and raw.isdigit()) or len(raw) > 6:
            raise BadQuery(f"timeout_sec must be an integer 1..{max_timeout}")
        timeout = int(raw)
        if not 1 <= timeout <= max_timeout:
            raise BadQuery(f"timeout_sec must be an integer 1..{max_timeout}")
    timeout = min(timeout, max_timeout)
    etag = seen.get("last_etag")
    if etag is not None:
        if len(etag) > MAX_ETAG_LENGTH or not etag.isascii() or not etag.isprintable():
            raise BadQuery("last_etag is not an ETag")
        etag = _bare_etag(etag) or None  # empty: as if absent
    return Query(wait_for_change=wait == "true", timeout_sec=timeout, last_etag=etag)


def _bare_etag(value: str) -> str:
    value = value.strip()
    if value.startswith("W/"):
        value = value[2:]
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    return value


# ---- the endpoint ----------------------------------------------------------------------


class Endpoint:
    """Request handling over a DropletCache; lives on the event loop that owns the cache."""

    def __init__(
        self,
        cache: DropletCache,
        *,
        secret: bytes | None = None,
        max_timeout: int = MAX_TIMEOUT_SEC,
        max_waiters_per_address: int = MAX_WAITERS_PER_ADDRESS,
    ):
        self.cache = cache
        self.secret = secret if secret is not None else os.urandom(16)
        self.max_timeout = max_timeout
        self.max_waiters_per_address = max_waiters_per_address
        self._changed: dict[str, asyncio.Future] = {}  # address -> resolved on its next change
        self._waiting: dict[str, int] = {}  # address -> long-polls in progress
        self._closing = False

    # listener: called by the cache (on the loop thread) with the changed addresses
    def on_change(self, addresses: set[str]) -> None:
        for ip in addresses:
            fut = self._changed.pop(ip, None)
            if fut is not None and not fut.done():
                fut.set_result(None)

    def wake_all(self) -> None:
        self._closing = True
        self.on_change(set(self._changed))

    @property
    def waiting(self) -> int:
        return sum(self._waiting.values())

    def etag(self, ip: str, kind: str, answer: Answer) -> str:
        rev = answer.json_rev if kind == "json" else answer.text_rev
        digest = hashlib.blake2b(f"{ip}|{kind}|{rev}".encode(), key=self.secret, digest_size=10)
        return digest.hexdigest()

    def _respond(self, ip: str, kind: str, answer: Answer) -> web.Response:
        headers = {"ETag": f'"{self.etag(ip, kind, answer)}"', "Cache-Control": "no-store"}
        if kind == "json":
            body = json.dumps(answer.state.as_json(), separators=(",", ":"))
            return web.Response(text=body, content_type="application/json", headers=headers)
        return web.Response(text=answer.state.text, content_type="text/plain", headers=headers)

    async def handle(self, request: web.Request, kind: str) -> web.Response:
        try:
            query = parse_query(request.query.items(), max_timeout=self.max_timeout)
        except BadQuery as exc:
            raise web.HTTPBadRequest(text=f"400: {exc}\n")
        if not self.cache.synced:
            raise web.HTTPServiceUnavailable(text="503: not ready\n", headers={"Retry-After": "1"})
        ip = normalize_ip(request.remote)
        answer = self.cache.lookup(ip)
        if answer is None or ip is None:
            raise web.HTTPNotFound()
        if query.wait_for_change and (query.last_etag is None or query.last_etag == self.etag(ip, kind, answer)):
            answer = await self._wait(ip, kind, answer, query.timeout_sec)
            if answer is None:
                raise web.HTTPNotFound()
        return self._respond(ip, kind, answer)

    async def _wait(self, ip: str, kind: str, answer: Answer, timeout: float) -> Answer | None:
        if self._waiting.get(ip, 0) >= self.max_waiters_per_address:
            raise web.HTTPTooManyRequests(text="429: too many waiting requests\n", headers={"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        seen = self.etag(ip, kind, answer)
        self._waiting[ip] = self._waiting.get(ip, 0) + 1
        try:
            while not self._closing:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                fut = self._changed.get(ip)
                if fut is None or fut.done():
                    fut = self._changed[ip] = loop.create_future()
                try:
                    await asyncio.wait_for(asyncio.shield(fut), remaining)
                except TimeoutError:
                    break
                current = self.cache.lookup(ip)
                if current is None or self.etag(ip, kind, current) != seen:
                    return current
            return self.cache.lookup(ip)
        finally:
            left = self._waiting[ip] - 1
            if left:
                self._waiting[ip] = left
            else:
                del self._waiting[ip]


ENDPOINT_KEY = web.AppKey("ferry_metadata_endpoint", Endpoint)


def make_app(cache: DropletCache, **endpoint_options) -> web.Application:
    """The aiohttp application over `cache`. Mutate the cache only on the app's loop."""
    endpoint = Endpoint(cache, **endpoint_options)
    app = web.Application(client_max_size=1024)
    app[ENDPOINT_KEY] = endpoint

    async def event_text(request: web.Request) -> web.Response:
        return await endpoint.handle(request, "text")

    async def event_json(request: web.Request) -> web.Response:
        return await endpoint.handle(request, "json")

    async def healthz(_request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_request: web.Request) -> web.Response:
        if cache.synced:
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready\n")

    app.router.add_get(EVENT_PATH, event_text)
    app.router.add_get(EVENT_JSON_PATH, event_json)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)

    async def on_startup(_app: web.Application) -> None:
        cache.subscribe(endpoint.on_change)

    async def on_shutdown(_app: web.Application) -> None:
        endpoint.wake_all()  # long-polls answer now instead of holding the shutdown

    async def on_cleanup(_app: web.Application) -> None:
        cache.unsubscribe(endpoint.on_change)

    async def on_prepare(_request: web.Request, response: web.StreamResponse) -> None:
        response.headers.pop("Server", None)

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    app.on_response_prepare.append(on_prepare)
    return app


# ---- from the reflector to the cache --------------------------------------------------


@dataclass(frozen=True)
class Replace:
    """A list, parsed (in the watch thread): the cache's whole new content."""

    records: tuple[DropletRecord, ...]
    resource_version: str


@dataclass(frozen=True)
class Event:
    """One watch event, parsed."""

    type: str  # ADDED | MODIFIED | DELETED
    record: DropletRecord
    resource_version: str | None


def parse_update(update: Update) -> Replace | Event | None:
    """The cache change of one reflector update; None for a malformed droplet (logged, skipped)."""
    if isinstance(update, Listed):
        return Replace(_parse_items(update.items), update.resource_version)
    assert isinstance(update, Changed)
    try:
        return Event(update.type, record_from_object(update.object), update.resource_version)
    except (ValueError, AttributeError, TypeError) as exc:
        log.warning("ignoring malformed droplet in watch: %s", exc)
        return None


def _parse_items(items: Iterable[Mapping]) -> tuple[DropletRecord, ...]:
    records = []
    for obj in items:
        try:
            records.append(record_from_object(obj))
        except (ValueError, AttributeError, TypeError) as exc:
            log.warning("ignoring malformed droplet in list: %s", exc)
    return tuple(records)


def apply_update(cache: DropletCache, update: Replace | Event) -> set[str]:
    """Apply one parsed update to the cache (on the cache's owner thread); the changed addresses."""
    if isinstance(update, Replace):
        return cache.replace(update.records, update.resource_version)
    return cache.apply(update.type, update.record, update.resource_version)


def droplet_reflector(source: Source, deliver: Callable[[Replace | Event], None], *,
                      watch_timeout_seconds: int = 300, **options) -> Reflector:
    """The reflector of the droplets: parses each update in its thread, then `deliver`s it."""

    def parsed(update: Update) -> None:
        change = parse_update(update)
        if change is not None:
            deliver(change)

    options.setdefault("backoff", Backoff(base=0.5, cap=30.0, jitter=0.5))
    return Reflector(source, parsed, name="droplets", watch_timeout_seconds=watch_timeout_seconds, log=log,
                     progress_level=logging.INFO, **options)


# ---- running it ------------------------------------------------------------------------


def parse_listen(listen: str) -> tuple[str, int]:
    """"127.0.0.1:8169", "[::1]:80", "169.254.169.254:80" -> (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--listen wants ADDR:PORT, got {listen!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


class _ConnectionGuard(asyncio.Protocol):
    """Wraps aiohttp's protocol: counts open connections per source address and turns
    away one over the limit before any HTTP parsing."""

    _REFUSE = b"HTTP/1.1 429 Too Many Requests\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"

    def __init__(self, inner: asyncio.Protocol, counts: dict[str | None, int], limit: int):
        self.inner = inner
        self.counts = counts
        self.limit = limit
        self.ip: str | None = None
        self.admitted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self.ip = normalize_ip(peer[0]) if isinstance(peer, tuple) and peer else None
        if self.counts.get(self.ip, 0) >= self.limit:
            transport.write(self._REFUSE)  # type: ignore[attr-defined]
            transport.close()
            return
        self.counts[self.ip] = self.counts.get(self.ip, 0) + 1
        self.admitted = True
        self.inner.connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.admitted:
            return
        self.admitted = False
        left = self.counts.get(self.ip, 1) - 1
        if left > 0:
            self.counts[self.ip] = left
        else:
            self.counts.pop(self.ip, None)
        self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.admitted:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.admitted else None

    def pause_writing(self) -> None:
        if self.admitted:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.admitted:
            self.inner.resume_writing()


class MetadataServer:
    """The app on a TCP socket, in the running loop. `port` is the bound one (listen :0)."""

    def __init__(
        self,
        cache: DropletCache,
        host: str,
        port: int,
        *,
        max_connections_per_address: int = MAX_CONNECTIONS_PER_ADDRESS,
        **endpoint_options,
    ):
        self.cache = cache
        self.host = host
        self.port = port
        self.max_connections_per_address = max_connections_per_address
        self.app = make_app(cache, **endpoint_options)
        self.connections: dict[str | None, int] = {}  # source address -> open connections
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.base_events.Server | None = None

    @property
    def endpoint(self) -> Endpoint:
        return self.app[ENDPOINT_KEY]

    async def start(self) -> tuple[str, int]:
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=5.0, **SERVER_LIMITS)
        await self._runner.setup()
        http = self._runner.server
        assert http is not None
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(
            lambda: _ConnectionGuard(http(), self.connections, self.max_connections_per_address),
            self.host, self.port, reuse_address=True, backlog=1024,
        )
        self.port = self._listener.sockets[0].getsockname()[1]  # the bound port when asked for :0
        return self.host, self.port

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()  # no new connections
        if self._runner is not None:
            await self._runner.cleanup()  # wakes long-polls, closes connections
            self._runner = None
        if self._listener is not None:
            await self._listener.wait_closed()
            self._listener = None


async def serve(
    listen: str,
    source: Source,
    *,
    watch_timeout_seconds: int = 300,
    stop: asyncio.Event | None = None,
    started: asyncio.Future | None = None,
) -> None:
    """Serve until `stop` is set (or SIGTERM/SIGINT when run from the main thread).

    `source` lists and watches the Droplets (a `ferry.storage.ListWatch`, or anything with
    list/watch/close). `started`, if given, receives the MetadataServer once it listens."""
    host, port = parse_listen(listen)
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    cache = DropletCache()
    server = MetadataServer(cache, host, port)

    def apply(update: Replace | Event) -> None:
        was_synced = cache.synced
        apply_update(cache, update)
        if cache.synced and not was_synced:
            log.info("cache synced: %d droplets; ready", len(cache))

    def deliver(update: Replace | Event) -> None:
        if loop.is_closed() or stop.is_set():
            raise DeliveryClosed()
        try:
            loop.call_soon_threadsafe(apply, update)
        except RuntimeError as exc:  # loop closed between the check and the call
            raise DeliveryClosed() from exc

    reflector = droplet_reflector(source, deliver, watch_timeout_seconds=watch_timeout_seconds)
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (RuntimeError, ValueError, NotImplementedError):
            pass  # not the main thread: the caller stops us through `stop`
    bound_host, bound_port = await server.start()
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    log.info("metadata endpoint listening on http://%s:%d%s", shown, bound_port, EVENT_PATH)
    reflector.start()
    if started is not None and not started.done():
        started.set_result(server)
    try:
        await stop.wait()
    finally:
        log.info("metadata endpoint stopping")
        stop.set()
        await loop.run_in_executor(None, reflector.stop, 2.0)
        await server.stop()
        for sig in installed:
            loop.remove_signal_handler(sig)


def run(
    listen: str,
    *,
    kubeconfig: str | None = None,
    namespace: str | None = None,
    context: str | None = None,
    watch_timeout_seconds: int = 300,
) -> None:
    """`ferry metadata --listen ADDR:PORT [--kubeconfig PATH] [--namespace NS]`.

    Watches the Droplets of `namespace` (all namespaces when None) through pykube and
    serves until SIGTERM/SIGINT."""
    logs.for_server()
    parse_listen(listen)  # fail before touching the API
    source = Kube.connect(kubeconfig, context=context).list_watch("Droplet", namespace)
    asyncio.run(serve(listen, source, watch_timeout_seconds=watch_timeout_seconds))
