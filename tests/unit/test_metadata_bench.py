"""Smoke test of tests/perf/bench_metadata.py at tiny sizes: the benchmark runs, every
request is answered as expected, every parked long-poll wakes. No timing assertions."""

from __future__ import annotations

import importlib
import pathlib
import sys

PERF = pathlib.Path(__file__).resolve().parents[1] / "perf"


def load_bench():
    # Importable by name: the server half runs in a spawned process that imports it again.
    if str(PERF) not in sys.path:
        sys.path.insert(0, str(PERF))
    return importlib.import_module("bench_metadata")


def test_bench_runs_at_tiny_sizes(capsys):
    bench = load_bench()
    rows = bench.run_bench(droplets=40, duration=0.2, concurrency=4, n_sources=2, waiters=10, rounds=1,
                           use_wrk=False)
    scenarios = {(r.scenario, r.droplets) for r in rows}
    assert ("plain", 40) in scenarios and ("healthz", 2) in scenarios and ("long-poll wake x10", 40) in scenarios
    assert all(r.errors == 0 for r in rows)
    assert all(r.requests > 0 for r in rows)
    wake = next(r for r in rows if r.scenario == "long-poll wake x10" and r.droplets == 40)
    assert wake.requests == 10  # every parked long-poll woke on the change
    bench.print_table(rows)
    assert "req/s" in capsys.readouterr().out
