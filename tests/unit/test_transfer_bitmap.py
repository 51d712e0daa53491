"""Dirty bitmaps: marking, atomic swap against concurrent writers, extents."""

import random
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferry.transfer.bitmap import DirtyBitmap, extents, popcount, runs, split_extents


def bits_of(indices, nbits):
    bm = DirtyBitmap(nbits)
    for i in indices:
        bm.mark(i)
    return bm


def test_mark_count_swap():
    bm = bits_of([0, 7, 8, 99], 100)
    assert bm.count() == 4
    assert bm.is_set(7) and not bm.is_set(6)
    taken = bm.swap()
    assert popcount(taken) == 4
    assert bm.count() == 0
    assert list(runs(taken)) == [(0, 1), (7, 2), (99, 1)]


def test_mark_range_and_bounds():
    bm = DirtyBitmap(20)
    bm.mark_range(3, 10)
    assert list(runs(bm.swap())) == [(3, 10)]
    with pytest.raises(IndexError):
        bm.mark(20)
    with pytest.raises(IndexError):
        bm.mark_range(15, 6)


def test_mark_all_respects_nbits_and_merge():
    bm = DirtyBitmap(13)
    bm.mark_all()
    assert bm.count() == 13
    taken = bm.swap()
    bm.mark(1)
    bm.merge(taken)
    assert bm.count() == 13


def test_extents_split_at_max():
    bm = DirtyBitmap(100)
    bm.mark_range(0, 40)
    bm.mark_range(50, 5)
    assert list(extents(bm.swap(), 16)) == [(0, 16), (16, 16), (32, 8), (50, 5)]
    assert list(split_extents([(0, 5), (10, 3)], 2)) == [(0, 2), (2, 2), (4, 1), (10, 2), (12, 1)]


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 3000).flatmap(lambda n: st.tuples(st.just(n), st.sets(st.integers(0, n - 1)))), st.integers(1, 300))
def test_extents_cover_exactly_the_set_bits(case, max_count):
    nbits, indices = case
    taken = bits_of(indices, nbits).swap()
    covered = []
    prev_end = -1
    for first, count in extents(taken, max_count):
        assert 1 <= count <= max_count
        assert first >= prev_end  # ordered, non-overlapping
        covered.extend(range(first, first + count))
        prev_end = first + count
    assert covered == sorted(indices)
    # runs are maximal: no two runs touch
    rs = list(runs(taken))
    assert all(a[0] + a[1] < b[0] for a, b in zip(rs, rs[1:]))


def test_dense_large_bitmap_is_fast():
    bm = DirtyBitmap(262144)  # 1 GiB of 4 KiB pages
    bm.mark_all()
    taken = bm.swap()
    assert list(extents(taken, 256))[-1] == (262144 - 256, 256)
    alternating = bytes([0x55]) * (262144 // 8)
    assert sum(c for _, c in runs(alternating)) == 131072


def test_no_write_is_lost_across_concurrent_swaps():
    """A writer marks while a reader swaps: every mark lands in exactly one taken set
    or in the final bitmap (the property pre-copy relies on)."""
    n = 4096
    bm = DirtyBitmap(n)
    writes = [random.Random(1).randrange(n) for _ in range(200_000)]
    stop = threading.Event()
    seen = set()
    swaps = []

    def writer():
        for i in writes:
            bm.mark(i)
        stop.set()

    def swapper():
        while not stop.is_set():
            swaps.append(bm.swap())
        swaps.append(bm.swap())

    t1, t2 = threading.Thread(target=writer), threading.Thread(target=swapper)
    t1.start()
    t2.start()
    t1.join()
    t2.join()
    for taken in swaps:
        for first, count in runs(taken):
            seen.update(range(first, first + count))
    assert seen == set(writes)
    assert len(swaps) > 1


def test_mask_reports_dirty_blocks_of_a_range():
    bm = bits_of([3, 4, 10, 17], 40)
    assert bm.mask(0, 8) == 0b00011000
    assert bm.mask(3, 2) == 0b11
    assert bm.mask(5, 5) == 0
    assert bm.mask(10, 8) == 0b10000001
    assert bm.mask(17, 23) == 1


def test_sparse_image_root_equals_the_full_read(tmp_path):
    import os as _os

    from ferry.transfer.digest import image_root, sparse_image_root

    bs = 64 << 10
    p = tmp_path / "img"
    size = 64 * bs + 123  # a short last block
    with open(p, "wb") as f:
        f.truncate(size)
        f.seek(3 * bs + 5)
        f.write(b"data")
        f.seek(40 * bs)
        f.write(_os.urandom(3 * bs))
        f.seek(size - 10)
        f.write(b"tail")
    fd = _os.open(p, _os.O_RDONLY)
    try:
        full = image_root(fd, size, bs)
        assert sparse_image_root(fd, size, bs) == full
    finally:
        _os.close(fd)
    with open(p, "r+b") as f:  # one byte changed in the data: a different root
        f.seek(41 * bs + 7)
        byte = f.read(1)[0]
        f.seek(41 * bs + 7)
        f.write(bytes([byte ^ 0xFF]))  # flipped: writing a constant left a random 0xff as it was (1 in 256)
    fd = _os.open(p, _os.O_RDONLY)
    try:
        assert sparse_image_root(fd, size, bs) != full
        assert sparse_image_root(fd, size, bs) == image_root(fd, size, bs)
    finally:
        _os.close(fd)
