"""Token bucket of the sender."""

from ferry.transfer.ratelimit import TokenBucket


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_unlimited_never_waits():
    b = TokenBucket(None)
    assert b.unlimited and b.delay_for(10**12) == 0.0


def test_rate_holds_over_time():
    clock = Clock()
    slept = []

    def sleep(s):
        slept.append(s)
        clock.t += s

    b = TokenBucket(1_000_000, burst=100_000, clock=clock, sleep=sleep)
    for _ in range(100):
        b.consume(100_000)  # 10 MB in total
    # 10 MB at 1 MB/s minus the initial burst: ~9.9 s
    assert 9.8 <= clock.t <= 10.0


def test_burst_is_bounded_after_idle():
    clock = Clock()
    b = TokenBucket(1_000_000, burst=50_000, clock=clock, sleep=lambda s: None)
    clock.t = 100.0  # idle for a long time
    assert b.delay_for(50_000) == 0.0
    assert abs(b.delay_for(100_000) - 0.1) < 1e-9
