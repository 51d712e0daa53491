"""The text of the user commands: status tables and explain (``ferry.cli.render``)."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferry.cli import render
from ferry.cli.progress import migration_view

NOW = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)


# --- connection errors ------------------------------------------------------------------------------

@pytest.mark.parametrize("text, why", [
    ("get Droplet a/b: ConnectionError: HTTPSConnectionPool(...): [Errno 111] Connection refused", "connection refused"),
    ("list Host: ConnectTimeout: ... timed out", "timed out"),
    ("get Host x: SSLError: certificate verify failed", "TLS error"),
    ("get Host x: ConnectionError: Name or service not known", "host name not resolvable"),
])
def test_connection_messages(text, why):
    msg = render.connection_message(text, "https://k:6443")
    assert msg == f"cannot reach the Kubernetes API server at https://k:6443 ({why}); check --kubeconfig or KUBECONFIG"


def test_other_errors_are_not_connection_errors():
    assert render.connection_message("get Droplet a/b: forbidden (HTTP 403)", "https://k") is None


# --- tables -----------------------------------------------------------------------------------------

def test_table_aligns_columns_and_marks_empty_cells():
    lines = render.table(["A", "LONGER"], [["xxxx", None], ["y", ""], ["z", 3]])
    assert lines == ["A     LONGER", "xxxx  -", "y     -", "z     3"]


def host(name, *, phase="Ready", droplets=2, heartbeat="2030-01-02T03:04:02Z", maintenance=None, schedulable=None):
    spec = {"datacenter": "nyc3", "capacity": {"cpu": 8, "memoryMiB": 16384, "diskGiB": 500}}
    if maintenance:
        spec["maintenance"] = {"reason": maintenance}
    if schedulable is not None:
        spec["schedulable"] = schedulable
    status = {"phase": phase, "droplets": droplets, "allocated": {"cpu": 3, "memoryMiB": 5120, "diskGiB": 130},
              "agent": {"heartbeatTime": heartbeat}}
    return {"metadata": {"name": name}, "spec": spec, "status": status}


def droplet(name, host_=None, phase="Placed", ns="team"):
    return {"metadata": {"name": name, "namespace": ns}, "spec": {"size": "s-1vcpu-1gb", "datacenter": "nyc3"},
            "status": {"host": host_, "phase": phase} if host_ or phase else {}}


def migration(name, phase, *, ns="team", droplet_="web-1", created="2030-01-02T03:00:05Z", **status):
    return {"metadata": {"name": name, "namespace": ns, "creationTimestamp": created},
            "spec": {"droplet": droplet_}, "status": {"phase": phase, **status}}


def test_hosts_table():
    lines = render.hosts_table([host("host-b", maintenance="kernel upgrade", phase="Draining"),
                              host("host-a"), {"metadata": {"name": "host-c"}, "spec": {}}], NOW)
    assert lines[0].split() == ["NAME", "DATACENTER", "PHASE", "DROPLETS", "CPU", "MEMORY", "DISK", "HEARTBEAT",
                                "MAINTENANCE"]
    assert lines[1].split() == ["host-a", "nyc3", "Ready", "2", "3/8", "5/16Gi", "130/500Gi", "3s", "ago", "-"]
    assert lines[2].split()[:3] == ["host-b", "nyc3", "Draining"] and lines[2].endswith("kernel upgrade")
    assert lines[3].split() == ["host-c", "-", "-", "-", "-", "-", "-", "never", "-"]


def test_cordoned_host_shows_it():
    assert "Ready,unschedulable" in render.hosts_table([host("h", schedulable=False)], NOW)[1]


def test_droplets_by_host_lists_every_host_and_the_unplaced():
    lines = render.droplets_by_host(
        [droplet("web-2", "host-a"), droplet("web-1", "host-a"), droplet("db", "host-x", phase="HostLost"),
         droplet("new", None, phase="Unschedulable")] + [droplet(f"n{i}", "host-c") for i in range(10)],
        [host("host-a"), host("host-b"), host("host-c")], qualify=False, limit=8)
    assert lines[0].split() == ["HOST", "COUNT", "DROPLETS"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert rows["host-a"].split(None, 2)[1:] == ["2", "web-1, web-2"]
    assert rows["host-b"].split() == ["host-b", "0", "-"]
    assert rows["host-c"].endswith("n7, +2 more")
    assert rows["host-x"].endswith("db (HostLost)")
    assert rows["(no"].endswith("new (Unschedulable)")


def test_migrations_table_shows_only_those_in_flight():
    ms = [
        migration("m-old", "PreCopy", sourceHost="host-a", targetHost="host-b", progress=40, created="2030-01-02T02:04:05Z",
                  transfer={"attempt": 1, "state": "Converging", "round": 3, "throttlePercent": 25, "progress": 42}),
        migration("m-new", "Pending", reason="ConcurrencyLimitReached"),
        migration("m-done", "Completed"), migration("m-bad", "Failed"), migration("m-bad2", "Failed"),
    ]
    lines = render.migrations_table([migration_view(m) for m in ms], NOW, qualify=False)
    assert lines[0].split()[:5] == ["NAME", "DROPLET", "PHASE", "SOURCE", "->"]
    assert lines[1].split() == ["m-old", "web-1", "PreCopy", "host-a", "->", "host-b", "42%", "3", "25%", "-", "1h00m"]
    assert lines[2].split() == ["m-new", "web-1", "Pending", "?", "->", "?", "-", "-", "-", "ConcurrencyLimitReached",
                                "4m00s"]
    assert lines[3] == "finished: 1 Completed, 2 Failed"
    assert len(lines) == 4


def test_migrations_table_when_nothing_runs():
    assert render.migrations_table([], NOW, qualify=True) == ["no migrations in flight"]


def test_status_lines_with_all_namespaces_qualifies_names():
    lines = render.status_lines([host("host-a")], [droplet("web-1", "host-a", ns="a"), droplet("web-1", "host-a", ns="b")],
                              [migration_view(migration("m", "Announced", ns="b"))], NOW, None)
    text = "\n".join(lines)
    assert "DROPLETS (all namespaces)" in text and "a/web-1, b/web-1" in text
    assert lines[lines.index("MIGRATIONS IN FLIGHT (all namespaces)") + 1].split()[0] == "NAMESPACE"
    assert lines[lines.index("MIGRATIONS IN FLIGHT (all namespaces)") + 2].split()[:2] == ["b", "m"]


def test_status_lines_of_an_empty_cluster():
    lines = render.status_lines([], [], [], NOW, "team")
    assert lines == ["HOSTS", "no hosts", "", "DROPLETS (namespace team)", "no droplets", "",
                     "MIGRATIONS IN FLIGHT (namespace team)", "no migrations in flight"]


# --- explain ----------------------------------------------------------------------------------------

PLACEMENT = {
    "chosen": "host-b", "strategy": "spread", "considered": 9, "message": "placed on host-b (score 71.3)",
    "candidates": [{"host": "host-b", "score": 71.3, "cpu": 75, "memory": 68.75, "disk": 70, "penalty": 0},
                   {"host": "host-c", "score": 65, "cpu": 60, "memory": 70, "disk": 65, "penalty": 5}],
    "rejected": {"datacenter": 2, "ready": 0, "source": 1, "memory": 3, "inbound": 0},
}


def test_placement_lines():
    lines = render.placement_lines(PLACEMENT)
    assert lines[0] == "  strategy spread, 9 host(s) considered, 3 feasible, chosen host-b"
    assert lines[1].split() == ["HOST", "SCORE", "CPU", "MEMORY", "DISK", "PENALTY"]
    assert lines[2].split() == ["host-b", "*", "71.3", "75.0", "68.8", "70.0", "0.0"]
    assert lines[3].split() == ["host-c", "65.0", "60.0", "70.0", "65.0", "5.0"]
    assert lines[4] == ("  rejected: 2 wrong datacenter (datacenter), 1 source host (source), "
                        "3 insufficient memory (memory)")
    assert lines[5] == "  placed on host-b (score 71.3)"


def test_placement_lines_top_and_nothing_feasible():
    many = dict(PLACEMENT, candidates=[dict(PLACEMENT["candidates"][1], host=f"h{i}") for i in range(7)])
    lines = render.placement_lines(many, top=5)
    assert "  ... 2 more candidate(s)" in lines
    none = {"chosen": None, "strategy": "pack", "considered": 3, "candidates": [], "rejected": {"cpu": 3},
            "message": "no host fits"}
    lines = render.placement_lines(none)
    assert lines[0] == "  strategy pack, 3 host(s) considered, 0 feasible, no host chosen"
    assert "  no candidates" in lines and "  rejected: 3 insufficient cpu (cpu)" in lines


@pytest.mark.parametrize("placement", [None, {}, "garbage", {"chosen": "x"}, {"candidates": [None, 3, {}]},
                                       {"rejected": {"cpu": "two"}, "considered": "many"}])
def test_placement_lines_survive_missing_fields(placement):
    lines = render.placement_lines(placement)
    assert lines and all(isinstance(line, str) for line in lines)


def test_explain_lines():
    d = droplet("web-1", "host-a")
    d["status"].update({"placement": PLACEMENT, "reason": "Placed", "message": "placed on host-a",
                        "conditions": [{"type": "Placed", "status": "True"},
                                       {"type": "OfflineMigrationNeeded", "status": "True", "message": "3 attempts failed"}],
                        "lastMigration": {"name": "m0", "fromHost": "host-z", "toHost": "host-a",
                                          "completedAt": "2030-01-01T00:00:00Z"}})
    m = migration("m1", "Failed", sourceHost="host-a", targetHost="host-b", failureReason="target lost",
                  placement=PLACEMENT)
    text = "\n".join(render.explain_lines(d, migration_view(m), m["status"]["placement"], NOW))
    assert text.startswith("droplet team/web-1: Placed on host-a, size s-1vcpu-1gb, datacenter nyc3\n")
    assert "  Placed: placed on host-a" in text
    assert "  condition OfflineMigrationNeeded: 3 attempts failed" in text
    assert "  last migration m0: host-z -> host-a at 2030-01-01T00:00:00Z" in text
    assert "migration team/m1: Failed, host-a -> host-b, created 4m00s ago\n  reason: target lost" in text
    assert text.count("host-b *") == 2  # droplet placement and migration target choice


def test_explain_lines_of_a_fresh_droplet():
    d = {"metadata": {"name": "new", "namespace": "team"}, "spec": {"resources": {"cpu": 2}}}
    lines = render.explain_lines(d, None, None, NOW)
    assert lines[0] == "droplet team/new: no phase yet (no host), size cpu 2, datacenter ?"
    assert "  no placement recorded (is the operator running?)" in lines
    assert lines[-1] == "no LiveMigration for this droplet in its namespace"


junk = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                    max_leaves=10)
fields = st.sampled_from(["phase", "host", "placement", "conditions", "lastMigration", "reason", "message",
                          "allocated", "agent", "droplets", "candidates", "rejected", "chosen", "considered",
                          "capacity", "maintenance", "schedulable", "datacenter", "size", "resources"])
objs = st.dictionaries(fields, junk | st.dictionaries(fields, junk, max_size=5), max_size=6)


@settings(max_examples=200, deadline=None)
@given(spec=objs, status=objs, mstatus=objs)
def test_render_anything_without_raising(spec, status, mstatus):
    body = {"metadata": {"name": "x", "namespace": "n"}, "spec": spec, "status": status}
    m = {"metadata": {"name": "m", "namespace": "n"}, "spec": {"droplet": "x"}, "status": mstatus}
    view = migration_view(m)
    assert render.explain_lines(body, view, mstatus.get("placement"), NOW)
    assert render.status_lines([body], [body], [view], NOW, None)
    assert render.status_lines([body], [body], [view], NOW, "n")


def test_placement_lines_name_incompatible_and_avoided_hosts():
    lines = render.placement_lines({**PLACEMENT, "incompatible": {"old": "CPU lacks 1 flag(s) the guest uses: avx2"},
                                    "avoided": {"bad": "attempt 1 failed there: TargetFailed"}})
    assert "  incompatible old: CPU lacks 1 flag(s) the guest uses: avx2" in lines
    assert "  avoided bad: attempt 1 failed there: TargetFailed" in lines


def test_report_subtitle_puts_downtime_next_to_budget_prediction_and_steps():
    from ferry.api.livemigration import LiveMigration
    from ferry.cli.render import report_subtitle

    body = {"metadata": {"name": "m", "namespace": "ns"}, "spec": {"droplet": "web"},
            "status": {"phase": "Completed", "attempt": 1, "downtimeMs": 180, "downtimeBudgetMs": 50,
                       "transfer": {"attempt": 1, "state": "Completed", "round": 9, "downtimeMs": 180,
                                    "predictedDowntimeMs": 160, "downtimeSteps": 3, "allowedDowntimeMs": 162,
                                    "maxDowntimeMs": 200, "forced": True}}}
    line = report_subtitle(LiveMigration.from_body(body))
    assert "downtime 180 ms (budget 50 ms, predicted 160 ms)" in line
    assert "3 downtime steps to 162 ms (ceiling 200 ms)" in line and "force-completed" in line


def test_report_subtitle_says_what_was_verified_and_when():
    from ferry.api.livemigration import LiveMigration
    from ferry.cli.render import report_subtitle

    body = {"metadata": {"name": "m", "namespace": "ns"}, "spec": {"droplet": "web"},
            "status": {"phase": "Failed", "attempt": 1, "downtimeMs": 230,
                       "verification": {"method": "frozen-point", "state": "Mismatch", "sourceVerifyMs": 49,
                                        "targetVerifyMs": 60, "sourceDigest": "sha256:aa", "targetDigest": "sha256:bb"},
                       "transfer": {"attempt": 1, "state": "Completed", "downtimeMs": 230}}}
    line = report_subtitle(LiveMigration.from_body(body))
    assert "verification Mismatch (frozen-point; hashed after the resume: source 49 ms, target 60 ms)" in line
