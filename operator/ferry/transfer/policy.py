"""PURE convergence and throttle policy of pre-copy (no I/O, no clock).

After each round the sender asks ``after_round()``: with what is dirty now, the measured
bandwidth and the downtime budget, should the guest be paused for the final copy, should
its writes be throttled harder, or is the attempt hopeless?

- Pause when the remaining dirty bytes can be sent within the downtime budget
  (``expected_downtime_ms <= budget``).
- Auto-converge: throttle a kind (disk or memory) when its dirty set stopped shrinking
  between rounds, or when few blocks remain but the trend says the next round still
  will not fit. The throttle starts at 20 % and grows by 10 % (disk) or 20 % (memory:
  a faster ramp, as memory throttling must stay short) per round, up to 99 %. It never
  drops during an attempt; the sender lifts it at completion or abort.
- Downtime steps (as Nova's ``live_migration_downtime_steps``): when every kind with
  dirty data is throttled at ``throttle_max`` and the remainder still does not fit the
  allowed downtime for ``rounds_per_step`` rounds in a row, raise the allowed downtime by
  one step, from the budget up to the ceiling ``max_downtime_ms`` in ``downtime_steps``
  equal steps. A ceiling equal to the budget (the default) means no steps.
- At the ceiling with the throttle at its maximum for ``rounds_per_step`` more rounds,
  or after ``max_rounds`` rounds: FAIL, reason ``NotConverging`` with the figures.
- Force-complete (``force``): PAUSE now, whatever the budget.
"""

from __future__ import annotations

import dataclasses
import enum


class RoundStep(str, enum.Enum):
    CONTINUE = "continue"
    PAUSE = "pause"
    FAIL = "fail"


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    downtime_budget_ms: int = 300
    verify_overhead_ms: float = 5.0  # fixed cost of the final exchange (digests, round trip)
    disk_throttle_initial: int = 20
    disk_throttle_step: int = 10
    memory_throttle_initial: int = 20
    memory_throttle_step: int = 20
    throttle_max: int = 99
    shrink_ratio: float = 0.5  # "shrinking": now < 50 % of the previous round's dirty bytes (as QEMU's trigger)
    few_remaining_factor: float = 4.0  # "few remain": within 4x the bytes the budget allows
    max_rounds: int = 200
    max_downtime_ms: int | None = None  # the ceiling of the downtime steps (None: the budget, no steps)
    downtime_steps: int = 4  # budget -> ceiling in this many equal steps
    rounds_per_step: int = 2  # rounds at the maximum throttle before each step (and before giving up)

    @property
    def ceiling_ms(self) -> int:
        return max(self.downtime_budget_ms, self.max_downtime_ms or 0)

    def step_ms(self) -> float:
        return (self.ceiling_ms - self.downtime_budget_ms) / max(1, self.downtime_steps)


@dataclasses.dataclass(frozen=True)
class KindSample:
    """One kind (disk or memory) after a round."""

    dirty_bytes: int  # dirty now: what the next round would send
    previous_dirty_bytes: int | None  # dirty after the previous round (None after round 1)
    throttle_percent: int = 0


@dataclasses.dataclass(frozen=True)
class PolicyInput:
    round: int  # rounds completed so far (>= 1)
    disk: KindSample
    memory: KindSample
    bandwidth_bps: float  # measured rate of the channel, capped by the limit
    allowed_downtime_ms: float | None = None  # the downtime allowed now (None: the budget)
    rounds_at_limit: int = 0  # rounds in a row at the maximum throttle since the last step
    force: bool = False  # force-complete asked: pause now


@dataclasses.dataclass(frozen=True)
class RoundDecision:
    action: RoundStep
    disk_throttle_percent: int
    memory_throttle_percent: int
    expected_downtime_ms: float
    reason: str
    allowed_downtime_ms: float = 0.0  # the downtime allowed from now on (raised by a step)
    rounds_at_limit: int = 0  # the counter for the next round
    not_converging: bool = False  # FAIL because the guest cannot converge within the ceiling

    @property
    def pause(self) -> bool:
        return self.action is RoundStep.PAUSE


def expected_downtime_ms(dirty_bytes: int, bandwidth_bps: float, overhead_ms: float) -> float:
    if dirty_bytes <= 0:
        return overhead_ms
    if bandwidth_bps <= 0:
        return float("inf")
    return dirty_bytes * 1000.0 / bandwidth_bps + overhead_ms


def _stalled(k: KindSample, cfg: PolicyConfig) -> bool:
    return (
        k.dirty_bytes > 0
        and k.previous_dirty_bytes is not None
        and k.dirty_bytes >= cfg.shrink_ratio * k.previous_dirty_bytes
    )


def _next_throttle(current: int, initial: int, step: int, cap: int) -> int:
    return min(cap, initial if current <= 0 else current + step)


def _saturated(k: KindSample, cfg: PolicyConfig) -> bool:
    return k.dirty_bytes <= 0 or k.throttle_percent >= cfg.throttle_max


def after_round(cfg: PolicyConfig, inp: PolicyInput) -> RoundDecision:
    disk, mem = inp.disk, inp.memory
    dirty = disk.dirty_bytes + mem.dirty_bytes
    expected = expected_downtime_ms(dirty, inp.bandwidth_bps, cfg.verify_overhead_ms)
    dt, mt = disk.throttle_percent, mem.throttle_percent
    allowed = float(inp.allowed_downtime_ms or cfg.downtime_budget_ms)
    ceiling = cfg.ceiling_ms

    def decision(action: RoundStep, reason: str, *, allowed_ms: float = allowed, at_limit: int = inp.rounds_at_limit,
                 stuck: bool = False, disk_pct: int = dt, mem_pct: int = mt) -> RoundDecision:
        return RoundDecision(action, disk_pct, mem_pct, expected, reason, allowed_ms, at_limit, stuck)

    if inp.force:
        return decision(RoundStep.PAUSE, f"force-complete: pausing with {dirty} dirty bytes (expected {expected:.0f} ms)")
    if expected <= allowed:
        return decision(RoundStep.PAUSE, f"{dirty} dirty bytes fit the {allowed:.0f} ms allowed")
    if dirty <= 0:  # only the final exchange is left: more rounds cannot make it shorter
        return decision(RoundStep.PAUSE, "nothing dirty")

    def figures() -> str:
        return (f"expected downtime {_ms(expected)} > {allowed:.0f} ms allowed (budget {cfg.downtime_budget_ms} ms, "
                f"ceiling {ceiling} ms) after {inp.round} rounds, throttle disk {dt}% memory {mt}%, "
                f"{dirty} bytes dirty, link {inp.bandwidth_bps / 1048576:.1f} MiB/s")

    if inp.round >= cfg.max_rounds:
        return decision(RoundStep.FAIL, f"NotConverging: {figures()}", stuck=True)

    prev = (disk.previous_dirty_bytes or 0) + (mem.previous_dirty_bytes or 0)
    shrinking = prev > 0 and dirty < cfg.shrink_ratio * prev
    if _saturated(disk, cfg) and _saturated(mem, cfg) and inp.bandwidth_bps > 0 and not shrinking:
        # the throttle can do no more: wait rounds_per_step rounds, then step (or give up)
        at_limit = inp.rounds_at_limit + 1
        if at_limit < cfg.rounds_per_step:
            return decision(RoundStep.CONTINUE, f"throttle at its maximum ({at_limit}/{cfg.rounds_per_step} rounds)",
                            at_limit=at_limit)
        if allowed >= ceiling:
            return decision(RoundStep.FAIL, f"NotConverging: {figures()}", at_limit=at_limit, stuck=True)
        raised = min(float(ceiling), allowed + cfg.step_ms())
        if expected <= raised:
            return decision(RoundStep.PAUSE, f"downtime step to {raised:.0f} ms: {dirty} dirty bytes fit",
                            allowed_ms=raised, at_limit=0)
        return decision(RoundStep.CONTINUE, f"downtime step to {raised:.0f} ms (expected {_ms(expected)})",
                        allowed_ms=raised, at_limit=0)

    budget_bytes = max(0.0, (allowed - cfg.verify_overhead_ms) / 1000.0 * inp.bandwidth_bps)
    few = dirty <= cfg.few_remaining_factor * budget_bytes
    if disk.previous_dirty_bytes is None and mem.previous_dirty_bytes is None:
        predicted_next = float(dirty)  # no trend yet
    else:
        predicted_next = dirty * dirty / prev if prev > 0 else float(dirty)
    endgame = few and predicted_next > budget_bytes

    reasons = []
    if disk.dirty_bytes > 0 and (_stalled(disk, cfg) or endgame) and dt < cfg.throttle_max:
        dt = _next_throttle(dt, cfg.disk_throttle_initial, cfg.disk_throttle_step, cfg.throttle_max)
        reasons.append(f"disk throttle {dt}%")
    if mem.dirty_bytes > 0 and (_stalled(mem, cfg) or endgame) and mt < cfg.throttle_max:
        mt = _next_throttle(mt, cfg.memory_throttle_initial, cfg.memory_throttle_step, cfg.throttle_max)
        reasons.append(f"memory throttle {mt}%")
    why = "few blocks remain" if endgame else "dirty set not shrinking" if reasons else "dirty set shrinking"
    return decision(RoundStep.CONTINUE, why + (": " + ", ".join(reasons) if reasons else ""), disk_pct=dt, mem_pct=mt,
                    at_limit=0)


def _ms(v: float) -> str:
    return "unknown (no bandwidth measured)" if v == float("inf") else f"{v:.0f} ms"
