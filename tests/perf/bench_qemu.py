"""Benchmark: live migration of the test guest with the qemu driver at several bandwidths.

    .venv/bin/python tests/perf/bench_qemu.py [--bandwidths 32,0] [--memory-mib 256] [--disk-mib 64]

Boots the test guest once (hack/build-test-guest.sh) on host A, then migrates it back and
forth between two QemuDriver instances on loopback (A -> B, B -> A, ...), one migration
per bandwidth limit (MiB/s, 0 = unlimited), resuming the target each time so the guest
keeps running and dirtying memory and disk throughout. Prints, per run, the total time
(start_migration -> Completed), QEMU's downtime, the bytes of disk and memory sent, the
memory rounds and the auto-converge throttle, and the ratios to the first row (the
baseline measured in the same run). No assertions: figures only.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "operator"))

from ferry.drivers.base import MigrationOptions, MigrationState, VMKey, VMSpec  # noqa: E402
from ferry.drivers.qemu import QemuDriver  # noqa: E402

MIB = 1 << 20
COUNTER = re.compile(rb"^ferry-counter (\d+)\r?\n", re.MULTILINE)  # whole lines only


@dataclasses.dataclass
class Row:
    bandwidth_mibps: int
    total_s: float
    downtime_ms: int
    disk_bytes: int
    memory_bytes: int
    rounds: int
    max_throttle: int
    guest_gap: int  # counter values missing from the guest's console across the move (0: none)

    @property
    def total_bytes(self) -> int:
        return self.disk_bytes + self.memory_bytes


def build_guest(out: pathlib.Path) -> tuple[str, str]:
    subprocess.run(["bash", str(ROOT / "hack" / "build-test-guest.sh"), str(out)], check=True,
                   stdout=subprocess.DEVNULL)
    return str(out / "vmlinuz"), str(out / "initrd.img")


def last_counter(path: pathlib.Path) -> int:
    found = COUNTER.findall(path.read_bytes()) if path.exists() else []
    return int(found[-1]) if found else 0


def first_counter(path: pathlib.Path) -> int:
    found = COUNTER.findall(path.read_bytes()) if path.exists() else []
    return int(found[0]) if found else 0


def wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def fill_random(path: pathlib.Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for _ in range(size // MIB):
            f.write(os.urandom(MIB))


def run(bandwidths: list[int], memory_mib: int, disk_mib: int, downtime_ms: int, boot_counter: int = 20,
        workdir: pathlib.Path | None = None) -> list[Row]:
    tmp = tempfile.TemporaryDirectory(prefix="ferry-bench-qemu-") if workdir is None else None
    base = pathlib.Path(tmp.name) if tmp else workdir
    kernel, initrd = build_guest(base / "guest")
    # size_scale 1/1024: an "explicit" droplet of memory_mib GiB and disk_mib GiB
    drivers = [QemuDriver(base / name, kernel=kernel, initrd=initrd, size_scale=1 / 1024, max_vcpus=1,
                          min_memory_mib=memory_mib, min_disk_mib=disk_mib) for name in ("a", "b")]
    spec = VMSpec(key=VMKey("bench", "guest"), cpu=1, memory_mib=1, disk_gib=1)
    rows: list[Row] = []
    try:
        src, dst = drivers
        fill_random(src.layout(spec.key).disk, src.guest_size(spec).disk_bytes)
        src.start(spec)
        wait(lambda: last_counter(src.layout(spec.key).serial) >= boot_counter, 120, "the guest to boot")
        for i, bw in enumerate(bandwidths):
            mid = f"bench-{i}"
            secret = os.urandom(32)
            address = dst.prepare_incoming(spec, "127.0.0.1", secret, mid)
            t0 = time.monotonic()
            src.start_migration(spec.key, address, secret, mid,
                                MigrationOptions(downtime_budget_ms=downtime_ms, bandwidth_bps=bw * MIB or None))
            stats = wait(lambda: (s := src.query_migration(spec.key)).state in
                         (MigrationState.COMPLETED, MigrationState.FAILED, MigrationState.ABORTED) and s,
                         600, "the migration")
            total = time.monotonic() - t0
            if stats.state != MigrationState.COMPLETED:
                raise RuntimeError(f"migration {mid} ended {stats.state.value}: {stats.error}")
            wait(lambda: dst.query_migration(spec.key).state == MigrationState.RECEIVED, 60, "the target")
            source_log = src.layout(spec.key).serial.read_bytes()
            dst.resume(spec.key)
            wait(lambda: last_counter(dst.layout(spec.key).serial) >= 3, 60, "the target to count")
            # the source's console then the target's: one guest counting on; count what is missing
            seen = [int(n) for n in COUNTER.findall(source_log + dst.layout(spec.key).serial.read_bytes())]
            gap = (seen[-1] - seen[0] + 1) - len(set(seen)) if seen else -1
            src.destroy(spec.key)
            rows.append(Row(bw, total, stats.downtime_ms or 0, stats.disk.sent, stats.memory.sent,
                            stats.round, stats.max_throttle_percent, gap))
            # the target's serial log restarts with the next move: drop the old one first
            src, dst = dst, src
            wait(lambda: last_counter(src.layout(spec.key).serial) >= first_counter(src.layout(spec.key).serial) + 5,
                 60, "the guest to run a little on its new host")
    finally:
        for d in drivers:
            for vm in d.list_vms():
                d.destroy(vm.key)
            d.close()
        if tmp:
            tmp.cleanup()
    return rows


def table(rows: list[Row]) -> str:
    base = rows[0]
    head = (f"{'bandwidth':>10} {'total s':>8} {'downtime ms':>12} {'disk MiB':>9} {'memory MiB':>11} "
            f"{'total MiB':>10} {'rounds':>6} {'throttle%':>9} {'gap':>4} {'time vs row1':>12} {'bytes vs row1':>13}")
    lines = [head, "-" * len(head)]
    for r in rows:
        bw = f"{r.bandwidth_mibps} MiB/s" if r.bandwidth_mibps else "unlimited"
        lines.append(
            f"{bw:>10} {r.total_s:8.2f} {r.downtime_ms:12d} {r.disk_bytes / MIB:9.1f} {r.memory_bytes / MIB:11.1f} "
            f"{r.total_bytes / MIB:10.1f} {r.rounds:6d} {r.max_throttle:9d} {r.guest_gap:4d} "
            f"{r.total_s / base.total_s:12.2f} {r.total_bytes / base.total_bytes:13.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bandwidths", default="32,0", help="MiB/s per run, 0 = unlimited (default 32,0)")
    p.add_argument("--memory-mib", type=int, default=256)
    p.add_argument("--disk-mib", type=int, default=64, help="filled with random data before boot")
    p.add_argument("--downtime-ms", type=int, default=300)
    args = p.parse_args(argv)
    bandwidths = [int(x) for x in args.bandwidths.split(",") if x.strip()]
    print(f"qemu driver benchmark: guest {args.memory_mib} MiB memory, {args.disk_mib} MiB disk (random data), "
          f"downtime budget {args.downtime_ms} ms, TCG, TLS-PSK on loopback")
    rows = run(bandwidths, args.memory_mib, args.disk_mib, args.downtime_ms)
    print(table(rows))


if __name__ == "__main__":
    main()
