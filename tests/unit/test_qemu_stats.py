"""StatsTracker: QEMU's query-migrate / query-block-jobs answers -> MigrationStats."""

from __future__ import annotations

import pytest

from ferry.drivers.base import MigrationState
from ferry.drivers.qemu.stats import StatsTracker, migration_state, stats_from_dict, stats_to_dict

MIB = 1 << 20


def qm(status: str, sync: int, transferred: int, remaining: int, **extra) -> dict:
    ram = {
        "total": 100 * MIB, "transferred": transferred, "remaining": remaining, "dirty-sync-count": sync,
        "page-size": 4096, "dirty-pages-rate": extra.pop("dirty_pages", 0), "mbps": extra.pop("mbps", 80.0),
    }
    return {"status": status, "ram": ram, **extra}


def test_mirror_progress_fills_disk_counters_and_rate() -> None:
    t = StatsTracker("m")
    t.update_mirror({"device": "j", "len": 64 * MIB, "offset": 0}, now=0.0)
    t.update_mirror({"device": "j", "len": 64 * MIB, "offset": 8 * MIB}, now=1.0)
    s = t.snapshot()
    assert (s.disk.total, s.disk.sent, s.disk.remaining) == (64 * MIB, 8 * MIB, 56 * MIB)
    assert s.bandwidth_bps == 8 * MIB
    assert s.eta_seconds == pytest.approx(7.0)
    t.update_mirror({"len": 65 * MIB, "offset": 65 * MIB}, now=2.0)  # the guest dirtied more
    t.mirror_done()
    assert t.stats.disk.remaining == 0 and t.stats.disk.sent == t.stats.disk.total == 65 * MIB
    t.update_mirror(None, now=3.0)  # no job: nothing changes
    assert t.stats.disk.total == 65 * MIB


def test_rounds_throttle_and_states() -> None:
    t = StatsTracker("m")
    t.update_migration(qm("active", 1, 0, 100 * MIB), now=0.0)
    assert t.stats.state == MigrationState.COPYING and t.stats.round == 1 and t.stats.rounds == []
    t.update_migration(qm("active", 1, 60 * MIB, 40 * MIB, mbps=480.0), now=1.0)
    assert t.stats.bandwidth_bps == 60_000_000
    # round 1 ends: 100 MiB sent, 10 MiB dirty again
    t.update_migration(qm("active", 2, 100 * MIB, 10 * MIB, dirty_pages=256, **{"cpu-throttle-percentage": 20}),
                       now=2.0)
    assert t.stats.state == MigrationState.CONVERGING
    assert [(r.round, r.bytes, r.dirty_bytes, r.ms) for r in t.stats.rounds] == [(1, 100 * MIB, 10 * MIB, 2000)]
    assert t.stats.dirty_rate_bps == 256 * 4096
    assert t.stats.throttle_percent == 20
    t.update_migration(qm("active", 3, 110 * MIB, 2 * MIB, **{"cpu-throttle-percentage": 30,
                                                               "expected-downtime": 120}), now=2.5)
    assert t.stats.throttled_ms == 500  # throttled from 2.0 to 2.5
    assert t.stats.max_throttle_percent == 30 and t.stats.expected_downtime_ms == 120
    t.update_migration(qm("pre-switchover", 3, 110 * MIB, 2 * MIB, **{"cpu-throttle-percentage": 30}), now=3.0)
    assert t.stats.state == MigrationState.PAUSED
    t.update_migration(qm("completed", 4, 112 * MIB, 0, downtime=85), now=3.1)
    s = t.snapshot()
    assert s.state == MigrationState.PAUSED  # COMPLETED only once the driver verified it
    assert s.downtime_ms == 85 and s.throttle_percent == 0 and s.max_throttle_percent == 30
    assert s.throttled_ms == 1100
    assert [r.round for r in s.rounds] == [1, 2, 3]
    assert s.memory.remaining == 0 and s.memory.sent == 112 * MIB


def test_rounds_keep_the_last_twenty() -> None:
    t = StatsTracker("m")
    for i in range(1, 40):
        t.update_migration(qm("active", i, i * MIB, MIB), now=float(i))
    assert len(t.stats.rounds) == 20 and t.stats.rounds[-1].round == 38 and t.stats.rounds[0].round == 1
    assert t.stats.rounds[1].round == 20 and t.stats.rounds[-1].start_ms == 37000


def test_failure_carries_qemus_reason() -> None:
    t = StatsTracker("m")
    t.update_migration({"status": "failed", "error-desc": "Unable to write to socket"}, now=0.0)
    assert t.stats.state == MigrationState.FAILED and t.stats.error == "Unable to write to socket"


@pytest.mark.parametrize(
    ("status", "round_", "expected"),
    [
        ("setup", 0, MigrationState.COPYING),
        ("active", 1, MigrationState.COPYING),
        ("active", 2, MigrationState.CONVERGING),
        ("pre-switchover", 5, MigrationState.PAUSED),
        ("device", 5, MigrationState.PAUSED),
        ("completed", 5, MigrationState.PAUSED),
        ("failed", 5, MigrationState.FAILED),
        ("cancelling", 5, MigrationState.ABORTED),
        ("cancelled", 5, MigrationState.ABORTED),
        ("none", 0, None),
    ],
)
def test_migration_state(status: str, round_: int, expected: MigrationState | None) -> None:
    assert migration_state(status, round_) == expected


def test_stats_round_trip_through_json() -> None:
    import json

    t = StatsTracker("m")
    t.update_mirror({"len": 10, "offset": 5}, now=0.0)
    for i in range(1, 4):
        t.update_migration(qm("active", i, i * MIB, MIB), now=float(i))
    t.stats.digest = "sha256:00"
    data = json.loads(json.dumps(stats_to_dict(t.stats)))
    assert stats_from_dict(data) == t.stats
