"""The byte stream under the frames of a migration's data channel: plain, or sealed.

After the handshake (``ferry.transfer.auth``) both ends wrap the socket in a channel and
send and receive every frame through it:

- ``PlainChannel``: the frames as they are (an explicit opt-out, ``FERRY_SIM_CHANNEL=plain``).
- ``SealedChannel`` (the default): every byte in AES-256-GCM records, so disk and memory
  cross the network encrypted and any change, replay, reordering or deletion of a record
  fails its tag. Keys come from the migration's transfer Secret through the handshake::

      keys = HKDF-SHA256(ikm = secret, salt = server_nonce | client_nonce,
                         info = "ferry-channel-v1 aes-256-gcm" | 0 | migration id)
           -> source->target key (32) | iv (12) | target->source key (32) | iv (12)

  Both nonces are fresh per connection, so every connection has its own keys. A record
  is ``u32 length`` (of what follows) then the ciphertext and its 16-byte tag; the length
  is the additional data and the GCM nonce is the direction's iv XOR the record's sequence
  number (implicit: both ends count), as in TLS 1.3.

  The sender cuts a frame into records that match how the receiver reads it (the header
  and hash list in one record, the data in ``RECORD_BYTES`` records), so the receiver
  decrypts each data record straight into the buffer it checks and writes from.

  Data frames are sealed in place on both ends (``data_views``/``send_data`` and
  ``recv_data``): the source (with ``preadv`` reads) reads an extent straight into the record slots it will send
  (gaps left for each record's length and tag), hashes it there and encrypts it where it
  lies; the target receives a record into the buffer it checks and writes from and
  decrypts it there. One buffer per direction, no copy between a plaintext and a
  ciphertext buffer. A source reading through a mapping of the image passes the mapping
  as ``send_data(..., src=)``: each record is then encrypted from the mapping into its
  slot (the copy out of the page cache and the encryption are one pass). (OpenSSL's EVP supports in == out; ``IN_PLACE`` checks once that
  this build of ``cryptography`` does it right and falls back to a scratch buffer if not.)

Kernel TLS would keep ``sendfile`` possible, but it needs ``CONFIG_TLS``
(``/proc/net/tls_stat``, ``TCP_ULP "tls"``); ``ktls_available()`` says whether this kernel
has it. ferry seals in user space (OpenSSL through ``cryptography``) either way; the
channel's ``name`` is what a migration reports as ``status.transfer.channel``.
"""

from __future__ import annotations

import os
import socket
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ferry.transfer import framing

PLAIN = "plain"
AES_256_GCM = "aes-256-gcm"
CHANNELS = (PLAIN, AES_256_GCM)

TAG_SIZE = 16
RECORD_HEADER = struct.Struct("!I")
# Data goes in records of this many plaintext bytes (what the target checks and writes
# at a time: see ferry.transfer.target.RECV_CHUNK_BYTES); smaller parts of one send
# (a frame header and its hash list) share a record.
RECORD_BYTES = 256 << 10
SMALL_PART = 64 << 10
MAX_RECORD = RECORD_BYTES + SMALL_PART + TAG_SIZE  # longest record a peer may send
_KDF_LABEL = b"ferry-channel-v1 " + AES_256_GCM.encode() + b"\0"


def ktls_available() -> bool:
    """True if this kernel offers kernel TLS (CONFIG_TLS: the ``tls`` ULP)."""
    if os.path.exists("/proc/net/tls_stat"):
        return True
    try:
        with open("/proc/sys/net/ipv4/tcp_available_ulp") as f:
            return "tls" in f.read().split()
    except OSError:
        return False


def _in_place_works() -> bool:
    """True if AES-GCM seals and opens correctly with input and output the same memory."""
    try:
        aead, nonce, aad = AESGCM(bytes(range(32))), bytes(12), b"ferry"
        pt = bytes(range(256)) * 3
        want = aead.encrypt(nonce, pt, aad)
        buf = bytearray(len(pt) + TAG_SIZE)
        mv = memoryview(buf)
        mv[: len(pt)] = pt
        aead.encrypt_into(nonce, mv[: len(pt)], aad, mv)
        if bytes(buf) != want:
            return False
        aead.decrypt_into(nonce, mv, aad, mv[: len(pt)])
        return bytes(mv[: len(pt)]) == pt
    except Exception:  # noqa: BLE001 - any refusal means: not in place
        return False


IN_PLACE = _in_place_works()


class PlainChannel:
    """Frames straight on the socket."""

    name = PLAIN

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._data = bytearray(0)
        self._rdata = bytearray(0)

    def send_parts(self, parts: list) -> None:
        framing.send_parts(self.sock, parts)

    # data frames: the source reads an extent into data_views(), then send_data() sends it
    def data_views(self, nbytes: int) -> list[memoryview]:
        if len(self._data) < nbytes:
            self._data = bytearray(nbytes)
        return [memoryview(self._data)[:nbytes]]

    def send_data(self, head: bytes, hashes: bytes, nbytes: int, src=None) -> None:
        """Send a data frame: its data from ``data_views(nbytes)``, or from ``src`` (the
        source's mapping of the image: sendmsg straight from it, no copy in user space)."""
        framing.send_parts(self.sock, [head, hashes, memoryview(self._data)[:nbytes] if src is None else src])

    def recv_data(self, n: int, should_stop=None, into=None) -> memoryview:
        """The next ``n`` bytes, at the start of ``into`` (at least ``n + TAG_SIZE`` bytes) or
        in a buffer of the channel's (valid until the next call)."""
        if into is not None:
            view = memoryview(into)[:n]
        else:
            if len(self._rdata) < n:
                self._rdata = bytearray(n)
            view = memoryview(self._rdata)[:n]
        framing.recv_exact_into(self.sock, view, should_stop)
        return view

    def recv_into(self, view: memoryview, should_stop=None) -> None:
        framing.recv_exact_into(self.sock, view, should_stop)

    def recv_exact(self, n: int, should_stop=None) -> bytes:
        buf = bytearray(n)
        if n:
            self.recv_into(memoryview(buf), should_stop)
        return bytes(buf)


def derive_keys(secret: bytes, server_nonce: bytes, client_nonce: bytes, migration_id: str) -> tuple[bytes, bytes, bytes, bytes]:
    """-> (source->target key, iv, target->source key, iv) for one connection."""
    okm = HKDF(algorithm=hashes.SHA256(), length=2 * (32 + 12), salt=server_nonce + client_nonce,
               info=_KDF_LABEL + migration_id.encode()).derive(bytes(secret))
    return okm[:32], okm[32:44], okm[44:76], okm[76:88]


class _Direction:
    __slots__ = ("aead", "iv", "seq")

    def __init__(self, key: bytes, iv: bytes):
        self.aead = AESGCM(key)
        self.iv = int.from_bytes(iv, "big")
        self.seq = 0

    def nonce(self) -> bytes:
        n = (self.iv ^ self.seq).to_bytes(12, "big")
        self.seq += 1
        return n


class SealedChannel:
    """Frames in AES-256-GCM records (see the module docstring)."""

    name = AES_256_GCM
    # Sealed bytes are sent once this many wait (or the frame ends): the read buffer, the
    # sealed copy and what the kernel copies from stay in the CPU cache. (Sealing a whole
    # 1 MiB frame before one sendmsg cost more: tests/perf/bench_dataplane_ideas.py.)
    FLUSH_BYTES = 2 * (RECORD_BYTES + RECORD_HEADER.size + TAG_SIZE)

    def __init__(self, sock: socket.socket, send_key: bytes, send_iv: bytes, recv_key: bytes, recv_iv: bytes):
        self.sock = sock
        self._tx = _Direction(send_key, send_iv)
        self._rx = _Direction(recv_key, recv_iv)
        self._out = bytearray(self.FLUSH_BYTES + SMALL_PART + RECORD_BYTES)
        self._head = bytearray(RECORD_HEADER.size)
        self._ct = bytearray(RECORD_BYTES + TAG_SIZE)
        self._pt = bytearray(RECORD_BYTES)
        self._pt_pos = self._pt_end = 0  # plaintext of the last record not consumed yet
        self._slots = bytearray(0)  # data records sealed in place: [length | data | tag] ...
        self._small = bytearray(RECORD_HEADER.size + SMALL_PART + TAG_SIZE)
        self._scratch = bytearray(0 if IN_PLACE else RECORD_BYTES + TAG_SIZE)
        self._rdata = bytearray(RECORD_BYTES + TAG_SIZE)
        self._copy = bytearray(0)

    @classmethod
    def for_source(cls, sock: socket.socket, secret: bytes, server_nonce: bytes, client_nonce: bytes,
                   migration_id: str) -> SealedChannel:
        k_st, iv_st, k_ts, iv_ts = derive_keys(secret, server_nonce, client_nonce, migration_id)
        return cls(sock, k_st, iv_st, k_ts, iv_ts)

    @classmethod
    def for_target(cls, sock: socket.socket, secret: bytes, server_nonce: bytes, client_nonce: bytes,
                   migration_id: str) -> SealedChannel:
        k_st, iv_st, k_ts, iv_ts = derive_keys(secret, server_nonce, client_nonce, migration_id)
        return cls(sock, k_ts, iv_ts, k_st, iv_st)

    # --- sending ---------------------------------------------------------------

    def send_parts(self, parts: list) -> None:
        """Seal ``parts`` (one frame) into records and send them (a sendmsg per
        ``FLUSH_BYTES`` of sealed records)."""
        records: list[memoryview] = []
        for p in parts:
            mv = memoryview(p).cast("B")
            if len(mv) < SMALL_PART:
                records.append(mv)  # merged with its small neighbours below
            else:
                records.extend(mv[o : o + RECORD_BYTES] for o in range(0, len(mv), RECORD_BYTES))
        pieces: list = []
        small: list[memoryview] = []
        for r in records:
            if len(r) < SMALL_PART:
                small.append(r)
                continue
            if small:
                pieces.append(b"".join(small))
                small = []
            pieces.append(r)
        if small:
            pieces.append(b"".join(small))
        need = min(sum(len(x) + RECORD_HEADER.size + TAG_SIZE for x in pieces),
                   self.FLUSH_BYTES + max(len(x) for x in pieces) + RECORD_HEADER.size + TAG_SIZE)
        if len(self._out) < need:
            self._out = bytearray(need)
        out = memoryview(self._out)
        pos = 0
        for pt in pieces:
            n = len(pt) + TAG_SIZE
            if pos and pos + RECORD_HEADER.size + n > self.FLUSH_BYTES:
                framing.send_parts(self.sock, [out[:pos]])
                pos = 0
            RECORD_HEADER.pack_into(out, pos, n)
            head = bytes(out[pos : pos + RECORD_HEADER.size])
            self._tx.aead.encrypt_into(self._tx.nonce(), pt, head, out[pos + RECORD_HEADER.size : pos + RECORD_HEADER.size + n])
            pos += RECORD_HEADER.size + n
        if pos:
            framing.send_parts(self.sock, [out[:pos]])

    _SLOT = RECORD_HEADER.size + RECORD_BYTES + TAG_SIZE

    def data_views(self, nbytes: int) -> list[memoryview]:
        """Where the source puts a data frame's ``nbytes``: one view per record, each
        between the gaps for its record's length and tag (``send_data`` seals them there)."""
        k = -(-nbytes // RECORD_BYTES)
        if len(self._slots) < k * self._SLOT:
            self._slots = bytearray(k * self._SLOT)
        mv = memoryview(self._slots)
        h = RECORD_HEADER.size
        return [mv[i * self._SLOT + h : i * self._SLOT + h + min(RECORD_BYTES, nbytes - i * RECORD_BYTES)]
                for i in range(k)]

    def send_data(self, head: bytes, hashes: bytes, nbytes: int, src=None) -> None:
        """Send a data frame whose data is in ``data_views(nbytes)``: the header and hash
        list in one record, then each data record sealed where it lies; a sendmsg per
        ``FLUSH_BYTES`` (the same records ``send_parts`` would make). With ``src`` (the
        source's mapping of the image) each record is sealed from ``src`` into its slot:
        the copy into the slot is the encryption itself."""
        h = RECORD_HEADER.size
        if nbytes < SMALL_PART:  # a small frame: one record, as send_parts cuts it
            self.send_parts([head, hashes, memoryview(self._slots)[h : h + nbytes] if src is None else src])
            return
        if src is not None:
            k = -(-nbytes // RECORD_BYTES)
            if len(self._slots) < k * self._SLOT:
                self._slots = bytearray(k * self._SLOT)
        small = head + hashes
        if len(small) >= SMALL_PART:  # a hash list this long does not happen with 1 MiB extents
            self.send_parts([head, hashes])
            pending, pos = [], 0
        else:
            sv = memoryview(self._small)
            n = len(small) + TAG_SIZE
            RECORD_HEADER.pack_into(sv, 0, n)
            self._tx.aead.encrypt_into(self._tx.nonce(), small, bytes(sv[: RECORD_HEADER.size]),
                                       sv[RECORD_HEADER.size : RECORD_HEADER.size + n])
            pending, pos = [sv[: RECORD_HEADER.size + n]], RECORD_HEADER.size + n
        mv = memoryview(self._slots)
        for i in range(-(-nbytes // RECORD_BYTES)):
            plen = min(RECORD_BYTES, nbytes - i * RECORD_BYTES)
            rec = mv[i * self._SLOT : i * self._SLOT + h + plen + TAG_SIZE]
            if pending and pos + len(rec) > self.FLUSH_BYTES:
                framing.send_parts(self.sock, pending)
                pending, pos = [], 0
            RECORD_HEADER.pack_into(rec, 0, plen + TAG_SIZE)
            aad = bytes(rec[:h])
            if src is not None:
                o = i * RECORD_BYTES
                self._tx.aead.encrypt_into(self._tx.nonce(), src[o : o + plen], aad, rec[h:])
            elif IN_PLACE:
                self._tx.aead.encrypt_into(self._tx.nonce(), rec[h : h + plen], aad, rec[h:])
            else:
                out = memoryview(self._scratch)[: plen + TAG_SIZE]
                self._tx.aead.encrypt_into(self._tx.nonce(), rec[h : h + plen], aad, out)
                rec[h:] = out
            pending.append(rec)
            pos += len(rec)
        if pending:
            framing.send_parts(self.sock, pending)

    # --- receiving -------------------------------------------------------------

    def recv_data(self, n: int, should_stop=None, into=None) -> memoryview:
        """The next ``n`` plaintext bytes, at the start of ``into`` (a writable buffer of at least
        ``n + TAG_SIZE`` bytes: the target's page-aligned write buffers) or in a buffer of the channel's (valid
        until the next call). A record of exactly ``n`` bytes (every data record the sender cut
        for this read) is received into that buffer and decrypted where it lies."""
        if self._pt_pos < self._pt_end or not IN_PLACE:
            return self._recv_data_copy(n, should_stop, into)
        framing.recv_exact_into(self.sock, memoryview(self._head), should_stop)
        (length,) = RECORD_HEADER.unpack(self._head)
        if not TAG_SIZE <= length <= MAX_RECORD:
            raise framing.FrameError(f"sealed record of {length} bytes")
        in_into = into is not None and len(into) >= length
        if in_into:
            rec = memoryview(into)[:length]
        else:
            if len(self._rdata) < length:
                self._rdata = bytearray(length)
            rec = memoryview(self._rdata)[:length]
        framing.recv_exact_into(self.sock, rec, should_stop)
        plen = length - TAG_SIZE
        try:
            self._rx.aead.decrypt_into(self._rx.nonce(), rec, bytes(self._head), rec[:plen])
        except InvalidTag:
            raise framing.ChecksumError("sealed record failed authentication (altered, replayed or not from the peer)") from None
        if plen == n and (into is None or in_into):
            return rec[:plen]
        # a record of another size (not what a ferry source sends for data): hand out what
        # was asked for, keep the rest for the next read
        if len(self._pt) < plen:
            self._pt = bytearray(plen)
        self._pt[:plen] = rec[:plen]
        self._pt_pos, self._pt_end = 0, plen
        return self._recv_data_copy(n, should_stop, into)

    def _recv_data_copy(self, n: int, should_stop=None, into=None) -> memoryview:
        """Small frames (their data shares a record with the header) and reads that do not
        match the records: through ``recv_into``, into ``into`` or a buffer kept for it."""
        if into is not None:
            view = memoryview(into)[:n]
        else:
            if len(self._copy) < n:
                self._copy = bytearray(n)
            view = memoryview(self._copy)[:n]
        self.recv_into(view, should_stop)
        return view

    def recv_into(self, view: memoryview, should_stop=None) -> None:
        """Fill ``view`` with plaintext; a record that fits is decrypted straight into it."""
        n, pos = len(view), 0
        while pos < n:
            if self._pt_pos < self._pt_end:
                k = min(n - pos, self._pt_end - self._pt_pos)
                view[pos : pos + k] = memoryview(self._pt)[self._pt_pos : self._pt_pos + k]
                self._pt_pos += k
                pos += k
                continue
            framing.recv_exact_into(self.sock, memoryview(self._head), should_stop)
            (length,) = RECORD_HEADER.unpack(self._head)
            if not TAG_SIZE <= length <= MAX_RECORD:
                raise framing.FrameError(f"sealed record of {length} bytes")
            if len(self._ct) < length:
                self._ct = bytearray(length)
            ct = memoryview(self._ct)[:length]
            framing.recv_exact_into(self.sock, ct, should_stop)
            plen = length - TAG_SIZE
            if plen <= n - pos:
                dst = view[pos : pos + plen]
                pos += plen
            else:
                if len(self._pt) < plen:
                    self._pt = bytearray(plen)
                dst = memoryview(self._pt)[:plen]
                self._pt_pos, self._pt_end = 0, plen
            try:
                self._rx.aead.decrypt_into(self._rx.nonce(), ct, bytes(self._head), dst)
            except InvalidTag:
                self._pt_pos = self._pt_end = 0
                raise framing.ChecksumError("sealed record failed authentication (altered, replayed or not from the peer)") from None

    def recv_exact(self, n: int, should_stop=None) -> bytes:
        buf = bytearray(n)
        if n:
            self.recv_into(memoryview(buf), should_stop)
        return bytes(buf)


def read_frame(chan, should_stop=None) -> tuple[framing.Kind, int, int, bytes]:
    """Read one non-data frame from a channel: -> (kind, index, check, payload)."""
    kind, _flags, length, index, check = framing.decode_header(chan.recv_exact(framing.HEADER_SIZE, should_stop))
    payload = chan.recv_exact(length, should_stop)
    return kind, index, check, payload
