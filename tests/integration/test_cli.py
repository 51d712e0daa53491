"""The user's `ferry` commands against a real API server (no operator: the test plays it).

Each command runs as its own process, the way a user runs it; objects are read back with
kubectl, and statuses the operator or agents would write are patched by hand.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import pathlib
import subprocess
import sys
import uuid

import pytest
import yaml
from support import wait_until

GROUP = "ferry.dev/v1alpha1"


def ferry(kubeconfig: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "KUBECONFIG": kubeconfig}
    return subprocess.run([sys.executable, "-m", "ferry.cli.main", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def now_rfc3339(delta: float = 0) -> str:
    t = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=delta)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture
def hosts(kubectl):
    """Two fresh cluster-scoped Hosts with names unique to this test; deleted afterwards."""
    prefix = f"c{uuid.uuid4().hex[:6]}"
    names = [f"{prefix}-host-a", f"{prefix}-host-b"]
    for name in names:
        kubectl("apply", "-f", "-", input=json.dumps({
            "apiVersion": GROUP, "kind": "Host", "metadata": {"name": name},
            "spec": {"datacenter": "nyc3", "capacity": {"cpu": 8, "memoryMiB": 16384, "diskGiB": 500}}}))
    yield names
    kubectl("delete", "hosts.ferry.dev", *names, "--wait=false", check=False)


@pytest.fixture
def droplet(kubectl, namespace, hosts):
    """Droplet web-1 placed (by hand) on the first host."""
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps({
        "apiVersion": GROUP, "kind": "Droplet", "metadata": {"name": "web-1"},
        "spec": {"size": "s-2vcpu-4gb", "datacenter": "nyc3", "ip": "10.9.8.7"}}))
    patch_status(kubectl, "droplet", "web-1", {"host": hosts[0], "phase": "Placed"}, namespace)
    return "web-1"


def patch_status(kubectl, kind: str, name: str, status: dict, namespace: str | None = None) -> None:
    ns = ["-n", namespace] if namespace else []
    kubectl("patch", f"{kind}.ferry.dev", name, *ns, "--subresource=status", "--type=merge",
            "-p", json.dumps({"status": status}))


def get(kubectl, kind: str, name: str, namespace: str | None = None) -> dict:
    ns = ["-n", namespace] if namespace else []
    return kubectl.json("get", f"{kind}.ferry.dev", name, *ns)


def create_migration(kubectl, namespace: str, name: str, droplet: str = "web-1") -> None:
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps({
        "apiVersion": GROUP, "kind": "LiveMigration", "metadata": {"name": name}, "spec": {"droplet": droplet}}))


# --- migrate ----------------------------------------------------------------------------------------

def test_migrate_creates_a_well_formed_migration(kubeconfig, kubectl, namespace, hosts, droplet):
    before = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    r = ferry(kubeconfig, "-n", namespace, "migrate", droplet, "--to", hosts[1], "--at", "+10m",
              "--bandwidth", "40", "--downtime", "120", "--max-attempts", "2", "--offline")
    assert r.returncode == 0, r.stderr
    name = r.stdout.strip()
    assert name.startswith("web-1-") and len(name) > len("web-1-") and "\n" not in name
    lm = get(kubectl, "livemigration", name, namespace)
    assert lm["metadata"]["generateName"] == "web-1-"
    assert lm["metadata"]["labels"] == {"ferry.dev/droplet": "web-1"}
    at = dt.datetime.fromisoformat(lm["spec"].pop("scheduledAt").replace("Z", "+00:00"))
    assert dt.timedelta(minutes=10) - dt.timedelta(seconds=1) <= at - before <= dt.timedelta(minutes=10, seconds=30)
    assert lm["spec"] == {"droplet": "web-1", "targetHost": hosts[1], "mode": "offline", "cancel": False,
                          "forceComplete": False, "limits": {"bandwidthMiBps": 40, "downtimeMs": 120, "maxAttempts": 2}}


def test_migrate_defaults_to_the_kubeconfigs_namespace(kubeconfig, kubectl, namespace, droplet, tmp_path):
    cfg = yaml.safe_load(pathlib.Path(kubeconfig).read_text())
    current = next(c for c in cfg["contexts"] if c["name"] == cfg["current-context"])
    current["context"]["namespace"] = namespace
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(cfg))
    r = ferry(str(path), "migrate", droplet, "--name", "by-default")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "by-default\n"
    lm = get(kubectl, "livemigration", "by-default", namespace)
    assert lm["spec"] == {"droplet": "web-1", "mode": "live", "cancel": False, "forceComplete": False}


def test_migrate_argument_error_creates_nothing(kubeconfig, kubectl, namespace, droplet):
    r = ferry(kubeconfig, "-n", namespace, "migrate", droplet, "--at", "next tuesday")
    assert r.returncode == 2 and "RFC 3339" in r.stderr and "Traceback" not in r.stderr
    assert kubectl.json("get", "livemigrations.ferry.dev", "-n", namespace)["items"] == []


# --- cancel -----------------------------------------------------------------------------------------

def test_cancel_sets_the_flag_and_explains_a_finished_migration(kubeconfig, kubectl, namespace, hosts, droplet):
    create_migration(kubectl, namespace, "m1")
    patch_status(kubectl, "livemigration", "m1", {"phase": "PreCopy", "sourceHost": hosts[0]}, namespace)
    r = ferry(kubeconfig, "-n", namespace, "cancel", "m1")
    assert r.returncode == 0, r.stderr
    assert r.stdout == (f"migration {namespace}/m1: cancellation requested (phase PreCopy); "
                        f"droplet web-1 stays on {hosts[0]}\n")
    assert get(kubectl, "livemigration", "m1", namespace)["spec"]["cancel"] is True

    create_migration(kubectl, namespace, "m2")
    patch_status(kubectl, "livemigration", "m2", {"phase": "Completed"}, namespace)
    r = ferry(kubeconfig, "-n", namespace, "cancel", "m2")
    assert r.returncode == 1
    assert r.stderr == f"ferry: error: migration {namespace}/m2 already ended (Completed); there is nothing to cancel\n"
    assert get(kubectl, "livemigration", "m2", namespace)["spec"]["cancel"] is False


# --- drain / uncordon -------------------------------------------------------------------------------

def test_drain_and_uncordon_patch_the_host(kubeconfig, kubectl, hosts):
    host = hosts[0]
    r = ferry(kubeconfig, "drain", host, "--reason", "kernel upgrade", "--at", "2031-02-03T04:05:06Z")
    assert r.returncode == 0, r.stderr
    assert get(kubectl, "host", host)["spec"]["maintenance"] == {"reason": "kernel upgrade",
                                                                 "start": "2031-02-03T04:05:06Z"}
    r = ferry(kubeconfig, "drain", host)  # again, now: the old start goes
    assert r.returncode == 0, r.stderr
    assert get(kubectl, "host", host)["spec"]["maintenance"] == {"reason": "maintenance"}
    kubectl("patch", "hosts.ferry.dev", host, "--type=merge", "-p", '{"spec": {"schedulable": false}}')
    r = ferry(kubeconfig, "uncordon", host)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"host {host}: maintenance cleared, schedulable\n"
    spec = get(kubectl, "host", host)["spec"]
    assert "maintenance" not in spec and spec["schedulable"] is True


def test_drain_wait_follows_the_evacuation(kubeconfig, kubectl, hosts):
    host = hosts[0]
    env = {**os.environ, "KUBECONFIG": kubeconfig}
    proc = subprocess.Popen([sys.executable, "-m", "ferry.cli.main", "drain", host, "--wait"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        generation = wait_until(lambda: get(kubectl, "host", host)["spec"].get("maintenance")
                                and get(kubectl, "host", host)["metadata"]["generation"], 30, what="maintenance set")
        evac = {"dropletsLeft": 1, "migrationsRunning": 1, "migrationsFailed": 0, "migrationsCompleted": 0}
        patch_status(kubectl, "host", host, {"phase": "Draining", "observedGeneration": generation, "evacuation": evac})
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=2)  # still draining: it keeps following
        patch_status(kubectl, "host", host, {"phase": "Evacuated", "evacuation": {
            "dropletsLeft": 0, "migrationsRunning": 0, "migrationsFailed": 0, "migrationsCompleted": 1}})
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "Draining: 1 droplet(s) left, 1 migrating" in out
    assert f"host {host} Evacuated: 0 droplet(s) left" in out


# --- status / explain -------------------------------------------------------------------------------

PLACEMENT = {"chosen": None, "strategy": "spread", "considered": 3, "message": "picked by score",
             "candidates": [{"host": "HB", "score": 71.3, "cpu": 75, "memory": 68.75, "disk": 70, "penalty": 0}],
             "rejected": {"datacenter": 1, "source": 1, "cpu": 0}}


def test_status_and_explain_render_hand_written_status(kubeconfig, kubectl, namespace, hosts, droplet):
    a, b = hosts
    patch_status(kubectl, "host", a, {
        "phase": "Ready", "droplets": 1, "allocated": {"cpu": 2, "memoryMiB": 4096, "diskGiB": 80},
        "agent": {"heartbeatTime": now_rfc3339(-3), "address": "127.0.0.1:7000"}})
    placement = json.loads(json.dumps(PLACEMENT).replace("HB", b))
    placement["chosen"] = b
    patch_status(kubectl, "droplet", droplet, {"reason": "Placed", "message": f"placed on {a}",
                                               "placement": dict(placement, chosen=a)}, namespace)
    create_migration(kubectl, namespace, "m1")
    patch_status(kubectl, "livemigration", "m1", {
        "phase": "PreCopy", "attempt": 1, "sourceHost": a, "targetHost": b, "placement": placement,
        "transfer": {"attempt": 1, "state": "Copying", "round": 3, "bytesSent": 3 << 29, "bytesTotal": 1 << 30, "progress": 64,
                     "throttlePercent": 20}}, namespace)

    r = ferry(kubeconfig, "-n", namespace, "status")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    host_row = next(line for line in lines if line.startswith(a + " "))
    cells = host_row.split()
    assert cells[1:7] == ["nyc3", "Ready", "1", "2/8", "4/16Gi", "80/500Gi"]
    assert cells[7].endswith("s") and 3 <= float(cells[7][:-1]) < 30 and cells[8:] == ["ago", "-"]
    assert next(line for line in lines if line.startswith(b + " ")).split()[2] == "-"  # no status yet
    assert any(line.split() == [a, "1", "web-1"] for line in lines)
    assert any(line.split() == ["m1", "web-1", "PreCopy", a, "->", b, "64%", "3", "20%", "-"] + line.split()[-1:]
               for line in lines), r.stdout

    r = ferry(kubeconfig, "-n", namespace, "status", "--all-namespaces")
    assert r.returncode == 0, r.stderr
    assert f"{namespace}/web-1" in r.stdout

    r = ferry(kubeconfig, "-n", namespace, "explain", droplet)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith(f"droplet {namespace}/web-1: Placed on {a}, size s-2vcpu-4gb, datacenter nyc3\n")
    assert f"migration {namespace}/m1: PreCopy, {a} -> {b}" in out
    assert "  strategy spread, 3 host(s) considered, 1 feasible, chosen " + b in out
    assert f"  {b} *  71.3   75.0  68.8    70.0  0.0" in out
    assert "  rejected: 1 wrong datacenter (datacenter), 1 source host (source)" in out


# --- errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["migrate", "nope"], "droplet {ns}/nope not found"),
    (["watch", "nope"], "migration {ns}/nope not found"),
    (["cancel", "nope"], "migration {ns}/nope not found"),
    (["explain", "nope"], "droplet {ns}/nope not found"),
    (["drain", "nope-host-x"], "host nope-host-x not found"),
    (["uncordon", "nope-host-x"], "host nope-host-x not found"),
])
def test_missing_objects_are_one_line_errors(kubeconfig, namespace, args, message):
    r = ferry(kubeconfig, "-n", namespace, *args)
    assert r.returncode == 1
    assert r.stderr == f"ferry: error: {message.format(ns=namespace)}\n"
    assert r.stdout == ""


def test_unreachable_cluster_is_one_line(kubeconfig, tmp_path):
    import socket

    cfg = yaml.safe_load(pathlib.Path(kubeconfig).read_text())
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for cluster in cfg["clusters"]:
        cluster["cluster"]["server"] = f"https://127.0.0.1:{port}"
    path = tmp_path / "dead.kubeconfig"
    path.write_text(yaml.safe_dump(cfg))
    for args in (["status"], ["migrate", "web-1"], ["drain", "h"]):
        r = ferry(str(path), *args)
        assert r.returncode == 1
        assert r.stderr == (f"ferry: error: cannot reach the Kubernetes API server at https://127.0.0.1:{port} "
                            "(connection refused); check --kubeconfig or KUBECONFIG\n")
    r = ferry(str(tmp_path / "missing"), "status")
    assert r.returncode == 1 and r.stderr.startswith("ferry: error: no Kubernetes credentials")
    assert r.stderr.count("\n") == 1


# --- migrate --wait ---------------------------------------------------------------------------------

@pytest.mark.parametrize("final, code", [
    ({"phase": "Completed", "downtimeMs": 87}, 0),
    ({"phase": "Failed", "failureReason": "target host lost its agent"}, 1),
    ({"phase": "Cancelled"}, 2),
])
def test_migrate_wait_exit_code_follows_the_final_phase(kubeconfig, kubectl, namespace, hosts, droplet, final, code):
    a, b = hosts
    env = {**os.environ, "KUBECONFIG": kubeconfig}
    proc = subprocess.Popen([sys.executable, "-m", "ferry.cli.main", "-n", namespace, "migrate", droplet,
                             "--name", "m", "--wait"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: kubectl("get", "livemigrations.ferry.dev", "m", "-n", namespace, check=False).returncode == 0,
                   30, what="the migration to exist")
        patch_status(kubectl, "livemigration", "m", {
            "phase": "PreCopy", "attempt": 1, "sourceHost": a, "targetHost": b,
            "transfer": {"attempt": 1, "state": "Copying", "round": 2, "bytesSent": 1 << 29, "bytesTotal": 1 << 30, "progress": 50,
                         "throttlePercent": 10}}, namespace)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=2)  # not terminal: it keeps following
        patch_status(kubectl, "livemigration", "m", final, namespace)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, (out, err)
    lines = out.splitlines()
    assert lines[0] == "m"
    assert any("PreCopy" in line and " 50%" in line and "round 2" in line and "throttle 10%" in line
               for line in lines), out
    assert f"migration {namespace}/m {final['phase']}: droplet web-1 {a} -> {b}" in out
    if code == 1:
        assert lines[-1] == "  reason: target host lost its agent"
    if code == 0:
        assert "downtime 87 ms" in out


def test_watch_on_a_terminal_draws_a_live_bar(kubeconfig, kubectl, namespace, hosts, droplet):
    """On a TTY the same command shows a rich progress bar, then the summary."""
    import pty
    import select

    a, b = hosts
    create_migration(kubectl, namespace, "m")
    patch_status(kubectl, "livemigration", "m", {
        "phase": "PreCopy", "attempt": 1, "sourceHost": a, "targetHost": b,
        "transfer": {"attempt": 1, "state": "Copying", "round": 4, "bytesSent": 3 << 28, "bytesTotal": 1 << 30, "progress": 75,
                     "throttlePercent": 35, "etaSeconds": 12}}, namespace)
    env = {**os.environ, "KUBECONFIG": kubeconfig, "COLUMNS": "200", "TERM": "xterm"}
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "ferry.cli.main", "-n", namespace, "watch", "m"], env=env,
                            stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    chunks: list[bytes] = []

    def read_some(timeout: float = 0.2) -> str:
        while select.select([leader], [], [], timeout)[0]:
            try:
                data = os.read(leader, 65536)
            except OSError:  # the process ended and closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks).decode(errors="replace")

    try:
        wait_until(lambda: "round 4" in read_some(), 30, what="the bar to show round 4")
        patch_status(kubectl, "livemigration", "m", {"phase": "Completed", "downtimeMs": 55}, namespace)
        wait_until(lambda: (read_some(), proc.poll() is not None)[1], 30, what="watch to end")
        text = read_some()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        os.close(leader)
    assert proc.returncode == 0, text
    assert "━" in text and "75%" in text and "throttle 35%" in text and "ETA 12s" in text
    assert f"migration {namespace}/m Completed: droplet web-1 {a} -> {b}" in text
    assert "downtime 55 ms" in text


def test_ctrl_c_leaves_the_migration_running(kubeconfig, kubectl, namespace, droplet, tmp_path):
    import signal

    env = {**os.environ, "KUBECONFIG": kubeconfig, "PYTHONUNBUFFERED": "1"}
    out_path, err_path = tmp_path / "out", tmp_path / "err"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        # Ctrl-C as a terminal delivers it: the CLI starts with SIGINT's default action, whatever
        # the test runner inherited (a job started with `&` by a non-interactive shell ignores
        # SIGINT, and Python then never turns it into KeyboardInterrupt)
        proc = subprocess.Popen([sys.executable, "-m", "ferry.cli.main", "-n", namespace, "migrate", droplet,
                                 "--name", "m", "--wait"], env=env, stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            # the first progress line, whichever phase it shows: "waiting for the operator to pick it
            # up" when the CLI's first read wins, Pending or later when the operator's first write
            # does (no host runs an agent here, so it never gets further than looking for a target)
            wait_until(lambda: out_path.read_text().strip(), 30, what="the first progress line")
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 130
    assert err_path.read_text().strip() == (
        f"stopped watching; migration {namespace}/m keeps running "
        "(`ferry watch m` to follow it, `ferry cancel m` to cancel it, "
        "`ferry complete m` to pause it now and finish)")
    assert get(kubectl, "livemigration", "m", namespace)["spec"]["cancel"] is False
