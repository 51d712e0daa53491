"""The agent's shell (observe -> plan -> execute, heartbeat) over an in-memory API
and in-memory drivers: whole migrations between two agents with the operator's part played by
hand, failures of driver calls, restarts, and the record-is-the-lock guard at execution time."""

from __future__ import annotations

import datetime as dt
import logging
import threading

import pytest
from fakes import NS, FakeDriver, FakeKube, Network, droplet_body, lm_body
from support import wait_until

from ferry.agent.loop import Agent
from ferry.drivers.base import MigrationState, VMKey, VMState
from ferry.settings import Settings

KEY = VMKey(NS, "web")
SECRET = b"k" * 32


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0
        self.wall = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)

    def mono(self) -> float:
        return self.t

    def now(self) -> dt.datetime:
        return self.wall + dt.timedelta(seconds=self.t - 1000.0)

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def kube() -> FakeKube:
    k = FakeKube()
    for h in ("a", "b"):
        k.put({"apiVersion": "ferry.dev/v1alpha1", "kind": "Host", "metadata": {"name": h},
               "spec": {"datacenter": "nyc3", "capacity": {"cpu": 8, "memoryMiB": 8192, "diskGiB": 100}}})
    k.secrets[(NS, "move-transfer")] = SECRET
    return k


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def net() -> Network:
    return Network()


def make_agent(host: str, kube: FakeKube, clock: Clock, net: Network, driver: FakeDriver | None = None,
               steps: int = 3) -> Agent:
    drv = driver or FakeDriver(host, net, steps=steps)
    settings = Settings(report_interval_seconds=1.0, heartbeat_seconds=5.0)
    return Agent(host, drv, kube, settings, address="127.0.0.1" if host == "a" else "127.0.0.2",
                 now=clock.now, clock=clock.mono)


def sync(agent: Agent, kube: FakeKube) -> None:
    """What the watches would show: the objects whose labels name this host."""
    agent.observer.droplets.replace(kube.list("Droplet", selector=f"ferry.dev/host={agent.host}"))
    agent.observer.lm_source.replace(kube.list("LiveMigration", selector=f"ferry.dev/source-host={agent.host}"))
    agent.observer.lm_target.replace(kube.list("LiveMigration", selector=f"ferry.dev/target-host={agent.host}"))
    agent.observer.forget_all()


def step(kube: FakeKube, clock: Clock, *agents: Agent, seconds: float = 0.3) -> None:
    clock.advance(seconds)
    for a in agents:
        sync(a, kube)
        a.cycle()
    assert_one_runs(*agents)


def assert_one_runs(*agents: Agent) -> None:
    """Invariant 1: the droplet's guest runs on at most one host at any instant."""
    running = [a.host for a in agents if (v := a.driver.vms.get(KEY)) is not None and v.state == VMState.RUNNING]
    assert len(running) <= 1, running


def set_phase(kube: FakeKube, phase: str, **status) -> None:
    kube.patch_status("LiveMigration", "move", {"phase": phase, **status}, NS)


def flip(kube: FakeKube, to: str) -> None:
    body = kube.obj("Droplet", "web", NS)
    body["metadata"]["labels"]["ferry.dev/host"] = to
    body["status"]["host"] = to
    kube.put(body)


def lm_status(kube: FakeKube) -> dict:
    return kube.obj("LiveMigration", "move", NS)["status"]


def placed(kube: FakeKube, host: str = "a", power: str = "on") -> None:
    kube.put(droplet_body("web", host, power=power))


def run_until(pred, kube, clock, *agents, limit: int = 40):
    for _ in range(limit):
        if pred():
            return
        step(kube, clock, *agents)
    raise AssertionError("condition not reached")


def migrate_to_precopy(kube, clock, a, b, **lm_kw):
    kube.put(lm_body(phase="Preparing", **lm_kw))
    step(kube, clock, a, b)
    t = lm_status(kube)["target"]
    assert t["state"] == "Listening" and t["attempt"] == 1 and t["address"].startswith("127.0.0.2:")
    set_phase(kube, "PreCopy")


def test_start_stop_and_heartbeat(kube, clock, net):
    a = make_agent("a", kube, clock, net)
    placed(kube)
    step(kube, clock, a)
    assert a.driver.vms[KEY].state == VMState.RUNNING
    assert a.driver.vms[KEY].spec.memory_mib == 1024
    assert a.heartbeat()
    agent_status = kube.obj("Host", "a")["status"]["agent"]
    assert agent_status["vms"] == [{"namespace": NS, "name": "web", "state": "Running"}]
    assert agent_status["address"] == "127.0.0.1" and agent_status["driver"] == "fake" and agent_status["version"]
    host_patches = [s for kind, _, name, s in kube.patches if kind == "Host"]
    assert host_patches and all(set(s) == {"agent"} for s in host_patches)  # never phase/conditions

    body = kube.obj("Droplet", "web", NS)
    body["spec"]["powerState"] = "off"
    kube.put(body)
    step(kube, clock, a)
    assert a.driver.vms[KEY].state == VMState.STOPPED
    step(kube, clock, a)
    assert [c for c in a.driver.calls if c[0] in ("start", "stop")] == [("start", "ns/web"), ("stop", "ns/web")]


def test_heartbeat_without_host_object_keeps_going(kube, clock, net, caplog):
    kube.remove("Host", "a")
    a = make_agent("a", kube, clock, net)
    with caplog.at_level(logging.INFO, logger="ferry.agent"):
        assert a.heartbeat() is False
        assert a.heartbeat() is False
        kube.put({"apiVersion": "ferry.dev/v1alpha1", "kind": "Host", "metadata": {"name": "a"}, "spec": {}})
        assert a.heartbeat() is True
    missing = [r for r in caplog.records if "does not exist" in r.getMessage()]
    assert len(missing) == 1  # said clearly, once (repeated every minute, not every beat)
    assert "heartbeatTime" in kube.obj("Host", "a")["status"]["agent"]


def test_whole_migration_between_two_agents(kube, clock, net):
    a, b = make_agent("a", kube, clock, net), make_agent("b", kube, clock, net)
    placed(kube)
    step(kube, clock, a, b)
    migrate_to_precopy(kube, clock, a, b)

    run_until(lambda: lm_status(kube).get("target", {}).get("state") == "Received", kube, clock, a, b)
    s = lm_status(kube)
    assert s["transfer"]["state"] == "Completed" and s["transfer"]["progress"] == 100
    assert s["transfer"]["digest"] == s["target"]["digest"] == "d-web"
    assert s["target"]["address"]  # kept across reports
    assert a.driver.vms[KEY].state == VMState.PAUSED

    set_phase(kube, "CutOver")
    step(kube, clock, a, b)
    step(kube, clock, a, b)
    assert b.driver.vms[KEY].state == VMState.INCOMING, "the target resumed before the record named it"
    assert KEY in a.driver.vms, "the source deleted its copy before the flip"

    flip(kube, "b")
    step(kube, clock, a, b)
    assert b.driver.vms[KEY].state == VMState.RUNNING
    assert lm_status(kube)["target"]["state"] == "Running"
    # the source keeps its paused copy until it sees the target report Running (a target that
    # died before that hands the droplet back to it), then destroys it
    step(kube, clock, a, b)
    assert KEY not in a.driver.vms
    set_phase(kube, "Completed")
    calls_before = len(a.driver.calls) + len(b.driver.calls)
    for _ in range(3):
        step(kube, clock, a, b)
    mutating = [c for c in a.driver.calls[calls_before:] + b.driver.calls if c[0] not in ("query_migration",)]
    assert ("start", "ns/web") not in mutating[len(mutating) - 3:]
    assert KEY not in a.driver.vms and b.driver.vms[KEY].state == VMState.RUNNING


def test_options_reach_the_driver(kube, clock, net):
    a, b = make_agent("a", kube, clock, net), make_agent("b", kube, clock, net)
    placed(kube)
    step(kube, clock, a, b)
    migrate_to_precopy(kube, clock, a, b, limits={"downtimeMs": 40, "bandwidthMiBps": 3})
    step(kube, clock, a, b)
    opts = a.driver.vms[KEY].options
    assert (opts.downtime_budget_ms, opts.bandwidth_bps, opts.offline) == (40, 3 * 1024 * 1024, False)


def test_transfer_reports_are_rate_limited(kube, clock, net):
    a, b = make_agent("a", kube, clock, net, steps=40), make_agent("b", kube, clock, net)
    placed(kube)
    step(kube, clock, a, b)
    migrate_to_precopy(kube, clock, a, b)
    before = len(kube.patches)
    for _ in range(20):  # 20 cycles in 2 s of (fake) time
        step(kube, clock, a, b, seconds=0.1)
    transfer = [s for kind, _, name, s in kube.patches[before:] if "transfer" in s]
    assert 2 <= len(transfer) <= 3, len(transfer)  # first report, then at most one a second


def test_agent_restart_mid_copy_completes(kube, clock, net):
    drv_a = FakeDriver("a", net, steps=6)
    a, b = make_agent("a", kube, clock, net, drv_a), make_agent("b", kube, clock, net)
    placed(kube)
    step(kube, clock, a, b)
    migrate_to_precopy(kube, clock, a, b)
    step(kube, clock, a, b)
    step(kube, clock, a, b)
    assert drv_a.vms[KEY].mstate == MigrationState.COPYING
    # the agent process dies; the VM process (the driver's state) lives on; a new agent starts
    a2 = make_agent("a", kube, clock, net, drv_a)
    run_until(lambda: lm_status(kube).get("target", {}).get("state") == "Received", kube, clock, a2, b)
    assert lm_status(kube)["transfer"]["state"] == "Completed"
    assert [c for c in drv_a.calls if c[0] == "start_migration"] == [("start_migration", "ns/web")]


def test_failed_prepare_becomes_a_report(kube, clock, net):
    a, b = make_agent("a", kube, clock, net), make_agent("b", kube, clock, net)
    b.driver.fail["prepare_incoming"] = "disk full"
    placed(kube)
    kube.put(lm_body(phase="Preparing"))
    step(kube, clock, a, b)
    t = lm_status(kube)["target"]
    assert t["state"] == "Failed" and "disk full" in t["error"] and t["attempt"] == 1
    calls = len(b.driver.calls)
    step(kube, clock, a, b)
    assert len(b.driver.calls) == calls  # reported once; the operator decides, no retry loop


def test_failed_start_migration_becomes_a_report(kube, clock, net):
    a, b = make_agent("a", kube, clock, net), make_agent("b", kube, clock, net)
    placed(kube)
    step(kube, clock, a, b)
    migrate_to_precopy(kube, clock, a, b)
    a.driver.fail["start_migration"] = "connection refused"
    step(kube, clock, a, b)
    x = lm_status(kube)["transfer"]
    assert x["state"] == "Failed" and "connection refused" in x["error"]
    assert a.driver.vms[KEY].state == VMState.RUNNING


def test_missing_secret_waits(kube, clock, net):
    a, b = make_agent("a", kube, clock, net), make_agent("b", kube, clock, net)
    kube.secrets.clear()
    placed(kube)
    kube.put(lm_body(phase="Preparing"))
    step(kube, clock, a, b)
    assert "target" not in lm_status(kube) and KEY not in b.driver.vms
    kube.secrets[(NS, "move-transfer")] = SECRET
    step(kube, clock, a, b, seconds=3)  # after the back-off
    assert lm_status(kube)["target"]["state"] == "Listening"


def test_cancel_in_precopy_resumes_source_and_cleans_target(kube, clock, net):
    a, b = make_agent("a", kube, clock, net, steps=50), make_agent("b", kube, clock, net)
    placed(kube)
    step(kube, clock, a, b)
    migrate_to_precopy(kube, clock, a, b)
    step(kube, clock, a, b)
    assert a.driver.vms[KEY].mstate == MigrationState.COPYING
    set_phase(kube, "Cancelled")
    step(kube, clock, a, b)
    step(kube, clock, a, b)
    assert a.driver.vms[KEY].state == VMState.RUNNING and a.driver.vms[KEY].mstate == MigrationState.ABORTED
    assert KEY not in b.driver.vms
    s = lm_status(kube)
    assert s["target"]["state"] == "Cleaned" and s["transfer"]["state"] == "Aborted"


def test_failure_after_completion_before_flip_resumes_source(kube, clock, net):
    a, b = make_agent("a", kube, clock, net), make_agent("b", kube, clock, net)
    placed(kube)
    step(kube, clock, a, b)
    migrate_to_precopy(kube, clock, a, b)
    run_until(lambda: lm_status(kube).get("target", {}).get("state") == "Received", kube, clock, a, b)
    set_phase(kube, "Failed")  # e.g. digests differ, or the flip's precondition failed
    step(kube, clock, a, b)
    assert a.driver.vms[KEY].state == VMState.RUNNING
    assert KEY not in b.driver.vms


def test_retry_with_a_new_attempt(kube, clock, net):
    a, b = make_agent("a", kube, clock, net, steps=50), make_agent("b", kube, clock, net)
    placed(kube)
    step(kube, clock, a, b)
    migrate_to_precopy(kube, clock, a, b)
    step(kube, clock, a, b)
    first = b.driver.vms[KEY].address
    set_phase(kube, "Scheduling", attempt=2)
    step(kube, clock, a, b)
    assert KEY not in b.driver.vms and a.driver.vms[KEY].mstate == MigrationState.ABORTED
    set_phase(kube, "Preparing")
    step(kube, clock, a, b)
    t = lm_status(kube)["target"]
    assert t["attempt"] == 2 and t["state"] == "Listening" and t["address"] != first
    set_phase(kube, "PreCopy")
    step(kube, clock, a, b)
    assert a.driver.vms[KEY].migration_id == "ns/move#2"


def test_stale_view_never_destroys_a_vm_whose_record_names_this_host(kube, clock, net):
    a = make_agent("a", kube, clock, net)
    placed(kube)
    step(kube, clock, a)
    # the watch shows the droplet moved away, but the API (the truth) still names host a
    stale = droplet_body("web", "c")
    stale["metadata"]["resourceVersion"] = "999999"
    a.observer.droplets.replace([stale])
    a.cycle()
    assert a.driver.vms[KEY].state == VMState.RUNNING
    assert ("destroy", "ns/web") not in a.driver.calls


def test_api_errors_do_not_destroy(kube, clock, net):
    a = make_agent("a", kube, clock, net)
    placed(kube)
    step(kube, clock, a)
    a.observer.droplets.replace([])  # the droplet left the watch ...
    kube.fail_gets = True  # ... and the API cannot be asked
    a.observer.forget_all()
    a.cycle()
    assert KEY in a.driver.vms


def test_driver_errors_do_not_crash(kube, clock, net):
    a = make_agent("a", kube, clock, net)
    placed(kube)
    a.driver.fail["start"] = "no space left"
    step(kube, clock, a)
    assert KEY not in a.driver.vms or a.driver.vms[KEY].state != VMState.RUNNING
    assert any(r == "StartFailed" for _, r, _ in kube.events)
    starts = [c for c in a.driver.calls if c[0] == "start"]
    for _ in range(3):  # backing off: no retry on every cycle
        step(kube, clock, a, seconds=0.3)
    assert [c for c in a.driver.calls if c[0] == "start"] == starts
    step(kube, clock, a, seconds=2)
    assert len([c for c in a.driver.calls if c[0] == "start"]) == len(starts) + 1
    assert len([r for _, r, _ in kube.events if r == "StartFailed"]) == 1  # one Event, not one per retry
    a.driver.fail.clear()
    step(kube, clock, a, seconds=10)
    assert a.driver.vms[KEY].state == VMState.RUNNING
    a.driver.fail["list_vms"] = "broken"
    a.cycle()  # no exception


def test_unreadable_stats_mean_no_action_for_that_vm(kube, clock, net):
    a, b = make_agent("a", kube, clock, net, steps=50), make_agent("b", kube, clock, net)
    placed(kube)
    step(kube, clock, a, b)
    migrate_to_precopy(kube, clock, a, b)
    step(kube, clock, a, b)
    assert a.driver.vms[KEY].mstate == MigrationState.COPYING
    a.driver.fail["query_migration"] = "socket timeout"
    set_phase(kube, "Failed")
    patches = len(kube.patches)
    step(kube, clock, a, b)
    assert a.driver.vms[KEY].mstate == MigrationState.COPYING  # no cancel on a guess
    assert not [s for _, _, _, s in kube.patches[patches:] if "transfer" in s]
    del a.driver.fail["query_migration"]
    step(kube, clock, a, b)
    assert a.driver.vms[KEY].mstate == MigrationState.ABORTED


def test_finished_migrations_cost_no_reads(kube, clock, net):
    """Hundreds of old migrations naming this host must not turn into GETs every cycle."""
    a = make_agent("a", kube, clock, net)
    for i in range(20):
        kube.put(droplet_body(f"w{i}", "b"))
        kube.put(lm_body(f"m{i}", f"w{i}", phase="Completed", target_report={"attempt": 1, "state": "Running"}))
    for _ in range(3):
        step(kube, clock, a, seconds=5)
    assert kube.gets == [] and a.driver.calls == []


def test_run_watches_acts_and_heartbeats(kube, net):
    """The whole loop in real time: watch threads fill the tables, the cycle starts the VM."""
    placed(kube)
    drv = FakeDriver("a", net)
    agent = Agent("a", drv, kube, Settings(heartbeat_seconds=0.2))
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_until(lambda: (v := drv.vms.get(KEY)) is not None and v.state == VMState.RUNNING, 10, interval=0.02,
                   what="the droplet to run")
        wait_until(lambda: kube.obj("Host", "a").get("status", {}).get("agent", {}).get("vms"), 10, interval=0.02,
                   what="a heartbeat naming the VM")
        assert agent.observer.synced() and len(agent.observer.reflectors) == 3
    finally:
        stop.set()
        agent.wake.put(None)
        thread.join(5)
    assert not thread.is_alive()
