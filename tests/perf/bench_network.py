"""Benchmark of what a client sees of a sim migration: the guest's UDP service probed every 10 ms
through the move, next to the downtime the driver reports (two SimDrivers on loopback).

    .venv/bin/python tests/perf/bench_network.py           # 3 runs per write rate
    .venv/bin/python tests/perf/bench_network.py --quick   # 1 run, one rate (smoke test)
    .venv/bin/python tests/perf/bench_network.py --qemu    # the qemu guest's NIC instead (root)

Per guest write rate: probes lost, the longest gap without an answer, and the driver's reported
downtime (pause -> copy verified) measured in the same run; the ratio is gap / downtime. The
cut-over here is the data plane's part only: as soon as the source reports Completed the target
is resumed (no API server, no record flip, the loopback fabric: nothing moves). The whole path
with the operator and the node fabric is measured by tests/e2e/test_network_cutover.py on the
real nodes (hack/nodes-e2e.sh prints it with the run's figures). Nothing is asserted.

``--qemu``: the same for a qemu guest with its own NIC (QEMU TCG, the test guest of
hack/build-test-guest.sh): the process enters a private network namespace with a bridge, two
QemuDrivers put their guests' taps on it (``LocalTaps``), and the client pings the guest and sends
a request on one TCP connection every 10 ms, with one more TCP connection opened before the move
and used after it. The target is resumed and announces the guest's MAC (announce-self) as soon as
the source reports Completed. Per run: ICMP lost and longest gap, TCP lost and longest silence,
the reported downtime, gap / downtime, and the long-lived connection's fate.
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


QEMU_IP = "10.250.0.10"
QEMU_TCP_PORT = 7078


def enter_private_network() -> None:
    """This process into a new network namespace with lo and the bridge fq0 (10.250.0.1/24)."""
    import ctypes
    import subprocess

    if ctypes.CDLL(None, use_errno=True).unshare(0x40000000) != 0:  # CLONE_NEWNET
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET) (run as root)")
    for cmd in (["ip", "link", "set", "lo", "up"], ["ip", "link", "add", "fq0", "type", "bridge"],
                ["ip", "addr", "add", "10.250.0.1/24", "dev", "fq0"], ["ip", "link", "set", "fq0", "up"]):
        subprocess.run(cmd, check=True, capture_output=True)


def one_qemu(workdir: str, guest: dict, n: int) -> dict:
    from probe import IcmpProbe, LongLivedTcp, TcpProbe

    from ferry.drivers.network import LocalTaps
    from ferry.drivers.qemu import QemuDriver

    key = VMKey("bench", f"nic-{n}")
    src, dst = (QemuDriver(os.path.join(workdir, f"{h}{n}"), kernel=guest["kernel"], initrd=guest["initrd"],
                           size_scale=0.001, max_vcpus=1, taps=LocalTaps("fq0")) for h in ("a", "b"))
    spec = VMSpec(key=key, cpu=1, memory_mib=1024, disk_gib=25, ip=QEMU_IP)

    def echo() -> bool:
        try:
            return LongLivedTcp(QEMU_IP, QEMU_TCP_PORT, timeout=1).check() == "survived"
        except OSError:
            return False
    try:
        src.start(spec)
        wait(echo, 90, "the guest's echo service", interval=0.2)
        long_lived = LongLivedTcp(QEMU_IP, QEMU_TCP_PORT)
        with IcmpProbe(QEMU_IP) as ping, TcpProbe(QEMU_IP, QEMU_TCP_PORT) as tcp:
            wait(lambda: len(ping.answers) >= 50 and len(tcp.answers) >= 50, 20, "probes answered", 0.05)
            secret = os.urandom(32)
            addr = dst.prepare_incoming(spec, "127.0.0.1", secret, f"bench-{n}")
            src.start_migration(key, addr, secret, f"bench-{n}", MigrationOptions(downtime_budget_ms=300))
            st = wait(lambda: (s if (s := src.query_migration(key)).state in
                               (MigrationState.COMPLETED, MigrationState.FAILED) else None), 120, "the copy")
            if st.state is not MigrationState.COMPLETED:
                return {"error": st.error}
            wait(lambda: dst.query_migration(key).state == MigrationState.RECEIVED, 30, "the target", 0.01)
            dst.resume(key)
            dst.announce(key)
            done = time.monotonic()
            src.destroy(key)
            wait(lambda: ping.answered_since(done) >= 100 and tcp.answered_since(done) >= 100, 30,
                 "answers from the target", 0.05)
        icmp, tcp_r = ping.result(), tcp.result()
        return {"downtime": st.downtime_ms or 0, "icmp": icmp, "tcp": tcp_r, "fate": long_lived.check()}
    finally:
        for d in (src, dst):
            for vm in d.list_vms():
                d.destroy(vm.key)
            d.close()


def main_qemu(runs: int, workdir_root: str | None) -> int:
    import subprocess

    workdir = tempfile.mkdtemp(prefix="bnq-", dir=workdir_root)
    root = HERE.parents[1]
    subprocess.run(["bash", str(root / "hack" / "build-test-guest.sh"), os.path.join(workdir, "guest")], check=True,
                   stdout=subprocess.DEVNULL)
    guest = {"kernel": os.path.join(workdir, "guest", "vmlinuz"), "initrd": os.path.join(workdir, "guest", "initrd.img")}
    enter_private_network()
    print("what a client sees of a qemu migration (TCG) with the guest's own NIC on a local bridge: ICMP and TCP "
          "probes every 10 ms, the data plane's cut-over (resume + announce-self) only")
    print(f"{'run':>3}  {'icmp sent/lost':>14}  {'icmp gap ms':>11}  {'tcp sent/lost':>13}  {'tcp silence ms':>14}  "
          f"{'downtime ms':>11}  {'icmp gap/downtime':>17}  long-lived TCP")
    rows = []
    try:
        for n in range(runs):
            r = one_qemu(workdir, guest, n)
            if "error" in r:
                print(f"{n + 1:>3}  failed: {r['error']}")
                continue
            rows.append(r)
            i, t, down = r["icmp"], r["tcp"], r["downtime"]
            print(f"{n + 1:>3}  {i['sent']:>9}/{i['lost']:<4}  {i['longest_gap_ms']:>11}  {t['sent']:>8}/{t['lost']:<4}  "
                  f"{t['longest_silence_ms']:>14}  {down:>11}  {i['longest_gap_ms'] / down if down else 0:>16.1f}x  "
                  f"{r['fate']}")
        if rows:
            gap = statistics.median(r["icmp"]["longest_gap_ms"] for r in rows)
            down = statistics.median(r["downtime"] for r in rows)
            silence = statistics.median(r["tcp"]["longest_silence_ms"] for r in rows)
            print(f"median: icmp gap {gap:.0f} ms, tcp silence {silence:.0f} ms, downtime {down:.0f} ms, "
                  f"gap/downtime {gap / down if down else 0:.1f}x; long-lived connections survived "
                  f"{sum(r['fate'] == 'survived' for r in rows)}/{len(rows)}")
        print("(gap: between the sending of two answered probes; silence: the longest time without any answer "
              "arriving; downtime: what the driver reports (QEMU's downtime), same run)")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--qemu", action="store_true", help="the qemu guest's NIC (root; a private network namespace)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    if args.qemu:
        return main_qemu(1 if args.quick else args.runs, args.workdir)
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
