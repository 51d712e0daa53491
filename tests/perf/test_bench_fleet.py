"""Smoke test: the fleet benchmark runs end to end at a small size (no timing asserted).

The full size (1,000 droplets on 100 hosts, 10 hosts drained, 1,000 migrations at once) is
`.venv/bin/python tests/perf/bench_fleet.py --baseline-src <a checkout of main>/operator`."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.timeout(1200)  # four operator runs on a shared machine; no timing is asserted
def test_fleet_benchmark_runs(kubeconfig, tmp_path):
    out = tmp_path / "runs.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tests/perf/bench_fleet.py"), "--droplets", "12", "--hosts", "4",
                           "--maintenance-hosts", "1", "--migrations", "6", "--timeout", "240", "--json", str(out)],
                          env={**os.environ, "FERRY_TEST_KUBECONFIG": kubeconfig},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = {r["scenario"]: r for r in json.loads(out.read_text())}
    # 12 droplets on 4 hosts (round-robin, unless the running operator placed one first): the
    # drained host is the fullest, so it holds at least 3
    assert runs["maintenance"]["migrations"] >= 3
    assert runs["migrations"]["migrations"] == 6
    for r in runs.values():
        assert r["completed"] == r["migrations"], r
        assert r["missed"] + r["announced"] == r["migrations"]
        assert r["reconciles"] > 0 and r["cpu_seconds"] > 0 and r["exception"] is None
    assert "time until all Announced, s" in proc.stdout and "largest queue of events waiting" in proc.stdout
