"""Whether a QEMU runs is its pid file's POSIX lock (good across pid namespaces), and a plain
QEMU process started by the ProcessLauncher can be killed by a later launcher (an agent
restart) although QEMU keeps its own pid file under another name."""

from __future__ import annotations

import pathlib
import sys

from ferry.drivers.base import VMKey
from ferry.drivers.launcher import Launch, ProcessLauncher, VMResources
from ferry.drivers.qemu import process
from ferry.drivers.qemu.config import VMLayout
from support import wait_until

KEY = VMKey("ns", "web")

# Stands in for QEMU: takes the POSIX write lock on its -pidfile the way QEMU 7.2's
# qemu_write_pidfile does (fcntl F_SETLK), writes its pid and runs until killed.
FAKE_QEMU = """
import fcntl, os, sys, time
path = sys.argv[sys.argv.index("-pidfile") + 1]
fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.ftruncate(fd, 0); os.write(fd, f"{os.getpid()}\\n".encode())
while True:
    time.sleep(1)
"""


def launch(tmp_path: pathlib.Path, launcher: ProcessLauncher) -> VMLayout:
    layout = VMLayout.of(tmp_path, KEY)
    layout.root.mkdir(parents=True)
    launcher.launch(Launch(key=KEY, argv=(sys.executable, "-c", FAKE_QEMU, "-pidfile", str(layout.pidfile)),
                           vm_dir=str(layout.root), log_path=str(layout.stderr), env=(),
                           resources=VMResources.of(1, 1024, 0.001)))
    return layout


def test_a_held_pid_file_lock_is_a_running_qemu(tmp_path: pathlib.Path) -> None:
    launcher = ProcessLauncher()
    layout = launch(tmp_path, launcher)
    assert not process.running(VMLayout.of(tmp_path, VMKey("ns", "other")))
    wait_until(lambda: process.running(layout), 10, what="the fake QEMU to lock its pid file")
    pid = int(layout.pidfile.read_text())
    assert process.lock_holder(layout) == pid  # same pid namespace: the holder's pid is visible
    assert process.read_pid(layout) == pid and process.is_ours(pid, layout)
    assert launcher.exited(KEY) is None
    # asking never takes the lock: QEMU keeps it, and asking again says the same
    assert process.running(layout) and process.running(layout)
    launcher.kill(KEY, str(layout.root), timeout=10)
    assert not process.running(layout)  # the kernel dropped the lock with the process
    assert layout.pidfile.exists()  # killed: the file is left (the driver then removes it)
    assert process.lock_holder(layout) is None


def test_a_new_launcher_kills_the_qemu_an_earlier_one_started(tmp_path: pathlib.Path) -> None:
    first = ProcessLauncher()
    layout = launch(tmp_path, first)
    wait_until(lambda: process.running(layout), 10, what="the fake QEMU to lock its pid file")
    assert (layout.root / "launched.pid").read_text().strip() == layout.pidfile.read_text().strip()
    # the agent restarts: a new launcher knows no child, only the VM's directory
    ProcessLauncher().kill(KEY, str(layout.root), timeout=10)
    wait_until(lambda: not process.running(layout), 10, what="the fake QEMU gone")
    first.release(KEY)
