"""The qemu guest's NIC, locally: two "hosts" (QemuDrivers) whose guests' taps sit on one
bridge in a private network namespace, a client on that bridge, and a migration measured
from the client (docs/architecture.md, "A qemu guest's NIC").

The test's thread enters a fresh network namespace (unshare(CLONE_NEWNET) applies to the
calling thread; QEMU, `ip` and the probes' threads started from it inherit it) with the
bridge ``fq0`` (10.250.0.1/24, the client's address, like ``ferrybr0`` on the nodes). The
taps are made by ``LocalTaps``, the network helper's own code (``NetHelper.add_tap``), owned
by this process's user. Figures are printed (``-s``): probes lost, longest gaps, the reported
downtime and the long-lived connection's fate.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from qemu_support import QEMU, last_counter, serial_text
from support import wait_until

from ferry.drivers.base import MigrationOptions, MigrationState, VMKey, VMSpec, VMState
from ferry.drivers.network import LocalTaps, guest_mac, tap_name, tap_owner
from ferry.drivers.qemu import QemuDriver

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from probe import IcmpProbe, LongLivedTcp, TcpProbe  # noqa: E402

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(240)]

CLONE_NEWNET = 0x40000000
BRIDGE = "fq0"
GUEST_IP = "10.250.0.10"
TCP_PORT = 7078
SECRET = bytes(range(32))
MIB = 1 << 20


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


@pytest.fixture
def netns() -> Iterator[None]:
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        pytest.skip("needs root and /dev/net/tun (a private network namespace, a bridge and taps)")
    libc = _libc()
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    if libc.unshare(CLONE_NEWNET) != 0:
        os.close(home)
        pytest.skip(f"unshare(CLONE_NEWNET): {os.strerror(ctypes.get_errno())}")
    try:
        run = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
        run("ip", "link", "set", "lo", "up")
        run("ip", "link", "add", BRIDGE, "type", "bridge")
        run("ip", "addr", "add", "10.250.0.1/24", "dev", BRIDGE)
        run("ip", "link", "set", BRIDGE, "up")
        yield
    finally:
        if libc.setns(home, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns back to the test's network namespace")
        os.close(home)


@pytest.fixture
def nic_hosts(guest: dict[str, str], tmp_path, netns) -> Iterator[tuple[QemuDriver, QemuDriver]]:
    made = [QemuDriver(tmp_path / h, kernel=guest["kernel"], initrd=guest["initrd"], size_scale=0.001,
                       binary=QEMU, max_vcpus=1, taps=LocalTaps(BRIDGE)) for h in ("host-a", "host-b")]
    yield made[0], made[1]
    for d in made:
        for vm in d.list_vms():
            d.destroy(vm.key)
        d.close()


def links() -> dict[str, dict]:
    out = subprocess.run(["ip", "-j", "-d", "link", "show"], check=True, capture_output=True, text=True).stdout
    return {link["ifname"]: link for link in json.loads(out)}


def boot_with_nic(driver: QemuDriver, spec: VMSpec) -> None:
    assert driver.start(spec).state == VMState.RUNNING
    serial = driver.layout(spec.key).serial
    wait_until(lambda: last_counter(serial) >= 3, 60, what="the guest to boot")
    assert f"ip={GUEST_IP}" in serial_text(serial), serial_text(serial)[:2000]
    wait_until(lambda: _echo_once(), 20, interval=0.2, what="the guest's TCP echo service")


def _echo_once() -> bool:
    with contextlib.suppress(OSError):
        return LongLivedTcp(GUEST_IP, TCP_PORT, timeout=1).check() == "survived"
    return False


def test_the_guest_has_its_address_on_a_tap_of_the_bridge(nic_hosts, tmp_path) -> None:
    a, _ = nic_hosts
    spec = VMSpec(key=VMKey("t", "nic"), cpu=1, memory_mib=1024, disk_gib=25, ip=GUEST_IP)
    boot_with_nic(a, spec)
    tap = tap_name(str(a.layout(spec.key).root))
    link = links()[tap]
    assert link.get("master") == BRIDGE and "UP" in link["flags"]
    assert tap_owner(tap) == os.getuid()  # QEMU's user may attach without a capability
    mac = guest_mac("t", "nic")
    assert f"eth0 {mac}" in serial_text(a.layout(spec.key).serial)  # the derived MAC, inside the guest
    with IcmpProbe(GUEST_IP) as ping:
        wait_until(lambda: len(ping.answers) >= 20, 10, what="20 ping answers")
    assert LongLivedTcp(GUEST_IP, TCP_PORT).check() == "survived"
    a.destroy(spec.key)
    assert tap not in links()  # the tap goes with its VM


def test_live_migration_keeps_the_address_ping_and_tcp_connections(nic_hosts) -> None:
    a, b = nic_hosts
    spec = VMSpec(key=VMKey("t", "nic-move"), cpu=1, memory_mib=1024, disk_gib=25, ip=GUEST_IP)
    boot_with_nic(a, spec)
    long_lived = LongLivedTcp(GUEST_IP, TCP_PORT)
    assert long_lived.opened
    tap_a, tap_b = (tap_name(str(d.layout(spec.key).root)) for d in (a, b))
    with IcmpProbe(GUEST_IP) as ping, TcpProbe(GUEST_IP, TCP_PORT) as tcp:
        wait_until(lambda: len(ping.answers) >= 50 and len(tcp.answers) >= 50, 20, what="probes answered")
        address = b.prepare_incoming(spec, "127.0.0.1", SECRET, "m-nic")
        assert tap_b in links()  # the target's tap exists before its QEMU (paused) attaches
        a.start_migration(spec.key, address, SECRET, "m-nic", MigrationOptions(downtime_budget_ms=300,
                                                                               bandwidth_bps=64 * MIB))
        src = wait_until(lambda: (s := a.query_migration(spec.key)).state in (
            MigrationState.COMPLETED, MigrationState.FAILED) and s, 120, interval=0.05, what="the copy to end")
        assert src.state == MigrationState.COMPLETED, src.error
        wait_until(lambda: b.query_migration(spec.key).state == MigrationState.RECEIVED, 30, interval=0.05,
                   what="the target to receive")
        b.resume(spec.key)
        t_resume = time.monotonic()
        t0 = time.monotonic()
        b.announce(spec.key)  # the agent's ClaimAddress step for a guest with a NIC
        announce_ms = (time.monotonic() - t0) * 1000
        a.destroy(spec.key)
        assert tap_a not in links() and tap_b in links()
        wait_until(lambda: ping.answered_since(t_resume) >= 100 and tcp.answered_since(t_resume) >= 100, 30,
                   what="answers from the target")
    fate = long_lived.check()
    icmp, tcp_r = ping.result(), tcp.result()
    print(f"\nqemu NIC, local bridge: {IcmpProbe.line(icmp)}; {TcpProbe.line(tcp_r)}; "
          f"downtime {src.downtime_ms} ms; announce-self {announce_ms:.0f} ms; long-lived TCP connection {fate}; "
          f"tcp probe connection errors {tcp_r['connection_errors']}")
    assert fate == "survived"
    assert tcp_r["connection_errors"] == []  # the probes' own connection survived as well
    assert icmp["answered"] > 0 and tcp_r["answered"] > 0
    assert state_of_vm(b, spec) == VMState.RUNNING
    b.destroy(spec.key)
    assert tap_b not in links()


def test_cancel_after_the_copy_leaves_the_guest_answering_on_the_source(nic_hosts) -> None:
    a, b = nic_hosts
    spec = VMSpec(key=VMKey("t", "nic-stay"), cpu=1, memory_mib=1024, disk_gib=25, ip=GUEST_IP)
    boot_with_nic(a, spec)
    long_lived = LongLivedTcp(GUEST_IP, TCP_PORT)
    with IcmpProbe(GUEST_IP) as ping:
        address = b.prepare_incoming(spec, "127.0.0.1", SECRET, "m-stay")
        a.start_migration(spec.key, address, SECRET, "m-stay", MigrationOptions(downtime_budget_ms=300,
                                                                                bandwidth_bps=64 * MIB))
        src = wait_until(lambda: (s := a.query_migration(spec.key)).state in (
            MigrationState.COMPLETED, MigrationState.FAILED) and s, 120, interval=0.05, what="the copy to end")
        assert src.state == MigrationState.COMPLETED, src.error
        # the target's QEMU announced the guest's MAC when the copy arrived; the record never
        # flips: the target is dropped, the source resumes and takes its MAC back
        b.cancel_migration(spec.key)
        a.cancel_migration(spec.key)
        t_back = time.monotonic()
        wait_until(lambda: ping.answered_since(t_back) >= 100, 30, what="answers from the source again")
    assert long_lived.check() == "survived"
    print(f"\nqemu NIC, cancelled after the copy: {IcmpProbe.line(ping.result())}")
    assert state_of_vm(a, spec) == VMState.RUNNING


def state_of_vm(driver: QemuDriver, spec: VMSpec) -> VMState | None:
    return next((vm.state for vm in driver.list_vms() if vm.key == spec.key), None)
