"""Dirty bitmaps: one bit per block (disk) or page (memory).

The writer marks a block AFTER its data reached the image; the migration swaps the
bitmap for a clean one atomically with respect to those marks (one lock). So a write
either is in the swapped-out set (and its data is on disk before the sender reads it) or
lands in the new set (and is sent again in a later round): no acknowledged write is
missed.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator

_NONZERO_RUN = re.compile(rb"[^\x00]+")
_CHUNK = 64  # bytes of bitmap turned into one int at a time (keeps big-int ops cheap)


class DirtyBitmap:
    __slots__ = ("nbits", "_bits", "_lock")

    def __init__(self, nbits: int):
        if nbits < 0:
            raise ValueError("nbits must be >= 0")
        self.nbits = nbits
        self._bits = bytearray((nbits + 7) // 8)
        self._lock = threading.Lock()

    def mark(self, index: int) -> None:
        if not 0 <= index < self.nbits:
            raise IndexError(index)
        with self._lock:
            self._bits[index >> 3] |= 1 << (index & 7)

    def mark_range(self, first: int, count: int) -> None:
        if count <= 0:
            return
        if first < 0 or first + count > self.nbits:
            raise IndexError((first, count))
        with self._lock:
            bits = self._bits
            for i in range(first, first + count):
                bits[i >> 3] |= 1 << (i & 7)

    def mark_all(self) -> None:
        with self._lock:
            self._bits = bytearray(b"\xff" * len(self._bits))
            self._clear_tail(self._bits)

    def _clear_tail(self, bits: bytearray) -> None:
        extra = len(bits) * 8 - self.nbits
        if extra:
            bits[-1] &= 0xFF >> extra

    def is_set(self, index: int) -> bool:
        return bool(self._bits[index >> 3] & (1 << (index & 7)))

    def mask(self, first: int, count: int) -> int:
        """Bit k set iff block ``first + k`` is dirty now (no lock: a snapshot)."""
        bits = self._bits
        lo, hi = first >> 3, (first + count + 7) >> 3
        return (int.from_bytes(bits[lo:hi], "little") >> (first & 7)) & ((1 << count) - 1)

    def count(self) -> int:
        """Number of dirty bits now (a snapshot; the writer may add more at once)."""
        with self._lock:
            snapshot = bytes(self._bits)
        return int.from_bytes(snapshot, "little").bit_count()

    def swap(self) -> bytes:
        """Take the dirty set and start a clean one, atomically w.r.t. ``mark``."""
        fresh = bytearray(len(self._bits))
        with self._lock:
            old, self._bits = self._bits, fresh
        return bytes(old)

    def merge(self, bits: bytes) -> None:
        """Put a taken dirty set back (OR it in), e.g. when a round is abandoned."""
        value = int.from_bytes(bits, "little")
        with self._lock:
            merged = int.from_bytes(self._bits, "little") | value
            self._bits = bytearray(merged.to_bytes(len(self._bits), "little"))


def popcount(bits: bytes) -> int:
    return int.from_bytes(bits, "little").bit_count()


def runs(bits: bytes) -> Iterator[tuple[int, int]]:
    """Maximal runs of set bits as (first, count), in order."""
    pending_first = -1
    pending_end = -1
    for m in _NONZERO_RUN.finditer(bits):
        start, end = m.span()
        for c in range(start, end, _CHUNK):
            chunk_end = min(c + _CHUNK, end)
            v = int.from_bytes(bits[c:chunk_end], "little")
            pos = c * 8
            while v:
                tz = (v & -v).bit_length() - 1
                v >>= tz
                pos += tz
                ones = (~v & (v + 1)).bit_length() - 1
                if pos == pending_end:
                    pending_end += ones
                else:
                    if pending_first >= 0:
                        yield pending_first, pending_end - pending_first
                    pending_first, pending_end = pos, pos + ones
                v >>= ones
                pos += ones
    if pending_first >= 0:
        yield pending_first, pending_end - pending_first


def extents(bits: bytes, max_count: int) -> Iterator[tuple[int, int]]:
    """Runs of set bits split into extents of at most ``max_count`` blocks."""
    if max_count < 1:
        raise ValueError("max_count must be >= 1")
    for first, count in runs(bits):
        while count > max_count:
            yield first, max_count
            first += max_count
            count -= max_count
        yield first, count


def split_extents(ranges: list[tuple[int, int]], max_count: int) -> Iterator[tuple[int, int]]:
    """Split (first, count) ranges into pieces of at most ``max_count``."""
    for first, count in ranges:
        while count > 0:
            n = min(count, max_count)
            yield first, n
            first += n
            count -= n
