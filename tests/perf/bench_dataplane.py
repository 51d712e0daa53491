"""Benchmark of ferry's migration data plane (sim VM processes on loopback).

    .venv/bin/python tests/perf/bench_dataplane.py            # full run (a few minutes)
    .venv/bin/python tests/perf/bench_dataplane.py --quick    # tiny sizes (smoke test)
    .venv/bin/python tests/perf/bench_dataplane.py --parts a  # only (a); any of "abc"

(a) throughput: a live migration (idle guest) of a fully written 1 GiB disk image
    (+ a small memory image) between two sim VM processes, over the plain and the
    encrypted (AES-256-GCM) channel, vs a raw baseline: the same bytes sent with
    os.sendfile over loopback to a receiver process that writes them to a file. The three
    are interleaved in every run; ratios are against the same run's sendfile. Goal: a
    median >= 0.9x over 7 runs.
(b) re-copy: the same image with 5 % of its blocks changed: ferry's re-copy round (the
    dirty blocks, verified by digest) vs `rsync --inplace` of the same change to a local
    rsync daemon on 127.0.0.1. Ratio goal >= 2x faster.
(c) convergence: guest write rates of 0..500 % of a bandwidth-limited link: outcome,
    rounds, bytes sent / image size, throttle time and max %, downtime steps taken and the
    allowed downtime vs the ceiling, the predicted and the measured downtime vs the budget.
    Rows with a lower throttle cap model a guest the throttle cannot slow enough: they end
    Completed after downtime steps, or NotConverging, never stuck. Goals: every row ends;
    downtime <= budget in rows without steps; bytes <= 1.3x at 25 %.

Every figure is measured in this run; nothing is asserted. Needs rsync for (b) (skipped
with a note when missing).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

from ferry.drivers.base import MigrationOptions, MigrationState, VMKey, VMSpec, Workload
from ferry.drivers.sim import SimDriver
from ferry.drivers.sim.image import DISK_BLOCK_SIZE, MEMORY_PAGE_SIZE, Image, image_sizes
from ferry.drivers.sim.layout import DISK_FILE, MEMORY_FILE
from ferry.transfer.digest import HASH_NAME
from ferry.transfer.session import COMPLETED
from ferry.transfer.source import SourceEngine

MiB = 1 << 20
KEY = VMKey("bench", "vm")
TERMINAL = {MigrationState.COMPLETED, MigrationState.FAILED, MigrationState.ABORTED}


def table(title: str, header: list[str], rows: list[list]) -> None:
    cols = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(header))]
    print(f"\n{title}")
    line = "  ".join("-" * w for w in widths)
    print(line)
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print(line)
    for r in cols[1:]:
        print("  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]))
    print(line)


def fill(path: str, size: int, seed: int) -> None:
    """Write ``size`` bytes of non-zero, per-block distinct data."""
    rng = random.Random(seed)
    chunk = bytearray(rng.randbytes(MiB))
    with open(path, "wb") as f:
        for off in range(0, size, MiB):
            n = min(MiB, size - off)
            for b in range(0, n, DISK_BLOCK_SIZE):  # make every 64 KiB block unique
                chunk[b : b + 16] = (off + b).to_bytes(8, "little") + seed.to_bytes(8, "little")
            f.write(chunk[:n])


def wait_terminal(driver: SimDriver, key: VMKey, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = driver.execute(key, "query-migrate")
        if st.get("state") in {s.value for s in TERMINAL}:
            return st
        # paces the poll (a script too, so not support.wait_until). Timings come from the engine
        # itself (elapsed_ms, rounds), not from this loop; every poll is a query-migrate the source
        # VM process answers on its CPU (an agent asks once per report interval, 1 s), so polling
        # every 20 ms charged ferry's CPU figures with the benchmark's own curiosity.
        time.sleep(0.1)
    raise TimeoutError("migration did not end")


class Hosts:
    """Two SimDrivers (source and target host) in one temporary directory."""

    def __init__(self, root: str, scale: float):
        self.root = root
        self.src = SimDriver(os.path.join(root, "host-a"), size_scale=scale)
        self.dst = SimDriver(os.path.join(root, "host-b"), size_scale=scale)

    def prepared_source(self, spec: VMSpec) -> tuple[str, str]:
        """Create the source VM with fully written images (guest idle), start it."""
        off = VMSpec(spec.key, spec.cpu, spec.memory_mib, spec.disk_gib, spec.workload, power_on=False)
        self.src.start(off)
        d = self.src.vm_dir(spec.key)
        disk_size, mem_size = image_sizes(spec.memory_mib, spec.disk_gib, self.src.size_scale)
        fill(os.path.join(d, DISK_FILE), disk_size, 1)
        fill(os.path.join(d, MEMORY_FILE), mem_size, 2)
        self.src.start(spec)
        return os.path.join(d, DISK_FILE), os.path.join(d, MEMORY_FILE)

    def migrate(self, spec: VMSpec, mid: str, options: MigrationOptions, timeout: float = 600, before_start=None) -> dict:
        secret = os.urandom(32)
        addr = self.dst.prepare_incoming(spec, "127.0.0.1", secret, mid)
        if before_start is not None:
            before_start()
        self.src.start_migration(spec.key, addr, secret, mid, options)
        st = wait_terminal(self.src, spec.key, timeout)
        tgt = self.dst.execute(spec.key, "query-migrate")
        st["target_state"], st["target_digest"] = tgt.get("state"), tgt.get("digest")
        return st

    def cleanup(self) -> None:
        for d in (self.src, self.dst):
            for vm in d.list_vms():
                d.destroy(vm.key)


# --- (a) throughput ---------------------------------------------------------------------

RECEIVER = textwrap.dedent(
    """
    import os, socket, sys
    srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
    print(srv.getsockname()[1], flush=True)
    conn, _ = srv.accept()
    fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    buf = bytearray(1 << 20); mv = memoryview(buf)
    while True:
        n = conn.recv_into(buf)
        if not n:
            break
        os.write(fd, mv[:n])
    os.close(fd)
    t = os.times()
    conn.sendall(("%.3f" % (t.user + t.system)).encode().ljust(16)); conn.close()
    """
)


def proc_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds a process used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process used so far."""
    return sum(proc_times(pid))


def baseline_sendfile(paths: list[str], out_path: str, before_start=None, keep_output: bool = False) -> tuple[float, float]:
    """(seconds, CPU seconds of sender + receiver) to send the files with os.sendfile to a
    receiver process that writes them to a file. ``before_start`` runs once the receiver
    listens; with ``keep_output`` the caller deletes ``out_path``."""
    rx = subprocess.Popen([sys.executable, "-c", RECEIVER, out_path], stdout=subprocess.PIPE, text=True)
    try:
        port = int(rx.stdout.readline())
        if before_start is not None:
            before_start()
        t0 = time.perf_counter()
        c0 = os.times()
        s = socket.create_connection(("127.0.0.1", port))
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            size, off = os.fstat(fd).st_size, 0
            while off < size:
                off += os.sendfile(s.fileno(), fd, off, size - off)
            os.close(fd)
        s.shutdown(socket.SHUT_WR)
        rx_cpu = float(s.recv(16))
        dt = time.perf_counter() - t0
        c1 = os.times()
        s.close()
        return dt, rx_cpu + (c1.user - c0.user) + (c1.system - c0.system)
    finally:
        rx.wait(30)
        if not keep_output:
            try:
                os.unlink(out_path)
            except FileNotFoundError:
                pass


class Recycler:
    """Gives every receiver the same memory to write into.

    On a VM whose balloon reports free pages to the hypervisor (this one: virtio_balloon,
    page_reporting), memory freed a few seconds ago is taken back by the host, and the
    first touch of each of those pages faults in the hypervisor: writing 1 GiB of new page
    cache took 0.2 s into just-freed memory and 0.8-1.4 s four seconds after the free
    (measured while building this). Which one a receiver gets decided the ratios more than
    the software did: sendfile always ran right after the previous migration's target was
    destroyed (its 1 GiB just freed), while a ferry target started a VM process first.

    So each transfer's output is kept (a hard link) until the next receiver is ready, and
    freed right before that transfer starts (``--memory recycled``, the default), or freed
    and then ``wait`` seconds allowed for the host to take it back (``--memory cold``).
    Both treat every method alike."""

    def __init__(self, root: str, mode: str, wait: float):
        self.held = os.path.join(root, "held-output")
        self.mode, self.wait = mode, wait

    def hold(self, paths: list[str]) -> None:
        """Keep these output files alive (their page cache) past their owner's cleanup."""
        self.release(wait=False)
        os.makedirs(self.held, exist_ok=True)
        for i, p in enumerate(paths):
            os.link(p, os.path.join(self.held, str(i)))

    def release(self, wait: bool = True) -> None:
        if os.path.isdir(self.held):
            shutil.rmtree(self.held)
        if wait and self.mode == "cold":
            time.sleep(self.wait)  # the condition under test: the host takes the freed pages back


CHANNELS = ("plain", "aes-256-gcm")


def _spread(xs: list[float]) -> str:
    return f"{min(xs):.2f}-{max(xs):.2f}"


def bench_throughput(root: str, disk_gib: float, memory_mib: int, runs: int, channels=CHANNELS,
                     memory: str = "recycled", cold_wait: float = 5.0) -> dict:
    """Each run: sendfile, then ferry over each channel, interleaved, all from the page cache.
    A ratio is sendfile's time over ferry's in the same run (> 1: ferry faster). Every
    receiver writes into memory in the same state (``Recycler``)."""
    recycler = Recycler(root, memory, cold_wait)
    # size_scale applies to both images: the disk size is the scale, memory follows
    hosts = Hosts(os.path.join(root, "a"), disk_gib)
    scale_spec = VMSpec(KEY, 1, int(round(memory_mib / disk_gib)), 1, Workload("uniform", 0))
    try:
        disk_path, mem_path = hosts.prepared_source(scale_spec)
        total = os.path.getsize(disk_path) + os.path.getsize(mem_path)
        gib = total / (1 << 30)
        base: list[float] = []
        base_cpu: list[float] = []
        res = {ch: {"s": [], "ratio": [], "cpu": [], "user": [], "src": [], "dst": []} for ch in channels}
        rows = []
        for i in range(runs):
            out_path = os.path.join(root, "baseline.out")
            b, b_cpu = baseline_sendfile([disk_path, mem_path], out_path, recycler.release, keep_output=True)
            recycler.hold([out_path])
            os.unlink(out_path)
            base.append(b)
            base_cpu.append(b_cpu / gib)
            row = [i + 1, f"{total / MiB / b:.0f}", f"{b_cpu / gib:.2f}"]
            for ch in channels:
                # "<channel>/preadv": the source reads with preadv (the copy the mmap reads replaced)
                hosts.src.channel = hosts.dst.channel = ch.split("/")[0]
                hosts.src.reads = "preadv" if ch.endswith("/preadv") else "mmap"
                src_pid = hosts.src.status(KEY)["pid"]
                su0, ss0 = proc_times(src_pid)
                st = hosts.migrate(scale_spec, f"tp-{ch.replace('/', '-')}-{i}", MigrationOptions(downtime_budget_ms=300),
                                   before_start=recycler.release)
                su1, ss1 = proc_times(src_pid)
                du, ds = proc_times(hosts.dst.status(KEY)["pid"])
                if st["state"] != COMPLETED or st["target_digest"] != st["digest"]:
                    raise RuntimeError(f"throughput migration ({ch}) failed: {st.get('error')}")
                reads = (st.get("reads") or {}).get("disk", {}).get("mode")
                if reads != hosts.src.reads:
                    raise RuntimeError(f"asked for {hosts.src.reads} reads, the source used {reads}")
                if st.get("channel") != ch.split("/")[0]:
                    raise RuntimeError(f"asked for a {ch} channel, the migration used {st.get('channel')}")
                o = st["elapsed_ms"] / 1000.0
                r = res[ch]
                r["s"].append(o)
                r["ratio"].append(b / o)
                src_cpu, dst_cpu = (su1 - su0) + (ss1 - ss0), du + ds
                r["cpu"].append((src_cpu + dst_cpu) / gib)
                r["src"].append(src_cpu / gib)
                r["dst"].append(dst_cpu / gib)
                r["user"].append(((su1 - su0) + du) / max(src_cpu + dst_cpu, 1e-9))
                row += [f"{total / MiB / o:.0f}", f"{b / o:.2f}", f"{(src_cpu + dst_cpu) / gib:.2f} ({src_cpu / gib:.2f}+{dst_cpu / gib:.2f})"]
                hosts.src.cancel_migration(KEY)  # resume the source for the next run
                dst_dir = hosts.dst.vm_dir(KEY)
                recycler.hold([os.path.join(dst_dir, DISK_FILE), os.path.join(dst_dir, MEMORY_FILE)])
                hosts.dst.destroy(KEY)
            rows.append(row)
        recycler.release(wait=False)
        header = ["run", "sendfile MiB/s", "sendfile CPU s/GiB"]
        for ch in channels:
            header += [f"{ch} MiB/s", f"{ch} ratio", f"{ch} CPU s/GiB (src+dst)"]
        table(
            f"(a) throughput: {total / MiB:.0f} MiB (disk {os.path.getsize(disk_path) / MiB:.0f} MiB + memory "
            f"{os.path.getsize(mem_path) / MiB:.0f} MiB, fully written), loopback; runs interleaved "
            f"(sendfile, then ferry over each channel); receivers write into "
            + ("memory the previous transfer freed just before" if memory == "recycled"
               else f"memory freed {cold_wait:.0f} s before (taken back by the host)"),
            header,
            rows,
        )
        summary = [["sendfile", f"{total / MiB / statistics.median(base):.0f}", "1.00", "-",
                    f"{statistics.median(base_cpu):.2f}", "-", "-"]]
        out = {"sendfile_mibps": total / MiB / statistics.median(base)}
        for ch in channels:
            r = res[ch]
            ratio = statistics.median(r["ratio"])
            summary.append([f"ferry, {ch} channel", f"{total / MiB / statistics.median(r['s']):.0f}", f"{ratio:.2f}",
                            _spread(r["ratio"]), f"{statistics.median(r['cpu']):.2f}",
                            f"{statistics.median(r['src']):.2f} + {statistics.median(r['dst']):.2f}",
                            f"{statistics.median(r['user']):.0%}"])
            out[ch] = {"ratio": ratio, "ratios": r["ratio"], "cpu_per_gib": statistics.median(r["cpu"])}
        table(f"(a) summary over {runs} runs (medians; ratio = sendfile time / ferry time in the same run, goal >= 0.9x)",
              ["method", "MiB/s", "ratio", "ratio spread", "CPU s/GiB", "src + dst", "user share"], summary)
        print("CPU s/GiB: user+system of both ends (ferry: source VM process during the copy + target VM process, "
              "including its start-up); user share: the part spent in user space (Python, hashing, AES), the rest is "
              "the kernel (copies, TCP, page cache)")
        print(f"ferry includes: auth, SEEK_DATA scan, reads through an mmap (or preadv: /preadv), per-block {HASH_NAME} hash on both sides, framing, "
              "AES-256-GCM records (encrypted channel), target pwrite, digest verdict")
        return out
    finally:
        hosts.cleanup()


# --- (b) re-copy vs rsync --------------------------------------------------------------------


class _IdleGuest:
    def pause(self) -> bool:
        return False

    def resume(self) -> None:
        pass

    def set_throttle(self, disk_percent: int, memory_percent: int) -> None:
        pass

    def export_state(self) -> dict:
        return {"seq": 0}


def start_rsync_daemon(root: str) -> tuple[subprocess.Popen, int, str]:
    module = os.path.join(root, "rsync-dst")
    os.makedirs(module, exist_ok=True)
    conf = os.path.join(root, "rsyncd.conf")
    with open(conf, "w") as f:
        f.write(f"use chroot = no\npid file = {root}/rsyncd.pid\n[img]\n path = {module}\n read only = no\n"
                f" uid = {os.getuid()}\n gid = {os.getgid()}\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["rsync", "--daemon", "--no-detach", f"--config={conf}", f"--port={port}", "--address=127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port, module
        except OSError:
            time.sleep(0.05)  # paces the poll (a script too, so not support.wait_until)
    proc.kill()
    raise RuntimeError("rsync daemon did not start")


def file_sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


def bench_recopy(root: str, disk_gib: float, memory_mib: int, fraction: float) -> dict:
    have_rsync = shutil.which("rsync") is not None
    base = os.path.join(root, "b")
    dst = SimDriver(os.path.join(base, "host-b"), size_scale=disk_gib)
    spec = VMSpec(KEY, 1, int(round(memory_mib / disk_gib)), 1, Workload("uniform", 0))
    disk_size, mem_size = image_sizes(spec.memory_mib, spec.disk_gib, disk_gib)
    src_dir = os.path.join(base, "src")
    os.makedirs(src_dir)
    disk_path, mem_path = os.path.join(src_dir, DISK_FILE), os.path.join(src_dir, MEMORY_FILE)
    fill(disk_path, disk_size, 3)
    fill(mem_path, mem_size, 4)
    rsync_proc = None
    try:
        if have_rsync:
            rsync_proc, port, module = start_rsync_daemon(base)
            shutil.copyfile(disk_path, os.path.join(module, DISK_FILE))  # the destination's old version
        disk = Image(disk_path, disk_size, DISK_BLOCK_SIZE)
        mem = Image(mem_path, mem_size, MEMORY_PAGE_SIZE)
        nblocks = disk.nblocks
        changed = random.Random(5).sample(range(nblocks), max(1, int(nblocks * fraction)))
        marks = {}

        def before_round(round_no: int) -> None:
            # after round 1 (a full copy), the "guest" changes 5 % of the blocks
            if round_no == 2:
                for b in changed:
                    disk.write(b * DISK_BLOCK_SIZE, os.urandom(DISK_BLOCK_SIZE))
                marks["t0"] = time.monotonic()

        secret = os.urandom(32)
        addr = dst.prepare_incoming(spec, "127.0.0.1", secret, "recopy")
        eng = SourceEngine(disk=disk, memory=mem, guest=_IdleGuest(), target=addr, secret=secret, migration_id="recopy",
                           downtime_budget_ms=300, before_round=before_round)
        eng.run()
        if eng.state != COMPLETED:
            raise RuntimeError(f"re-copy migration failed: {eng.error}")
        ferry_s = eng.finished_at - marks["t0"]
        recopy_round = eng.rounds[-1]
        tgt = dst.execute(KEY, "query-migrate")
        assert tgt["digest"] == eng.digest
        changed_bytes = len(changed) * DISK_BLOCK_SIZE
        rows = [["ferry re-copy round (dirty bitmap)", f"{recopy_round['bytes'] / MiB:.1f}", f"{ferry_s * 1000:.0f}", "digest equal"]]
        result = {"ferry_s": ferry_s}
        if have_rsync:
            cmd = ["rsync", "--inplace", "--no-whole-file", "--ignore-times", disk_path, f"rsync://127.0.0.1:{port}/img/{DISK_FILE}"]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            rsync_s = time.perf_counter() - t0
            same = file_sha(os.path.join(module, DISK_FILE)) == file_sha(disk_path)
            rows.append(["rsync --inplace (daemon on 127.0.0.1)", "-", f"{rsync_s * 1000:.0f}", "file equal" if same else "DIFFERENT"])
            result["rsync_s"] = rsync_s
            result["speedup"] = rsync_s / ferry_s
        table(f"(b) re-copy of a {disk_size / MiB:.0f} MiB disk (+{mem_size / MiB:.0f} MiB memory) with {fraction:.0%} "
              f"of blocks changed ({changed_bytes / MiB:.1f} MiB)", ["method", "MiB sent", "ms", "check"], rows)
        if have_rsync:
            print(f"ferry is {result['speedup']:.1f}x faster than rsync (goal >= 2x); ferry's time includes the final digest verdict")
        else:
            print("rsync not installed: (b) baseline skipped (apt-get install -y rsync)")
        disk.close()
        mem.close()
        return result
    finally:
        if rsync_proc is not None:
            rsync_proc.terminate()
            rsync_proc.wait(10)
        for vm in dst.list_vms():
            dst.destroy(vm.key)


# --- (c) convergence --------------------------------------------------------------------------


def bench_convergence(root: str, disk_mib: int, memory_mib: int, link_mibps: int, budget_ms: int, ceiling_ms: int,
                      rates: list[int], patterns: list[str], caps: list[int], cap_rates: list[int]) -> list[dict]:
    """Each row: a guest writing at pct % of the link, the throttle capped at cap %.

    The default cap (99 %, QEMU's max-cpu-throttle) slows the sim guest to 1 % of its rate;
    lower caps model a guest the throttle cannot slow enough, where the downtime steps (up to
    the ceiling) and NotConverging show."""
    out = []
    scale = disk_mib / 1024
    runs = [(pct, 99) for pct in rates] + [(pct, cap) for cap in caps if cap != 99 for pct in cap_rates]
    for pattern in patterns:
        rows = []
        for pct, cap in runs:
            hosts = Hosts(os.path.join(root, f"c-{pattern}-{pct}-{cap}"), scale)
            rate_kibps = link_mibps * 1024 * pct / 100
            spec = VMSpec(KEY, 1, int(round(memory_mib / scale)), 1, Workload(pattern, rate_kibps))
            try:
                disk_path, mem_path = hosts.prepared_source(spec)
                image = os.path.getsize(disk_path) + os.path.getsize(mem_path)
                st0 = hosts.src.status(KEY)
                t0 = time.monotonic()
                time.sleep(1.0)  # a 1 s window to measure the rate the guest really writes
                st1 = hosts.src.status(KEY)
                guest_mibps = (st1["bytes_written"] - st0["bytes_written"]) / (time.monotonic() - t0) / MiB
                st = hosts.migrate(spec, f"conv-{pct}-{cap}", MigrationOptions(
                    downtime_budget_ms=budget_ms, bandwidth_bps=link_mibps * MiB, max_downtime_ms=ceiling_ms,
                    max_throttle_percent=cap))
                ok = st["state"] == COMPLETED and st["target_digest"] == st["digest"]
                err = st.get("error") or ""
                outcome = "Completed" if ok else ("NotConverging" if err.startswith("NotConverging") else f"NO ({err})")
                sent = st["disk"]["sent"] + st["memory"]["sent"]
                bw = max((r["bytes"] / r["ms"] * 1000 for r in st["rounds"][:1] if r["ms"]), default=0)
                dt_ms = st["downtime_ms"]
                vs = "-" if dt_ms is None else f"{dt_ms / budget_ms:.2f}x" + (" OVER" if dt_ms > budget_ms else "")
                rows.append([f"{pct}%", f"{cap}%", f"{guest_mibps:.1f}", outcome, st["round"], f"{sent / image:.2f}",
                             st["throttled_ms"], st["max_throttle_percent"], st.get("downtime_steps", 0),
                             f"{st.get('allowed_downtime_ms')}/{ceiling_ms}", st.get("predicted_downtime_ms", "-"),
                             "-" if dt_ms is None else dt_ms, budget_ms, vs,
                             f"{st['elapsed_ms'] / 1000:.1f}", f"{bw / MiB:.0f}"])
                out.append({"pattern": pattern, "pct": pct, "cap": cap, "ok": ok, "outcome": outcome,
                            "rounds": st["round"], "bytes_ratio": sent / image, "downtime_ms": dt_ms,
                            "max_throttle": st["max_throttle_percent"], "throttled_ms": st["throttled_ms"],
                            "downtime_steps": st.get("downtime_steps", 0),
                            "allowed_downtime_ms": st.get("allowed_downtime_ms")})
            finally:
                hosts.cleanup()
        table(f"(c) convergence, pattern {pattern}: image {disk_mib} MiB disk + {memory_mib} MiB memory (fully written), "
              f"link limited to {link_mibps} MiB/s, downtime budget {budget_ms} ms, ceiling {ceiling_ms} ms "
              f"(4 steps), post-copy: none (sim driver has none)",
              ["guest rate", "thr cap", "guest MiB/s", "outcome", "rounds", "bytes/image", "throttled ms", "max thr %",
               "steps", "allowed/ceiling ms", "predicted ms", "downtime ms", "budget ms", "downtime/budget",
               "total s", "round-1 MiB/s"], rows)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every part")
    p.add_argument("--disk-gib", type=float, default=1.0, help="(a)/(b) disk image size")
    p.add_argument("--memory-mib", type=int, default=16, help="(a)/(b) memory image size")
    p.add_argument("--runs", type=int, default=7, help="(a) repetitions")
    p.add_argument("--channels", default=",".join(CHANNELS),
                   help="(a) ferry channels to measure; <channel>/preadv: the source reads with preadv instead of "
                        "through its mapping of the image (compare both in one run)")
    p.add_argument("--memory", choices=("recycled", "cold"), default="recycled",
                   help="(a) what every receiver writes into: the memory the previous transfer freed just before, "
                        "or memory freed --cold-wait seconds before (see Recycler)")
    p.add_argument("--cold-wait", type=float, default=5.0, help="(a) seconds between the free and the transfer with --memory cold")
    p.add_argument("--dirty", type=float, default=0.05, help="(b) fraction of blocks changed")
    p.add_argument("--conv-disk-mib", type=int, default=256, help="(c) disk image size")
    p.add_argument("--conv-memory-mib", type=int, default=64, help="(c) memory image size")
    p.add_argument("--link-mibps", type=int, default=64, help="(c) bandwidth limit")
    p.add_argument("--budget-ms", type=int, default=50, help="(c) downtime budget")
    p.add_argument("--max-downtime-ms", type=int, default=200, help="(c) ceiling of the downtime steps")
    p.add_argument("--rates", default="0,10,25,50,100,200,300,500", help="(c) guest write rates, %% of the link")
    p.add_argument("--caps", default="99,50", help="(c) throttle caps; rows below 99 %% run --cap-rates only")
    p.add_argument("--cap-rates", default="300,500", help="(c) guest write rates for the lower throttle caps")
    p.add_argument("--patterns", default="uniform,hotspot", help="(c) workload patterns")
    p.add_argument("--parts", "--only", dest="parts", default="abc", help="which parts to run, e.g. a or ab")
    p.add_argument("--workdir", default=None, help="where the images go (default: the temp dir)")
    args = p.parse_args(argv)
    if args.quick:
        args.disk_gib, args.memory_mib, args.runs = 1 / 64, 1, 1
        args.conv_disk_mib, args.conv_memory_mib, args.link_mibps = 2, 1, 16
        args.rates, args.patterns, args.cap_rates = "0,200", "uniform", "300"
    rates = [int(x) for x in args.rates.split(",")]
    root = tempfile.mkdtemp(prefix="ferry-bench-", dir=args.workdir)
    t0 = time.monotonic()
    try:
        if "a" in args.parts:
            bench_throughput(root, args.disk_gib, args.memory_mib, args.runs, tuple(args.channels.split(",")),
                             args.memory, 0.5 if args.quick else args.cold_wait)
        if "b" in args.parts:
            bench_recopy(root, args.disk_gib, args.memory_mib, args.dirty)
        if "c" in args.parts:
            bench_convergence(root, args.conv_disk_mib, args.conv_memory_mib, args.link_mibps, args.budget_ms,
                              args.max_downtime_ms, rates, args.patterns.split(","),
                              [int(x) for x in args.caps.split(",")], [int(x) for x in args.cap_rates.split(",")])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\ntotal benchmark time {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
