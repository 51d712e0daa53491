#!/usr/bin/env python3
"""QEMU's own TCG live migration, with no ferry code in the path: does the guest survive?

Boots the qemu driver's test guest (hack/build-test-guest.sh) in one QEMU, then migrates it
back and forth on loopback N times with nothing but QEMU's monitor: ``migrate-incoming`` on
a fresh ``-S -incoming defer`` QEMU, ``migrate`` on the running one, ``cont`` on the target
once its side says ``completed``. No TLS, no disk mirror (each target gets a copy of the
disk image taken before the copy starts), no pause-before-switchover, no auto-converge, no
ferry sequence. After each ``cont`` the guest must go on counting where it stopped. It prints
one line per migration and a summary; a guest that crashed keeps its console in OUTDIR.

This is how ferry found that QEMU 7.2 (Debian 12) under TCG corrupts a migrated guest's
kernel in about 1 of 80-100 migrations (docs/architecture.md, "QEMU under TCG"); the qemu
tests rerun once on exactly that (tests/qemu/qemu_support.py, GuestKernelCrashed).

    .venv/bin/python hack/qemu-tcg-migration-repro.py [-n 100] [--accel tcg,tb-size=64]
"""

from __future__ import annotations

import argparse
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "operator"))

from ferry.drivers.qemu.qmp import QMPClient  # noqa: E402

COUNTER = re.compile(r"^ferry-counter (\d+)\r?\n", re.MULTILINE)
CRASH = re.compile(r"Kernel panic|general protection fault|BUG: |Oops: |stack-protector|double fault")


def counters(path: pathlib.Path) -> list[int]:
    return [int(x) for x in COUNTER.findall(path.read_text(errors="replace"))] if path.exists() else []


def wait(predicate, timeout: float):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    return None


class VM:
    def __init__(self, d: pathlib.Path, guest: pathlib.Path, accel: str, incoming: bool):
        self.dir = d
        self.serial = d / "serial.log"
        argv = ["qemu-system-x86_64", "-name", "repro", "-accel", accel, "-machine", "pc", "-m", "96", "-smp", "1",
                "-nodefaults", "-no-user-config", "-display", "none",
                "-blockdev", f"driver=file,filename={d}/disk.img,node-name=file0,cache.direct=off",
                "-blockdev", "driver=raw,file=file0,node-name=disk0", "-device", "virtio-blk-pci,drive=disk0,id=vda",
                "-chardev", f"file,id=serial0,path={self.serial},append=on", "-serial", "chardev:serial0",
                "-qmp", f"unix:{d}/qmp.sock,server=on,wait=off",
                "-kernel", str(guest / "vmlinuz"), "-initrd", str(guest / "initrd.img"),
                "-append", "console=ttyS0 quiet panic=-1"]
        if incoming:
            argv += ["-S", "-incoming", "defer"]
        self.proc = subprocess.Popen(argv, stderr=open(d / "qemu.stderr", "w"))
        if not wait(lambda: (d / "qmp.sock").exists(), 10):
            raise SystemExit(f"QEMU did not start: {(d / 'qemu.stderr').read_text()}")
        self.qmp = QMPClient.connect(str(d / "qmp.sock"))

    def status(self, command: str = "query-migrate") -> str | None:
        return self.qmp.execute(command).get("status")

    def quit(self) -> None:
        try:
            self.qmp.execute("quit")
        except Exception:  # noqa: BLE001 - gone already
            pass
        self.proc.wait(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=100, help="migrations (default 100)")
    ap.add_argument("--accel", default="tcg,tb-size=64", help="QEMU -accel (default: what ferry's driver uses)")
    ap.add_argument("--out", type=pathlib.Path, default=None, help="where crashed guests' files stay")
    args = ap.parse_args()
    out = args.out or pathlib.Path(tempfile.mkdtemp(prefix="qemu-tcg-repro-"))
    guest = out / "guest"
    subprocess.run(["bash", str(ROOT / "hack" / "build-test-guest.sh"), str(guest)], check=True,
                   stdout=subprocess.DEVNULL)
    version = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    print(f"{version}; -accel {args.accel}; {args.n} migrations; files in {out}")
    d = out / "vm-0"
    d.mkdir()
    subprocess.run(["truncate", "-s", "26M", str(d / "disk.img")], check=True)
    src = VM(d, guest, args.accel, incoming=False)
    if not wait(lambda: len(counters(src.serial)) >= 3, 120):
        raise SystemExit("the guest did not boot")
    crashed = 0
    for i in range(1, args.n + 1):
        d = out / f"vm-{i}"
        d.mkdir()
        shutil.copy(src.dir / "disk.img", d / "disk.img")
        dst = VM(d, guest, args.accel, incoming=True)
        uri = f"tcp:127.0.0.1:{free_port()}"
        dst.qmp.execute("migrate-incoming", {"uri": uri})
        src.qmp.execute("migrate-set-parameters", {"downtime-limit": 300, "max-bandwidth": 32 << 20})
        src.qmp.execute("migrate", {"uri": uri})
        state = wait(lambda: (s := src.status()) in ("completed", "failed") and s, 120)
        if state != "completed" or not wait(lambda: dst.status() == "completed", 30):
            raise SystemExit(f"migration {i}: {state}")
        frozen = counters(src.serial)[-1]
        dst.qmp.execute("cont")
        wait(lambda: len(counters(dst.serial)) >= 3 or CRASH.search(dst.serial.read_text(errors="replace")), 60)
        text = dst.serial.read_text(errors="replace")
        seen = counters(dst.serial)
        ok = bool(seen) and seen[0] in (frozen + 1, frozen + 2) and not CRASH.search(text)
        crash = CRASH.search(text)
        what = "goes on" if ok else (text[crash.start():].splitlines()[0] if crash else f"counts {seen[:3]}")
        print(f"{i:4d}  stopped at {frozen:6d}  target: {what}", flush=True)
        src.quit()
        if not ok:
            crashed += 1
            dst.quit()
            if i == args.n:
                break
            # boot a fresh guest to go on with
            d = out / f"vm-{i}-fresh"
            d.mkdir()
            subprocess.run(["truncate", "-s", "26M", str(d / "disk.img")], check=True)
            dst = VM(d, guest, args.accel, incoming=False)
            wait(lambda: len(counters(dst.serial)) >= 3, 120)
        else:
            shutil.rmtree(src.dir)
        src = dst
    src.quit()
    print(f"\n{args.n} live migrations, {crashed} guest(s) crashed or lost after the resume "
          f"({100.0 * crashed / args.n:.1f} %); QEMU alone, no ferry code")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
