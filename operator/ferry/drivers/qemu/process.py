"""Starting and finding daemonized QEMU processes.

QEMU runs with ``-daemonize -pidfile``: it detaches from the agent (its own session,
re-parented to init), so it outlives an agent restart. A process is ours only if its
command line names the VM's directory, which guards against a recycled pid.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import subprocess
import time

from ferry.drivers.base import DriverError

from .config import VMLayout


def launch(argv: list[str], layout: VMLayout, timeout: float) -> int:
    """Run QEMU daemonized; return its pid once it is up (QMP socket listening)."""
    for stale in (layout.pidfile, layout.qmp, layout.qmp_aux):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    # stdout/stderr go to a file, not a pipe: the daemon must not hold our pipe open
    # (QEMU points them at /dev/null once it has daemonized)
    try:
        with open(layout.stderr, "ab") as errfile:
            start = errfile.tell()
            proc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=errfile,
                stderr=errfile,
                timeout=timeout,
                start_new_session=True,
                cwd=layout.root,  # unix sockets are bound relative to the VM's directory
            )
    except FileNotFoundError as exc:
        raise DriverError(f"cannot run {argv[0]}: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise DriverError(f"{argv[0]} did not start within {timeout} s") from exc
    with open(layout.stderr, "rb") as f:
        f.seek(start)
        err = f.read().decode(errors="replace").strip()
    if proc.returncode != 0:
        raise DriverError(f"QEMU failed to start ({proc.returncode}): {err[-500:]}")
    pid = read_pid(layout)
    if pid is None:
        raise DriverError(f"QEMU started but no live process behind {layout.pidfile}: {err[-500:]}")
    return pid


def read_pid(layout: VMLayout) -> int | None:
    """The pid of this VM's QEMU if it is alive (not a zombie, command line names the VM)."""
    try:
        pid = int(layout.pidfile.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if is_ours(pid, layout) else None


def is_ours(pid: int, layout: VMLayout) -> bool:
    try:
        cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
        status = pathlib.Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    if "\nState:\tZ" in status:
        return False
    return str(layout.root).encode() in cmdline


def wait_gone(pid: int, layout: VMLayout, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while is_ours(pid, layout):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def kill(pid: int, layout: VMLayout, timeout: float = 10.0) -> None:
    """SIGKILL the VM's QEMU (only if it is ours) and wait until it is gone."""
    if not is_ours(pid, layout):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if not wait_gone(pid, layout, timeout):
        raise DriverError(f"QEMU {pid} did not exit after SIGKILL")
