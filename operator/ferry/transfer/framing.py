"""Frames of the migration data channel.

Every frame starts with a fixed 24-byte header::

    magic   2s   b"FY"
    kind    u8   one of ``Kind``
    flags   u8   ``FLAG_LIVE`` on data frames read from the running guest's image (below);
                 0 otherwise
    length  u32  payload bytes that follow the header
    index   u64  first block (disk, 64 KiB) or page (memory, 4 KiB) of a data frame;
                 the round number for ROUND; 0 otherwise
    check   u32  crc32 of the payload's checked part (see below)
    hcrc    u32  crc32 of the 20 header bytes before it

Data frames (``DISK``/``MEMORY``) carry ``n`` contiguous blocks starting at ``index``:
the payload is ``n`` block hashes (``ferry.transfer.digest``: XXH3-128, 16 bytes each)
followed by the ``n`` blocks themselves, so ``length == n * (16 + block_size)``. ``check`` covers the hash list; each block is then
checked against its own hash, which is also what the receiver keeps for its digest.
``ZERO_*`` frames say "these ``n`` blocks are all zero" (payload: u32 ``n``). Control
frames (INFO, ROUND, DONE, VERDICT, ERROR, ABORT) carry a small JSON object and ``check``
is the crc32 of all of it.

A mismatch anywhere raises ``ChecksumError``: the receiver drops the frame and fails the
attempt (it never writes a block whose hash does not match). The one exception is the
resend rule: a data frame with ``FLAG_LIVE`` was hashed and sent from a mapping of the
image while the guest ran, so a guest write between the hash and the send can tear a
block (its data then does not match its hash). Such a block is not written and is owed:
the write that tore it marks it dirty, so the source sends it again in a later round, and
only a matching copy (or a ZERO frame) pays the debt. A block still owed at DONE, a
mismatch in a frame without the flag (the source read a copy) or in a round the source
announced as paused (ROUND ``{"paused": true}``: no guest write can tear anything) fails
the attempt as before. So every block of the final image still arrived with a matching
hash.
"""

from __future__ import annotations

import enum
import json
import socket
import struct
import zlib

from ferry.transfer.digest import HASH_SIZE

MAGIC = b"FY"
HEADER = struct.Struct("!2sBBIQI")  # everything but the header crc
HEADER_SIZE = HEADER.size + 4  # 24
MAX_CONTROL_PAYLOAD = 1 << 20
MAX_DATA_PAYLOAD = 64 << 20


class Kind(enum.IntEnum):
    INFO = 1  # source -> target: image geometry, migration id
    DISK = 2
    MEMORY = 3
    ZERO_DISK = 4
    ZERO_MEMORY = 5
    ROUND = 6  # source -> target: a round starts (index = round number)
    DONE = 7  # source -> target: all sent (guest paused); digests and guest state
    VERDICT = 8  # target -> source: {"ok", "digest", ...}
    ERROR = 9  # either way: {"error": reason}; the attempt failed
    ABORT = 10  # source -> target: the source cancelled


# data frame flag: hashed and sent from a mapping of the image while the guest ran (a block
# mismatch may be a tear by a guest write: the block is owed, see the module docstring)
FLAG_LIVE = 0x01

DATA_KINDS = (Kind.DISK, Kind.MEMORY)
ZERO_KINDS = (Kind.ZERO_DISK, Kind.ZERO_MEMORY)
CONTROL_KINDS = (Kind.INFO, Kind.ROUND, Kind.DONE, Kind.VERDICT, Kind.ERROR, Kind.ABORT)


class FrameError(Exception):
    """The peer sent something that is not a valid frame."""


class ChecksumError(FrameError):
    """A frame's header, hash list or block failed its checksum."""


class ConnectionClosed(FrameError):
    """The peer closed the connection (EOF) before a whole frame arrived."""


def encode_header(kind: int, length: int, index: int = 0, check: int = 0, flags: int = 0) -> bytes:
    head = HEADER.pack(MAGIC, kind, flags, length, index, check)
    return head + struct.pack("!I", zlib.crc32(head))


def decode_header(raw: bytes | bytearray | memoryview) -> tuple[Kind, int, int, int, int]:
    """-> (kind, flags, length, index, check); raises FrameError/ChecksumError."""
    if len(raw) != HEADER_SIZE:
        raise FrameError(f"short frame header ({len(raw)} bytes)")
    head = bytes(raw[: HEADER.size])
    (hcrc,) = struct.unpack("!I", raw[HEADER.size :])
    if zlib.crc32(head) != hcrc:
        raise ChecksumError("frame header checksum mismatch")
    magic, kind, flags, length, index, check = HEADER.unpack(head)
    if magic != MAGIC:
        raise FrameError(f"bad frame magic {magic!r}")
    try:
        kind = Kind(kind)
    except ValueError:
        raise FrameError(f"unknown frame kind {kind}") from None
    limit = MAX_CONTROL_PAYLOAD if kind in CONTROL_KINDS else MAX_DATA_PAYLOAD
    if length > limit:
        raise FrameError(f"{kind.name} frame too long ({length} bytes)")
    return kind, flags, length, index, check


def control_frame(kind: Kind, body: dict | None = None, index: int = 0) -> bytes:
    payload = json.dumps(body or {}, separators=(",", ":")).encode()
    return encode_header(kind, len(payload), index, zlib.crc32(payload)) + payload


def parse_control(payload: bytes, check: int) -> dict:
    if zlib.crc32(payload) != check:
        raise ChecksumError("control frame checksum mismatch")
    try:
        body = json.loads(payload)
    except ValueError as e:
        raise FrameError(f"bad control frame: {e}") from None
    if not isinstance(body, dict):
        raise FrameError("bad control frame: not an object")
    return body


def data_header(kind: Kind, first: int, hashes: bytes, data_len: int, flags: int = 0) -> bytes:
    """Header of a DISK/MEMORY frame; ``hashes`` is the hash list that follows it."""
    return encode_header(kind, len(hashes) + data_len, first, zlib.crc32(hashes), flags)


def zero_frame(kind: Kind, first: int, count: int) -> bytes:
    payload = struct.pack("!I", count)
    return encode_header(kind, len(payload), first, zlib.crc32(payload)) + payload


def parse_zero(payload: bytes, check: int) -> int:
    if zlib.crc32(payload) != check:
        raise ChecksumError("zero frame checksum mismatch")
    if len(payload) != 4:
        raise FrameError("bad zero frame")
    return struct.unpack("!I", payload)[0]


def data_count(length: int, block_size: int) -> int:
    """Number of blocks in a data frame of ``length`` payload bytes."""
    unit = HASH_SIZE + block_size
    if length == 0 or length % unit:
        raise FrameError(f"data frame length {length} is not a multiple of {unit}")
    return length // unit


# --- socket helpers -----------------------------------------------------------------


def set_kernel_timeouts(sock: socket.socket, seconds: float) -> None:
    """Make ``sock`` block in the kernel, ``seconds`` at most per send or receive
    (SO_SNDTIMEO/SO_RCVTIMEO): no poll() before every call as in Python's timeout mode."""
    tv = struct.pack("@ll", int(seconds), int((seconds - int(seconds)) * 1e6))
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def recv_exact_into(sock: socket.socket, view: memoryview, should_stop=None) -> None:
    """Fill ``view`` from ``sock``. Retries on socket timeouts while ``should_stop()``
    is false (so a reader with a timeout can wait for a peer that is busy). A blocking
    socket (``set_kernel_timeouts``) waits in the kernel for all of it (MSG_WAITALL)."""
    got = 0
    n = len(view)
    flags = socket.MSG_WAITALL if sock.gettimeout() is None else 0
    while got < n:
        try:
            r = sock.recv_into(view[got:], n - got, flags)
        except (TimeoutError, BlockingIOError):  # BlockingIOError: SO_RCVTIMEO expired
            if should_stop is None or should_stop():
                raise TimeoutError("timed out waiting for the peer") from None
            continue
        if r == 0:
            raise ConnectionClosed("connection closed by peer")
        got += r


def recv_exact(sock: socket.socket, n: int, should_stop=None) -> bytes:
    buf = bytearray(n)
    if n:
        recv_exact_into(sock, memoryview(buf), should_stop)
    return bytes(buf)


def send_parts(sock: socket.socket, parts: list) -> None:
    """Send all of ``parts`` (bytes-like) with as few syscalls as possible."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        try:
            sent = sock.sendmsg(views)
        except BlockingIOError:  # SO_SNDTIMEO expired
            raise TimeoutError("timed out sending to the peer") from None
        while sent:
            if sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0


def read_frame(sock: socket.socket, should_stop=None) -> tuple[Kind, int, int, bytes]:
    """Read one non-data frame: -> (kind, index, check, payload)."""
    kind, _flags, length, index, check = decode_header(recv_exact(sock, HEADER_SIZE, should_stop))
    payload = recv_exact(sock, length, should_stop)
    return kind, index, check, payload
