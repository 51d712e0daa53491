"""Pre-copy engines in-process (source and target over loopback, no VM processes)."""

import os
import threading

import pytest

from ferry.drivers.sim.image import DISK_BLOCK_SIZE as BS
from ferry.drivers.sim.image import MEMORY_PAGE_SIZE as PS
from ferry.drivers.sim.image import Image
from ferry.transfer import session, source
from ferry.transfer.digest import combine, image_root
from ferry.transfer.source import SourceEngine
from ferry.transfer.target import TargetEngine


class FakeGuest:
    def __init__(self):
        self.calls = []
        self.throttle = (0, 0)

    def pause(self):
        self.calls.append("pause")
        return True

    def resume(self):
        self.calls.append("resume")

    def set_throttle(self, d, m):
        self.throttle = (d, m)
        self.calls.append(("throttle", d, m))

    def export_state(self):
        return {"seq": 42}


@pytest.fixture
def pair(tmp_path):
    src = (Image(str(tmp_path / "sd"), 32 * BS, BS), Image(str(tmp_path / "sm"), 64 * PS, PS))
    dst = (Image(str(tmp_path / "td"), 32 * BS, BS, fresh=True), Image(str(tmp_path / "tm"), 64 * PS, PS, fresh=True))
    yield src, dst
    for img in src + dst:
        img.close()


def run(src, dst, before_round=None, secret=b"k" * 32, target_secret=None, allow_plain=False, **kw):
    tgt = TargetEngine(disk=dst[0], memory=dst[1], secret=target_secret or secret, migration_id="m",
                       allow_plain=allow_plain)
    host, port = tgt.listen("127.0.0.1")
    tgt.start()
    guest = FakeGuest()
    eng = SourceEngine(disk=src[0], memory=src[1], guest=guest, target=f"{host}:{port}", secret=secret,
                       migration_id="m", before_round=before_round, **kw)
    eng.run()
    if eng.state != session.COMPLETED:
        tgt.cancel("test over")
    tgt.join(10)
    return eng, tgt, guest


def contents(img):
    return os.pread(img.fd, img.size, 0)


def test_full_copy_skips_holes_and_zero_blocks(pair):
    src, dst = pair
    src[0].write(3 * BS, b"a" * BS)
    src[0].write(7 * BS, bytes(BS))  # allocated but zero: not sent
    src[1].write(5 * PS, b"m" * PS)
    eng, tgt, guest = run(src, dst)
    assert eng.state == session.COMPLETED and tgt.state == session.RECEIVED
    assert eng.stats()["disk"]["sent"] == BS and eng.stats()["memory"]["sent"] == PS
    assert contents(dst[0]) == contents(src[0]) and contents(dst[1]) == contents(src[1])
    expected = combine(image_root(src[0].fd, src[0].size, BS), image_root(src[1].fd, src[1].size, PS))
    assert eng.digest == tgt.digest == expected
    assert tgt.guest_state == {"seq": 42}
    assert guest.calls == ["pause"]  # paused for the final round and left paused (completed)


def test_later_rounds_send_rewritten_and_zeroed_blocks(pair):
    src, dst = pair
    for b in range(8):
        src[0].write(b * BS, bytes([b + 1]) * BS)

    def change(round_no):
        if round_no == 2:
            src[0].write(2 * BS, bytes(BS))  # zeroed: a ZERO frame
            src[0].write(5 * BS, b"z" * 10)
            src[1].write(63 * PS, b"q" * PS)

    eng, tgt, _ = run(src, dst, before_round=change)
    assert eng.state == session.COMPLETED, eng.error
    assert eng.round == 2
    assert eng.rounds[-1]["bytes"] == BS + PS  # the zeroed block costs no data bytes
    assert contents(dst[0]) == contents(src[0]) and contents(dst[1]) == contents(src[1])
    assert eng.digest == tgt.digest


def test_blocks_dirtied_again_are_sent_once_by_the_next_round(pair, monkeypatch):
    src, dst = pair
    for b in range(32):
        src[0].write(b * BS, b"x" * BS)
    orig = source.data_block_ranges

    def ranges_then_write(fd, size, bs):
        # the guest rewrites blocks 10..19 after round 1 began, before they are read
        r = orig(fd, size, bs)
        if bs == BS:
            for b in range(10, 20):
                src[0].write(b * BS, b"y" * BS)
        return r

    monkeypatch.setattr(source, "data_block_ranges", ranges_then_write)
    eng, tgt, _ = run(src, dst)
    assert eng.state == session.COMPLETED, eng.error
    assert eng.rounds[0]["bytes"] == 22 * BS  # round 1 skipped the 10 re-dirtied blocks
    assert eng.stats()["disk"]["sent"] == 32 * BS  # every block exactly once
    assert contents(dst[0]) == contents(src[0])


def test_wrong_secret_fails_source_and_target_keeps_listening(pair):
    src, dst = pair
    tgt = TargetEngine(disk=dst[0], memory=dst[1], secret=b"t" * 32, migration_id="m")
    host, port = tgt.listen("127.0.0.1")
    tgt.start()
    eng = SourceEngine(disk=src[0], memory=src[1], guest=FakeGuest(), target=f"{host}:{port}",
                       secret=b"x" * 32, migration_id="m")
    eng.run()
    assert eng.state == session.FAILED and "authentication" in eng.error
    assert tgt.state == session.NONE and tgt.auth_failures == 1
    tgt.cancel()
    assert tgt.state == session.FAILED


def test_bandwidth_limit_is_honoured(pair):
    import time

    src, dst = pair
    for b in range(32):
        src[0].write(b * BS, b"w" * BS)  # 2 MiB
    t0 = time.monotonic()
    eng, _, _ = run(src, dst, bandwidth_bps=8 << 20)
    elapsed = time.monotonic() - t0
    assert eng.state == session.COMPLETED
    assert elapsed >= 0.2  # 2 MiB at 8 MiB/s, less the initial burst
    assert eng.stats()["bandwidth_bps"] <= 8 << 20


def test_cancel_resumes_the_guest(pair):
    src, dst = pair
    for b in range(32):
        src[0].write(b * BS, b"c" * BS)
    tgt = TargetEngine(disk=dst[0], memory=dst[1], secret=b"k" * 32, migration_id="m")
    host, port = tgt.listen("127.0.0.1")
    tgt.start()
    guest = FakeGuest()
    eng = SourceEngine(disk=src[0], memory=src[1], guest=guest, target=f"{host}:{port}", secret=b"k" * 32,
                       migration_id="m", bandwidth_bps=256 << 10, offline=True)
    eng.start()
    threading.Timer(0.2, eng.cancel).start()
    assert eng.join(10)
    assert eng.state == session.ABORTED
    assert guest.calls == ["pause", "resume"]  # offline paused it; the abort resumed it
    tgt.join(10)
    assert tgt.state in (session.FAILED, session.ABORTED)


def always_dirty(src, box):
    """The disk of a guest that rewrites every block all the time (deterministic: the bitmap
    always counts every block dirty, and every round from the second takes them all)."""
    import types

    class Rewritten:
        def __init__(self, bitmap):
            self.bitmap = bitmap

        def count(self):
            return self.bitmap.nbits

        def swap(self):
            bits = self.bitmap.swap()
            if box["eng"].round >= 2:  # the swap of round N happens once round N began
                bits = b"\xff" * len(bits)
            return bits

        def __getattr__(self, name):
            return getattr(self.bitmap, name)

    d = src[0]
    for b in range(d.nblocks):
        d.write(b * d.block_size, b"x" * d.block_size)
    return types.SimpleNamespace(fd=d.fd, size=d.size, block_size=d.block_size, nblocks=d.nblocks,
                                 dirty=Rewritten(d.dirty))


def test_a_guest_that_never_converges_fails_not_converging_after_the_steps(pair):
    from ferry.transfer.policy import PolicyConfig

    src, dst = pair
    # A guest that rewrites every disk block all the time (deterministically: the bitmap always
    # counts every block dirty and every round takes them all). Over a 32 MiB/s link
    # the 2 MiB never fit 10 ms: the throttle ramps to its maximum (it does not slow this guest),
    # the allowed downtime steps up to the 20 ms ceiling, then the attempt gives up.
    box = {}
    disk = always_dirty(src, box)
    cfg = PolicyConfig(downtime_budget_ms=10, max_downtime_ms=20, downtime_steps=2, rounds_per_step=1)
    tgt = TargetEngine(disk=dst[0], memory=dst[1], secret=b"k" * 32, migration_id="m")
    host, port = tgt.listen("127.0.0.1")
    tgt.start()
    guest = FakeGuest()
    eng = SourceEngine(disk=disk, memory=src[1], guest=guest, target=f"{host}:{port}", secret=b"k" * 32,
                       migration_id="m", bandwidth_bps=32 << 20, policy=cfg)
    box["eng"] = eng
    eng.run()
    tgt.cancel("test over")
    tgt.join(10)
    assert eng.state == session.FAILED
    assert eng.error.startswith("NotConverging:") and "ceiling 20 ms" in eng.error, eng.error
    st = eng.stats()
    assert st["downtime_steps"] == 2 and st["allowed_downtime_ms"] == 20 and st["max_throttle_percent"] == 99
    assert "pause" not in guest.calls and guest.throttle == (0, 0)  # never paused, throttle lifted
    assert eng.round < 30


def test_force_complete_before_start_pauses_at_once_and_finishes(pair):
    src, dst = pair
    box = {}
    tgt = TargetEngine(disk=dst[0], memory=dst[1], secret=b"k" * 32, migration_id="m")
    host, port = tgt.listen("127.0.0.1")
    tgt.start()
    guest = FakeGuest()
    eng = SourceEngine(disk=always_dirty(src, box), memory=src[1], guest=guest, target=f"{host}:{port}",
                       secret=b"k" * 32, migration_id="m", downtime_budget_ms=1, bandwidth_bps=32 << 20,
                       force_complete=True)
    box["eng"] = eng
    eng.run()
    tgt.join(10)
    assert eng.state == session.COMPLETED, eng.error
    st = eng.stats()
    assert st["forced"] is True and st["downtime_ms"] is not None and eng.round == 2
    assert contents(dst[0]) == contents(src[0]) and eng.digest == tgt.digest


def test_force_complete_mid_copy_finishes_a_busy_guest(pair):
    src, dst = pair
    box = {}

    def force_at_3(round_no):
        if round_no == 3:
            box["eng"].force_complete()

    tgt = TargetEngine(disk=dst[0], memory=dst[1], secret=b"k" * 32, migration_id="m")
    host, port = tgt.listen("127.0.0.1")
    tgt.start()
    guest = FakeGuest()
    eng = SourceEngine(disk=always_dirty(src, box), memory=src[1], guest=guest, target=f"{host}:{port}",
                       secret=b"k" * 32, migration_id="m", downtime_budget_ms=1, bandwidth_bps=32 << 20,
                       before_round=force_at_3)
    box["eng"] = eng
    eng.run()
    tgt.join(10)
    assert eng.state == session.COMPLETED, eng.error
    assert eng.forced and guest.calls.count("pause") == 1 and eng.round >= 3
    assert eng.rounds[-1]["paused"] and contents(dst[0]) == contents(src[0]) and eng.digest == tgt.digest


def test_the_channel_is_encrypted_by_default_and_plain_only_where_both_ends_opt_out(pair):
    src, dst = pair
    src[0].write(3 * BS, b"a" * BS)
    src[1].write(5 * PS, b"m" * PS)
    eng, tgt, _ = run(src, dst)
    assert eng.state == session.COMPLETED and tgt.state == session.RECEIVED
    assert eng.stats()["channel"] == tgt.stats()["channel"] == "aes-256-gcm"
    assert contents(dst[0]) == contents(src[0]) and contents(dst[1]) == contents(src[1])


def test_a_plain_source_is_refused_by_a_target_that_encrypts(pair):
    src, dst = pair
    src[0].write(3 * BS, b"a" * BS)
    eng, tgt, guest = run(src, dst, channel="plain")
    assert eng.state == session.FAILED and "encrypted channels only" in eng.error
    assert tgt.auth_failures == 1
    assert "pause" not in guest.calls


def test_plain_channel_when_both_ends_opt_out(pair):
    src, dst = pair
    src[0].write(3 * BS, b"a" * BS)
    src[1].write(5 * PS, b"m" * PS)
    eng, tgt, _ = run(src, dst, channel="plain", allow_plain=True)
    assert eng.state == session.COMPLETED and tgt.state == session.RECEIVED
    assert eng.stats()["channel"] == tgt.stats()["channel"] == "plain"
    assert contents(dst[0]) == contents(src[0]) and eng.digest == tgt.digest


def test_the_target_writes_through_its_writer_and_names_how(pair):
    src, dst = pair
    for b in range(32):
        src[0].write(b * BS, bytes([b + 1]) * BS)
    src[1].write(5 * PS, b"m" * PS)
    eng, tgt, _ = run(src, dst)
    assert eng.state == session.COMPLETED and tgt.state == session.RECEIVED
    assert contents(dst[0]) == contents(src[0]) and contents(dst[1]) == contents(src[1])
    writes = tgt.stats()["writes"]
    assert writes["disk"]["direct_bytes"] + writes["disk"]["buffered_bytes"] == 32 * BS
    for name in ("disk", "memory"):
        w = writes[name]
        # honest: bytes that went through the page cache are counted, with a reason where O_DIRECT was refused
        assert w["mode"] == ("direct" if not w["buffered_bytes"] else "buffered" if not w["direct_bytes"] else "direct+buffered")
        assert w["buffered_bytes"] == 0 or w["fallback"] or w["unaligned_writes"]


def test_the_buffered_writes_when_direct_writes_are_off(pair):
    src, dst = pair
    src[0].write(3 * BS, b"a" * BS)
    tgt = TargetEngine(disk=dst[0], memory=dst[1], secret=b"k" * 32, migration_id="m", direct_writes=False)
    host, port = tgt.listen("127.0.0.1")
    tgt.start()
    eng = SourceEngine(disk=src[0], memory=src[1], guest=FakeGuest(), target=f"{host}:{port}", secret=b"k" * 32,
                       migration_id="m")
    eng.run()
    tgt.join(10)
    assert eng.state == session.COMPLETED and contents(dst[0]) == contents(src[0])
    assert tgt.stats()["writes"]["disk"] == {"mode": "buffered", "direct_bytes": 0, "buffered_bytes": BS,
                                             "unaligned_writes": 0, "fallback": "O_DIRECT off"}


class ReadOnlyImage:
    """A target image whose descriptor refuses writes: every write to it fails (EBADF)."""

    def __init__(self, img):
        self.fd = os.open(img.path, os.O_RDONLY)
        self.size, self.block_size, self.nblocks = img.size, img.block_size, img.nblocks


def test_a_failed_image_write_fails_the_attempt_before_the_verdict(pair):
    src, dst = pair
    for b in range(32):
        src[0].write(b * BS, b"d" * BS)
    disk = ReadOnlyImage(dst[0])
    try:
        tgt = TargetEngine(disk=disk, memory=dst[1], secret=b"k" * 32, migration_id="m", direct_writes=False)
        host, port = tgt.listen("127.0.0.1")
        tgt.start()
        eng = SourceEngine(disk=src[0], memory=src[1], guest=FakeGuest(), target=f"{host}:{port}",
                           secret=b"k" * 32, migration_id="m")
        eng.run()
        tgt.join(10)
    finally:
        os.close(disk.fd)
    assert tgt.state == session.FAILED and tgt.digest is None
    assert "writing the disk image at offset" in tgt.error and "Bad file descriptor" in tgt.error
    assert eng.state == session.FAILED and eng._verdict is None  # no VERDICT came: the ERROR did
    assert eng.error.startswith("target: WriteFailed: writing the disk image"), eng.error


def distinct_blocks_pair(src, dst):
    """32 blocks of the source's disk, each of its own byte, and a target listening for them:
    (the started target engine, the source engine to run)."""
    for b in range(32):
        src[0].write(b * BS, bytes([b + 1]) * BS)
    tgt = TargetEngine(disk=dst[0], memory=dst[1], secret=b"k" * 32, migration_id="m")
    host, port = tgt.listen("127.0.0.1")
    tgt.start()
    eng = SourceEngine(disk=src[0], memory=src[1], guest=FakeGuest(), target=f"{host}:{port}", secret=b"k" * 32,
                       migration_id="m")
    return tgt, eng


def test_a_corrupt_block_is_never_written(pair):
    # every block of the target image is either never written (zero) or the source's: the
    # chunk with the bad block is checked before it is queued for writing
    src, dst = pair
    tgt, eng = distinct_blocks_pair(src, dst)
    eng.corrupt_data_frame = 1
    eng.run()
    tgt.join(10)
    assert tgt.state == session.FAILED and "checksum mismatch" in tgt.error
    assert eng.state == session.FAILED
    got, want = contents(dst[0]), contents(src[0])
    for b in range(32):
        assert got[b * BS : (b + 1) * BS] in (bytes(BS), want[b * BS : (b + 1) * BS]), f"block {b}"


@pytest.mark.parametrize("corrupt", [None, 1])
def test_frames_larger_than_a_write_buffer_span_buffers(pair, monkeypatch, corrupt):
    # a peer may cut frames larger than the 1 MiB a ferry source does (the protocol allows
    # 64 MiB): the target fills and queues one buffer after the other, each checked first
    monkeypatch.setattr(source, "MAX_EXTENT_BYTES", 4 << 20)
    src, dst = pair
    tgt, eng = distinct_blocks_pair(src, dst)
    eng.corrupt_data_frame = corrupt  # the bad byte is in the frame's second half: its second buffer
    eng.run()
    tgt.join(10)
    got, want = contents(dst[0]), contents(src[0])
    if corrupt is None:
        assert eng.state == session.COMPLETED and tgt.state == session.RECEIVED and got == want
        assert eng.stats()["disk"]["sent"] == 32 * BS
    else:
        assert tgt.state == session.FAILED and "checksum mismatch in disk frame at block 16" in tgt.error
        assert got[: 16 * BS] in (bytes(16 * BS), want[: 16 * BS])  # the checked first buffer, or nothing
        assert got[16 * BS :] == bytes(16 * BS)  # the buffer with the bad block never written
