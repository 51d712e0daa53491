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


class Probe:
    def __init__(self, ip: str, port: int, interval: float = INTERVAL):
        self.ip, self.port, self.interval = ip, port, interval
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(0.05)
        self.sent: dict[int, float] = {}
        self.answers: dict[int, tuple[float, dict]] = {}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._send, daemon=True),
                         threading.Thread(target=self._recv, daemon=True)]

    def __enter__(self) -> Probe:
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
                t.join(2)
            self.sock.close()

    def _send(self) -> None:
        n = 0
        next_at = time.monotonic()
        while not self._stop.is_set():
            n += 1
            self.sent[n] = time.monotonic()
            try:
                self.sock.sendto(f"probe {n}".encode(), (self.ip, self.port))
            except OSError:
                pass  # no route/neighbour yet: lost like any other
            next_at += self.interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))

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
