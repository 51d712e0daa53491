"""A small, thread-safe QMP client over a unix socket.

QMP (the QEMU Machine Protocol) is line-delimited JSON: the server greets with
``{"QMP": {...}}``, the client negotiates with ``qmp_capabilities``, then sends
``{"execute": cmd, "arguments": {...}, "id": N}`` and reads ``{"return": ...}`` or
``{"error": {"class", "desc"}}`` with the same id; asynchronous ``{"event": ...}``
messages may arrive at any time.

One reader thread per connection routes replies to the waiting caller by id and
keeps the events in a bounded, numbered log, so several threads (the agent's calls
and a driver's background migration) share one connection: QEMU serves one client
per monitor socket at a time.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import os
import socket
import threading
import time
from typing import Any, Callable


class QMPError(Exception):
    """QEMU answered a command with an error."""

    def __init__(self, command: str, error_class: str, desc: str):
        super().__init__(f"{command}: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class QMPConnectionError(Exception):
    """The monitor socket could not be reached, or the connection was lost."""


@dataclasses.dataclass(frozen=True)
class QMPEvent:
    seq: int
    name: str
    data: dict[str, Any]
    timestamp: float


class _Pending:
    __slots__ = ("done", "reply")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.reply: dict[str, Any] | None = None


class QMPClient:
    """A connected QMP session. Use :meth:`connect`; close with :meth:`close`."""

    EVENT_LOG = 2048

    def __init__(self, sock: socket.socket, greeting: dict[str, Any], path: str):
        self._sock = sock
        self.greeting = greeting
        self.path = path
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._cond = threading.Condition()
        self._events: collections.deque[QMPEvent] = collections.deque(maxlen=self.EVENT_LOG)
        self._event_seq = 0
        self._closed = False
        self._close_reason = ""
        self._reader = threading.Thread(target=self._read_loop, name=f"qmp-reader:{path}", daemon=True)

    # -- connection -----------------------------------------------------------------

    @classmethod
    def connect(cls, path: str, timeout: float = 5.0) -> "QMPClient":
        """Connect, read the greeting and negotiate capabilities, within ``timeout``."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            connect_unix(sock, path)
            reader = _LineReader(sock)
            greeting = reader.read_message()
            if "QMP" not in greeting:
                raise QMPConnectionError(f"{path}: unexpected greeting {greeting!r}")
            sock.sendall(b'{"execute": "qmp_capabilities", "id": 0}\r\n')
            while True:
                msg = reader.read_message()
                if msg.get("id") == 0:
                    break
            if "error" in msg:
                raise QMPConnectionError(f"{path}: qmp_capabilities: {msg['error']}")
        except (OSError, ValueError) as exc:
            sock.close()
            raise QMPConnectionError(f"{path}: {exc}") from exc
        except QMPConnectionError:
            sock.close()
            raise
        sock.settimeout(None)
        client = cls(sock, greeting, path)
        client._buffer = reader.buffer
        client._reader.start()
        return client

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._mark_closed("closed by client")
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()

    def __enter__(self) -> "QMPClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- commands -------------------------------------------------------------------

    def execute(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        timeout: float = 30.0,
        fds: list[int] | None = None,
    ) -> Any:
        """Run one command; return its ``return`` value or raise :class:`QMPError`."""
        if self._closed:
            raise QMPConnectionError(f"{self.path}: connection closed ({self._close_reason})")
        msg_id = next(self._ids)
        msg: dict[str, Any] = {"execute": command, "id": msg_id}
        if arguments:
            msg["arguments"] = arguments
        data = (json.dumps(msg) + "\r\n").encode()
        pending = _Pending()
        with self._cond:
            self._pending[msg_id] = pending
        try:
            with self._send_lock:
                if fds:
                    socket.send_fds(self._sock, [data], fds)
                else:
                    self._sock.sendall(data)
        except OSError as exc:
            with self._cond:
                self._pending.pop(msg_id, None)
            self._mark_closed(str(exc))
            raise QMPConnectionError(f"{self.path}: {command}: {exc}") from exc
        if not pending.done.wait(timeout):
            with self._cond:
                self._pending.pop(msg_id, None)
            raise QMPConnectionError(f"{self.path}: {command}: no reply within {timeout} s")
        reply = pending.reply
        if reply is None:
            raise QMPConnectionError(f"{self.path}: {command}: connection lost ({self._close_reason})")
        if "error" in reply:
            err = reply["error"]
            raise QMPError(command, err.get("class", "GenericError"), err.get("desc", ""))
        return reply.get("return")

    # -- events ---------------------------------------------------------------------

    @property
    def event_seq(self) -> int:
        """The number of the last event received; pass it as ``since`` to wait for newer ones."""
        with self._cond:
            return self._event_seq

    def events(self, since: int = 0) -> list[QMPEvent]:
        with self._cond:
            return [e for e in self._events if e.seq > since]

    def wait_event(
        self,
        match: Callable[[QMPEvent], bool],
        timeout: float,
        since: int = 0,
    ) -> QMPEvent | None:
        """The first event after ``since`` that ``match`` accepts, or None on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for ev in self._events:
                    if ev.seq > since and match(ev):
                        return ev
                if self._closed:
                    raise QMPConnectionError(f"{self.path}: connection closed ({self._close_reason})")
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    # -- reader ---------------------------------------------------------------------

    _buffer = b""

    def _read_loop(self) -> None:
        reader = _LineReader(self._sock, self._buffer)
        try:
            while True:
                msg = reader.read_message()
                if "event" in msg:
                    ts = msg.get("timestamp", {})
                    stamp = ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6
                    with self._cond:
                        self._event_seq += 1
                        self._events.append(QMPEvent(self._event_seq, msg["event"], msg.get("data", {}), stamp))
                        self._cond.notify_all()
                elif "id" in msg:
                    with self._cond:
                        pending = self._pending.pop(msg["id"], None)
                    if pending is not None:
                        pending.reply = msg
                        pending.done.set()
        except (OSError, ValueError, QMPConnectionError) as exc:
            self._mark_closed(str(exc) or type(exc).__name__)

    def _mark_closed(self, reason: str) -> None:
        with self._cond:
            if not self._closed:
                self._closed = True
                self._close_reason = reason
            pending = list(self._pending.values())
            self._pending.clear()
            self._cond.notify_all()
        for p in pending:
            p.done.set()


def connect_unix(sock: socket.socket, path: str) -> None:
    """``sock.connect(path)``, also for paths longer than sun_path's 107 bytes (through
    an O_PATH descriptor of the directory: /proc/self/fd/N/name)."""
    if len(os.fsencode(path)) < 100:
        sock.connect(path)
        return
    directory, name = os.path.split(path)
    fd = os.open(directory or ".", os.O_PATH | os.O_DIRECTORY)
    try:
        sock.connect(f"/proc/self/fd/{fd}/{name}")
    finally:
        os.close(fd)


class _LineReader:
    """Reads newline-delimited JSON objects from a socket."""

    def __init__(self, sock: socket.socket, buffer: bytes = b""):
        self.sock = sock
        self.buffer = buffer

    def read_message(self) -> dict[str, Any]:
        while True:
            nl = self.buffer.find(b"\n")
            if nl >= 0:
                line, self.buffer = self.buffer[:nl], self.buffer[nl + 1 :]
                line = line.strip()
                if not line:
                    continue
                msg = json.loads(line)
                if not isinstance(msg, dict):
                    raise ValueError(f"QMP message is not an object: {line[:200]!r}")
                return msg
            chunk = self.sock.recv(65536)
            if not chunk:
                raise QMPConnectionError("connection closed by QEMU")
            self.buffer += chunk
