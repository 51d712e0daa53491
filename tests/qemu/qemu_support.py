"""Helpers for the qemu driver tests: reading the guest's serial console, filling disks."""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Callable

import pytest
from support import wait_until

from ferry.drivers.base import VMSpec
from ferry.drivers.qemu import QemuDriver

QEMU = os.environ.get("FERRY_QEMU_BINARY", "qemu-system-x86_64")


def make_driver(guest: dict[str, str], data_dir: pathlib.Path) -> QemuDriver:
    # size_scale 0.001: an s-1vcpu-1gb droplet (1 GiB, 25 GiB) becomes 96 MiB (the floor)
    # and a 26 MiB disk.
    return QemuDriver(data_dir, kernel=guest["kernel"], initrd=guest["initrd"], size_scale=0.001,
                      binary=QEMU, max_vcpus=1)


# whole lines only: a VM can stop mid-line, and the rest of that line then comes out
# of the target's serial port
COUNTER = re.compile(r"^ferry-counter (\d+)\r?\n", re.MULTILINE)
BOOT_BANNER = "ferry-guest: boot"


def serial_text(path: pathlib.Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def counters(path: pathlib.Path | str) -> list[int]:
    """The counter values on whole lines of a serial log (a path) or of a text."""
    text = path if isinstance(path, str) else serial_text(path)
    return [int(m) for m in COUNTER.findall(text)]


class GuestKernelCrashed(AssertionError):
    """The guest's kernel crashed, or stopped doing anything, right after QEMU resumed it on the
    target of a live migration, while QEMU itself runs it.

    QEMU 7.2's TCG (the only accelerator on this machine) does this in about 1 of 80-100 live
    migrations with no ferry code involved: ``hack/qemu-tcg-migration-repro.py`` reproduces it
    with plain QEMU (``migrate``, then ``cont``). The crashes are in the guest's timer interrupt
    (a corrupted hrtimer, scheduler tick or stack). ferry never touches guest memory or CPU state
    in the qemu driver (QEMU moves both), so the qemu tests rerun ONCE on this error alone
    (pytest-rerunfailures, ``only_rerun``), and say so in the report; any other failure, or the
    same crash twice, fails the test."""


#: what the guest's kernel prints when it dies (console_loglevel 1 keeps these: KERN_EMERG/ALERT)
KERNEL_CRASH = re.compile(r"Kernel panic|general protection fault|BUG: |Oops: |stack-protector|double fault")


def kernel_crash(text: str) -> str | None:
    """The guest kernel's crash report in a console text, if there is one (first lines)."""
    m = KERNEL_CRASH.search(text)
    if m is None:
        return None
    start = text.rfind("\n", 0, m.start()) + 1
    return "\n".join(text[start:].splitlines()[:12])


def assert_continues(frozen: int, text: str) -> None:
    """The target's console goes on from the source's last whole counter line: the same guest,
    never a second boot. On failure the message shows what the target printed up to its first
    counter lines (a boot banner, a kernel panic line), so a CI log alone tells what happened;
    a guest kernel that crashed first is ``GuestKernelCrashed``."""
    seen = counters(text)
    if seen and seen[0] in (frozen + 1, frozen + 2) and BOOT_BANNER not in text:
        return
    m = COUNTER.search(text)
    head = text[: (m.end() if m else len(text)) + 200][-3000:]
    crash = kernel_crash(text[: m.start() if m else len(text)])
    error = GuestKernelCrashed if crash else AssertionError
    raise error(f"the target does not go on from counter {frozen}: it counts {seen[:3]}; "
                f"its console begins:\n{head}")


def wait_counting(serial: pathlib.Path, qmp_aux: pathlib.Path, enough: Callable[[list[int]], bool],
                  timeout: float, what: str) -> list[int]:
    """Wait until the guest's counters satisfy ``enough``. On a timeout: ``GuestKernelCrashed``
    when the console shows a kernel crash, or when QEMU says the guest runs and an NMI sent to it
    makes its kernel answer on the console while it prints nothing else (alive, but stuck);
    otherwise the plain timeout."""
    try:
        return wait_until(lambda: (c := counters(serial)) and enough(c) and c, timeout, what=what)
    except pytest.fail.Exception:
        text = serial_text(serial)
        crash = kernel_crash(text)
        if crash:
            raise GuestKernelCrashed(f"waiting for {what}: the guest kernel crashed:\n{crash}") from None
        stuck = _stuck_but_running(serial, qmp_aux)
        if stuck:
            raise GuestKernelCrashed(f"waiting for {what}: {stuck}") from None
        raise


def _stuck_but_running(serial: pathlib.Path, qmp_aux: pathlib.Path) -> str | None:
    from ferry.drivers.qemu.qmp import QMPClient, QMPConnectionError, QMPError

    before, counted = len(serial_text(serial)), counters(serial)
    try:
        with QMPClient.connect(str(qmp_aux)) as q:
            if q.execute("query-status").get("status") != "running":
                return None
            q.execute("inject-nmi")
    except (OSError, QMPConnectionError, QMPError):
        return None
    try:
        wait_until(lambda: "NMI" in serial_text(serial)[before:], 10, what="the guest kernel to answer an NMI")
    except pytest.fail.Exception:
        return None
    if counters(serial) != counted:
        return None  # slow, not stuck: it counted meanwhile
    return ("QEMU runs the guest, whose kernel answers an NMI but prints nothing else "
            f"(stuck): {serial_text(serial)[before:][:500]!r}")


def last_counter(path: pathlib.Path) -> int:
    c = counters(path)
    return c[-1] if c else 0


def fill_disk(driver: QemuDriver, spec: VMSpec) -> None:
    """Random data in the whole image before the VM starts, so a bandwidth-limited
    mirror has real bytes to copy (a sparse image mirrors zeros almost for free)."""
    layout = driver.layout(spec.key)
    layout.root.mkdir(parents=True, exist_ok=True)
    size = driver.guest_size(spec).disk_bytes
    with open(layout.disk, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(os.urandom(n))
            left -= n


def fill_file(path: pathlib.Path, size: int | None = None) -> None:
    """Random bytes over a whole file (``size`` bytes, default: its current size), in place:
    an image written while no guest runs, with real bytes for a copy to move."""
    size = path.stat().st_size if size is None else size
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "r+b" if path.exists() else "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(os.urandom(n))
            left -= n
        f.truncate(size)


def monitor_state(qmp_aux: pathlib.Path) -> dict:
    """What QEMU's second (people-and-tests) monitor says about a VM: run state, block jobs,
    ferry's own block nodes (NBD client), block exports (NBD server) and the migration status."""
    from ferry.drivers.qemu.qmp import QMPClient

    with QMPClient.connect(str(qmp_aux)) as q:
        return {
            "status": q.execute("query-status")["status"],
            "jobs": q.execute("query-block-jobs"),
            "ferry_nodes": [n["node-name"] for n in q.execute("query-named-block-nodes")
                            if n["node-name"].startswith("ferry-")],
            "exports": q.execute("query-block-exports"),
            "migration": q.execute("query-migrate").get("status"),
        }


CLOCK = re.compile(r"^ferry-clock (\d+)\r?\n", re.MULTILINE)


def clocks(path: pathlib.Path) -> list[int]:
    """The guest's own wall clock (unix seconds) on whole "ferry-clock" lines of a serial log."""
    return [int(m) for m in CLOCK.findall(serial_text(path))]


def memsums(path: pathlib.Path | str) -> list[str]:
    """The guest's "ferry-memsum <md5>" lines: the checksum of a RAM region it wrote once."""
    text = serial_text(path) if isinstance(path, pathlib.Path) else path
    return re.findall(r"ferry-memsum ([0-9a-f]{32})", text)
