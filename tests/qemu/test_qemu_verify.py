"""The qemu driver's copy verification on a disk of real size (1.1 GiB, sparse), checked
against a frozen point after the guest resumed (docs/architecture.md, "What verified means"):
the target freezes its received disk at the switchover (a qcow2 overlay), the guest runs again
on the target, then both sides hash (source: its paused disk; target: the frozen base) and the
overlay is merged back. Clean runs with two amounts of written data (64 and 512 MiB) show that
the downtime no longer grows with the data (the hashes do, outside the pause); a byte corrupted
on the target after the mirror copied it is caught (unequal digests). The 512 MiB run is a
measurement, deselected unless FERRY_QEMU_LONG=1 (tests/qemu/conftest.py). Each run prints QEMU's
downtime, the freeze's cost in the pause, each side's hash time and bytes, and what the
downtime would have been had the hash stayed in the pause (QEMU's pause + the slower side's
hash, from the same run). Memory: the guest's own checksum of a RAM region written once at
boot is the same before and after the move."""

from __future__ import annotations

import os

import pytest
from guest_console import assert_continues
from qemu_support import memsums, wait_counting
from support import wait_until
from test_qemu_migration import SECRET, boot, keeps_counting, wait_migration

from ferry.drivers.base import MigrationOptions, MigrationState, VMKey, VMSpec
from ferry.transfer.digest import image_root

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(300)]

MIB = 1 << 20
DATA_AT = 512 * MIB  # 64 MiB of random data the guest never writes (it writes its first 4 MiB)
DATA_LEN = 64 * MIB
# The corrupted run: its data near the start and a 128 MiB/s mirror. QEMU's rate limit counts
# the sparse disk's zeros too, so the 1.1 GiB pass takes ~9 s (70 s at 16 MiB/s with the data
# in the middle), and the byte is flipped on the target once the data's first MiB is there,
# before the mirror has gone through the zeros after it (the mirror goes front to back).
CORRUPT_DATA_AT = 16 * MIB
CORRUPT_BANDWIDTH = 128 * MIB


def big_spec(name: str) -> VMSpec:
    return VMSpec(key=VMKey("t", name), cpu=1, memory_mib=1024, disk_gib=1100)  # x0.001: 1.1 GiB disk


def sparse_disk_with_data(driver, spec: VMSpec, data_at: int = DATA_AT) -> bytes:
    layout = driver.layout(spec.key)
    layout.root.mkdir(parents=True, exist_ok=True)
    size = driver.guest_size(spec).disk_bytes
    assert size >= 1 << 30
    data = os.urandom(DATA_LEN)
    with open(layout.disk, "wb") as f:
        f.truncate(size)
        f.seek(data_at)
        f.write(data)
    return data


def full_read_digest(path, size: int) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        return "sha256:" + image_root(fd, size, 1 << 20).hex()
    finally:
        os.close(fd)


def write_data(driver, spec: VMSpec, mib: int, data_at: int = DATA_AT) -> bytes:
    """``mib`` MiB of random data at ``data_at`` of a sparse 1.1 GiB disk; returns its first 64 MiB."""
    data = sparse_disk_with_data(driver, spec, data_at)
    with open(driver.layout(spec.key).disk, "r+b") as f:
        for i in range(1, mib // (DATA_LEN // MIB)):
            f.seek(data_at + i * DATA_LEN)
            f.write(bytes([i]) + data[1:])  # distinct 64 MiB chunks
    return data


def frozen_base_digest_and_overlay(driver, spec: VMSpec) -> tuple[bool, list[str]]:
    """Whether the overlay file exists, and the block nodes QEMU has (asked on the aux monitor)."""
    from test_qemu_migration import aux_monitor

    with aux_monitor(driver, spec) as q:
        nodes = [n["node-name"] for n in q.execute("query-named-block-nodes")]
    return driver.layout(spec.key).overlay.exists(), nodes


@pytest.mark.parametrize("mib,corrupt", [(64, False), (512, False), (64, True)],
                         ids=["clean-64MiB", "clean-512MiB", "corrupted-target-byte"])
def test_one_gib_disk_is_verified_after_the_resume_and_a_corrupted_byte_is_caught(hosts, mib: int, corrupt: bool,
                                                                                   capsys) -> None:
    a, b = hosts
    spec = big_spec(f"big-{mib}-{'bad' if corrupt else 'ok'}")
    data_at = CORRUPT_DATA_AT if corrupt else DATA_AT
    data = write_data(a, spec, mib, data_at)
    boot(a, spec)
    serial_a = a.layout(spec.key).serial
    wait_until(lambda: memsums(serial_a), 60, what="the guest's first RAM checksum")
    size = a.guest_size(spec).disk_bytes
    address = b.prepare_incoming(spec, "127.0.0.1", SECRET, "m-big")
    # the corrupted run needs a window to flip a byte on the target mid-mirror: a rate limit
    a.start_migration(spec.key, address, SECRET, "m-big",
                      MigrationOptions(downtime_budget_ms=300, bandwidth_bps=CORRUPT_BANDWIDTH if corrupt else None))
    if corrupt:
        # once the mirror has copied the first MiB of the data to the target, flip one byte
        # there: the mirror never copies it again (the guest does not write it)
        target_disk = b.layout(spec.key).disk

        def copied() -> bool:
            with open(target_disk, "rb") as f:
                f.seek(data_at)
                return f.read(MIB) == data[:MIB]
        wait_until(copied, 120, interval=0.02, what="the mirror to copy the data's first MiB")
        assert a.query_migration(spec.key).state not in (MigrationState.COMPLETED, MigrationState.FAILED)
        with open(target_disk, "r+b") as f:
            f.seek(data_at + 4321)
            f.write(bytes([data[4321] ^ 0x01]))
    src = wait_migration(a, spec, {MigrationState.COMPLETED, MigrationState.FAILED, MigrationState.ABORTED}, 240)
    assert src.state == MigrationState.COMPLETED, src.error
    dst = wait_migration(b, spec, {MigrationState.RECEIVED, MigrationState.FAILED}, 60)
    assert dst.state == MigrationState.RECEIVED, dst.error
    # the target froze its disk at the switchover and did not hash it in the pause
    assert dst.frozen_point and dst.digest is None and dst.freeze_ms is not None
    overlay, nodes = frozen_base_digest_and_overlay(b, spec)
    assert overlay and "ferry-frozen" in nodes
    before = memsums(serial_a)
    b.resume(spec.key)  # what the target agent does once the record names it
    serial_b = b.layout(spec.key).serial
    # both digests come after the resume, with the target guest running
    src = wait_until(lambda: (s := a.query_migration(spec.key)).digest and s, 120, what="the source's digest")
    dst = wait_until(lambda: (s := b.query_migration(spec.key)).digest and s, 120, what="the frozen point's digest")
    wait_until(lambda: not frozen_base_digest_and_overlay(b, spec)[0], 120, what="the overlay merged back")
    assert "ferry-frozen" not in frozen_base_digest_and_overlay(b, spec)[1]
    keeps_counting(b, spec)  # the guest ran through the hash and the merge
    assert src.digest.startswith("sha256:") and dst.digest.startswith("sha256:")
    # the source's digest is its image's, as an independent full read computes it
    assert src.digest == full_read_digest(a.layout(spec.key).disk, size)
    assert src.hashed_bytes >= mib * MIB and dst.hashed_bytes >= mib * MIB
    in_pause = src.downtime_ms + max(src.verify_ms, dst.verify_ms)
    with capsys.disabled():
        print(f"\nqemu {size / (1 << 30):.2f} GiB disk, {mib} MiB data, "
              f"{'one target byte corrupted' if corrupt else 'clean'}: digests "
              f"{'equal' if src.digest == dst.digest else 'DIFFER'}; downtime {src.downtime_ms} ms (QEMU's pause) "
              f"+ freeze {dst.freeze_ms} ms; after the resume: source hash {src.verify_ms} ms "
              f"({src.hashed_bytes // MIB} MiB), target hash {dst.verify_ms} ms ({dst.hashed_bytes // MIB} MiB); "
              f"hashed in the pause it would have been {in_pause} ms")
    if corrupt:
        assert src.digest != dst.digest  # caught: the operator fails the migration VerificationFailed
        return
    assert src.digest == dst.digest
    # after the merge the target's raw image holds the guest's writes since the resume too
    wait_until(lambda: memsums(serial_b), 60, what="the target guest's RAM checksum")
    assert set(memsums(serial_b)) == set(before) and len(set(before)) == 1, (before, memsums(serial_b))


def test_force_complete_mid_mirror_stops_the_guest_and_finishes(hosts, spec: VMSpec, capsys) -> None:
    """Force-complete while the disk mirror still copies (a rate-limited mirror of a disk full
    of random data): the guest stops at once, the copy finishes with it stopped, the digests
    agree, the downtime counts from the stop, and the same guest runs on the target."""
    import time

    from qemu_support import counters, fill_disk, serial_text

    a, b = hosts
    fill_disk(a, spec)
    boot(a, spec)
    address = b.prepare_incoming(spec, "127.0.0.1", SECRET, "m-force")
    t0 = time.monotonic()
    a.start_migration(spec.key, address, SECRET, "m-force", MigrationOptions(downtime_budget_ms=50,
                                                                            bandwidth_bps=4 * MIB))
    wait_until(lambda: a.query_migration(spec.key).disk.sent > 2 * MIB, 60, what="the mirror under way")
    forced_at = time.monotonic()
    a.force_complete(spec.key)
    src = wait_migration(a, spec, {MigrationState.COMPLETED, MigrationState.FAILED, MigrationState.ABORTED}, 120)
    done = time.monotonic()
    assert src.state == MigrationState.COMPLETED, src.error
    dst = wait_migration(b, spec, {MigrationState.RECEIVED, MigrationState.FAILED}, 60)
    assert dst.state == MigrationState.RECEIVED and dst.frozen_point, dst.error
    assert src.forced is True
    # the guest was down from the force to the end of the copy, at least
    assert src.downtime_ms >= int((done - forced_at) * 1000) - 1500, (src.downtime_ms, done - forced_at)
    with capsys.disabled():
        print(f"\nqemu force-complete mid-mirror (budget 50 ms, 4 MiB/s link): downtime {src.downtime_ms} ms "
              f"(the hashes come after the resume), total {done - t0:.1f} s")
    frozen = counters(serial_text(a.layout(spec.key).serial))[-1]
    b.resume(spec.key)
    wait_counting(b.layout(spec.key).serial, b.layout(spec.key).qmp_aux, lambda c: len(c) >= 3, 60,
                  what="the target to count")
    assert_continues(frozen, serial_text(b.layout(spec.key).serial))
    digests = wait_until(lambda: (x := (a.query_migration(spec.key).digest, b.query_migration(spec.key).digest))
                         and all(x) and x, 60, what="both digests after the resume")
    assert digests[0] == digests[1]
