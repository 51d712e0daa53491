"""The operator's shell (ferry.controller) over a fake storage: the reconcilers read the
world, call the pure machine and write through storage in the right order. No API server,
no kopf: the handlers are one-line delegations to these functions."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from fakes import FakeKube
from support import wait_until_async

from ferry.api.livemigration import LiveMigration
from ferry.api.sizes import Resources
from ferry.controller import app, migration_reconciler as migrations
from ferry.controller.app import Context
from ferry.controller.expectations import Expectations
from ferry.controller.metrics import Metrics
from ferry.controller.world import World
from ferry.settings import Settings

NS = "team"
LOG = logging.getLogger("test")


def now_text() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def host(name: str) -> dict:
    return {"kind": "Host", "apiVersion": "ferry.dev/v1alpha1", "metadata": {"name": name, "uid": "u-" + name},
            "spec": {"datacenter": "nyc3", "capacity": {"cpu": 8, "memoryMiB": 16384, "diskGiB": 500}},
            "status": {"agent": {"address": "127.0.0.1", "heartbeatTime": now_text()}}}


@pytest.fixture
def stack():
    kube = FakeKube()
    for h in ("h1", "h2"):
        kube.put(host(h))
    kube.put({"kind": "Droplet", "apiVersion": "ferry.dev/v1alpha1",
              "metadata": {"name": "web", "namespace": NS, "uid": "u-web", "labels": {"ferry.dev/host": "h1"}},
              "spec": {"size": "s-1vcpu-1gb", "datacenter": "nyc3"}, "status": {"host": "h1", "phase": "Placed"}})
    kube.put({"kind": "LiveMigration", "apiVersion": "ferry.dev/v1alpha1",
              "metadata": {"name": "move", "namespace": NS, "uid": "u-move", "finalizers": ["ferry.dev/migration"],
                           "creationTimestamp": "2030-01-01T00:00:00Z"},
              "spec": {"droplet": "web"}})
    world = World()
    for (kind, _, _), body in kube.objects.items():
        world.observe(kind, None, body)
    cx = Context(settings=Settings(notice_seconds=0, metrics_port=0), kube=kube, world=world, metrics=Metrics(),
                 lock=asyncio.Lock(), object_locks={})
    return kube, cx


def scrape(cx: Context) -> dict[tuple[str, tuple], float]:
    """What Prometheus would read: (name, sorted labels) -> value."""
    text = generate_latest(cx.metrics.registry).decode()
    return {(smp.name, tuple(sorted(smp.labels.items()))): smp.value
            for fam in text_string_to_metric_families(text) for smp in fam.samples}


def reconcile(cx: Context) -> LiveMigration:
    asyncio.run(migrations.reconcile(cx, (NS, "move"), LOG))
    return cx.world.migrations[(NS, "move")]


def agent_reports(kube: FakeKube, cx: Context, status: dict) -> None:
    """An agent's status patch, seen by the operator's watch."""
    cx.world.observe("LiveMigration", "MODIFIED", kube.patch_status("LiveMigration", "move", status, NS))


def test_a_migration_through_the_shell(stack, caplog):
    caplog.set_level(logging.INFO, logger="ferry.operator")
    kube, cx = stack
    # No notice and a free slot: Pending, Announced, Scheduling and Preparing (waiting for the
    # target) are decided in one look and written as one status patch; each keeps its timestamp,
    # its Event and its log line.
    m = reconcile(cx)
    assert m.phase == "Preparing" and m.status.target_host == "h2" and m.status.attempt == 1
    assert m.status.reason == "WaitingForTarget"
    assert set(m.status.phase_times) == {"Pending", "Announced", "Scheduling", "Preparing"}
    assert kube.obj("Droplet", "web", NS)["metadata"]["annotations"]["ferry.dev/maintenance-event"] == "live_migrate"
    assert [r for _, r, _ in kube.events] == ["Accepted", "Announced", "LiveMigrationScheduled", "Scheduling",
                                              "TargetChosen"]
    assert kube.obj("LiveMigration", "move", NS)["metadata"]["labels"]["ferry.dev/target-host"] == "h2"
    assert (NS, "move-transfer") in kube.secrets

    agent_reports(kube, cx, {"target": {"attempt": 1, "state": "Listening", "address": "127.0.0.1:7000"}})
    assert reconcile(cx).phase == "PreCopy"
    app.refresh_metrics(cx)
    during = scrape(cx)
    assert during[("ferry_migration_last_progress_timestamp_seconds",
                   (("droplet", "web"), ("migration", "move"), ("namespace", NS), ("phase", "PreCopy")))] > 0
    assert during[("ferry_host_migrations_in_flight", (("direction", "outbound"), ("host", "h1")))] == 1
    assert during[("ferry_host_migrations_in_flight", (("direction", "inbound"), ("host", "h2")))] == 1
    assert during[("ferry_host_ready", (("host", "h1"),))] == 1
    agent_reports(kube, cx, {"transfer": {"attempt": 1, "state": "Completed", "digest": "sha256:ab", "downtimeMs": 9,
                                          "round": 4, "bytesSent": 5000},
                             "target": {"attempt": 1, "state": "Received", "digest": "sha256:ab",
                                        "address": "127.0.0.1:7000"}})
    assert reconcile(cx).phase == "CutOver"
    d = kube.obj("Droplet", "web", NS)
    assert d["status"]["host"] == "h2" and d["metadata"]["labels"]["ferry.dev/host"] == "h2"  # the record moved

    agent_reports(kube, cx, {"target": {"attempt": 1, "state": "Running", "digest": "sha256:ab"}})
    m = reconcile(cx)
    assert m.phase == "Completed" and m.status.downtime_ms == 9
    assert "ferry.dev/maintenance-event" not in (kube.obj("Droplet", "web", NS)["metadata"].get("annotations") or {})
    assert (NS, "move-transfer") not in kube.secrets
    assert kube.obj("Droplet", "web", NS)["status"]["lastMigration"]["toHost"] == "h2"
    reasons = [r for _, r, _ in kube.events]
    assert reasons.count("LiveMigrated") == 1 and reasons.count("Completed") == 1
    phases_written = [p.get("phase") for k, _, n, p in kube.patches if k == "LiveMigration" and "phase" in p]
    assert phases_written == ["Preparing", "PreCopy", "CutOver", "Completed"]
    status_writes = [p for k, _, n, p in kube.patches if k == "LiveMigration" and ("phase" in p or "reason" in p)]
    assert len(status_writes) == 4  # the waits right after a transition share its write
    phases = ["Pending", "Announced", "Scheduling", "Preparing", "PreCopy", "CutOver", "Completed"]
    # outcomes by reason, the histograms, and no series left for the finished migration
    app.refresh_metrics(cx)
    after = scrape(cx)
    assert after[("ferry_migrations_total", (("reason", "Completed"), ("result", "Completed")))] == 1
    assert after[("ferry_migrations_total", (("reason", "AttemptsExhausted"), ("result", "Failed")))] == 0
    assert after[("ferry_migration_attempts_total", (("reason", "Completed"), ("result", "Succeeded")))] == 1
    assert after[("ferry_migration_rounds_sum", ())] == 4 and after[("ferry_migration_rounds_count", ())] == 1
    assert after[("ferry_migration_downtime_seconds_sum", ())] == 0.009
    assert after[("ferry_migration_bytes_total", ())] == 5000
    assert not [k for k in after if k[0].startswith("ferry_migration_last_progress")]
    assert after[("ferry_host_migrations_in_flight", (("direction", "inbound"), ("host", "h2")))] == 0
    # one log line per transition, naming the migration (also as fields, for JSON logs)
    lines = [r for r in caplog.records if getattr(r, "migration", None) == f"{NS}/move"]
    assert [(r.previous_phase, r.phase) for r in lines] == list(zip([None, *phases[:-1]], phases))
    assert all(f"migration {NS}/move: " in r.getMessage() for r in lines)


def test_a_decision_on_a_stale_view_is_dropped_and_made_again(stack):
    kube, cx = stack
    cx.world.observe("LiveMigration", "MODIFIED",
                     kube.patch_status("LiveMigration", "move", {"phase": "Pending", "reason": "Accepted"}, NS))
    # Someone else (a user setting spec.cancel) writes the migration; the world has not seen it.
    kube.patch("LiveMigration", "move", {"spec": {"cancel": True}}, NS)
    m = reconcile(cx)
    # decided again on the fresh read, not Announced (nor further: those decisions share one write,
    # and the first write of this migration, its labels, met the newer version) on the stale one
    assert m.phase == "Cancelled"
    # The announcement went out before the status write met the conflict; the cancel withdraws
    # it even though no status ever recorded it (no other migration owns the droplet).
    annotations = kube.obj("Droplet", "web", NS)["metadata"].get("annotations") or {}
    assert "ferry.dev/maintenance-event" not in annotations
    reasons = [r for _, r, _ in kube.events]
    assert "Announced" not in reasons and reasons.count("Cancelled") == 1


def test_expectations_hold_a_decision_until_the_watch_shows_it():
    ex = Expectations()
    body = {"metadata": {"name": "m", "namespace": "n"}, "spec": {"droplet": "d"}, "status": {"phase": "Announced"}}
    m = LiveMigration.from_body(body)
    ex.admitted(m.key)
    assert ex.phase_of(m) == "Scheduling"  # took its slot, not seen back yet
    ex.reserved(m.key, "h2", ("n", "d"), Resources(1, 1024, 25))
    assert [r.host for r in ex.as_reservations()] == ["h2"]
    ex.saw_migration(m.key, LiveMigration.from_body({**body, "status": {"phase": "Preparing", "targetHost": "h2"}}))
    assert ex.phase_of(m) == "Announced" and ex.as_reservations() == []
    ex.secret_deleted(m.key)
    assert ex.has_secret_been_deleted(m.key)
    ex.saw_migration(m.key, None)  # deleted: nothing about it is kept
    assert not ex.has_secret_been_deleted(m.key)


def test_the_world_never_goes_back_in_time():
    w = World()
    new = {"metadata": {"name": "m", "namespace": "n", "resourceVersion": "20"}, "spec": {"droplet": "d"},
           "status": {"phase": "PreCopy"}}
    old = {**new, "metadata": {**new["metadata"], "resourceVersion": "7"}, "status": {"phase": "Pending"}}
    w.observe("LiveMigration", "MODIFIED", new)
    w.observe("LiveMigration", "MODIFIED", old)  # a late event from a loaded queue
    assert w.migrations[("n", "m")].phase == "PreCopy"
    w.observe("LiveMigration", "MODIFIED", {**new, "spec": {}})  # invalid spec: set aside with the reason
    assert ("n", "m") not in w.migrations and "spec.droplet" in w.invalid[("LiveMigration", ("n", "m"))]


def test_only_the_replica_that_reconciles_serves_the_fleet(stack, monkeypatch):
    """A standby's world is frozen at its start: it must not serve stale host or migration gauges."""
    _, cx = stack
    monkeypatch.setattr(app, "METRICS_REFRESH_SECONDS", 0.01)

    def hosts_served() -> set:
        return {dict(k[1])["host"] for k in scrape(cx) if k[0] == "ferry_host_ready"}

    async def run() -> None:
        task = asyncio.create_task(app._refresh_metrics_forever(cx))
        try:
            app.refresh_metrics(cx)
            await wait_until_async(lambda: not hosts_served(), 5, what="a standby drops the fleet gauges")
            cx.reconciled_at = time.monotonic()  # what every reconcile of the active replica does
            await wait_until_async(lambda: hosts_served() == {"h1", "h2"}, 5, what="the active one serves them")
        finally:
            task.cancel()

    asyncio.run(run())


def test_a_standby_that_takes_over_drops_what_was_deleted_while_it_waited(stack):
    """Issue 13: a standby's world is loaded at its start and kept by watch events; kopf's
    re-list after a takeover never reports the objects deleted meanwhile. A migration deleted
    while it waited must not keep its concurrency slot or its reservation."""
    kube, cx = stack
    ghost = {"kind": "LiveMigration", "apiVersion": "ferry.dev/v1alpha1",
             "metadata": {"name": "ghost", "namespace": NS, "uid": "u-ghost", "resourceVersion": "5",
                          "finalizers": ["ferry.dev/migration"], "creationTimestamp": "2029-01-01T00:00:00Z"},
             "spec": {"droplet": "web"},
             "status": {"phase": "PreCopy", "sourceHost": "h1", "targetHost": "h2", "attempt": 1}}
    cx.world.observe("LiveMigration", None, ghost)  # seen at the standby's start; deleted since
    assert [m.name for m in cx.world.in_flight()] == ["ghost"] and cx.world.reservations()
    cx.reconciled_at = time.monotonic()  # the active replica: no re-list, nothing changes
    asyncio.run(app.ensure_current(cx))
    assert ("team", "ghost") in cx.world.migrations
    cx.reconciled_at = time.monotonic() - app.ACTIVE_SECONDS - 1  # it waited as a standby
    m = reconcile(cx)  # accepted, announced, scheduled, prepared: one look (notice 0)
    assert ("team", "ghost") not in cx.world.migrations
    # the droplet is not owned by the ghost any more (DropletBusy in Pending before), and h2
    # holds this migration's reservation only
    assert m.phase == "Preparing" and m.status.target_host == "h2"
    assert len([r for r in cx.world.reservations() if r.host == "h2"]) == 1


def test_resync_replaces_a_kind_whole():
    w = World()
    a = {"metadata": {"name": "a", "resourceVersion": "1"}, "spec": {"datacenter": "x", "capacity": {"cpu": 1, "memoryMiB": 1, "diskGiB": 1}}}
    b = {"metadata": {"name": "b", "resourceVersion": "2"}, "spec": {"datacenter": "x", "capacity": {"cpu": 1, "memoryMiB": 1, "diskGiB": 1}}}
    w.observe("Host", None, a)
    w.observe("Host", None, b)
    w.resync("Host", [b])
    assert set(w.hosts) == {"b"}


def _lm(name: str, droplet: str, created: str, phase: str, **status) -> dict:
    return {"kind": "LiveMigration", "apiVersion": "ferry.dev/v1alpha1",
            "metadata": {"name": name, "namespace": NS, "uid": "u-" + name, "resourceVersion": "1",
                         "finalizers": ["ferry.dev/migration"], "creationTimestamp": created},
            "spec": {"droplet": droplet}, "status": {"phase": phase, **status}}


def test_admission_verdicts_follow_the_world_without_judging_everything_each_time():
    """migration_reconciler.admission: the same verdicts as admit() over every migration, the
    slot gate computed once per change of what it reads, and recomputed when that changes."""
    from ferry.migration.admission import ConcurrencyLimits, MigrationRef, admit

    world = World()
    world.observe("Host", None, host("h1"))
    for d in ("d1", "d2", "d3"):
        world.observe("Droplet", None, {"kind": "Droplet", "apiVersion": "ferry.dev/v1alpha1",
                                        "metadata": {"name": d, "namespace": NS, "uid": "u-" + d},
                                        "spec": {"size": "s-1vcpu-1gb", "datacenter": "nyc3"},
                                        "status": {"host": "h1"}})
    past = "2030-01-01T00:00:00Z"
    for i, d in enumerate(("d1", "d2", "d3")):
        world.observe("LiveMigration", None, _lm(f"m{i}", d, f"2030-01-01T00:00:0{i}Z", "Announced", notBefore=past))
    world.observe("LiveMigration", None, _lm("p", "d1", "2030-01-01T00:00:09Z", "Pending"))
    cx = Context(settings=Settings(notice_seconds=0, metrics_port=0, max_parallel=1), kube=FakeKube(), world=world,
                 metrics=Metrics(), lock=asyncio.Lock(), object_locks={})
    t = dt.datetime(2030, 1, 2, tzinfo=dt.timezone.utc)
    limits = ConcurrencyLimits(1, 2, 2)

    def everything() -> dict:
        refs = [MigrationRef(f"{m.namespace}/{m.name}", f"{m.namespace}/{m.droplet}", world.expect.phase_of(m),
                             m.meta.created, m.status.source_host or "h1", m.status.target_host,
                             m.status.not_before) for m in world.migrations.values()]
        v = admit(refs, limits, t)
        return {f"{NS}/{m.name}": v.get(f"{NS}/{m.name}") for m in world.migrations.values()}

    def verdicts() -> dict:
        return {f"{NS}/{m.name}": migrations.admission(cx, m, t) for m in world.migrations.values()}

    assert verdicts() == everything()
    assert [verdicts()[f"{NS}/m{i}"].admitted for i in range(3)] == [True, False, False]
    assert verdicts()[f"{NS}/p"].reason == "DropletBusy"
    computed = cx.slot_verdicts.computed
    verdicts()
    assert cx.slot_verdicts.computed == computed  # nothing changed: not judged again
    world.expect.admitted((NS, "m0"))  # m0 took the slot
    assert verdicts() == everything() and not verdicts()[f"{NS}/m1"].admitted
    world.observe("LiveMigration", "MODIFIED", {**_lm("m0", "d1", "2030-01-01T00:00:00Z", "Completed"),
                                                "metadata": {**_lm("m0", "d1", "2030-01-01T00:00:00Z", "Completed")[
                                                    "metadata"], "resourceVersion": "2"}})
    assert verdicts() == everything()
    assert verdicts()[f"{NS}/m1"].admitted and not verdicts()[f"{NS}/m2"].admitted  # the slot is free again
    assert verdicts()[f"{NS}/p"].admitted  # its droplet's migration finished


def test_the_worlds_host_indexes_follow_moves_relabels_and_deletions():
    """A host's reconcile reads its share through World.droplets_on / evacuations_of /
    allocated_on: always what a scan of every object would give."""
    w = World()

    def droplet(name: str, host: str | None, rv: int) -> dict:
        return {"kind": "Droplet", "metadata": {"name": name, "namespace": NS, "resourceVersion": str(rv)},
                "spec": {"size": "s-1vcpu-1gb", "datacenter": "nyc3"}, "status": {"host": host} if host else {}}

    def evac(name: str, host: str | None, rv: int, phase: str = "PreCopy", source: str | None = None) -> dict:
        labels = {"ferry.dev/evacuation": host} if host else {}
        return {"kind": "LiveMigration", "metadata": {"name": name, "namespace": NS, "resourceVersion": str(rv),
                                                      "labels": labels}, "spec": {"droplet": "d0"},
                "status": {"phase": phase, **({"sourceHost": source} if source else {})}}

    def check() -> None:
        for h in ("h1", "h2", "h3"):
            assert sorted(d.name for d in w.droplets_on(h)) == sorted(d.name for d in w.droplets.values()
                                                                      if d.host == h)
            assert w.allocated_on(h) == w.allocated().get(h, Resources(0, 0, 0))
            assert sorted(m.name for m in w.evacuations_of(h)) == sorted(
                m.name for m in w.migrations.values() if m.meta.labels.get("ferry.dev/evacuation") == h)
            assert sorted(m.name for m in w.leaving_from(h)) == sorted(
                m.name for m in w.migrations.values() if m.status.source_host == h and not m.terminal)

    for i in range(6):
        w.observe("Droplet", "ADDED", droplet(f"d{i}", f"h{i % 3 + 1}", 10 + i))
    w.observe("Droplet", "ADDED", droplet("new", None, 20))
    w.expect.placed((NS, "new"), "h2", Resources(1, 1024, 25))
    w.observe("LiveMigration", "ADDED", evac("e1", "h1", 30))
    w.observe("LiveMigration", "ADDED", evac("e2", "h1", 31))
    w.observe("LiveMigration", "ADDED", evac("own", None, 32, "CutOver", source="h1"))  # a user's, off h1
    w.observe("LiveMigration", "ADDED", evac("own2", None, 33, "Announced"))  # no source yet
    check()
    assert [m.name for m in w.leaving_from("h1")] == ["own"]
    w.observe("LiveMigration", "MODIFIED", evac("own2", None, 34, "Scheduling", source="h2"))
    w.observe("LiveMigration", "MODIFIED", evac("own", None, 35, "Completed", source="h1"))  # finished: gone
    check()
    assert not w.leaving_from("h1") and [m.name for m in w.leaving_from("h2")] == ["own2"]
    w.observe("Droplet", "MODIFIED", droplet("d0", "h3", 40))  # the record flipped
    w.observe("Droplet", "MODIFIED", droplet("new", "h2", 41))  # the placement seen back
    w.observe("LiveMigration", "MODIFIED", evac("e2", "h2", 42))  # relabelled
    w.observe("Droplet", "DELETED", droplet("d1", "h2", 43))
    w.observe("LiveMigration", "DELETED", evac("e1", "h1", 44))
    w.observe("LiveMigration", "DELETED", evac("own2", None, 45, "Scheduling", source="h2"))
    check()
    assert not w.leaving_from("h2")
    w.resync("Droplet", [droplet("d2", "h3", 50)])  # a re-list that no longer holds the others
    check()
    assert [d.name for d in w.droplets_on("h3")] == ["d2"] and not w.droplets_on("h1")


def test_kopfs_diff_base_sees_no_change_and_copies_nothing():
    """ferry reconciles from the world, so kopf's essence diff must always be empty (no
    on.create/update causes, no diff-base writes), whatever changed in the object; kopf's own
    essence (a deep copy of the object) comes back only for field handlers' extra fields."""
    import kopf

    storage = app.NoDiffBase()
    before = kopf.Body({"metadata": {"name": "m", "labels": {"a": "1"}}, "spec": {"droplet": "web"}})
    after = kopf.Body({"metadata": {"name": "m", "labels": {"a": "2"}}, "spec": {"droplet": "db"},
                       "status": {"phase": "PreCopy"}})
    assert storage.fetch(body=before) == storage.build(body=after) == {}
    assert storage.fetch(body=before) is not None  # never a creation either
    assert storage.build(body=after, extra_fields=["status.phase"])["status"] == {"phase": "PreCopy"}
