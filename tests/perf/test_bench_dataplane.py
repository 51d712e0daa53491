"""Smoke test of tests/perf/bench_dataplane.py: every part once, at tiny sizes."""

from __future__ import annotations

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

pytestmark = pytest.mark.timeout(120)


def test_bench_dataplane_quick(tmp_path, capsys):
    import bench_dataplane

    assert bench_dataplane.main(["--quick", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "(a) throughput" in out and "ratio" in out
    assert "(b) re-copy" in out and "digest equal" in out
    assert "(c) convergence" in out
    conv = out[out.index("(c) convergence"):]
    rows = [line for line in conv.splitlines() if line.strip().endswith(tuple("0123456789")) and "%" in line.split()[0]]
    assert len(rows) == 3, conv  # 0 % and 200 % at the 99 % cap, 300 % at the 50 % cap
    assert all(" Completed " in r or " NotConverging " in r for r in rows), conv
    assert " Completed " in rows[0] and "downtime/budget" in conv
    assert list(tmp_path.iterdir()) == []  # cleaned up
