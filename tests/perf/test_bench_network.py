"""Smoke test of tests/perf/bench_network.py: one run, one write rate."""

from __future__ import annotations

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

pytestmark = pytest.mark.timeout(120)


def test_bench_network_quick(tmp_path, capsys):
    import bench_network

    assert bench_network.main(["--quick", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.strip().startswith("1024")]
    assert len(rows) == 1 and "a -> b" in rows[0], out
    assert list(tmp_path.iterdir()) == []
