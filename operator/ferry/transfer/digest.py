"""Per-block hashes and the image digests both ends of a migration compare.

A block hash is BLAKE3 (32 bytes) of the block's bytes -- a cryptographic hash about
3x faster than SHA-256 here, which matters because both ends hash every byte they move;
SHA-256 is the fallback when the ``blake3`` package is missing (``HASH_NAME`` travels in
the INFO frame so both ends must agree). An image's root is SHA-256 over the hash name,
its geometry and the block hashes in order; a VM's digest combines the disk and memory
roots.
Both ends keep the block hashes of the data they sent/hold, so the final digest costs one
hash over ``32 * blocks`` bytes instead of a re-read of the images while the guest is
paused. ``image_root`` re-reads a whole image the same way (an independent check).
"""

from __future__ import annotations

import functools
import hashlib
import os
import struct

try:
    from blake3 import blake3 as _blake3
except ImportError:  # pragma: no cover - blake3 is a dependency; keep working without it
    _blake3 = None

HASH_SIZE = 32
DIGEST_PREFIX = "sha256:"

if _blake3 is not None:
    HASH_NAME = "blake3"

    def block_hash(data) -> bytes:
        return _blake3(data).digest()

else:  # pragma: no cover
    HASH_NAME = "sha256"

    def block_hash(data) -> bytes:
        return hashlib.sha256(data).digest()


@functools.lru_cache(maxsize=8)
def zero_hash(block_size: int) -> bytes:
    return block_hash(bytes(block_size))


class BlockHashes:
    """The hash of every block of one image, all-zero blocks pre-filled."""

    __slots__ = ("size", "block_size", "nblocks", "_hashes")

    def __init__(self, size: int, block_size: int):
        self.size = size
        self.block_size = block_size
        self.nblocks = -(-size // block_size)
        self._hashes = bytearray(zero_hash(block_size) * self.nblocks)

    def set(self, index: int, digest: bytes) -> None:
        self._hashes[index * HASH_SIZE : (index + 1) * HASH_SIZE] = digest

    def set_run(self, first: int, digests: bytes) -> None:
        self._hashes[first * HASH_SIZE : first * HASH_SIZE + len(digests)] = digests

    def set_zero(self, first: int, count: int) -> None:
        self._hashes[first * HASH_SIZE : (first + count) * HASH_SIZE] = zero_hash(self.block_size) * count

    def get(self, index: int) -> bytes:
        return bytes(self._hashes[index * HASH_SIZE : (index + 1) * HASH_SIZE])

    def root(self) -> bytes:
        return root_of(self.size, self.block_size, self._hashes)


def root_of(size: int, block_size: int, hashes) -> bytes:
    h = hashlib.sha256(b"ferry-image-v1\0" + HASH_NAME.encode() + b"\0" + struct.pack("!QI", size, block_size))
    h.update(hashes)
    return h.digest()


def combine(disk_root: bytes, memory_root: bytes) -> str:
    """The VM digest shown to users and compared at cut-over."""
    return DIGEST_PREFIX + hashlib.sha256(b"ferry-vm-v1\0" + disk_root + memory_root).hexdigest()


def image_root(fd: int, size: int, block_size: int, chunk_blocks: int | None = None) -> bytes:
    """Re-read an image file and compute its root (holes read as zeros)."""
    chunk_blocks = chunk_blocks or max(1, (1 << 20) // block_size)
    hashes = bytearray()
    buf = bytearray(chunk_blocks * block_size)
    mv = memoryview(buf)
    off = 0
    while off < size:
        want = min(len(buf), size - off)
        n = os.preadv(fd, [mv[:want]], off)
        if n < want:  # past EOF of a short file: zeros
            mv[n:want] = bytes(want - n)
        for i in range(0, want, block_size):
            blk = mv[i : i + block_size]
            if len(blk) < block_size:
                hashes += block_hash(bytes(blk) + bytes(block_size - len(blk)))
            else:
                hashes += block_hash(blk)
        off += want
    return root_of(size, block_size, hashes)
