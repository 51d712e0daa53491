"""The sim VM's block layer: an image file plus the dirty bitmap a hypervisor keeps.

Disk images use 64 KiB blocks, memory images 4 KiB pages. Every guest write goes
through ``Image.write``: data first (pwrite), then the dirty bits, so a concurrent
pre-copy round either sees the new data or finds the block dirty again (see
``ferry.transfer.bitmap``).
"""

from __future__ import annotations

import math
import os

from ferry.transfer.bitmap import DirtyBitmap

DISK_BLOCK_SIZE = 64 * 1024
MEMORY_PAGE_SIZE = 4 * 1024


def _round_up(n: float, unit: int) -> int:
    return max(unit, math.ceil(n / unit) * unit)


def image_sizes(memory_mib: int, disk_gib: int, size_scale: float = 1.0) -> tuple[int, int]:
    """-> (disk bytes, memory bytes): the droplet's sizes times ``size_scale``,
    rounded up to a whole block/page (at least one)."""
    if size_scale <= 0:
        raise ValueError("size_scale must be > 0")
    disk = _round_up(disk_gib * (1 << 30) * size_scale, DISK_BLOCK_SIZE)
    memory = _round_up(memory_mib * (1 << 20) * size_scale, MEMORY_PAGE_SIZE)
    return disk, memory


class Image:
    """A sparse image file of ``size`` bytes in ``block_size`` blocks."""

    def __init__(self, path: str, size: int, block_size: int, *, fresh: bool = False):
        if size <= 0 or size % block_size:
            raise ValueError(f"image size {size} is not a positive multiple of {block_size}")
        self.path = path
        self.size = size
        self.block_size = block_size
        self.nblocks = size // block_size
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        if fresh:
            os.ftruncate(self.fd, 0)  # drop any old content: a fresh sparse, zero image
        if os.fstat(self.fd).st_size != size:
            os.ftruncate(self.fd, size)
        self.dirty = DirtyBitmap(self.nblocks)

    def write(self, offset: int, data) -> None:
        """A guest write: data, then the dirty bits of every block it touches."""
        n = len(data)
        if offset < 0 or offset + n > self.size:
            raise ValueError(f"write {offset}+{n} outside image of {self.size}")
        if os.pwrite(self.fd, data, offset) != n:
            raise OSError("short write")
        bs = self.block_size
        first, last = offset // bs, (offset + n - 1) // bs
        if first == last:
            self.dirty.mark(first)
        else:
            self.dirty.mark_range(first, last - first + 1)

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
