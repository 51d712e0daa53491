"""Helpers for the qemu driver tests: reading the guest's serial console, filling disks."""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Callable

import pytest
from guest_console import GuestKernelCrashed, counters_in, kernel_crash
from support import wait_until

from ferry.drivers.base import VMSpec
from ferry.drivers.qemu import QemuDriver

QEMU = os.environ.get("FERRY_QEMU_BINARY", "qemu-system-x86_64")


def make_driver(guest: dict[str, str], data_dir: pathlib.Path) -> QemuDriver:
    # size_scale 0.001: an s-1vcpu-1gb droplet (1 GiB, 25 GiB) becomes 96 MiB (the floor)
    # and a 26 MiB disk.
    return QemuDriver(data_dir, kernel=guest["kernel"], initrd=guest["initrd"], size_scale=0.001,
                      binary=QEMU, max_vcpus=1)


def serial_text(path: pathlib.Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def counters(path: pathlib.Path | str) -> list[int]:
    """The counter values on whole lines of a serial log (a path) or of a text."""
    return counters_in(path if isinstance(path, str) else serial_text(path))


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
