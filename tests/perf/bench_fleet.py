"""The operator at fleet scale: a maintenance wave and a thousand migrations at once.

    .venv/bin/python tests/perf/bench_fleet.py [--droplets 1000] [--hosts 100]
        [--maintenance-hosts 10] [--migrations 1000] [--baseline-src DIR] [--repeat 1]

Full size (the figures of issue 16), with the code of another checkout (e.g. main)
measured in the same run as the baseline. It takes long: each run places and settles 1,000
droplets first, and on 2 cores shared with other work a scenario may hit `--timeout` (then
the table says how many completed); `--scenarios` runs one at a time:

    git worktree add --detach /tmp/ferry-base main
    .venv/bin/python tests/perf/bench_fleet.py --baseline-src /tmp/ferry-base/operator

Each run (one per code version and scenario, alternating, all against the same real
kube-apiserver: FERRY_TEST_KUBECONFIG, or a fresh one from hack/cluster.sh) gets its own
namespace, `hosts` Hosts and `droplets` Droplets placed by the operator, with the limits
raised so that the operator, not the limits, is what is measured (FERRY_MAX_PARALLEL and the
per-host limits = the number of droplets, notice 0 s). Processes, as in production:
- the operator under test (kopf, `ferry.controller.handlers`, from `--baseline-src` or this
  tree) in its own process, which counts its API requests (kopf's aiohttp and ferry's pykube
  calls), times each migration reconcile, and samples kopf's per-object queues of watch
  events waiting to be handled;
- the instant fake data plane of bench_operator.py (a fake agent per host answering every
  migration step at once through the API);
- the real metadata endpoint (`ferry metadata`, this tree's), which every droplet under
  migration asks from its own loopback address with long-polls (GCE's wait_for_change).

Scenarios:
- maintenance: `maintenance-hosts` hosts put into maintenance at once (spec.maintenance);
  the operator evacuates their droplets.
- migrations: `migrations` LiveMigrations created at once, one per droplet.

Figures per run: time until every droplet concerned is Announced (the endpoint answered
live_migrate to it: "missed" counts droplets whose move finished before the endpoint was
seen answering live_migrate), time until all migrations are terminal (drain), API requests,
writes and conflicts per migration (and each write by writer and what it carried), operator
CPU-seconds (from the scenario's start to its end: once all are terminal, the operator's last
write, e.g. its queued Events, within TAIL_MAX_SECONDS) and peak RSS (process lifetime), reconcile latency p50/p99 (one call of
migration_reconciler.reconcile, lock waits included) and where it goes (``Waits``: lock
waits, the storage calls' wait for a thread, the calls, the event loop), and the largest
number of watch events waiting in kopf's per-object queues (sampled every 50 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import json
import os
import pathlib
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
HERE = pathlib.Path(__file__).resolve().parent
GROUP = "ferry.dev/v1alpha1"
PATH = "/v1/maintenance_event"
TERMINAL = ("Completed", "Failed", "Cancelled")


def droplet_ip(i: int) -> str:
    return f"127.3.{i // 250}.{i % 250 + 1}"


# --------------------------------------------------------------------------- the operator process

def operator_process(src: str, ns: str, control: str) -> None:
    """Runs in a subprocess: the operator from ``src`` under kopf, measured from the moment the
    file ``control/count`` appears until ``control/stop`` does; then writes ``control/stats.json``."""
    sys.path.insert(0, str(HERE))
    import bench_operator  # noqa: E402 (puts this tree's operator/ on sys.path: ours goes first)

    sys.path.insert(0, src)
    import kopf._core.reactor.queueing as queueing
    from kopf.testing import KopfRunner

    from ferry.controller import migration_reconciler

    assert migration_reconciler.__file__.startswith(src), migration_reconciler.__file__
    counter = bench_operator.Counter()
    bench_operator.instrument(counter)
    status_writes: collections.Counter = collections.Counter()  # what each migration status write carried
    writes: collections.Counter = collections.Counter()  # every write, by writer, object and what it carried
    import kopf._cogs.clients.api as kopf_api
    import requests

    inner = requests.Session.request

    def request(self, method, url, *args, **kwargs):
        if (not counter.enabled or method.upper() not in WRITE_VERBS
                or threading.current_thread() is threading.main_thread()):
            return inner(self, method, url, *args, **kwargs)
        try:
            body = json.loads(kwargs.get("data") or "{}")
        except ValueError:
            body = {}
        what = classify(method, str(url), body)
        if what.startswith("LiveMigration status"):
            st = body.get("status", body)
            status_writes[f"{st.get('phase', '-')}/{st.get('reason', '-')}"] += 1
        resp = inner(self, method, url, *args, **kwargs)
        with counter.lock:
            writes[f"ferry {what}"] += 1
            if resp.status_code == 409:
                writes[f"ferry {what} (409 conflict)"] += 1
        return resp

    requests.Session.request = request
    kopf_patch = kopf_api.patch

    async def kopf_write(url, *args, payload=None, **kwargs):
        if counter.enabled:
            with counter.lock:
                writes["kopf " + classify("PATCH", str(url), payload if isinstance(payload, dict)
                                          else {"jsonPatch": payload})] += 1
        return await kopf_patch(url, *args, payload=payload, **kwargs)

    kopf_api.patch = kopf_write

    # kopf's per-object queues of live workers only: a worker that ends (5 s without events)
    # drops its queue. (A list of every queue ever made, pruned at 20,000, cost this sampling
    # loop ~20% of the operator process's GIL samples at 1,000 migrations: py-spy.)
    import weakref

    backlogs: weakref.WeakSet = weakref.WeakSet()
    orig_stream = queueing.Stream

    def stream(backlog, pressure):  # kopf's per-object queue of raw watch events
        backlogs.add(backlog)
        return orig_stream(backlog=backlog, pressure=pressure)

    queueing.Stream = stream
    latencies: list[float] = []
    waits: list[dict] = []  # per measured reconcile: where its time went (``Waits``)
    orig_reconcile = migration_reconciler.reconcile
    measuring = {"on": False}
    timing = Waits()
    timing.install()

    async def timed_reconcile(*args, **kwargs):
        t0 = time.perf_counter()
        acc = timing.begin()
        try:
            return await orig_reconcile(*args, **kwargs)
        finally:
            timing.end(acc)
            if measuring["on"]:
                latencies.append(time.perf_counter() - t0)
                waits.append(acc)

    migration_reconciler.reconcile = timed_reconcile
    ctl = pathlib.Path(control)
    max_queue = 0
    cpu0 = 0.0
    import logging

    logging.getLogger("kopf").setLevel(logging.WARNING)  # as `ferry operator` runs it (controller/main.py)
    runner = KopfRunner(["run", "--standalone", "-n", ns, "-m", "ferry.controller.handlers"], reraise=False)
    with runner:
        while not (ctl / "stop").exists():
            if not measuring["on"] and (ctl / "count").exists():
                cpu0 = _cpu_seconds()
                counter.enabled = measuring["on"] = True
            if measuring["on"]:
                try:
                    waiting = sum(b.qsize() for b in list(backlogs))
                except RuntimeError:
                    waiting = 0
                max_queue = max(max_queue, waiting)
            time.sleep(0.05)
        # Every migration is terminal; what they caused may still be queued (the Events, posted by
        # one task in the background): count on until the operator wrote nothing for 2 s.
        t_stop, last, quiet_since = time.monotonic(), None, time.monotonic()
        while time.monotonic() - quiet_since < 2.0 and time.monotonic() - t_stop < TAIL_MAX_SECONDS:
            total = sum(writes.values())
            if total != last:
                last, quiet_since = total, time.monotonic()
            time.sleep(0.1)
        tail = time.monotonic() - t_stop - (time.monotonic() - quiet_since)
        cpu = _cpu_seconds() - cpu0
        counter.enabled = False
        # written before kopf stops: stopping a thousand objects' workers may take long
        _write_stats(ctl, counter, cpu, latencies, max_queue, status_writes, writes, tail, None, None,
                     timing.summary(latencies, waits))
    _write_stats(ctl, counter, cpu, latencies, max_queue, status_writes, writes, tail, runner.exit_code,
                 runner.exception, timing.summary(latencies, waits))


class Waits:
    """Where a migration reconcile's time goes: each reconcile (``timed_reconcile``) gets an
    accumulator in a context variable (asyncio copies it into every task and thread the
    reconcile's own awaits run in), and the operator's waiting points add to it:

    - ``lock <kind>``: waiting to acquire a per-object lock (``Context.object_lock``: the
      migration's own, or a droplet's or host's taken by a nested reconcile or the record flip)
      or ``cx.lock`` (the decision lock);
    - ``executor queue``: a storage call (``Context.call``) waiting for a thread of the executor;
    - ``API call``: the call running in its thread (the request and its JSON; it may also wait
      for the GIL);
    - ``loop resume``: from the call's end in its thread to the reconcile running again on the
      event loop (the loop busy with other work);
    - ``rest``: the remainder: the reconcile's own code on the loop (observe, decide) and any
      other await not named above.

    Only waits of the reconcile's own task count (kopf's worker or the sweep's worker)."""

    PARTS = ("lock LiveMigration", "lock Droplet", "lock Host", "cx.lock", "executor queue", "API call",
             "loop resume")

    def __init__(self) -> None:
        import contextvars

        self.current = contextvars.ContextVar("ferry_bench_waits", default=None)
        self.queued = 0  # storage calls waiting for an executor thread now
        self.running = 0  # storage calls running in a thread now
        self.max_queued = 0
        self.max_running = 0
        self.calls: list[tuple[float, float]] = []  # (queue wait, run) of every storage call
        self.lock = threading.Lock()

    def begin(self) -> dict:
        task = asyncio.current_task()
        acc = {"calls": 0, "sweep": bool(task and task.get_name().startswith("ferry-sweep"))}
        acc["token"] = self.current.set(acc)
        return acc

    def end(self, acc: dict) -> None:
        self.current.reset(acc.pop("token"))

    def add(self, part: str, seconds: float) -> None:
        acc = self.current.get()
        if acc is not None:
            acc[part] = acc.get(part, 0.0) + seconds

    def install(self) -> None:
        from ferry.controller import app

        waits = self
        orig_call, orig_object_lock, orig_init = app.Context.call, app.Context.object_lock, app.Context.__init__

        class TimedLock:
            def __init__(self, lock, part: str) -> None:
                self.lock, self.part = lock, part

            async def __aenter__(self):
                t = time.perf_counter()
                await self.lock.acquire()
                waits.add(self.part, time.perf_counter() - t)
                return None

            async def __aexit__(self, *exc):
                self.lock.release()
                return False

            def locked(self) -> bool:
                return self.lock.locked()

        def object_lock(cx, key):
            return TimedLock(orig_object_lock(cx, key), f"lock {key[0]}")

        def init(cx, *args, **kwargs):
            orig_init(cx, *args, **kwargs)
            cx.lock = TimedLock(cx.lock, "cx.lock")

        async def call(cx, fn, *args, **kwargs):
            box: dict = {}
            submitted = time.perf_counter()
            with waits.lock:
                waits.queued += 1
                waits.max_queued = max(waits.max_queued, waits.queued)

            def run():
                box["start"] = time.perf_counter()
                with waits.lock:
                    waits.queued -= 1
                    waits.running += 1
                    waits.max_running = max(waits.max_running, waits.running)
                try:
                    return fn(*args, **kwargs)
                finally:
                    box["end"] = time.perf_counter()
                    with waits.lock:
                        waits.running -= 1

            try:
                return await orig_call(cx, run)
            finally:
                back = time.perf_counter()
                if "start" in box:
                    queue, ran = box["start"] - submitted, box["end"] - box["start"]
                    waits.add("executor queue", queue)
                    waits.add("API call", ran)
                    waits.add("loop resume", back - box["end"])
                    acc = waits.current.get()
                    if acc is not None:
                        acc["calls"] += 1
                    if len(waits.calls) < 1_000_000:
                        waits.calls.append((queue, ran))

        app.Context.call, app.Context.object_lock, app.Context.__init__ = call, object_lock, init

    def summary(self, latencies: list[float], accs: list[dict]) -> dict:
        """Mean seconds per part for every reconcile and for the slowest 1% (those at or over
        p99), and the storage calls' queue wait and run time percentiles."""
        pairs = sorted(zip(latencies, accs), key=lambda x: x[0])

        def parts(sel):
            n = max(1, len(sel))
            out = {p: sum(a.get(p, 0.0) for _, a in sel) / n for p in self.PARTS}
            total = sum(lat for lat, _ in sel) / n
            out["rest"] = total - sum(out.values())
            out["total"] = total
            out["calls"] = sum(a["calls"] for _, a in sel) / n
            out["n"] = len(sel)
            out["by_sweep"] = sum(1 for _, a in sel if a["sweep"])
            out["with_calls"] = sum(1 for _, a in sel if a["calls"])
            return out

        slow = pairs[int(0.99 * len(pairs)):] if pairs else []
        calls = list(self.calls)
        q = sorted(x for x, _ in calls)
        r = sorted(x for _, x in calls)
        return {"all": parts(pairs), "p99": parts(slow), "storage_calls": len(calls),
                "call_queue_p50_ms": _pct(q, 0.5) * 1000, "call_queue_p99_ms": _pct(q, 0.99) * 1000,
                "call_run_p50_ms": _pct(r, 0.5) * 1000, "call_run_p99_ms": _pct(r, 0.99) * 1000,
                "max_calls_queued": self.max_queued, "max_calls_running": self.max_running}


#: how long the figures wait, after the drain, for the operator's last writes (its Event queue)
TAIL_MAX_SECONDS = 240.0


def classify(method: str, url: str, body: dict) -> str:
    """One operator write as "<kind> <what it carried>": the table of writes by writer and kind."""
    parts = [x for x in url.split("?")[0].split("/") if x]
    kind = next((k for k, plural in (("LiveMigration", "livemigrations"), ("Droplet", "droplets"), ("Host", "hosts"),
                                     ("Secret", "secrets"), ("Event", "events")) if plural in parts), "other")
    verb = method.upper()
    if kind in ("Secret", "Event") or verb in ("POST", "DELETE"):
        return f"{kind} {'create' if verb == 'POST' else verb.lower()}"
    if parts[-1] == "status":
        st = body.get("status", body) if isinstance(body, dict) else {}
        keys = sorted(k for k in st if k != "metadata") if isinstance(st, dict) else []
        if kind == "LiveMigration":
            return "LiveMigration status"
        if kind == "Droplet":
            if "host" in keys:
                return "Droplet status host (the record flip)"
            what = ",".join(k for k in keys if k not in ("reason", "message", "observedGeneration"))
            return f"Droplet status {what}" + (f" {st['phase']}/{st.get('reason')}" if "phase" in st else "")
        return f"{kind} status"
    if "jsonPatch" in body:
        return f"{kind} finalizers (JSON patch)"
    meta = (body or {}).get("metadata") or {}
    what = []
    if "finalizers" in meta:
        what.append("finalizers")
    ann = meta.get("annotations") or {}
    if ann:
        if any(k.startswith("ferry.dev/maintenance") or k.endswith("maintenance-event") for k in ann):
            what.append("announcement " + ("cleared" if all(v is None for v in ann.values()) else "set"))
        other = sorted(k for k in ann if "maintenance" not in k)
        if other:
            what.append("annotations " + ",".join(other))
    if "labels" in meta:
        what.append("labels")
    if "spec" in (body or {}):
        what.append("spec")
    return f"{kind} {'+'.join(what) or 'metadata'}"


def _write_stats(ctl, counter, cpu, latencies, max_queue, status_writes, writes, tail, exit_code,
                 exception, breakdown) -> None:
    lat = sorted(latencies)
    stats = {
        "by_verb": dict(counter.by_verb), "by_kind": dict(counter.by_kind), "cpu_seconds": cpu,
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "reconciles": len(lat), "reconcile_p50_ms": _pct(lat, 0.50) * 1000, "reconcile_p99_ms": _pct(lat, 0.99) * 1000,
        "max_queue": max_queue, "status_writes": dict(status_writes), "writes": dict(writes), "tail_s": tail,
        "exit_code": exit_code, "breakdown": breakdown,
        "exception": repr(exception) if exception else None,
    }
    tmp = ctl / "stats.json.tmp"
    tmp.write_text(json.dumps(stats))
    tmp.replace(ctl / "stats.json")


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _pct(ordered: list[float], q: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --------------------------------------------------------------------------- announcement watch

class AnnounceWatch:
    """Each droplet asks the metadata endpoint from its own address, with long-polls, until it
    hears ``live_migrate``; the time it first heard it is recorded. Runs its own event loop."""

    def __init__(self, port: int):
        self.port = port
        self.heard: dict[str, float] = {}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.tasks: list = []

    def watch(self, names_ips: list[tuple[str, str]]) -> None:
        for name, ip in names_ips:
            self.tasks.append(asyncio.run_coroutine_threadsafe(self._one(name, ip), self.loop))

    async def _one(self, name: str, ip: str) -> None:
        import aiohttp

        url = f"http://127.0.0.1:{self.port}{PATH}"
        conn = aiohttp.TCPConnector(local_addr=(ip, 0), limit=1)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=None)) as s:
            etag = None
            while True:
                q = "?wait_for_change=true&timeout_sec=600" + (f"&last_etag={etag}" if etag else "")
                try:
                    async with s.get(url + (q if etag else "")) as r:
                        body = await r.text()
                        etag = r.headers.get("ETag", "").strip('"') or None
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
                    continue
                if r.status == 200 and body.strip() == "live_migrate":
                    self.heard.setdefault(name, time.perf_counter())
                    return
                if r.status != 200:
                    await asyncio.sleep(0.1)

    def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        self.loop.call_soon_threadsafe(self.loop.stop)


# --------------------------------------------------------------------------- one run

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def wait_for(what: str, cond, timeout: float, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(every)


def run_once(kubeconfig: str, label: str, src: str, scenario: str, args: argparse.Namespace) -> dict:
    from ferry.storage import Conflict, Kube

    kube = Kube.connect(kubeconfig)
    tag = f"{os.getpid()}-{label}-{scenario[:5]}".lower()
    ns = f"fleet-{tag}"
    kube._call("post", "/api/v1/namespaces", "create ns", data=json.dumps({"metadata": {"name": ns}}),
               headers={"Content-Type": "application/json"})
    hosts = [f"fleet-{tag}-h{i}" for i in range(args.hosts)]
    pool = concurrent.futures.ThreadPoolExecutor(8)
    list(pool.map(lambda h: kube.create("Host", {
        "apiVersion": GROUP, "kind": "Host", "metadata": {"name": h, "labels": {"bench": ns}},
        "spec": {"datacenter": "nyc3", "capacity": {"cpu": 1000, "memoryMiB": 10**7, "diskGiB": 10**6}}}), hosts))
    limit = str(max(args.droplets, args.migrations))
    # FERRY_NAMESPACE: the operator loads its run's namespace only. Without it, it loaded every
    # namespace: an earlier run's droplets (same addresses: AddressConflict on every droplet) and
    # its unfinished migrations (holding concurrency slots), left behind in a namespace kept
    # Terminating by their finalizers, slowed whichever version ran second.
    env = {**os.environ, "KUBECONFIG": kubeconfig, "FERRY_NAMESPACE": ns, "FERRY_NOTICE_SECONDS": "0",
           "FERRY_METRICS_PORT": "0",
           "FERRY_MAX_PARALLEL": limit, "FERRY_MAX_OUTBOUND_PER_HOST": limit, "FERRY_MAX_INBOUND_PER_HOST": limit,
           "FERRY_HEARTBEAT_TIMEOUT_SECONDS": "600", "FERRY_PROGRESS_TIMEOUT_SECONDS": "3600",
           "FERRY_BUDGET_BASE_SECONDS": "3600"}
    ctl = pathlib.Path(tempfile.mkdtemp(prefix="fleet-ctl-"))
    stop_agents, agent_count = tempfile.mktemp(), tempfile.mktemp()
    procs = []
    try:
        agents = subprocess.Popen([sys.executable, str(HERE / "bench_operator.py"), "--fake-agents", kubeconfig, ns,
                                   ",".join(hosts), stop_agents, agent_count],
                                  env={**env, "PYTHONPATH": str(ROOT / "operator")})
        procs.append(agents)
        op_log = open(ctl / "operator.log", "w")
        operator = subprocess.Popen([sys.executable, __file__, "--operator-process", src, ns, str(ctl)], env=env,
                                    stdout=op_log, stderr=subprocess.STDOUT)
        procs.append(operator)
        port = free_port()
        md_log = open(ctl / "metadata.log", "w")
        metadata = subprocess.Popen([sys.executable, "-c", "from ferry.cli.main import main; main()",
                                     "--kubeconfig", kubeconfig, "-n", ns, "metadata", "--listen", f"127.0.0.1:{port}"],
                                    env={**env, "PYTHONPATH": str(ROOT / "operator")}, stdout=md_log,
                                    stderr=subprocess.STDOUT)
        procs.append(metadata)
        wait_for("hosts Ready", lambda: all((h.get("status") or {}).get("phase") == "Ready"
                                            for h in kube.list("Host", selector=f"bench={ns}")), 600, 0.5)

        def droplet(i: int) -> None:
            # A fleet that exists already: placed round-robin by the benchmark (record and label
            # as the operator writes them), so that the operator's own placement is not the setup.
            h = hosts[i % len(hosts)]
            body = kube.create("Droplet", {
                "apiVersion": GROUP, "kind": "Droplet",
                "metadata": {"name": f"d{i}", "labels": {"ferry.dev/host": h}},
                "spec": {"size": "s-1vcpu-1gb", "datacenter": "nyc3", "ip": droplet_ip(i)}}, ns)
            try:
                kube.patch_status("Droplet", f"d{i}", {"host": h, "phase": "Placed", "reason": "Placed",
                                                        "message": f"placed on {h}"}, ns,
                                  resource_version=body["metadata"]["resourceVersion"])
            except Conflict:
                pass  # the running operator placed it first (its own choice of host): fine too

        list(pool.map(droplet, range(args.droplets)))

        def all_placed():
            ds = kube.list("Droplet", ns)
            return ds if all((d.get("status") or {}).get("host") for d in ds) else None

        placed = wait_for("droplets placed", all_placed, 900, 1.0)
        wait_for("metadata endpoint ready", lambda: _ready(port), 60, 0.2)
        where = {d["metadata"]["name"]: d["status"]["host"] for d in placed}
        # Let the operator's first writes on the fleet (droplet phases) settle before counting:
        # no droplet changed for 3 s.
        quiet = {"rv": None, "since": time.monotonic()}

        def settled() -> bool:
            rv = max(int(d["metadata"]["resourceVersion"]) for d in kube.list("Droplet", ns))
            if rv != quiet["rv"]:
                quiet.update(rv=rv, since=time.monotonic())
            return time.monotonic() - quiet["since"] >= 3

        wait_for("the fleet settled", settled, 600, 0.5)
        (ctl / "count").write_text("")
        spy = None
        if args.profile:  # py-spy samples the operator process while it is measured
            pathlib.Path(args.profile).mkdir(parents=True, exist_ok=True)
            out = pathlib.Path(args.profile) / f"{label}-{scenario}.txt"
            spy = subprocess.Popen([str(pathlib.Path(sys.executable).parent / "py-spy"), "record", "-p",
                                    str(operator.pid), "--format", "raw", "--rate", "50", "--gil", "-o", str(out)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(spy)
        watch = AnnounceWatch(port)
        t0 = time.perf_counter()
        if scenario == "maintenance":
            by_host = collections.Counter(where.values())
            drained = [h for h, _ in by_host.most_common(args.maintenance_hosts)]
            concerned = sorted(d for d, h in where.items() if h in drained)
            watch.watch([(d, droplet_ip(int(d[1:]))) for d in concerned])
            for h in drained:
                kube.patch("Host", h, {"spec": {"maintenance": {"reason": "fleet benchmark"}}})
        else:
            concerned = [f"d{i}" for i in range(min(args.migrations, args.droplets))]
            watch.watch([(d, droplet_ip(int(d[1:]))) for d in concerned])
            list(pool.map(lambda d: kube.create("LiveMigration", {
                "apiVersion": GROUP, "kind": "LiveMigration", "metadata": {"name": f"m-{d}"},
                "spec": {"droplet": d}}, ns), concerned))
        t_created = time.perf_counter() - t0
        want = set(concerned)
        t_announced = None
        migrations: list = []

        def finished():
            nonlocal t_announced, migrations
            if t_announced is None and want <= set(watch.heard):
                t_announced = max(watch.heard.values()) - t0
            migrations = kube.list("LiveMigration", ns)
            mine = {m["spec"]["droplet"]: (m.get("status") or {}).get("phase") for m in migrations}
            return want <= set(mine) and all(mine[d] in TERMINAL for d in want)

        try:
            wait_for("migrations terminal", finished, args.timeout, 0.5)
            t_drain = time.perf_counter() - t0
        except TimeoutError:
            t_drain = None  # reported as not finished: "completed" says how far it got
        finished()
        watch.close()
        phases = collections.Counter((m.get("status") or {}).get("phase") for m in migrations)
        heard = {d: t - t0 for d, t in watch.heard.items() if d in want}
        if t_announced is None and heard:
            t_announced = max(heard.values())
        (ctl / "stop").write_text("")
        wait_for("the operator's figures", lambda: (ctl / "stats.json").exists(), 300, 0.2)
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its samples on SIGINT
            spy.wait(timeout=60)
        try:
            operator.wait(timeout=120)
        except subprocess.TimeoutExpired:
            operator.kill()  # kopf still stopping its workers; the figures are written
        stats = json.loads((ctl / "stats.json").read_text())
        return {"label": label, "scenario": scenario, "migrations": len(want), "completed": phases.get("Completed", 0),
                "create_s": t_created, "announced_s": t_announced, "announced": len(heard), "missed": len(want) - len(heard),
                "announce_p50_s": statistics.median(heard.values()) if heard else None, "drain_s": t_drain, **stats}
    finally:
        pathlib.Path(stop_agents).write_text("stop")
        (ctl / "stop").write_text("")
        for p in reversed(procs):
            if p.poll() is None:
                if p is not procs[0]:
                    p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
        for h in hosts:
            kube.delete("Host", h)
            try:  # kopf's finalizer, if the operator left before it saw the deletion
                kube.patch("Host", h, {"metadata": {"finalizers": None}})
            except Exception:  # noqa: BLE001 - gone already
                pass
        kube._call("delete", f"/api/v1/namespaces/{ns}", "delete ns")


# --------------------------------------------------------------------------- report

ROWS = [
    ("migrations", "migrations", "{:.0f}"),
    ("completed", "completed", "{:.0f}"),
    ("time until all Announced, s", "announced_s", "{:.1f}"),
    ("  Announced p50, s", "announce_p50_s", "{:.1f}"),
    ("  missed (moved before heard)", "missed", "{:.0f}"),
    ("time to drain (all terminal), s", "drain_s", "{:.1f}"),
    ("  operator writing after that, s", "tail_s", "{:.1f}"),
    ("API requests / migration", "req_per", "{:.1f}"),
    ("  writes / migration", "writes_per", "{:.1f}"),
    ("  conflicts / migration", "conflicts_per", "{:.2f}"),
    ("  Events posted / migration", "events_per", "{:.2f}"),
    ("operator CPU, s", "cpu_seconds", "{:.1f}"),
    ("operator CPU / migration, ms", "cpu_per_ms", "{:.0f}"),
    ("operator peak RSS, MiB", "max_rss_mib", "{:.0f}"),
    ("reconciles", "reconciles", "{:.0f}"),
    ("reconcile latency p50, ms", "reconcile_p50_ms", "{:.1f}"),
    ("reconcile latency p99, ms", "reconcile_p99_ms", "{:.1f}"),
    ("largest queue of events waiting", "max_queue", "{:.0f}"),
]
WRITE_VERBS = ("POST", "PATCH", "PUT", "DELETE")


def derive(r: dict) -> dict:
    n = max(1, r["migrations"])
    verbs = r["by_verb"]
    requests = sum(v for k, v in verbs.items() if k != "CONFLICT")
    events = sum(v for k, v in r["by_kind"].items() if k.startswith("POST events"))
    return {**r, "req_per": requests / n, "writes_per": sum(verbs.get(v, 0) for v in WRITE_VERBS) / n,
            "conflicts_per": verbs.get("CONFLICT", 0) / n, "events_per": events / n,
            "cpu_per_ms": r["cpu_seconds"] / n * 1000}


def mean_of(runs: list[dict]) -> dict:
    out = dict(runs[0])
    for _, key, _ in ROWS:
        vals = [r[key] for r in runs if r.get(key) is not None]
        out[key] = statistics.mean(vals) if vals else None
    return out


def print_report(results: list[dict], args: argparse.Namespace) -> None:
    labels = list(dict.fromkeys(r["label"] for r in results))
    for scenario in dict.fromkeys(r["scenario"] for r in results):
        what = (f"{args.maintenance_hosts} of {args.hosts} hosts into maintenance at once" if scenario == "maintenance"
                else f"{args.migrations} LiveMigrations created at once")
        print(f"\nfleet: {args.droplets} droplets on {args.hosts} hosts; {what}; instant data plane, notice 0 s, "
              f"limits {max(args.droplets, args.migrations)}; {args.repeat} run(s) each, mean")
        cols = {lb: mean_of([derive(r) for r in results if r["label"] == lb and r["scenario"] == scenario])
                for lb in labels}
        head = f"{'':36}" + "".join(f"{lb:>14}" for lb in labels)
        if len(labels) == 2:
            head += f"{labels[1] + '/' + labels[0]:>16}"
        print(head)
        for title, key, fmt in ROWS:
            vals = [cols[lb].get(key) for lb in labels]
            line = f"{title:36}" + "".join(f"{(fmt.format(v) if v is not None else '-'):>14}" for v in vals)
            if len(vals) == 2 and vals[0] and vals[1] is not None and key not in ("migrations", "completed"):
                line += f"{vals[1] / vals[0]:>15.2f}x"
            print(line)
        for lb in labels:
            kinds = collections.Counter()
            for r in results:
                if r["label"] == lb and r["scenario"] == scenario:
                    kinds.update(r["by_kind"])
            n = sum(r["migrations"] for r in results if r["label"] == lb and r["scenario"] == scenario) or 1
            writes = ", ".join(f"{k} {v / n:.2f}" for k, v in sorted(kinds.items())
                               if k.split()[0] in WRITE_VERBS)
            print(f"  {lb} writes per migration by kind: {writes}")
            sw = collections.Counter()
            for r in results:
                if r["label"] == lb and r["scenario"] == scenario:
                    sw.update(r.get("status_writes") or {})
            ws = collections.Counter()
            for r in results:
                if r["label"] == lb and r["scenario"] == scenario:
                    ws.update(r.get("writes") or {})
            if ws:
                print(f"  {lb} writes per migration by writer and what they carry:")
                for k, v in sorted(ws.items()):
                    print(f"    {k:64}{v / n:8.2f}")
            print(f"  {lb} migration status writes per migration (phase/reason): "
                  + ", ".join(f"{k} {v / n:.2f}" for k, v in sw.most_common()))
        print_breakdown([r for r in results if r["scenario"] == scenario], labels)
        for r in results:
            if r["scenario"] == scenario and (r.get("exception") or r.get("exit_code") not in (0, None)):
                print(f"  {r['label']}: operator exit {r.get('exit_code')} {r.get('exception')}")


def print_breakdown(results: list[dict], labels: list[str]) -> None:
    """Where the migration reconciles' time went (``Waits``), per version: the mean of every
    reconcile and of the slowest 1%, in ms and as a share of the latency."""
    print("\n  where a migration reconcile's time goes (mean per reconcile, ms, and share of its latency)")
    head = f"  {'':22}" + "".join(f"{lb + ' all':>18}{lb + ' slowest 1%':>22}" for lb in labels)
    print(head)
    rows = [*Waits.PARTS, "rest", "total"]
    b = {lb: [r.get("breakdown") or {} for r in results if r["label"] == lb] for lb in labels}
    for part in rows:
        line = f"  {part:22}"
        for lb in labels:
            for which, width in (("all", 18), ("p99", 22)):
                vals = [x[which][part] for x in b[lb] if which in x]
                tots = [x[which]["total"] for x in b[lb] if which in x]
                if vals and sum(tots) > 0:
                    v = statistics.mean(vals)
                    cell = f"{v * 1000:.1f} ({v / statistics.mean(tots):.0%})" if part != "total" else f"{v * 1000:.1f}"
                else:
                    cell = "-"
                line += f"{cell:>{width}}"
        print(line)
    for lb in labels:
        for x in b[lb]:
            if x:
                print(f"  {lb}: {x['all']['n']} reconciles, {x['all']['by_sweep']} of them the sweep's looks (the "
                      f"others watch events), {x['all']['with_calls']} made a storage call")
                print(f"  {lb}: storage calls per reconcile {x['all']['calls']:.1f} (slowest 1%: {x['p99']['calls']:.1f}); "
                      f"{x['storage_calls']} storage calls, executor queue wait p50/p99 {x['call_queue_p50_ms']:.1f}/"
                      f"{x['call_queue_p99_ms']:.1f} ms, run p50/p99 {x['call_run_p50_ms']:.1f}/{x['call_run_p99_ms']:.1f} ms, "
                      f"at most {x['max_calls_queued']} queued and {x['max_calls_running']} running at once")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--droplets", type=int, default=1000)
    ap.add_argument("--hosts", type=int, default=100)
    ap.add_argument("--maintenance-hosts", type=int, default=10)
    ap.add_argument("--migrations", type=int, default=1000)
    ap.add_argument("--scenarios", default="maintenance,migrations")
    ap.add_argument("--baseline-src", default=None,
                    help="the operator/ directory of another checkout, measured first as 'baseline'")
    ap.add_argument("--this-src", default=str(ROOT / "operator"),
                    help="the operator/ directory measured as 'this' (default: this tree's); the metadata "
                         "endpoint and the fake agents always run this tree's code")
    ap.add_argument("--only-baseline", action="store_true", help="measure --baseline-src only")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds a scenario may take")
    ap.add_argument("--json", default=None, help="also write every run's figures here")
    ap.add_argument("--profile", default=None,
                    help="a directory: py-spy samples each measured operator (threads holding the GIL) into <label>-<scenario>.txt "
                         "(raw collapsed stacks, e.g. for flamegraph.pl or speedscope)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "operator"))
    sys.path.insert(0, str(HERE))
    from bench_operator import cluster

    versions = [("baseline", str(pathlib.Path(args.baseline_src).resolve()))] if args.baseline_src else []
    if not args.only_baseline:
        versions.append(("this", str(pathlib.Path(args.this_src).resolve())))
    kubeconfig, teardown = cluster()
    results = []
    try:
        for _ in range(args.repeat):
            for scenario in args.scenarios.split(","):
                for label, src in versions:
                    t = time.perf_counter()
                    r = run_once(kubeconfig, label, src, scenario, args)
                    print(f"# {label} {scenario}: {r['completed']}/{r['migrations']} completed, drain "
                          f"{r['drain_s']} s (run {time.perf_counter() - t:.0f} s)", flush=True)
                    results.append(r)
    finally:
        teardown()
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1))
    print_report(results, args)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--operator-process":
        operator_process(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        main()
