"""`ferry agent` as it runs in production: its own process, the real API server, the sim
driver's VM processes. No operator runs: the tests play its part by hand with kubectl
(placing droplets, creating the transfer Secret, moving the LiveMigration through its
phases, flipping the placement record) and check what the agents do and report."""

from __future__ import annotations

import base64
import json
import os
import pathlib
import secrets
import shutil
import signal
import tempfile
import uuid

import pytest
from support import stop_all, wait_until

from ferry.drivers.sim import SimDriver  # noqa: E402
from ferry.drivers.base import VMKey  # noqa: E402

ENV = {
    "FERRY_SIZE_SCALE": "0.0005",  # s-1vcpu-512mb-10gb: a 5 MiB disk, 256 KiB of memory
    "FERRY_HEARTBEAT_SECONDS": "1",
    "FERRY_REPORT_INTERVAL_SECONDS": "0.5",
    "FERRY_AGENT_METRICS_PORT": "0",
}
SIZE = "s-1vcpu-512mb-10gb"


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


class Agents:
    """Starts agents (one per host, each with its own data directory) and cleans up after them:
    agents stopped first, then every VM process they left (they outlive agents by design)."""

    def __init__(self, ferry_process, tmp_path: pathlib.Path, kubectl):
        self.ferry_process = ferry_process
        self.tmp_path = tmp_path
        self.kubectl = kubectl
        self.procs: list = []
        self.hosts: list[str] = []
        self.dirs: dict[str, pathlib.Path] = {}

    def host(self, short: str) -> str:
        """Create a Host (cluster-scoped, so named uniquely per test)."""
        name = f"{short}-{uuid.uuid4().hex[:6]}"
        self.kubectl("apply", "-f", "-", input=json.dumps(host_body(name)))
        self.hosts.append(name)
        return name

    def data_dir(self, host: str) -> pathlib.Path:
        # short: a sim VM's control socket lives in <data dir>/vms/<ns>__<name>/ (AF_UNIX paths < 108 bytes)
        if host not in self.dirs:
            self.dirs[host] = pathlib.Path(tempfile.mkdtemp(prefix="fa-"))
        return self.dirs[host]

    def start(self, host: str, env: dict[str, str] | None = None):
        p = self.ferry_process("agent", "--host", host, "--data-dir", str(self.data_dir(host)),
                               env={**ENV, **(env or {})})
        self.procs.append(p)
        return p

    def driver(self, host: str) -> SimDriver:
        return SimDriver(str(self.data_dir(host)), size_scale=float(ENV["FERRY_SIZE_SCALE"]))

    def vms(self, host: str) -> dict[str, str]:
        return {f"{v.key.namespace}/{v.key.name}": v.state.value for v in self.driver(host).list_vms()}

    def close(self) -> None:
        stop_all(self.procs)
        for host in self.hosts:
            if self.data_dir(host).exists():
                drv = self.driver(host)
                for v in drv.list_vms():
                    drv.destroy(v.key)
            self.kubectl("delete", "host", host, "--wait=false", check=False)
        for d in self.dirs.values():
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def agents(ferry_process, tmp_path, kubectl):
    a = Agents(ferry_process, tmp_path, kubectl)
    yield a
    a.close()


def host_body(name: str) -> dict:
    return {"apiVersion": "ferry.dev/v1alpha1", "kind": "Host", "metadata": {"name": name},
            "spec": {"datacenter": "nyc3", "capacity": {"cpu": 16, "memoryMiB": 32768, "diskGiB": 500}}}


def create_droplet(kubectl, ns: str, name: str, host: str, *, write_kibps: int = 256, power: str = "on") -> None:
    body = {"apiVersion": "ferry.dev/v1alpha1", "kind": "Droplet",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"size": SIZE, "datacenter": "nyc3", "powerState": power,
                     "workload": {"pattern": "hotspot", "writeRateKiBps": write_kibps}}}
    kubectl("apply", "-f", "-", input=json.dumps(body))
    place(kubectl, ns, name, host)


def place(kubectl, ns: str, name: str, host: str) -> None:
    """The operator's placement: the record (status.host), then its index (the label)."""
    kubectl("patch", "droplet", name, "-n", ns, "--subresource=status", "--type=merge",
            "-p", json.dumps({"status": {"host": host, "phase": "Placed"}}))
    kubectl("label", "droplet", name, "-n", ns, f"ferry.dev/host={host}", "--overwrite")


def agent_status(kubectl, host: str) -> dict:
    return (kubectl.json("get", "host", host).get("status") or {}).get("agent") or {}


def vm_states(kubectl, host: str) -> dict[str, str]:
    return {f"{v['namespace']}/{v['name']}": v["state"] for v in agent_status(kubectl, host).get("vms") or []}


def lm_status(kubectl, ns: str, name: str = "move") -> dict:
    return kubectl.json("get", "livemigration", name, "-n", ns).get("status") or {}


def set_lm_status(kubectl, ns: str, status: dict, name: str = "move") -> None:
    kubectl("patch", "livemigration", name, "-n", ns, "--subresource=status", "--type=merge",
            "-p", json.dumps({"status": status}))


def start_migration(kubectl, ns: str, source: str, target: str, *, bandwidth_mibps: int | None = None,
                    mode: str = "live") -> None:
    """The operator's part up to Preparing: the Secret, the labelled LiveMigration, attempt 1."""
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": "move-transfer", "namespace": ns}, "data": {"key": key}}))
    kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "ferry.dev/v1alpha1", "kind": "LiveMigration",
        "metadata": {"name": "move", "namespace": ns,
                     "labels": {"ferry.dev/source-host": source, "ferry.dev/target-host": target,
                                "ferry.dev/droplet": "web"}},
        "spec": {"droplet": "web"}}))
    limits: dict = {"downtimeMs": 300, "maxAttempts": 3}
    if bandwidth_mibps:
        limits["bandwidthMiBps"] = bandwidth_mibps
    set_lm_status(kubectl, ns, {"phase": "Preparing", "attempt": 1, "sourceHost": source, "targetHost": target,
                                "effectiveMode": mode, "effectiveLimits": limits})


def wait_listening(kubectl, ns: str) -> dict:
    def listening():
        t = lm_status(kubectl, ns).get("target") or {}
        return t if t.get("state") == "Listening" and t.get("attempt") == 1 else None

    return wait_until(listening, 30, what="the target to report Listening")


def wait_copied(kubectl, ns: str, timeout: float = 90) -> dict:
    def done():
        s = lm_status(kubectl, ns)
        x, t = s.get("transfer") or {}, s.get("target") or {}
        assert x.get("state") != "Failed" and t.get("state") != "Failed", s
        return s if x.get("state") == "Completed" and t.get("state") == "Received" else None

    return wait_until(done, timeout, what="transfer Completed and target Received")


def cut_over(kubectl, agents: Agents, ns: str, source: str, target: str, running: str = "Running") -> None:
    set_lm_status(kubectl, ns, {"phase": "CutOver"})
    # not before the record moves: the target keeps the VM paused, the source keeps its copy
    assert agents.vms(target) == {f"{ns}/web": "Incoming"}
    assert f"{ns}/web" in agents.vms(source)
    place(kubectl, ns, "web", target)  # the commit point
    wait_until(lambda: (lm_status(kubectl, ns).get("target") or {}).get("state") == "Running", 30,
               what="the target to report Running")
    assert agents.vms(target) == {f"{ns}/web": running}
    wait_until(lambda: f"{ns}/web" not in agents.vms(source), 30, what="the source to destroy its copy")
    wait_until(lambda: vm_states(kubectl, source).get(f"{ns}/web") is None
               and vm_states(kubectl, target).get(f"{ns}/web") == running, 30, what="heartbeats to show the move")


def test_heartbeat_and_droplet_lifecycle(kubectl, namespace, agents):
    name = f"solo-{uuid.uuid4().hex[:6]}"
    agent = agents.start(name)  # before its Host exists: says so and keeps going
    agent.wait_for_log(rf"Host {name} does not exist")
    agents.kubectl("apply", "-f", "-", input=json.dumps(host_body(name)))
    agents.hosts.append(name)
    first = wait_until(lambda: agent_status(kubectl, name).get("heartbeatTime"), 30, what="a heartbeat")
    wait_until(lambda: agent_status(kubectl, name).get("heartbeatTime", "") > first, 10, what="the heartbeat to advance")
    st = agent_status(kubectl, name)
    assert st["address"] == "127.0.0.1" and st["driver"] == "sim" and st["version"]
    host = kubectl.json("get", "host", name)
    assert set(host.get("status", {})) == {"agent"}  # the agent writes status.agent only

    create_droplet(kubectl, namespace, "web", name)
    agent.wait_for_log(rf"starting droplet {namespace}/web")
    wait_until(lambda: vm_states(kubectl, name) == {f"{namespace}/web": "Running"}, 30, what="the VM in the heartbeat")
    [vm] = agents.driver(name).list_vms()
    assert vm.state.value == "Running" and _pid_alive(vm.pid)

    # the agent stops cleanly; its VMs keep running; a new agent re-attaches without restarting them
    assert agent.stop() == 0
    assert _pid_alive(vm.pid)
    agent2 = agents.start(name)
    agent2.wait_for_log(r"in sync")
    [again] = agents.driver(name).list_vms()
    assert again.pid == vm.pid
    assert "starting droplet" not in agent2.log

    kubectl("patch", "droplet", "web", "-n", namespace, "--type=merge", "-p", '{"spec":{"powerState":"off"}}')
    wait_until(lambda: vm_states(kubectl, name) == {f"{namespace}/web": "Stopped"}, 30, what="the VM to stop")
    kubectl("patch", "droplet", "web", "-n", namespace, "--type=merge", "-p", '{"spec":{"powerState":"on"}}')
    wait_until(lambda: vm_states(kubectl, name) == {f"{namespace}/web": "Running"}, 30, what="the VM to run again")

    # a droplet whose record names another host is not this host's any more
    place(kubectl, namespace, "web", "elsewhere")
    wait_until(lambda: agents.vms(name) == {}, 30, what="the VM to be destroyed")
    agent2.wait_for_log(rf"destroying {namespace}/web \(its record names elsewhere\)")
    create_droplet(kubectl, namespace, "db", name)
    wait_until(lambda: agents.vms(name) == {f"{namespace}/db": "Running"}, 30, what="db to run")
    kubectl("delete", "droplet", "db", "-n", namespace)
    wait_until(lambda: agents.vms(name) == {}, 30, what="the deleted droplet's VM to be destroyed")


def test_live_migration_between_two_agents(kubectl, namespace, agents):
    a, b = agents.host("src"), agents.host("dst")
    agent_a, agent_b = agents.start(a), agents.start(b)
    create_droplet(kubectl, namespace, "web", a)
    wait_until(lambda: agents.vms(a) == {f"{namespace}/web": "Running"}, 30, what="web on the source")

    start_migration(kubectl, namespace, a, b, bandwidth_mibps=4)
    target = wait_listening(kubectl, namespace)
    assert target["address"].startswith("127.0.0.1:")
    agent_b.wait_for_log(rf"preparing incoming {namespace}/web for {namespace}/move#1 on 127\.0\.0\.1:\d+")
    assert agents.vms(b) == {f"{namespace}/web": "Incoming"}

    set_lm_status(kubectl, namespace, {"phase": "PreCopy"})
    progress = wait_until(lambda: (lm_status(kubectl, namespace).get("transfer") or {}).get("bytesSent"), 30,
                          what="a transfer report")
    assert progress > 0
    s = wait_copied(kubectl, namespace)
    x, t = s["transfer"], s["target"]
    assert x["attempt"] == 1 and x["progress"] == 100 and x["bytesTotal"] > 0 and x["bytesSent"] > 0
    assert x["digest"] and x["digest"] == t["digest"]
    assert x["rounds"] and len(x["rounds"]) <= 20 and x["downtimeMs"] is not None
    assert x["channel"] == "aes-256-gcm"  # encrypted by default, and status says so
    assert agents.vms(a) == {f"{namespace}/web": "Paused"}  # held for the cut-over

    cut_over(kubectl, agents, namespace, a, b)
    agent_b.wait_for_log(rf"resuming {namespace}/web")
    agent_a.wait_for_log(rf"destroying {namespace}/web \(its record names {b}\)")


def fill_disk(agents: Agents, host: str, ns: str) -> None:
    """Let the guest write its whole disk (sparse images copy only written blocks), then calm it
    down, so that a copy at 1 MiB/s takes seconds and converges."""
    drv, key = agents.driver(host), VMKey(ns, "web")
    disk = drv.status(key)["disk_bytes"]
    drv.set_workload(key, pattern="sequential", write_rate_kibps=8192)
    wait_until(lambda: drv.status(key)["bytes_written"] >= disk, 30, what="the guest to fill its disk")
    drv.set_workload(key, pattern="hotspot", write_rate_kibps=64)


@pytest.mark.parametrize("target_channel", ["plain", "aes-256-gcm"])
def test_plain_channel_only_when_both_hosts_opt_out(kubectl, namespace, agents, target_channel):
    """FERRY_SIM_CHANNEL=plain is an opt-out of both ends: a target that encrypts refuses it."""
    a, b = agents.host("src"), agents.host("dst")
    agents.start(a, env={"FERRY_SIM_CHANNEL": "plain"}), agents.start(b, env={"FERRY_SIM_CHANNEL": target_channel})
    create_droplet(kubectl, namespace, "web", a)
    wait_until(lambda: agents.vms(a) == {f"{namespace}/web": "Running"}, 30, what="web on the source")
    start_migration(kubectl, namespace, a, b)
    wait_listening(kubectl, namespace)
    set_lm_status(kubectl, namespace, {"phase": "PreCopy"})
    if target_channel == "plain":
        s = wait_copied(kubectl, namespace)
        assert s["transfer"]["channel"] == "plain" and s["transfer"]["digest"] == s["target"]["digest"]
        return

    def refused():
        x = lm_status(kubectl, namespace).get("transfer") or {}
        return x if x.get("state") == "Failed" else None

    x = wait_until(refused, 30, what="the source to fail against a target that encrypts")
    assert "encrypted channels only" in x["error"]
    assert agents.vms(a) == {f"{namespace}/web": "Running"}  # the guest never paused for it


def test_source_agent_killed_mid_copy(kubectl, namespace, agents):
    a, b = agents.host("src"), agents.host("dst")
    agent_a, _ = agents.start(a), agents.start(b)
    create_droplet(kubectl, namespace, "web", a)
    wait_until(lambda: agents.vms(a) == {f"{namespace}/web": "Running"}, 30, what="web on the source")
    fill_disk(agents, a, namespace)
    start_migration(kubectl, namespace, a, b, bandwidth_mibps=1)  # ~5 s of copying
    wait_listening(kubectl, namespace)
    set_lm_status(kubectl, namespace, {"phase": "PreCopy"})
    wait_until(lambda: (lm_status(kubectl, namespace).get("transfer") or {}).get("bytesSent"), 30, interval=0.1,
               what="the copy to be under way")
    agent_a.kill(signal.SIGKILL)  # the whole agent process group, mid-copy
    key = VMKey(namespace, "web")
    st = agents.driver(a).query_migration(key)
    assert st.migration_id == f"{namespace}/move#1" and st.state.value in ("Copying", "Converging"), st
    assert (lm_status(kubectl, namespace).get("target") or {}).get("state") == "Listening"
    agent_a2 = agents.start(a)
    s = wait_copied(kubectl, namespace)
    assert s["transfer"]["digest"] == s["target"]["digest"]
    assert "migrating" not in agent_a2.log  # re-attached, not restarted
    cut_over(kubectl, agents, namespace, a, b)


def test_cancel_resumes_the_source_and_cleans_the_target(kubectl, namespace, agents):
    a, b = agents.host("src"), agents.host("dst")
    agents.start(a), agents.start(b)
    create_droplet(kubectl, namespace, "web", a)
    wait_until(lambda: agents.vms(a) == {f"{namespace}/web": "Running"}, 30, what="web on the source")
    fill_disk(agents, a, namespace)
    start_migration(kubectl, namespace, a, b, bandwidth_mibps=1)
    wait_listening(kubectl, namespace)
    set_lm_status(kubectl, namespace, {"phase": "PreCopy"})
    wait_until(lambda: (lm_status(kubectl, namespace).get("transfer") or {}).get("bytesSent"), 30, interval=0.1,
               what="the copy to start")
    set_lm_status(kubectl, namespace, {"phase": "Cancelled"})  # mid-copy

    def settled():
        s = lm_status(kubectl, namespace)
        return (s.get("target") or {}).get("state") == "Cleaned" and (s.get("transfer") or {}).get("state") == "Aborted"

    wait_until(settled, 30, what="target Cleaned and transfer Aborted")
    x = lm_status(kubectl, namespace)["transfer"]
    assert 0 < x["progress"] < 100 and not x.get("digest")
    assert agents.vms(b) == {}
    assert agents.vms(a) == {f"{namespace}/web": "Running"}
    assert os.listdir(agents.data_dir(b) / "vms") == []


def test_offline_migration_of_a_powered_off_droplet(kubectl, namespace, agents):
    a, b = agents.host("src"), agents.host("dst")
    agents.start(a), agents.start(b)
    create_droplet(kubectl, namespace, "web", a, power="off")
    wait_until(lambda: vm_states(kubectl, a) == {f"{namespace}/web": "Stopped"}, 30, what="web defined, stopped")
    start_migration(kubectl, namespace, a, b, mode="offline")
    wait_listening(kubectl, namespace)
    set_lm_status(kubectl, namespace, {"phase": "PreCopy"})
    s = wait_copied(kubectl, namespace)
    assert s["transfer"]["digest"] == s["target"]["digest"]
    cut_over(kubectl, agents, namespace, a, b, running="Stopped")  # powered off: kept stopped after the flip
    kubectl("patch", "droplet", "web", "-n", namespace, "--type=merge", "-p", '{"spec":{"powerState":"on"}}')
    wait_until(lambda: agents.vms(b) == {f"{namespace}/web": "Running"}, 30, what="web to run on the target")
