"""The one exponential backoff: ``base * 2^(n-1)`` after the n-th failure, capped, jittered."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Backoff:
    """How long to wait after ``failures`` failures in a row.

    ``jitter`` in [0, 1] is the largest fraction a delay may be cut by at random, so that
    clients failing together do not retry together; 0 makes the delays exact.
    """

    base: float = 0.5
    cap: float = 30.0
    jitter: float = 0.0
    random: Callable[[], float] = field(default=random.random, compare=False, repr=False)

    def delay(self, failures: int) -> float:
        if failures <= 0:
            return 0.0
        exact = min(self.cap, self.base * 2 ** min(failures - 1, 32))
        return exact * (1.0 - max(0.0, min(self.jitter, 1.0)) * self.random())
