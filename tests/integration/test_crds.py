"""The CRDs as the real API server sees them: accepted, valid examples pass, bad input is
rejected with a message naming the field, `kubectl explain` teaches the API."""

from __future__ import annotations

import json
import pathlib

import pytest
import yaml
from support import kubeconfig_for_token

ROOT = pathlib.Path(__file__).resolve().parents[2]

HOST = {"apiVersion": "ferry.dev/v1alpha1", "kind": "Host", "metadata": {"name": "h"},
        "spec": {"datacenter": "nyc3", "capacity": {"cpu": 4, "memoryMiB": 8192, "diskGiB": 100}}}
DROPLET = {"apiVersion": "ferry.dev/v1alpha1", "kind": "Droplet", "metadata": {"name": "d"},
           "spec": {"size": "s-1vcpu-1gb", "datacenter": "nyc3", "ip": "10.1.2.3"}}
MIGRATION = {"apiVersion": "ferry.dev/v1alpha1", "kind": "LiveMigration", "metadata": {"name": "m"},
             "spec": {"droplet": "d"}}


def with_spec(obj: dict, name: str, **changes) -> dict:
    out = json.loads(json.dumps(obj))
    out["metadata"]["name"] = name
    for path, value in changes.items():
        node = out["spec"]
        keys = path.split("__")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        if value is DELETE:
            node.pop(keys[-1], None)
        else:
            node[keys[-1]] = value
    return out


DELETE = object()

# (object, substring the API server's message must contain: the offending field)
INVALID = [
    (with_spec(HOST, "bad-dc", datacenter="NYC_3"), "spec.datacenter"),
    (with_spec(HOST, "no-dc", datacenter=DELETE), "spec.datacenter"),
    (with_spec(HOST, "zero-cpu", capacity__cpu=0), "spec.capacity.cpu"),
    (with_spec(HOST, "neg-mem", capacity__memoryMiB=-1), "spec.capacity.memoryMiB"),
    (with_spec(HOST, "str-disk", capacity__diskGiB="lots"), "spec.capacity.diskGiB"),
    (with_spec(HOST, "no-capacity", capacity=DELETE), "spec.capacity"),
    (with_spec(HOST, "bad-start", maintenance={"reason": "x", "start": "tomorrow"}), "spec.maintenance.start"),
    (with_spec(HOST, "no-reason", maintenance={"start": "2030-01-01T00:00:00Z"}), "spec.maintenance.reason"),
    (with_spec(DROPLET, "bad-size", size="s-3vcpu-huge"), "spec.size"),
    (with_spec(DROPLET, "both-sizes", resources={"cpu": 1, "memoryMiB": 1024, "diskGiB": 25}), "spec"),
    (with_spec(DROPLET, "no-size", size=DELETE), "spec"),
    (with_spec(DROPLET, "zero-cpu-res", size=DELETE, resources={"cpu": 0, "memoryMiB": 1024, "diskGiB": 25}),
     "spec.resources.cpu"),
    (with_spec(DROPLET, "bad-ip", ip="300.1.1.1"), "spec.ip"),
    (with_spec(DROPLET, "bad-power", powerState="sleeping"), "spec.powerState"),
    (with_spec(DROPLET, "bad-pattern", workload={"pattern": "random", "writeRateKiBps": 1}), "spec.workload.pattern"),
    (with_spec(DROPLET, "bad-dc-d", datacenter="-nyc"), "spec.datacenter"),
    (with_spec(MIGRATION, "no-droplet", droplet=DELETE), "spec.droplet"),
    (with_spec(MIGRATION, "bad-mode", mode="teleport"), "spec.mode"),
    (with_spec(MIGRATION, "bad-attempts", limits={"maxAttempts": 0}), "spec.limits.maxAttempts"),
    (with_spec(MIGRATION, "bad-downtime", limits={"downtimeMs": 0}), "spec.limits.downtimeMs"),
    (with_spec(MIGRATION, "bad-bw", limits={"bandwidthMiBps": -5}), "spec.limits.bandwidthMiBps"),
    (with_spec(MIGRATION, "bad-when", scheduledAt="next tuesday"), "spec.scheduledAt"),
    (with_spec(MIGRATION, "bad-target", targetHost="Host_A"), "spec.targetHost"),
    (with_spec(MIGRATION, "str-cancel", cancel="yes"), "spec.cancel"),
]


def test_crds_established(kubectl):
    for name in ("hosts.ferry.dev", "droplets.ferry.dev", "livemigrations.ferry.dev"):
        crd = kubectl.json("get", "crd", name)
        conds = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conds.get("Established") == "True", (name, conds)
        assert conds.get("NamesAccepted") == "True", (name, conds)
        version = crd["spec"]["versions"][0]
        assert version["subresources"] == {"status": {}}
        assert crd["spec"]["names"]["shortNames"]


def test_examples_are_accepted(kubectl, namespace):
    for f in sorted((ROOT / "examples").glob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(f.read_text()) if d and "kind" in d]
        for doc in docs:
            ns = [] if doc["kind"] == "Host" else ["-n", namespace]
            kubectl("apply", "--dry-run=server", *ns, "-f", "-", input=json.dumps(doc))


@pytest.mark.parametrize("obj,field", INVALID, ids=[o["metadata"]["name"] for o, _ in INVALID])
def test_invalid_objects_are_rejected(kubectl, namespace, obj, field):
    ns = [] if obj["kind"] == "Host" else ["-n", namespace]
    proc = kubectl("create", "--dry-run=server", *ns, "-f", "-", input=json.dumps(obj), check=False)
    assert proc.returncode != 0, f"{obj['metadata']['name']} was accepted"
    assert field in proc.stderr, proc.stderr


def test_droplet_of_a_migration_is_immutable(kubectl, namespace):
    kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(MIGRATION))
    proc = kubectl("patch", "-n", namespace, "livemigration", "m", "--type", "merge",
                   "-p", '{"spec": {"droplet": "other"}}', check=False)
    assert proc.returncode != 0
    assert "spec.droplet is immutable" in proc.stderr
    kubectl("patch", "-n", namespace, "livemigration", "m", "--type", "merge", "-p", '{"spec": {"cancel": true}}')
    proc = kubectl("patch", "-n", namespace, "livemigration", "m", "--type", "merge",
                   "-p", '{"spec": {"cancel": false}}', check=False)
    assert "cannot be undone" in proc.stderr


def test_datacenter_of_a_droplet_is_immutable(kubectl, namespace):
    kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(DROPLET))
    proc = kubectl("patch", "-n", namespace, "droplet", "d", "--type", "merge",
                   "-p", '{"spec": {"datacenter": "ams3"}}', check=False)
    assert proc.returncode != 0 and "spec.datacenter is immutable" in proc.stderr


def test_defaults_are_applied(kubectl, namespace):
    kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(MIGRATION))
    obj = kubectl.json("get", "-n", namespace, "livemigration", "m")
    assert obj["spec"]["mode"] == "live" and obj["spec"]["cancel"] is False


def test_printer_columns(kubectl, namespace):
    kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(MIGRATION))
    header = kubectl("get", "-n", namespace, "lm").stdout.splitlines()[0].split()
    for col in ("NAME", "DROPLET", "PHASE", "SOURCE", "TARGET", "PROGRESS", "AGE"):
        assert col in header, header


def test_kubectl_explain_teaches_the_api(kubectl):
    out = kubectl("explain", "livemigration.spec").stdout
    assert "Which droplet to move" in out
    for field in ("droplet", "targetHost", "scheduledAt", "mode", "limits", "cancel"):
        assert field in out
    out = kubectl("explain", "livemigration.spec.limits.downtimeMs").stdout
    assert "Downtime budget" in out
    out = kubectl("explain", "host.spec.maintenance").stdout
    assert "evacuat" in out.lower() or "cordoned" in out


def test_every_schema_field_has_a_description():
    missing = []

    def walk(node, path):
        if not isinstance(node, dict):
            return
        if path.count(".") > 1 and "description" not in node and path.split(".")[-1] != "metadata":
            missing.append(path)
        for k, v in (node.get("properties") or {}).items():
            walk(v, f"{path}.{k}")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict) and node["additionalProperties"].get("properties"):
            walk(node["additionalProperties"], f"{path}{{}}")

    for f in (ROOT / "crds").glob("*.yaml"):
        crd = yaml.safe_load(f.read_text())
        walk(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"], crd["spec"]["names"]["kind"])
    assert not missing, missing


def test_service_account_token_authenticates_and_rbac_denies(kubectl, kubeconfig, namespace, tmp_path):
    kubectl("create", "serviceaccount", "reader", "-n", namespace)
    kubectl("create", "role", "read-droplets", "-n", namespace, "--verb=get,list", "--resource=droplets.ferry.dev")
    kubectl("create", "rolebinding", "reader", "-n", namespace, "--role=read-droplets",
            f"--serviceaccount={namespace}:reader")
    token = kubectl("create", "token", "reader", "-n", namespace, "--duration=10m").stdout.strip()
    assert token.count(".") == 2  # a JWT from the TokenRequest API
    as_sa = ["--kubeconfig", kubeconfig_for_token(kubeconfig, token, tmp_path / "sa.kubeconfig")]
    # authenticated as the service account
    who = kubectl.json("auth", "whoami", *as_sa)
    assert who["status"]["userInfo"]["username"] == f"system:serviceaccount:{namespace}:reader"
    # granted
    kubectl("get", "droplets", "-n", namespace, *as_sa)
    # denied: writes, other resources, other namespaces
    for args in (["create", "-n", namespace, "-f", "-"],):
        proc = kubectl(*args, *as_sa, input=json.dumps(DROPLET), check=False)
        assert proc.returncode != 0 and "forbidden" in proc.stderr.lower()
    for args in (["get", "secrets", "-n", namespace], ["get", "droplets", "-n", "default"], ["get", "hosts"]):
        proc = kubectl(*args, *as_sa, check=False)
        assert proc.returncode != 0 and "forbidden" in proc.stderr.lower(), (args, proc.stderr)
    # a garbage token is not authenticated at all
    bad = kubeconfig_for_token(kubeconfig, "not-a-token", tmp_path / "bad.kubeconfig")
    proc = kubectl("get", "droplets", "-n", namespace, "--kubeconfig", bad, check=False)
    assert proc.returncode != 0 and "Unauthorized" in proc.stderr


def test_namespace_deletion_and_garbage_collection(kubectl, namespace):
    """kube-controller-manager runs: owned objects are collected, namespaces finish deleting."""
    cm = kubectl.json("create", "configmap", "owner", "-n", namespace)
    child = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "child", "ownerReferences": [
        {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": cm["metadata"]["uid"]}]}}
    kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(child))
    kubectl("delete", "configmap", "owner", "-n", namespace)
    kubectl("wait", "--for=delete", "secret/child", "-n", namespace, "--timeout=60s")
