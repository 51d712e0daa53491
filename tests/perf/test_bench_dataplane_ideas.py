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
    rows = [line for line in out.splitlines() if "(plain)" in line or line.startswith(("shipped", "aes-256-gcm,"))]
    assert len(rows) == len(bench_dataplane_ideas.VARIANTS), out  # every variant migrated (a failure raises)
    assert "xxh3-128" in out and "AES-256-GCM" in out
    assert list(tmp_path.iterdir()) == []  # cleaned up
