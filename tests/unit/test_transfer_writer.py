"""The target's image writer (ferry.transfer.writer): frame order, failures, the O_DIRECT
fallback. Real files in tmp_path; where a syscall's answer has to be forced (a write held
back, a direct write refused) the writer's ``os`` is wrapped for that one call."""

import errno
import os
import threading

import pytest
from support import wait_until

from ferry.transfer import writer as writer_mod
from ferry.transfer.writer import DIRECT_ALIGN, ImageWriter, WriteFailed

BS = 64 * 1024


@pytest.fixture
def image(tmp_path):
    fd = os.open(tmp_path / "img", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 16 * BS)
    yield fd
    os.close(fd)


class _Os:
    """``os`` with ``pwritev`` replaced (the writer's module attribute, for one test)."""

    def __init__(self, pwritev):
        self.pwritev = pwritev

    def __getattr__(self, name):
        return getattr(os, name)


def put(w, name, data, offset):
    buf = w.acquire()
    buf[: len(data)] = data
    w.write(name, buf, len(data), offset)


def held_writer(image, monkeypatch):
    """A writer of IMAGE whose writes wait for ``gate``; ``entered`` is set when one is held."""
    gate, entered = threading.Event(), threading.Event()

    def held(fd, bufs, off):
        entered.set()
        assert gate.wait(10)
        return os.pwritev(fd, bufs, off)

    monkeypatch.setattr(writer_mod, "os", _Os(held))
    w = ImageWriter(BS)
    w.add_image("disk", image)
    return w, gate, entered


def test_a_zero_run_queued_after_a_data_write_lands_after_it(image, monkeypatch):
    # the data write is held in the writer while the ZERO for the same block is queued: the
    # block must end up zero (a synchronous zero write would be overwritten by the stale data)
    w, gate, entered = held_writer(image, monkeypatch)
    put(w, "disk", b"a" * BS, 3 * BS)
    assert entered.wait(10)
    w.zero("disk", 3 * BS, BS)
    put(w, "disk", b"b" * BS, 4 * BS)
    gate.set()
    w.drain()
    w.close()
    assert os.pread(image, BS, 3 * BS) == bytes(BS)
    assert os.pread(image, BS, 4 * BS) == b"b" * BS


def test_aligned_writes_go_direct_and_read_back_through_the_page_cache(image):
    w = ImageWriter(4 * BS)
    w.add_image("disk", image)
    os.pwrite(image, b"old" * 100, 2 * BS)  # a dirty page-cache page under a later direct write
    for i in range(8):
        put(w, "disk", bytes([i + 1]) * (2 * BS), 2 * i * BS)
    w.drain()
    w.close()
    st = w.stats()["disk"]
    assert st == {"mode": "direct", "direct_bytes": 16 * BS, "buffered_bytes": 0, "unaligned_writes": 0,
                  "fallback": None}
    for i in range(8):
        assert os.pread(image, 2 * BS, 2 * i * BS) == bytes([i + 1]) * (2 * BS)


def test_unaligned_writes_go_through_the_page_cache_and_are_counted(image):
    w = ImageWriter(BS)
    w.add_image("memory", image)
    put(w, "memory", b"x" * DIRECT_ALIGN, 0)
    put(w, "memory", b"y" * 512, DIRECT_ALIGN + 512)  # a 512-byte block: not a multiple of the alignment
    put(w, "memory", b"z" * DIRECT_ALIGN, DIRECT_ALIGN)  # direct, over the buffered one
    w.drain()
    w.close()
    st = w.stats()["memory"]
    assert st["mode"] == "direct+buffered" and st["unaligned_writes"] == 1
    assert st["direct_bytes"] == 2 * DIRECT_ALIGN and st["buffered_bytes"] == 512
    assert st["fallback"] is None  # later aligned writes still go direct
    assert os.pread(image, 2 * DIRECT_ALIGN, 0) == b"x" * DIRECT_ALIGN + b"z" * DIRECT_ALIGN


def test_o_direct_refused_at_open_falls_back_and_says_so(image):
    def refuse(fd):
        raise OSError(errno.EINVAL, "Invalid argument")

    w = ImageWriter(BS, opener=refuse)
    w.add_image("disk", image)
    put(w, "disk", b"q" * BS, BS)
    w.zero("disk", 0, BS)
    w.drain()
    w.close()
    st = w.stats()["disk"]
    assert st["mode"] == "buffered" and st["direct_bytes"] == 0 and st["buffered_bytes"] == 2 * BS
    assert st["fallback"] == "O_DIRECT refused at open: Invalid argument"
    assert os.pread(image, 2 * BS, 0) == bytes(BS) + b"q" * BS


def test_a_direct_write_refused_falls_back_for_the_rest(image, monkeypatch):
    direct_fds = []

    def opener(fd):
        direct_fds.append(writer_mod.open_direct(fd))
        return direct_fds[-1]

    def pwritev(fd, bufs, off):
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "Invalid argument")  # as a device with a larger alignment answers
        return os.pwritev(fd, bufs, off)

    monkeypatch.setattr(writer_mod, "os", _Os(pwritev))
    w = ImageWriter(BS, opener=opener)
    w.add_image("disk", image)
    put(w, "disk", b"1" * BS, 0)
    put(w, "disk", b"2" * BS, BS)
    w.drain()
    w.close()
    st = w.stats()["disk"]
    assert st["mode"] == "buffered" and st["buffered_bytes"] == 2 * BS
    assert st["fallback"] == "O_DIRECT write refused: Invalid argument"
    assert os.pread(image, 2 * BS, 0) == b"1" * BS + b"2" * BS


@pytest.mark.parametrize("direct", [True, False])
def test_a_failed_write_fails_every_later_call_and_never_blocks_the_receiver(tmp_path, direct):
    path = tmp_path / "ro"
    path.write_bytes(bytes(4 * BS))
    fd = os.open(path, os.O_RDONLY)
    try:
        w = ImageWriter(BS, buffers=2, direct=direct,
                        opener=lambda f: os.open(path, os.O_RDONLY | os.O_DIRECT))
        w.add_image("disk", fd)
        put(w, "disk", b"a" * BS, 0)  # fails in the writer (EBADF: not open for writing)
        with pytest.raises(WriteFailed, match="writing the disk image at offset 0 failed"):
            w.drain()
        for _ in range(5):  # more than the buffers: each call raises, none waits for a buffer
            with pytest.raises(WriteFailed):
                put(w, "disk", b"b" * BS, BS)
        with pytest.raises(WriteFailed):
            w.zero("disk", 0, BS)
        w.close(discard=True)
        assert w._free.qsize() == 2  # every buffer came back
    finally:
        os.close(fd)


def test_close_discarding_drops_what_is_queued_after_the_write_in_progress(image, monkeypatch):
    w, gate, entered = held_writer(image, monkeypatch)
    put(w, "disk", b"a" * BS, 0)
    assert entered.wait(10)
    put(w, "disk", b"b" * BS, BS)
    closer = threading.Thread(target=w.close, kwargs={"discard": True})  # the attempt failed
    closer.start()
    wait_until(lambda: w._discard, timeout=10, interval=0.01, what="close under way")
    gate.set()
    closer.join(10)
    assert not closer.is_alive() and not w._thread.is_alive()
    assert os.pread(image, 2 * BS, 0) == b"a" * BS + bytes(BS)  # the queued write was dropped

