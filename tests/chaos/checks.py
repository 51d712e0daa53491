"""The invariants of a crash case, each checked independently of ferry's own status: the
process table, the VM processes' own answers (boot number), the write logs replayed from
zero, the API objects as kubectl shows them.

Each check returns (ok, detail). ``None`` for ok means "does not apply to this case".
"""

from __future__ import annotations

import glob
import os
import struct
import subprocess
import tempfile
from typing import Any

from ferry.drivers.base import VMKey
from ferry.drivers.sim import SimDriver
from ferry.drivers.sim.workload import MAGIC, MEMORY, MEMORY_LOST, content, read_log, replay

ROWS: list[dict] = []  # one per case run, printed as the table at the end of the session
INVARIANTS = ("terminal", "no-reboot", "one-process", "record=label", "writes", "source-ran", "address", "no-orphans")


def vm_processes(dirs: dict[str, Any], ns: str, name: str) -> list[tuple[str, int]]:
    """(host, pid) of every live sim VM process of the droplet, from /proc (not from ferry)."""
    suffix = f"{ns}__{name}"
    out = []
    for proc in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(proc, "rb") as f:
                argv = f.read().split(b"\0")
            with open(proc.replace("cmdline", "stat")) as f:
                if f.read().split(") ")[1][:1] == "Z":
                    continue
        except OSError:
            continue
        if b"ferry.drivers.sim.vm" not in argv or b"--dir" not in argv:
            continue
        d = os.path.realpath(argv[argv.index(b"--dir") + 1].decode())
        if os.path.basename(d) != suffix:
            continue
        for host, root in dirs.items():
            if d.startswith(os.path.realpath(str(root)) + os.sep):
                out.append((host, int(proc.split("/")[2])))
    return out


def write_logs(dirs: dict[str, Any], ns: str, name: str) -> list[str]:
    out = []
    for root in dirs.values():
        out += glob.glob(os.path.join(str(root), "vms", f"{ns}__{name}", "writes.log"))
        out += glob.glob(os.path.join(str(root), "writelogs", f"{ns}__{name}.*.log"))
    return out


def merged_log(paths: list[str], dest: str) -> tuple[int, set[int]]:
    """All hosts' logs of one droplet in sequence order (a memory loss after the write it
    followed) -> one log file; returns (records, the sequence numbers written)."""
    records = []
    for p in paths:
        records += list(read_log(p))
    records.sort(key=lambda r: (r[0], r[1] == MEMORY_LOST))
    seqs = [r[0] for r in records if r[1] != MEMORY_LOST]
    if len(seqs) != len(set(seqs)):
        raise AssertionError("two acknowledged writes carry one sequence number: two guests wrote as one")
    with open(dest, "wb") as f:
        for r in records:
            f.write(struct.pack("<QBQII", *r))
    return len(records), set(seqs)


def compare_with_replay(driver: SimDriver, key: VMKey, dirs: dict[str, Any]) -> tuple[bool, str]:
    """Pause the running copy, replay every acknowledged write of the droplet from zero on any
    host, compare byte for byte, resume. A differing block is tolerated only if it holds a whole
    write that was never acknowledged (written, then the process died before logging it)."""
    st = driver.status(key)
    if st is None:
        return False, "no running copy"
    was_running = st["status"] == "running"
    if was_running:
        driver.pause(key)
    try:
        vm_dir = driver.vm_dir(key)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                n, seqs = merged_log(write_logs(dirs, key.namespace, key.name), os.path.join(tmp, "all.log"))
            except (AssertionError, ValueError) as exc:
                return False, str(exc)
            disk_size = os.path.getsize(os.path.join(vm_dir, "disk.img"))
            mem_size = os.path.getsize(os.path.join(vm_dir, "mem.img"))
            replay(os.path.join(tmp, "all.log"), os.path.join(tmp, "disk"), os.path.join(tmp, "mem"), disk_size, mem_size)
            unacked = 0
            for image, bs, kind in (("disk", 64 * 1024, 0), ("mem", 4096, MEMORY)):
                with open(os.path.join(vm_dir, "disk.img" if image == "disk" else "mem.img"), "rb") as f:
                    live = f.read()
                with open(os.path.join(tmp, image), "rb") as f:
                    want = f.read()
                if live == want:
                    continue
                for off in range(0, len(live), bs):
                    a, b = live[off:off + bs], want[off:off + bs]
                    if a == b:
                        continue
                    seq, offset, k, magic = struct.unpack_from("<QQQQ", a)
                    if magic == MAGIC and offset == off and k == kind and seq not in seqs and a == content(seq, kind, off, bs):
                        unacked += 1
                        continue
                    return False, f"{image} block at {off} differs from the replay of {n} logged writes (seq {seq})"
            extra = f", {unacked} unacknowledged write(s) on disk" if unacked else ""
            return True, f"{len(seqs)} writes replayed{extra}"
    finally:
        if was_running:
            driver.execute(key, "cont")


def format_table(rows: list[dict]) -> str:
    cols = ["case", "component", "fault", "outcome", "final host", *INVARIANTS, "seconds"]
    table = [cols]
    for r in rows:
        inv = r.get("invariants", {})
        table.append([r["case"], r["component"], r["fault"], r["outcome"], r["final_host"],
                      *[_mark(inv.get(i)) for i in INVARIANTS], f"{r['seconds']:.0f}"])
    notes = [f"  {r['case']}: {r.get('injected') or 'not injected'}; "
             + "; ".join(f"{k}: {v[1]}" for k, v in r.get("invariants", {}).items() if v is not None and not v[0])
             for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(cols))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    total = sum(r["seconds"] for r in rows)
    bad = [r["case"] for r in rows if any(v is not None and not v[0] for v in r.get("invariants", {}).values())]
    lines.append(f"{len(rows)} cases, {total:.0f} s of cases; invariants broken in: {', '.join(bad) or 'none'}")
    lines += ["what was injected (and what broke):", *[n.rstrip("; ") for n in notes]]
    return "\n".join(lines)


def _mark(v) -> str:
    if v is None:
        return "-"
    return "ok" if v[0] else "FAIL"


def kill_ss(port: int) -> int:
    """Abort every established TCP connection to or from ``port`` (both ends see a reset);
    returns how many sockets the kernel closed (ss prints one line each, after its header)."""
    n = 0
    for side in ("dport", "sport"):
        r = subprocess.run(["ss", "-K", "-t", "-n", "state", "established", f"( {side} = :{port} )"],
                           capture_output=True, text=True, timeout=10, check=True)
        n += max(0, len(r.stdout.strip().splitlines()) - 1)
    return n
