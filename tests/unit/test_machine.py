"""Table-driven tests of the LiveMigration state machine (ferry.migration.machine)."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest

from ferry.api.models import Droplet
from ferry.api.sizes import Resources
from ferry.api.conditions import Condition
from ferry.api.livemigration import AttemptRecord, Limits, MigrationSpec, MigrationStatus, ProgressMark
from ferry.api.patch import merge_patch
from ferry.api.phases import IN_FLIGHT, OWNING
from ferry.api.reports import TargetReport, TransferReport
from ferry.api.times import fmt_api
from ferry.migration.actions import Announce, ClearAnnouncement, CreateSecret, DeleteSecret, EmitEvent, FlipRecord, MarkDropletCondition, RecomputeAllocations, RecordLastMigration, SetLabels
from ferry.migration.admission import Admission, ConcurrencyLimits, MigrationRef, admit
from ferry.migration.machine import Decision, decide, needs_admission, needs_placement
from ferry.migration.observation import DropletObs, MachineConfig, Observation
from ferry.placement import DropletRequest, HostInfo, Reservation, place

UTC = dt.timezone.utc
T0 = dt.datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
CFG = MachineConfig()


def sec(n: float) -> dt.timedelta:
    return dt.timedelta(seconds=n)


ANNOUNCED_AT = T0 - sec(700)  # notice (600 s) already over at T0


def droplet(**kw) -> DropletObs:
    base = dict(exists=True, host="h1", host_ready=True, image_gib=10.0, maintenance_since=ANNOUNCED_AT)
    base.update(kw)
    return DropletObs(**base)


def spec(**kw) -> MigrationSpec:
    return MigrationSpec(droplet="web-1", **kw)


def status(phase: str | None, **kw) -> MigrationStatus:
    """A consistent status in ``phase``; attempt phases get attempt 1 to h2 started at T0-10s."""
    base: dict = {"phase": phase}
    if phase not in (None, "Pending"):
        base.update(
            source_host="h1",
            announced_at=ANNOUNCED_AT,
            not_before=ANNOUNCED_AT + sec(600),
            effective_limits=Limits(None, 300, 3, 300),
            effective_mode="live",
            phase_times={"Pending": ANNOUNCED_AT, "Announced": ANNOUNCED_AT},
            conditions=(Condition("Announced", "True", "MaintenanceEventPublished", "", ANNOUNCED_AT),),
        )
    if phase in ("Preparing", "PreCopy", "CutOver"):
        base.update(
            target_host="h2",
            attempt=1,
            attempts=(AttemptRecord(1, T0 - sec(10)),),
            progress_mark=ProgressMark(1, "-/0/0|-", T0 - sec(10)),
        )
    base.update(kw)
    return MigrationStatus(**base)


def obs(phase: str | None = None, *, st: MigrationStatus | None = None, **kw) -> Observation:
    base = dict(
        name="lm-1",
        spec=spec(),
        created_at=T0 - sec(1000),
        status=st if st is not None else status(phase),
        droplet=droplet(),
        target_host_ready=True if phase in ("Preparing", "PreCopy", "CutOver") else None,
        secret_exists=phase in ("Preparing", "PreCopy", "CutOver"),
    )
    if base["status"].phase in ("Pending", "Announced"):
        base["admission"] = Admission(True, "Admitted")
    base.update(kw)
    return Observation(**base)


def events(d: Decision, on: str | None = None) -> list[EmitEvent]:
    return [a for a in d.actions if isinstance(a, EmitEvent) and (on is None or a.on == on)]


def non_events(d: Decision) -> list:
    return [a for a in d.actions if not isinstance(a, EmitEvent)]


def hosts(*specs: tuple) -> list[HostInfo]:
    return [HostInfo(n, "nyc3", Resources(16, 32768, 1000), allocated=a, **kw) for n, a, kw in specs]


def placement(target_host: str | None = None, *, hs=None, inbound_limit=None, res=Resources(2, 4096, 80)):
    hs = hs if hs is not None else hosts(("h1", Resources(0, 0, 0), {}), ("h2", Resources(0, 0, 0), {}))
    req = DropletRequest("default/web-1", "nyc3", res, source_host="h1")
    return place(req, hs, [], target_host=target_host, inbound_limit=inbound_limit)


# ---------------------------------------------------------------- new and Pending


def test_new_migration_becomes_pending():
    d = decide(obs(None, generation=4), T0)
    assert d.phase == "Pending"
    assert d.new_status.phase_times == {"Pending": T0}
    assert d.status["phase"] == "Pending"
    assert d.status["observedGeneration"] == 4
    assert d.status["effectiveLimits"] == {"downtimeMs": 300, "maxAttempts": 3, "maxDowntimeMs": 300}
    assert d.status["effectiveMode"] == "live"
    assert [e.reason for e in events(d)] == ["Accepted"]
    assert d.requeue_after == 0 and not d.done
    assert "sourceHost" not in d.status  # recorded at admission, not creation


def test_spec_limits_override_defaults():
    d = decide(obs(None, spec=spec(limits=Limits(50, 100, 7))), T0)
    assert d.new_status.effective_limits == Limits(50, 100, 7, 100)


@pytest.mark.parametrize(
    "admission, reason",
    [
        (Admission(False, "DropletBusy", "droplet web-1 is being migrated by lm-0"), "DropletBusy"),
        (Admission(False), "DropletBusy"),  # no reason given: the only gate in Pending
    ],
)
def test_pending_waits_while_droplet_busy(admission, reason):
    d = decide(obs("Pending", admission=admission, droplet=droplet(maintenance_since=None)), T0)
    assert d.phase == "Pending"
    assert d.new_status.reason == reason
    assert d.new_status.message == (admission.message or "waiting for another migration of the droplet")
    assert d.actions == ()  # not announced
    assert d.requeue_after == CFG.poll_seconds


def test_pending_needs_admission():
    with pytest.raises(ValueError, match="admission"):
        decide(obs("Pending", admission=None), T0)


def test_pending_admitted_announces():
    o = obs("Pending", droplet=droplet(maintenance_since=None))
    d = decide(o, T0)
    assert d.phase == "Announced"
    nb = T0 + sec(600)
    assert non_events(d) == [Announce("web-1", T0, nb)]
    assert d.new_status.announced_at == T0 and d.new_status.not_before == nb
    assert d.new_status.source_host == "h1"
    assert d.new_status.condition("Announced").status == "True"
    assert d.new_status.phase_times["Announced"] == T0
    assert {e.on for e in events(d)} == {"migration", "droplet"}


def test_scheduled_at_later_than_notice_sets_not_before():
    at = T0 + sec(3600)
    d = decide(obs("Pending", spec=spec(scheduled_at=at), droplet=droplet(maintenance_since=None)), T0)
    assert d.new_status.not_before == at
    assert non_events(d) == [Announce("web-1", T0, at)]


def test_already_annotated_droplet_is_not_announced_again():
    since = T0 - sec(300)
    d = decide(obs("Pending", droplet=droplet(maintenance_since=since)), T0)
    assert d.phase == "Announced"
    assert not any(isinstance(a, Announce) for a in d.actions)
    assert d.new_status.announced_at == since
    assert d.new_status.not_before == since + sec(600)


@pytest.mark.parametrize(
    "drop, reason, words",
    [
        (DropletObs.missing(), "DropletNotFound", "not found"),
        (droplet(deleting=True), "DropletDeleted", "being deleted"),
        (droplet(host=None), "DropletNotPlaced", "no host"),
        (droplet(host_ready=False), "HostNotReady", "live migration is impossible"),
    ],
)
@pytest.mark.parametrize("phase", ["Pending", "Announced", "Scheduling", "Preparing", "PreCopy"])
def test_droplet_problems_fail(drop, reason, words, phase):
    d = decide(obs(phase, droplet=drop), T0)
    assert d.phase == "Failed"
    assert d.new_status.reason == reason
    assert words in d.new_status.failure_reason
    assert d.done and d.requeue_after is None
    assert d.new_status.condition("Failed").status == "True"
    assert not any(isinstance(a, (FlipRecord, Announce)) for a in d.actions)
    if phase in ("Preparing", "PreCopy"):
        assert d.new_status.attempts[-1].result == "Failed"
        assert DeleteSecret("lm-1-transfer") in d.actions
    if drop.exists:
        assert any(e.on == "droplet" and e.type == "Warning" for e in events(d))
    else:
        assert not events(d, "droplet")


def test_host_not_ready_names_the_source():
    d = decide(obs("PreCopy", droplet=droplet(host_ready=False)), T0)
    assert "source host h1 is not ready" in d.new_status.failure_reason


def test_droplet_moved_elsewhere_fails_source_changed():
    d = decide(obs("Preparing", droplet=droplet(host="h9")), T0)
    assert d.phase == "Failed" and d.new_status.reason == "SourceChanged"


def test_busy_migration_survives_droplet_move_by_earlier_one():
    # created while the droplet was on h0; another migration moved it to h1; not yet admitted
    o = obs(None, droplet=droplet(host="h0"))
    st = MigrationStatus.from_dict({**o.status.to_dict(), **decide(o, T0).status})
    d = decide(obs("Pending", st=st, droplet=droplet(host="h1")), T0)
    assert d.phase == "Announced" and d.new_status.source_host == "h1"


# ---------------------------------------------------------------- cancel


@pytest.mark.parametrize("phase", ["Pending", "Announced", "Scheduling", "Preparing", "PreCopy", "CutOver"])
@pytest.mark.parametrize("how", ["cancel", "delete"])
def test_cancel_before_flip(phase, how):
    kw = {"spec": spec(cancel=True)} if how == "cancel" else {"deleting": True}
    o = obs(phase, **kw)
    d = decide(o, T0)
    assert d.phase == "Cancelled"
    assert d.done
    assert "keeps running on h1" in d.new_status.message
    assert d.new_status.phase_times["Cancelled"] == T0
    assert not any(isinstance(a, FlipRecord) for a in d.actions)
    announced = phase != "Pending"
    assert (ClearAnnouncement("web-1") in d.actions) == announced
    if phase in ("Preparing", "PreCopy", "CutOver"):
        assert d.new_status.attempts[-1].result == "Cancelled"
        assert DeleteSecret("lm-1-transfer") in d.actions
    assert d.new_status.condition("Succeeded").reason == "Cancelled"
    if how == "delete":
        assert "being deleted" in d.new_status.message


def test_cancel_in_pending_never_clears_someone_elses_announcement():
    # Waiting (DropletBusy) behind another migration that announced the droplet.
    o = obs("Pending", spec=spec(cancel=True), droplet=droplet(maintenance_since=T0 - sec(5)))
    d = decide(o, T0)
    assert d.phase == "Cancelled"
    assert ClearAnnouncement("web-1") not in d.actions


# ---------------------------------------------------------------- Announced


def test_announced_waits_for_notice():
    st = status("Announced", announced_at=T0 - sec(100), not_before=T0 + sec(500))
    d = decide(obs("Announced", st=st, droplet=droplet(maintenance_since=T0 - sec(100))), T0)
    assert d.phase == "Announced"
    assert d.new_status.reason == "WaitingForNotice"
    assert d.requeue_after == CFG.poll_seconds  # capped; 500 s remain
    assert non_events(d) == []
    d2 = decide(
        obs("Announced", st=st, droplet=droplet(maintenance_since=T0 - sec(100))), T0 + sec(490)
    )
    assert d2.requeue_after == pytest.approx(10)


def test_announced_waits_for_schedule():
    at = T0 + sec(5000)
    st = status("Announced", announced_at=T0 - sec(100), not_before=at)
    d = decide(obs("Announced", st=st, spec=spec(scheduled_at=at)), T0)
    assert d.phase == "Announced" and d.new_status.reason == "WaitingForSchedule"


def test_announced_moves_to_scheduling_when_notice_over_and_slot_admitted():
    d = decide(obs("Announced"), T0)
    assert d.phase == "Scheduling"
    assert d.new_status.phase_times["Scheduling"] == T0
    assert "concurrency slot taken" in d.new_status.message
    assert non_events(d) == []
    assert d.requeue_after == 0


def test_announced_without_slot_stays_announced_and_queued():
    adm = Admission(False, "ConcurrencyLimitReached", "5 migrations in flight cluster-wide (limit 5)")
    d = decide(obs("Announced", admission=adm), T0)
    assert d.phase == "Announced"  # told, notice over, queued: not back to Pending
    assert d.new_status.reason == "ConcurrencyLimitReached"
    assert d.new_status.message == (
        f"notice over at {fmt_api(ANNOUNCED_AT + sec(600))}; waiting for a concurrency slot: {adm.message}"
    )
    assert d.actions == ()  # the announcement stays up, nothing else happens
    assert d.requeue_after == CFG.poll_seconds
    assert d.new_status.announced_at == ANNOUNCED_AT and d.new_status.condition("Announced").status == "True"
    # the slot frees up: on to Scheduling
    d2 = decide(obs("Announced", st=d.new_status), T0 + sec(3))
    assert d2.phase == "Scheduling"


def test_announced_droplet_busy_waits_in_announced():
    adm = Admission(False, "DropletBusy", "droplet default/web-1 is being migrated by default/lm-0; waiting")
    d = decide(obs("Announced", admission=adm), T0)
    assert d.phase == "Announced" and d.new_status.reason == "DropletBusy"
    assert "waiting for its droplet" in d.new_status.message


def test_announced_needs_admission_only_once_the_notice_is_over():
    st = status("Announced", announced_at=T0 - sec(100), not_before=T0 + sec(500))
    o = obs("Announced", st=st, droplet=droplet(maintenance_since=T0 - sec(100)), admission=None)
    assert not needs_admission(o, T0, CFG)
    assert needs_admission(o)  # without a clock: conservative
    assert decide(o, T0).new_status.reason == "WaitingForNotice"  # does not read it
    assert needs_admission(o, T0 + sec(500), CFG)
    with pytest.raises(ValueError, match="admission"):
        decide(o, T0 + sec(500))
    # a longer notice in the config: still waiting, and needs_admission agrees
    long = MachineConfig(notice_seconds=700)
    assert not needs_admission(o, T0 + sec(500), long)
    assert decide(o, T0 + sec(500), long).phase == "Announced"
    # the annotation vanished: re-announced, no admission read
    gone = dataclasses.replace(o, droplet=droplet(maintenance_since=None))
    assert not needs_admission(gone, T0 + sec(9999), CFG)
    assert decide(gone, T0 + sec(9999)).new_status.reason == "Reannounced"
    for phase in (None, "Scheduling", "Preparing", "PreCopy", "CutOver", "Completed"):
        assert not needs_admission(obs(phase), T0), phase
    assert needs_admission(obs("Pending"), T0)


def test_notice_is_exact_to_the_second():
    st = status("Announced", announced_at=T0, not_before=T0 + sec(600))
    assert decide(obs("Announced", st=st), T0 + sec(599.999)).phase == "Announced"
    assert decide(obs("Announced", st=st), T0 + sec(600)).phase == "Scheduling"


def test_vanished_annotation_is_reannounced_and_notice_restarts():
    d = decide(obs("Announced", droplet=droplet(maintenance_since=None)), T0)
    assert d.phase == "Announced"
    assert non_events(d) == [Announce("web-1", T0, T0 + sec(600))]
    assert d.new_status.announced_at == T0
    assert [e.reason for e in events(d)] == ["Reannounced"]


def test_notice_counts_from_the_later_of_status_and_annotation():
    # re-announced at T0-100 but that status write was lost: status still says T0-700
    d = decide(obs("Announced", droplet=droplet(maintenance_since=T0 - sec(100))), T0)
    assert d.phase == "Announced" and d.new_status.reason == "WaitingForNotice"
    assert d.new_status.announced_at == T0 - sec(100)
    assert d.new_status.not_before == T0 + sec(500)
    d = decide(obs("Scheduling", droplet=droplet(maintenance_since=T0 - sec(100)), placement=placement()), T0)
    assert d.phase == "Announced"


def test_changed_scheduled_at_moves_not_before_and_annotation():
    at = T0 + sec(7200)
    d = decide(obs("Announced", spec=spec(scheduled_at=at)), T0)
    assert d.phase == "Announced"
    assert d.new_status.not_before == at
    assert non_events(d) == [Announce("web-1", ANNOUNCED_AT, at)]


# ---------------------------------------------------------------- Scheduling


def test_scheduling_needs_placement():
    with pytest.raises(ValueError, match="placement"):
        decide(obs("Scheduling"), T0)


def test_scheduling_chooses_target_and_reserves():
    p = placement()
    d = decide(obs("Scheduling", placement=p), T0)
    assert d.phase == "Preparing"
    ns = d.new_status
    assert (ns.target_host, ns.source_host, ns.attempt) == ("h2", "h1", 1)
    assert ns.attempts == (AttemptRecord(1, T0, target_host="h2"),)
    assert ns.reserved_target == "h2"
    assert ns.placement == p.to_status()
    assert ns.progress == 0 and ns.effective_mode == "live"
    assert non_events(d) == [SetLabels("web-1", "h1", "h2"), CreateSecret("lm-1-transfer")]
    assert "attempt 1/3" in ns.message and "h2" in ns.message


def test_scheduling_does_not_recreate_existing_secret():
    d = decide(obs("Scheduling", placement=placement(), secret_exists=True), T0)
    assert not any(isinstance(a, CreateSecret) for a in d.actions)


@pytest.mark.parametrize(
    "mode, power, effective", [("live", "on", "live"), ("offline", "on", "offline"), ("live", "off", "offline")]
)
def test_effective_mode(mode, power, effective):
    o = obs("Scheduling", spec=spec(mode=mode), droplet=droplet(power_state=power), placement=placement())
    assert decide(o, T0).new_status.effective_mode == effective


def test_explicit_target_failing_filters_fails_with_placement_message():
    hs = hosts(("h1", Resources(0, 0, 0), {}), ("h3", Resources(0, 32768 - 2048, 0), {}))
    p = placement("h3", hs=hs)
    d = decide(obs("Scheduling", spec=spec(target_host="h3"), placement=p), T0)
    assert d.phase == "Failed"
    assert d.new_status.reason == "TargetHostRejected"
    assert d.new_status.failure_reason == "target host h3 rejected: insufficient memory (needs 4096 MiB, 2048 free)"
    assert d.new_status.placement["chosen"] is None


def test_explicit_target_at_inbound_limit_waits():
    hs = hosts(("h1", Resources(0, 0, 0), {}), ("h3", Resources(0, 0, 0), {"inbound_migrations": 2}))
    p = placement("h3", hs=hs, inbound_limit=2)
    d = decide(obs("Scheduling", spec=spec(target_host="h3"), placement=p), T0)
    assert d.phase == "Scheduling" and d.new_status.reason == "TargetHostBusy"


def test_no_host_fits_waits_then_fails():
    hs = hosts(("h1", Resources(0, 0, 0), {}), ("h2", Resources(16, 0, 0), {}))
    p = placement(hs=hs)
    st = status("Scheduling", phase_times={"Scheduling": T0})
    d = decide(obs("Scheduling", st=st, placement=p), T0 + sec(5))
    assert d.phase == "Scheduling" and d.new_status.reason == "NoHostAvailable"
    assert d.new_status.message == "no host fits: 1 source host, 1 insufficient cpu"
    assert [e.type for e in events(d)] == ["Warning"]
    assert d.requeue_after == CFG.poll_seconds
    # the same wait again: no second Event
    st2 = dataclasses.replace(d.new_status)
    d2 = decide(obs("Scheduling", st=st2, placement=p), T0 + sec(35))
    assert d2.new_status.reason == "NoHostAvailable" and events(d2) == [] and d2.status == {}
    d3 = decide(obs("Scheduling", st=st2, placement=p), T0 + sec(CFG.no_host_timeout_seconds))
    assert d3.phase == "Failed" and d3.new_status.reason == "NoHostAvailable"
    assert "no host fits" in d3.new_status.failure_reason


def test_fitting_hosts_at_inbound_limit_wait_without_bound():
    hs = hosts(("h1", Resources(0, 0, 0), {}), ("h2", Resources(0, 0, 0), {"inbound_migrations": 2}))
    p = placement(hs=hs, inbound_limit=2)
    st = status("Scheduling", phase_times={"Scheduling": T0 - sec(99999)})
    d = decide(obs("Scheduling", st=st, placement=p), T0)
    assert d.phase == "Scheduling" and d.new_status.reason == "TargetsBusy"


def test_scheduling_waits_for_backoff_without_placement():
    st = status("Scheduling", attempt=1, attempts=(AttemptRecord(1, T0 - sec(60), T0 - sec(5), "Failed", "X"),),
                next_attempt_at=T0 + sec(15))
    d = decide(obs("Scheduling", st=st), T0)  # no placement needed
    assert d.phase == "Scheduling" and d.new_status.reason == "RetryBackoff"
    assert d.requeue_after == pytest.approx(15)
    assert not needs_placement(obs("Scheduling", st=st), T0)
    assert needs_placement(obs("Scheduling", st=st), T0 + sec(15))


def test_retry_starts_next_attempt():
    st = status("Scheduling", attempt=1, attempts=(AttemptRecord(1, T0 - sec(60), T0 - sec(25), "Failed", "X"),),
                next_attempt_at=T0 - sec(5))
    d = decide(obs("Scheduling", st=st, placement=placement(), secret_exists=True), T0)
    assert d.phase == "Preparing"
    assert d.new_status.attempt == 2
    assert [a.number for a in d.new_status.attempts] == [1, 2]
    assert d.new_status.next_attempt_at is None and d.status["nextAttemptAt"] is None


def test_scheduling_never_moves_data_unannounced():
    st = status("Scheduling", not_before=T0 + sec(100))
    d = decide(obs("Scheduling", st=st, placement=placement()), T0)
    assert d.phase == "Announced" and non_events(d) == []  # still visible: no new notice
    later = T0 + sec(5000)
    d = decide(obs("Scheduling", spec=spec(scheduled_at=later), placement=placement()), T0)
    assert d.phase == "Announced" and d.new_status.not_before == later
    assert non_events(d) == [Announce("web-1", ANNOUNCED_AT, later)]
    d = decide(obs("Scheduling", droplet=droplet(maintenance_since=None), placement=placement()), T0)
    assert d.phase == "Announced"
    assert Announce("web-1", T0, T0 + sec(600)) in d.actions


# ---------------------------------------------------------------- Preparing


def test_preparing_moves_to_precopy_when_target_listens():
    d = decide(obs("Preparing", target=TargetReport(1, "Listening", "10.0.0.2:7000")), T0)
    assert d.phase == "PreCopy"
    assert non_events(d) == []
    assert d.new_status.phase_times["PreCopy"] == T0


def test_preparing_ignores_older_attempt_report():
    st = status("Preparing", attempt=2, attempts=(AttemptRecord(1, T0 - sec(90), T0 - sec(50), "Failed", "X"),
                                                   AttemptRecord(2, T0 - sec(10))))
    d = decide(obs("Preparing", st=st, target=TargetReport(1, "Listening", "10.0.0.2:7000")), T0)
    assert d.phase == "Preparing" and d.new_status.reason == "WaitingForTarget"
    d = decide(obs("Preparing", st=st, target=TargetReport(1, "Failed", error="old")), T0)
    assert d.phase == "Preparing"


@pytest.mark.parametrize(
    "kw, reason",
    [
        ({"target": TargetReport(1, "Failed", error="disk full")}, "TargetFailed"),
        ({"transfer": TransferReport(1, "Failed", error="VM process died")}, "SourceFailed"),
        ({"target_host_ready": False}, "TargetHostNotReady"),
    ],
)
@pytest.mark.parametrize("phase", ["Preparing", "PreCopy", "CutOver"])
def test_attempt_failure_retries_with_backoff(kw, reason, phase):
    d = decide(obs(phase, **kw), T0)
    assert d.phase == "Scheduling"
    ns = d.new_status
    assert ns.reason == "RetryBackoff"
    assert ns.attempts[-1].result == "Failed" and ns.attempts[-1].reason == reason
    assert ns.attempts[-1].end_time == T0
    assert ns.next_attempt_at == T0 + sec(20)
    assert ns.target_host is None and ns.reserved_target is None
    assert d.status["targetHost"] is None  # merge patch deletes the reservation
    assert d.requeue_after == 20
    assert [(e.type, e.reason) for e in events(d)] == [("Warning", "RetryBackoff")]
    assert not any(isinstance(a, FlipRecord) for a in d.actions)


def test_backoff_doubles():
    st = status("PreCopy", attempt=2, attempts=(AttemptRecord(1, T0 - sec(300), T0 - sec(200), "Failed", "X"),
                                                 AttemptRecord(2, T0 - sec(10))))
    d = decide(obs("PreCopy", st=st, transfer=TransferReport(2, "Failed")), T0)
    assert d.new_status.next_attempt_at == T0 + sec(40)


def test_last_attempt_failure_fails_and_asks_for_offline_migration():
    st = status("PreCopy", attempt=3, attempts=tuple(AttemptRecord(i, T0 - sec(100 - i)) for i in (1, 2, 3)))
    d = decide(obs("PreCopy", st=st, transfer=TransferReport(3, "Failed", error="link down")), T0)
    assert d.phase == "Failed" and d.done
    ns = d.new_status
    assert ns.reason == "AttemptsExhausted"
    assert "after 3 attempts" in ns.failure_reason and "SourceFailed" in ns.failure_reason
    assert "offline migration is needed" in ns.failure_reason
    assert "keeps running on h1" in ns.failure_reason
    marks = [a for a in d.actions if isinstance(a, MarkDropletCondition)]
    assert [(c.type, c.status) for c in marks] == [("OfflineMigrationNeeded", True)]
    warn = [e for e in events(d, "droplet") if e.type == "Warning"]
    assert [e.reason for e in warn] == ["OfflineMigrationNeeded"]
    assert ClearAnnouncement("web-1") in d.actions and DeleteSecret("lm-1-transfer") in d.actions
    assert ns.next_attempt_at is None


def test_max_attempts_from_spec():
    o = obs("PreCopy", spec=spec(limits=Limits(max_attempts=1)), transfer=TransferReport(1, "Aborted"))
    o = dataclasses.replace(o, status=dataclasses.replace(o.status, effective_limits=Limits(None, 300, 1)))
    assert decide(o, T0).phase == "Failed"


def test_no_progress_fails_attempt():
    tr = TransferReport(1, "Copying", round=1, bytes_sent=1000)
    st = status("PreCopy", progress_mark=ProgressMark(1, "Copying/1/1000|Listening", T0 - sec(120)))
    d = decide(obs("PreCopy", st=st, transfer=tr, target=TargetReport(1, "Listening", "a:1")), T0)
    assert d.phase == "Scheduling" and d.new_status.attempts[-1].reason == "NoProgress"


def test_progress_resets_the_clock():
    tr = TransferReport(1, "Copying", round=1, bytes_sent=2000, progress=40)
    st = status("PreCopy", progress_mark=ProgressMark(1, "Copying/1/1000|Listening", T0 - sec(119)))
    d = decide(obs("PreCopy", st=st, transfer=tr, target=TargetReport(1, "Listening", "a:1")), T0)
    assert d.phase == "PreCopy" and d.new_status.reason == "Copying"
    assert d.new_status.progress_mark == ProgressMark(1, "Copying/1/2000|Listening", T0)
    assert d.new_status.progress == 40 and d.status["progressText"] == "40%"
    assert non_events(d) == [] and events(d) == []


def test_preparing_without_target_report_times_out():
    st = status("Preparing", progress_mark=ProgressMark(1, "-/0/0|-", T0 - sec(121)))
    d = decide(obs("Preparing", st=st), T0)
    assert d.phase == "Scheduling" and d.new_status.attempts[-1].reason == "NoProgress"


def test_completion_budget():
    # image 1 GiB: budget 120 + 60 = 180 s from the attempt start, progress or not
    tr = TransferReport(1, "Converging", round=9, bytes_sent=10**9)
    st = status("PreCopy", attempts=(AttemptRecord(1, T0 - sec(180)),))
    o = obs("PreCopy", st=st, transfer=tr, droplet=droplet(image_gib=1.0))
    d = decide(o, T0)
    assert d.phase == "Scheduling" and d.new_status.attempts[-1].reason == "BudgetExceeded"
    d = decide(o, T0 - sec(1))
    assert d.phase == "PreCopy"
    assert d.requeue_after == pytest.approx(1)


# ---------------------------------------------------------------- PreCopy -> CutOver


def done_reports(n=1, src="sha256:aa", dst="sha256:aa"):
    return dict(
        transfer=TransferReport(n, "Completed", round=4, bytes_sent=5, progress=100, digest=src, downtime_ms=87),
        target=TargetReport(n, "Received", "10.0.0.2:7000", digest=dst),
    )


def test_equal_digests_cut_over():
    d = decide(obs("PreCopy", **done_reports()), T0)
    assert d.phase == "CutOver"
    assert non_events(d) == [FlipRecord("web-1", "h1", "h2")]
    assert d.new_status.downtime_ms == 87 and d.status["downtimeText"] == "87ms"
    assert d.new_status.progress == 100


def test_unequal_digests_fail_attempt():
    d = decide(obs("PreCopy", **done_reports(dst="sha256:bb")), T0)
    assert d.phase == "Scheduling"
    assert d.new_status.attempts[-1].reason == "DigestMismatch"
    assert not any(isinstance(a, FlipRecord) for a in d.actions)


def test_missing_digest_never_flips():
    d = decide(obs("PreCopy", **done_reports(src="", dst="")), T0)
    assert d.new_status.attempts[-1].reason == "DigestMismatch"


def test_reports_of_old_attempt_never_flip():
    st = status("PreCopy", attempt=2, attempts=(AttemptRecord(1, T0 - sec(90), T0 - sec(50), "Failed", "X"),
                                                 AttemptRecord(2, T0 - sec(10))))
    d = decide(obs("PreCopy", st=st, **done_reports(n=1)), T0)
    assert d.phase == "PreCopy"
    assert not any(isinstance(a, FlipRecord) for a in d.actions)


def test_old_transfer_report_with_current_target_never_flips():
    st = status("PreCopy", attempt=2, attempts=(AttemptRecord(1, T0 - sec(90), T0 - sec(50), "Failed", "X"),
                                                 AttemptRecord(2, T0 - sec(10))))
    old_done = TransferReport(1, "Completed", digest="sha256:aa")
    d = decide(obs("PreCopy", st=st, transfer=old_done, target=TargetReport(2, "Received", "a:1", "sha256:aa")), T0)
    assert d.phase == "PreCopy" and not any(isinstance(a, FlipRecord) for a in d.actions)
    d = decide(obs("PreCopy", st=st, transfer=TransferReport(1, "Failed", error="old")), T0)
    assert d.phase == "PreCopy"


def test_only_one_side_done_waits():
    r = done_reports()
    d = decide(obs("PreCopy", transfer=r["transfer"], target=TargetReport(1, "Listening", "a:1")), T0)
    assert d.phase == "PreCopy" and d.new_status.reason == "Completed"


def test_finished_copy_beats_the_budget():
    st = status("PreCopy", attempts=(AttemptRecord(1, T0 - sec(99999)),))
    assert decide(obs("PreCopy", st=st, **done_reports()), T0).phase == "CutOver"


def test_cutover_reissues_flip_until_visible():
    d = decide(obs("CutOver", **done_reports()), T0)
    assert d.phase == "CutOver" and d.new_status.reason == "FlippingRecord"
    assert non_events(d) == [FlipRecord("web-1", "h1", "h2")]


def test_cutover_without_finished_copy_does_not_flip():
    d = decide(obs("CutOver", transfer=TransferReport(1, "Paused")), T0)
    assert d.phase == "CutOver" and not any(isinstance(a, FlipRecord) for a in d.actions)


# ---------------------------------------------------------------- after the flip


def flipped(**kw):
    base = dict(droplet=droplet(host="h2"), **done_reports())
    base.update(kw)
    return obs("CutOver", **base)


def test_lost_status_write_after_flip_catches_up_without_flipping_again():
    d = decide(obs("PreCopy", droplet=droplet(host="h2"), **done_reports()), T0)
    assert d.phase == "CutOver"
    assert non_events(d) == []


def test_completed_when_target_runs():
    o = flipped(target=TargetReport(1, "Running", "10.0.0.2:7000", "sha256:aa"))
    d = decide(o, T0)
    assert d.phase == "Completed" and d.done and d.requeue_after is None
    ns = d.new_status
    assert ns.progress == 100 and ns.downtime_ms == 87
    assert ns.attempts[-1].result == "Succeeded"
    assert ns.condition("Succeeded").status == "True"
    assert ns.condition("Announced").status == "False"
    acts = non_events(d)
    assert ClearAnnouncement("web-1") in acts
    assert DeleteSecret("lm-1-transfer") in acts
    assert RecordLastMigration("web-1", "lm-1", T0, "h1", "h2") in acts
    assert RecomputeAllocations(("h1", "h2")) in acts
    assert MarkDropletCondition("web-1", "OfflineMigrationNeeded", False, "LiveMigrated", ns.message) in acts
    assert not any(isinstance(a, FlipRecord) for a in acts)
    assert not any(a.type == "NestedVirtualizationRestartNeeded" for a in acts if isinstance(a, MarkDropletCondition))


def test_completed_records_the_network_cut_over_of_this_attempt():
    net = {"attempt": 1, "address": "10.250.0.200", "fabric": "node", "movedAt": "2026-01-01T00:00:01.5Z", "ms": 12}
    o = flipped(target=TargetReport(1, "Running", "10.0.0.2:7000", "sha256:aa", network=net))
    d = decide(o, T0)
    assert d.phase == "Completed"
    assert d.new_status.network_cut_over == {"address": "10.250.0.200", "host": "h2", "fabric": "node",
                                             "movedAt": "2026-01-01T00:00:01.5Z", "ms": 12}
    assert d.new_status.to_dict()["networkCutOver"]["host"] == "h2"
    assert "address 10.250.0.200 on h2" in d.new_status.message
    [ev] = [e for e in events(d) if e.reason == "NetworkCutOver"]
    assert ev.type == "Normal" and "10.250.0.200" in ev.message and "h2" in ev.message
    # another attempt's cut-over (a stale report) is not this one's; no address, no record
    for stale in ({**net, "attempt": 2}, None):
        d = decide(flipped(target=TargetReport(1, "Running", "10.0.0.2:7000", "sha256:aa", network=stale)), T0)
        assert d.phase == "Completed" and d.new_status.network_cut_over is None
        assert not [e for e in events(d) if e.reason == "NetworkCutOver"]


def test_completed_reports_the_guests_whole_pause_next_to_the_downtime():
    paused = T0 - sec(1)
    tr = TransferReport(1, "Completed", round=4, bytes_sent=5, progress=100, digest="sha256:aa", downtime_ms=87,
                        paused_at=paused)
    tg = TargetReport(1, "Running", "10.0.0.2:7000", "sha256:aa", resumed_at=paused + dt.timedelta(milliseconds=212))
    d = decide(flipped(transfer=tr, target=tg), T0)
    assert d.phase == "Completed"
    assert d.new_status.downtime_ms == 87 and d.new_status.guest_pause_ms == 212
    assert "downtime 87 ms (the guest was paused 212 ms in all, until it ran on h2)" in d.new_status.message
    assert d.new_status.to_dict()["downtimeText"] == "87ms (paused 212ms)"
    # a target that did not say when it resumed: the downtime alone, no guess
    d = decide(flipped(transfer=tr, target=TargetReport(1, "Running", "10.0.0.2:7000", "sha256:aa")), T0)
    assert d.new_status.guest_pause_ms is None and "paused" not in d.new_status.message


def test_nested_virtualization_condition_and_event():
    o = flipped(target=TargetReport(1, "Running"), droplet=droplet(host="h2", nested_virtualization=True))
    d = decide(o, T0)
    conds = [a for a in d.actions if isinstance(a, MarkDropletCondition) and a.type == "NestedVirtualizationRestartNeeded"]
    assert len(conds) == 1 and conds[0].status is True
    assert "restart" in conds[0].message
    ev = [e for e in events(d, "droplet") if e.reason == "NestedVirtualizationRestartNeeded"]
    assert len(ev) == 1 and "nested virtual machines" in ev[0].message


def test_powered_off_droplet_completes_on_received():
    o = flipped(droplet=droplet(host="h2", power_state="off"))
    assert decide(o, T0).phase == "Completed"
    assert decide(flipped(), T0).phase == "CutOver"  # powered on: waits for Running


@pytest.mark.parametrize("kw", [{"spec": spec(cancel=True)}, {"deleting": True}])
def test_cancel_after_flip_is_ignored_once(kw):
    d = decide(flipped(**kw), T0)
    assert d.phase == "CutOver"
    assert [(e.type, e.reason) for e in events(d)] == [("Warning", "CancelTooLate")]
    assert d.new_status.condition("CancelIgnored").status == "True"
    d2 = decide(flipped(st=d.new_status, **kw), T0 + sec(1))
    assert d2.phase == "CutOver" and events(d2) == []
    d3 = decide(flipped(st=d.new_status, target=TargetReport(1, "Running"), **kw), T0 + sec(2))
    assert d3.phase == "Completed"


def test_target_failed_before_running_after_flip_moves_the_record_back_and_the_attempt_fails():
    """The target reports Failed only when its copy never ran: the source still holds the paused
    guest with its memory, so the record goes back to it (no reboot) and the attempt fails."""
    from ferry.migration.actions import ReturnRecord

    d = decide(flipped(target=TargetReport(1, "Failed", error="qemu died")), T0)
    assert d.phase == "CutOver" and d.new_status.reason == "RecordReturned"
    assert [a for a in d.actions if isinstance(a, ReturnRecord)] == [ReturnRecord("web-1", "h2", "h1")]
    assert [e.type for e in events(d)] == ["Warning"]
    # the record is back at the source: the attempt fails as any before the flip (retry after backoff)
    d2 = decide(flipped(st=d.new_status, droplet=droplet(host="h1"), target=TargetReport(1, "Failed", error="qemu died")), T0)
    assert d2.phase == "Scheduling" and d2.new_status.attempts[-1].result == "Failed"
    assert not any(isinstance(a, ReturnRecord) for a in d2.actions)


# ---------------------------------------------------------------- qemu: a frozen point, verified after the resume


def frozen_reports(src: str | None = None, dst: str | None = None, state: str = "Received"):
    """qemu live: the source reports Completed at once (its digest follows), the target froze its
    disk at the switchover and reports its digest only after the resume."""
    return dict(
        transfer=TransferReport(1, "Completed", round=4, bytes_sent=5, progress=100, digest=src, downtime_ms=87,
                                verify_ms=None if src is None else 900, hashed_bytes=None if src is None else 64 << 20),
        target=TargetReport(1, state, "10.0.0.2:7000", digest=dst, frozen_point=True,
                            verify_ms=None if dst is None else 800, hashed_bytes=None if dst is None else 64 << 20),
    )


def test_a_frozen_point_moves_the_record_before_any_digest():
    d = decide(obs("PreCopy", **frozen_reports()), T0)
    assert d.phase == "CutOver"
    assert non_events(d) == [FlipRecord("web-1", "h1", "h2")]
    assert "froze its copy" in d.new_status.message and "verified" not in d.new_status.message
    v = d.new_status.verification
    assert v.method == "frozen-point" and v.state == "Pending" and v.downtime_ms == 87
    assert d.new_status.condition("Verified").status == "False"
    assert d.new_status.condition("Verified").reason == "VerificationPending"
    assert d.status["verification"]["state"] == "Pending"


def test_frozen_point_digests_already_known_and_different_fail_before_the_flip():
    d = decide(obs("PreCopy", **frozen_reports(src="sha256:aa", dst="sha256:bb")), T0)
    assert d.phase == "Scheduling" and d.new_status.attempts[-1].reason == "DigestMismatch"
    assert not any(isinstance(a, FlipRecord) for a in d.actions)


def frozen_flipped(st: MigrationStatus | None = None, **reports):
    first = decide(obs("PreCopy", **frozen_reports()), T0 - sec(5)).new_status
    return obs("CutOver", st=st or first, droplet=droplet(host="h2"), **reports)


def test_after_the_resume_the_migration_waits_for_both_digests():
    d = decide(frozen_flipped(**frozen_reports(src="sha256:aa", state="Running")), T0)
    assert d.phase == "CutOver" and d.new_status.reason == "Verifying" and not d.done
    assert "target h2" in d.new_status.message and "source h1" not in d.new_status.message
    assert d.new_status.verification.state == "Pending"
    assert d.requeue_after is not None and d.requeue_after > 0


def test_equal_digests_after_the_resume_complete_with_the_figures():
    d = decide(frozen_flipped(**frozen_reports(src="sha256:aa", dst="sha256:aa", state="Running")), T0)
    assert d.phase == "Completed" and "verified after the resume" in d.new_status.message
    v = d.new_status.verification
    assert (v.method, v.state, v.source_digest, v.target_digest) == ("frozen-point", "Verified", "sha256:aa", "sha256:aa")
    assert (v.source_verify_ms, v.target_verify_ms, v.target_hashed_bytes, v.downtime_ms) == (900, 800, 64 << 20, 87)
    assert v.at == T0
    assert d.new_status.condition("Verified").status == "True"
    assert d.new_status.condition("Verified").reason == "DigestsEqual"
    assert MigrationStatus.from_dict(d.new_status.to_dict()).verification == v


def test_different_digests_after_the_resume_fail_loudly_and_say_what_to_do():
    d = decide(frozen_flipped(**frozen_reports(src="sha256:aa", dst="sha256:bb", state="Running")), T0)
    assert d.phase == "Failed" and d.done and d.new_status.reason == "VerificationFailed"
    assert d.new_status.verification.state == "Mismatch"
    cond = d.new_status.condition("Verified")
    assert cond.status == "False" and cond.reason == "DigestMismatch"
    msg = d.new_status.failure_reason
    assert "sha256:aa" in msg and "sha256:bb" in msg and "kept paused on h1" in msg and "delete LiveMigration lm-1" in msg
    assert ("Warning", "VerificationFailed") in [(e.type, e.reason) for e in events(d, "migration")]
    assert [e.type for e in events(d, "droplet")] == ["Warning"]
    assert any(isinstance(a, MarkDropletCondition) and a.type == "MigrationUnverified" and a.status
               for a in d.actions)
    assert not any(isinstance(a, (FlipRecord, RecordLastMigration)) for a in d.actions)


def test_a_digest_that_never_comes_ends_incomplete_not_stuck():
    first = decide(obs("PreCopy", **frozen_reports()), T0 - sec(10_000)).new_status
    d = decide(frozen_flipped(st=first, **frozen_reports(dst="sha256:aa", state="Running")), T0)
    assert d.phase == "Failed" and d.new_status.reason == "VerificationIncomplete"
    assert d.new_status.verification.state == "Incomplete" and "source h1" in d.new_status.failure_reason


def test_a_lost_flip_write_still_records_the_downtime_and_the_pending_check():
    """The flip's status write met a conflict (an agent's report landed, e.g. the source's late
    digest): the next look sees the record moved while the status still says PreCopy."""
    d = decide(obs("PreCopy", droplet=droplet(host="h2"), **frozen_reports(src="sha256:aa")), T0)
    assert d.phase == "CutOver" and non_events(d) == []
    assert d.new_status.downtime_ms == 87 and d.new_status.downtime_budget_ms == 300
    assert d.new_status.verification.state == "Pending"
    # and a status without them (written by an older operator) gets them on the next look
    st = dataclasses.replace(d.new_status, downtime_ms=None, verification=None)
    d2 = decide(frozen_flipped(st=st, **frozen_reports(src="sha256:aa", state="Running")), T0)
    assert d2.new_status.downtime_ms == 87 and d2.new_status.verification.state == "Pending"


def test_sim_reports_are_verified_before_the_flip():
    d = decide(obs("PreCopy", **done_reports()), T0)
    v = d.new_status.verification
    assert (v.method, v.state) == ("in-stream", "Verified")
    assert d.new_status.condition("Verified").status == "True"


# ---------------------------------------------------------------- terminal and misc


@pytest.mark.parametrize("phase", ["Completed", "Failed", "Cancelled"])
def test_terminal_phases_are_inert(phase):
    o = obs(phase, spec=spec(cancel=True), deleting=True, droplet=DropletObs.missing(),
            transfer=TransferReport(1, "Failed"))
    d = decide(o, T0)
    assert d.phase == phase and d.done and d.actions == () and d.status == {} and d.requeue_after is None


def test_rejects_naive_time_and_unknown_phase():
    with pytest.raises(ValueError):
        decide(obs(None), dt.datetime(2030, 1, 1))
    with pytest.raises(ValueError, match="unknown phase"):
        decide(obs(None, st=MigrationStatus(phase="Bogus")), T0)


def test_inconsistent_attempt_status_fails_safely():
    st = status("PreCopy", target_host=None)
    d = decide(obs("PreCopy", st=st, **done_reports()), T0)
    assert d.phase == "Failed" and not any(isinstance(a, FlipRecord) for a in d.actions)


def test_status_round_trips_through_api_shape():
    d = decide(obs("Scheduling", placement=placement()), T0 + dt.timedelta(microseconds=123))
    st = d.new_status
    assert MigrationStatus.from_dict(st.to_dict()) == st
    assert st.to_dict()["attempts"][0]["startTime"] == "2030-01-01T12:00:00.000123Z"


def test_merge_patch():
    old = {"a": 1, "b": {"x": 1, "y": 2}, "c": [1], "d": 4}
    new = {"a": 1, "b": {"x": 1, "y": 3}, "c": [1, 2], "e": 5}
    assert merge_patch(old, new) == {"b": {"y": 3}, "c": [1, 2], "d": None, "e": 5}
    assert merge_patch(new, new) == {}


def test_decision_patch_is_empty_when_nothing_changes():
    st = status("Announced", announced_at=T0 - sec(100), not_before=T0 + sec(500),
                reason="WaitingForNotice")
    o = obs("Announced", st=st)
    d = decide(o, T0)
    st2 = MigrationStatus.from_dict({**st.to_dict(), **d.status})
    d2 = decide(dataclasses.replace(o, status=st2), T0 + sec(1))
    assert d2.status == {}


def test_parsers():
    sp = MigrationSpec.from_dict({"droplet": "d", "targetHost": "h3", "scheduledAt": "2030-01-01T12:00:00Z",
                                  "mode": "offline", "limits": {"maxAttempts": 2}, "cancel": True})
    assert sp == MigrationSpec("d", "h3", T0, "offline", Limits(None, None, 2), True)
    assert TransferReport.from_dict(None) is None and TransferReport.from_dict({"state": "Copying"}) is None
    tr = TransferReport.from_dict({"attempt": 2, "state": "Completed", "digest": "x", "bytesSent": 9, "round": 3})
    assert (tr.attempt, tr.state, tr.digest, tr.bytes_sent, tr.round) == (2, "Completed", "x", 9, 3)
    tg = TargetReport.from_dict({"attempt": 2, "state": "Listening", "address": "1.2.3.4:5"})
    assert tg == TargetReport(2, "Listening", "1.2.3.4:5")
    body = {
        "metadata": {"annotations": {"ferry.dev/maintenance-event": "live_migrate",
                                     "ferry.dev/maintenance-event-since": "2030-01-01T12:00:00Z"}},
        "spec": {"size": "s-2vcpu-4gb", "powerState": "off", "features": {"nestedVirtualization": True}},
        "status": {"host": "h1"},
    }
    d = DropletObs.from_droplet(Droplet.from_body(body), host_ready=True)
    assert d == DropletObs(True, False, "h1", True, "off", True, 84.0, T0)
    assert DropletObs.from_droplet(None, host_ready=True) == DropletObs.missing()
    body["metadata"]["annotations"]["ferry.dev/maintenance-event"] = ""
    assert DropletObs.from_droplet(Droplet.from_body(body), host_ready=True).maintenance_since is None


# ---------------------------------------------------------------- admission


def ref(key, phase, age, droplet=None, src="h1", dst=None, nb=None):
    return MigrationRef(key, droplet or f"d-{key}", phase, T0 - sec(age), src, dst, nb)


def test_admit_announces_everything_whatever_the_limits():
    lim = ConcurrencyLimits(max_parallel=1, max_outbound_per_host=1, max_inbound_per_host=1)
    refs = [ref("busy", "PreCopy", 999, src="h1", dst="h9")] + [
        ref(f"p{i}", "Pending" if i % 2 else None, 100 - i, src="h1", dst="h9") for i in range(20)
    ]
    v = admit(refs, lim, T0)
    assert all(v[f"p{i}"] == Admission(True, "Admitted", "") for i in range(20))
    assert "busy" not in v


def test_admit_slot_cluster_limit_oldest_first():
    lim = ConcurrencyLimits(max_parallel=2, max_outbound_per_host=9, max_inbound_per_host=9)
    refs = [ref("a", "PreCopy", 999, src="x"), ref("new", "Announced", 1, src="y"),
            ref("old", "Announced", 50, src="z"), ref("mid", "Announced", 10, src="w")]
    v = admit(refs, lim)
    assert v["old"].admitted
    assert not v["mid"].admitted and v["mid"].reason == "ConcurrencyLimitReached"
    assert v["mid"].message == "2 migrations in flight cluster-wide (limit 2)"
    assert not v["new"].admitted
    assert "a" not in v


def test_admit_slot_only_once_the_notice_is_over():
    lim = ConcurrencyLimits(max_parallel=1, max_outbound_per_host=9, max_inbound_per_host=9)
    refs = [ref("told-early", "Announced", 100, nb=T0 + sec(60)), ref("no-nb", "Announced", 90),
            ref("ready", "Announced", 10, nb=T0 - sec(1))]
    v = admit(refs, lim, T0)
    assert v == {"ready": Admission(True, "Admitted", "")}  # the older ones hold nothing yet
    v = admit(refs, lim, T0 + sec(60))
    assert v["told-early"].admitted and not v["ready"].admitted
    assert set(admit(refs, lim)) == {"told-early", "no-nb", "ready"}  # no clock: all queued


def test_admit_slot_per_host_limits_do_not_block_other_hosts():
    lim = ConcurrencyLimits(max_parallel=10, max_outbound_per_host=1, max_inbound_per_host=1)
    refs = [ref("a", "Scheduling", 100, src="h1"), ref("b", "Announced", 50, src="h1"),
            ref("c", "Announced", 40, src="h2", dst="h9"), ref("d", "Announced", 30, src="h3", dst="h9"),
            ref("e", "Announced", 20, src="h4")]
    v = admit(refs, lim)
    assert not v["b"].admitted and v["b"].message == "source host h1 already sends 1 migrations (limit 1)"
    assert v["c"].admitted
    assert not v["d"].admitted and v["d"].message == "target host h9 already receives 1 migrations (limit 1)"
    assert v["e"].admitted


def test_admit_droplet_busy():
    lim = ConcurrencyLimits()
    refs = [ref("a", "PreCopy", 100, droplet="web", src="h1"), ref("b", "Pending", 50, droplet="web", src="h1"),
            ref("c", "Pending", 80, droplet="db", src="h2"), ref("d", "Pending", 60, droplet="db", src="h2"),
            ref("e", "Completed", 500, droplet="api", src="h3"), ref("f", "Pending", 10, droplet="api", src="h3"),
            ref("g", "Announced", 5, droplet="mail", src="h4"), ref("h", None, 900, droplet="mail", src="h4")]
    v = admit(refs, lim, T0)
    assert v["b"] == Admission(False, "DropletBusy", "droplet web is being migrated by a; waiting for it to finish")
    assert v["c"].admitted
    assert v["d"].reason == "DropletBusy"
    assert v["f"].admitted
    # announced (not yet holding a slot) still owns its droplet, even against an older one
    assert v["h"] == Admission(False, "DropletBusy", "droplet mail is being migrated by g; waiting for it to finish")


def test_admit_two_announced_of_one_droplet_never_both_get_a_slot():
    lim = ConcurrencyLimits()
    refs = [ref("x", "Announced", 50, droplet="web"), ref("y", "Announced", 40, droplet="web"),
            ref("z", "Announced", 30, droplet="db"), ref("r", "Scheduling", 60, droplet="db")]
    v = admit(refs, lim)
    assert v["x"].admitted
    assert v["y"].reason == "DropletBusy" and "by x" in v["y"].message
    assert v["z"].reason == "DropletBusy" and "by r" in v["z"].message


def test_admit_counts_in_flight_phases_only():
    lim = ConcurrencyLimits(max_parallel=1)
    assert IN_FLIGHT == {"Scheduling", "Preparing", "PreCopy", "CutOver"}
    assert OWNING == IN_FLIGHT | {"Announced"}
    for phase in ("Completed", "Failed", "Cancelled", "Pending", None, "Announced"):
        v = admit([ref("a", phase, 100, src="q", nb=T0 + sec(1)), ref("b", "Announced", 50, nb=T0)], lim, T0)
        assert v["b"].admitted, phase
    for phase in IN_FLIGHT:
        v = admit([ref("a", phase, 100, src="q"), ref("b", "Announced", 50, nb=T0)], lim, T0)
        assert not v["b"].admitted and v["b"].reason == "ConcurrencyLimitReached", phase
        v = admit([ref("a", phase, 100, src="q"), ref("b", "Pending", 50)], lim, T0)
        assert v["b"].admitted, phase  # announcing needs no slot


def test_reservation_used_by_placement_ignores_own_droplet():
    hs = hosts(("h1", Resources(0, 0, 0), {}), ("h2", Resources(15, 0, 0), {}))
    req = DropletRequest("default/web-1", "nyc3", Resources(1, 1024, 10), source_host="h1")
    own = Reservation("h2", Resources(1, 1024, 10), "default/web-1")
    other = Reservation("h2", Resources(1, 1024, 10), "default/db")
    assert place(req, hs, [own]).chosen == "h2"
    assert place(req, hs, [other]).chosen is None


def test_pure_modules_import_no_kopf_pykube_or_network():
    import subprocess
    import sys

    code = (
        "import sys, ferry.migration.machine, ferry.placement, ferry.api.sizes\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'kopf', 'pykube', 'aiohttp', 'requests', 'kubernetes', 'urllib3'})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", out


@pytest.mark.parametrize("owned_by_other, cleared", [(False, True), (True, False), (None, False)])
def test_cancel_withdraws_an_announcement_whose_status_write_was_lost(owned_by_other, cleared):
    """Announce went out, the status write that recorded it met a conflict, then a cancel:
    the announcement is withdrawn only when no other migration can own it."""
    o = obs("Pending", spec=spec(cancel=True), droplet_owned_by_other=owned_by_other)
    assert o.status.announced_at is None and o.droplet.maintenance_since is not None
    d = decide(o, T0, CFG)
    assert d.phase == "Cancelled"
    assert (ClearAnnouncement("web-1") in d.actions) == cleared



# --- who failed: a side that only saw its peer go is a witness, not the culprit -------------

PEER = "ConnectionClosed: connection closed by peer"


@pytest.mark.parametrize("phase", ["PreCopy", "CutOver"])
def test_the_side_that_failed_is_named_not_the_one_that_saw_the_connection_drop(phase):
    died = TransferReport(1, "Failed", error="the VM process died on source host h1")
    d = decide(obs(phase, transfer=died, target=TargetReport(1, "Failed", error=PEER)), T0)
    assert d.new_status.attempts[-1].reason == "SourceFailed"
    assert "VM process died" in d.new_status.message and "target host saw" in d.new_status.message
    gone = TargetReport(1, "Failed", error="the incoming VM is gone from host h2")
    d = decide(obs(phase, transfer=TransferReport(1, "Failed", error="BrokenPipeError: [Errno 32] Broken pipe"),
                   target=gone), T0)
    assert d.new_status.attempts[-1].reason == "TargetFailed"


def test_a_target_whose_qemu_died_is_named_though_its_error_quotes_a_connection_reset():
    """The qemu target's QEMU was killed: its monitor socket reset (the OS says "Connection reset
    by peer") and the source's mirror lost its NBD export. The target failed; the source saw it."""
    src = TransferReport(1, "Failed", error="disk mirror ended early: PeerLost: the disk mirror could not write "
                                            "to the target's NBD export")
    tgt = TargetReport(1, "Failed", error="target QEMU exited or is unreachable: /x/qmp.sock: query-migrate: "
                                          "connection lost ([Errno 104] Connection reset by peer)")
    d = decide(obs("PreCopy", transfer=src, target=tgt), T0)
    assert d.new_status.attempts[-1].reason == "TargetFailed", d.new_status.message
    assert "source host saw: disk mirror ended early" in d.new_status.message


def test_a_witness_alone_waits_for_the_other_side_then_says_connection_lost():
    d = decide(obs("PreCopy", transfer=TransferReport(1, "Copying"), target=TargetReport(1, "Failed", error=PEER)), T0)
    assert d.phase == "PreCopy" and d.new_status.reason == "PeerLost"
    assert 0 < d.requeue_after <= 5
    later = decide(obs("PreCopy", st=d.new_status, transfer=TransferReport(1, "Copying"),
                       target=TargetReport(1, "Failed", error=PEER)), T0 + sec(5))
    assert later.phase == "Scheduling" and later.new_status.attempts[-1].reason == "ConnectionLost"
    # the source's own account arrives within the wait: it is named
    told = decide(obs("PreCopy", st=d.new_status, transfer=TransferReport(1, "Failed", error="VM process died"),
                      target=TargetReport(1, "Failed", error=PEER)), T0 + sec(2))
    assert told.new_status.attempts[-1].reason == "SourceFailed"


def test_both_sides_losing_the_connection_is_the_link():
    d = decide(obs("PreCopy", transfer=TransferReport(1, "Failed", error="ConnectionResetError: reset"),
                   target=TargetReport(1, "Failed", error=PEER)), T0)
    assert d.new_status.attempts[-1].reason == "ConnectionLost"


# ------------------------------------------- downtime budget, force-complete, NotConverging


def test_downtime_within_budget_is_recorded_next_to_it():
    d = decide(obs("PreCopy", **done_reports()), T0)
    assert d.status["downtimeMs"] == 87 and d.status["downtimeBudgetMs"] == 300
    c = d.new_status.condition("DowntimeBudgetExceeded")
    assert c.status == "False" and c.reason == "WithinBudget"
    assert not [e for e in events(d) if e.reason == "DowntimeBudgetExceeded"]


def test_downtime_over_budget_sets_condition_and_warns_once():
    tr = TransferReport(1, "Completed", round=9, bytes_sent=5, progress=100, digest="sha256:aa", downtime_ms=420,
                        downtime_steps=2, allowed_downtime_ms=450, max_downtime_ms=500, predicted_downtime_ms=400)
    o = obs("PreCopy", transfer=tr, target=TargetReport(1, "Received", "a:1", digest="sha256:aa"))
    d = decide(o, T0)
    c = d.new_status.condition("DowntimeBudgetExceeded")
    assert c.status == "True" and c.reason == "OverBudget"
    assert "downtime 420 ms, budget 300 ms" in c.message and "2 downtime steps" in c.message and "ceiling 500" in c.message
    warns = [e for e in events(d) if e.reason == "DowntimeBudgetExceeded"]
    assert len(warns) == 1 and warns[0].type == "Warning"
    # CutOver waits for the flip to be seen: the same decision again posts no second Event
    again = decide(dataclasses.replace(o, status=d.new_status), T0 + sec(1))
    assert not [e for e in events(again) if e.reason == "DowntimeBudgetExceeded"]


def test_force_completed_copy_says_so():
    tr = TransferReport(1, "Completed", round=3, bytes_sent=5, progress=100, digest="sha256:aa", downtime_ms=900,
                        forced=True)
    d = decide(obs("PreCopy", transfer=tr, target=TargetReport(1, "Received", "a:1", digest="sha256:aa")), T0)
    assert d.phase == "CutOver"
    assert d.new_status.condition("ForceCompleted").status == "True"
    assert d.new_status.condition("DowntimeBudgetExceeded").reason == "ForceCompleted"
    reasons = {e.reason: e.type for e in events(d)}
    assert reasons["ForceCompleted"] == "Normal" and reasons["DowntimeBudgetExceeded"] == "Warning"


def test_not_converging_fails_at_once_with_figures_and_a_warning():
    tr = TransferReport(1, "Failed", round=14, error="NotConverging: expected downtime 905 ms > 500 ms allowed",
                        dirty_rate_bps=192 << 20, bandwidth_bps=64 << 20, max_throttle_percent=99, downtime_steps=4)
    d = decide(obs("PreCopy", transfer=tr), T0)
    assert d.phase == "Failed" and d.new_status.reason == "NotConverging"
    assert "192.0 MiB/s" in d.new_status.failure_reason and "64.0 MiB/s" in d.new_status.failure_reason
    assert "4 downtime steps" in d.new_status.failure_reason
    assert any(e.type == "Warning" and e.reason == "NotConverging" for e in events(d))


def test_eta_over_the_completion_budget_is_flagged_during_the_copy():
    budget = CFG.budget_base_seconds + CFG.budget_seconds_per_gib * 10.0  # droplet() has 10 GiB
    tr = TransferReport(1, "Converging", round=5, bytes_sent=5, progress=40, eta_seconds=budget * 2)
    d = decide(obs("PreCopy", transfer=tr), T0)
    assert d.phase == "PreCopy"
    assert d.new_status.condition("CompletionAtRisk").status == "True"
    assert [e.type for e in events(d) if e.reason == "CompletionAtRisk"] == ["Warning"]
    ok = dataclasses.replace(tr, eta_seconds=5.0, bytes_sent=6)
    d2 = decide(obs("PreCopy", st=d.new_status, transfer=ok), T0 + sec(1))
    assert d2.new_status.condition("CompletionAtRisk").status == "False"


@pytest.mark.parametrize("phase", ["Announced", "PreCopy"])
def test_a_source_host_silent_for_a_while_is_waited_for_not_failed_at_once(phase):
    """After an API server outage every heartbeat is stale at once: wait (one Warning Event),
    and call the host lost only after host_lost_seconds of silence."""
    cfg = MachineConfig()
    quiet = droplet(host_ready=False, host_silent_seconds=25.0)
    d = decide(obs(phase, droplet=quiet), T0, cfg)
    assert d.phase == phase and d.new_status.reason == "SourceHostNotReady"
    assert 0 < d.requeue_after <= cfg.poll_seconds
    assert [(e.type, e.reason) for e in events(d)] == [("Warning", "SourceHostNotReady")]
    again = decide(obs(phase, st=d.new_status, droplet=quiet), T0 + sec(1), cfg)
    assert not events(again)  # said once
    lost = decide(obs(phase, droplet=droplet(host_ready=False, host_silent_seconds=cfg.host_lost_seconds)), T0, cfg)
    assert lost.phase == "Failed" and lost.new_status.reason == "HostNotReady"
