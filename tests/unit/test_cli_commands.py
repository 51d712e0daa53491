"""The user commands end to end through click, against an in-memory stand-in for the API.

What reaches the API (bodies, patches), what the user reads, exit codes and one-line errors.
The same paths run against a real API server in tests/integration/test_cli.py.
"""

from __future__ import annotations

import datetime as dt
import itertools

import pytest
from click.testing import CliRunner
from fakes import FakeKube

from ferry.cli import main as cli_main
from ferry.cli import user
from ferry.storage import NotFound, StorageError

cli_main._register()


@pytest.fixture
def kube(monkeypatch):
    fake = FakeKube("team")
    monkeypatch.setattr(user.Kube, "connect", classmethod(lambda cls, kubeconfig=None, timeout=30: fake))
    monkeypatch.setattr(user, "POLL_INTERVAL", 0)
    fake.add("Droplet", {"metadata": {"name": "web-1", "namespace": "team"},
                         "spec": {"size": "s-1vcpu-1gb", "datacenter": "nyc3"},
                         "status": {"host": "host-a", "phase": "Placed"}})
    for h in ("host-a", "host-b"):
        fake.add("Host", {"metadata": {"name": h}, "spec": {"datacenter": "nyc3",
                                                             "capacity": {"cpu": 8, "memoryMiB": 16384, "diskGiB": 500}}})
    return fake


def run(*args: str):
    return CliRunner().invoke(cli_main.cli, list(args), catch_exceptions=False, prog_name="ferry")


def one_line_error(result, text: str, code: int = 1) -> None:
    assert result.exit_code == code, result.output
    assert result.stderr == f"ferry: error: {text}\n"
    assert "Traceback" not in result.output


# --- migrate ----------------------------------------------------------------------------------------

def test_migrate_creates_a_migration_in_the_kubeconfig_namespace_and_prints_its_name(kube):
    r = run("migrate", "web-1")
    assert r.exit_code == 0, r.output
    assert r.stdout == "web-1-x0001\n"
    (body,) = kube.created
    assert body["metadata"]["namespace"] == "team" and body["metadata"]["labels"] == {"ferry.dev/droplet": "web-1"}
    assert body["spec"] == {"droplet": "web-1", "mode": "live"}


def test_migrate_with_every_option(kube):
    kube.add("Droplet", {"metadata": {"name": "web-1", "namespace": "other"}, "spec": {}, "status": {}})
    before = dt.datetime.now(dt.timezone.utc)
    r = run("-n", "other", "migrate", "web-1", "--to", "host-b", "--at", "+10m", "--bandwidth", "40",
            "--downtime", "120", "--max-attempts", "2", "--offline", "--name", "move-web-1")
    assert r.exit_code == 0, r.output
    assert r.stdout == "move-web-1\n"
    (body,) = kube.created
    assert body["metadata"]["name"] == "move-web-1" and body["metadata"]["namespace"] == "other"
    at = dt.datetime.fromisoformat(body["spec"].pop("scheduledAt").replace("Z", "+00:00"))
    assert dt.timedelta(minutes=10) - dt.timedelta(seconds=2) <= at - before <= dt.timedelta(minutes=10, seconds=5)
    assert body["spec"] == {"droplet": "web-1", "mode": "offline", "targetHost": "host-b",
                            "limits": {"bandwidthMiBps": 40, "downtimeMs": 120, "maxAttempts": 2}}


@pytest.mark.parametrize("args, needle", [
    (["--at", "tomorrow"], "RFC 3339"),
    (["--bandwidth", "0"], "--bandwidth"),
    (["--downtime", "60001"], "--downtime"),
    (["--max-attempts", "11"], "--max-attempts"),
    (["--bandwidth", "fast"], "--bandwidth"),
])
def test_migrate_argument_errors_create_nothing(kube, args, needle):
    r = run("migrate", "web-1", *args)
    assert r.exit_code == 2
    assert needle in r.stderr and "Traceback" not in r.output
    assert kube.created == []


def test_migrate_needs_a_droplet_argument(kube):
    r = run("migrate")
    assert r.exit_code == 2 and "Missing argument 'DROPLET'" in r.stderr


def test_migrate_unknown_droplet_is_one_line(kube):
    one_line_error(run("migrate", "nope"), "droplet team/nope not found")
    assert kube.created == []


def test_migrate_unknown_or_current_target_host(kube):
    one_line_error(run("migrate", "web-1", "--to", "host-z"), "host host-z not found")
    one_line_error(run("migrate", "web-1", "--to", "host-a"), "droplet team/web-1 already runs on host-a")
    assert kube.created == []


def test_migrate_name_taken(kube):
    assert run("migrate", "web-1", "--name", "m").exit_code == 0
    one_line_error(run("migrate", "web-1", "--name", "m"), "migration team/m already exists")


def script(kube: FakeKube, name: str, statuses: list[dict], ns: str = "team") -> None:
    """Each get of the migration applies the next status (the operator, sped up)."""
    pending = list(statuses)

    def hook(kind, got, n):
        if kind == "LiveMigration" and got == name and pending:
            kube.set_status("LiveMigration", name, ns, pending.pop(0))

    kube.on_get = hook


PROGRESS = [
    {"phase": "Pending"}, {"phase": "Pending"}, {"phase": "Announced", "reason": "WaitingForNotice"},
    {"phase": "Scheduling", "sourceHost": "host-a", "targetHost": "host-b", "attempt": 1},
    {"phase": "PreCopy", "transfer": {"attempt": 1, "state": "Copying", "round": 1, "bytesSent": 2**29, "bytesTotal": 2**30,
                                      "progress": 50}},
    {"phase": "PreCopy", "transfer": {"attempt": 1, "state": "Copying", "round": 2, "bytesSent": 2**30, "bytesTotal": 2**30,
                                      "progress": 90, "throttlePercent": 30}},
    {"phase": "PreCopy"},  # an unchanged state: no new line
]


@pytest.mark.parametrize("final, code", [
    ({"phase": "Completed", "downtimeMs": 42, "phaseTimes": {"Completed": "2030-01-02T03:05:05Z"}}, 0),
    ({"phase": "Failed", "failureReason": "target host-b lost its agent"}, 1),
    ({"phase": "Cancelled"}, 2),
])
def test_migrate_wait_follows_until_the_end(kube, final, code):
    script(kube, "web-1-x0001", PROGRESS + [final])
    r = run("migrate", "web-1", "--wait")
    assert r.exit_code == code, r.output
    lines = r.stdout.splitlines()
    assert lines[0] == "web-1-x0001"
    phases = [line.split()[1] for line in lines[1:] if line[:2].isdigit()]
    assert phases == ["Pending", "Announced", "Scheduling", "PreCopy", "PreCopy", final["phase"]]
    assert any("round 2" in line and "throttle 30%" in line and " 90%" in line for line in lines)
    summary = [line for line in lines if line.startswith("migration ")]
    assert summary == [f"migration team/web-1-x0001 {final['phase']}: droplet web-1 host-a -> host-b"
                       + ("" if code == 0 else " (the droplet stays on host-a)")]
    if code == 0:
        assert "duration 1m00s" in r.stdout and "downtime 42 ms" in r.stdout and "rounds 2" in r.stdout
    if code == 1:
        assert lines[-1] == "  reason: target host-b lost its agent"


def test_watch_a_migration_deleted_meanwhile(kube):
    run("migrate", "web-1", "--name", "m")

    def hook(kind, name, n):
        if n == 3:
            del kube.objects[("LiveMigration", "team", "m")]

    kube.on_get = hook
    one_line_error(run("watch", "m"), "migration team/m was deleted")


def test_ctrl_c_leaves_the_migration_running_and_says_so(kube):
    run("migrate", "web-1", "--name", "m")
    kube.set_status("LiveMigration", "m", "team", {"phase": "PreCopy"})

    def hook(kind, name, n):
        if n == 4:
            raise KeyboardInterrupt

    kube.on_get = hook
    r = run("watch", "m")
    assert r.exit_code == 130
    assert "migration team/m keeps running" in r.stderr and "ferry cancel m" in r.stderr
    assert not any(p[3].get("spec", {}).get("cancel") for p in kube.patches)


def test_watch_rides_out_an_api_hiccup(kube):
    run("migrate", "web-1", "--name", "m")

    def hook(kind, name, n):
        if n in (2, 3):
            raise StorageError("get LiveMigration team/m: ConnectionError: refused")
        if n == 5:
            kube.set_status("LiveMigration", "m", "team", {"phase": "Completed"})

    kube.on_get = hook
    r = run("watch", "m")
    assert r.exit_code == 0, r.output
    assert r.stderr.count("ferry: warning:") == 1


def test_watch_unknown_and_unreachable(kube, monkeypatch):
    one_line_error(run("watch", "nope"), "migration team/nope not found")

    def boom(kind, name, n):
        raise StorageError("get LiveMigration team/x: ConnectionError: HTTPSConnectionPool(host='127.0.0.1', "
                           "port=1): Max retries exceeded\n(Caused by NewConnectionError(... Connection refused'))")

    kube.on_get = boom
    one_line_error(run("watch", "x"), "cannot reach the Kubernetes API server at https://fake:6443 "
                                      "(connection refused); check --kubeconfig or KUBECONFIG")


# --- cancel -----------------------------------------------------------------------------------------

def test_cancel_sets_the_flag(kube):
    run("migrate", "web-1", "--name", "m")
    kube.set_status("LiveMigration", "m", "team", {"phase": "PreCopy", "sourceHost": "host-a"})
    r = run("cancel", "m")
    assert r.exit_code == 0, r.output
    assert kube.patches == [("LiveMigration", "team", "m", {"spec": {"cancel": True}})]
    assert r.stdout == "migration team/m: cancellation requested (phase PreCopy); droplet web-1 stays on host-a\n"
    r = run("cancel", "m")
    assert r.exit_code == 0 and "already requested" in r.stdout
    assert len(kube.patches) == 1


@pytest.mark.parametrize("phase, code", [("Completed", 1), ("Failed", 1), ("Cancelled", 0)])
def test_cancel_a_finished_migration_explains(kube, phase, code):
    run("migrate", "web-1", "--name", "m")
    kube.set_status("LiveMigration", "m", "team", {"phase": phase})
    r = run("cancel", "m")
    assert r.exit_code == code
    if code:
        one_line_error(r, f"migration team/m already ended ({phase}); there is nothing to cancel")
    else:
        assert r.stdout == "migration team/m is already Cancelled\n"
    assert kube.patches == []


def test_cancel_unknown(kube):
    one_line_error(run("cancel", "nope"), "migration team/nope not found")


def test_complete_sets_force_complete_once(kube):
    run("migrate", "web-1", "--name", "m", "--max-downtime", "900")
    assert kube.objects[("LiveMigration", "team", "m")]["spec"]["limits"] == {"maxDowntimeMs": 900}
    kube.set_status("LiveMigration", "m", "team", {"phase": "PreCopy", "sourceHost": "host-a"})
    r = run("complete", "m")
    assert r.exit_code == 0, r.output
    assert kube.patches == [("LiveMigration", "team", "m", {"spec": {"forceComplete": True}})]
    assert r.stdout.startswith("migration team/m: force-complete requested (phase PreCopy): the guest pauses now")
    r = run("complete", "m")
    assert r.exit_code == 0 and "already requested" in r.stdout
    assert len(kube.patches) == 1


def test_complete_a_finished_migration_explains(kube):
    run("migrate", "web-1", "--name", "m")
    kube.set_status("LiveMigration", "m", "team", {"phase": "Completed"})
    one_line_error(run("complete", "m"), "migration team/m already ended (Completed); there is nothing to complete")
    assert kube.patches == []


def test_force_after_needs_wait(kube):
    one_line_error(run("migrate", "web-1", "--force-after", "30"),
                   "--force-after needs --wait (or run `ferry complete NAME` later)")


# --- drain / uncordon -------------------------------------------------------------------------------

def test_drain_sets_maintenance_and_uncordon_clears_it(kube):
    r = run("drain", "host-a", "--reason", "kernel upgrade", "--at", "2030-05-06T07:08:09Z")
    assert r.exit_code == 0, r.output
    assert kube.objects[("Host", "", "host-a")]["spec"]["maintenance"] == {
        "reason": "kernel upgrade", "start": "2030-05-06T07:08:09Z"}
    assert "maintenance set (kernel upgrade)" in r.stdout
    r = run("drain", "host-a")  # again without --at: starts now, the old start is cleared
    assert kube.objects[("Host", "", "host-a")]["spec"]["maintenance"] == {"reason": "maintenance"}
    kube.objects[("Host", "", "host-a")]["spec"]["schedulable"] = False
    r = run("uncordon", "host-a")
    assert r.exit_code == 0 and r.stdout == "host host-a: maintenance cleared, schedulable\n"
    spec = kube.objects[("Host", "", "host-a")]["spec"]
    assert "maintenance" not in spec and spec["schedulable"] is True
    assert kube.patches[-1] == ("Host", "", "host-a", {"spec": {"maintenance": None, "schedulable": True}})


def test_drain_and_uncordon_unknown_host(kube):
    one_line_error(run("drain", "nope"), "host nope not found")
    one_line_error(run("uncordon", "nope"), "host nope not found")
    r = run("drain", "host-a", "--reason", " ")
    assert r.exit_code == 2 and "--reason" in r.stderr


def drain_script(kube: FakeKube, steps: list[tuple[dict, dict]]) -> None:
    """Each get of host-a applies the next (host status, {migration name: status}) step."""
    pending = list(steps)

    def hook(kind, name, n):
        if kind == "Host" and name == "host-a" and pending:
            hstatus, migrations = pending.pop(0)
            host = kube.objects[("Host", "", "host-a")]
            host["status"] = {"observedGeneration": host["metadata"]["generation"], **hstatus}
            for mname, mstatus in migrations.items():
                key = ("LiveMigration", "team", mname)
                if key not in kube.objects:
                    kube.add("LiveMigration", {"metadata": {"name": mname, "namespace": "team",
                                                            "labels": {"ferry.dev/evacuation": "host-a"}},
                                               "spec": {"droplet": mname.split("-")[1]}})
                kube.set_status("LiveMigration", mname, "team", mstatus)

    kube.on_get = hook


def ev(left, running=0, failed=0, completed=0):
    return {"dropletsLeft": left, "migrationsRunning": running, "migrationsFailed": failed,
            "migrationsCompleted": completed}


def test_drain_wait_until_evacuated(kube):
    kube.objects[("Host", "", "host-a")]["status"] = {"phase": "Evacuated", "observedGeneration": 1}  # stale
    drain_script(kube, [
        ({"phase": "Draining", "evacuation": ev(2, running=2)},
         {"ev-web1": {"phase": "PreCopy", "progress": 30}, "ev-web2": {"phase": "Announced"}}),
        ({"phase": "Draining", "evacuation": ev(1, running=1, completed=1)},
         {"ev-web1": {"phase": "Completed"}, "ev-web2": {"phase": "PreCopy"}}),
        ({"phase": "Evacuated", "evacuation": ev(0, completed=2)}, {"ev-web2": {"phase": "Completed"}}),
    ])
    # the first read sees the stale status (generation 2 > observed 1) and must not stop there
    kube.on_get, hook = None, kube.on_get
    calls = itertools.count(1)
    kube.on_get = lambda kind, name, n: hook(kind, name, n) if next(calls) > 2 else None
    r = run("drain", "host-a", "--wait")
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert "waiting for the operator" in out
    assert "ev-web1" not in out  # lines name droplets
    assert "web1: PreCopy" in out and "web2: Completed" in out
    assert out.splitlines()[-1] == "host host-a is empty; `ferry uncordon host-a` puts it back in service"


def test_drain_wait_stops_when_a_migration_failed_and_none_runs(kube):
    drain_script(kube, [
        ({"phase": "Draining", "evacuation": ev(2, running=2)}, {"ev-web1": {"phase": "PreCopy"},
                                                                 "ev-web2": {"phase": "PreCopy"}}),
        ({"phase": "Draining", "evacuation": ev(1, running=1, failed=1)},
         {"ev-web1": {"phase": "Failed", "failureReason": "no host fits: 3 insufficient memory"}}),
        ({"phase": "Draining", "evacuation": ev(1, running=0, failed=1, completed=1)},
         {"ev-web2": {"phase": "Completed"}}),
    ])
    r = run("drain", "host-a", "--wait")
    assert r.exit_code == 1, r.output
    assert "  team/ev-web1 (droplet web1) failed: no host fits: 3 insufficient memory" in r.stdout.splitlines()


# --- status / explain -------------------------------------------------------------------------------

def test_status_and_explain(kube):
    run("migrate", "web-1", "--name", "m")
    kube.set_status("LiveMigration", "m", "team", {"phase": "PreCopy", "sourceHost": "host-a", "targetHost": "host-b",
                                                   "placement": {"chosen": "host-b", "strategy": "spread",
                                                                 "considered": 2, "rejected": {"source": 1},
                                                                 "candidates": [{"host": "host-b", "score": 50}]}})
    r = run("status")
    assert r.exit_code == 0, r.output
    assert "HOSTS" in r.stdout and "host-a" in r.stdout
    assert "host-a  1      web-1" in r.stdout
    assert any(line.split()[:3] == ["m", "web-1", "PreCopy"] for line in r.stdout.splitlines())
    r = run("status", "-A")
    assert "team/web-1" in r.stdout and "NAMESPACE" in r.stdout
    r = run("explain", "web-1")
    assert r.exit_code == 0, r.output
    assert "migration team/m: PreCopy, host-a -> host-b" in r.stdout
    assert "  rejected: 1 source host (source)" in r.stdout
    one_line_error(run("explain", "nope"), "droplet team/nope not found")


def test_hints_name_the_program_as_called(kube):
    run("migrate", "web-1", "--name", "m")
    calls = itertools.count(1)

    def hook(kind, name, n):
        if next(calls) > 1:  # the first read checks it exists; then the user presses Ctrl-C
            raise KeyboardInterrupt

    kube.on_get = hook
    r = CliRunner().invoke(cli_main.cli, ["watch", "m"], prog_name="kubectl ferry")
    assert r.exit_code == 130 and "`kubectl ferry watch m`" in r.stderr


@pytest.mark.parametrize("server_says", ["404 page not found", "the server could not find the requested resource"])
def test_missing_crds_are_named(kube, server_says):
    def hook(kind, name, n):
        raise NotFound(f"get {kind} team/{name}: {server_says}\n (HTTP 404)")

    kube.on_get = hook
    one_line_error(run("explain", "web-1"), "the ferry.dev API is not served by https://fake:6443: install ferry's "
                                            "CRDs (kubectl apply -f crds/) or check the kubeconfig's cluster")


def test_every_user_command_is_registered():
    r = run("--help")
    listed = {line.split()[0] for line in r.stdout.split("Commands:")[1].splitlines() if line.strip()}
    assert {"migrate", "watch", "complete", "cancel", "drain", "uncordon", "status", "explain", "report"} <= listed


# --- report -----------------------------------------------------------------------------------------

ROUNDS = [
    {"round": 1, "startMs": 0, "ms": 2600, "bytes": 5 << 20, "dirtyBytes": 900 << 10, "dirtyRateBps": 350 << 10,
     "throttlePercent": 0},
    {"round": 2, "startMs": 2610, "ms": 480, "bytes": 900 << 10, "dirtyBytes": 700 << 10,
     "dirtyRateBps": 1500 << 10, "throttlePercent": 20},
    {"round": 7, "startMs": 3930, "ms": 70, "bytes": 120 << 10, "dirtyBytes": 0, "dirtyRateBps": 0,
     "throttlePercent": 60, "paused": True},
]


def test_report_prints_the_rounds_and_draws_them(kube, tmp_path):
    kube.add("LiveMigration", {"metadata": {"name": "move", "namespace": "team"}, "spec": {"droplet": "web-1"},
                               "status": {"phase": "Completed", "sourceHost": "host-a", "targetHost": "host-b",
                                          "downtimeMs": 87,
                                          "transfer": {"attempt": 1, "state": "Completed", "round": 7,
                                                       "bytesSent": 7 << 20, "maxThrottlePercent": 60,
                                                       "downtimeMs": 87, "rounds": ROUNDS}}})
    svg = tmp_path / "move.svg"
    r = run("report", "move", "--svg", str(svg))
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0] == "team/move: droplet web-1, host-a -> host-b, Completed"
    assert lines[1] == "  attempt 1, transfer Completed, 7 rounds, 7.0 MiB sent, throttle up to 60%, downtime 87 ms"
    assert lines[3].split() == ["ROUND", "START", "TOOK", "SENT", "DIRTIED", "DIRTY", "RATE", "THROTTLE"]
    assert lines[4].split() == ["1", "0.0s", "2600", "ms", "5.0", "MiB", "900.0", "KiB", "350.0", "KiB/s", "0%"]
    assert lines[6].split()[0] == "..." and lines[6].endswith("rounds 3-6 not kept")
    assert lines[7].split()[-4:] == ["pause:", "downtime", "87", "ms"] and lines[7].split()[-5] == "60%"
    assert lines[-1] == f"wrote {svg}"
    text = svg.read_text()
    assert text.startswith("<svg") and "pause 87 ms" in text


def test_report_of_a_migration_without_rounds_and_of_none(kube, tmp_path):
    kube.add("LiveMigration", {"metadata": {"name": "new", "namespace": "team"}, "spec": {"droplet": "web-1"}})
    r = run("report", "new")
    assert r.exit_code == 0 and r.stdout.splitlines()[-1] == "  no rounds reported (yet)"
    one_line_error(run("report", "nope"), "migration team/nope not found")
