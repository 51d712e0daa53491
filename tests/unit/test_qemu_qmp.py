"""The QMP client against a scripted server on a unix socket."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import threading
import time

import pytest

from ferry.drivers.qemu.qmp import QMPClient, QMPConnectionError, QMPError


class FakeMonitor:
    """Greets, answers qmp_capabilities, then calls ``handler(msg, conn)`` per command."""

    def __init__(self, path: str, handler, greeting: dict | None = None):
        self.path = path
        self.handler = handler
        self.greeting = greeting or {"QMP": {"version": {"qemu": {"major": 7, "minor": 2}}, "capabilities": []}}
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(1)
        self.received: list[dict] = []
        self.fds: list[int] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        self.conn = conn
        conn.sendall(json.dumps(self.greeting).encode() + b"\r\n")
        buf = b""
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(conn, 65536, 4)
            except OSError:
                return
            if not data:
                return
            self.fds += fds
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                msg = json.loads(line)
                self.received.append(msg)
                if msg["execute"] == "qmp_capabilities":
                    self.send({"return": {}, "id": msg["id"]})
                else:
                    self.handler(msg, self)

    def send(self, msg: dict) -> None:
        self.conn.sendall(json.dumps(msg).encode() + b"\r\n")

    def close(self) -> None:
        try:
            self.conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.conn.close()
        self.server.close()


@pytest.fixture
def sock_path(tmp_path: pathlib.Path) -> str:
    return str(tmp_path / "qmp.sock")


def test_commands_events_and_errors(sock_path: str) -> None:
    def handler(msg: dict, mon: FakeMonitor) -> None:
        if msg["execute"] == "query-status":
            # an event may arrive before the reply
            mon.send({"event": "STOP", "data": {}, "timestamp": {"seconds": 1, "microseconds": 500000}})
            mon.send({"return": {"status": "paused"}, "id": msg["id"]})
        elif msg["execute"] == "cont":
            mon.send({"error": {"class": "GenericError", "desc": "no"}, "id": msg["id"]})

    mon = FakeMonitor(sock_path, handler)
    with QMPClient.connect(sock_path, timeout=2) as q:
        assert q.greeting["QMP"]["version"]["qemu"]["major"] == 7
        since = q.event_seq
        assert q.execute("query-status") == {"status": "paused"}
        ev = q.wait_event(lambda e: e.name == "STOP", timeout=2, since=since)
        assert ev is not None and ev.timestamp == 1.5
        assert q.wait_event(lambda e: e.name == "RESUME", timeout=0.1, since=since) is None
        with pytest.raises(QMPError) as err:
            q.execute("cont")
        assert err.value.error_class == "GenericError" and err.value.desc == "no"
    assert mon.received[0] == {"execute": "qmp_capabilities", "id": 0}
    assert mon.received[1]["execute"] == "query-status"


def test_concurrent_callers_get_their_own_replies(sock_path: str) -> None:
    def handler(msg: dict, mon: FakeMonitor) -> None:
        n = msg["arguments"]["n"]
        threading.Timer(0.01 * (n % 3), lambda: mon.send({"return": n, "id": msg["id"]})).start()

    FakeMonitor(sock_path, handler)
    results: dict[int, int] = {}
    with QMPClient.connect(sock_path, timeout=2) as q:
        threads = [threading.Thread(target=lambda n=n: results.__setitem__(n, q.execute("echo", {"n": n})))
                   for n in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(5)
    assert results == {n: n for n in range(20)}


def test_lost_connection_fails_pending_and_later_calls(sock_path: str) -> None:
    def handler(msg: dict, mon: FakeMonitor) -> None:
        mon.close()  # QEMU dies instead of answering

    FakeMonitor(sock_path, handler)
    q = QMPClient.connect(sock_path, timeout=2)
    with pytest.raises(QMPConnectionError):
        q.execute("query-status", timeout=5)
    assert q.closed
    with pytest.raises(QMPConnectionError):
        q.execute("query-status")
    with pytest.raises(QMPConnectionError):
        q.wait_event(lambda e: True, timeout=1)


def test_no_reply_times_out(sock_path: str) -> None:
    FakeMonitor(sock_path, lambda msg, mon: None)
    with QMPClient.connect(sock_path, timeout=2) as q:
        t0 = time.monotonic()
        with pytest.raises(QMPConnectionError, match="no reply"):
            q.execute("query-status", timeout=0.2)
        assert time.monotonic() - t0 < 2


def test_busy_monitor_is_a_connection_error(sock_path: str) -> None:
    # a socket that accepts but never greets (QEMU serving another client)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sock_path)
    server.listen(1)
    with pytest.raises(QMPConnectionError):
        QMPClient.connect(sock_path, timeout=0.3)
    server.close()


def test_passes_file_descriptors(sock_path: str) -> None:
    mon = FakeMonitor(sock_path, lambda msg, m: m.send({"return": {}, "id": msg["id"]}))
    r, w = os.pipe()
    try:
        with QMPClient.connect(sock_path, timeout=2) as q:
            q.execute("getfd", {"fdname": "x"}, fds=[r])
        assert len(mon.fds) == 1
        os.write(w, b"hi")
        assert os.read(mon.fds[0], 2) == b"hi"  # the server got a working duplicate
    finally:
        for fd in (r, w, *mon.fds):
            os.close(fd)


def test_long_socket_paths(tmp_path: pathlib.Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = str(deep / "qmp.sock")
    assert len(path) > 108
    cwd = os.getcwd()
    os.chdir(deep)  # bind relative, as QEMU does in the VM's directory
    try:
        FakeMonitor("qmp.sock", lambda msg, m: m.send({"return": 1, "id": msg["id"]}))
    finally:
        os.chdir(cwd)
    with QMPClient.connect(path, timeout=2) as q:
        assert q.execute("x") == 1
