"""Smoke test of tests/perf/bench_qemu.py: one small, unlimited migration (real QEMU)."""

from __future__ import annotations

import pathlib
import shutil
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.timeout(180),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                       reason="qemu-system-x86_64 is not installed (apt-get install qemu-system-x86 qemu-utils)"),
]


def test_bench_qemu_smoke(tmp_path: pathlib.Path) -> None:
    import bench_qemu

    rows = bench_qemu.run([0], memory_mib=96, disk_mib=16, downtime_ms=300, boot_counter=3, workdir=tmp_path)
    [row] = rows
    assert row.disk_bytes >= 16 << 20 and row.memory_bytes > 0
    assert row.total_s > 0 and row.guest_gap == 0
    out = bench_qemu.table(rows)
    assert "unlimited" in out and "downtime ms" in out
