"""The operator's own overhead per migration, with an instant data plane.

    .venv/bin/python tests/perf/bench_operator.py [--migrations 100] [--hosts 10]

Runs the real operator in this process (kopf's KopfRunner, the same handlers as
`ferry operator`) against a real kube-apiserver (FERRY_TEST_KUBECONFIG, or a fresh one from
hack/cluster.sh), and an "instant" data plane in a subprocess: a fake agent per host that
answers every migration step at once through the API (target Listening, copy Completed
with a digest, target Received, Running after the flip), so what is measured is the
operator, not the copy. Counts every API request the operator makes (kopf's aiohttp
calls and ferry's pykube calls) and the wall time per migration.

Baseline, measured in the same run: the fake agents' own API requests per migration (the
data plane's share of the protocol) and the latency of one bare status patch.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "operator"))

GROUP = "ferry.dev/v1alpha1"


def cluster() -> tuple[str, callable]:
    reuse = os.environ.get("FERRY_TEST_KUBECONFIG")
    if reuse:
        return reuse, lambda: None
    d = tempfile.mkdtemp(prefix="ferry-bench-")
    env = {**os.environ, "FERRY_CLUSTER_DIR": d}
    subprocess.run(["bash", str(ROOT / "hack" / "cluster.sh"), "up"], check=True, env=env, stdout=subprocess.DEVNULL)
    return f"{d}/kubeconfig", lambda: subprocess.run(["bash", str(ROOT / "hack" / "cluster.sh"), "down"], env=env,
                                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# --------------------------------------------------------------------------- the instant data plane

def fake_agents(kubeconfig: str, ns: str, hosts: list[str], stop_file: str, count_file: str) -> None:
    """Heartbeat every host; answer each LiveMigration step at once. Runs in a subprocess."""
    from ferry.storage import Kube, StorageError

    kube = Kube.connect(kubeconfig)
    state = {"beat": 0.0}
    while not os.path.exists(stop_file):
        try:
            _agents_step(kube, ns, hosts, state)
        except StorageError as exc:  # e.g. 429 while a fresh API server warms up
            print(f"fake agents: {exc}", file=sys.stderr)
            time.sleep(0.2)
    pathlib.Path(count_file).write_text(str(kube.requests))


def _agents_step(kube, ns: str, hosts: list[str], state: dict) -> None:
    from ferry.api.times import fmt, now

    last_beat = state["beat"]
    if True:
        if time.monotonic() - last_beat > 2:
            for h in hosts:
                kube.patch_status("Host", h, {"agent": {"address": "127.0.0.1", "driver": "fake",
                                                         "heartbeatTime": fmt(now(), fraction=True)}})
            state["beat"] = time.monotonic()
        items, rv = kube.list_with_version("LiveMigration", ns)
        droplets = {d["metadata"]["name"]: d for d in kube.list("Droplet", ns)}
        for m in items:
            st = m.get("status") or {}
            n = st.get("attempt") or 0
            phase = st.get("phase")
            tgt = st.get("target") or {}
            tr = st.get("transfer") or {}
            name = m["metadata"]["name"]
            t = fmt(now(), fraction=True)
            digest = f"sha256:{name}-{n}"
            if phase == "Preparing" and tgt.get("attempt") != n:
                kube.patch_status("LiveMigration", name, {"target": {"attempt": n, "state": "Listening",
                                                                      "address": "127.0.0.1:1", "updatedAt": t}}, ns)
            elif phase == "PreCopy" and tr.get("attempt") != n:
                kube.patch_status("LiveMigration", name, {
                    "transfer": {"attempt": n, "state": "Completed", "round": 1, "bytesSent": 1, "bytesTotal": 1,
                                 "progress": 100, "digest": digest, "downtimeMs": 1, "updatedAt": t},
                    "target": {"attempt": n, "state": "Received", "address": "127.0.0.1:1", "digest": digest,
                               "updatedAt": t}}, ns)
            elif phase == "CutOver" and tgt.get("state") != "Running":
                d = droplets.get(m["spec"]["droplet"])
                if d and (d.get("status") or {}).get("host") == st.get("targetHost"):
                    kube.patch_status("LiveMigration", name, {"target": {**tgt, "state": "Running",
                                                                          "updatedAt": t}}, ns)
        time.sleep(0.05)


# --------------------------------------------------------------------------- request counting

class Counter:
    def __init__(self) -> None:
        self.by_verb: collections.Counter = collections.Counter()
        self.lock = threading.Lock()
        self.enabled = False

        self.by_kind: collections.Counter = collections.Counter()

    def add(self, verb: str, watch: bool = False, url: str = "") -> None:
        if self.enabled:
            with self.lock:
                self.by_verb["WATCH" if watch else verb.upper()] += 1
                parts = [p for p in str(url).split("?")[0].split("/") if p]
                kind = next((p for p in parts if p in ("hosts", "droplets", "livemigrations", "events", "secrets")),
                            "other")
                sub = "/status" if parts and parts[-1] == "status" else ""
                self.by_kind[f"{verb.upper()} {kind}{sub}"] += 1


def instrument(counter: Counter) -> None:
    import aiohttp
    import requests

    orig_aio = aiohttp.ClientSession._request

    async def aio_request(self, method, url, *args, **kwargs):
        params = kwargs.get("params") or {}
        counter.add(method, watch="watch=true" in str(url) or str(params.get("watch", "")).lower() == "true", url=url)
        return await orig_aio(self, method, url, *args, **kwargs)

    aiohttp.ClientSession._request = aio_request
    orig_req = requests.Session.request

    def req(self, method, url, *args, **kwargs):
        if threading.current_thread() is threading.main_thread():
            return orig_req(self, method, url, *args, **kwargs)  # the benchmark's own calls
        params = kwargs.get("params") or {}
        counter.add(method, watch=str(params.get("watch", "")).lower() == "true", url=url)
        resp = orig_req(self, method, url, *args, **kwargs)
        if resp.status_code == 409:
            counter.add("conflict", url=url)
        return resp

    requests.Session.request = req


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--migrations", type=int, default=100)
    ap.add_argument("--hosts", type=int, default=10)
    ap.add_argument("--parallel", type=int, default=20, help="FERRY_MAX_PARALLEL for the run")
    args = ap.parse_args()

    kubeconfig, teardown = cluster()
    try:
        run(args, kubeconfig)
    finally:
        teardown()


def run(args: argparse.Namespace, kubeconfig: str) -> None:
    os.environ.update({"KUBECONFIG": kubeconfig, "FERRY_NOTICE_SECONDS": "0", "FERRY_METRICS_PORT": "0",
                       "FERRY_MAX_PARALLEL": str(args.parallel), "FERRY_MAX_OUTBOUND_PER_HOST": str(args.parallel),
                       "FERRY_MAX_INBOUND_PER_HOST": str(args.parallel), "FERRY_HEARTBEAT_TIMEOUT_SECONDS": "30"})
    from kopf.testing import KopfRunner

    from ferry.storage import Kube

    kube = Kube.connect(kubeconfig)
    ns = f"bench-{os.getpid()}"
    kube._call("post", "/api/v1/namespaces", "create ns", data=json.dumps({"metadata": {"name": ns}}),
               headers={"Content-Type": "application/json"})
    hosts = [f"bench-{os.getpid()}-h{i}" for i in range(args.hosts)]
    for h in hosts:
        kube.create("Host", {"apiVersion": GROUP, "kind": "Host", "metadata": {"name": h, "labels": {"bench": ns}},
                             "spec": {"datacenter": "nyc3",
                                      "capacity": {"cpu": 1000, "memoryMiB": 10**7, "diskGiB": 10**6}}})
    stop_file = tempfile.mktemp()
    count_file = tempfile.mktemp()
    agent = subprocess.Popen([sys.executable, __file__, "--fake-agents", kubeconfig, ns, ",".join(hosts),
                              stop_file, count_file], env={**os.environ, "PYTHONPATH": str(ROOT / "operator")})

    # baseline: one bare status patch round trip
    lat = []
    for _ in range(50):
        t0 = time.perf_counter()
        kube.patch_status("Host", hosts[0], {"droplets": 0})
        lat.append(time.perf_counter() - t0)

    counter = Counter()
    instrument(counter)
    runner = KopfRunner(["run", "--standalone", "-n", ns, "-m", "ferry.controller.handlers"])
    results: dict[str, float] = {}
    with runner:
        sel = f"bench={ns}"
        for _ in range(300):  # hosts Ready (fake heartbeats) before placing droplets
            if all((h.get("status") or {}).get("phase") == "Ready" for h in kube.list("Host", selector=sel)):
                break
            time.sleep(0.1)
        for i in range(args.migrations):
            kube.create("Droplet", {"apiVersion": GROUP, "kind": "Droplet", "metadata": {"name": f"d{i}"},
                                    "spec": {"size": "s-1vcpu-1gb", "datacenter": "nyc3"}}, ns)
        while sum(1 for d in kube.list("Droplet", ns) if (d.get("status") or {}).get("host")) < args.migrations:
            time.sleep(0.1)
        time.sleep(1)  # let placement writes settle before counting
        counter.enabled = True
        created: dict[str, float] = {}
        t_start = time.perf_counter()
        for i in range(args.migrations):
            kube.create("LiveMigration", {"apiVersion": GROUP, "kind": "LiveMigration", "metadata": {"name": f"m{i}"},
                                          "spec": {"droplet": f"d{i}"}}, ns)
            created[f"m{i}"] = time.perf_counter()
        done: dict[str, float] = {}
        while len(done) < args.migrations and time.perf_counter() - t_start < 600:
            for m in kube.list("LiveMigration", ns):
                name = m["metadata"]["name"]
                if name not in done and (m.get("status") or {}).get("phase") in ("Completed", "Failed", "Cancelled"):
                    done[name] = time.perf_counter()
                    results[name] = (m["status"]["phase"])
            time.sleep(0.1)
        wall = time.perf_counter() - t_start
        counter.enabled = False
    pathlib.Path(stop_file).write_text("stop")
    agent.wait(timeout=30)
    agent_requests = int(pathlib.Path(count_file).read_text())
    per = [done[k] - created[k] for k in done]
    completed = sum(1 for v in results.values() if v == "Completed")
    ops = sum(counter.by_verb.values())
    n = args.migrations
    print(f"\noperator overhead: {n} migrations, {args.hosts} hosts, max parallel {args.parallel}, "
          f"instant data plane, notice 0 s")
    print(f"{'':34}{'value':>12}")
    print(f"{'completed':34}{completed:>12}/{n}")
    print(f"{'wall time, all migrations':34}{wall:>11.1f}s")
    print(f"{'wall time per migration (mean)':34}{wall / n * 1000:>10.0f}ms")
    print(f"{'latency create->Completed p50':34}{statistics.median(per) * 1000:>10.0f}ms")
    print(f"{'latency create->Completed p95':34}{sorted(per)[int(0.95 * len(per)) - 1] * 1000:>10.0f}ms")
    print(f"{'operator API requests / migration':34}{ops / n:>12.1f}")
    for verb, c in sorted(counter.by_verb.items()):
        print(f"{'  ' + verb:34}{c / n:>12.1f}")
    for kind, c in sorted(counter.by_kind.items()):
        print(f"{'    ' + kind:34}{c / n:>12.1f}")
    print(f"{'baseline: fake agents requests / migr.':34}{agent_requests / n:>12.1f}   (polling lists included)")
    base = statistics.median(lat) * 1000
    print(f"{'baseline: one status patch p50':34}{base:>10.1f}ms")
    print(f"{'ratio: wall per migration / patch':34}{wall / n * 1000 / base:>11.1f}x")
    kube.delete("LiveMigration", "x", ns)
    for h in hosts:
        kube.delete("Host", h)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--fake-agents":
        fake_agents(sys.argv[2], sys.argv[3], sys.argv[4].split(","), sys.argv[5], sys.argv[6])
    else:
        main()
