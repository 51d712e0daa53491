"""Turn QEMU's ``query-migrate`` and ``query-block-jobs`` answers into MigrationStats.

Pure: a :class:`StatsTracker` is fed samples (the two answers and a monotonic time)
and keeps what needs history (rounds, throttled time, the mirror's rate). Nothing
here talks to QEMU, so it is tested with recorded answers.
"""

from __future__ import annotations

import copy
import dataclasses

from ferry.api.reports import bounded_rounds
from ferry.api.reports import RoundReport
from ferry.drivers.base import MigrationState, MigrationStats, TransferCounters

MAX_ROUNDS = 20

# query-migrate "status" -> what the source reports while the migration runs.
_PAUSED = {"pre-switchover", "device", "wait-unplug", "postcopy-paused"}
_ACTIVE = {"setup", "active", "postcopy-active", "postcopy-recover"}
_ABORTED = {"cancelling", "cancelled"}


@dataclasses.dataclass
class _Round:
    number: int
    started: float
    bytes_at_start: int


class StatsTracker:
    """Accumulates the progress of one migration on the source side."""

    def __init__(self, migration_id: str | None):
        self.stats = MigrationStats(migration_id=migration_id)
        self._round: _Round | None = None
        self._t0: float | None = None  # when the first round started
        self._last_now: float | None = None
        self._mirror_prev: tuple[float, int] | None = None
        self._mirror_rate = 0.0

    def snapshot(self) -> MigrationStats:
        return copy.deepcopy(self.stats)

    # -- samples ---------------------------------------------------------------------

    def update_mirror(self, job: dict | None, now: float) -> None:
        """A ``query-block-jobs`` entry (or a BLOCK_JOB_* event's data) for the disk mirror."""
        if not job:
            return
        total = int(job.get("len", 0))
        sent = min(int(job.get("offset", 0)), total)
        self.stats.disk = TransferCounters(total=total, sent=sent, remaining=total - sent)
        if self._mirror_prev is not None:
            t0, s0 = self._mirror_prev
            dt = now - t0
            if dt >= 0.2:
                rate = max(0.0, (sent - s0) / dt)
                self._mirror_rate = rate if self._mirror_rate == 0 else 0.5 * self._mirror_rate + 0.5 * rate
                self._mirror_prev = (now, sent)
        else:
            self._mirror_prev = (now, sent)
        if self.stats.memory.total == 0:  # memory not moving yet: the link carries the disk
            self.stats.bandwidth_bps = int(self._mirror_rate)
            self._update_eta()

    def mirror_done(self) -> None:
        """The mirror finished consistently: everything written is on the target."""
        d = self.stats.disk
        self.stats.disk = TransferCounters(total=max(d.total, d.sent), sent=max(d.total, d.sent), remaining=0)

    def update_migration(self, qm: dict | None, now: float) -> None:
        """A ``query-migrate`` answer from the source."""
        if not qm:
            return
        status = qm.get("status", "")
        ram = qm.get("ram") or {}
        if ram:
            total = int(ram.get("total", 0))
            transferred = int(ram.get("transferred", 0))
            remaining = int(ram.get("remaining", 0))
            self.stats.memory = TransferCounters(total=total, sent=transferred, remaining=remaining)
            page = int(ram.get("page-size", 4096)) or 4096
            self.stats.dirty_rate_bps = int(ram.get("dirty-pages-rate", 0)) * page
            mbps = float(ram.get("mbps", 0.0))
            if mbps > 0:
                self.stats.bandwidth_bps = int(mbps * 1e6 / 8)
            self._update_round(int(ram.get("dirty-sync-count", 0)), transferred, remaining, now)
        throttle = int(qm.get("cpu-throttle-percentage", 0) or 0)
        if self._last_now is not None and self.stats.throttle_percent > 0:
            self.stats.throttled_ms += int((now - self._last_now) * 1000)
        self._last_now = now
        self.stats.throttle_percent = throttle
        self.stats.max_throttle_percent = max(self.stats.max_throttle_percent, throttle)
        if "expected-downtime" in qm:
            self.stats.expected_downtime_ms = int(qm["expected-downtime"])
        if status == "completed" and "downtime" in qm:
            self.stats.downtime_ms = int(qm["downtime"])
            self.stats.expected_downtime_ms = int(qm["downtime"])
        if status in ("completed", "failed", "cancelled"):
            self.stats.throttle_percent = 0
        self._update_eta()
        state = migration_state(status, self.stats.round)
        if state is not None:
            self.stats.state = state
        if status == "failed" and qm.get("error-desc"):
            self.stats.error = str(qm["error-desc"])

    # -- helpers ---------------------------------------------------------------------

    def _update_round(self, sync_count: int, transferred: int, remaining: int, now: float) -> None:
        if sync_count <= 0:
            return
        if self._round is None:
            self._round = _Round(sync_count, now, 0)
            self._t0 = now if self._t0 is None else self._t0
        elif sync_count > self._round.number:
            # a dirty-bitmap sync ended the round: what it sent, what is dirty now
            self.stats.rounds.append(
                RoundReport(
                    round=self._round.number,
                    bytes=max(0, transferred - self._round.bytes_at_start),
                    dirty_bytes=remaining,
                    ms=int((now - self._round.started) * 1000),
                    start_ms=int((self._round.started - self._t0) * 1000) if self._t0 is not None else None,
                    dirty_rate_bps=self.stats.dirty_rate_bps,
                    throttle_percent=self.stats.throttle_percent,
                )
            )
            self.stats.rounds[:] = bounded_rounds(self.stats.rounds, MAX_ROUNDS)
            self._round = _Round(sync_count, now, transferred)
        self.stats.round = sync_count

    def _update_eta(self) -> None:
        left = self.stats.disk.remaining + self.stats.memory.remaining
        bw = self.stats.bandwidth_bps
        self.stats.eta_seconds = round(left / bw, 1) if bw > 0 else None


def migration_state(status: str, round_: int) -> MigrationState | None:
    """The source-side state for a ``query-migrate`` status (None: leave as is).

    ``completed`` maps to PAUSED: the driver reports COMPLETED only after it cleaned up
    and computed the digest.
    """
    if status in _ACTIVE:
        return MigrationState.CONVERGING if round_ >= 2 else MigrationState.COPYING
    if status in _PAUSED or status == "completed":
        return MigrationState.PAUSED
    if status == "failed":
        return MigrationState.FAILED
    if status in _ABORTED:
        return MigrationState.ABORTED
    return None


def stats_to_dict(stats: MigrationStats) -> dict:
    out = dataclasses.asdict(stats)
    out["state"] = stats.state.value
    return out


def stats_from_dict(data: dict) -> MigrationStats:
    data = dict(data)
    stats = MigrationStats(
        migration_id=data.get("migration_id"),
        state=MigrationState(data.get("state", MigrationState.NONE.value)),
    )
    for name in ("disk", "memory"):
        if isinstance(data.get(name), dict):
            setattr(stats, name, TransferCounters(**data[name]))
    stats.rounds = [RoundReport(**r) for r in data.get("rounds", [])]
    for field in dataclasses.fields(MigrationStats):
        if field.name in ("migration_id", "state", "disk", "memory", "rounds"):
            continue
        if field.name in data:
            setattr(stats, field.name, data[field.name])
    return stats
