"""Reading the test guest's serial console, wherever it runs (tests/qemu on loopback hosts,
tests/e2e inside launcher pods on real nodes): its counter lines, its boot banner, and the
signature of QEMU 7.2 TCG's own guest crash after a live migration."""

from __future__ import annotations

import re

# whole lines only: a VM can stop mid-line, and the rest of that line then comes out
# of the target's serial port
COUNTER = re.compile(r"^ferry-counter (\d+)\r?\n", re.MULTILINE)
BOOT_BANNER = "ferry-guest: boot"


def counters_in(text: str) -> list[int]:
    """The counter values on whole lines of a console text."""
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
    seen = counters_in(text)
    if seen and seen[0] in (frozen + 1, frozen + 2) and BOOT_BANNER not in text:
        return
    m = COUNTER.search(text)
    head = text[: (m.end() if m else len(text)) + 200][-3000:]
    crash = kernel_crash(text[: m.start() if m else len(text)])
    error = GuestKernelCrashed if crash else AssertionError
    raise error(f"the target does not go on from counter {frozen}: it counts {seen[:3]}; "
                f"its console begins:\n{head}")
