"""Smoke test of tests/perf/bench_placement.py at tiny sizes (no timing assertions)."""

from __future__ import annotations

import importlib.util
import pathlib

BENCH = pathlib.Path(__file__).resolve().parents[1] / "perf" / "bench_placement.py"


def load():
    spec = importlib.util.spec_from_file_location("bench_placement", BENCH)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def test_bench_runs_and_baseline_agrees(capsys):
    bench = load()
    assert bench.main(["--sizes", "50,200", "--repeats", "3"]) == 0
    out = capsys.readouterr().out
    assert "naive/place" in out and "filters only" in out
    rows = bench.run([120], repeats=2)
    assert {r["impl"] for r in rows} == {"place", "place/pack", "naive", "filters only"}
    assert all(r["median_ms"] > 0 and r["p95_ms"] >= r["median_ms"] for r in rows)


def test_naive_baseline_matches_place_on_many_fleets():
    bench = load()
    from ferry.placement import place

    for seed in range(20):
        hosts, res = bench.fleet(60, seed)
        for strategy in ("spread", "pack"):
            assert bench.naive_place(bench.REQUEST, hosts, res, strategy) == place(bench.REQUEST, hosts, res, strategy).chosen
