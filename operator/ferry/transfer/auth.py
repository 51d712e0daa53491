"""Challenge-response authentication of a migration data channel, and the choice of channel.

Both ends hold the per-migration secret (32 random bytes from the transfer Secret) and
the migration id. The secret never crosses the wire; each side proves it holds it by an
HMAC-SHA256 over fresh nonces from BOTH sides, the migration id and the channel the
source asks for, so a recorded handshake cannot be replayed, a key for one migration
cannot open another's channel, and nobody without the key can turn an encrypted channel
into a plain one::

    target -> source  HELLO     b"FERRY-AUTH/1" | server_nonce(32)
    source -> target  CLAIM     client_nonce(32) | u16 (0x8000 | len) | migration_id | u8 channel | mac_c(32)
                      mac_c = HMAC(secret, "ferry-client-2" | server_nonce | client_nonce | id | channel)
    target -> source  ACCEPT    b"OK" | mac_s(32)
                      mac_s = HMAC(secret, "ferry-server-2" | client_nonce | server_nonce | id | channel)
                 or   REFUSE    b"NO" | HMAC(secret, "ferry-refuse-2" | ...): a plain channel the target does not allow

``channel`` is 0 (plain) or 1 (AES-256-GCM, ``ferry.transfer.channel``). The high bit of
the length tells a target this version from the first one (FERRY-AUTH/1 sources send the
length alone, no channel byte, labels "ferry-client"/"ferry-server", and are plain): a
target takes such a source only where plain channels are allowed.

A target that cannot verify ``mac_c`` (or sees another migration id) closes the
connection without answering; a source that cannot verify the answer closes too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import socket
import struct

from ferry.transfer.channel import AES_256_GCM, PLAIN, PlainChannel, SealedChannel
from ferry.transfer.framing import recv_exact

PROTOCOL = b"FERRY-AUTH/1"
NONCE_SIZE = 32
MAC_SIZE = 32
MAX_ID_LEN = 253
V2 = 0x8000
CHANNEL_CODES = {PLAIN: 0, AES_256_GCM: 1}
CHANNEL_NAMES = {v: k for k, v in CHANNEL_CODES.items()}


class AuthError(Exception):
    """The peer failed (or refused) authentication."""


@dataclasses.dataclass(frozen=True)
class Handshake:
    """What an authenticated handshake agreed on."""

    server_nonce: bytes
    client_nonce: bytes
    channel: str  # PLAIN or AES_256_GCM
    version: int = 2

    def open(self, sock: socket.socket, secret: bytes, migration_id: str, role: str):
        """The channel to send and receive frames through (role: "source" or "target")."""
        if self.channel == PLAIN:
            return PlainChannel(sock)
        make = SealedChannel.for_source if role == "source" else SealedChannel.for_target
        return make(sock, secret, self.server_nonce, self.client_nonce, migration_id)


def _mac(secret: bytes, label: bytes, first: bytes, second: bytes, migration_id: bytes, tail: bytes = b"") -> bytes:
    msg = label + b"\0" + first + second + struct.pack("!H", len(migration_id)) + migration_id + tail
    return hmac.new(secret, msg, hashlib.sha256).digest()


def _check_secret(secret: bytes) -> None:
    if not isinstance(secret, (bytes, bytearray)) or len(secret) < 16:
        raise ValueError("the transfer secret must be at least 16 bytes")


def server_handshake(sock: socket.socket, secret: bytes, migration_id: str, timeout: float = 10.0,
                     allow_plain: bool = False) -> Handshake:
    """Target side. Returns when the peer proved it holds ``secret`` for ``migration_id``
    and asked for a channel this target takes (encrypted always, plain only with
    ``allow_plain``); raises AuthError otherwise (the caller closes the socket)."""
    _check_secret(secret)
    mid = migration_id.encode()
    old = sock.gettimeout()
    sock.settimeout(timeout)
    try:
        server_nonce = os.urandom(NONCE_SIZE)
        sock.sendall(PROTOCOL + server_nonce)
        try:
            client_nonce = recv_exact(sock, NONCE_SIZE)
            (raw_len,) = struct.unpack("!H", recv_exact(sock, 2))
            version = 2 if raw_len & V2 else 1
            id_len = raw_len & ~V2
            if id_len > MAX_ID_LEN:
                raise AuthError("migration id too long")
            claimed = recv_exact(sock, id_len)
            code = recv_exact(sock, 1) if version == 2 else b"\0"
            mac_c = recv_exact(sock, MAC_SIZE)
        except AuthError:
            raise
        except Exception as e:  # OSError, EOF, FrameError / ConnectionClosed
            raise AuthError(f"handshake incomplete: {e}") from None
        if version == 2:
            expected = _mac(secret, b"ferry-client-2", server_nonce, client_nonce, mid, code)
        else:
            expected = _mac(secret, b"ferry-client", server_nonce, client_nonce, mid)
        # compare the MAC first, in constant time, whatever id was claimed
        mac_ok = hmac.compare_digest(mac_c, expected)
        if not hmac.compare_digest(claimed, mid):
            raise AuthError("wrong migration id")
        if not mac_ok:
            raise AuthError("bad credentials")
        channel = CHANNEL_NAMES.get(code[0])
        if channel is None:
            raise AuthError(f"unknown channel {code[0]}")
        if channel == PLAIN and not allow_plain:
            if version == 2:
                sock.sendall(b"NO" + _mac(secret, b"ferry-refuse-2", client_nonce, server_nonce, mid, code))
            raise AuthError("the source asked for a plain channel and this target allows encrypted ones only"
                            + ("" if version == 2 else " (a FERRY-AUTH/1 source)"))
        if version == 2:
            sock.sendall(b"OK" + _mac(secret, b"ferry-server-2", client_nonce, server_nonce, mid, code))
        else:
            sock.sendall(b"OK" + _mac(secret, b"ferry-server", client_nonce, server_nonce, mid))
        return Handshake(server_nonce, client_nonce, channel, version)
    finally:
        try:
            sock.settimeout(old)
        except OSError:
            pass


def client_handshake(sock: socket.socket, secret: bytes, migration_id: str, timeout: float = 10.0,
                     channel: str = AES_256_GCM) -> Handshake:
    """Source side. Returns when the target proved it holds ``secret`` and took the
    ``channel`` asked for; raises AuthError."""
    _check_secret(secret)
    if channel not in CHANNEL_CODES:
        raise ValueError(f"unknown channel {channel!r}")
    mid = migration_id.encode()
    if len(mid) > MAX_ID_LEN:
        raise ValueError("migration id too long")
    code = bytes([CHANNEL_CODES[channel]])
    old = sock.gettimeout()
    sock.settimeout(timeout)
    try:
        try:
            hello = recv_exact(sock, len(PROTOCOL) + NONCE_SIZE)
        except Exception as e:
            raise AuthError(f"no handshake from target: {e}") from None
        if hello[: len(PROTOCOL)] != PROTOCOL:
            raise AuthError("target speaks another protocol")
        server_nonce = hello[len(PROTOCOL) :]
        client_nonce = os.urandom(NONCE_SIZE)
        mac_c = _mac(secret, b"ferry-client-2", server_nonce, client_nonce, mid, code)
        sock.sendall(client_nonce + struct.pack("!H", V2 | len(mid)) + mid + code + mac_c)
        try:
            answer = recv_exact(sock, 2 + MAC_SIZE)
        except Exception:
            raise AuthError("target refused the credentials (connection closed: a wrong key, or a target "
                            "older than channel encryption)") from None
        if answer[:2] == b"NO" and hmac.compare_digest(
                answer[2:], _mac(secret, b"ferry-refuse-2", client_nonce, server_nonce, mid, code)):
            raise AuthError("the target allows encrypted channels only (FERRY_SIM_CHANNEL there is not plain)")
        expected = _mac(secret, b"ferry-server-2", client_nonce, server_nonce, mid, code)
        if answer[:2] != b"OK" or not hmac.compare_digest(answer[2:], expected):
            raise AuthError("target failed to prove it holds the migration secret")
        return Handshake(server_nonce, client_nonce, channel)
    finally:
        try:
            sock.settimeout(old)
        except OSError:
            pass
