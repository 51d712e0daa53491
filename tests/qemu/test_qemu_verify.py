"""The qemu driver's copy verification on a disk of real size (1.1 GiB, sparse, 64 MiB of
data): a clean run verifies equal digests, a byte corrupted on the target after the mirror
copied it is caught (unequal digests: the operator never moves the record). Prints the
verification time and the downtime of each run. Memory: the guest's own checksum of a RAM
region written once at boot is the same before and after the move."""

from __future__ import annotations

import os

import pytest
from qemu_support import memsums
from support import wait_until
from test_qemu_migration import SECRET, boot, wait_migration

from ferry.drivers.base import MigrationOptions, MigrationState, VMKey, VMSpec
from ferry.transfer.digest import image_root

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(300)]

MIB = 1 << 20
DATA_AT = 512 * MIB  # 64 MiB of random data the guest never writes (it writes its first 4 MiB)
DATA_LEN = 64 * MIB


def big_spec(name: str) -> VMSpec:
    return VMSpec(key=VMKey("t", name), cpu=1, memory_mib=1024, disk_gib=1100)  # x0.001: 1.1 GiB disk


def sparse_disk_with_data(driver, spec: VMSpec) -> bytes:
    layout = driver.layout(spec.key)
    layout.root.mkdir(parents=True, exist_ok=True)
    size = driver.guest_size(spec).disk_bytes
    assert size >= 1 << 30
    data = os.urandom(DATA_LEN)
    with open(layout.disk, "wb") as f:
        f.truncate(size)
        f.seek(DATA_AT)
        f.write(data)
    return data


def full_read_digest(path, size: int) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        return "sha256:" + image_root(fd, size, 1 << 20).hex()
    finally:
        os.close(fd)


@pytest.mark.parametrize("corrupt", [False, True], ids=["clean", "corrupted-target-byte"])
def test_one_gib_disk_is_verified_and_a_corrupted_byte_is_caught(hosts, corrupt: bool, capsys) -> None:
    a, b = hosts
    spec = big_spec("big-" + ("bad" if corrupt else "ok"))
    data = sparse_disk_with_data(a, spec)
    boot(a, spec)
    serial_a = a.layout(spec.key).serial
    wait_until(lambda: memsums(serial_a), 60, what="the guest's first RAM checksum")
    size = a.guest_size(spec).disk_bytes
    address = b.prepare_incoming(spec, "127.0.0.1", SECRET, "m-big")
    a.start_migration(spec.key, address, SECRET, "m-big", MigrationOptions(downtime_budget_ms=300,
                                                                          bandwidth_bps=16 * MIB))
    if corrupt:
        # once the mirror has copied the first MiB of the data to the target, flip one byte
        # there: the mirror never copies it again (the guest does not write it)
        target_disk = b.layout(spec.key).disk

        def copied() -> bool:
            with open(target_disk, "rb") as f:
                f.seek(DATA_AT)
                return f.read(MIB) == data[:MIB]
        wait_until(copied, 120, interval=0.02, what="the mirror to copy the data's first MiB")
        assert a.query_migration(spec.key).state not in (MigrationState.COMPLETED, MigrationState.FAILED)
        with open(target_disk, "r+b") as f:
            f.seek(DATA_AT + 4321)
            f.write(bytes([data[4321] ^ 0x01]))
    src = wait_migration(a, spec, {MigrationState.COMPLETED, MigrationState.FAILED, MigrationState.ABORTED}, 240)
    assert src.state == MigrationState.COMPLETED, src.error
    dst = wait_migration(b, spec, {MigrationState.RECEIVED, MigrationState.FAILED}, 60)
    assert dst.state == MigrationState.RECEIVED, dst.error
    assert src.digest.startswith("sha256:") and dst.digest.startswith("sha256:")
    # each side's digest is the image's, as an independent full read computes it
    assert src.digest == full_read_digest(a.layout(spec.key).disk, size)
    assert dst.digest == full_read_digest(b.layout(spec.key).disk, size)
    assert src.verify_ms is not None and dst.verify_ms is not None
    assert src.downtime_ms is not None and src.downtime_ms >= src.verify_ms
    with capsys.disabled():
        print(f"\nqemu {size / (1 << 30):.2f} GiB disk ({DATA_LEN // MIB} MiB data), "
              f"{'one target byte corrupted' if corrupt else 'clean'}: digests "
              f"{'equal' if src.digest == dst.digest else 'DIFFER'}, verification source {src.verify_ms} ms / "
              f"target {dst.verify_ms} ms, downtime {src.downtime_ms} ms (QEMU's pause + verification)")
    if corrupt:
        assert src.digest != dst.digest  # caught: the operator fails the attempt DigestMismatch
        return
    assert src.digest == dst.digest
    before = memsums(serial_a)
    b.resume(spec.key)
    serial_b = b.layout(spec.key).serial
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
    assert dst.state == MigrationState.RECEIVED and dst.digest == src.digest, dst.error
    assert src.forced is True
    # the guest was down from the force to the end of the verification, at least
    assert src.downtime_ms >= int((done - forced_at) * 1000) - 1500, (src.downtime_ms, done - forced_at)
    with capsys.disabled():
        print(f"\nqemu force-complete mid-mirror (budget 50 ms, 4 MiB/s link): downtime {src.downtime_ms} ms "
              f"(verification {src.verify_ms} ms), total {done - t0:.1f} s")
    frozen = counters(serial_text(a.layout(spec.key).serial))[-1]
    b.resume(spec.key)
    wait_until(lambda: len(counters(b.layout(spec.key).serial)) >= 3, 60, what="the target to count")
    assert counters(b.layout(spec.key).serial)[0] in (frozen + 1, frozen + 2)
