"""Benchmark of what a client sees of a sim migration: the guest's UDP service probed every 10 ms
through the move, next to the downtime the driver reports (two SimDrivers on loopback).

    .venv/bin/python tests/perf/bench_network.py           # 3 runs per write rate
    .venv/bin/python tests/perf/bench_network.py --quick   # 1 run, one rate (smoke test)

Per guest write rate: probes lost, the longest gap without an answer, and the driver's reported
downtime (pause -> copy verified) measured in the same run; the ratio is gap / downtime. The
cut-over here is the data plane's part only: as soon as the source reports Completed the target
is resumed (no API server, no record flip, the loopback fabric: nothing moves). The whole path
with the operator and the node fabric is measured by tests/e2e/test_network_cutover.py on the
real nodes (hack/nodes-e2e.sh prints it with the run's figures). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import socket
import statistics
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: probe.py

from probe import Probe  # noqa: E402

from ferry.drivers.base import MigrationOptions, MigrationState, VMKey, VMSpec, Workload  # noqa: E402
from ferry.drivers.sim import SimDriver  # noqa: E402

KEY = VMKey("bench", "web")
SCALE = 1 / 256  # s-1vcpu-1gb-sized spec scaled: 4 MiB disk and 4 MiB memory


def free_udp_port(ip: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def wait(cond, timeout: float, what: str, interval: float = 0.002):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(interval)
    raise TimeoutError(what)


def one(workdir: str, rate: int, n: int) -> dict:
    ip = f"127.{70 + os.getpid() % 100}.{n % 250}.{1 + rate % 250}"
    port = free_udp_port(ip)
    src = SimDriver(os.path.join(workdir, f"a{n}"), size_scale=SCALE, service_port=port, host="a")
    dst = SimDriver(os.path.join(workdir, f"b{n}"), size_scale=SCALE, service_port=port, host="b")
    spec = VMSpec(key=KEY, cpu=1, memory_mib=1024, disk_gib=1, workload=Workload("hotspot", rate), ip=ip)
    try:
        src.start(spec)
        with Probe(ip, port) as probe:
            wait(lambda: probe.answered_by("a"), 10, "the source answering")
            time.sleep(0.3)
            secret = os.urandom(32)
            addr = dst.prepare_incoming(spec, "127.0.0.1", secret, f"bench-{n}")
            src.start_migration(KEY, addr, secret, f"bench-{n}", MigrationOptions(downtime_budget_ms=300))
            st = wait(lambda: (s if (s := src.query_migration(KEY)).state in
                               (MigrationState.COMPLETED, MigrationState.FAILED) else None), 60, "the copy")
            if st.state is not MigrationState.COMPLETED:
                return {"rate": rate, "error": st.error}
            dst.resume(KEY)  # the record flip and the address move take no time here
            wait(lambda: probe.answered_by("b"), 10, "the target answering")
            time.sleep(0.3)
        r = probe.result()
        return {"rate": rate, "downtime": st.downtime_ms or 0, "gap": r["longest_gap_ms"], "lost": r["lost"],
                "sent": r["sent"], "hosts": r["hosts"]}
    finally:
        for d in (src, dst):
            for vm in d.list_vms():
                d.destroy(vm.key)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    rates = [1024] if args.quick else [0, 1024, 4096]
    runs = 1 if args.quick else args.runs
    workdir = tempfile.mkdtemp(prefix="bn-", dir=args.workdir)
    print("what a client sees of a sim migration on loopback: UDP probe every 10 ms, the data plane's cut-over only")
    print(f"{'write KiB/s':>11}  {'runs':>4}  {'probes':>6}  {'lost':>4}  {'gap ms':>6}  {'downtime ms':>11}  "
          f"{'gap/downtime':>12}  answered by")
    try:
        for rate in rates:
            rows = [one(workdir, rate, i + rate) for i in range(runs)]
            bad = [r for r in rows if "error" in r]
            rows = [r for r in rows if "error" not in r]
            if not rows:
                print(f"{rate:>11}  failed: {bad[0]['error']}")
                continue
            gap = statistics.median(r["gap"] for r in rows)
            down = statistics.median(r["downtime"] for r in rows)
            ratio = gap / down if down else float("inf")
            print(f"{rate:>11}  {len(rows):>4}  {sum(r['sent'] for r in rows):>6}  {sum(r['lost'] for r in rows):>4}  "
                  f"{gap:>6.0f}  {down:>11.0f}  {ratio:>11.1f}x  {' -> '.join(rows[0]['hosts'])}"
                  + (f"  ({len(bad)} failed)" if bad else ""))
        print("(medians over the runs; lost: summed; gap: pause -> the target's first answer, downtime: pause -> "
              "copy verified, both in the same run)")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
