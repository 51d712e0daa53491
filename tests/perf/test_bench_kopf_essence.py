"""Smoke test: the kopf essence benchmark runs and prints its table (no timing asserted)."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_kopf_essence_benchmark_runs():
    proc = subprocess.run([sys.executable, str(ROOT / "tests/perf/bench_kopf_essence.py"), "--events", "20"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.endswith("x")]
    assert [r.split("  ")[0] for r in rows] == ["LiveMigration in PreCopy", "Host with 10 droplets", "Droplet"], proc.stdout
