"""Smoke test: the operator benchmark runs end to end on a few migrations (no timing asserted)."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_operator_benchmark_runs(kubeconfig):
    proc = subprocess.run([sys.executable, str(ROOT / "tests/perf/bench_operator.py"), "--migrations", "5",
                           "--hosts", "3"], env={**os.environ, "FERRY_TEST_KUBECONFIG": kubeconfig},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "completed                                    5/5" in proc.stdout, proc.stdout
    assert "operator API requests / migration" in proc.stdout
