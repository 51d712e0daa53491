"""Benchmark of the maintenance-event endpoint on loopback.

    .venv/bin/python tests/perf/bench_metadata.py [--droplets 10000] [--duration 3]
                                                   [--concurrency 64] [--waiters 1000]

The server runs in its own process with a cache of N droplets (each with its own
127.1.x.y address, half of them announced), fed through the same thread-to-loop path
the watch uses. The client (aiohttp, in this process) sends every request from a
droplet's own address (the client socket is bound to it), many keep-alive connections
spread over several addresses.

Rows:
- healthz           the HTTP stack alone (no cache lookup): the baseline of each run
- plain / json      GET /v1/maintenance_event(.json)
- long-poll stale   wait_for_change with an old last_etag (answers at once)
- plain, W parked   plain GETs while `waiters` long-polls are parked (alternating with
                    "plain, none parked" on the same server)
- long-poll wake x1    one parked long-poll, one change: latency from the change command
                       (sent to the server process) to the answer
- long-poll wake xW    `waiters` long-polls from distinct droplets, then one change for all
                       of them at once: latency from the change command to each answer
Each scenario runs with a small cache (the client addresses only) and with N droplets;
the ratios say what the cache size and each path cost. With `wrk` on PATH (Debian:
apt-get install wrk) a wrk row is added (all requests from 127.0.0.1, itself a droplet):
the server's capacity without the Python client as the bottleneck.
Machine: 2 shared cores; the client and the server each get roughly one.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import aiohttp

PATH = "/v1/maintenance_event"


def droplet_ip(i: int) -> str:
    return f"127.1.{i // 250}.{i % 250 + 1}"


# ---- server process --------------------------------------------------------------------


def _server_main(droplets: int, conn, src: str | None = None) -> None:
    import logging

    if src:
        sys.path.insert(0, src)  # another checkout's endpoint (the baseline of --wake-compare)
    from ferry.metadata import server as server_module
    from ferry.metadata.cache import DropletCache, DropletRecord, MaintenanceState
    from ferry.metadata.server import MetadataServer

    if src:
        assert server_module.__file__.startswith(src), server_module.__file__

    logging.disable(logging.WARNING)
    live = MaintenanceState("live_migrate", "2030-01-01T00:00:00Z", "2030-01-01T00:10:00Z")
    none = MaintenanceState()

    def record(i: int, announced: bool) -> DropletRecord:
        return DropletRecord("bench", f"d{i}", droplet_ip(i), live if announced else none, "2030-01-01T00:00:00Z")

    records = [record(i, i % 2 == 0) for i in range(droplets)]
    records.append(DropletRecord("bench", "loopback", "127.0.0.1", live, "2030-01-01T00:00:00Z"))  # for wrk
    state = {i: i % 2 == 0 for i in range(droplets)}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        cache = DropletCache()
        server = MetadataServer(cache, "127.0.0.1", 0, max_waiters_per_address=10_000,
                                max_connections_per_address=100_000)
        await server.start()
        cache.replace(records, "1")
        done = asyncio.Event()

        def command(msg):  # runs on the loop, like the reflector's deliveries
            kind = msg[0]
            if kind == "flip":
                for i in msg[1]:
                    state[i] = not state[i]
                    cache.apply("MODIFIED", record(i, state[i]))
                conn.send(("ok", None))
            elif kind == "waiting":
                conn.send(("ok", server.endpoint.waiting))
            elif kind == "stop":
                conn.send(("ok", None))
                done.set()

        def reader() -> None:
            while True:
                try:
                    msg = conn.recv()
                except EOFError:
                    loop.call_soon_threadsafe(done.set)
                    return
                loop.call_soon_threadsafe(command, msg)
                if msg[0] == "stop":
                    return

        threading.Thread(target=reader, daemon=True).start()
        conn.send(("port", server.port))
        await done.wait()
        await server.stop()

    # the endpoint's own loop (`ferry metadata` runs on it), asyncio's where it has none
    getattr(server_module, "run_loop", asyncio.run)(main())


class ServerProcess:
    def __init__(self, droplets: int, src: str | None = None):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_server_main, args=(droplets, child, src), daemon=True)
        self.proc.start()
        kind, self.port = self.conn.recv()
        assert kind == "port"
        self.lock = threading.Lock()

    def call(self, *msg):
        with self.lock:
            self.conn.send(msg)
            kind, value = self.conn.recv()
        assert kind == "ok"
        return value

    def cpu_seconds(self) -> float | None:
        """CPU time the server process has used (Linux /proc), None elsewhere."""
        try:
            fields = open(f"/proc/{self.proc.pid}/stat").read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        try:
            self.call("stop")
        except (EOFError, BrokenPipeError):
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.terminate()


# ---- client ----------------------------------------------------------------------------


@dataclass
class Row:
    scenario: str
    droplets: int
    requests: int
    seconds: float
    latencies: list[float]
    errors: int = 0
    server_cpu: float | None = None  # seconds of server CPU spent on these requests

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def cpu_us_per_request(self) -> float | None:
        if self.server_cpu is None or not self.requests:
            return None
        return self.server_cpu / self.requests * 1e6

    def pct(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def _sessions(sources: list[str], per_source: int) -> list[aiohttp.ClientSession]:
    return [aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(src, 0), limit=per_source),
                                  timeout=aiohttp.ClientTimeout(total=120)) for src in sources]


async def _load(port: int, path: str, sources: list[str], concurrency: int, duration: float,
                scenario: str, droplets: int, expect: int = 200, server: "ServerProcess | None" = None) -> Row:
    sessions = _sessions(sources, max(1, concurrency // len(sources) + 1))
    url = f"http://127.0.0.1:{port}{path}"
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + duration

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            async with session.get(url) as r:
                await r.read()
                if r.status != expect:
                    errors += 1
            latencies.append(time.perf_counter() - t0)

    cpu0 = server.cpu_seconds() if server else None
    started = time.monotonic()
    try:
        await asyncio.gather(*(worker(sessions[i % len(sessions)]) for i in range(concurrency)))
    finally:
        for s in sessions:
            await s.close()
    elapsed = time.monotonic() - started
    cpu1 = server.cpu_seconds() if server else None
    cpu = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
    return Row(scenario, droplets, len(latencies), elapsed, latencies, errors, cpu)


async def _stale_etag_path(port: int, sources: list[str]) -> str:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(sources[0], 0))) as s:
        async with s.get(f"http://127.0.0.1:{port}{PATH}") as r:
            assert r.status == 200
    # Any other ETag than the current one answers at once (GCE's resume rule).
    return f"{PATH}?wait_for_change=true&timeout_sec=60&last_etag=stale"


async def _wait_waiting(server: ServerProcess, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while await asyncio.to_thread(server.call, "waiting") < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {server.call('waiting')} of {count} long-polls parked")
        await asyncio.sleep(0.05)


async def _park(port: int, sessions, indices, etags) -> list[asyncio.Task]:
    async def poll(session, etag):
        url = f"http://127.0.0.1:{port}{PATH}?wait_for_change=true&timeout_sec=120"
        if etag is not None:
            url += f"&last_etag={etag}"
        async with session.get(url) as r:
            body = await r.text()
            return time.perf_counter(), r.status, body, r.headers.get("ETag", "")

    return [asyncio.create_task(poll(sessions[k], etags[k])) for k in range(len(indices))]


class _PollConnection(asyncio.Protocol):
    """One droplet's keep-alive connection for long-polls, on a raw asyncio protocol: the
    wake-up rows time the endpoint, so the client must cost little per answer (aiohttp's client
    spends a few hundred microseconds on each, which at 10,000 answers in one process is
    seconds of its own queueing). The arrival time is taken when the answer's last byte is
    read, before any parsing."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.answer: asyncio.Future | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        head_end = self.buf.find(b"\r\n\r\n")
        if head_end < 0:
            return
        head = bytes(self.buf[:head_end]).decode("latin-1")
        length = 0
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.lower() == "content-length":
                length = int(value)
        if len(self.buf) < head_end + 4 + length:
            return
        t = time.perf_counter()
        body = bytes(self.buf[head_end + 4:head_end + 4 + length])
        del self.buf[:head_end + 4 + length]
        status = int(head.split(" ", 2)[1])
        etag = ""
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.lower() == "etag":
                etag = value.strip()
        if self.answer is not None and not self.answer.done():
            self.answer.set_result((t, status, body.decode(), etag))

    def connection_lost(self, exc) -> None:
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(ConnectionError(f"closed: {exc}"))

    def get(self, path: str) -> asyncio.Future:
        self.answer = asyncio.get_running_loop().create_future()
        self.transport.write(f"GET {path} HTTP/1.1\r\nHost: metadata\r\n\r\n".encode())
        return self.answer


async def _poll_connections(port: int, sources: list[str]) -> list[_PollConnection]:
    loop = asyncio.get_running_loop()
    conns = []
    for src in sources:
        _t, proto = await loop.create_connection(_PollConnection, "127.0.0.1", port, local_addr=(src, 0))
        conns.append(proto)
    return conns


async def _wake(server: ServerProcess, waiters: int, rounds: int, droplets: int) -> tuple[Row, list]:
    indices = list(range(min(waiters, droplets)))
    conns = await _poll_connections(server.port, [droplet_ip(i) for i in indices])
    try:
        etags = []
        for c in conns:
            _t, status, _body, etag = await c.get(PATH)
            assert status == 200, status
            etags.append(etag.strip('"'))
        latencies: list[float] = []
        bursts = []
        total_time = 0.0
        cpu = 0.0
        for _ in range(rounds):
            tasks = [c.get(f"{PATH}?wait_for_change=true&timeout_sec=120&last_etag={e}") for c, e in zip(conns, etags)]
            await _wait_waiting(server, len(indices))
            cpu0 = server.cpu_seconds()
            t_change = time.perf_counter()
            await asyncio.to_thread(server.call, "flip", indices)
            results = await asyncio.gather(*tasks)
            cpu1 = server.cpu_seconds()
            if cpu0 is not None and cpu1 is not None:
                cpu += cpu1 - cpu0
            last = max(t for t, *_ in results)
            total_time += last - t_change
            bursts.append(last - t_change)
            for t, status, _body, etag in results:
                assert status == 200
                latencies.append(t - t_change)
            etags = [etag.strip('"') for *_, etag in results]
        row = Row(f"long-poll wake x{len(indices)}", droplets, len(latencies), total_time, latencies,
                  server_cpu=cpu)
        return row, bursts
    finally:
        for c in conns:
            c.transport.close()


async def _plain_while_waiting(server: ServerProcess, waiters: int, droplets: int, sources, concurrency, duration,
                               slices: int = 2) -> tuple[Row, Row]:
    """Plain GETs with and without `waiters` parked long-polls, alternating, same server."""
    indices = list(range(len(sources), len(sources) + min(waiters, droplets - len(sources))))
    sessions = _sessions([droplet_ip(i) for i in indices], 2)
    rows: dict = {}
    try:
        for _ in range(slices):
            _merge(rows, await _load(server.port, PATH, sources, concurrency, duration / slices / 2,
                                     "plain, none parked", droplets, server=server))
            tasks = await _park(server.port, sessions, indices, [None] * len(indices))  # wait for a change
            await _wait_waiting(server, len(indices))
            _merge(rows, await _load(server.port, PATH, sources, concurrency, duration / slices / 2,
                                     f"plain, {len(indices)} parked", droplets, server=server))
            await asyncio.to_thread(server.call, "flip", indices)  # release them
            await asyncio.gather(*tasks)
        return tuple(rows.values())
    finally:
        for s in sessions:
            await s.close()


def _wrk(port: int, duration: float, connections: int, server: "ServerProcess | None" = None) -> Row | None:
    wrk = shutil.which("wrk")
    if not wrk:
        return None
    cpu0 = server.cpu_seconds() if server else None
    out = subprocess.run([wrk, "-t2", f"-c{connections}", f"-d{max(1, int(duration))}s", "--latency",
                          f"http://127.0.0.1:{port}{PATH}"], capture_output=True, text=True, timeout=60).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0}[p99.group(2)]
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    lat = [float(p50.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[p50.group(2)], float(p99.group(1)) * scale]
    cpu1 = server.cpu_seconds() if server else None
    row = Row("plain (wrk, 127.0.0.1)", 0, int(rps * duration), duration, [],
              server_cpu=cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None)
    row.latencies = [lat[0]] * 50 + [lat[1]] * 1  # p50 / p99 as wrk measured them
    return row


def _merge(rows: dict, row: Row) -> None:
    key = (row.scenario, row.droplets)
    if key not in rows:
        rows[key] = row
        return
    into = rows[key]
    into.requests += row.requests
    into.seconds += row.seconds
    into.latencies.extend(row.latencies)
    into.errors += row.errors
    if into.server_cpu is not None and row.server_cpu is not None:
        into.server_cpu += row.server_cpu
    else:
        into.server_cpu = None


def run_bench(droplets: int = 10_000, duration: float = 3.0, concurrency: int = 64, n_sources: int = 16,
              waiters: int = 1000, rounds: int = 3, small: int | None = None, use_wrk: bool = True,
              slices: int = 3) -> list[Row]:
    """Both caches (small and N droplets) are served at once by two processes, and every
    scenario alternates between them in `slices` slices, so that load from elsewhere on
    the machine falls on both sides of each ratio alike."""
    sources = [droplet_ip(i) for i in range(n_sources)]
    sizes = (small or n_sources, droplets)
    servers = {size: ServerProcess(size) for size in sizes}
    merged: dict = {}
    try:
        stale = asyncio.run(_stale_etag_path(servers[sizes[0]].port, sources))
        for scenario, path in (("healthz", "/healthz"), ("plain", PATH), ("json", PATH + ".json"),
                               ("long-poll stale", stale)):
            for _ in range(slices):
                for size in sizes:
                    _merge(merged, asyncio.run(_load(servers[size].port, path, sources, concurrency,
                                                     duration / slices, scenario, size, server=servers[size])))
        for _ in range(slices):
            for size in sizes:
                row, _ = asyncio.run(_wake(servers[size], 1, max(1, rounds * 5 // slices), size))
                row.scenario = "long-poll wake x1"
                _merge(merged, row)
        big = servers[droplets]
        for row in asyncio.run(_plain_while_waiting(big, waiters, droplets, sources, concurrency, duration)):
            _merge(merged, row)
        row, _ = asyncio.run(_wake(big, min(waiters, droplets), rounds, droplets))
        _merge(merged, row)
        if use_wrk:
            wrk_row = _wrk(big.port, duration, concurrency, big)
            if wrk_row is not None:
                wrk_row.droplets = droplets
                _merge(merged, wrk_row)
    finally:
        for server in servers.values():
            server.stop()
    first_seen: dict[str, int] = {}
    for scenario, _size in merged:
        first_seen.setdefault(scenario, len(first_seen))
    order = {size: i for i, size in enumerate(sizes)}
    return sorted(merged.values(), key=lambda r: (first_seen[r.scenario], order.get(r.droplets, 9)))


def print_table(rows: list[Row]) -> None:
    base = {r.droplets: r.rps for r in rows if r.scenario == "healthz"}
    small = {r.scenario: r for r in rows if r.droplets == min(x.droplets for x in rows)}
    print(f"{'scenario':<26}{'droplets':>9}{'requests':>10}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'vs healthz':>11}{'vs small':>10}{'srv us/req':>11}{'errors':>8}")
    for r in rows:
        waking = r.scenario.startswith("long-poll wake")
        vs_h = r.rps / base[r.droplets] if base.get(r.droplets) and not waking else None
        other = small.get(r.scenario)
        vs_s = None
        if other is not None and other is not r:
            # throughput ratio; for wake rows the p50 latency ratio (small / large)
            vs_s = (other.pct(0.5) / r.pct(0.5)) if waking else (r.rps / other.rps if other.rps else None)
        print(f"{r.scenario:<26}{r.droplets:>9}{r.requests:>10}{r.rps:>10.0f}{r.pct(0.50):>9.2f}{r.pct(0.99):>9.2f}"
              f"{(f'{vs_h:.2f}' if vs_h else '-'):>11}{(f'{vs_s:.2f}' if vs_s else '-'):>10}"
              f"{(f'{r.cpu_us_per_request:.0f}' if r.cpu_us_per_request else '-'):>11}{r.errors:>8}")
    print("vs healthz: throughput relative to /healthz on the same cache; vs small: relative to the same scenario")
    print("on the small cache (for wake rows: small-cache p50 / this p50). long-poll wake: req/s = answers per second")
    print("within the wake bursts; p50/p99 = from the change command to each answer. srv us/req: CPU time of the")
    print("server process per request (robust to other load on the machine, unlike req/s).")


def wake_compare(sizes: list[int], rounds: int, baseline_src: str, this_src: str | None = None) -> None:
    """Long-poll wake-ups only: for each size W, W droplets park a long-poll each and one
    change wakes them all; the endpoint of `baseline_src` (another checkout's operator/) and
    this tree's, alternating round by round on the same machine, the same client."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 10,000 waiters: 20,000 sockets
    try:
        import uvloop

        runner = uvloop.run  # the client too: the instrument must not be the bottleneck
    except ImportError:
        runner = asyncio.run
    print(f"{'waiters':>8}{'server':>10}{'answers':>9}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
          f"{'over 1 s':>9}{'srv us/answer':>15}{'p99 vs baseline':>17}")
    for w in sizes:
        lat: dict[str, list[float]] = {"baseline": [], "this": []}
        cpu: dict[str, float] = {"baseline": 0.0, "this": 0.0}
        servers = {"baseline": ServerProcess(w, baseline_src), "this": ServerProcess(w, this_src)}
        try:
            for _ in range(rounds):
                for label, server in servers.items():
                    row, _ = runner(_wake(server, w, 1, w))
                    lat[label].extend(row.latencies)
                    cpu[label] += row.server_cpu or 0.0
        finally:
            for server in servers.values():
                server.stop()
        p99 = {}
        for label, xs in lat.items():
            r = Row("wake", w, len(xs), 1.0, xs)
            p99[label] = r.pct(0.99)
            ratio = f"{p99[label] / p99['baseline']:.2f}x" if label == "this" else "-"
            print(f"{w:>8}{label:>10}{len(xs):>9}{r.pct(0.50):>9.1f}{r.pct(0.99):>9.1f}{max(xs) * 1000:>9.1f}"
                  f"{sum(1 for x in xs if x > 1.0):>9}{cpu[label] / len(xs) * 1e6:>15.0f}{ratio:>17}", flush=True)
    print("latency: from the change command sent to the server process to each answer read by the client")
    print("(one client process for all waiters, raw asyncio protocols, on uvloop where installed);")
    print("srv us/answer: the server process's CPU time over the burst (the change applied + every answer),")
    print("per answer: the figure a loaded machine does not distort.")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--droplets", type=int, default=10_000)
    p.add_argument("--duration", type=float, default=3.0, help="seconds per load scenario")
    p.add_argument("--concurrency", type=int, default=64, help="client connections")
    p.add_argument("--sources", type=int, default=16, help="client source addresses")
    p.add_argument("--waiters", type=int, default=1000, help="parked long-polls (distinct droplets)")
    p.add_argument("--rounds", type=int, default=3, help="wake rounds")
    p.add_argument("--no-wrk", action="store_true")
    p.add_argument("--wake-compare", default=None, metavar="BASELINE_SRC",
                   help="only the long-poll wake-ups, for --wake-sizes, against the endpoint of this "
                        "operator/ directory of another checkout (e.g. a worktree of main)")
    p.add_argument("--wake-sizes", default="1000,10000")
    args = p.parse_args(argv)
    if args.wake_compare:
        print(f"metadata endpoint long-poll wake-ups, loopback, {os.cpu_count()} cores, "
              f"python {sys.version.split()[0]}, {args.rounds} rounds each")
        wake_compare([int(x) for x in args.wake_sizes.split(",")], args.rounds, args.wake_compare)
        return
    print(f"metadata endpoint, loopback, {os.cpu_count()} cores, python {sys.version.split()[0]}")
    rows = run_bench(args.droplets, args.duration, args.concurrency, args.sources, args.waiters, args.rounds,
                     use_wrk=not args.no_wrk)
    print_table(rows)
    for r in rows:
        if r.scenario.startswith("long-poll wake") and r.droplets == args.droplets:
            print(f"{r.scenario} ({r.droplets} droplets): median {statistics.median(r.latencies) * 1000:.1f} ms, "
                  f"max {max(r.latencies) * 1000:.1f} ms over {len(r.latencies)} answers")


if __name__ == "__main__":
    main()
