"""Whether a VM's QEMU runs, from its pid file's lock.

QEMU is started by a launcher (``ferry.drivers.launcher``: a plain process in its own session,
or the one process of a pod on the host's node), in the foreground: no ``-daemonize``. A
launcher pod's QEMU lives in another pid namespace, so its pid means nothing to the agent;
what both see is the VM's directory. QEMU's ``-pidfile`` takes a POSIX write lock
(``fcntl(F_SETLK)``) on the file for its whole life, and the kernel drops it when QEMU exits,
however it exits: a held lock is a live QEMU, in any pid namespace. ``F_GETLK`` asks without
taking a lock, so the test never races QEMU's own start.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import signal
import struct
import time

from ferry.drivers.base import DriverError

from .config import VMLayout

# struct flock on x86_64/aarch64 Linux: short l_type, short l_whence, off_t l_start,
# off_t l_len, pid_t l_pid (+ padding)
_FLOCK = "hhqqi4x"


def lock_holder(layout: VMLayout) -> int | None:
    """The pid holding the pid file's lock as this process's pid namespace sees it (0 when the
    holder is in another one, e.g. a launcher pod), or None when no QEMU holds it."""
    try:
        fd = os.open(layout.pidfile, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        l_type, _, _, _, l_pid = struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, query))
    except OSError:
        return None
    finally:
        os.close(fd)
    return None if l_type == fcntl.F_UNLCK else l_pid


def own_pid(layout: VMLayout) -> int:
    """The pid QEMU wrote in its pid file, in its own pid namespace (a launcher pod's QEMU is
    its pod's process 1). VMInfo.pid is set (not None) exactly while QEMU runs, as the agent's
    plan expects; 0 when the file cannot be read."""
    try:
        return int(layout.pidfile.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def running(layout: VMLayout) -> bool:
    """A QEMU of this VM runs (it holds its pid file's lock)."""
    return lock_holder(layout) is not None


def wait_gone(layout: VMLayout, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while running(layout):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


# -- for tests and people on the host: pids of QEMUs in this pid namespace ----------------------

def read_pid(layout: VMLayout) -> int | None:
    """The pid of this VM's QEMU if it runs in this pid namespace (a plain process)."""
    pid = lock_holder(layout)
    return pid if pid else None


def is_ours(pid: int, layout: VMLayout) -> bool:
    """``pid`` is a live (not zombie) process whose command line names the VM's directory."""
    try:
        cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
        status = pathlib.Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    if "\nState:\tZ" in status:
        return False
    return str(layout.root).encode() in cmdline


def kill(pid: int, layout: VMLayout, timeout: float = 10.0) -> None:
    """SIGKILL a QEMU of this pid namespace (only if it is this VM's) and wait until it is gone."""
    if not is_ours(pid, layout):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if not wait_gone(layout, timeout):
        raise DriverError(f"QEMU {pid} did not exit after SIGKILL")
