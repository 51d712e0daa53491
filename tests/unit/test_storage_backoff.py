"""The one backoff: doubling from ``base``, capped, cut by at most ``jitter`` at random."""

from __future__ import annotations

import pytest

from ferry.storage import Backoff


@pytest.mark.parametrize("failures, expected", [(0, 0.0), (1, 0.5), (2, 1.0), (3, 2.0), (7, 30.0), (10_000, 30.0)])
def test_doubles_up_to_the_cap(failures, expected):
    assert Backoff(base=0.5, cap=30.0).delay(failures) == pytest.approx(expected)


@pytest.mark.parametrize("draw, expected", [(0.0, 30.0), (0.5, 22.5), (1.0, 15.0)])
def test_jitter_cuts_at_most_its_fraction(draw, expected):
    backoff = Backoff(base=0.5, cap=30.0, jitter=0.5, random=lambda: draw)
    assert backoff.delay(100) == pytest.approx(expected)


def test_jittered_delays_stay_in_range():
    backoff = Backoff(base=1.0, cap=8.0, jitter=0.5)
    for n in range(1, 10):
        exact = min(8.0, 2.0 ** (n - 1))
        assert all(exact / 2 <= backoff.delay(n) <= exact for _ in range(50))


def test_the_agents_action_schedule():
    """2, 4, 8 ... s, at most five minutes (agent/execute.py's ACTION_BACKOFF)."""
    from ferry.agent.execute import ACTION_BACKOFF

    assert [ACTION_BACKOFF.delay(n) for n in (1, 2, 3, 8, 9, 30)] == [2.0, 4.0, 8.0, 256.0, 300.0, 300.0]
