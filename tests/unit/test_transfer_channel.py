"""The sealed (AES-256-GCM) and plain channels under the data channel's frames."""

import os
import socket
import threading

import pytest

from ferry.transfer import channel, framing
from ferry.transfer.channel import RECORD_BYTES, PlainChannel, SealedChannel
from ferry.transfer.framing import Kind

SECRET = os.urandom(32)
SN, CN = os.urandom(32), os.urandom(32)


class Wire:
    """Source and target channels over a socket pair, the bytes in between recorded."""

    def __init__(self, mid="lm-1", target_mid=None, tamper=None):
        self.a, self.b = socket.socketpair()
        self.src = SealedChannel.for_source(self.a, SECRET, SN, CN, mid)
        self.dst = SealedChannel.for_target(self.b, SECRET, SN, CN, target_mid or mid)


def send_in_thread(fn):
    t = threading.Thread(target=fn)
    t.start()
    return t


def wire_of(send, b: socket.socket) -> bytearray:
    """Everything ``send`` (run in a thread, ending with a shutdown) puts on the wire to ``b``."""
    t = send_in_thread(send)
    wire = bytearray()
    while chunk := b.recv(1 << 16):
        wire += chunk
    t.join(5)
    return wire


def frame_parts(nbytes=RECORD_BYTES * 4 + 4096, block=4096):
    data = os.urandom(nbytes)
    hl = os.urandom(16 * (nbytes // block))
    return [framing.data_header(Kind.MEMORY, 7, hl, len(data)), hl, data]


def test_a_frame_crosses_sealed_and_reads_back_as_sent():
    w = Wire()
    parts = frame_parts()
    t = send_in_thread(lambda: (w.src.send_parts(parts), w.src.send_parts([framing.control_frame(Kind.DONE, {"x": 1})])))
    head = w.dst.recv_exact(framing.HEADER_SIZE)
    assert head == parts[0]
    assert w.dst.recv_exact(len(parts[1])) == parts[1]
    got = bytearray(len(parts[2]))
    mv = memoryview(got)
    for o in range(0, len(got), RECORD_BYTES):  # as the target reads: chunk by chunk
        w.dst.recv_into(mv[o : o + RECORD_BYTES])
    assert bytes(got) == parts[2]
    kind, _i, check, payload = channel.read_frame(w.dst)
    assert kind is Kind.DONE and framing.parse_control(payload, check) == {"x": 1}
    t.join(5)


def test_what_crosses_the_wire_is_not_the_data():
    a, b = socket.socketpair()
    src = SealedChannel.for_source(a, SECRET, SN, CN, "lm-1")
    secret_page = b"customer memory " * 4096
    t = send_in_thread(lambda: (src.send_parts([secret_page]), a.shutdown(socket.SHUT_WR)))
    wire = bytearray()
    while chunk := b.recv(1 << 16):
        wire += chunk
    t.join(5)
    assert len(wire) > len(secret_page)
    assert b"customer memory" not in wire


def test_reads_in_any_sizes_get_the_same_bytes():
    w = Wire()
    blob = os.urandom(3 * RECORD_BYTES + 12345)
    t = send_in_thread(lambda: (w.src.send_parts([b"head"]), w.src.send_parts([blob]), w.src.send_parts([b"tail"])))
    out = bytearray()
    sizes = [1, 3, 7000, RECORD_BYTES + 5, 100, 2 * RECORD_BYTES]
    want = 4 + len(blob) + 4
    k = 0
    while len(out) < want:
        n = min(sizes[k % len(sizes)], want - len(out))
        out += w.dst.recv_exact(n)
        k += 1
    assert bytes(out) == b"head" + blob + b"tail"
    t.join(5)


def _flip(wire: bytearray, at: int) -> bytearray:
    wire = bytearray(wire)
    wire[at] ^= 0x01
    return wire


def _sealed_bytes(parts_list, mid="lm-1"):
    a, b = socket.socketpair()
    src = SealedChannel.for_source(a, SECRET, SN, CN, mid)
    t = send_in_thread(lambda: ([src.send_parts(p) for p in parts_list], a.shutdown(socket.SHUT_WR)))
    wire = bytearray()
    while chunk := b.recv(1 << 16):
        wire += chunk
    t.join(5)
    return wire


def _receive(wire: bytes, n: int, mid="lm-1"):
    a, b = socket.socketpair()
    dst = SealedChannel.for_target(b, SECRET, SN, CN, mid)
    t = send_in_thread(lambda: (a.sendall(wire), a.shutdown(socket.SHUT_WR)))
    try:
        return dst.recv_exact(n)
    finally:
        t.join(5)


@pytest.mark.parametrize("where", ["length", "body", "tag"])
def test_a_changed_bit_anywhere_fails_authentication(where):
    payload = os.urandom(100_000)
    wire = _sealed_bytes([[payload]])
    at = {"length": 3, "body": 4 + 5000, "tag": len(wire) - 1}[where]
    with pytest.raises(framing.FrameError):  # ChecksumError, or a length out of range
        _receive(_flip(wire, at), len(payload))
    assert _receive(wire, len(payload)) == payload


def test_replayed_reordered_or_dropped_records_fail():
    one, two = os.urandom(1000), os.urandom(1000)
    wire = _sealed_bytes([[one], [two]])
    r = 4 + 1000 + 16
    first, second = bytes(wire[:r]), bytes(wire[r:])
    assert _receive(first + second, 2000) == one + two
    for bad in (first + first, second + first):  # replay, reorder
        with pytest.raises(framing.ChecksumError):
            _receive(bad, 2000)
    with pytest.raises(framing.ChecksumError):  # the first dropped
        _receive(second, 1000)


def test_another_migration_or_another_connection_has_other_keys():
    payload = os.urandom(1000)
    wire = _sealed_bytes([[payload]])
    with pytest.raises(framing.ChecksumError):
        _receive(wire, len(payload), mid="lm-2")
    a, b = socket.socketpair()
    dst = SealedChannel.for_target(b, SECRET, os.urandom(32), CN, "lm-1")  # another handshake's nonce
    a.sendall(wire)
    with pytest.raises(framing.ChecksumError):
        dst.recv_exact(len(payload))
    # each direction has its own key: the source cannot read its own records back
    a, b = socket.socketpair()
    src2 = SealedChannel.for_source(b, SECRET, SN, CN, "lm-1")
    a.sendall(wire)
    with pytest.raises(framing.ChecksumError):
        src2.recv_exact(len(payload))


def test_an_oversized_record_is_refused_before_it_is_read():
    a, b = socket.socketpair()
    dst = SealedChannel.for_target(b, SECRET, SN, CN, "lm-1")
    a.sendall((channel.MAX_RECORD + 1).to_bytes(4, "big"))
    with pytest.raises(framing.FrameError, match="record"):
        dst.recv_exact(10)


def test_plain_channel_passes_frames_through():
    a, b = socket.socketpair()
    src, dst = PlainChannel(a), PlainChannel(b)
    parts = frame_parts(8192)
    src.send_parts(parts)
    assert dst.recv_exact(sum(len(p) for p in parts)) == b"".join(parts)


def test_ktls_probe_answers():
    assert channel.ktls_available() in (True, False)


def test_the_setting_defaults_to_encrypted_and_takes_plain_as_an_opt_out():
    from ferry.settings import Settings, SettingsError

    assert Settings.from_env({}).sim_channel == "aes-256-gcm"
    assert Settings.from_env({"FERRY_SIM_CHANNEL": "plain"}).sim_channel == "plain"
    with pytest.raises(SettingsError, match="FERRY_SIM_CHANNEL"):
        Settings.from_env({"FERRY_SIM_CHANNEL": "rot13"})


def test_the_sim_driver_asks_for_the_channel_of_its_setting(tmp_path):
    from ferry.agent.main import make_driver
    from ferry.settings import Settings

    assert make_driver("sim", str(tmp_path), Settings.from_env({})).channel == "aes-256-gcm"
    assert make_driver("sim", str(tmp_path), Settings.from_env({"FERRY_SIM_CHANNEL": "plain"})).channel == "plain"


# --- data frames sealed in place (data_views / send_data / recv_data) -----------------------


def _in_place_wire(parts_list, monkeypatch=None, in_place=True, mid="lm-1"):
    """The bytes a source puts on the wire for data frames sent the in-place way."""
    if monkeypatch is not None:
        monkeypatch.setattr(channel, "IN_PLACE", in_place)
    a, b = socket.socketpair()
    src = SealedChannel.for_source(a, SECRET, SN, CN, mid)

    def send():
        for head, hl, data in parts_list:
            views = src.data_views(len(data))
            o = 0
            for v in views:
                v[:] = data[o : o + len(v)]
                o += len(v)
            src.send_data(head, hl, len(data))
        a.shutdown(socket.SHUT_WR)

    return wire_of(send, b)


@pytest.mark.parametrize("nbytes", [RECORD_BYTES * 4, RECORD_BYTES * 2 + 8192, 4096])
def test_sealing_in_place_puts_the_same_records_on_the_wire(nbytes, monkeypatch):
    frames = [frame_parts(nbytes), frame_parts(nbytes)]
    want = _sealed_bytes([list(p) for p in frames])  # through send_parts: plaintext copied into the sealed buffer
    assert _in_place_wire(frames) == want
    assert _in_place_wire(frames, monkeypatch, in_place=False) == want  # the fallback without in-place sealing


def _from_mapping_wire(parts_list, tmp_path):
    """The bytes a source puts on the wire for data frames sealed from a read-only mapping."""
    import mmap

    a, b = socket.socketpair()
    src = SealedChannel.for_source(a, SECRET, SN, CN, "lm-1")
    path = tmp_path / "image"
    path.write_bytes(b"".join(data for _, _, data in parts_list))
    fd = os.open(path, os.O_RDONLY)
    m = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)

    def send():
        o = 0
        with memoryview(m) as mv:
            for head, hl, data in parts_list:
                src.send_data(head, hl, len(data), mv[o : o + len(data)])
                o += len(data)
        a.shutdown(socket.SHUT_WR)

    wire = wire_of(send, b)
    m.close()
    os.close(fd)
    return wire


@pytest.mark.parametrize("nbytes", [RECORD_BYTES * 4, RECORD_BYTES * 2 + 8192, 4096])
def test_sealing_from_a_mapping_puts_the_same_records_on_the_wire(nbytes, tmp_path):
    # the source's mmap reads: each record encrypted from the mapping into its slot
    frames = [frame_parts(nbytes), frame_parts(nbytes)]
    assert _from_mapping_wire(frames, tmp_path) == _sealed_bytes([list(p) for p in frames])


def test_the_target_opens_data_records_in_place_and_gets_the_data():
    parts = frame_parts(RECORD_BYTES * 3 + 4096 * 5)
    wire = _in_place_wire([parts])
    a, b = socket.socketpair()
    dst = SealedChannel.for_target(b, SECRET, SN, CN, "lm-1")
    t = send_in_thread(lambda: (a.sendall(wire), a.shutdown(socket.SHUT_WR)))
    assert dst.recv_exact(framing.HEADER_SIZE) == parts[0]
    assert dst.recv_exact(len(parts[1])) == parts[1]
    got = bytearray()
    while len(got) < len(parts[2]):  # as the target reads: chunk by chunk, each in the channel's buffer
        got += dst.recv_data(min(RECORD_BYTES, len(parts[2]) - len(got)))
    t.join(5)
    assert bytes(got) == parts[2]


def test_reads_of_other_sizes_than_the_records_still_get_the_data():
    parts = frame_parts(RECORD_BYTES * 2)
    wire = _in_place_wire([parts])
    a, b = socket.socketpair()
    dst = SealedChannel.for_target(b, SECRET, SN, CN, "lm-1")
    t = send_in_thread(lambda: (a.sendall(wire), a.shutdown(socket.SHUT_WR)))
    dst.recv_exact(framing.HEADER_SIZE + len(parts[1]))
    sizes = [1000, RECORD_BYTES, 5, RECORD_BYTES]
    got = bytearray()
    for n in sizes:
        n = min(n, len(parts[2]) - len(got))
        got += dst.recv_data(n)
    t.join(5)
    assert bytes(got) == parts[2]


@pytest.mark.parametrize("where", ["data", "tag"])
def test_a_changed_bit_in_a_data_record_fails_before_the_data_is_handed_out(where):
    parts = frame_parts(RECORD_BYTES * 2)
    wire = _in_place_wire([parts])
    first_data = 4 + framing.HEADER_SIZE + len(parts[1]) + 16  # the first data record's length field
    at = {"data": first_data + 4 + 1000, "tag": first_data + 4 + RECORD_BYTES + 15}[where]
    a, b = socket.socketpair()
    dst = SealedChannel.for_target(b, SECRET, SN, CN, "lm-1")
    def send():
        try:
            a.sendall(_flip(wire, at))
        except OSError:
            pass  # the receiver stopped reading at the bad record and closed

    t = send_in_thread(send)
    dst.recv_exact(framing.HEADER_SIZE + len(parts[1]))
    with pytest.raises(framing.ChecksumError):
        dst.recv_data(RECORD_BYTES)
    b.close()
    t.join(5)


def test_plain_channel_data_frames_pass_through():
    a, b = socket.socketpair()
    src, dst = PlainChannel(a), PlainChannel(b)
    head, hl, data = frame_parts(RECORD_BYTES + 4096)
    (view,) = src.data_views(len(data))
    view[:] = data
    t = send_in_thread(lambda: src.send_data(head, hl, len(data)))
    assert dst.recv_exact(len(head) + len(hl)) == head + hl
    assert bytes(dst.recv_data(RECORD_BYTES)) + bytes(dst.recv_data(4096)) == data
    t.join(5)


@pytest.mark.parametrize("sizes", [[RECORD_BYTES, RECORD_BYTES, 4096], [1000, RECORD_BYTES, 5, RECORD_BYTES, 3091]])
def test_data_is_received_at_the_start_of_the_callers_buffer(sizes):
    # the target's page-aligned write buffers: each read's data lies at offset 0 of the
    # buffer it gave, whether the record matched the read (opened in place) or not (copied)
    import mmap

    parts = frame_parts(RECORD_BYTES * 2 + 4096)
    wire = _in_place_wire([parts])
    a, b = socket.socketpair()
    dst = SealedChannel.for_target(b, SECRET, SN, CN, "lm-1")
    t = send_in_thread(lambda: (a.sendall(wire), a.shutdown(socket.SHUT_WR)))
    dst.recv_exact(framing.HEADER_SIZE + len(parts[1]))
    got = bytearray()
    for n in sizes:
        n = min(n, len(parts[2]) - len(got))
        buf = mmap.mmap(-1, 2 * RECORD_BYTES)
        view = dst.recv_data(n, into=memoryview(buf)[100:])  # a slice, as the target gives
        assert len(view) == n and bytes(buf[100 : 100 + n]) == bytes(view)
        got += view
    t.join(5)
    assert bytes(got) == parts[2]


def test_plain_channel_receives_data_into_the_callers_buffer():
    import mmap

    a, b = socket.socketpair()
    src, dst = PlainChannel(a), PlainChannel(b)
    head, hl, data = frame_parts(RECORD_BYTES)
    (view,) = src.data_views(len(data))
    view[:] = data
    t = send_in_thread(lambda: src.send_data(head, hl, len(data)))
    dst.recv_exact(len(head) + len(hl))
    buf = mmap.mmap(-1, RECORD_BYTES + 4096)
    got = dst.recv_data(RECORD_BYTES, into=buf)
    assert got.obj is buf and bytes(buf[:RECORD_BYTES]) == data
    t.join(5)


def test_this_cryptography_seals_in_place():
    assert channel.IN_PLACE  # else every record costs a copy through a scratch buffer (still correct)
