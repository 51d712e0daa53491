"""A client outside the droplet: a UDP probe every 10 ms to the sim guest's service, through a
whole migration, and what it saw (tests/integration and tests/e2e; it imports nothing of ferry).

Each probe carries its number; the guest answers with its droplet, host, boot and seq
(docs/architecture.md, "The droplet's address"). ``Probe.result()`` gives:

- ``sent``, ``answered``, ``lost`` (probes never answered; a probe answered after LATE_MS counts
  as lost: an answer that late is no answer for a user);
- ``longest_gap_ms``: the longest time between two consecutive answered probes' sending, minus the
  interval (0 when no probe in a row was lost): how long the droplet did not answer;
- ``hosts``: the hosts that answered, in order (each change once), and ``boots`` seen;
- ``seq_went_back``: whether a later answer showed a smaller seq than an earlier one.
"""

from __future__ import annotations

import json
import socket
import threading
import time

INTERVAL = 0.010
LATE_MS = 1000.0


class _Sender:
    """Numbered probes sent every ``interval`` by one thread (``_send_one``) while another takes
    the answers (``_recv``), from ``with`` (or ``__enter__``) until ``stop()``."""

    def __init__(self, interval: float = INTERVAL):
        self.interval = interval
        self.sent: dict[int, float] = {}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._send, daemon=True),
                         threading.Thread(target=self._recv, daemon=True)]

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if not self._stop.is_set():
            time.sleep(LATE_MS / 1000 + 0.2)  # everything sent until now gets its time to be answered
            self._stop.set()
            for t in self._threads:
                t.join(3)
            self._close()

    def _send(self) -> None:
        n = 0
        next_at = time.monotonic()
        while not self._stop.is_set():
            n += 1
            self.sent[n] = time.monotonic()
            try:
                self._send_one(n)
            except OSError:
                pass  # no route/neighbour yet: lost like any other
            next_at += self.interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def _send_one(self, n: int) -> None:
        raise NotImplementedError

    def _recv(self) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError


class Probe(_Sender):
    def __init__(self, ip: str, port: int, interval: float = INTERVAL):
        self.ip, self.port = ip, port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(0.05)
        self.answers: dict[int, tuple[float, dict]] = {}
        super().__init__(interval)

    def _send_one(self, n: int) -> None:
        self.sock.sendto(f"probe {n}".encode(), (self.ip, self.port))

    def _close(self) -> None:
        self.sock.close()

    def _recv(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(2048)
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            t, wall = time.monotonic(), time.time()
            try:
                answer = json.loads(data)
                n = int(str(answer.get("echo", "")).split()[1])
            except (ValueError, IndexError):
                continue
            self.answers.setdefault(n, (t, {**answer, "_at": wall}))

    def answered_by(self, host: str) -> bool:
        return any(a.get("host") == host for _, a in list(self.answers.values()))

    def result(self) -> dict:
        sent = dict(self.sent)
        on_time = {n: a for n, (t, a) in self.answers.items() if n in sent and (t - sent[n]) * 1000 <= LATE_MS}
        # the probes of the last LATE_MS may still be in flight when stopped: not counted
        last = max(sent.values(), default=0.0) - LATE_MS / 1000
        counted = [n for n, t in sent.items() if t <= last] or list(sent)
        lost = [n for n in counted if n not in on_time]
        ok = sorted(n for n in counted if n in on_time)
        gap = 0.0
        for a, b in zip(ok, ok[1:]):
            gap = max(gap, (sent[b] - sent[a]) * 1000 - self.interval * 1000)
        hosts: list[str] = []
        switch: tuple[float, float] | None = None  # wall times: last answer of the first host, first of the next
        boots: set = set()
        seq_back, last_seq = False, -1
        for n in ok:
            a = on_time[n]
            if hosts and hosts[-1] != a.get("host") and switch is None:
                prev = max(on_time[m]["_at"] for m in ok if m < n and on_time[m].get("host") == hosts[-1])
                switch = (prev, a["_at"])
            if not hosts or hosts[-1] != a.get("host"):
                hosts.append(a.get("host"))
            boots.add(a.get("boot"))
            if int(a.get("seq", 0)) < last_seq:
                seq_back = True
            last_seq = max(last_seq, int(a.get("seq", 0)))
        return {"sent": len(counted), "answered": len(ok), "lost": len(lost), "longest_gap_ms": round(gap),
                "hosts": hosts, "boots": sorted(boots, key=str), "seq_went_back": seq_back, "switch": switch}

    @staticmethod
    def line(r: dict) -> str:
        return (f"probes sent {r['sent']}, answered {r['answered']}, lost {r['lost']}, longest gap {r['longest_gap_ms']} ms, "
                f"answered by {' -> '.join(map(str, r['hosts']))}, boots {r['boots']}, seq went back: {r['seq_went_back']}")


def ask(ip: str, port: int, timeout: float = 0.3) -> dict | None:
    """One request to the guest's service: its answer, or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.sendto(b"ask 0", (ip, port))
            return json.loads(s.recv(2048))
        except (OSError, ValueError):
            return None


# --- a guest with its own NIC (the qemu driver): ICMP and TCP probes ------------------------

def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


class _Probes(_Sender):
    """Numbered probes sent every ``interval`` and their answers: ``result()`` as ``Probe``'s
    (sent, answered, lost, longest_gap_ms; an answer later than LATE_MS counts as lost)."""

    kind = "probe"

    def __init__(self, interval: float = INTERVAL):
        self.answers: dict[int, float] = {}
        super().__init__(interval)

    def answered_since(self, t: float) -> int:
        """Answers to probes sent after monotonic time ``t``."""
        return sum(1 for n in list(self.answers) if self.sent.get(n, 0.0) > t)

    def _answered(self, n: int) -> None:
        self.answers.setdefault(n, time.monotonic())

    def result(self) -> dict:
        sent = dict(self.sent)
        on_time = {n for n, t in self.answers.items() if n in sent and (t - sent[n]) * 1000 <= LATE_MS}
        last = max(sent.values(), default=0.0) - LATE_MS / 1000
        counted = [n for n, t in sent.items() if t <= last] or list(sent)
        ok = sorted(n for n in counted if n in on_time)
        gap = 0.0
        for a, b in zip(ok, ok[1:]):
            gap = max(gap, (sent[b] - sent[a]) * 1000 - self.interval * 1000)
        # what the client saw: the longest time without any answer arriving (TCP answers, held
        # back and retransmitted, arrive late but count as answered within LATE_MS)
        arrivals = sorted(self.answers[n] for n in ok)
        window = max(zip(arrivals, arrivals[1:]), key=lambda ab: ab[1] - ab[0], default=(0.0, 0.0))
        offset = time.time() - time.monotonic()  # the silence's bounds as wall-clock times
        return {"kind": self.kind, "sent": len(counted), "answered": len(ok), "lost": len(counted) - len(ok),
                "longest_gap_ms": round(gap), "longest_silence_ms": round((window[1] - window[0]) * 1000),
                "silence": (window[0] + offset, window[1] + offset)}

    @staticmethod
    def line(r: dict) -> str:
        return (f"{r['kind']} probes sent {r['sent']}, answered {r['answered']}, lost {r['lost']}, "
                f"longest gap {r['longest_gap_ms']} ms, longest silence {r['longest_silence_ms']} ms")


class IcmpProbe(_Probes):
    """An ICMP echo request to ``ip`` every 10 ms (a raw socket: root)."""

    kind = "icmp"

    def __init__(self, ip: str, interval: float = INTERVAL):
        super().__init__(interval)
        self.ip = ip
        self.ident = threading.get_native_id() & 0xFFFF
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        self.sock.settimeout(0.05)

    def _send_one(self, n: int) -> None:
        seq = n & 0xFFFF
        payload = n.to_bytes(8, "big")
        header = bytes([8, 0]) + b"\0\0" + self.ident.to_bytes(2, "big") + seq.to_bytes(2, "big")
        csum = _checksum(header + payload)
        self.sock.sendto(header[:2] + csum.to_bytes(2, "big") + header[4:] + payload, (self.ip, 0))

    def _recv(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(2048)
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            ihl = (data[0] & 0x0F) * 4
            icmp = data[ihl:]
            if addr[0] != self.ip or len(icmp) < 16 or icmp[0] != 0:
                continue
            if int.from_bytes(icmp[4:6], "big") != self.ident:
                continue
            self._answered(int.from_bytes(icmp[8:16], "big"))

    def _close(self) -> None:
        self.sock.close()


class TcpProbe(_Probes):
    """A request every 10 ms on one TCP connection to the guest's echo service ("probe N\\n",
    answered with the same line). A request the kernel holds back while the guest does not
    answer is retransmitted by TCP: answered within LATE_MS, it counts as answered. ``broken``:
    the errors the connection saw (it is opened again after one)."""

    kind = "tcp"

    def __init__(self, ip: str, port: int, interval: float = INTERVAL):
        super().__init__(interval)
        self.ip, self.port = ip, port
        self.broken: list[str] = []
        self._lock = threading.Lock()
        self.sock: socket.socket | None = socket.create_connection((ip, port), timeout=5)
        self.sock.settimeout(0.05)

    def _send_one(self, n: int) -> None:
        with self._lock:
            sock = self.sock
        if sock is None:
            return
        try:
            sock.sendall(f"probe {n}\n".encode())
        except OSError as e:
            self._reset(sock, f"send: {e}")

    def _reset(self, sock: socket.socket, why: str) -> None:
        with self._lock:
            if self.sock is not sock:
                return
            self.broken.append(why)
            sock.close()
            self.sock = None
        try:
            new = socket.create_connection((self.ip, self.port), timeout=1)
            new.settimeout(0.05)
            with self._lock:
                self.sock = new
        except OSError:
            pass

    def _recv(self) -> None:
        buf = b""
        while not self._stop.is_set():
            with self._lock:
                sock = self.sock
            if sock is None:
                time.sleep(0.05)
                continue
            try:
                data = sock.recv(4096)
            except (TimeoutError, socket.timeout):
                continue
            except OSError as e:
                self._reset(sock, f"recv: {e}")
                buf = b""
                continue
            if not data:
                self._reset(sock, "closed by the guest")
                buf = b""
                continue
            buf += data
            *lines, buf = buf.split(b"\n")
            for line in lines:
                parts = line.split()
                if len(parts) == 2 and parts[0] == b"probe" and parts[1].isdigit():
                    self._answered(int(parts[1]))

    def _close(self) -> None:
        with self._lock:
            if self.sock is not None:
                self.sock.close()

    def result(self) -> dict:
        return {**super().result(), "connection_errors": list(self.broken)}


class LongLivedTcp:
    """One TCP connection to the guest's echo service, opened (and checked) now and used again
    by ``check()`` later: whether it survived what happened in between."""

    def __init__(self, ip: str, port: int, timeout: float = 5.0):
        self.sock = socket.create_connection((ip, port), timeout=timeout)
        self.sock.settimeout(timeout)
        self.opened = self._echo(b"before")
        self.local_port = self.sock.getsockname()[1]

    def _echo(self, word: bytes) -> bool:
        line = word + b" " + str(time.time()).encode() + b"\n"
        self.sock.sendall(line)
        got = b""
        while not got.endswith(b"\n"):
            chunk = self.sock.recv(4096)
            if not chunk:
                return False
            got += chunk
        return got == line

    def check(self) -> str:
        """"survived" (the same connection echoed a line), or what happened to it."""
        try:
            return "survived" if self._echo(b"after") else "answered something else"
        except OSError as e:
            return f"broken: {e}"
        finally:
            self.sock.close()
