"""Challenge-response authentication of a migration data channel.

Both ends hold the per-migration secret (32 random bytes from the transfer Secret) and
the migration id. The secret never crosses the wire; each side proves it holds it by an
HMAC-SHA256 over fresh nonces from BOTH sides and the migration id, so a recorded
handshake cannot be replayed and a key for one migration cannot open another's channel::

    target -> source  HELLO     b"FERRY-AUTH/1" | server_nonce(32)
    source -> target  CLAIM     client_nonce(32) | u16 len | migration_id | mac_c(32)
                      mac_c = HMAC(secret, "ferry-client" | server_nonce | client_nonce | id)
    target -> source  ACCEPT    b"OK" | mac_s(32)
                      mac_s = HMAC(secret, "ferry-server" | client_nonce | server_nonce | id)

A target that cannot verify ``mac_c`` (or sees another migration id) closes the
connection without answering; a source that cannot verify ``mac_s`` closes too.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct

from ferry.transfer.framing import recv_exact

PROTOCOL = b"FERRY-AUTH/1"
NONCE_SIZE = 32
MAC_SIZE = 32
MAX_ID_LEN = 253


class AuthError(Exception):
    """The peer failed (or refused) authentication."""


def _mac(secret: bytes, label: bytes, first: bytes, second: bytes, migration_id: bytes) -> bytes:
    msg = label + b"\0" + first + second + struct.pack("!H", len(migration_id)) + migration_id
    return hmac.new(secret, msg, hashlib.sha256).digest()


def _check_secret(secret: bytes) -> None:
    if not isinstance(secret, (bytes, bytearray)) or len(secret) < 16:
        raise ValueError("the transfer secret must be at least 16 bytes")


def server_handshake(sock: socket.socket, secret: bytes, migration_id: str, timeout: float = 10.0) -> None:
    """Target side. Returns when the peer proved it holds ``secret`` for
    ``migration_id``; raises AuthError otherwise (the caller closes the socket)."""
    _check_secret(secret)
    mid = migration_id.encode()
    old = sock.gettimeout()
    sock.settimeout(timeout)
    try:
        server_nonce = os.urandom(NONCE_SIZE)
        sock.sendall(PROTOCOL + server_nonce)
        try:
            client_nonce = recv_exact(sock, NONCE_SIZE)
            (id_len,) = struct.unpack("!H", recv_exact(sock, 2))
            if id_len > MAX_ID_LEN:
                raise AuthError("migration id too long")
            claimed = recv_exact(sock, id_len)
            mac_c = recv_exact(sock, MAC_SIZE)
        except (OSError, EOFError, ValueError) as e:
            raise AuthError(f"handshake incomplete: {e}") from None
        except Exception as e:  # FrameError / ConnectionClosed
            raise AuthError(f"handshake incomplete: {e}") from None
        expected = _mac(secret, b"ferry-client", server_nonce, client_nonce, mid)
        # compare the MAC first, in constant time, whatever id was claimed
        mac_ok = hmac.compare_digest(mac_c, expected)
        if not hmac.compare_digest(claimed, mid):
            raise AuthError("wrong migration id")
        if not mac_ok:
            raise AuthError("bad credentials")
        sock.sendall(b"OK" + _mac(secret, b"ferry-server", client_nonce, server_nonce, mid))
    finally:
        try:
            sock.settimeout(old)
        except OSError:
            pass


def client_handshake(sock: socket.socket, secret: bytes, migration_id: str, timeout: float = 10.0) -> None:
    """Source side. Returns when the target proved it holds ``secret``; raises AuthError."""
    _check_secret(secret)
    mid = migration_id.encode()
    if len(mid) > MAX_ID_LEN:
        raise ValueError("migration id too long")
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
        mac_c = _mac(secret, b"ferry-client", server_nonce, client_nonce, mid)
        sock.sendall(client_nonce + struct.pack("!H", len(mid)) + mid + mac_c)
        try:
            answer = recv_exact(sock, 2 + MAC_SIZE)
        except Exception:
            raise AuthError("target refused the credentials (connection closed)") from None
        expected = _mac(secret, b"ferry-server", client_nonce, server_nonce, mid)
        if answer[:2] != b"OK" or not hmac.compare_digest(answer[2:], expected):
            raise AuthError("target failed to prove it holds the migration secret")
    finally:
        try:
            sock.settimeout(old)
        except OSError:
            pass
