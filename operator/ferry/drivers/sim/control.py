"""Client of a sim VM's control socket: QMP-like JSON lines.

Request ``{"execute": "query-status", "arguments": {...}}``, answer ``{"return": {...}}``
or ``{"error": {"class": "...", "desc": "..."}}``. One connection per request.
"""

from __future__ import annotations

import json
import os
import socket


class ControlError(Exception):
    """The VM answered with an error."""

    def __init__(self, cls: str, desc: str):
        super().__init__(f"{cls}: {desc}")
        self.cls = cls
        self.desc = desc


class ControlUnavailable(Exception):
    """Nothing answers on the control socket."""


MAX_UNIX_PATH = 100  # sun_path holds 108 bytes


def connect(sock_path: str, timeout: float) -> socket.socket:
    """Connect to a unix socket, also when its path is longer than sun_path allows
    (through the /proc/self/fd link of its directory)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        if len(os.fsencode(sock_path)) <= MAX_UNIX_PATH:
            s.connect(sock_path)
        else:
            dfd = os.open(os.path.dirname(sock_path) or ".", os.O_PATH | os.O_DIRECTORY)
            try:
                s.connect(f"/proc/self/fd/{dfd}/{os.path.basename(sock_path)}")
            finally:
                os.close(dfd)
    except BaseException:
        s.close()
        raise
    return s


def execute(sock_path: str, command: str, arguments: dict | None = None, timeout: float = 10.0) -> dict:
    req = {"execute": command}
    if arguments:
        req["arguments"] = arguments
    try:
        s = connect(sock_path, timeout)
    except OSError as e:
        raise ControlUnavailable(f"{sock_path}: {e}") from None
    try:
        with s:
            s.sendall(json.dumps(req).encode() + b"\n")
            buf = bytearray()
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
    except OSError as e:
        raise ControlUnavailable(f"{sock_path}: {e}") from None
    if not buf:
        raise ControlUnavailable(f"{sock_path}: no answer to {command}")
    answer = json.loads(buf)
    if "error" in answer:
        err = answer["error"] or {}
        raise ControlError(err.get("class", "GenericError"), err.get("desc", "failed"))
    return answer.get("return", {})
