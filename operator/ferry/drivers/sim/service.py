"""The sim guest's network service: a UDP request/response service on the droplet's address.

Each sim VM whose droplet has an address (``spec.ip``) answers UDP datagrams sent to
``<ip>:<FERRY_SIM_SERVICE_PORT>`` (default 7077) while its guest runs, and only then: a paused
guest (the source during the final copy, a target not resumed yet) answers nothing, as a
paused QEMU guest would not. The answer is one JSON object that says which guest answered:

    {"droplet": "ns/name", "host": "<host of the VM process>", "boot": B, "seq": S, "echo": "<request>"}

``boot`` is the guest's boot number (it travels with a migration; +1 only after a crash) and
``seq`` its write sequence counter, so a probe sees continuity across a move: same boot, a seq
that never goes back. ``host`` is the host whose agent started this VM process.

The socket is bound only while the guest runs and closed when it pauses. On one machine (local
dev: loopback addresses, every VM process in one network namespace) the source's and the
target's VM processes then never hold the address and port at the same time, and the target's
bind waits (retrying every few ms) until the source's socket is closed. The socket is bound
with ``IP_FREEBIND``, so it binds before the address is on the node (a cluster: the fabric puts
the address on the target's node at the network cut-over, ``ferry.drivers.network``); without
the address nothing arrives, which is the point of the cut-over.
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import threading
from collections.abc import Callable

log = logging.getLogger("ferry.sim.service")

IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
POLL_SECONDS = 0.01  # how often a closed service checks whether its guest runs again (bounds the resume -> answer gap)
RECV_SECONDS = 0.05  # how long a bound service waits for a request before it looks at its guest again
BIND_FAST_TRIES = 100  # a bind that fails (the address and port in use: on loopback, the source's socket not
#                        closed yet) is retried every POLL_SECONDS this many times, then less and less often,
BIND_RETRY_MAX = 1.0  # at most this far apart
MAX_REQUEST = 512


class GuestService:
    """Answers while ``running()`` is true; ``identity()`` gives the answer's fields."""

    def __init__(self, ip: str, port: int, running: Callable[[], bool], identity: Callable[[], dict]):
        self.ip, self.port = ip, int(port)
        self.running = running
        self.identity = identity
        self.answered = 0
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._bind_error: str | None = None
        self._bind_delay = POLL_SECONDS
        self._bind_failures = 0
        self._thread = threading.Thread(target=self._serve, name="guest-service", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._close()

    @property
    def bound(self) -> bool:
        return self._sock is not None

    def _open(self) -> None:
        family = socket.AF_INET6 if ":" in self.ip else socket.AF_INET
        s = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET:
                s.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
            s.bind((self.ip, self.port))
        except OSError as e:
            s.close()
            if self._bind_error != str(e):
                self._bind_error = str(e)
                level = logging.INFO if e.errno == errno.EADDRINUSE else logging.WARNING
                log.log(level, "guest service cannot bind %s:%d yet: %s (retrying)", self.ip, self.port, e)
            return
        s.settimeout(RECV_SECONDS)
        self._sock, self._bind_error, self._bind_delay, self._bind_failures = s, None, POLL_SECONDS, 0
        log.info("guest service answers on %s:%d/udp", self.ip, self.port)

    def _close(self) -> None:
        s, self._sock = self._sock, None
        if s is not None:
            s.close()
            log.info("guest service on %s:%d closed (guest not running)", self.ip, self.port)

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self.running():
                self._close()
                self._stop.wait(POLL_SECONDS)
                continue
            if self._sock is None:
                self._open()
                if self._sock is None:
                    self._stop.wait(self._bind_delay)
                    self._bind_failures += 1
                    if self._bind_failures > BIND_FAST_TRIES:  # in use for long: another VM's, not a cut-over
                        self._bind_delay = min(BIND_RETRY_MAX, self._bind_delay * 2)
                    continue
            try:
                data, peer = self._sock.recvfrom(MAX_REQUEST)
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                self._close()
                continue
            if not self.running():
                continue  # paused while it waited: a paused guest does not answer
            answer = {**self.identity(), "echo": data.decode("utf-8", "replace")[:128]}
            try:
                self._sock.sendto(json.dumps(answer, separators=(",", ":")).encode(), peer)
                self.answered += 1
            except OSError as e:
                log.debug("guest service: cannot answer %s: %s", peer, e)


def identity_fields(key: dict | None, host: str, boot: int, seq: int) -> dict:
    """The fields of an answer (see the module's docstring)."""
    key = key or {}
    return {"droplet": f"{key.get('namespace', '')}/{key.get('name', '')}", "host": host, "boot": boot, "seq": seq}
