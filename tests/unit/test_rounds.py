"""``status.transfer.rounds``: the bounded per-round history and its API shape."""

from __future__ import annotations

from ferry.api.reports import ROUNDS_REPORTED, RoundReport, TransferReport, bounded_rounds


def test_bounded_rounds_keep_the_first_and_the_latest() -> None:
    assert bounded_rounds(range(1, 6)) == [1, 2, 3, 4, 5]
    kept = bounded_rounds(range(1, 101))
    assert len(kept) == ROUNDS_REPORTED and kept[0] == 1 and kept[1] == 82 and kept[-1] == 100


def test_a_round_round_trips_and_old_entries_read_as_unknown() -> None:
    r = RoundReport(3, 1000, 200, 50, start_ms=900, dirty_rate_bps=4000, throttle_percent=20, paused=True)
    d = r.to_dict()
    assert d == {"round": 3, "bytes": 1000, "dirtyBytes": 200, "ms": 50, "startMs": 900, "dirtyRateBps": 4000,
                 "throttlePercent": 20, "paused": True}
    assert RoundReport.from_dict(d) == r
    old = RoundReport.from_dict({"round": 1, "bytes": 5, "dirtyBytes": 1, "ms": 2})
    assert (old.start_ms, old.dirty_rate_bps, old.throttle_percent, old.paused) == (None, None, None, False)
    assert "paused" not in RoundReport(1, 1, 1, 1, paused=False).to_dict()


def test_the_report_writes_at_most_the_bounded_history() -> None:
    rounds = tuple(RoundReport(i, i, 0, 1) for i in range(1, 31))
    patch = TransferReport(1, None, rounds=rounds).to_patch()
    assert [x["round"] for x in patch["rounds"]][:2] == [1, 12] and len(patch["rounds"]) == ROUNDS_REPORTED
