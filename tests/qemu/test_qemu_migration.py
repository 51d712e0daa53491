"""The qemu driver against real QEMU (TCG): two hosts on loopback, no Kubernetes.

Each test boots the test guest (Debian kernel + busybox init that prints
"ferry-counter N" every ~100 ms and keeps writing memory and disk) and checks
what the guest shows on its serial console, what the driver reports and what is on
disk. Windows such as "mid-mirror" come from bandwidth limits on a disk filled
with random data, and every wait is on a condition with a timeout.
"""

from __future__ import annotations

import hashlib
import os
import signal

import pytest
from guest_console import BOOT_BANNER, assert_continues
from qemu_support import (
    counters,
    fill_disk,
    last_counter,
    serial_text,
    wait_counting,
)
from support import wait_until

from ferry.drivers.base import MigrationOptions, MigrationState, VMSpec, VMState
from ferry.drivers.qemu import QemuDriver
from ferry.drivers.qemu.qmp import QMPClient
from ferry.transfer.digest import image_root

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(180)]

SECRET = bytes(range(32))
MIB = 1 << 20
BOOT_TIMEOUT = 60


def sha256(path: os.PathLike) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def state_of(driver: QemuDriver, spec: VMSpec) -> VMState | None:
    for vm in driver.list_vms():
        if vm.key == spec.key:
            return vm.state
    return None


def boot(driver: QemuDriver, spec: VMSpec, min_counter: int = 3) -> None:
    info = driver.start(spec)
    assert info.state == VMState.RUNNING
    serial = driver.layout(spec.key).serial
    wait_until(lambda: last_counter(serial) >= min_counter, BOOT_TIMEOUT, what="the guest to boot and count")


def wait_migration(driver: QemuDriver, spec: VMSpec, states: set[MigrationState], timeout: float = 90):
    return wait_until(
        lambda: (s := driver.query_migration(spec.key)).state in states and s,
        timeout, interval=0.1, what=f"migration state in {sorted(x.value for x in states)}",
    )


def keeps_counting(driver: QemuDriver, spec: VMSpec, more: int = 5, timeout: float = 30) -> None:
    layout = driver.layout(spec.key)
    start = last_counter(layout.serial)
    wait_counting(layout.serial, layout.qmp_aux, lambda c: c[-1] >= start + more, timeout,
                  what=f"the counter to pass {start + more}")


def aux_monitor(driver: QemuDriver, spec: VMSpec) -> QMPClient:
    return QMPClient.connect(str(driver.layout(spec.key).qmp_aux))


def assert_source_clean(driver: QemuDriver, spec: VMSpec) -> None:
    """No mirror job, no NBD client node, migration not active: the source runs alone."""
    with aux_monitor(driver, spec) as q:
        assert q.execute("query-block-jobs") == []
        nodes = [n["node-name"] for n in q.execute("query-named-block-nodes")]
        assert not [n for n in nodes if n.startswith("ferry-")], nodes
        assert q.execute("query-status")["status"] == "running"
        assert q.execute("query-migrate").get("status") in (None, "cancelled", "failed")


def test_live_migration_moves_the_running_guest(hosts: tuple[QemuDriver, QemuDriver], spec: VMSpec) -> None:
    a, b = hosts
    boot(a, spec)
    address = b.prepare_incoming(spec, "127.0.0.1", SECRET, "m-live")
    assert address.startswith("127.0.0.1:")
    assert state_of(b, spec) == VMState.INCOMING
    assert b.prepare_incoming(spec, "127.0.0.1", SECRET, "m-live") == address  # idempotent

    a.start_migration(spec.key, address, SECRET, "m-live", MigrationOptions(downtime_budget_ms=300,
                                                                            bandwidth_bps=32 * MIB))
    src = wait_migration(a, spec, {MigrationState.COMPLETED, MigrationState.FAILED, MigrationState.ABORTED})
    assert src.state == MigrationState.COMPLETED, src.error
    dst = wait_migration(b, spec, {MigrationState.RECEIVED, MigrationState.FAILED})
    assert dst.state == MigrationState.RECEIVED, dst.error

    # both paused at the switchover: the disks are identical; the target froze its copy (the
    # digests come after the resume), the paused source hashes its disk meanwhile
    assert state_of(a, spec) == VMState.PAUSED
    assert state_of(b, spec) == VMState.INCOMING
    assert sha256(a.layout(spec.key).disk) == sha256(b.layout(spec.key).disk)
    assert dst.frozen_point and dst.digest is None and b.layout(spec.key).overlay.exists()
    src = wait_until(lambda: (s := a.query_migration(spec.key)).digest and s, 60, what="the source's digest")
    assert src.digest.startswith("sha256:")

    # progress was reported as the sim driver reports it
    disk_bytes = a.guest_size(spec).disk_bytes
    assert src.disk.total >= disk_bytes and src.disk.sent == src.disk.total and src.disk.remaining == 0
    assert src.memory.total >= 96 * MIB and 0 < src.memory.sent and src.memory.remaining == 0
    assert src.round >= 1 and src.rounds
    assert src.downtime_ms is not None and 0 < src.downtime_ms < 5000
    assert src.bandwidth_bps > 0 and src.throttle_percent == 0

    # the source stays frozen; the target resumes and the SAME guest keeps counting
    frozen = last_counter(a.layout(spec.key).serial)
    b.resume(spec.key)
    assert state_of(b, spec) == VMState.RUNNING
    b.resume(spec.key)  # idempotent
    target_serial = b.layout(spec.key).serial
    wait_counting(target_serial, b.layout(spec.key).qmp_aux, lambda c: len(c) >= 10, 30, what="the target to count")
    assert_continues(frozen, serial_text(target_serial))
    # the source's console followed by the target's is one guest counting on: no gap,
    # no repeat, no restart (a line cut by the pause is completed by the target)
    seen = counters(serial_text(a.layout(spec.key).serial) + serial_text(target_serial))
    assert seen == list(range(1, len(seen) + 1)), seen
    assert BOOT_BANNER not in serial_text(target_serial)  # no second boot
    assert last_counter(a.layout(spec.key).serial) == frozen
    # after the resume: the frozen point's digest equals the paused source's, the overlay is merged
    dst = wait_until(lambda: (s := b.query_migration(spec.key)).digest and s, 60, what="the frozen point's digest")
    assert dst.digest == src.digest
    wait_until(lambda: not b.layout(spec.key).overlay.exists(), 60, what="the overlay merged back")

    a.destroy(spec.key)
    assert a.list_vms() == []
    keeps_counting(b, spec)


def test_cancel_mid_mirror_leaves_the_source_running(hosts: tuple[QemuDriver, QemuDriver], spec: VMSpec) -> None:
    a, b = hosts
    fill_disk(a, spec)
    boot(a, spec)
    address = b.prepare_incoming(spec, "127.0.0.1", SECRET, "m-cancel")
    a.start_migration(spec.key, address, SECRET, "m-cancel", MigrationOptions(bandwidth_bps=2 * MIB))
    wait_until(lambda: (s := a.query_migration(spec.key)).disk.sent > 0 and s.memory.total == 0, 30,
               interval=0.1, what="the mirror to be copying")
    a.cancel_migration(spec.key)
    stats = a.query_migration(spec.key)
    assert stats.state == MigrationState.ABORTED
    assert stats.disk.remaining > 0  # it really was mid-mirror
    assert state_of(a, spec) == VMState.RUNNING
    assert_source_clean(a, spec)
    keeps_counting(a, spec)
    a.cancel_migration(spec.key)  # idempotent
    assert state_of(a, spec) == VMState.RUNNING

    b.cancel_migration(spec.key)  # the target is torn down and its image deleted
    assert state_of(b, spec) is None
    assert not b.layout(spec.key).root.exists()


def test_killed_target_leaves_the_source_running(hosts: tuple[QemuDriver, QemuDriver], spec: VMSpec) -> None:
    a, b = hosts
    fill_disk(a, spec)
    boot(a, spec)
    address = b.prepare_incoming(spec, "127.0.0.1", SECRET, "m-kill")
    a.start_migration(spec.key, address, SECRET, "m-kill", MigrationOptions(bandwidth_bps=2 * MIB))
    wait_until(lambda: a.query_migration(spec.key).disk.sent > 0, 30, interval=0.1, what="the mirror to copy")
    target_pid = next(vm.pid for vm in b.list_vms() if vm.key == spec.key)
    os.kill(target_pid, signal.SIGKILL)

    stats = wait_migration(a, spec, {MigrationState.FAILED, MigrationState.COMPLETED, MigrationState.ABORTED})
    assert stats.state == MigrationState.FAILED
    assert stats.error
    assert state_of(a, spec) == VMState.RUNNING
    assert_source_clean(a, spec)
    keeps_counting(a, spec)

    assert wait_migration(b, spec, {MigrationState.FAILED}).error
    [vm] = b.list_vms()  # still an incoming VM (partial data, never a droplet), no process
    assert vm.state == VMState.INCOMING and vm.pid is None
    b.destroy(spec.key)
    assert not b.layout(spec.key).root.exists()


def test_offline_migration_of_a_stopped_vm(hosts: tuple[QemuDriver, QemuDriver], spec: VMSpec) -> None:
    a, b = hosts
    off = VMSpec(spec.key, spec.cpu, spec.memory_mib, spec.disk_gib, power_on=False)
    fill_disk(a, off)
    assert a.start(off).state == VMState.STOPPED  # image only, nothing runs
    image = sha256(a.layout(spec.key).disk)

    with pytest.raises(Exception, match="offline"):
        a.start_migration(spec.key, "127.0.0.1:1", SECRET, "m-x", MigrationOptions(offline=False))

    address = b.prepare_incoming(off, "127.0.0.1", SECRET, "m-off")
    a.start_migration(spec.key, address, SECRET, "m-off", MigrationOptions(offline=True))
    assert state_of(a, spec) == VMState.STOPPED  # its disk is served, its guest never runs
    src = wait_migration(a, spec, {MigrationState.COMPLETED, MigrationState.FAILED})
    assert src.state == MigrationState.COMPLETED, src.error
    dst = wait_migration(b, spec, {MigrationState.RECEIVED, MigrationState.FAILED})
    assert dst.state == MigrationState.RECEIVED, dst.error
    fd = os.open(a.layout(spec.key).disk, os.O_RDONLY)
    try:  # the digest is the image's, as an independent full read computes it
        expected = "sha256:" + image_root(fd, a.guest_size(spec).disk_bytes, 1 << 20).hex()
    finally:
        os.close(fd)
    assert src.digest == dst.digest == expected
    assert sha256(b.layout(spec.key).disk) == image
    assert src.disk.sent == src.disk.total >= a.guest_size(spec).disk_bytes
    assert src.rounds == [] and src.downtime_ms is None and src.max_throttle_percent == 0

    b.resume(spec.key)  # powerState off: the droplet stays off, with its image
    assert state_of(b, spec) == VMState.STOPPED
    assert sha256(b.layout(spec.key).disk) == image
    a.destroy(spec.key)

    # ... and starts on the target from the copied image when powered on
    on = VMSpec(spec.key, spec.cpu, spec.memory_mib, spec.disk_gib, power_on=True)
    assert b.start(on).state == VMState.RUNNING
    wait_until(lambda: last_counter(b.layout(spec.key).serial) >= 2, BOOT_TIMEOUT, what="the target guest to boot")


def test_wrong_secret_is_refused_and_the_source_is_unchanged(hosts: tuple[QemuDriver, QemuDriver],
                                                             spec: VMSpec) -> None:
    a, b = hosts
    off = VMSpec(spec.key, spec.cpu, spec.memory_mib, spec.disk_gib, power_on=False)
    fill_disk(a, off)
    a.start(off)
    image = sha256(a.layout(spec.key).disk)
    address = b.prepare_incoming(off, "127.0.0.1", SECRET, "m-tls")
    a.start_migration(spec.key, address, b"\x01" * 32, "m-tls", MigrationOptions(offline=True))
    stats = wait_migration(a, spec, {MigrationState.FAILED, MigrationState.COMPLETED}, timeout=60)
    assert stats.state == MigrationState.FAILED
    assert state_of(a, spec) == VMState.STOPPED and not any(vm.pid for vm in a.list_vms())
    assert sha256(a.layout(spec.key).disk) == image
    assert b.query_migration(spec.key).state not in (MigrationState.RECEIVED, MigrationState.COPYING)
    assert not any(b.layout(spec.key).disk.read_bytes())  # nothing reached the target


def test_prepare_incoming_never_binds_a_wildcard(hosts: tuple[QemuDriver, QemuDriver], spec: VMSpec) -> None:
    _, b = hosts
    with pytest.raises(Exception, match="wildcard"):
        b.prepare_incoming(spec, "0.0.0.0", SECRET, "m-any")
    address = b.prepare_incoming(spec, "127.0.0.1", SECRET, "m-lo")
    port = int(address.rsplit(":", 1)[1])
    listening = open("/proc/net/tcp").read().lower()
    for p in (port, port + 1):  # migration and NBD, both on 127.0.0.1 only
        assert f"0100007f:{p:04x}" in listening
        assert f"00000000:{p:04x}" not in listening


def test_reattach_after_an_agent_restart(guest: dict[str, str], tmp_path, spec: VMSpec) -> None:
    from qemu_support import make_driver

    a = make_driver(guest, tmp_path / "host")
    info = a.start(spec)
    a.close()  # the agent goes away; QEMU stays
    a2 = make_driver(guest, tmp_path / "host")
    try:
        [vm] = a2.list_vms()
        assert vm.key == spec.key and vm.pid == info.pid and vm.state == VMState.RUNNING
        assert a2.start(spec).pid == info.pid  # start is idempotent
        a2.stop(spec.key)
        [vm] = a2.list_vms()
        assert vm.state == VMState.STOPPED and vm.pid is None
        assert a2.layout(spec.key).disk.exists()
    finally:
        a2.destroy(spec.key)
        a2.close()


def test_agent_restart_mid_migration_rolls_back(hosts: tuple[QemuDriver, QemuDriver], spec: VMSpec,
                                                guest: dict[str, str]) -> None:
    from qemu_support import make_driver

    a, b = hosts
    fill_disk(a, spec)
    a.start(spec)
    address = b.prepare_incoming(spec, "127.0.0.1", SECRET, "m-restart")
    a.start_migration(spec.key, address, SECRET, "m-restart", MigrationOptions(bandwidth_bps=1 * MIB))
    wait_until(lambda: a.query_migration(spec.key).disk.sent > 0, 30, interval=0.1, what="the mirror to copy")
    a.close()  # the source agent dies mid-mirror
    a2 = make_driver(guest, a.data_dir)
    try:
        [vm] = a2.list_vms()  # re-attaches and settles the orphaned migration
        assert vm.state == VMState.RUNNING
        stats = a2.query_migration(spec.key)
        assert stats.state == MigrationState.FAILED and "restart" in (stats.error or "")
        assert_source_clean(a2, spec)
    finally:
        a2.destroy(spec.key)
        a2.close()


def _migrate(src: QemuDriver, dst: QemuDriver, spec: VMSpec, mid: str) -> None:
    """Run one migration src -> dst to the switchover (both paused, the target's disk frozen)."""
    address = dst.prepare_incoming(spec, "127.0.0.1", SECRET, mid)
    src.start_migration(spec.key, address, SECRET, mid, MigrationOptions(downtime_budget_ms=300,
                                                                         bandwidth_bps=32 * MIB))
    s = wait_migration(src, spec, {MigrationState.COMPLETED, MigrationState.FAILED, MigrationState.ABORTED})
    assert s.state == MigrationState.COMPLETED, s.error
    d = wait_migration(dst, spec, {MigrationState.RECEIVED, MigrationState.FAILED})
    assert d.state == MigrationState.RECEIVED and d.frozen_point, d.error


def test_cancel_at_the_switchover_resumes_the_guest_which_keeps_counting(hosts: tuple[QemuDriver, QemuDriver],
                                                                          spec: VMSpec) -> None:
    """The guest paused for the switchover (stream and mirror done, the target's disk frozen), and the
    record has not moved: a cancel resumes it on its source, the same guest counting on."""
    a, b = hosts
    boot(a, spec)
    _migrate(a, b, spec, "m-switch")
    assert state_of(a, spec) == VMState.PAUSED
    frozen = last_counter(a.layout(spec.key).serial)
    a.cancel_migration(spec.key)
    b.cancel_migration(spec.key)
    assert state_of(a, spec) == VMState.RUNNING
    assert state_of(b, spec) is None  # the target is torn down, its image deleted
    keeps_counting(a, spec)
    seen = counters(a.layout(spec.key).serial)
    assert seen == list(range(1, len(seen) + 1)) and seen[-1] > frozen  # no gap, no restart
    assert serial_text(a.layout(spec.key).serial).count(BOOT_BANNER) == 1
    with aux_monitor(a, spec) as q:  # alone again: no mirror, no NBD node; (query-migrate keeps "completed")
        assert q.execute("query-block-jobs") == []
        assert not [n["node-name"] for n in q.execute("query-named-block-nodes") if n["node-name"].startswith("ferry-")]
        assert q.execute("query-status")["status"] == "running"


def test_a_guest_that_arrived_migrates_again_a_to_b_to_a(hosts: tuple[QemuDriver, QemuDriver], spec: VMSpec) -> None:
    """A -> B -> A: the VM B started as an incoming target is an ordinary source later; and
    the guest's own clock is right after each move."""
    import time

    from qemu_support import clocks

    a, b = hosts
    boot(a, spec, min_counter=12)

    def offset(serial) -> float:
        """Host time minus the guest's, at the next clock line the guest prints (whole seconds:
        the line's own truncation and the serial latency are in it, on both sides alike)."""
        before = len(clocks(serial))
        guest_t, host_t = wait_until(lambda: len(clocks(serial)) > before and (clocks(serial)[-1], time.time()),
                                     30, interval=0.05, what="a clock line")
        return host_t - guest_t

    baseline = offset(a.layout(spec.key).serial)
    text = {"a1": "", "b": ""}
    for src, dst, mid, key in ((a, b, "m-there", "a1"), (b, a, "m-back", "b")):
        _migrate(src, dst, spec, mid)
        dst.resume(spec.key)
        text[key] = serial_text(src.layout(spec.key).serial)
        src.destroy(spec.key)
        assert state_of(src, spec) is None and state_of(dst, spec) == VMState.RUNNING
        # The guest's clock after the move agrees with the host's as well as before it: a clock
        # that stood still during the copy or jumped would be off by the move's seconds.
        drift = offset(dst.layout(spec.key).serial) - baseline
        assert abs(drift) <= 2.5, f"guest clock moved {drift:.1f}s against the host's across {mid}"
    keeps_counting(a, spec)
    seen = counters(text["a1"] + text["b"] + serial_text(a.layout(spec.key).serial))
    assert seen == list(range(1, len(seen) + 1)), seen[:5]
    assert (text["a1"] + text["b"] + serial_text(a.layout(spec.key).serial)).count(BOOT_BANNER) == 1


def test_a_qemu_killed_from_outside_is_reported_crashed_and_a_restart_is_counted(guest: dict[str, str], tmp_path,
                                                                                  spec: VMSpec) -> None:
    from qemu_support import make_driver

    a = make_driver(guest, tmp_path / "host")
    try:
        boot(a, spec, min_counter=1)
        a.stop(spec.key)  # asked to stop: not a crash
        [vm] = a.list_vms()
        assert vm.state == VMState.STOPPED and not vm.crashed
        info = a.start(spec)
        assert info.restarts == 0
        os.kill(info.pid, signal.SIGKILL)  # as the OOM killer would
        wait_until(lambda: a.list_vms()[0].state == VMState.STOPPED, 10, what="QEMU gone")
        [vm] = a.list_vms()
        assert vm.crashed and vm.restarts == 0
        again = a.start(spec)
        assert again.state == VMState.RUNNING and again.restarts == 1 and again.restarted_at
        [vm] = a.list_vms()
        assert not vm.crashed and vm.restarts == 1
        a.destroy(spec.key)
        assert a.list_vms() == []
    finally:
        a.close()
