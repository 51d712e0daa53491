"""Where a VM process runs: the one launcher interface and its local implementation.

A driver decides *what* VM process a droplet needs (its command line, its directory, what it
needs of the node); a ``Launcher`` decides *where* that process lives so that it outlives the
agent:

- ``ProcessLauncher`` (local development, ``hack/local-up.sh``, the integration tests): a
  plain process in its own session, re-parented to init when the agent exits.
- ``PodLauncher`` (``ferry.drivers.pod_launcher``, in a cluster): one pod per VM on the host's
  node, owned by the Droplet (KubeVirt's virt-launcher shape), so a restarted, upgraded or
  crashed agent pod takes no guest with it.

The agent reaches a VM only through files of the VM's directory on the host (its control
socket, its lock); whether a VM process is alive is decided from its lock (``vm_alive``),
which works across pid namespaces, so the driver asks the launcher only to start, kill and
clean up, and why a VM process that never answered went away.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import signal
import subprocess
import time
from typing import Protocol, runtime_checkable

from ferry.drivers.base import DriverError, VMKey


@dataclasses.dataclass(frozen=True)
class VMResources:
    """What a VM process asks of its node: the droplet's size scaled by ``FERRY_SIZE_SCALE``.

    The Host's accounting (``Host.status.allocated``) counts droplets at their full size;
    a launcher pod requests ``size x scale`` (cpu in millicores, at least 1m; memory in bytes,
    at least 1 MiB), so on a node the scheduler's sum of launcher requests is the Host's
    allocation times the scale (up to that rounding)."""

    cpu_millis: int
    memory_bytes: int

    @classmethod
    def of(cls, cpu: int, memory_mib: int, size_scale: float) -> VMResources:
        return cls(cpu_millis=max(1, round(cpu * size_scale * 1000)),
                   memory_bytes=max(1 << 20, round(memory_mib * size_scale * (1 << 20))))


@dataclasses.dataclass(frozen=True)
class Launch:
    """One VM process to start."""

    key: VMKey
    argv: tuple[str, ...]  # the VM process's command line; argv[0] is the program
    vm_dir: str  # its directory (the working directory; control socket and lock live here)
    log_path: str  # where a plain process writes its output (a pod logs to its container log)
    env: tuple[tuple[str, str], ...]  # extra environment (FERRY_* settings the VM process reads)
    resources: VMResources
    role: str = "vm"  # vm | incoming (target of a migration, not resumed yet)
    tun: bool = False  # the VM process attaches to a tap: it needs /dev/net/tun (a pod mounts it)


@runtime_checkable
class Launcher(Protocol):
    name: str

    def launch(self, req: Launch) -> None:
        """Start the VM process (returns once it was started; the driver then waits for its
        control socket). Leftovers of an earlier process of this VM on this host are removed."""

    def exited(self, key: VMKey) -> str | None:
        """Why this VM's process is gone or cannot start (None: running or still starting)."""

    def kill(self, key: VMKey, vm_dir: str, timeout: float = 30.0) -> None:
        """End the VM process of ``vm_dir`` now and wait until it is gone. Idempotent."""

    def release(self, key: VMKey) -> None:
        """The VM process has exited by itself (quit): drop whatever held it. Idempotent."""


def vm_alive(lock_path: str) -> bool:
    """True while a VM process holds the flock on ``lock_path``.

    A VM process takes the lock for its whole life (``ferry.drivers.sim.vm``); the kernel
    drops it when the process dies, whatever its pid namespace (pod or plain process). The
    test takes a shared lock for an instant; the VM process retries its own lock briefly, so
    the test never stops a VM from starting."""
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        return e.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _pid_is(pid: int, vm_dir: str) -> bool:
    """``pid`` is a live (not zombie) process whose command line names ``vm_dir`` (an argument
    that is the directory, or a path inside it: QEMU names only its files)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        if stat[stat.rindex(b")") + 2: stat.rindex(b")") + 3] in (b"Z", b"X"):
            return False
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().split(b"\0")
    except (OSError, ValueError):
        return False
    d = os.fsencode(vm_dir)
    return any(arg == d or d + b"/" in arg for arg in cmdline)


LAUNCHED_PID_FILE = "launched.pid"


class ProcessLauncher:
    """Each VM process a plain process in its own session (it outlives the agent).

    It records the pid it started in ``launched.pid`` in the VM's directory, so a new launcher
    (after an agent restart) can still kill it, whatever pid file the VM program keeps itself."""

    name = "process"

    def __init__(self, pid_file: str = "pid"):
        self.pid_file = pid_file
        self._children: dict[VMKey, subprocess.Popen] = {}

    def _reap(self) -> None:
        for key, p in list(self._children.items()):
            if p.poll() is not None:
                del self._children[key]

    def launch(self, req: Launch) -> None:
        self._reap()
        env = dict(os.environ)
        env.update(dict(req.env))
        with open(req.log_path, "ab") as logf:
            try:
                proc = subprocess.Popen(list(req.argv), stdin=subprocess.DEVNULL, stdout=logf,
                                        stderr=subprocess.STDOUT, close_fds=True, start_new_session=True,
                                        cwd=req.vm_dir, env=env)
            except OSError as e:
                raise DriverError(f"{req.key}: cannot run {req.argv[0]}: {e}") from None
        self._children[req.key] = proc
        with open(os.path.join(req.vm_dir, LAUNCHED_PID_FILE), "w") as f:
            f.write(f"{proc.pid}\n")

    def exited(self, key: VMKey) -> str | None:
        p = self._children.get(key)
        if p is not None and p.poll() is not None:
            return f"VM process exited (code {p.returncode})"
        return None

    def _pids(self, vm_dir: str) -> set[int]:
        """Live processes of this VM named by its own pid file or by the launcher's record."""
        out = set()
        for name in (self.pid_file, LAUNCHED_PID_FILE):
            try:
                with open(os.path.join(vm_dir, name)) as f:
                    pid = int(f.read().strip())
            except (OSError, ValueError):
                continue
            if _pid_is(pid, vm_dir):
                out.add(pid)
        return out

    def kill(self, key: VMKey, vm_dir: str, timeout: float = 30.0) -> None:
        p = self._children.pop(key, None)
        pids = {x for x in (p.pid if p is not None and p.poll() is None else None, *self._pids(vm_dir)) if x}
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if p is not None:
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + timeout
        while any(_pid_is(pid, vm_dir) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.02)

    def release(self, key: VMKey) -> None:
        p = self._children.get(key)
        if p is not None:
            try:
                p.wait(1.0)
            except subprocess.TimeoutExpired:
                return
            self._children.pop(key, None)
