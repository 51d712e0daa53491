"""The real programs under the chart's identities: the operator, two agents and the metadata
endpoint run as processes, each with a kubeconfig holding only its ServiceAccount's token
(agents: tokens bound to a pod on their node, with the chart's admission policy enforced).
A droplet is placed, live-migrated from one host to the other and announced through the
metadata endpoint; no process may hit a permission error on the way. This is what proves
the chart's RBAC is enough, not only that it denies.

It runs an operator cluster-wide: run it on a control plane of its own (the default fixture),
never with FERRY_TEST_KUBECONFIG pointing at a cluster where someone else's operator works."""

from __future__ import annotations

import http.client
import json
import pathlib
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from support import stop_all, wait_until

from ferry.drivers.sim.driver import SimDriver
from rbac import ChartIdentities

pytestmark = pytest.mark.integration

# An RBAC refusal names the verb the user "cannot" do; the admission policy "denied request";
# a dead token is 401. (Other 403s, e.g. Events in a namespace being deleted, are not ours.)
DENIALS = re.compile(r"cannot (get|list|watch|create|update|patch|delete)|denied request|Unauthorized|HTTP 401")


def get(kubectl: Any, kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
    args = ["get", kind, name, "-o", "json"] + (["-n", namespace] if namespace else [])
    proc = kubectl(*args, check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else {}


@pytest.fixture
def chart(kubectl: Any, kubeconfig: str, namespace: str, tmp_path: pathlib.Path) -> Iterator[ChartIdentities]:
    release = f"r{uuid.uuid4().hex[:6]}"
    with ChartIdentities(kubectl, kubeconfig, namespace, tmp_path / "identities", release=release,
                         admission_policy=True, peering=True) as c:
        yield c


@pytest.fixture
def hosts(kubectl: Any, chart: ChartIdentities) -> Iterator[list[str]]:
    names = [f"{chart.release}-h1", f"{chart.release}-h2"]
    for name in names:
        kubectl("apply", "-f", "-", input=json.dumps({
            "apiVersion": "ferry.dev/v1alpha1", "kind": "Host",
            "metadata": {"name": name, "labels": {"ferry.dev/test-release": chart.release}},
            "spec": {"datacenter": "nyc3", "capacity": {"cpu": 8, "memoryMiB": 16384, "diskGiB": 200}}}))
    yield names
    kubectl("delete", "host", *names, "--ignore-not-found", "--wait=false", check=False)


def test_identities_suffice(kubectl: Any, namespace: str, chart: ChartIdentities, hosts: list[str],
                            ferry_process: Any) -> None:
    env = {"FERRY_SIZE_SCALE": "0.001", "FERRY_NOTICE_SECONDS": "0", "FERRY_HEARTBEAT_SECONDS": "1",
           "FERRY_HEARTBEAT_TIMEOUT_SECONDS": "10", "FERRY_METRICS_PORT": "0", "FERRY_AGENT_METRICS_PORT": "0",
           "FERRY_NAMESPACE": namespace}
    # Short data directories: the sim VM's control socket lives under them (AF_UNIX paths are
    # limited to 107 bytes).
    data = pathlib.Path(tempfile.mkdtemp(prefix="fy-"))
    processes: list[Any] = []
    try:
        for host in hosts:
            ident = chart.identity("agent", node_name=host)
            processes.append(ferry_process("agent", "--host", host, "--data-dir", str(data / host[-2:]), "--driver", "sim",
                                           "--address", "127.0.0.1", env=env, kubeconfig_path=str(ident.kubeconfig)))
        for host in hosts:
            wait_until(lambda: get(kubectl, "host", host).get("status", {}).get("agent", {}).get("heartbeatTime"), 60,
                       what=f"the agent's heartbeat on Host {host}")

        operator = chart.identity("operator")
        processes.append(ferry_process("operator", "--peering", "--peering-name", chart.peering_name(), env=env,
                                       kubeconfig_path=str(operator.kubeconfig)))
        metadata_ident = chart.identity("metadata")
        metadata = ferry_process("metadata", "--listen", "127.0.0.1:0", env=env,
                                 kubeconfig_path=str(metadata_ident.kubeconfig))
        processes.append(metadata)

        # Placement: the operator writes the record, the source agent starts the VM.
        kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps({
            "apiVersion": "ferry.dev/v1alpha1", "kind": "Droplet", "metadata": {"name": "web"},
            "spec": {"size": "s-1vcpu-1gb", "datacenter": "nyc3", "ip": "127.0.0.91",
                     "hostSelector": {"matchLabels": {"ferry.dev/test-release": chart.release}}}}))
        source = wait_until(lambda: get(kubectl, "droplet", "web", namespace).get("status", {}).get("host"), 60,
                            what="the operator to place the droplet")
        assert source in hosts
        target = next(h for h in hosts if h != source)

        def vm_state(host: str) -> str | None:
            vms = get(kubectl, "host", host).get("status", {}).get("agent", {}).get("vms") or []
            return next((v.get("state") for v in vms if v.get("name") == "web"), None)

        wait_until(lambda: vm_state(source) == "Running", 60, what=f"the VM running on {source}")

        # A live migration: both agents report into the LiveMigration status (policy-checked),
        # the target reads the transfer Secret the operator created, the operator moves the record.
        kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps({
            "apiVersion": "ferry.dev/v1alpha1", "kind": "LiveMigration", "metadata": {"name": "move"},
            "spec": {"droplet": "web", "targetHost": target}}))

        # The metadata endpoint (read-only identity) announces it to the droplet.
        port = int(metadata.wait_for_log(r"listening on http://127\.0\.0\.1:(\d+)", timeout=30).group(1))

        def announced() -> bool:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5, source_address=("127.0.0.91", 0))
            try:
                conn.request("GET", "/v1/maintenance_event")
                rsp = conn.getresponse()
                return rsp.status == 200 and rsp.read().decode() == "live_migrate"
            finally:
                conn.close()

        def phase() -> str:
            return get(kubectl, "livemigration", "move", namespace).get("status", {}).get("phase", "")

        saw_announcement = False

        def ended() -> bool:
            """The migration ended; until then, ask the metadata endpoint at every poll."""
            nonlocal saw_announcement
            if phase() in ("Completed", "Failed", "Cancelled"):
                return True
            saw_announcement = saw_announcement or announced()
            return False

        wait_until(ended, 120, what="the migration to end")
        lm = get(kubectl, "livemigration", "move", namespace)
        assert lm["status"]["phase"] == "Completed", json.dumps(lm["status"])[:3000]
        assert lm["status"]["transfer"]["state"] == "Completed"      # written by the source agent
        assert lm["status"]["target"]["state"] in ("Received", "Running")  # written by the target agent
        assert get(kubectl, "droplet", "web", namespace)["status"]["host"] == target
        wait_until(lambda: vm_state(target) == "Running", 60, what=f"the VM running on {target}")
        assert saw_announcement, "the metadata endpoint never announced the migration"

        for p in processes:
            assert p.proc.poll() is None, f"ferry {p.args[0]} exited:\n{p.log[-3000:]}"
            denials = [line for line in p.log.splitlines() if DENIALS.search(line)]
            assert not denials, f"ferry {p.args[0]} was refused by the API server:\n" + "\n".join(denials[:20])
    finally:
        # The agents leave their VM processes running when they stop (by design): destroy them.
        stop_all(processes)
        # With the operator gone, nobody removes its finalizers: drop them so that the namespace
        # and the Hosts can be deleted.
        for kind in ("droplets", "livemigrations"):
            for name in kubectl("get", kind, "-n", namespace, "-o", "name").stdout.split():
                kubectl("patch", name, "-n", namespace, "--type=merge", "-p", '{"metadata":{"finalizers":null}}',
                        check=False)
        for host in hosts:
            kubectl("patch", "host", host, "--type=merge", "-p", '{"metadata":{"finalizers":null}}', check=False)
        for host_dir in data.iterdir():
            driver = SimDriver(str(host_dir), size_scale=0.001)
            for vm in driver.list_vms():
                driver.destroy(vm.key)
        shutil.rmtree(data, ignore_errors=True)
