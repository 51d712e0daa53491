"""The sim VM's block layer and guest workload, in-process (no VM processes)."""

import os
import time

import pytest
from support import wait_until

from ferry.drivers.sim.image import DISK_BLOCK_SIZE, MEMORY_PAGE_SIZE, Image, image_sizes
from ferry.drivers.sim.workload import DISK, MEMORY, Guest, content, read_log, replay
from ferry.transfer.bitmap import runs
from ferry.transfer.source import data_block_ranges


@pytest.fixture
def images(tmp_path):
    disk = Image(str(tmp_path / "disk.img"), 64 * DISK_BLOCK_SIZE, DISK_BLOCK_SIZE)
    mem = Image(str(tmp_path / "mem.img"), 256 * MEMORY_PAGE_SIZE, MEMORY_PAGE_SIZE)
    yield disk, mem
    disk.close()
    mem.close()


def test_image_sizes_round_up():
    assert image_sizes(1024, 1, 1.0) == (1 << 30, 1 << 30)
    d, m = image_sizes(1000, 1, 0.001)
    assert d % DISK_BLOCK_SIZE == 0 and d >= (1 << 30) * 0.001 and d - (1 << 30) * 0.001 < DISK_BLOCK_SIZE
    assert m % MEMORY_PAGE_SIZE == 0 and m >= 1000 * (1 << 20) * 0.001
    assert image_sizes(1, 1, 1e-9) == (DISK_BLOCK_SIZE, MEMORY_PAGE_SIZE)  # at least one block
    with pytest.raises(ValueError):
        image_sizes(1, 1, 0)


def test_new_image_is_sparse(images):
    disk, _ = images
    st = os.stat(disk.path)
    assert st.st_size == disk.size and st.st_blocks == 0
    assert data_block_ranges(disk.fd, disk.size, disk.block_size) == []


def test_write_marks_every_touched_block(images):
    disk, _ = images
    disk.write(5 * DISK_BLOCK_SIZE + 100, b"x" * 10)
    disk.write(9 * DISK_BLOCK_SIZE - 1, b"yy")  # straddles blocks 8 and 9
    assert list(runs(disk.dirty.swap())) == [(5, 1), (8, 2)]
    assert disk.read(5 * DISK_BLOCK_SIZE + 100, 10) == b"x" * 10
    with pytest.raises(ValueError):
        disk.write(disk.size - 1, b"ab")


def test_data_ranges_find_written_blocks(images):
    disk, _ = images
    disk.write(10 * DISK_BLOCK_SIZE, b"a" * DISK_BLOCK_SIZE)
    disk.write(40 * DISK_BLOCK_SIZE, b"b" * 3 * DISK_BLOCK_SIZE)
    ranges = data_block_ranges(disk.fd, disk.size, disk.block_size)
    covered = {b for f, c in ranges for b in range(f, f + c)}
    assert {10, 40, 41, 42} <= covered
    assert len(covered) < disk.nblocks  # holes were skipped


def test_content_is_deterministic_and_never_zero():
    a = content(7, DISK, 65536, 4096)
    assert a == content(7, DISK, 65536, 4096)
    assert a != content(8, DISK, 65536, 4096) and a != content(7, MEMORY, 65536, 4096)
    assert len(a) == 4096 and a.count(0) < len(a)


@pytest.mark.parametrize("pattern", ["uniform", "hotspot", "sequential"])
def test_guest_writes_mark_dirty_and_log_replays(pattern, images, tmp_path):
    disk, mem = images
    log = str(tmp_path / "writes.log")
    g = Guest(disk, mem, pattern=pattern, rate_kibps=8192, log_path=log, seed=1)
    g.run()
    wait_until(lambda: g.seq >= 300, what="300 writes")
    assert g.pause() is True
    n = g.seq
    time.sleep(0.05)  # a window in which the running guest would write (8 MiB/s): none may appear
    assert g.seq == n, "no write after pause() returned"
    recs = list(read_log(log))
    assert len(recs) == n and [r[0] for r in recs] == list(range(1, n + 1))
    dirty_disk = {b for f, c in runs(disk.dirty.swap()) for b in range(f, f + c)}
    dirty_mem = {b for f, c in runs(mem.dirty.swap()) for b in range(f, f + c)}
    assert dirty_disk == {off // DISK_BLOCK_SIZE for _, k, off, _, _ in recs if k == DISK}
    assert dirty_mem == {off // MEMORY_PAGE_SIZE for _, k, off, _, _ in recs if k == MEMORY}
    disk_bytes = sum(ln for _, k, _, ln, _ in recs if k == DISK)
    assert 0.55 < disk_bytes / sum(r[3] for r in recs) < 0.85  # ~70 % of bytes to disk
    if pattern == "hotspot":
        hot = sum(1 for _, k, off, _, _ in recs if k == MEMORY and off // MEMORY_PAGE_SIZE < mem.nblocks // 10)
        assert hot / sum(1 for r in recs if r[1] == MEMORY) > 0.8
    if pattern == "sequential":
        offs = [off for _, k, off, _, _ in recs if k == MEMORY][:50]
        assert offs == [i * MEMORY_PAGE_SIZE for i in range(len(offs))]
    g.shutdown()
    replay(log, str(tmp_path / "rd"), str(tmp_path / "rm"), disk.size, mem.size)
    assert (tmp_path / "rd").read_bytes() == open(disk.path, "rb").read()
    assert (tmp_path / "rm").read_bytes() == open(mem.path, "rb").read()


def test_replay_detects_a_tampered_log(images, tmp_path):
    disk, mem = images
    log = tmp_path / "writes.log"
    g = Guest(disk, mem, rate_kibps=4096, log_path=str(log))
    g.run()
    wait_until(lambda: g.seq >= 5)
    g.shutdown()
    raw = bytearray(log.read_bytes())
    raw[0] ^= 0xFF  # change the seq of the first record: content no longer matches its crc
    log.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="crc"):
        replay(str(log), str(tmp_path / "a"), str(tmp_path / "b"), disk.size, mem.size)


def _rate(g, seconds):
    b0, t0 = g.bytes_written, time.monotonic()
    time.sleep(seconds)  # measuring a rate over a window, not waiting for a condition
    return (g.bytes_written - b0) / (time.monotonic() - t0)


def test_rate_and_throttle(images):
    disk, mem = images
    g = Guest(disk, mem, rate_kibps=4096)
    g.run()
    full = _rate(g, 0.5)
    g.set_throttle(90, 90)
    throttled = _rate(g, 0.5)
    g.shutdown()
    assert 0.6 * (4 << 20) <= full <= 1.4 * (4 << 20)  # ~4 MiB/s
    assert throttled < 0.3 * full


def test_zero_rate_writes_nothing_and_bad_workload_rejected(images):
    disk, mem = images
    g = Guest(disk, mem, rate_kibps=0)
    g.run()
    time.sleep(0.1)  # a window in which a writing guest would write: none may appear
    assert g.seq == 0
    with pytest.raises(ValueError):
        g.set_workload("random-walk", 1)
    with pytest.raises(ValueError):
        g.set_workload("uniform", -1)
    g.shutdown()
