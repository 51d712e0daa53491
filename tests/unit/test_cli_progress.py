"""Following a migration or an evacuation: views, lines, summaries, exit codes, the poll loop."""

from __future__ import annotations

import datetime as dt
import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferry.cli import progress as pg
from ferry.storage import NotFound, StorageError

T0 = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)


def lm(phase=None, *, status=None, spec=None, name="web-1-abc", ns="team", created="2030-01-02T03:04:05Z"):
    st_ = {"phase": phase} if phase else {}
    st_.update(status or {})
    return {"metadata": {"name": name, "namespace": ns, "creationTimestamp": created},
            "spec": {"droplet": "web-1", **(spec or {})}, "status": st_}


PRECOPY = lm("PreCopy", status={
    "attempt": 2, "sourceHost": "host-a", "targetHost": "host-b", "effectiveLimits": {"maxAttempts": 3},
    "progress": 40,
    "transfer": {"attempt": 2, "state": "Converging", "round": 3, "bytesSent": 3 * 2**30 // 2,
                 "bytesTotal": 2**30, "throttlePercent": 20, "etaSeconds": 14.2, "progress": 42,
                 "rounds": [{"round": 1}, {"round": 2}, {"round": 3}]},
})


@pytest.mark.parametrize("n, text", [
    (None, "-"), ("x", "-"), (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
    (5 * 2**20, "5.0 MiB"), (2**30, "1.0 GiB"), (3 * 2**40, "3.0 TiB"), (2**60, "1024.0 PiB"),
    (float("inf"), "-"), (float("-inf"), "-"), (float("nan"), "-"),
])
def test_human_bytes(n, text):
    assert pg.human_bytes(n) == text


@pytest.mark.parametrize("s, text", [
    (None, "-"), (0, "0s"), (2.5, "2.5s"), (9, "9s"), (10.4, "10s"), (59, "59s"), (65, "1m05s"),
    (3599, "59m59s"), (3700, "1h01m"), (90000, "1d1h"), (-5, "0s"), (float("nan"), "-"), (float("inf"), "-"),
])
def test_human_duration(s, text):
    assert pg.human_duration(s) == text


def test_view_of_a_migration_in_precopy():
    v = pg.migration_view(PRECOPY)
    assert (v.key, v.droplet, v.phase, v.attempt, v.max_attempts) == ("team/web-1-abc", "web-1", "PreCopy", 2, 3)
    assert (v.source, v.target, v.round, v.rounds) == ("host-a", "host-b", 3, 3)
    assert v.progress == 42  # the newer transfer report wins over the operator's copy while copying
    assert (v.throttle_percent, v.eta_seconds) == (20, 14.2)
    line = pg.migration_line(v)
    for part in ("PreCopy", " 42%", "attempt 2/3", "host-a -> host-b", "round 3", "sent 1.5 GiB of 1.0 GiB",
                 "throttle 20%", "ETA 14s", "converging"):
        assert part in line, (part, line)


def test_transfer_report_of_another_attempt_is_ignored():
    body = lm("Preparing", status={"attempt": 3, "transfer": {"attempt": 2, "round": 7, "bytesSent": 99,
                                                              "progress": 80}})
    v = pg.migration_view(body)
    assert (v.round, v.bytes_sent, v.progress) == (None, None, None)
    assert "round" not in pg.migration_line(v)


def test_new_migration_says_it_waits_for_the_operator():
    v = pg.migration_view(lm(None))
    assert v.phase is None and pg.migration_exit_code(v) is None
    assert "waiting for the operator" in pg.migration_line(v)
    assert pg.migration_line(v).startswith("New")


def test_waiting_phases_show_reason_and_times():
    v = pg.migration_view(lm("Announced", status={"reason": "WaitingForNotice", "notBefore": "2030-01-02T03:14:05Z"}))
    line = pg.migration_line(v)
    assert "WaitingForNotice" in line and "data moves from 03:14:05Z" in line
    v = pg.migration_view(lm("Scheduling", status={"reason": "RetryBackoff", "nextAttemptAt": "2030-01-02T03:05:00Z"}))
    assert "next attempt at 03:05:00Z" in pg.migration_line(v)
    v = pg.migration_view(lm("Pending", spec={"cancel": True}))
    assert "cancel requested" in pg.migration_line(v)


@pytest.mark.parametrize("phase, code", [
    ("Completed", 0), ("Failed", 1), ("Cancelled", 2), (None, None), ("Pending", None), ("Announced", None),
    ("Scheduling", None), ("Preparing", None), ("PreCopy", None), ("CutOver", None),
])
def test_exit_codes(phase, code):
    assert pg.migration_exit_code(pg.migration_view(lm(phase))) == code


def test_summary_of_a_completed_migration():
    body = lm("Completed", status={
        "attempt": 1, "sourceHost": "host-a", "targetHost": "host-b", "downtimeMs": 87,
        "phaseTimes": {"Completed": "2030-01-02T03:05:07Z"},
        "transfer": {"attempt": 1, "state": "Completed", "round": 4, "bytesSent": 1536 * 2**20, "bytesTotal": 2**30}})
    lines = pg.migration_summary(pg.migration_view(body), T0 + dt.timedelta(hours=1))
    assert lines[0] == "migration team/web-1-abc Completed: droplet web-1 host-a -> host-b"
    assert lines[1] == "  duration 1m02s, attempts 1, rounds 4, sent 1.5 GiB of 1.0 GiB, downtime 87 ms"
    assert len(lines) == 2
    # the guest's whole pause (the source's pause to the target's resume), when both sides said
    body["status"]["guestPauseMs"] = 131
    lines = pg.migration_summary(pg.migration_view(body), T0 + dt.timedelta(hours=1))
    assert lines[1].endswith("downtime 87 ms, guest paused 131 ms in all")


def test_summary_of_a_failed_migration_gives_the_reason_and_where_the_droplet_stays():
    body = lm("Failed", status={"attempt": 3, "sourceHost": "host-a", "failureReason": "no host fits: 2 insufficient cpu",
                                "phaseTimes": {"Failed": "2030-01-02T03:04:35Z"}})
    lines = pg.migration_summary(pg.migration_view(body), T0)
    assert lines[0].endswith("host-a -> ? (the droplet stays on host-a)")
    assert "duration 30s" in lines[1] and "attempts 3" in lines[1]
    assert lines[-1] == "  reason: no host fits: 2 insufficient cpu"


def test_summary_of_a_cancelled_migration():
    body = lm("Cancelled", status={"sourceHost": "host-a", "message": "cancelled by the user"})
    lines = pg.migration_summary(pg.migration_view(body), T0)
    assert "Cancelled" in lines[0] and "stays on host-a" in lines[0]
    assert lines[-1] == "  cancelled by the user"


junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12)
keys = st.sampled_from(["phase", "attempt", "sourceHost", "targetHost", "transfer", "progress", "downtimeMs",
                        "phaseTimes", "failureReason", "reason", "notBefore", "nextAttemptAt", "effectiveLimits",
                        "round", "bytesSent", "bytesTotal", "rounds", "etaSeconds", "throttlePercent"])


@settings(max_examples=300, deadline=None)
@given(status=st.dictionaries(keys, junk | st.dictionaries(keys, junk | st.sampled_from(
           [float("inf"), float("-inf"), -1, 2**70, "PreCopy"]), max_size=6), max_size=10),
       phase=st.sampled_from([None, "PreCopy", "Completed", "Failed", "Announced", "Scheduling"]),
       created=st.sampled_from([None, "garbage", "2030-01-02T03:04:05Z"]))
def test_any_status_renders_without_raising(status, phase, created):
    """Whatever a (buggy or older) writer put in the status, the CLI renders something."""
    status = dict(status)
    if phase:
        status["phase"] = phase
    body = {"metadata": {"name": "m", "namespace": "ns", "creationTimestamp": created},
            "spec": {"droplet": "d"}, "status": status}
    v = pg.migration_view(body)
    assert isinstance(pg.migration_line(v), str)
    assert pg.migration_summary(v, T0)[0].startswith("migration ns/m ")
    assert v.progress is None or 0 <= v.progress <= 100
    pg.LineMigrationDisplay(io.StringIO()).show(body)


# --- evacuation -----------------------------------------------------------------------------------


def host(phase=None, *, evacuation=None, generation=2, observed=2, maintenance=True):
    status = {"phase": phase, "observedGeneration": observed} if phase else {}
    if evacuation is not None:
        status["evacuation"] = evacuation
    return {"metadata": {"name": "host-a", "generation": generation},
            "spec": {"maintenance": {"reason": "kernel"}} if maintenance else {}, "status": status}


def ev(left, running=0, failed=0, completed=0):
    return {"dropletsLeft": left, "migrationsRunning": running, "migrationsFailed": failed,
            "migrationsCompleted": completed}


@pytest.mark.parametrize("body, code", [
    (host("Evacuated", evacuation=ev(0, completed=3)), 0),
    (host("Draining", evacuation=ev(2, running=2, completed=1)), None),
    (host("Draining", evacuation=ev(1, running=0, failed=1, completed=2)), 1),
    (host("Draining", evacuation=ev(2, running=1, failed=1)), None),  # one still running: wait for it
    (host("Draining", evacuation=ev(1, running=0, failed=0)), None),  # nothing failed yet: keep waiting
    # the status still describes the spec before our patch: never conclude from it
    (host("Evacuated", evacuation=ev(0), generation=3, observed=2), None),
    (host("Draining", evacuation=ev(1, failed=1), generation=3, observed=2), None),
    (host(None), None),  # the operator has not written any status
    (host("Evacuated", evacuation=ev(0), maintenance=False), None),  # someone uncordoned it meanwhile
    (host("NotReady", evacuation=ev(2)), None),
])
def test_drain_exit_code(body, code):
    assert pg.drain_exit_code(pg.evacuation_view(body)) == code


def test_evacuation_lines_and_summary():
    v = pg.evacuation_view(host("Draining", evacuation=ev(1, running=0, failed=1, completed=2)))
    assert pg.evacuation_line(v) == "host host-a Draining: 1 droplet(s) left, 0 migrating, 2 completed, 1 failed"
    failed = lm("Failed", name="evacuate-host-a-web-1-123456", status={"failureReason": "target lost"})
    ok = lm("Completed", name="evacuate-host-a-web-2-abcdef")
    lines = pg.drain_summary(v, [failed, ok])
    assert lines[1] == "  team/evacuate-host-a-web-1-123456 (droplet web-1) failed: target lost"
    assert len(lines) == 2
    done = pg.evacuation_view(host("Evacuated", evacuation=ev(0, completed=3)))
    assert "ferry uncordon host-a" in pg.drain_summary(done, [])[-1]
    stale = pg.evacuation_view(host("Evacuated", evacuation=ev(0), generation=5, observed=4))
    assert "waiting for the operator" in pg.evacuation_line(stale)


# --- the poll loop ----------------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.t = 0.0
        self.sleeps: list[float] = []

    def sleep(self, s):
        self.sleeps.append(s)
        self.t += s

    def __call__(self):
        return self.t


def test_poll_shows_every_value_and_returns_the_code():
    values = iter([lm("Pending"), lm("PreCopy"), lm("PreCopy"), lm("Completed")])
    shown = []
    clock = Clock()
    body, code = pg.poll(lambda: next(values), shown.append,
                         lambda b: pg.migration_exit_code(pg.migration_view(b)),
                         interval=0.5, sleep=clock.sleep, clock=clock)
    assert code == 0 and body["status"]["phase"] == "Completed"
    assert [b["status"]["phase"] for b in shown] == ["Pending", "PreCopy", "PreCopy", "Completed"]
    assert clock.sleeps == [0.5, 0.5, 0.5]


def test_poll_rides_out_a_short_api_outage_and_reports_it_once():
    seq = [StorageError("down"), StorageError("down"), lm("Failed")]
    errors = []

    def fetch():
        item = seq.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    clock = Clock()
    _, code = pg.poll(fetch, lambda b: None, lambda b: pg.migration_exit_code(pg.migration_view(b)),
                      interval=1, error_grace=10, on_error=errors.append, sleep=clock.sleep, clock=clock)
    assert code == 1
    assert len(errors) == 1


def test_poll_gives_up_after_the_grace_period():
    clock = Clock()

    def fetch():
        raise StorageError("down for good")

    with pytest.raises(StorageError, match="down for good"):
        pg.poll(fetch, lambda b: None, lambda b: None, interval=1, error_grace=5, sleep=clock.sleep, clock=clock)
    assert 5 <= clock.t <= 6


def test_poll_stops_at_once_when_the_object_is_gone():
    clock = Clock()

    def fetch():
        raise NotFound("gone")

    with pytest.raises(NotFound):
        pg.poll(fetch, lambda b: None, lambda b: None, sleep=clock.sleep, clock=clock)
    assert clock.sleeps == []


# --- displays ---------------------------------------------------------------------------------------


def test_line_display_prints_one_line_per_change():
    out = io.StringIO()
    d = pg.LineMigrationDisplay(out, now=lambda: T0)
    for body in [lm(None), lm("Pending"), lm("Pending"), PRECOPY, PRECOPY, lm("Completed")]:
        d.show(body)
    lines = out.getvalue().splitlines()
    assert len(lines) == 4
    assert all(line.startswith("03:04:05Z ") for line in lines)
    assert [line.split()[1] for line in lines] == ["New", "Pending", "PreCopy", "Completed"]


def test_line_drain_display_prints_host_and_migration_changes():
    out = io.StringIO()
    d = pg.LineDrainDisplay(out, now=lambda: T0)
    h1 = host("Draining", evacuation=ev(2, running=2))
    m1 = lm("PreCopy", name="evacuate-1")
    d.show((h1, [m1]))
    d.show((h1, [m1]))
    d.show((host("Evacuated", evacuation=ev(0, completed=2)), [lm("Completed", name="evacuate-1")]))
    lines = out.getvalue().splitlines()
    assert len(lines) == 4, lines
    assert "Draining" in lines[0] and "web-1: PreCopy" in lines[1]
    assert "Evacuated" in lines[2] and "web-1: Completed" in lines[3]


def test_rich_display_draws_a_bar_with_the_details():
    from rich.console import Console

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160, color_system=None)
    with pg.RichMigrationDisplay(console) as d:
        d.show(lm("Pending"))
        d.show(PRECOPY)
        console.print()  # not needed for the final frame, which stop() renders
    text = out.getvalue()
    assert "web-1 PreCopy" in text
    assert "42%" in text and "round 3" in text and "throttle 20%" in text and "ETA 14s" in text
    assert "━" in text  # the bar


def test_rich_drain_display_has_a_row_per_migration():
    from rich.console import Console

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160, color_system=None)
    with pg.RichDrainDisplay(console) as d:
        d.show((host("Draining", evacuation=ev(1, running=1, completed=1)),
                [lm("PreCopy", name="evacuate-1", status={"progress": 30})]))
    text = out.getvalue()
    assert "host host-a Draining" in text and "1/2" in text
    assert "web-1 PreCopy" in text and "30%" in text
