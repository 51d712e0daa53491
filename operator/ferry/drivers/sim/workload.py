"""The sim guest: a thread that writes at a configured rate and pattern.

Writes go through the VM's block layer (``Image.write``) so they mark the dirty bitmaps.
70 % of the written bytes go to the disk (whole 64 KiB blocks), 30 % to memory (4 KiB
pages), so the configured rate is also the rate at which bytes get dirtied (before
overlaps). Patterns: ``uniform`` (any block), ``hotspot`` (90 % of writes to the first
10 % of blocks), ``sequential`` (a cursor that wraps around).

Every write's content is derived from its sequence number and offset (``content``), and
with a write log each acknowledged write is appended to ``writes.log`` as a compact
record (seq, kind, offset, length, crc32), so ``replay`` can rebuild the images from zero
independently of the migration code.

Throttle (auto-converge): ``set_throttle(disk %, memory %)`` slows that kind's writes
to (100 - %) % of its rate. ``pause()`` returns only when no write is in flight.
"""

from __future__ import annotations

import os
import random
import struct
import threading
import time
import zlib

from ferry.drivers.sim.image import Image

PATTERNS = ("uniform", "hotspot", "sequential")
DISK, MEMORY = 0, 1
#: a write-log record of this kind says: the VM process died, its memory was lost here and
#: the guest booted again (offset = the new boot number); replay zeroes the memory image
MEMORY_LOST = 2
DISK_SHARE = 0.7
MAGIC = 0x59525245465F4D53  # arbitrary, never zero
_RECORD = struct.Struct("<QQQQ")
LOG_RECORD = struct.Struct("<QBQII")  # seq, kind, offset, length, crc32
TICK = 0.005
MAX_CATCH_UP = 0.1  # seconds of writes owed at most (no bursts after a stall)


def content(seq: int, kind: int, offset: int, length: int) -> bytes:
    """The bytes of write ``seq`` (deterministic; never all zero)."""
    return _RECORD.pack(seq, offset, kind, MAGIC) * (length // _RECORD.size)


class Guest:
    def __init__(
        self,
        disk: Image,
        memory: Image,
        *,
        pattern: str = "uniform",
        rate_kibps: float = 0,
        seq: int = 0,
        log_path: str | None = None,
        seed: int | None = None,
    ):
        self.disk, self.memory = disk, memory
        self.set_workload(pattern, rate_kibps)
        self.seq = seq
        self.disk_throttle = 0
        self.memory_throttle = 0
        self.bytes_written = 0
        self._rng = random.Random(seed)
        self._cursor = [0, 0]
        self._running = False
        self._stopped = False
        self._cond = threading.Condition()
        self._io = threading.Lock()
        self._wake = threading.Event()
        self._log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600) if log_path else -1
        self._thread = threading.Thread(target=self._loop, name="guest", daemon=True)
        self._thread.start()

    # --- control -----------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._running

    def set_workload(self, pattern: str, rate_kibps: float) -> None:
        if pattern not in PATTERNS:
            raise ValueError(f"unknown pattern {pattern!r} (one of {', '.join(PATTERNS)})")
        if rate_kibps < 0:
            raise ValueError("write rate must be >= 0")
        self.pattern = pattern
        self.rate_kibps = float(rate_kibps)
        wake = getattr(self, "_wake", None)
        if wake is not None:
            wake.set()  # an idle guest sleeps long; start writing at once

    def set_throttle(self, disk_percent: int, memory_percent: int) -> None:
        self.disk_throttle = max(0, min(100, int(disk_percent)))
        self.memory_throttle = max(0, min(100, int(memory_percent)))

    def run(self) -> None:
        with self._cond:
            self._running = True
            self._cond.notify_all()

    def pause(self) -> bool:
        """Stop writing; -> whether the guest was running. No write is in flight after."""
        with self._cond:
            was = self._running
            self._running = False
        self._wake.set()
        with self._io:  # wait for the batch in flight
            pass
        return was

    resume = run

    def export_state(self) -> dict:
        return {"seq": self.seq, "pattern": self.pattern, "write_rate_kibps": self.rate_kibps}

    def shutdown(self) -> None:
        self.pause()
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._wake.set()
        self._thread.join(5)
        if self._log_fd >= 0:
            os.close(self._log_fd)
            self._log_fd = -1

    # --- the guest -----------------------------------------------------------------

    def _pick(self, kind: int, n: int) -> int:
        pattern = self.pattern
        if pattern == "uniform":
            return self._rng.randrange(n)
        if pattern == "hotspot":
            if self._rng.random() < 0.9:
                return self._rng.randrange(max(1, n // 10))
            return self._rng.randrange(n)
        i = self._cursor[kind] % n
        self._cursor[kind] = i + 1
        return i

    def _write(self, kind: int, img: Image, records: list) -> None:
        bs = img.block_size
        offset = self._pick(kind, img.nblocks) * bs
        self.seq += 1
        data = content(self.seq, kind, offset, bs)
        img.write(offset, data)
        self.bytes_written += bs
        if self._log_fd >= 0:
            records.append(LOG_RECORD.pack(self.seq, kind, offset, bs, zlib.crc32(data)))

    def _loop(self) -> None:
        owed = [0.0, 0.0]
        last = None
        while True:
            with self._cond:
                while not self._running and not self._stopped:
                    last = None
                    self._cond.wait()
                if self._stopped:
                    return
            now = time.monotonic()
            if last is None:
                last, owed = now, [0.0, 0.0]
            dt = min(now - last, MAX_CATCH_UP)
            last = now
            rate = self.rate_kibps * 1024.0
            owed[DISK] += dt * rate * DISK_SHARE * (100 - self.disk_throttle) / 100.0
            owed[MEMORY] += dt * rate * (1 - DISK_SHARE) * (100 - self.memory_throttle) / 100.0
            records: list[bytes] = []
            with self._io:
                if self._running:
                    for kind, img in ((DISK, self.disk), (MEMORY, self.memory)):
                        bs = img.block_size
                        while owed[kind] >= bs:
                            self._write(kind, img, records)
                            owed[kind] -= bs
                    if records:
                        os.write(self._log_fd, b"".join(records))
            # an idle guest (rate 0) wakes rarely: hundreds of idle VMs cost ~nothing
            self._wake.wait(TICK if self.rate_kibps > 0 else 1.0)
            self._wake.clear()


def log_memory_lost(path: str, seq: int, boot: int) -> None:
    """Append a MEMORY_LOST record (after the last write ``seq``) to a write log."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, LOG_RECORD.pack(seq, MEMORY_LOST, boot, 0, 0))
    finally:
        os.close(fd)


def read_log(path: str):
    """Yield (seq, kind, offset, length, crc) records of a write log."""
    with open(path, "rb") as f:
        data = f.read()
    size = LOG_RECORD.size
    if len(data) % size:
        raise ValueError(f"write log {path} has a torn record")
    for i in range(0, len(data), size):
        yield LOG_RECORD.unpack_from(data, i)


def last_logged_seq(path: str) -> int:
    """Sequence number of the last whole record of a write log (0 if none)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            whole = size - size % LOG_RECORD.size
            if whole == 0:
                return 0
            f.seek(whole - LOG_RECORD.size)
            return LOG_RECORD.unpack(f.read(LOG_RECORD.size))[0]
    except FileNotFoundError:
        return 0


def replay(log_path: str, disk_path: str, memory_path: str, disk_size: int, memory_size: int) -> int:
    """Rebuild images from zero by replaying a write log; -> number of writes.
    Raises ValueError if a record's crc does not match its regenerated content."""
    fds = []
    try:
        for path, size in ((disk_path, disk_size), (memory_path, memory_size)):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            os.ftruncate(fd, size)
            fds.append(fd)
        n = 0
        for seq, kind, offset, length, crc in read_log(log_path):
            if kind == MEMORY_LOST:
                os.ftruncate(fds[MEMORY], 0)
                os.ftruncate(fds[MEMORY], memory_size)
                continue
            data = content(seq, kind, offset, length)
            if zlib.crc32(data) != crc:
                raise ValueError(f"write {seq}: content does not match its logged crc")
            os.pwrite(fds[kind], data, offset)
            n += 1
        return n
    finally:
        for fd in fds:
            os.close(fd)
