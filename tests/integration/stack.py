"""The whole of ferry for one test: the operator, one agent per host and (optionally) the
metadata endpoint, each as its own process against the real API server, as in production.

Hosts are cluster-scoped, so each Stack names its hosts uniquely; the operator serves only
the test's namespace (and the cluster-scoped Hosts it created, which it filters by label).
"""

from __future__ import annotations

import json
import pathlib
import shutil
import socket
import tempfile
import uuid
from typing import Any

from support import stop_all, wait_until

# Fast settings for tests; production defaults are in docs/architecture.md.
ENV = {
    "FERRY_NOTICE_SECONDS": "1",
    "FERRY_SIZE_SCALE": "0.0005",        # s-1vcpu-512mb-10gb: 5 MiB disk, 256 KiB memory
    "FERRY_HEARTBEAT_SECONDS": "1",
    "FERRY_HEARTBEAT_TIMEOUT_SECONDS": "6",
    "FERRY_REPORT_INTERVAL_SECONDS": "0.5",
    "FERRY_RETRY_BACKOFF_SECONDS": "1",
    "FERRY_PROGRESS_TIMEOUT_SECONDS": "20",
    "FERRY_METRICS_PORT": "0",
    "FERRY_AGENT_METRICS_PORT": "0",
}
SIZE = "s-1vcpu-512mb-10gb"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    def __init__(self, ferry_process, kubectl, namespace: str, env: dict[str, str] | None = None):
        self.ferry_process = ferry_process
        self.kubectl = kubectl
        self.ns = namespace
        self.env = {**ENV, **(env or {})}
        # the sim guests' UDP service: a port of this stack's own (test runs share the loopback)
        self.env.setdefault("FERRY_SIM_SERVICE_PORT", str(free_udp_port()))
        self.tag = uuid.uuid4().hex[:5]
        self.hosts: list[str] = []
        self.dirs: dict[str, pathlib.Path] = {}
        self.agents: dict[str, Any] = {}
        self.operator = None
        self.metadata = None
        self.metadata_port: int | None = None

    # --- processes ---------------------------------------------------------------------
    def start_operator(self, env: dict[str, str] | None = None):
        self.operator = self.ferry_process("-n", self.ns, "operator", "--standalone",
                                           env={**self.env, **(env or {})})
        return self.operator

    def start_agent(self, host: str, env: dict[str, str] | None = None, address: str = "127.0.0.1"):
        if host not in self.dirs:
            # short: a sim VM's control socket lives under the data dir (AF_UNIX paths < 108 bytes)
            self.dirs[host] = pathlib.Path(tempfile.mkdtemp(prefix="fs-"))
        p = self.ferry_process("agent", "--host", host, "--data-dir", str(self.dirs[host]), "--address", address,
                               env={**self.env, **(env or {})})
        self.agents[host] = p
        return p

    def start_metadata(self):
        self.metadata_port = free_port()
        self.metadata = self.ferry_process("-n", self.ns, "metadata", "--listen", f"127.0.0.1:{self.metadata_port}",
                                           env=self.env)
        self.metadata.wait_for_log("synced|listening", timeout=30)
        return self.metadata

    # --- objects -------------------------------------------------------------------------
    def host(self, short: str, *, cpu: int = 16, memory_mib: int = 32768, disk_gib: int = 500,
             labels: dict[str, str] | None = None, agent: bool = True) -> str:
        name = f"{short}-{self.tag}"
        self.kubectl("apply", "-f", "-", input=json.dumps({
            "apiVersion": "ferry.dev/v1alpha1", "kind": "Host",
            "metadata": {"name": name, "labels": {"ferry.dev/test": self.tag, **(labels or {})}},
            "spec": {"datacenter": "nyc3", "capacity": {"cpu": cpu, "memoryMiB": memory_mib, "diskGiB": disk_gib}}}))
        self.hosts.append(name)
        if agent:
            self.start_agent(name)
        return name

    def wait_hosts_ready(self, timeout: float = 30) -> None:
        for h in self.hosts:
            if h in self.agents:
                wait_until(lambda h=h: (self.get("host", h).get("status") or {}).get("phase") == "Ready",
                           timeout, what=f"host {h} Ready")

    def droplet(self, name: str, *, size: str = SIZE, write_kibps: int = 256, pattern: str = "hotspot",
                power: str = "on", ip: str | None = None, nested: bool = False,
                selector: dict[str, str] | None = None) -> None:
        spec: dict[str, Any] = {"size": size, "datacenter": "nyc3", "powerState": power,
                                "workload": {"pattern": pattern, "writeRateKiBps": write_kibps}}
        if ip:
            spec["ip"] = ip
        if nested:
            spec["features"] = {"nestedVirtualization": True}
        spec["hostSelector"] = {"matchLabels": {"ferry.dev/test": self.tag, **(selector or {})}}
        self.kubectl("apply", "-n", self.ns, "-f", "-", input=json.dumps({
            "apiVersion": "ferry.dev/v1alpha1", "kind": "Droplet", "metadata": {"name": name}, "spec": spec}))

    def wait_running(self, droplet: str, timeout: float = 60) -> str:
        """Wait until the droplet is placed and its host's agent reports its VM Running; return the host."""
        def running():
            host = (self.get("droplet", droplet).get("status") or {}).get("host")
            if not host:
                return None
            vms = ((self.get("host", host).get("status") or {}).get("agent") or {}).get("vms") or []
            return host if any(v["name"] == droplet and v["namespace"] == self.ns and v["state"] == "Running"
                               for v in vms) else None
        return wait_until(running, timeout, what=f"droplet {droplet} running")

    def migrate(self, droplet: str, name: str = "move", **spec: Any) -> str:
        self.kubectl("apply", "-n", self.ns, "-f", "-", input=json.dumps({
            "apiVersion": "ferry.dev/v1alpha1", "kind": "LiveMigration", "metadata": {"name": name},
            "spec": {"droplet": droplet, **spec}}))
        return name

    def get(self, kind: str, name: str) -> dict:
        ns = [] if kind == "host" else ["-n", self.ns]
        return self.kubectl.json("get", kind, name, *ns)

    def lm(self, name: str = "move") -> dict:
        return self.get("livemigration", name).get("status") or {}

    def wait_phase(self, name: str, phases: str | tuple[str, ...], timeout: float = 90) -> dict:
        phases = (phases,) if isinstance(phases, str) else phases

        def reached():
            st = self.lm(name)
            if st.get("phase") in phases:
                return st
            assert st.get("phase") not in {"Completed", "Failed", "Cancelled"} - set(phases), \
                f"{name} ended {st.get('phase')}: {st.get('failureReason') or st.get('message')}"
            return None
        return wait_until(reached, timeout, interval=0.2, what=f"{name} in {phases}")

    def vms_on(self, host: str) -> dict[str, str]:
        from ferry.drivers.sim import SimDriver

        if host not in self.dirs:
            return {}
        drv = SimDriver(str(self.dirs[host]), size_scale=float(self.env["FERRY_SIZE_SCALE"]))
        return {f"{v.key.namespace}/{v.key.name}": v.state.value for v in drv.list_vms()}

    def events(self, kind: str, name: str) -> list[dict]:
        items = self.kubectl.json("get", "events", "-n", self.ns,
                                  "--field-selector", f"involvedObject.name={name},involvedObject.kind={kind}")
        return items.get("items") or []

    # --- teardown ------------------------------------------------------------------------
    def close(self) -> None:
        from ferry.drivers.sim import SimDriver

        stop_all([self.operator, self.metadata, *self.agents.values()])
        for host, d in self.dirs.items():
            if d.exists():
                drv = SimDriver(str(d), size_scale=float(self.env["FERRY_SIZE_SCALE"]))
                for v in drv.list_vms():
                    drv.destroy(v.key)
            shutil.rmtree(d, ignore_errors=True)
        for h in self.hosts:
            self.kubectl("delete", "host", h, "--wait=false", check=False)
