"""What each ferry identity may do, proven with real tokens against the real API server.

The chart's RBAC (and admission policy) is rendered with ``helm template`` and applied; each
component's ServiceAccount gets a token through the TokenRequest API; every request below is
made with that token (no impersonation): "allowed" means the API server accepted the request,
"forbidden" means it refused it *for that user* (the message names the user or the policy, so
an unauthenticated or malformed request cannot pass as a denial).
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from rbac import ChartIdentities, Identity, token_claims

pytestmark = pytest.mark.integration


class Probe:
    """kubectl as one identity."""

    def __init__(self, kubectl: Any, ident: Identity):
        self.kubectl = kubectl
        self.ident = ident

    def run(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
        return self.kubectl(*args, input=input, check=False, kubeconfig=str(self.ident.kubeconfig))

    def allowed(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
        proc = self.run(*args, input=input)
        assert proc.returncode == 0, (
            f"{self.ident.username} should be allowed: kubectl {' '.join(args)}\n{proc.stderr.strip()}")
        return proc

    def denied_by_rbac(self, verb: str, *args: str, input: str | None = None) -> None:
        proc = self.run(*args, input=input)
        assert proc.returncode != 0, f"{self.ident.username} must NOT be allowed: kubectl {' '.join(args)}"
        expected = f'User "{self.ident.username}" cannot {verb}'
        assert "forbidden" in proc.stderr.lower() and expected in proc.stderr, (
            f"expected an RBAC denial ({expected!r}) for kubectl {' '.join(args)}, got: {proc.stderr.strip()}")

    # Raw requests: exactly one HTTP request each (kubectl patch GETs first, which would let a
    # denied GET pass for a denied PATCH).
    def patch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        code, rsp = self.ident.request("PATCH", path, body)
        assert code == 200, f"{self.ident.username} should be allowed: PATCH {path} {body}\n{rsp.get('message')}"
        return rsp

    def patch_denied_by_rbac(self, path: str, body: dict[str, Any]) -> None:
        code, rsp = self.ident.request("PATCH", path, body)
        expected = f'User "{self.ident.username}" cannot patch'
        assert code == 403 and expected in rsp.get("message", ""), (
            f"expected an RBAC denial of PATCH {path} {body}, got {code}: {rsp.get('message')}")

    def patch_denied_by_policy(self, policy: str, path: str, body: dict[str, Any], reason: str) -> None:
        code, rsp = self.ident.request("PATCH", path, body)
        message = rsp.get("message", "")
        assert code == 403 and f"ValidatingAdmissionPolicy '{policy}'" in message and reason in message, (
            f"expected {policy} to deny PATCH {path} {body} ({reason!r}), got {code}: {message}")


API = "/apis/ferry.dev/v1alpha1"


def host_path(name: str, sub: str = "") -> str:
    return f"{API}/hosts/{name}{sub}"


def ns_path(ns: str, plural: str, name: str, sub: str = "") -> str:
    return f"{API}/namespaces/{ns}/{plural}/{name}{sub}"


def merge(obj: dict[str, Any]) -> str:
    return json.dumps(obj)


@pytest.fixture
def release(namespace: str) -> str:
    # Cluster-scoped names (ClusterRoles, Hosts, the policy) derive from it: unique per test.
    return f"r{uuid.uuid4().hex[:6]}"


@pytest.fixture
def world(kubectl: Any, namespace: str, release: str) -> Iterator[dict[str, str]]:
    """Objects an admin created: three Hosts, a placed Droplet, a LiveMigration from host a to
    host b with its transfer Secret."""
    hosts = {k: f"{release}-host-{k}" for k in "abc"}
    for name in hosts.values():
        kubectl("apply", "-f", "-", input=merge({
            "apiVersion": "ferry.dev/v1alpha1", "kind": "Host", "metadata": {"name": name},
            "spec": {"datacenter": "nyc3", "capacity": {"cpu": 16, "memoryMiB": 65536, "diskGiB": 1000}}}))
    kubectl("apply", "-n", namespace, "-f", "-", input=merge({
        "apiVersion": "ferry.dev/v1alpha1", "kind": "Droplet",
        "metadata": {"name": "web-1", "labels": {"ferry.dev/host": hosts["a"]}},
        "spec": {"size": "s-1vcpu-1gb", "datacenter": "nyc3", "ip": "10.0.0.11"}}))
    kubectl("patch", "droplet", "web-1", "-n", namespace, "--subresource=status", "--type=merge",
            "-p", merge({"status": {"host": hosts["a"], "phase": "Placed"}}))
    kubectl("apply", "-n", namespace, "-f", "-", input=merge({
        "apiVersion": "ferry.dev/v1alpha1", "kind": "LiveMigration",
        "metadata": {"name": "mig-1", "labels": {"ferry.dev/source-host": hosts["a"],
                                                 "ferry.dev/target-host": hosts["b"],
                                                 "ferry.dev/droplet": "web-1"}},
        "spec": {"droplet": "web-1"}}))
    kubectl("patch", "livemigration", "mig-1", "-n", namespace, "--subresource=status", "--type=merge",
            "-p", merge({"status": {"phase": "PreCopy", "sourceHost": hosts["a"], "targetHost": hosts["b"],
                                    "attempt": 1}}))
    kubectl("create", "secret", "generic", "mig-1-transfer", "-n", namespace, "--from-literal=key=0123456789abcdef")
    yield {"namespace": namespace, **{f"host_{k}": v for k, v in hosts.items()}}
    kubectl("delete", "host", *hosts.values(), "--ignore-not-found", "--wait=false", check=False)


@pytest.fixture
def chart(kubectl: Any, kubeconfig: str, namespace: str, release: str, tmp_path: Any) -> Iterator[ChartIdentities]:
    with ChartIdentities(kubectl, kubeconfig, namespace, tmp_path, release=release) as c:
        yield c


@pytest.fixture
def other_namespace(kubectl: Any, namespace: str) -> Iterator[str]:
    name = f"{namespace[:50]}-other"
    kubectl("create", "namespace", name)
    kubectl("create", "secret", "generic", "unrelated", "-n", name, "--from-literal=password=hunter2")
    yield name
    kubectl("delete", "namespace", name, "--wait=false", check=False)


def test_tokens_come_from_the_token_request_api(chart: ChartIdentities, kubectl: Any, namespace: str) -> None:
    ident = chart.identity("metadata")
    claims = token_claims(ident.token)
    assert claims["sub"] == f"system:serviceaccount:{namespace}:{chart.service_account('metadata')}"
    assert claims["exp"] - claims["iat"] <= 3600 + 60  # the 1 h we asked for, not a legacy Secret token
    who = Probe(kubectl, ident).allowed("auth", "whoami", "-o", "json")
    assert json.loads(who.stdout)["status"]["userInfo"]["username"] == ident.username


def test_agent_reads_everything_it_serves_but_writes_no_droplet_and_creates_no_migration(
        chart: ChartIdentities, kubectl: Any, world: dict[str, str]) -> None:
    ns = world["namespace"]
    agent = Probe(kubectl, chart.identity("agent"))

    # Reads: its Host, the droplets placed on it, its migrations, the transfer key by name.
    agent.allowed("get", "host", world["host_a"])
    agent.allowed("get", "hosts", "-o", "name")
    agent.allowed("get", "droplets", "-A", "-l", f"ferry.dev/host={world['host_a']}")
    agent.allowed("get", "livemigrations", "-A", "-l", f"ferry.dev/source-host={world['host_a']}")
    agent.allowed("get", "secret", "mig-1-transfer", "-n", ns)
    # Writes: its heartbeat and its migration reports (the two status subresources).
    agent.patch(host_path(world["host_a"], "/status"),
                {"status": {"agent": {"heartbeatTime": "2030-01-01T00:00:00.000000Z"}}})
    agent.patch(ns_path(ns, "livemigrations", "mig-1", "/status"),
                {"status": {"transfer": {"attempt": 1, "state": "Copying", "bytesSent": 1}}})
    agent.allowed("create", "-n", ns, "-f", "-", input=merge({
        "apiVersion": "v1", "kind": "Event", "metadata": {"generateName": "agent-"},
        "involvedObject": {"kind": "LiveMigration", "namespace": ns, "name": "mig-1"},
        "reason": "Copying", "message": "round 1", "type": "Normal"}))

    # The placement record and everything else about a Droplet: never.
    agent.patch_denied_by_rbac(ns_path(ns, "droplets", "web-1"), {"spec": {"powerState": "off"}})
    agent.patch_denied_by_rbac(ns_path(ns, "droplets", "web-1", "/status"), {"status": {"host": world["host_b"]}})
    agent.denied_by_rbac("patch", "label", "droplet", "web-1", "-n", ns, "--overwrite",
                         f"ferry.dev/host={world['host_b']}")
    agent.denied_by_rbac("delete", "delete", "droplet", "web-1", "-n", ns)
    # No migrations of its own making, no edits or deletes of the operator's.
    agent.denied_by_rbac("create", "create", "-n", ns, "-f", "-", input=merge({
        "apiVersion": "ferry.dev/v1alpha1", "kind": "LiveMigration", "metadata": {"name": "rogue"},
        "spec": {"droplet": "web-1", "targetHost": world["host_c"]}}))
    agent.patch_denied_by_rbac(ns_path(ns, "livemigrations", "mig-1"), {"spec": {"cancel": True}})
    agent.denied_by_rbac("patch", "label", "livemigration", "mig-1", "-n", ns, "--overwrite",
                         f"ferry.dev/target-host={world['host_c']}")
    agent.denied_by_rbac("delete", "delete", "livemigration", "mig-1", "-n", ns)
    # Hosts: no spec changes, no new hosts.
    agent.patch_denied_by_rbac(host_path(world["host_a"]), {"spec": {"schedulable": False}})
    agent.denied_by_rbac("create", "create", "-f", "-", input=merge({
        "apiVersion": "ferry.dev/v1alpha1", "kind": "Host", "metadata": {"name": f"{chart.release}-rogue"},
        "spec": {"datacenter": "nyc3", "capacity": {"cpu": 1, "memoryMiB": 1, "diskGiB": 1}}}))
    # Secrets: by name only (cannot enumerate them), never write them.
    agent.denied_by_rbac("list", "get", "secrets", "-n", ns)
    agent.denied_by_rbac("create", "create", "secret", "generic", "x", "-n", ns, "--from-literal=a=b")
    # Pods: its droplets' VM pods (the admission policy holds it to its own node); nothing else.
    agent.allowed("get", "pods", "-n", ns)
    agent.denied_by_rbac("list", "get", "configmaps", "-n", ns)
    agent.denied_by_rbac("list", "get", "deployments", "-n", ns)
    agent.denied_by_rbac("create", "create", "clusterrolebinding", f"{chart.release}-escalate",
                         "--clusterrole=cluster-admin", f"--user={agent.ident.username}")


def test_metadata_endpoint_only_reads_droplets(chart: ChartIdentities, kubectl: Any, world: dict[str, str]) -> None:
    ns = world["namespace"]
    md = Probe(kubectl, chart.identity("metadata"))

    md.allowed("get", "droplet", "web-1", "-n", ns)
    md.allowed("get", "droplets", "-A")
    # A watch is what its cache runs on.
    proc = md.allowed("get", "--raw", "/apis/ferry.dev/v1alpha1/droplets?watch=true&timeoutSeconds=1")
    assert "web-1" in proc.stdout

    md.denied_by_rbac("get", "get", "secret", "mig-1-transfer", "-n", ns)
    md.denied_by_rbac("list", "get", "secrets", "-A")
    md.denied_by_rbac("patch", "annotate", "droplet", "web-1", "-n", ns, "ferry.dev/maintenance-event=live_migrate")
    md.patch_denied_by_rbac(ns_path(ns, "droplets", "web-1", "/status"), {"status": {"host": world["host_b"]}})
    md.denied_by_rbac("delete", "delete", "droplet", "web-1", "-n", ns)
    md.denied_by_rbac("list", "get", "hosts")
    md.denied_by_rbac("list", "get", "livemigrations", "-n", ns)
    md.denied_by_rbac("create", "create", "-n", ns, "-f", "-", input=merge({
        "apiVersion": "v1", "kind": "Event", "metadata": {"generateName": "md-"},
        "involvedObject": {"kind": "Droplet", "namespace": ns, "name": "web-1"},
        "reason": "X", "message": "x", "type": "Normal"}))


def test_operator_runs_migrations_but_cannot_enumerate_secrets_or_escalate(
        chart: ChartIdentities, kubectl: Any, world: dict[str, str]) -> None:
    ns = world["namespace"]
    op = Probe(kubectl, chart.identity("operator"))

    # The placement record flip: label and status.host (the cut-over commit).
    op.allowed("label", "droplet", "web-1", "-n", ns, "--overwrite", f"ferry.dev/host={world['host_b']}")
    op.patch(ns_path(ns, "droplets", "web-1", "/status"), {"status": {"host": world["host_b"]}})
    op.allowed("annotate", "droplet", "web-1", "-n", ns, "ferry.dev/maintenance-event=live_migrate")
    op.patch(ns_path(ns, "livemigrations", "mig-1", "/status"), {"status": {"phase": "CutOver"}})
    op.patch(ns_path(ns, "livemigrations", "mig-1"), {"metadata": {"finalizers": ["ferry.dev/migration"]}})
    op.patch(host_path(world["host_a"], "/status"), {"status": {"phase": "Draining"}})
    op.patch(host_path(world["host_a"]), {"metadata": {"annotations": {"ferry.dev/evacuating": "true"}}})
    # Evacuation creates migrations.
    op.allowed("create", "-n", ns, "-f", "-", input=merge({
        "apiVersion": "ferry.dev/v1alpha1", "kind": "LiveMigration",
        "metadata": {"name": "evac-1", "labels": {"ferry.dev/evacuation": world["host_a"]}},
        "spec": {"droplet": "web-1"}}))
    # Transfer Secrets: created owned by their LiveMigration (as the operator does it), read and
    # deleted by name.
    lm_uid = json.loads(kubectl("get", "livemigration", "evac-1", "-n", ns, "-o", "json").stdout)["metadata"]["uid"]
    code, rsp = op.ident.request("POST", f"/api/v1/namespaces/{ns}/secrets", {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": "evac-1-transfer", "ownerReferences": [{
            "apiVersion": "ferry.dev/v1alpha1", "kind": "LiveMigration", "name": "evac-1", "uid": lm_uid,
            "controller": True, "blockOwnerDeletion": True}]},
        "data": {"key": "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="}}, content_type="application/json")
    assert code == 201, rsp.get("message")
    op.allowed("get", "secret", "evac-1-transfer", "-n", ns)
    op.allowed("delete", "secret", "evac-1-transfer", "-n", ns)
    # Retention deletes finished migrations.
    op.allowed("delete", "livemigration", "evac-1", "-n", ns, "--wait=false")
    # kopf: CRD discovery, events.
    op.allowed("get", "customresourcedefinitions", "livemigrations.ferry.dev")
    op.allowed("create", "-n", ns, "-f", "-", input=merge({
        "apiVersion": "v1", "kind": "Event", "metadata": {"generateName": "op-"},
        "involvedObject": {"kind": "Droplet", "namespace": ns, "name": "web-1"},
        "reason": "Placed", "message": "x", "type": "Normal"}))

    op.denied_by_rbac("list", "get", "secrets", "-n", ns)
    op.patch_denied_by_rbac(f"/api/v1/namespaces/{ns}/secrets/mig-1-transfer", {"stringData": {"key": "x"}})
    # Users own Droplets and Hosts; the operator never creates or deletes them.
    op.denied_by_rbac("delete", "delete", "droplet", "web-1", "-n", ns)
    op.denied_by_rbac("create", "create", "-n", ns, "-f", "-", input=merge({
        "apiVersion": "ferry.dev/v1alpha1", "kind": "Droplet", "metadata": {"name": "rogue"},
        "spec": {"size": "s-1vcpu-1gb", "datacenter": "nyc3"}}))
    op.denied_by_rbac("delete", "delete", "host", world["host_c"])
    op.denied_by_rbac("create", "create", "-f", "-", input=merge({
        "apiVersion": "ferry.dev/v1alpha1", "kind": "Host", "metadata": {"name": f"{chart.release}-rogue"},
        "spec": {"datacenter": "nyc3", "capacity": {"cpu": 1, "memoryMiB": 1, "diskGiB": 1}}}))
    op.denied_by_rbac("list", "get", "pods", "-A")
    op.denied_by_rbac("create", "create", "clusterrolebinding", f"{chart.release}-escalate",
                      "--clusterrole=cluster-admin", f"--user={op.ident.username}")
    # Peering: its own ClusterKopfPeering only.
    op.patch_denied_by_rbac("/apis/kopf.dev/v1/clusterkopfpeerings/someone-else", {"status": {}})


def test_secret_namespaces_keep_operator_and_agents_out_of_other_namespaces(
        kubectl: Any, kubeconfig: str, namespace: str, release: str, tmp_path: Any,
        world: dict[str, str], other_namespace: str) -> None:
    values = {"rbac": {"secretNamespaces": [namespace]}}
    with ChartIdentities(kubectl, kubeconfig, namespace, tmp_path, release=release, values=values) as chart:
        op = Probe(kubectl, chart.identity("operator"))
        agent = Probe(kubectl, chart.identity("agent"))

        op.allowed("create", "secret", "generic", "mig-2-transfer", "-n", namespace, "--from-literal=key=abc")
        agent.allowed("get", "secret", "mig-2-transfer", "-n", namespace)

        op.denied_by_rbac("get", "get", "secret", "unrelated", "-n", other_namespace)
        op.denied_by_rbac("create", "create", "secret", "generic", "x-transfer", "-n", other_namespace,
                          "--from-literal=key=abc")
        op.denied_by_rbac("delete", "delete", "secret", "unrelated", "-n", other_namespace)
        agent.denied_by_rbac("get", "get", "secret", "unrelated", "-n", other_namespace)
        # Without the scoping, the same identities reach the other namespace: the test can fail.
    with ChartIdentities(kubectl, kubeconfig, namespace, tmp_path / "wide", release=release) as wide:
        Probe(kubectl, wide.identity("agent")).allowed("get", "secret", "unrelated", "-n", other_namespace)


@pytest.fixture
def policed(kubectl: Any, kubeconfig: str, namespace: str, release: str, tmp_path: Any,
            world: dict[str, str]) -> Iterator[tuple[ChartIdentities, str]]:
    """The chart's RBAC plus its agent admission policy."""
    with ChartIdentities(kubectl, kubeconfig, namespace, tmp_path, release=release, admission_policy=True) as c:
        [policy] = [d["metadata"]["name"] for d in c.applied if d["kind"] == "ValidatingAdmissionPolicy"
                    and d["metadata"]["name"].endswith("-agent-scope")]
        yield c, policy


def test_agent_creates_unprivileged_vm_pods_on_its_own_node_only(policed: tuple[ChartIdentities, str], kubectl: Any,
                                                                 world: dict[str, str]) -> None:
    chart, _ = policed
    ns = world["namespace"]
    agent = Probe(kubectl, chart.identity("agent", node_name=world["host_a"]))

    def pod(node: str, **container: Any) -> str:
        return json.dumps({"apiVersion": "v1", "kind": "Pod", "metadata": {"generateName": "ferry-vm-x-", "namespace": ns},
                           "spec": {"nodeName": node, "automountServiceAccountToken": False,
                                    "containers": [{"name": "vm", "image": "ferry:dev", **container}]}})

    agent.allowed("create", "--dry-run=server", "-f", "-", input=pod(world["host_a"]))
    for body, why in ((pod(world["host_b"]), "own node only"),
                      (pod(world["host_a"], securityContext={"privileged": True}), "must be unprivileged"),
                      (pod(world["host_a"], securityContext={"capabilities": {"add": ["SYS_ADMIN"]}}),
                       "must be unprivileged")):
        proc = agent.run("create", "--dry-run=server", "-f", "-", input=body)
        assert proc.returncode != 0 and "agent-launcher" in proc.stderr and why in proc.stderr, proc.stderr


def test_pod_bound_agent_token_names_its_node(policed: tuple[ChartIdentities, str], kubectl: Any,
                                               world: dict[str, str]) -> None:
    chart, _ = policed
    ident = chart.identity("agent", node_name=world["host_a"])
    assert token_claims(ident.token)["kubernetes.io"]["node"]["name"] == world["host_a"]
    who = json.loads(Probe(kubectl, ident).allowed("auth", "whoami", "-o", "json").stdout)
    assert who["status"]["userInfo"]["extra"]["authentication.kubernetes.io/node-name"] == [world["host_a"]]


def test_agent_writes_only_its_side_of_its_own_migrations(policed: tuple[ChartIdentities, str], kubectl: Any,
                                                          world: dict[str, str]) -> None:
    chart, policy = policed
    ns = world["namespace"]
    source = Probe(kubectl, chart.identity("agent", node_name=world["host_a"]))
    target = Probe(kubectl, chart.identity("agent", node_name=world["host_b"]))
    bystander = Probe(kubectl, chart.identity("agent", node_name=world["host_c"]))
    unbound = Probe(kubectl, chart.identity("agent"))
    operator = Probe(kubectl, chart.identity("operator"))

    path = ns_path(ns, "livemigrations", "mig-1", "/status")

    def status(body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return path, {"status": body}

    transfer = {"transfer": {"attempt": 1, "state": "Copying", "round": 1, "bytesSent": 4096}}
    tgt = {"target": {"attempt": 1, "state": "Listening", "address": "10.0.0.2:7000"}}

    source.patch(*status(transfer))
    target.patch(*status(tgt))
    # Each side only its own report (a write that changes nothing is no change, so these differ).
    forged_tgt = {"target": {"attempt": 1, "state": "Listening", "address": "10.6.6.6:1"}}
    forged_transfer = {"transfer": {"attempt": 1, "state": "Completed", "digest": "forged"}}
    source.patch_denied_by_policy(policy, *status(forged_tgt), reason="may change only status.transfer")
    target.patch_denied_by_policy(policy, *status(forged_transfer), reason="may change only status.target")
    # Nothing the operator owns: the phase, the hosts, the attempt.
    source.patch_denied_by_policy(policy, *status({"phase": "Completed"}), reason="may change only status.transfer")
    target.patch_denied_by_policy(policy, *status({"targetHost": world["host_c"]}), reason="may change only status.target")
    source.patch_denied_by_policy(policy, *status({"transfer": {"state": "Completed"}, "attempt": 2}),
                            reason="may change only status.transfer")
    # Removing the other side's report is a change too.
    source.patch_denied_by_policy(policy, *status({"target": None}), reason="may change only status.transfer")
    # Another host's agent: not its migration at all.
    bystander.patch_denied_by_policy(policy, *status(forged_transfer), reason="neither the source nor the target")
    bystander.patch_denied_by_policy(policy, *status(forged_tgt), reason="neither the source nor the target")
    # A token that names no node (not bound to a pod on a node) cannot act as any host.
    unbound.patch_denied_by_policy(policy, *status(forged_transfer), reason="must use the token of its own pod")
    # The policy leaves the operator alone.
    operator.patch(*status({"phase": "CutOver"}))

    lm = json.loads(kubectl("get", "livemigration", "mig-1", "-n", ns, "-o", "json").stdout)
    assert lm["status"]["transfer"]["bytesSent"] == 4096
    assert lm["status"]["target"]["address"] == "10.0.0.2:7000"
    assert lm["status"]["phase"] == "CutOver"
    assert lm["status"]["targetHost"] == world["host_b"]
    assert lm["status"]["attempt"] == 1


def test_agent_heartbeats_only_its_own_host(policed: tuple[ChartIdentities, str], kubectl: Any,
                                            world: dict[str, str]) -> None:
    chart, policy = policed
    agent_a = Probe(kubectl, chart.identity("agent", node_name=world["host_a"]))

    def status(host: str, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return host_path(host, "/status"), {"status": body}

    beat = {"agent": {"heartbeatTime": "2030-01-01T00:00:00.000000Z", "driver": "sim"}}
    agent_a.patch(*status(world["host_a"], beat))
    agent_a.patch_denied_by_policy(policy, *status(world["host_b"], beat),
                             reason=f"may not write the status of Host {world['host_b']}")
    agent_a.patch_denied_by_policy(policy, *status(world["host_a"], {"phase": "Ready"}),
                             reason="may change only status.agent")
    host_a = json.loads(kubectl("get", "host", world["host_a"], "-o", "json").stdout)
    assert host_a["status"]["agent"]["driver"] == "sim"
    assert "phase" not in host_a["status"]
