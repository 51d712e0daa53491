"""A spike, not a ferry feature: the QEMU mechanism a "frozen point" verification would use
(issue 14, item 1, second option), shown on the same 1.1 GiB sparse disk as
test_qemu_verify.py. ferry's driver still verifies inside the downtime (sequence.py); this
test drives the extra QMP steps itself, to measure what they cost and to show what they
catch, so the design in docs/architecture.md ("What verified means, per driver") rests on
measured QEMU 7.2 behaviour:

1. at the pause, after the incoming migration completed, ``blockdev-snapshot-sync`` puts a
   qcow2 overlay on the target's ``disk0`` node: the raw image becomes a read-only backing
   file that stays exactly as received (cost in the pause: milliseconds, whatever the size);
2. the target guest resumes and writes to the overlay;
3. the frozen base is hashed with the guest running and compared with the paused source's
   digest: equal on a clean run, different when one target byte was corrupted;
4. ``block-commit`` of the active layer, ``BLOCK_JOB_READY``, ``job-complete``: the guest
   ends on its one raw image again, with its post-resume writes in it, and keeps running.
"""

from __future__ import annotations

import os
import time

import pytest
from qemu_support import last_counter
from support import wait_until
from test_qemu_migration import SECRET, boot, keeps_counting, wait_migration
from test_qemu_verify import DATA_AT, DATA_LEN, MIB, big_spec, sparse_disk_with_data

from ferry.drivers.base import MigrationOptions, MigrationState
from ferry.drivers.qemu.sequence import disk_digest

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(300)]

OVERLAY_NODE = "ferry-frozen"
COMMIT_JOB = "ferry-commit"


def _node_names(q) -> list[str]:
    return [n["node-name"] for n in q.execute("query-named-block-nodes")]


@pytest.mark.parametrize("corrupt", [False, True], ids=["clean", "corrupted-target-byte"])
def test_frozen_target_point_is_checked_after_resume(hosts, corrupt: bool, capsys) -> None:
    a, b = hosts
    spec = big_spec("frozen-" + ("bad" if corrupt else "ok"))
    data = sparse_disk_with_data(a, spec)
    boot(a, spec)
    size = a.guest_size(spec).disk_bytes
    address = b.prepare_incoming(spec, "127.0.0.1", SECRET, "m-frozen")
    a.start_migration(spec.key, address, SECRET, "m-frozen", MigrationOptions(downtime_budget_ms=300,
                                                                              bandwidth_bps=16 * MIB))
    target_disk = b.layout(spec.key).disk
    if corrupt:
        def copied() -> bool:
            with open(target_disk, "rb") as f:
                f.seek(DATA_AT)
                return f.read(MIB) == data[:MIB]
        wait_until(copied, 120, interval=0.02, what="the mirror to copy the data's first MiB")
        with open(target_disk, "r+b") as f:
            f.seek(DATA_AT + 4321)
            f.write(bytes([data[4321] ^ 0x01]))
    src = wait_migration(a, spec, {MigrationState.COMPLETED, MigrationState.FAILED, MigrationState.ABORTED}, 240)
    assert src.state == MigrationState.COMPLETED, src.error
    dst = wait_migration(b, spec, {MigrationState.RECEIVED, MigrationState.FAILED}, 60)
    assert dst.state == MigrationState.RECEIVED, dst.error

    q = b._qmp(spec.key)
    assert q.execute("query-status")["status"] == "paused"
    overlay = b.layout(spec.key).root / "frozen.qcow2"
    # 1. freeze the target's disk at the switchover point (the guest is still paused)
    t0 = time.monotonic()
    q.execute("blockdev-snapshot-sync", {"node-name": "disk0", "snapshot-file": str(overlay),
                                         "snapshot-node-name": OVERLAY_NODE, "format": "qcow2"})
    freeze_ms = (time.monotonic() - t0) * 1000
    # 2. resume: the frozen point's cost in the pause ends here
    b.resume(spec.key)
    pause_extra_ms = (time.monotonic() - t0) * 1000
    assert q.execute("query-status")["status"] == "running"
    # 3. with the guest running, hash the frozen base and compare with the paused source
    counter_before = last_counter(b.layout(spec.key).serial)
    frozen, hash_ms = disk_digest(target_disk, size)
    assert last_counter(b.layout(spec.key).serial) >= counter_before  # the guest ran meanwhile
    source_now, _ = disk_digest(a.layout(spec.key).disk, size)
    assert source_now == src.digest  # the paused source did not change
    assert frozen == dst.digest  # the base is exactly what was received
    assert (frozen != src.digest) == corrupt
    keeps_counting(b, spec)  # the guest writes its disk: into the overlay
    assert disk_digest(target_disk, size)[0] == frozen  # the base stays frozen while it runs
    # 4. merge the overlay back into the raw image
    since = q.event_seq
    t1 = time.monotonic()
    q.execute("block-commit", {"job-id": COMMIT_JOB, "device": OVERLAY_NODE})
    ready = q.wait_event(lambda e: e.name in ("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR")
                         and e.data.get("device") == COMMIT_JOB, timeout=60, since=since)
    assert ready is not None and ready.name == "BLOCK_JOB_READY", ready
    q.execute("job-complete", {"id": COMMIT_JOB})
    done = q.wait_event(lambda e: e.name in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR")
                        and e.data.get("device") == COMMIT_JOB, timeout=60, since=since)
    commit_ms = (time.monotonic() - t1) * 1000
    assert done is not None and done.name == "BLOCK_JOB_COMPLETED" and not done.data.get("error"), done
    assert OVERLAY_NODE not in _node_names(q) and "disk0" in _node_names(q)
    os.unlink(overlay)
    keeps_counting(b, spec)
    with capsys.disabled():
        print(f"\nqemu frozen point, {size / (1 << 30):.2f} GiB disk ({DATA_LEN // MIB} MiB data), "
              f"{'one target byte corrupted' if corrupt else 'clean'}: frozen base "
              f"{'DIFFERS from' if frozen != src.digest else 'equals'} the paused source; "
              f"QEMU's downtime {src.downtime_ms - src.verify_ms} ms; in the pause: overlay {freeze_ms:.0f} ms, "
              f"overlay+resume {pause_extra_ms:.0f} ms; after resume: hash of the frozen base {hash_ms} ms, "
              f"commit {commit_ms:.0f} ms (today's driver hashes in the pause: source {src.verify_ms} ms, "
              f"target {dst.verify_ms} ms)")
