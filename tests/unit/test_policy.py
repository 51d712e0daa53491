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


# --- downtime steps, the ceiling, NotConverging, force-complete --------------------------------

STEPS = PolicyConfig(downtime_budget_ms=100, verify_overhead_ms=5, max_downtime_ms=500, downtime_steps=4, rounds_per_step=2)


def at_max(disk, disk_prev, *, allowed=None, at_limit=0, round=10, cfg=STEPS, bw=100 * MB):
    return after_round(cfg, PolicyInput(round, KindSample(disk, disk_prev, 99), KindSample(0, 0, 0), bw,
                                        allowed_downtime_ms=allowed, rounds_at_limit=at_limit))


def test_force_pauses_whatever_the_budget():
    d = after_round(CFG, PolicyInput(2, KindSample(900 * MB, 900 * MB, 0), KindSample(0, None), 100 * MB, force=True))
    assert d.pause and "force" in d.reason and d.expected_downtime_ms > 9000


def test_throttle_at_max_waits_rounds_per_step_before_a_step():
    d = at_max(30 * MB, 30 * MB)
    assert d.action is RoundStep.CONTINUE and d.rounds_at_limit == 1 and d.allowed_downtime_ms == 100


def test_step_raises_allowed_downtime_by_one_step():
    d = at_max(30 * MB, 30 * MB, at_limit=1)  # 305 ms expected > 200 ms after one step
    assert d.action is RoundStep.CONTINUE and d.allowed_downtime_ms == 200 and d.rounds_at_limit == 0, d.reason


def test_step_pauses_when_the_remainder_fits_the_raised_limit():
    d = at_max(15 * MB, 15 * MB, at_limit=1)  # 155 ms <= 200 ms
    assert d.pause and d.allowed_downtime_ms == 200


def test_an_allowed_limit_already_raised_is_kept():
    d = at_max(30 * MB, 30 * MB, allowed=400)  # 305 ms fits 400
    assert d.pause and d.allowed_downtime_ms == 400


def test_steps_stop_at_the_ceiling_then_not_converging_with_figures():
    d = at_max(90 * MB, 90 * MB, allowed=450, at_limit=1)
    assert d.action is RoundStep.CONTINUE and d.allowed_downtime_ms == 500
    d = at_max(90 * MB, 90 * MB, allowed=500, at_limit=1)
    assert d.action is RoundStep.FAIL and d.not_converging
    assert d.reason.startswith("NotConverging:") and "905 ms" in d.reason and "ceiling 500 ms" in d.reason


def test_no_ceiling_means_no_steps():
    d = at_max(30 * MB, 30 * MB, at_limit=1, cfg=CFG)
    assert d.action is RoundStep.FAIL and d.not_converging


def test_shrinking_at_max_throttle_is_left_to_converge():
    d = at_max(30 * MB, 100 * MB, at_limit=1)
    assert d.action is RoundStep.CONTINUE and d.allowed_downtime_ms == 100


@given(
    rounds=st.integers(1, 400),
    disk=st.integers(0, 10**10), mem=st.integers(0, 10**10), bw=st.floats(0, 10**10),
    allowed=st.one_of(st.none(), st.floats(1, 600)), at_limit=st.integers(0, 5),
    dt=st.integers(0, 99), mt=st.integers(0, 99),
)
def test_allowed_downtime_never_exceeds_the_ceiling_nor_drops(rounds, disk, mem, bw, allowed, at_limit, dt, mt):
    d = after_round(STEPS, PolicyInput(rounds, KindSample(disk, disk, dt), KindSample(mem, mem, mt), bw,
                                       allowed_downtime_ms=allowed, rounds_at_limit=at_limit))
    start = allowed or STEPS.downtime_budget_ms
    assert d.allowed_downtime_ms >= start
    assert d.allowed_downtime_ms <= max(STEPS.ceiling_ms, start)
    if d.pause and not d.reason.startswith("force") and disk + mem > 0:  # nothing dirty: pause, it cannot shrink
        assert d.expected_downtime_ms <= d.allowed_downtime_ms


def test_a_guest_the_throttle_cannot_slow_ends_within_bounded_rounds():
    """Simulated rounds: the guest dirties 3x what the link moves per round, throttle or not."""
    cfg = PolicyConfig(downtime_budget_ms=50, max_downtime_ms=200, throttle_max=99)
    bw, dirty, prev = 64 * MB, 64 * MB, None
    state = dict(dt=0, allowed=None, at_limit=0)
    for r in range(1, cfg.max_rounds + 1):
        d = after_round(cfg, PolicyInput(r, KindSample(dirty, prev, state["dt"]), KindSample(0, None), bw,
                                         allowed_downtime_ms=state["allowed"], rounds_at_limit=state["at_limit"]))
        if d.action is not RoundStep.CONTINUE:
            break
        state = dict(dt=d.disk_throttle_percent, allowed=d.allowed_downtime_ms, at_limit=d.rounds_at_limit)
        prev = dirty
    assert d.action is RoundStep.FAIL and d.not_converging and r < 30, (r, d)
