"""Convergence / throttle policy (pure), table-driven plus invariants."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferry.transfer.policy import RoundStep, KindSample, PolicyConfig, PolicyInput, after_round, expected_downtime_ms

MB = 1_000_000
CFG = PolicyConfig(downtime_budget_ms=100, verify_overhead_ms=5)  # at 100 MB/s: 9.5 MB fit


def inp(disk, disk_prev=None, mem=0, mem_prev=None, dt=0, mt=0, bw=100 * MB, round=2):
    return PolicyInput(round=round, disk=KindSample(disk, disk_prev, dt), memory=KindSample(mem, mem_prev, mt), bandwidth_bps=bw)


CASES = [
    # name, input, action, disk %, memory %
    ("nothing dirty", inp(0, 0), RoundStep.PAUSE, 0, 0),
    ("fits easily", inp(5 * MB, 50 * MB), RoundStep.PAUSE, 0, 0),
    ("fits exactly", inp(9_500_000, 50 * MB), RoundStep.PAUSE, 0, 0),
    ("disk+memory together too big", inp(6 * MB, 50 * MB, 4 * MB, 40 * MB), RoundStep.CONTINUE, 0, 0),
    ("after round 1: no trend, no throttle", inp(500 * MB, None, 100 * MB, None, round=1), RoundStep.CONTINUE, 0, 0),
    ("shrinking fast", inp(100 * MB, 400 * MB), RoundStep.CONTINUE, 0, 0),
    ("disk stalled -> first step 20%", inp(300 * MB, 310 * MB), RoundStep.CONTINUE, 20, 0),
    ("disk stalled again -> +10", inp(300 * MB, 300 * MB, dt=20), RoundStep.CONTINUE, 30, 0),
    ("disk growing -> +10", inp(350 * MB, 300 * MB, dt=60), RoundStep.CONTINUE, 70, 0),
    ("disk capped at 99", inp(300 * MB, 300 * MB, dt=90), RoundStep.CONTINUE, 99, 0),
    ("disk at cap stays", inp(300 * MB, 300 * MB, dt=99), RoundStep.CONTINUE, 99, 0),
    ("memory stalled -> 20", inp(10 * MB, 100 * MB, 50 * MB, 50 * MB), RoundStep.CONTINUE, 0, 20),
    ("memory ramps faster: +20", inp(10 * MB, 100 * MB, 50 * MB, 50 * MB, mt=20), RoundStep.CONTINUE, 0, 40),
    ("both stalled", inp(200 * MB, 200 * MB, 50 * MB, 50 * MB, dt=30, mt=40), RoundStep.CONTINUE, 40, 60),
    ("few remain, trend too slow -> throttle kinds with dirty data", inp(20 * MB, 30 * MB), RoundStep.CONTINUE, 20, 0),
    ("few remain, trend fits next round -> no throttle", inp(20 * MB, 100 * MB), RoundStep.CONTINUE, 0, 0),
    ("throttle never drops while shrinking", inp(100 * MB, 400 * MB, dt=50, mt=20), RoundStep.CONTINUE, 50, 20),
    ("unknown bandwidth: keep copying", inp(1 * MB, 4 * MB, bw=0), RoundStep.CONTINUE, 0, 0),
    ("too many rounds: give up", inp(300 * MB, 300 * MB, round=200), RoundStep.FAIL, 0, 0),
]


@pytest.mark.parametrize("name,case,action,disk_pct,mem_pct", CASES, ids=[c[0] for c in CASES])
def test_policy_table(name, case, action, disk_pct, mem_pct):
    d = after_round(CFG, case)
    assert d.action is action, d.reason
    assert (d.disk_throttle_percent, d.memory_throttle_percent) == (disk_pct, mem_pct), d.reason
    assert d.reason


def test_expected_downtime():
    assert expected_downtime_ms(0, 0, 5) == 5
    assert math.isinf(expected_downtime_ms(1, 0, 5))
    assert expected_downtime_ms(10 * MB, 100 * MB, 5) == pytest.approx(105)
    assert after_round(CFG, inp(10 * MB, 50 * MB)).expected_downtime_ms == pytest.approx(105)


def test_custom_ramp():
    cfg = PolicyConfig(downtime_budget_ms=100, disk_throttle_initial=30, disk_throttle_step=5, throttle_max=50)
    pct = 0
    seen = []
    for _ in range(8):
        pct = after_round(cfg, inp(300 * MB, 300 * MB, dt=pct)).disk_throttle_percent
        seen.append(pct)
    assert seen == [30, 35, 40, 45, 50, 50, 50, 50]


def test_a_stalling_guest_is_throttled_until_it_converges():
    """Simulate rounds: a guest dirtying at 2x the link converges thanks to the throttle."""
    bw, size, rate = 100 * MB, 1000 * MB, 200 * MB  # bytes/s
    dirty, prev, dt = size, None, 0
    for r in range(1, 100):
        seconds = dirty / bw  # time of this round
        new_dirty = min(size, rate * (100 - dt) / 100 * seconds)
        d = after_round(CFG, inp(int(new_dirty), prev, dt=dt, round=r))
        if d.pause:
            break
        assert d.action is RoundStep.CONTINUE
        prev, dirty, dt = int(new_dirty), new_dirty, d.disk_throttle_percent
    else:
        pytest.fail("never converged")
    assert dt >= 50  # it needed the throttle


@given(
    disk=st.integers(0, 10**10), disk_prev=st.one_of(st.none(), st.integers(0, 10**10)),
    mem=st.integers(0, 10**9), mem_prev=st.one_of(st.none(), st.integers(0, 10**9)),
    dt=st.integers(0, 99), mt=st.integers(0, 99), bw=st.floats(0, 1e10), rnd=st.integers(1, 300),
)
def test_invariants(disk, disk_prev, mem, mem_prev, dt, mt, bw, rnd):
    d = after_round(CFG, PolicyInput(rnd, KindSample(disk, disk_prev, dt), KindSample(mem, mem_prev, mt), bw))
    # throttle only grows, within bounds
    assert dt <= d.disk_throttle_percent <= 99 and mt <= d.memory_throttle_percent <= 99
    # pause exactly when the rest fits the budget
    assert (d.action is RoundStep.PAUSE) == (d.expected_downtime_ms <= CFG.downtime_budget_ms)
    if d.action is RoundStep.PAUSE:
        assert (d.disk_throttle_percent, d.memory_throttle_percent) == (dt, mt)
    # a kind with nothing dirty is never throttled further
    if disk == 0:
        assert d.disk_throttle_percent == dt
    if mem == 0:
        assert d.memory_throttle_percent == mt
