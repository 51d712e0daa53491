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
- Fail after ``max_rounds`` rounds.
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


@dataclasses.dataclass(frozen=True)
class RoundDecision:
    action: RoundStep
    disk_throttle_percent: int
    memory_throttle_percent: int
    expected_downtime_ms: float
    reason: str

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


def after_round(cfg: PolicyConfig, inp: PolicyInput) -> RoundDecision:
    disk, mem = inp.disk, inp.memory
    dirty = disk.dirty_bytes + mem.dirty_bytes
    expected = expected_downtime_ms(dirty, inp.bandwidth_bps, cfg.verify_overhead_ms)
    dt, mt = disk.throttle_percent, mem.throttle_percent

    if expected <= cfg.downtime_budget_ms:
        return RoundDecision(RoundStep.PAUSE, dt, mt, expected, f"{dirty} dirty bytes fit the {cfg.downtime_budget_ms} ms budget")
    if inp.round >= cfg.max_rounds:
        return RoundDecision(RoundStep.FAIL, dt, mt, expected, f"did not converge in {inp.round} rounds")

    budget_bytes = max(0.0, (cfg.downtime_budget_ms - cfg.verify_overhead_ms) / 1000.0 * inp.bandwidth_bps)
    few = dirty <= cfg.few_remaining_factor * budget_bytes
    prev = (disk.previous_dirty_bytes or 0) + (mem.previous_dirty_bytes or 0)
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
    return RoundDecision(RoundStep.CONTINUE, dt, mt, expected, why + (": " + ", ".join(reasons) if reasons else ""))
