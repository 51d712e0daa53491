"""Per-block hashes and the image digests both ends of a migration compare.

A block hash is XXH3-128 (16 bytes) of the block's bytes (``xxhash`` package, tens of
GB/s per core): both ends hash every byte they move, and with BLAKE3 the hashing alone
cost about a third of the data plane's CPU. XXH3 is not a cryptographic hash, and does
not need to be here: the data channel is authenticated (HMAC challenge-response in
``ferry.transfer.auth``, the secret never crosses the wire), so the per-block hash
guards against corruption and bugs (a torn read, a wrong offset, a flipped bit in a
buffer), not against an adversary forging frames. A 128-bit hash makes an undetected
accidental mismatch astronomically unlikely. ``HASH_NAME`` travels in the INFO frame so
both ends must agree.

An image's root is SHA-256 over the hash name, its geometry and the block hashes in
order (``16 * blocks`` bytes: 256 KiB per GiB of image, well under a millisecond); a
VM's digest combines the disk and memory roots. Both ends keep the block hashes of the
data they sent/hold, so the final digest costs one hash over the hash table instead of
a re-read of the images while the guest is paused. ``image_root`` re-reads a whole
image the same way (an independent check).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import struct

import xxhash

HASH_SIZE = 16
DIGEST_PREFIX = "sha256:"

HASH_NAME = "xxh3-128"
block_hash = xxhash.xxh3_128_digest  # (bytes-like) -> 16 bytes


def block_hashes(view, block_size: int) -> bytes:
    """The hash list of ``view`` (a whole number of ``block_size`` blocks): the block
    hashes in order, concatenated (``HASH_SIZE`` bytes each)."""
    mv = memoryview(view)
    bh = block_hash
    return b"".join([bh(mv[o : o + block_size]) for o in range(0, len(mv), block_size)])


def first_mismatch(view, block_size: int, hashes) -> int | None:
    """Index of the first block of ``view`` whose hash is not its entry in ``hashes``
    (None when all match). One comparison of the whole hash list on the happy path."""
    got = block_hashes(view, block_size)
    if got == hashes:
        return None
    for k in range(len(got) // HASH_SIZE):
        if got[k * HASH_SIZE : (k + 1) * HASH_SIZE] != hashes[k * HASH_SIZE : (k + 1) * HASH_SIZE]:
            return k
    return len(got) // HASH_SIZE  # pragma: no cover - lengths differ


def mismatches(view, block_size: int, hashes) -> list[int]:
    """Indexes of every block of ``view`` whose hash is not its entry in ``hashes``."""
    got = block_hashes(view, block_size)
    if got == hashes:
        return []
    return [k for k in range(len(got) // HASH_SIZE)
            if got[k * HASH_SIZE : (k + 1) * HASH_SIZE] != hashes[k * HASH_SIZE : (k + 1) * HASH_SIZE]]


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

    def set_run(self, first: int, digests) -> None:
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
        whole = want - want % block_size
        hashes += block_hashes(mv[:whole], block_size)
        if whole < want:  # a short last block counts as zero-padded
            hashes += block_hash(bytes(mv[whole:want]) + bytes(block_size - (want - whole)))
        off += want
    return root_of(size, block_size, hashes)


def sparse_image_root(fd: int, size: int, block_size: int) -> bytes:
    """``image_root`` of an image file without reading its holes: blocks that SEEK_DATA says
    hold no data are hashed as zeros without a read (the result equals ``image_root``; the
    cost grows with the data written, not with the image size)."""
    nblocks = -(-size // block_size)
    hashes = bytearray(zero_hash(block_size) * nblocks)
    buf = bytearray(max(block_size, (4 << 20) // block_size * block_size))
    mv = memoryview(buf)
    for first, count in data_block_ranges(fd, size, block_size):
        b = first
        end = min(first + count, nblocks)
        while b < end:
            n_blocks = min(end - b, len(buf) // block_size)
            off = b * block_size
            want = min(n_blocks * block_size, size - off)
            n = os.preadv(fd, [mv[:want]], off)
            if n < n_blocks * block_size:  # EOF of a short file, or a short last block: zeros
                mv[n : n_blocks * block_size] = bytes(n_blocks * block_size - n)
            hashes[b * HASH_SIZE : (b + n_blocks) * HASH_SIZE] = block_hashes(mv[: n_blocks * block_size], block_size)
            b += n_blocks
    return root_of(size, block_size, hashes)


def data_bytes(fd: int, size: int, block_size: int) -> int:
    """Bytes ``sparse_image_root`` reads: the blocks SEEK_DATA/SEEK_HOLE report as data."""
    nblocks = -(-size // block_size)
    blocks = sum(min(first + count, nblocks) - first for first, count in data_block_ranges(fd, size, block_size))
    return min(size, blocks * block_size)


def data_block_ranges(fd: int, size: int, block_size: int) -> list[tuple[int, int]]:
    """Blocks that may hold data, as sorted, disjoint (first, count) ranges, from
    SEEK_DATA/SEEK_HOLE; the whole image when the file system cannot tell."""
    nblocks = -(-size // block_size)
    out: list[tuple[int, int]] = []
    off = 0
    try:
        while off < size:
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            if start >= size:
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            first, last = start // block_size, -(-end // block_size)
            if out and out[-1][0] + out[-1][1] >= first:  # two ranges meet inside one block
                pf, pc = out[-1]
                out[-1] = (pf, max(last, pf + pc) - pf)
            else:
                out.append((first, last - first))
            off = end
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return [(0, nblocks)] if nblocks else []
        raise
    return out
