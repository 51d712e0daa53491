"""Challenge-response authentication of the data channel."""

import os
import socket
import threading

import pytest

from ferry.transfer import auth

SECRET = os.urandom(32)


class _Recording(socket.socket):
    wire: bytearray

    def sendall(self, data, *args):
        self.wire.extend(data)
        return super().sendall(data, *args)


class Tap:
    """A socket pair whose bytes (both directions) are recorded."""

    def __init__(self):
        a, b = socket.socketpair()
        self.wire = bytearray()
        self.client = _Recording(fileno=a.detach())
        self.server = _Recording(fileno=b.detach())
        self.client.wire = self.server.wire = self.wire


def run_pair(server_secret, client_secret, server_id="lm-1", client_id="lm-1", channel="aes-256-gcm",
             allow_plain=False):
    tap = Tap()
    result = {}

    def server():
        try:
            result["server_hs"] = auth.server_handshake(tap.server, server_secret, server_id, timeout=5,
                                                        allow_plain=allow_plain)
            result["server"] = "ok"
        except auth.AuthError as e:
            result["server"] = e
            tap.server.close()  # what the target does: close the connection

    t = threading.Thread(target=server)
    t.start()
    try:
        result["client_hs"] = auth.client_handshake(tap.client, client_secret, client_id, timeout=5, channel=channel)
        result["client"] = "ok"
    except auth.AuthError as e:
        result["client"] = e
    t.join(5)
    return result, tap


def test_right_secret_authenticates_both_sides():
    result, tap = run_pair(SECRET, SECRET)
    assert (result["server"], result["client"]) == ("ok", "ok")
    # both ends agree on the channel and on the nonces its keys come from
    assert result["server_hs"] == result["client_hs"]
    assert result["client_hs"].channel == "aes-256-gcm"
    assert SECRET not in bytes(tap.wire), "the secret must never be on the wire"
    assert SECRET.hex().encode() not in bytes(tap.wire)


def test_wrong_secret_is_refused_and_connection_closed():
    result, tap = run_pair(SECRET, os.urandom(32))
    assert isinstance(result["server"], auth.AuthError)
    assert "bad credentials" in str(result["server"])
    assert isinstance(result["client"], auth.AuthError)
    # the server closed its end: the client sees EOF
    tap.client.settimeout(2)
    assert tap.client.recv(1) == b""


def test_other_migration_id_is_refused():
    result, _ = run_pair(SECRET, SECRET, server_id="lm-1", client_id="lm-2")
    assert isinstance(result["server"], auth.AuthError) and "migration id" in str(result["server"])
    assert isinstance(result["client"], auth.AuthError)


def test_client_refuses_a_target_without_the_secret():
    """Mutual: an impostor target that accepts anything cannot forge its proof."""
    c, s = socket.socketpair()

    def impostor():
        s.sendall(auth.PROTOCOL + os.urandom(32))
        s.recv(1024)
        s.sendall(b"OK" + os.urandom(32))

    t = threading.Thread(target=impostor)
    t.start()
    with pytest.raises(auth.AuthError, match="prove"):
        auth.client_handshake(c, SECRET, "lm-1", timeout=5)
    t.join()


def test_replayed_claim_fails_with_a_fresh_nonce():
    """A recorded client answer does not open a new connection (server nonce differs)."""
    result, tap = run_pair(SECRET, SECRET)
    assert result["client"] == "ok"
    wire = bytes(tap.wire)
    hello_len = len(auth.PROTOCOL) + auth.NONCE_SIZE
    claim = wire[hello_len : hello_len + 32 + 2 + len("lm-1") + 1 + 32]
    c, s = socket.socketpair()
    out = {}

    def server():
        try:
            auth.server_handshake(s, SECRET, "lm-1", timeout=5)
            out["r"] = "ok"
        except auth.AuthError as e:
            out["r"] = e

    t = threading.Thread(target=server)
    t.start()
    c.recv(hello_len)
    c.sendall(claim)
    t.join(5)
    assert isinstance(out["r"], auth.AuthError)


def test_garbage_and_silence_are_refused():
    c, s = socket.socketpair()
    c.sendall(b"GET / HTTP/1.0\r\n\r\n" + b"x" * 100)
    with pytest.raises(auth.AuthError):
        auth.server_handshake(s, SECRET, "lm-1", timeout=2)
    c2, s2 = socket.socketpair()
    with pytest.raises(auth.AuthError):
        auth.server_handshake(s2, SECRET, "lm-1", timeout=0.3)
    for x in (c, s, c2, s2):
        x.close()


def test_short_secret_rejected():
    a, b = socket.socketpair()
    with pytest.raises(ValueError):
        auth.client_handshake(a, b"short", "x")


def test_plain_channel_is_refused_unless_the_target_allows_it():
    result, _ = run_pair(SECRET, SECRET, channel="plain")
    assert isinstance(result["server"], auth.AuthError) and "plain" in str(result["server"])
    assert isinstance(result["client"], auth.AuthError) and "encrypted channels only" in str(result["client"])
    result, _ = run_pair(SECRET, SECRET, channel="plain", allow_plain=True)
    assert (result["server"], result["client"]) == ("ok", "ok")
    assert result["server_hs"].channel == result["client_hs"].channel == "plain"
    # a target that allows plain still takes an encrypted channel
    result, _ = run_pair(SECRET, SECRET, allow_plain=True)
    assert result["server_hs"].channel == "aes-256-gcm"


def test_the_channel_asked_for_cannot_be_changed_on_the_wire():
    """An attacker turning the channel byte from encrypted to plain breaks the MAC."""
    c, mitm_c = socket.socketpair()
    mitm_s, s = socket.socketpair()
    out = {}

    def server():
        try:
            out["r"] = auth.server_handshake(s, SECRET, "lm-1", timeout=5, allow_plain=True)
        except auth.AuthError as e:
            out["r"] = e
            s.close()

    def mitm():
        hello = mitm_s.recv(len(auth.PROTOCOL) + auth.NONCE_SIZE)
        mitm_c.sendall(hello)
        claim = bytearray(mitm_c.recv(1024))
        claim[32 + 2 + len("lm-1")] = 0  # aes-256-gcm -> plain
        mitm_s.sendall(bytes(claim))
        try:
            mitm_c.sendall(mitm_s.recv(1024))
        except OSError:
            pass
        mitm_c.close()

    threads = [threading.Thread(target=server), threading.Thread(target=mitm)]
    for t in threads:
        t.start()
    with pytest.raises(auth.AuthError):
        auth.client_handshake(c, SECRET, "lm-1", timeout=5)
    for t in threads:
        t.join(5)
    assert isinstance(out["r"], auth.AuthError) and "bad credentials" in str(out["r"])


def _v1_claim(secret, server_nonce, client_nonce, mid=b"lm-1"):
    mac = auth._mac(secret, b"ferry-client", server_nonce, client_nonce, mid)
    return client_nonce + len(mid).to_bytes(2, "big") + mid + mac


@pytest.mark.parametrize("allow_plain", [False, True])
def test_a_first_version_source_is_plain_and_taken_only_where_plain_is_allowed(allow_plain):
    c, s = socket.socketpair()
    out = {}

    def server():
        try:
            out["r"] = auth.server_handshake(s, SECRET, "lm-1", timeout=5, allow_plain=allow_plain)
        except auth.AuthError as e:
            out["r"] = e
            s.close()

    t = threading.Thread(target=server)
    t.start()
    hello = c.recv(len(auth.PROTOCOL) + auth.NONCE_SIZE)
    c.sendall(_v1_claim(SECRET, hello[len(auth.PROTOCOL):], os.urandom(32)))
    t.join(5)
    if allow_plain:
        assert out["r"].channel == "plain" and out["r"].version == 1
        assert c.recv(2) == b"OK"
    else:
        assert isinstance(out["r"], auth.AuthError) and "FERRY-AUTH/1" in str(out["r"])
        assert c.recv(1) == b""
