"""A real Prometheus (Debian's package, 2.42) scrapes the local stack on loopback: the
operator and each agent serve /metrics, and PromQL during a throttled live migration shows
its remaining bytes falling and the throttle; once it completes its series are gone."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
from stack import Stack, free_port
from support import wait_until

SCRAPE_INTERVAL = "500ms"


def http_get(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback only
        return r.read().decode()


class Prometheus:
    def __init__(self, binary: str, workdir: pathlib.Path, targets: dict[str, list[str]]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": hosts}]}
                               for job, hosts in targets.items()],
        }
        (workdir / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.log = open(workdir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def query(self, promql: str, **params: str) -> list[dict]:
        path = "query_range" if "start" in params else "query"
        qs = urllib.parse.urlencode({"query": promql, **params})
        body = json.loads(http_get(f"{self.url}/api/v1/{path}?{qs}"))
        assert body["status"] == "success", body
        return body["data"]["result"]

    def ready(self) -> bool:
        assert self.proc.poll() is None, f"prometheus exited {self.proc.returncode}: see {self.log.name}"
        try:
            return "Ready" in http_get(f"{self.url}/-/ready", timeout=1)
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def stack(ferry_process, kubectl, namespace):
    # 10 MiB disk and 512 KiB memory per droplet: a copy at 1 MiB/s lasts long enough to watch
    s = Stack(ferry_process, kubectl, namespace, env={"FERRY_SIZE_SCALE": "0.001"})
    yield s
    s.close()


def test_prometheus_sees_a_migration_fall_and_the_throttle(stack, tmp_path):
    binary = shutil.which("prometheus")
    assert binary, "prometheus not found: hack/setup.sh installs Debian's prometheus package"
    ports = {"operator": free_port(), "a": free_port(), "b": free_port()}
    a, b = stack.host("a", agent=False), stack.host("b", agent=False)
    stack.start_agent(a, env={"FERRY_AGENT_METRICS_PORT": str(ports["a"])})
    stack.start_agent(b, env={"FERRY_AGENT_METRICS_PORT": str(ports["b"])})
    stack.start_operator(env={"FERRY_METRICS_PORT": str(ports["operator"]), "FERRY_LOG_FORMAT": "json"})
    prom = Prometheus(binary, tmp_path, {
        "ferry-operator": [f"127.0.0.1:{ports['operator']}"],
        "ferry-agent": [f"127.0.0.1:{ports['a']}", f"127.0.0.1:{ports['b']}"],
    })
    try:
        wait_until(prom.ready, 30, what="prometheus ready")
        wait_until(lambda: len([r for r in prom.query("up") if r["value"][1] == "1"]) == 3, 30,
                   what="prometheus scraping the operator and both agents")
        stack.wait_hosts_ready()
        # the guest dirties 3 MiB/s, the link carries 1 MiB/s: pre-copy alone cannot converge
        stack.droplet("web", write_kibps=3072, pattern="uniform")
        src = stack.wait_running("web")
        start = time.time()
        stack.migrate("web", limits={"bandwidthMiBps": 1, "downtimeMs": 50})
        sel = f'namespace="{stack.ns}",migration="move"'
        remaining_q = f"ferry_migration_remaining_bytes{{{sel}}}"
        throttle_q = f"ferry_migration_throttle_ratio{{{sel}}}"
        # during the copy: one scrape of the source agent, as Prometheus reads it
        wait_until(lambda: prom.query(throttle_q) and float(prom.query(throttle_q)[0]["value"][1]) > 0, 90,
                   interval=0.5, what="the throttle applied, seen by Prometheus")
        excerpt = http_get(f"http://127.0.0.1:{ports['a' if src == a else 'b']}/metrics")
        print("\n--- scrape of the source agent during the migration (ferry_* lines) ---")
        print("\n".join(line for line in excerpt.splitlines() if line.startswith("ferry_")))
        op = http_get(f"http://127.0.0.1:{ports['operator']}/metrics")
        print("--- scrape of the operator (fleet lines) ---")
        print("\n".join(line for line in op.splitlines()
                        if line.startswith(("ferry_host_migrations_in_flight", "ferry_host_droplets",
                                            "ferry_migration_last_progress"))))
        st = stack.wait_phase("move", "Completed", timeout=120)
        end = time.time()
        assert st["transfer"]["maxThrottlePercent"] > 0, st["transfer"]

        # PromQL over the migration: remaining bytes falling, the throttle when it applied
        span = {"start": f"{start:.3f}", "end": f"{end:.3f}", "step": "1"}
        [remaining] = prom.query(remaining_q, **span)
        [throttle] = prom.query(throttle_q, **span)
        rem = [(float(t) - start, int(float(v))) for t, v in remaining["values"]]
        thr = [(float(t) - start, float(v)) for t, v in throttle["values"]]
        print(f"--- query_range {remaining_q} (s since the LiveMigration was created, bytes) ---")
        print(" ".join(f"{t:.0f}s:{v}" for t, v in rem))
        print(f"--- query_range {throttle_q} ---")
        print(" ".join(f"{t:.0f}s:{v:g}" for t, v in thr))
        assert remaining["metric"]["droplet"] == "web" and remaining["metric"]["host"] == src
        peak = max(v for _, v in rem)
        assert rem[0][1] > 0 and rem[-1][1] < peak / 2, "remaining bytes fall over the migration"
        steps = [v for _, v in thr]
        assert steps == sorted(steps) and 0 < steps[-1] <= st["transfer"]["maxThrottlePercent"] / 100, \
            "the throttle applies in steps and never drops during the attempt"
        throttled_at = next(t for t, v in thr if v > 0)
        assert rem[-1][1] < min(v for t, v in rem if t <= throttled_at), "the throttle made the copy converge"

        # the story as the user reads it: `ferry report` and its picture
        svg = tmp_path / "move.svg"
        env = {**os.environ, "KUBECONFIG": stack.kubectl.kubeconfig}
        report = subprocess.run([sys.executable, "-m", "ferry.cli.main", "-n", stack.ns, "report", "move", "--svg",
                                 str(svg)], env=env, capture_output=True, text=True, timeout=60)
        print(f"--- ferry report move --svg {svg} ---")
        print(report.stdout + report.stderr)
        assert report.returncode == 0 and "pause: downtime" in report.stdout and svg.read_text().startswith("<svg")

        # the operator's JSON log: one line per phase transition, naming the migration
        records = [json.loads(line) for line in stack.operator.log.splitlines() if line.startswith("{")]
        moves = [r for r in records if r.get("migration") == f"{stack.ns}/move"]
        print("--- operator log (FERRY_LOG_FORMAT=json), the migration's transitions ---")
        print("\n".join(json.dumps(r) for r in moves))
        assert [r["phase"] for r in moves] == ["Pending", "Announced", "Scheduling", "Preparing", "PreCopy",
                                               "CutOver", "Completed"]
        assert all(f"migration {stack.ns}/move: " in r["message"] for r in moves)

        # finished: the agent serves no series for it any more, and Prometheus marks them stale
        wait_until(lambda: not prom.query(remaining_q), 20, what="the finished migration's series gone")
        assert "ferry_migration_remaining_bytes{" not in http_get(f"http://127.0.0.1:{ports['a']}/metrics")
        # ... and the operator counted the outcome and observed its rounds
        wait_until(lambda: [float(r["value"][1]) for r in
                            prom.query('ferry_migrations_total{result="Completed",reason="Completed"}')] == [1.0]
                   and [float(r["value"][1]) for r in prom.query("ferry_migration_rounds_count")] == [1.0],
                   10, what="the outcome and the rounds histogram scraped")
    finally:
        prom.stop()
