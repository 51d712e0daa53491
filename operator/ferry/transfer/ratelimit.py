"""Token bucket that holds a sender to a bandwidth limit."""

from __future__ import annotations

import threading
import time


class TokenBucket:
    """``consume(n)`` blocks until ``n`` bytes may be sent at ``rate_bps``.

    ``burst`` bounds how far ahead a sender may get after an idle time (default: 20 ms
    worth of bytes, at least 64 KiB), so the limit holds over short windows too.
    ``rate_bps`` None or 0 means unlimited.
    """

    def __init__(self, rate_bps: int | None, burst: int | None = None, clock=time.monotonic, sleep=None):
        self.rate = rate_bps or 0
        self.burst = burst if burst is not None else max(64 * 1024, int(self.rate * 0.02))
        self._clock = clock
        self._stop = threading.Event()
        self._sleep = sleep or self._stop.wait
        self._tokens = float(self.burst)
        self._last = clock()

    @property
    def unlimited(self) -> bool:
        return self.rate <= 0

    def delay_for(self, n: int) -> float:
        """Take ``n`` tokens; return how long the caller must wait (may go negative)."""
        if self.unlimited:
            return 0.0
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= n
        return -self._tokens / self.rate if self._tokens < 0 else 0.0

    def consume(self, n: int) -> None:
        wait = self.delay_for(n)
        if wait > 0:
            self._sleep(wait)

    def interrupt(self) -> None:
        """Wake a sender sleeping in consume() (cancellation)."""
        self._stop.set()
