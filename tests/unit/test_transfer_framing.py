"""Frames of the data channel: headers, checksums, data/zero/control frames."""

import socket
import struct
import zlib

import pytest

from ferry.transfer import framing
from ferry.transfer.digest import block_hash
from ferry.transfer.framing import ChecksumError, FrameError, Kind


def test_header_roundtrip():
    raw = framing.encode_header(Kind.DISK, 123456, index=2**40 + 7, check=0xDEADBEEF)
    assert len(raw) == framing.HEADER_SIZE == 24
    kind, flags, length, index, check = framing.decode_header(raw)
    assert (kind, flags, length, index, check) == (Kind.DISK, 0, 123456, 2**40 + 7, 0xDEADBEEF)


@pytest.mark.parametrize("pos", range(24))
def test_any_flipped_header_bit_is_detected(pos):
    raw = bytearray(framing.encode_header(Kind.MEMORY, 4096 + 32, index=5, check=1))
    raw[pos] ^= 0x10
    with pytest.raises(FrameError):
        framing.decode_header(bytes(raw))


def test_bad_magic_and_kind_rejected_even_with_valid_crc():
    head = framing.HEADER.pack(b"XX", int(Kind.DISK), 0, 0, 0, 0)
    with pytest.raises(FrameError, match="magic"):
        framing.decode_header(head + struct.pack("!I", zlib.crc32(head)))
    head = framing.HEADER.pack(b"FY", 99, 0, 0, 0, 0)
    with pytest.raises(FrameError, match="kind"):
        framing.decode_header(head + struct.pack("!I", zlib.crc32(head)))


def test_oversized_frames_rejected():
    with pytest.raises(FrameError, match="too long"):
        framing.decode_header(framing.encode_header(Kind.INFO, framing.MAX_CONTROL_PAYLOAD + 1))
    with pytest.raises(FrameError, match="too long"):
        framing.decode_header(framing.encode_header(Kind.DISK, framing.MAX_DATA_PAYLOAD + 1))


def test_control_frame_roundtrip_and_corruption():
    raw = framing.control_frame(Kind.DONE, {"digest": "sha256:ab", "n": 3}, index=9)
    kind, _, length, index, check = framing.decode_header(raw[:24])
    payload = raw[24:]
    assert (kind, index, length) == (Kind.DONE, 9, len(payload))
    assert framing.parse_control(payload, check) == {"digest": "sha256:ab", "n": 3}
    bad = bytearray(payload)
    bad[3] ^= 1
    with pytest.raises(ChecksumError):
        framing.parse_control(bytes(bad), check)


def test_zero_frame():
    raw = framing.zero_frame(Kind.ZERO_DISK, 17, 5)
    kind, _, length, index, check = framing.decode_header(raw[:24])
    assert (kind, index) == (Kind.ZERO_DISK, 17)
    assert framing.parse_zero(raw[24:], check) == 5
    with pytest.raises(ChecksumError):
        framing.parse_zero(struct.pack("!I", 6), check)


def test_data_frame_layout_and_count():
    bs = 4096
    blocks = [bytes([i + 1]) * bs for i in range(3)]
    hl = b"".join(block_hash(b) for b in blocks)
    assert len(hl) == 3 * framing.HASH_SIZE
    head = framing.data_header(Kind.MEMORY, 40, hl, 3 * bs)
    kind, _, length, index, check = framing.decode_header(head)
    assert kind is Kind.MEMORY and index == 40
    assert framing.data_count(length, bs) == 3
    assert check == zlib.crc32(hl)
    with pytest.raises(FrameError):
        framing.data_count(length - 1, bs)
    with pytest.raises(FrameError):
        framing.data_count(0, bs)


def test_send_parts_and_read_frame_over_a_socket():
    a, b = socket.socketpair()
    with a, b:
        parts = [framing.control_frame(Kind.ROUND, {"full": True}, index=2)]
        framing.send_parts(a, parts + [framing.control_frame(Kind.VERDICT, {"ok": True})])
        kind, index, check, payload = framing.read_frame(b)
        assert (kind, index) == (Kind.ROUND, 2)
        assert framing.parse_control(payload, check) == {"full": True}
        kind, index, check, payload = framing.read_frame(b)
        assert kind is Kind.VERDICT and framing.parse_control(payload, check)["ok"] is True


def test_send_parts_handles_large_scatter_lists():
    a, b = socket.socketpair()
    big = bytes(range(256)) * 8192  # 2 MiB, larger than a socket buffer
    import threading

    got = bytearray()

    def reader():
        while len(got) < len(big) + 10:
            chunk = b.recv(1 << 16)
            if not chunk:
                break
            got.extend(chunk)

    t = threading.Thread(target=reader)
    t.start()
    framing.send_parts(a, [b"0123456789", memoryview(big)])
    t.join(10)
    a.close()
    b.close()
    assert bytes(got) == b"0123456789" + big


def test_recv_exact_reports_eof():
    a, b = socket.socketpair()
    a.sendall(b"abc")
    a.close()
    with pytest.raises(framing.ConnectionClosed):
        framing.recv_exact(b, 10)
    b.close()


def test_block_hashes_and_first_mismatch():
    from ferry.transfer.digest import HASH_SIZE, block_hashes, first_mismatch, zero_hash

    bs = 4096
    data = bytearray(b"".join(bytes([i + 1]) * bs for i in range(5)))
    hl = block_hashes(data, bs)
    assert len(hl) == 5 * HASH_SIZE
    assert hl == b"".join(block_hash(data[k * bs : (k + 1) * bs]) for k in range(5))
    assert block_hashes(bytes(2 * bs), bs) == zero_hash(bs) * 2
    assert first_mismatch(data, bs, hl) is None
    data[3 * bs + 100] ^= 1  # one flipped bit in block 3
    assert first_mismatch(data, bs, hl) == 3
    assert first_mismatch(data, bs, hl[:HASH_SIZE] + bytes(HASH_SIZE) + hl[2 * HASH_SIZE :]) == 1


def test_kernel_timeouts_block_and_still_time_out():
    a, b = socket.socketpair()
    with a, b:
        framing.set_kernel_timeouts(b, 0.2)
        assert b.gettimeout() is None  # blocking: no poll() before every call
        buf = bytearray(10)
        with pytest.raises(TimeoutError):
            framing.recv_exact_into(b, memoryview(buf))
        # a reader told to keep waiting gets what arrives after its first timeout
        waits = []

        def keep_waiting():
            waits.append(1)
            if len(waits) == 1:
                a.sendall(b"0123456789")
            return False

        framing.recv_exact_into(b, memoryview(buf), should_stop=keep_waiting)
        assert bytes(buf) == b"0123456789" and waits
