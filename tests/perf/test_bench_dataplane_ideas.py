"""Smoke test of tests/perf/bench_dataplane_ideas.py: every variant once, at tiny sizes."""

from __future__ import annotations

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

pytestmark = pytest.mark.timeout(120)


def test_bench_dataplane_ideas_quick(tmp_path, capsys):
    import bench_dataplane_ideas

    assert bench_dataplane_ideas.main(["--quick", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    names = [v[0] for v in bench_dataplane_ideas.VARIANTS]
    rows = [line.split("  ")[0] for line in out.splitlines() if line.split("  ")[0] in names]
    assert rows == names, out  # every variant migrated, a row each (a failure raises)
    assert "xxh3-128" in out and "AES-256-GCM" in out
    assert list(tmp_path.iterdir()) == []  # cleaned up
