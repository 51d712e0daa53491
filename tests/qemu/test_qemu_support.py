"""The console checks the qemu tests rely on, on consoles captured from real runs."""

from __future__ import annotations

import pytest
from guest_console import GuestKernelCrashed, assert_continues, kernel_crash

# what a target printed after QEMU 7.2 (TCG) resumed a migrated guest with a corrupted timer
# path (plain QEMU, no ferry: hack/qemu-tcg-migration-repro.py), then rebooted (panic=-1)
CRASHED = """\
[   12.549965] Kernel panic - not syncing: stack-protector: Kernel stack is corrupted in: __schedule+0x9e7/0xa00
[   12.550805] CPU: 0 PID: 0 Comm: swapper/0 Tainted: G        W          6.1.0-56-amd64 #1  Debian 6.1.192-2
[   12.551067]  <TASK>
[   12.552161] Kernel Offset: 0x15e00000 from 0xffffffff81000000
ferry-guest: boot disk=/dev/vda mem_kib=8192 disk_blocks=1024
ferry-counter 1
ferry-counter 2
ferry-counter 3
"""
GOES_ON = "ter 51\nferry-counter 52\nferry-counter 53\n"  # the line cut by the pause, then on


def test_a_target_that_goes_on_passes() -> None:
    assert_continues(51, GOES_ON)
    assert kernel_crash(GOES_ON) is None


def test_a_kernel_crash_then_a_reboot_is_named_as_the_guest_kernel_crashing() -> None:
    assert kernel_crash(CRASHED).startswith("[   12.549965] Kernel panic - not syncing: stack-protector")
    with pytest.raises(GuestKernelCrashed, match="Kernel panic"):
        assert_continues(51, CRASHED)


def test_a_restart_without_a_crash_is_a_plain_failure_never_rerun() -> None:
    """A second boot that no kernel crash explains (a driver that relaunched the guest, say) is
    ferry's to answer for: a plain AssertionError, which the rerun does not match."""
    rebooted = CRASHED[CRASHED.index("ferry-guest: boot"):]
    with pytest.raises(AssertionError) as err:
        assert_continues(51, rebooted)
    assert err.type is AssertionError
    with pytest.raises(AssertionError) as err:
        assert_continues(51, "ferry-counter 49\nferry-counter 50\n")  # went back: a repeat
    assert err.type is AssertionError
