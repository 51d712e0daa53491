"""The target's image writer: every write to an incoming image, in frame order, from one thread.

The receiver checks a frame's chunks against their hashes one after the other in a buffer of
the writer's (``acquire``) and only then hands the buffer over (``write``); the writer thread
writes it while the receiver takes the next frame, then gives the buffer back. A buffer that
is not handed over (a chunk failed its check) is never written (``release``). Zero runs go
through the same queue (``zero``), so every write to an image lands in the order its frames
came: a ZERO frame for a block whose data frame of an earlier round is still queued is
written after it. The queue is bounded: data by the buffers, zero runs by ``ZERO_JOBS``.

Writes go with O_DIRECT where the file system takes it (as QEMU's ``cache=none``): no page
cache to allocate and copy into. The buffers are page-aligned (anonymous mmaps) and data
starts at the start of one, so a write is aligned when its offset and length are multiples
of ``DIRECT_ALIGN``. A write that is not, an image whose file system refuses O_DIRECT when
opened, or one that refuses a direct write with EINVAL (the device's alignment is larger) is
written through the page cache instead: automatic, counted and named in ``stats()`` and
logged, so nobody believes O_DIRECT ran when it did not.

A write that fails (EIO, ENOSPC, a short write) fails the attempt: the error is kept, later
jobs are dropped (their buffers still come back, so the receiver never waits on a writer
that stopped) and ``acquire``/``write``/``zero``/``drain`` raise it. ``drain`` waits until
every queued write is done: the receiver calls it before its verdict. Durability is what it
was with buffered writes (nothing is fsynced; a direct write is on the device, a buffered one
in the page cache, both what every later read of the file sees).
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import queue
import threading
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

DIRECT_ALIGN = 4096  # offsets and lengths of O_DIRECT writes (covers 512 and 4096 byte sectors)
BUFFERS = 3  # buffers in turn: one being received into, up to two queued or being written
ZERO_JOBS = 16  # zero runs queued at most (data writes are bounded by the buffers)
ZERO_CHUNK = 1 << 20  # zero runs are written in pieces of this size


_WRITE, _ZERO, _BARRIER, _STOP = "write", "zero", "barrier", "stop"


class WriteFailed(OSError):
    """A write to an image failed: the attempt fails with this."""


@dataclass
class ImageStats:
    """How one image's writes went: bytes each way, and why not O_DIRECT where it was not."""

    direct_bytes: int = 0
    buffered_bytes: int = 0
    unaligned_writes: int = 0
    fallback: str | None = None  # why this image's writes go through the page cache

    def to_dict(self) -> dict:
        if self.direct_bytes and self.buffered_bytes:
            mode = "direct+buffered"
        elif self.buffered_bytes or (self.fallback and not self.direct_bytes):
            mode = "buffered"
        else:
            mode = "direct"
        return {"mode": mode, "direct_bytes": self.direct_bytes, "buffered_bytes": self.buffered_bytes,
                "unaligned_writes": self.unaligned_writes, "fallback": self.fallback}


@dataclass
class _Image:
    name: str
    fd: int  # the image's own descriptor (buffered writes)
    direct_fd: int | None  # the same file opened with O_DIRECT, or None (fallback)
    stats: ImageStats = field(default_factory=ImageStats)


def open_direct(fd: int) -> int:
    """The file behind ``fd`` opened again for writing with O_DIRECT (OSError if refused)."""
    return os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)


class ImageWriter:
    """Writes one incoming VM's images in order from a thread, from buffers it recycles."""

    def __init__(self, buffer_bytes: int, *, buffers: int = BUFFERS, direct: bool = True, name: str = "image-writer",
                 opener=open_direct):
        self.buffer_bytes = -(-buffer_bytes // mmap.PAGESIZE) * mmap.PAGESIZE
        self.direct = direct
        self._opener = opener
        self._images: dict[str, _Image] = {}
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(buffers):
            self._free.put(mmap.mmap(-1, self.buffer_bytes))
        # one job per buffer (a whole frame, not per chunk) through C-implemented queues: the
        # hand-over costs little next to the write; bounded by the buffers and ZERO_JOBS
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._zero_slots = threading.Semaphore(ZERO_JOBS)
        self._zeros: mmap.mmap | None = None
        self.error: WriteFailed | None = None
        self._discard = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # --- set-up ------------------------------------------------------------------

    def add_image(self, name: str, fd: int) -> None:
        """Register an image; its writes go with O_DIRECT if the file can be opened so."""
        direct_fd, reason = None, None
        if not self.direct:
            reason = "O_DIRECT off"
        else:
            try:
                direct_fd = self._opener(fd)
            except OSError as e:
                reason = f"O_DIRECT refused at open: {e.strerror or e}"
        img = _Image(name, fd, direct_fd)
        img.stats.fallback = reason
        self._images[name] = img
        if direct_fd is None:  # a refusal is a warning, O_DIRECT turned off is a setting
            (log.info if not self.direct else log.warning)("%s image written through the page cache (%s)", name, reason)

    # --- the receiver's side -------------------------------------------------------

    def acquire(self) -> mmap.mmap:
        """A free page-aligned buffer of ``buffer_bytes`` (waits for the writer to give one back)."""
        self._raise_if_failed()
        buf = self._free.get()
        if self.error is not None:
            self._free.put(buf)
            self._raise_if_failed()
        return buf

    def release(self, buf: mmap.mmap) -> None:
        """Give back a buffer that will not be written (its chunk failed its check)."""
        self._free.put(buf)

    def write(self, name: str, buf: mmap.mmap, length: int, offset: int) -> None:
        """Queue ``buf[:length]`` to be written at ``offset`` of image ``name``: the writer owns
        the buffer until it is written, then gives it back. Only checked data is queued."""
        if self.error is not None:
            self._free.put(buf)
            self._raise_if_failed()
        self._jobs.put((_WRITE, name, buf, length, offset))

    def write_runs(self, name: str, buf: mmap.mmap, runs: list[tuple[int, int, int]]) -> None:
        """Like ``write`` for parts of ``buf``: ``runs`` of (start in buf, length, offset in the
        image), written in order; the buffer comes back after the last (or at once if none)."""
        if self.error is not None or not runs:
            self._free.put(buf)
            self._raise_if_failed()
            return
        self._jobs.put((_WRITE, name, buf, 0, runs))

    def zero(self, name: str, offset: int, length: int) -> None:
        """Queue zeros over ``length`` bytes at ``offset``, after every write queued before."""
        self._raise_if_failed()
        self._zero_slots.acquire()
        self._jobs.put((_ZERO, name, None, length, offset))

    def drain(self) -> None:
        """Wait until every queued write is done; raise the first that failed."""
        done = threading.Event()
        self._jobs.put((_BARRIER, "", done, 0, 0))
        done.wait()
        self._raise_if_failed()

    def close(self, *, discard: bool = False) -> None:
        """Stop the thread (after the queued writes, or dropping them with ``discard``) and close
        the O_DIRECT descriptors. The images' own descriptors stay open."""
        if self._closed:
            return
        self._closed = True
        self._discard = discard
        self._jobs.put((_STOP, "", None, 0, 0))
        self._thread.join()
        for img in self._images.values():
            if img.direct_fd is not None:
                os.close(img.direct_fd)
                img.direct_fd = None

    def stats(self) -> dict:
        return {name: img.stats.to_dict() for name, img in self._images.items()}

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    # --- the writer thread ---------------------------------------------------------

    def _run(self) -> None:
        # every job is taken off the queue, also after a failure (then dropped): buffers and
        # zero slots always come back, barriers always open
        while True:
            kind, name, buf, length, offset = self._jobs.get()
            if kind is _STOP:
                return
            if kind is _BARRIER:
                buf.set()
                continue
            if self.error is None and not self._discard:
                try:
                    if kind is _ZERO:
                        self._write_zeros(self._images[name], offset, length)
                    elif isinstance(offset, list):  # write_runs: parts of the buffer
                        for start, n, at in offset:
                            offset = at
                            self._write(self._images[name], memoryview(buf)[start : start + n], at)
                    else:
                        self._write(self._images[name], memoryview(buf)[:length], offset)
                except Exception as e:  # noqa: BLE001 - whatever it was, the attempt fails with it
                    why = (e.strerror if isinstance(e, OSError) else None) or str(e) or e.__class__.__name__
                    self.error = WriteFailed(f"writing the {name} image at offset {offset} failed: {why}")
                    self.error.errno = getattr(e, "errno", None) or errno.EIO
                    log.error("%s", self.error)
            if kind is _ZERO:
                self._zero_slots.release()
            else:
                self._free.put(buf)

    def _write(self, img: _Image, view: memoryview, offset: int) -> None:
        n = len(view)
        if img.direct_fd is not None:
            if offset % DIRECT_ALIGN == 0 and n % DIRECT_ALIGN == 0:
                try:
                    done = os.pwritev(img.direct_fd, [view], offset)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    self._fall_back(img, f"O_DIRECT write refused: {e.strerror}")
                else:
                    if done != n:
                        raise OSError(errno.EIO, f"short write ({done} of {n} bytes)")
                    img.stats.direct_bytes += n
                    return
            else:
                img.stats.unaligned_writes += 1
        done = os.pwritev(img.fd, [view], offset)
        if done != n:
            raise OSError(errno.EIO, f"short write ({done} of {n} bytes)")
        img.stats.buffered_bytes += n

    def _write_zeros(self, img: _Image, offset: int, length: int) -> None:
        if self._zeros is None:
            self._zeros = mmap.mmap(-1, ZERO_CHUNK)  # anonymous: zero-filled, page-aligned
        end = offset + length
        while offset < end:
            n = min(ZERO_CHUNK, end - offset)
            self._write(img, memoryview(self._zeros)[:n], offset)
            offset += n

    def _fall_back(self, img: _Image, reason: str) -> None:
        log.warning("%s image written through the page cache from now on (%s)", img.name, reason)
        if img.direct_fd is not None:
            os.close(img.direct_fd)
            img.direct_fd = None
        img.stats.fallback = reason
