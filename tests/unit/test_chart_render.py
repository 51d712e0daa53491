"""The Helm chart, rendered with ``helm template`` (no cluster): what it ships and how values
become objects. The API server's view of the same output is in
tests/integration/test_chart_install.py; real-token RBAC checks in test_chart_rbac.py."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import stat
import sys
import subprocess
import tempfile
from typing import Any

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "ferry"
KUBE_VERSION = "1.37.2"   # helm built from source defaults to v1.20; the chart needs >= 1.30
NS = "ferry-system"


@pytest.fixture(scope="module")
def helm(bin_dir: pathlib.Path) -> str:
    return str(bin_dir / "helm")


def helm_template(helm: str, values: dict[str, Any] | None = None, release: str = "ferry",
                  check: bool = True) -> subprocess.CompletedProcess:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(values or {}, f)
    try:
        proc = subprocess.run([helm, "template", release, str(CHART), "-n", NS, "--kube-version", KUBE_VERSION,
                               "-f", f.name], capture_output=True, text=True, timeout=60)
    finally:
        os.unlink(f.name)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def render(helm: str, values: dict[str, Any] | None = None, release: str = "ferry") -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(helm_template(helm, values, release).stdout) if d]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def by_component(docs: list[dict[str, Any]], kind: str, component: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind
            and d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component]


def containers(workload: dict[str, Any], init: bool = True) -> list[dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    return list(spec.get("initContainers", []) if init else []) + list(spec["containers"])


def env_value(container: dict[str, Any], name: str) -> dict[str, Any]:
    return next(e for e in container.get("env", []) if e["name"] == name)


def rules_of(docs: list[dict[str, Any]], name: str) -> set[tuple[str, str, str, str]]:
    """A ClusterRole's rules flattened to (apiGroup, resource, verb, resourceName or '*')."""
    role = one(docs, "ClusterRole", name)
    return {(g, r, v, n) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"] for n in rule.get("resourceNames", ["*"])}


def flat(*rules: tuple[str, list[str], list[str]] | tuple[str, list[str], list[str], list[str]]
         ) -> set[tuple[str, str, str, str]]:
    out = set()
    for rule in rules:
        group, resources, verbs, *names = rule
        for r in resources:
            for v in verbs:
                for n in (names[0] if names else ["*"]):
                    out.add((group, r, v, n))
    return out


# -- CRDs --------------------------------------------------------------------------------------

def test_chart_ships_the_very_crd_files_of_crds_dir() -> None:
    canonical = sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    assert canonical, "crds/ is empty"
    shipped = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    assert shipped == sorted(canonical + ["kopf-peerings.yaml"]), (
        "charts/ferry/crds/ must hold crds/*.yaml plus kopf-peerings.yaml; run hack/sync-chart-crds.sh")
    for name in canonical:
        assert (CHART / "crds" / name).read_bytes() == (ROOT / "crds" / name).read_bytes(), (
            f"charts/ferry/crds/{name} differs from crds/{name}; run hack/sync-chart-crds.sh")


def test_sync_script_check_mode_detects_a_drift(tmp_path: pathlib.Path) -> None:
    script = ROOT / "hack" / "sync-chart-crds.sh"
    assert subprocess.run(["bash", str(script), "--check"], capture_output=True).returncode == 0
    # A copy of the layout with one chart CRD changed: --check fails and names it, sync repairs it.
    (tmp_path / "hack").mkdir()
    (tmp_path / "hack" / "sync-chart-crds.sh").write_bytes(script.read_bytes())
    (tmp_path / "crds").mkdir()
    (tmp_path / "charts" / "ferry" / "crds").mkdir(parents=True)
    for p in (ROOT / "crds").glob("*.yaml"):
        (tmp_path / "crds" / p.name).write_bytes(p.read_bytes())
        (tmp_path / "charts" / "ferry" / "crds" / p.name).write_bytes(p.read_bytes())
    victim = tmp_path / "charts" / "ferry" / "crds" / "hosts.ferry.dev.yaml"
    victim.write_text(victim.read_text() + "# drift\n")
    (tmp_path / "charts" / "ferry" / "crds" / "gone.ferry.dev.yaml").write_text("x: 1\n")
    copy = tmp_path / "hack" / "sync-chart-crds.sh"
    check = subprocess.run(["bash", str(copy), "--check"], capture_output=True, text=True)
    assert check.returncode == 1
    assert "hosts.ferry.dev.yaml" in check.stderr and "gone.ferry.dev.yaml" in check.stderr
    assert subprocess.run(["bash", str(copy)], capture_output=True).returncode == 0
    assert victim.read_bytes() == (ROOT / "crds" / "hosts.ferry.dev.yaml").read_bytes()
    assert not (tmp_path / "charts" / "ferry" / "crds" / "gone.ferry.dev.yaml").exists()
    assert subprocess.run(["bash", str(copy), "--check"], capture_output=True).returncode == 0


def test_helm_lint_strict_is_clean(helm: str) -> None:
    proc = subprocess.run([helm, "lint", "--strict", str(CHART)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout


# -- settings ----------------------------------------------------------------------------------

def documented_settings() -> dict[str, str]:
    """FERRY_* variable -> default, from the Settings table of docs/architecture.md."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Settings", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\|\s*`(FERRY_[A-Z0-9_]+)`\s*\|\s*([^|]+?)\s*\|", section, re.M))


def camel(env: str) -> str:
    head, *rest = env.removeprefix("FERRY_").lower().split("_")
    return head + "".join(w.capitalize() for w in rest)


def settings_configmap(docs: list[dict[str, Any]]) -> dict[str, str]:
    return one(docs, "ConfigMap", "ferry-settings")["data"]


def program_settings() -> dict[str, Any]:
    """camelCase name -> default of every field of the programs' own Settings (FERRY_*)."""
    from ferry.settings import Settings

    return {camel("FERRY_" + f.name.upper()): f.default for f in dataclasses.fields(Settings)}


def test_values_settings_are_the_programs_settings_with_their_defaults() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())["settings"]
    program = program_settings()
    assert set(values) == set(program), (
        f"chart-only: {sorted(set(values) - set(program))}, program-only: {sorted(set(program) - set(values))}")
    for key, default in program.items():
        assert values[key] == default, (key, values[key], default)


def test_every_documented_setting_is_a_value_with_the_documented_default(helm: str) -> None:
    documented = documented_settings()
    assert len(documented) >= 10, "could not read the Settings table of docs/architecture.md"
    values = yaml.safe_load((CHART / "values.yaml").read_text())["settings"]
    assert {camel(k) for k in documented} <= set(values), "a setting of docs/architecture.md is not a chart value"
    data = settings_configmap(render(helm))
    assert set(data) == {"FERRY_" + re.sub(r"([A-Z])", r"_\1", k).upper() for k in values}
    for env, default in documented.items():
        try:
            assert float(data[env]) == float(default), env
        except ValueError:
            assert data[env] == default, env


def test_each_setting_reaches_its_environment_variable(helm: str) -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["settings"]["properties"]
    overrides: dict[str, Any] = {}
    for i, key in enumerate(sorted(program_settings())):
        prop = schema[key]
        if "enum" in prop:
            overrides[key] = prop["enum"][-1]
        elif prop["type"] == "integer":
            overrides[key] = min(prop.get("maximum", 10**9), 1000 + i)
        elif prop["type"] == "number":
            overrides[key] = min(prop.get("maximum", 10**9), 100 + i + 0.5)
        else:
            overrides[key] = f"team-{i}"
    overrides["heartbeatTimeoutSeconds"] = overrides["heartbeatSeconds"] + 7
    docs = render(helm, {"settings": overrides})
    data = settings_configmap(docs)
    for key, value in overrides.items():
        env = "FERRY_" + re.sub(r"([A-Z])", r"_\1", key).upper()
        assert data[env] == str(value), (env, data[env], value)
    # Every ferry container reads them.
    for kind in ("Deployment", "DaemonSet"):
        for workload in (d for d in docs if d["kind"] == kind):
            for c in workload["spec"]["template"]["spec"]["containers"]:
                assert {"configMapRef": {"name": "ferry-settings"}} in c["envFrom"], workload["metadata"]["name"]


def test_large_and_fractional_numbers_keep_their_plain_form(helm: str) -> None:
    data = settings_configmap(render(helm, {"settings": {"noticeSeconds": 1000000, "sizeScale": 0.001}}))
    assert data["FERRY_NOTICE_SECONDS"] == "1000000"   # not 1e+06
    assert data["FERRY_SIZE_SCALE"] == "0.001"


def test_changing_a_setting_rolls_the_pods(helm: str) -> None:
    def checksum(values: dict[str, Any]) -> str:
        dep = one(render(helm, values), "Deployment")
        return dep["spec"]["template"]["metadata"]["annotations"]["checksum/settings"]

    assert checksum({}) != checksum({"settings": {"noticeSeconds": 30}})
    assert checksum({}) == checksum({})


@pytest.mark.parametrize("values, complaint", [
    ({"settings": {"maxParallel": 0}}, "maxParallel"),
    ({"settings": {"noticeSeconds": -1}}, "noticeSeconds"),
    ({"settings": {"maxParallel": 1.5}}, "maxParallel"),
    ({"settings": {"heartbeatSeconds": 0}}, "heartbeatSeconds"),
    ({"settings": {"namespace": "Not A Namespace"}}, "namespace"),
    ({"settings": {"downtimeBudgetMs": 60001}}, "downtimeBudgetMs"),
    ({"settings": {"maxAttempts": 11}}, "maxAttempts"),
    ({"settings": {"placementStrategy": "random"}}, "placementStrategy"),
    ({"settings": {"sizeScale": 0}}, "sizeScale"),
    ({"settings": {"metricsPort": 70000}}, "metricsPort"),
    ({"settings": {"noticeSecond": 5}}, "noticeSecond"),          # a typo is an error, not ignored
    ({"settings": {"noticeSeconds": "600"}}, "noticeSeconds"),
    ({"settings": {"driver": "xen"}}, "driver"),
    ({"agent": {"dataDir": "relative/path"}}, "dataDir"),
    ({"metadata": {"address": "metadata.local"}}, "address"),
    ({"metadata": {"port": 0}}, "port"),
    ({"operator": {"replicas": 0}}, "replicas"),
    ({"operator": {"peering": {"enabled": False}}}, "replicas"),  # 2 replicas without peering
    ({"operator": {"peering": {"name": "Not_A_Name"}}}, "name"),
    ({"rbac": {"secretNamespaces": ["Bad_NS"]}}, "secretNamespaces"),
    ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
    ({"unknownTopLevel": 1}, "unknownTopLevel"),
    ({"settings": {"heartbeatSeconds": 30, "heartbeatTimeoutSeconds": 30}}, "heartbeatTimeoutSeconds"),
    ({"settings": {"metricsPort": 8081}}, "livenessPort"),
    ({"agent": {"launcherPod": {"deviceResources": {"kvm": 1}}}}, "'kvm' does not match"),  # DOMAIN/NAME
    ({"agent": {"launcherPod": {"deviceResources": {"devices.kubevirt.io/kvm": 0}}}}, "deviceResources"),
    ({"agent": {"launcherPod": {"supplementalGroups": [-1]}}}, "supplementalGroups"),
    ({"agent": {"launcherPod": {"overhead": {"memory": "lots"}}}}, "memory"),
    ({"agent": {"launcherPod": {"overhead": {"gpu": 1}}}}, "gpu"),
])
def test_bad_values_fail_before_anything_is_rendered(helm: str, values: dict[str, Any], complaint: str) -> None:
    proc = helm_template(helm, values, check=False)
    assert proc.returncode != 0, f"{values} was accepted"
    assert complaint in proc.stderr, proc.stderr
    assert proc.stdout == ""


def test_good_variants_render(helm: str) -> None:
    for values in ({"operator": {"peering": {"enabled": False}, "replicas": 1}},
                   {"settings": {"metricsPort": 0}},
                   {"settings": {"driver": "qemu"}, "agent": {"image": {"tag": "0.1.0-qemu"}}},
                   {"metadata": {"port": 8169, "addressSetup": {"enabled": True}}},
                   {"agent": {"enabled": False}, "metadata": {"enabled": False}},
                   {"rbac": {"secretNamespaces": ["a", "b"]}}):
        assert render(helm, values)


# -- operator ----------------------------------------------------------------------------------

def test_operator_runs_two_replicas_with_kopf_peering_liveness_and_metrics(helm: str) -> None:
    docs = render(helm)
    dep = one(docs, "Deployment", "ferry-operator")
    assert dep["spec"]["replicas"] >= 2
    [c] = dep["spec"]["template"]["spec"]["containers"]
    script = c["args"][0]
    assert script.startswith("exec ferry operator --peering --peering-name ")
    assert '--peering-name "ferry"' in script
    assert '--liveness "http://0.0.0.0:8081/healthz"' in script
    assert env_value(c, "POD_ID")["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env_value(c, "POD_UID")["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.uid"
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": 8080, "healthz": 8081}
    peering = one(docs, "ClusterKopfPeering")
    assert peering["metadata"]["name"] == "ferry"
    assert ("kopf.dev", "clusterkopfpeerings", "patch", "ferry") in rules_of(docs, "ferry-operator")
    svc = one(docs, "Service", "ferry-operator-metrics")
    assert svc["spec"]["ports"] == [{"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}]
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert one(docs, "PodDisruptionBudget")["spec"]["minAvailable"] == 1


def test_operator_replicas_get_distinct_priorities_from_their_pod_uid(helm: str, tmp_path: pathlib.Path) -> None:
    [c] = one(render(helm), "Deployment")["spec"]["template"]["spec"]["containers"]
    assert c["command"][-2:] == ["/bin/sh", "-ec"]
    fake = tmp_path / "ferry"   # prints the arguments the real program would get
    fake.write_text("#!/bin/sh\nprintf '%s\\n' \"$@\"\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)

    def argv(uid: str) -> list[str]:
        proc = subprocess.run(["/bin/sh", "-ec", c["args"][0]], capture_output=True, text=True,
                              env={"PATH": f"{tmp_path}:/usr/bin:/bin", "POD_UID": uid}, timeout=10)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.splitlines()

    a = argv("0000002a-1111-2222-3333-444444444444")
    b = argv("ffffffff-1111-2222-3333-444444444444")
    assert a[:4] == ["operator", "--peering", "--peering-name", "ferry"]
    assert a[a.index("--priority") + 1] == "42"
    assert b[b.index("--priority") + 1] == str(0xFFFFFFFF)
    assert a[a.index("--liveness") + 1] == "http://0.0.0.0:8081/healthz"
    # No POD_UID: the shell fails rather than starting every replica with one priority.
    proc = subprocess.run(["/bin/sh", "-ec", c["args"][0]], capture_output=True, text=True,
                          env={"PATH": f"{tmp_path}:/usr/bin:/bin"}, timeout=10)
    assert proc.returncode != 0


def test_operator_without_peering_is_one_standalone_replica(helm: str) -> None:
    docs = render(helm, {"operator": {"peering": {"enabled": False}, "replicas": 1}})
    dep = one(docs, "Deployment")
    [c] = dep["spec"]["template"]["spec"]["containers"]
    assert c["args"] == ["operator", "--standalone", "--liveness", "http://0.0.0.0:8081/healthz"]
    assert not [d for d in docs if d["kind"] in ("ClusterKopfPeering", "PodDisruptionBudget")]
    assert not {r for r in rules_of(docs, "ferry-operator") if r[0] == "kopf.dev"}


def test_metrics_port_zero_turns_metrics_off(helm: str) -> None:
    docs = render(helm, {"settings": {"metricsPort": 0}})
    assert not [d for d in docs if d["kind"] == "Service"]
    [c] = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert [p["name"] for p in c["ports"]] == ["healthz"]


# -- agent and metadata ------------------------------------------------------------------------

def test_agent_daemonset_serves_the_node_it_runs_on(helm: str) -> None:
    ds = one(render(helm), "DaemonSet", "ferry-agent")
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    assert spec["nodeSelector"] == {"ferry.dev/host": "true"}
    # VMs live in launcher pods, so agents roll like any DaemonSet
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate",
                                              "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    c, net = spec["containers"]
    assert c["name"] == "agent" and net["name"] == "net"
    # the network cut-over: the agent asks the net container (the only one with NET_ADMIN/NET_RAW)
    assert net["args"] == ["agent-net", "--socket", "/run/ferry-net/net.sock", "--device", "eth0"]
    assert env_value(c, "FERRY_NETWORK")["value"] == "node"
    assert env_value(c, "FERRY_NETWORK_SOCKET")["value"] == "/run/ferry-net/net.sock"
    mounts = {m["name"]: m["mountPath"] for m in net["volumeMounts"]}
    assert mounts == {"net": "/run/ferry-net"} and {"name": "net", "emptyDir": {}} in spec["volumes"]
    assert {m["name"]: m["mountPath"] for m in c["volumeMounts"]}["net"] == "/run/ferry-net"
    assert c["args"] == ["agent", "--host", "$(NODE_NAME)", "--data-dir", "/var/lib/ferry",
                         "--driver", "sim", "--address", "$(HOST_IP)"]
    assert env_value(c, "FERRY_LAUNCHER")["value"] == "pod"
    assert env_value(c, "FERRY_LAUNCHER_IMAGE")["value"] == c["image"]
    assert env_value(c, "FERRY_LAUNCHER_HOST_DATA_DIR")["value"] == "/var/lib/ferry"
    assert env_value(c, "NODE_NAME")["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env_value(c, "HOST_IP")["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    data = next(v for v in spec["volumes"] if v["name"] == "data")
    assert data["hostPath"] == {"path": "/var/lib/ferry", "type": "DirectoryOrCreate"}


def test_the_loopback_fabric_has_no_net_container(helm: str) -> None:
    spec = one(render(helm, {"agent": {"network": {"fabric": "loopback"}}}), "DaemonSet", "ferry-agent")["spec"]
    [c] = spec["template"]["spec"]["containers"]
    assert env_value(c, "FERRY_NETWORK")["value"] == "loopback"
    assert not [v for v in spec["template"]["spec"]["volumes"] if v["name"] == "net"]


def test_a_vm_bridge_gives_the_net_container_the_taps_and_dev_net_tun(helm: str) -> None:
    plain = one(render(helm), "DaemonSet", "ferry-agent")["spec"]["template"]["spec"]
    assert not [v for v in plain["volumes"] if v["name"] == "tun"]
    assert "FERRY_NETWORK_VM_BRIDGE" not in {e["name"] for e in plain["containers"][0]["env"]}
    spec = one(render(helm, {"agent": {"network": {"vmBridge": "ferryvm"}}}), "DaemonSet",
               "ferry-agent")["spec"]["template"]["spec"]
    c, net = spec["containers"]
    # the taps are owned by the launcher pods' user (10001): QEMU attaches without a capability
    assert net["args"] == ["agent-net", "--socket", "/run/ferry-net/net.sock", "--device", "eth0",
                           "--vm-bridge", "ferryvm", "--tap-uid", "10001"]
    assert env_value(c, "FERRY_NETWORK_VM_BRIDGE")["value"] == "ferryvm"
    assert {"name": "tun", "mountPath": "/dev/net/tun"} in net["volumeMounts"]
    assert {"name": "tun", "hostPath": {"path": "/dev/net/tun", "type": "CharDevice"}} in spec["volumes"]
    assert net["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    assert "tun" not in {m["name"] for m in c["volumeMounts"]}  # the agent itself gets nothing new


def test_only_a_qemu_agent_that_runs_qemu_itself_is_privileged(helm: str) -> None:
    def privileged(docs: list[dict[str, Any]]) -> set[str]:
        return {f"{d['metadata']['name']}/{c['name']}" for d in docs if d["kind"] in ("Deployment", "DaemonSet")
                for c in containers(d) if c.get("securityContext", {}).get("privileged")}

    assert privileged(render(helm)) == set()
    # qemu in launcher pods (the default launcher): the agent only orchestrates, unprivileged
    pods = render(helm, {"settings": {"driver": "qemu"}})
    assert privileged(pods) == set()
    c = one(pods, "DaemonSet", "ferry-agent")["spec"]["template"]["spec"]["containers"][0]
    assert "qemu" in c["args"] and c["securityContext"]["runAsUser"] == 10001
    assert env_value(c, "FERRY_LAUNCHER")["value"] == "pod"
    assert env_value(c, "FERRY_LAUNCHER_DEVICE_RESOURCES")["value"] == ""  # TCG: no device
    # QEMU inside the agent's container (launcher: process): root and privileged, for /dev/kvm
    inside = render(helm, {"settings": {"driver": "qemu"}, "agent": {"launcher": "process"}})
    assert privileged(inside) == {"ferry-agent/agent"}
    c = one(inside, "DaemonSet", "ferry-agent")["spec"]["template"]["spec"]["containers"][0]
    assert c["securityContext"]["runAsUser"] == 0 and env_value(c, "FERRY_LAUNCHER")["value"] == "process"


def test_launcher_pod_overhead_is_a_runtime_class_the_pods_name(helm: str) -> None:
    assert [d for d in render(helm) if d["kind"] == "RuntimeClass"] == []  # default: none
    c = one(render(helm), "DaemonSet", "ferry-agent")["spec"]["template"]["spec"]["containers"][0]
    assert env_value(c, "FERRY_LAUNCHER_RUNTIME_CLASS")["value"] == ""
    docs = render(helm, {"settings": {"driver": "qemu"},
                         "agent": {"launcherPod": {"overhead": {"memory": "256Mi", "cpu": "50m"}}}})
    rc = one(docs, "RuntimeClass", "ferry-vm")
    assert rc["handler"] == "runc" and rc["overhead"] == {"podFixed": {"memory": "256Mi", "cpu": "50m"}}
    c = one(docs, "DaemonSet", "ferry-agent")["spec"]["template"]["spec"]["containers"][0]
    assert env_value(c, "FERRY_LAUNCHER_RUNTIME_CLASS")["value"] == "ferry-vm"


def test_kvm_for_launcher_pods_is_a_device_resource_and_a_group(helm: str) -> None:
    docs = render(helm, {"settings": {"driver": "qemu"},
                         "agent": {"launcherPod": {"deviceResources": {"devices.kubevirt.io/kvm": 1},
                                                   "supplementalGroups": [108]}}})
    c = one(docs, "DaemonSet", "ferry-agent")["spec"]["template"]["spec"]["containers"][0]
    assert env_value(c, "FERRY_LAUNCHER_DEVICE_RESOURCES")["value"] == "devices.kubevirt.io/kvm=1"
    assert env_value(c, "FERRY_LAUNCHER_SUPPLEMENTAL_GROUPS")["value"] == "108"
    assert c["securityContext"].get("privileged") is not True
    from ferry.drivers.pod_launcher import parse_device_resources, parse_groups

    assert parse_device_resources(env_value(c, "FERRY_LAUNCHER_DEVICE_RESOURCES")["value"]) == {
        "devices.kubevirt.io/kvm": 1}
    assert parse_groups(env_value(c, "FERRY_LAUNCHER_SUPPLEMENTAL_GROUPS")["value"]) == (108,)


def test_processes_run_without_root_or_capabilities_where_they_can(helm: str) -> None:
    docs = render(helm, {"metadata": {"addressSetup": {"enabled": True}}})
    seen = {}
    for d in docs:
        if d["kind"] not in ("Deployment", "DaemonSet"):
            continue
        for c in containers(d):
            sc = c["securityContext"]
            seen[f"{d['metadata']['name']}/{c['name']}"] = (sc.get("runAsUser"), tuple(sc["capabilities"].get("add", [])))
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"]["drop"] == ["ALL"]
    assert seen == {
        "ferry-operator/operator": (10001, ()),
        "ferry-agent/agent": (10001, ()),
        "ferry-agent/data-dir": (0, ("CHOWN", "FOWNER")),              # chown of the hostPath dir
        "ferry-agent/net": (0, ("NET_ADMIN", "NET_RAW")),              # droplet addresses, gratuitous ARP
        "ferry-metadata/metadata": (0, ("NET_BIND_SERVICE",)),         # port 80
        "ferry-metadata/link-local-address": (0, ("NET_ADMIN",)),      # ip addr replace
    }
    # On an unprivileged port the metadata endpoint needs no root either.
    md = one(render(helm, {"metadata": {"port": 8169}}), "DaemonSet", "ferry-metadata")
    [c] = md["spec"]["template"]["spec"]["containers"]
    assert c["securityContext"]["runAsUser"] == 10001 and "add" not in c["securityContext"]["capabilities"]


def test_metadata_endpoint_listens_on_the_link_local_address_of_each_host(helm: str) -> None:
    ds = one(render(helm), "DaemonSet", "ferry-metadata")
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    assert spec["nodeSelector"] == {"ferry.dev/host": "true"}
    assert "initContainers" not in spec      # the node's address is opt-in
    [c] = spec["containers"]
    assert c["args"] == ["metadata", "--listen", "169.254.169.254:80"]
    assert c["readinessProbe"]["tcpSocket"] == {"host": "169.254.169.254", "port": 80}

    setup = one(render(helm, {"metadata": {"addressSetup": {"enabled": True, "device": "dummy0"},
                                           "address": "169.254.10.10", "port": 8169}}), "DaemonSet", "ferry-metadata")
    [init] = setup["spec"]["template"]["spec"]["initContainers"]
    assert init["command"] == ["ip", "addr", "replace", "169.254.10.10/32", "dev", "dummy0"]
    [c] = setup["spec"]["template"]["spec"]["containers"]
    assert c["args"] == ["metadata", "--listen", "169.254.10.10:8169"]


def test_components_can_be_left_out(helm: str) -> None:
    docs = render(helm, {"agent": {"enabled": False}, "metadata": {"enabled": False}})
    assert {d["metadata"]["labels"].get("app.kubernetes.io/component") for d in docs} <= {"operator", None}


# -- RBAC --------------------------------------------------------------------------------------

def test_each_component_has_its_own_service_account_role_and_binding(helm: str) -> None:
    docs = render(helm)
    for component in ("operator", "agent", "metadata"):
        [sa] = by_component(docs, "ServiceAccount", component)
        name = sa["metadata"]["name"]
        assert name == f"ferry-{component}" and sa["metadata"]["namespace"] == NS
        binding = one(docs, "ClusterRoleBinding", name)
        assert binding["roleRef"]["name"] == name
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": name, "namespace": NS}]
        workload = next(d for d in docs if d["kind"] in ("Deployment", "DaemonSet")
                        and d["metadata"]["name"] == name)
        assert workload["spec"]["template"]["spec"]["serviceAccountName"] == name


EVENTS = [("", ["events"], ["create"]), ("events.k8s.io", ["events"], ["create"])]


def test_operator_rules_are_exactly_what_it_needs(helm: str) -> None:
    docs = render(helm)
    assert rules_of(docs, "ferry-operator") == flat(
        ("ferry.dev", ["hosts", "droplets"], ["get", "list", "watch", "patch"]),
        ("ferry.dev", ["livemigrations"], ["get", "list", "watch", "patch", "create", "delete"]),
        ("ferry.dev", ["livemigrations/finalizers"], ["update"]),
        ("", ["nodes"], ["get", "list", "watch"]),
        ("ferry.dev", ["hosts/status", "droplets/status", "livemigrations/status"], ["get", "patch"]),
        ("apiextensions.k8s.io", ["customresourcedefinitions"], ["get", "list", "watch"]),
        ("kopf.dev", ["clusterkopfpeerings"], ["list", "watch"]),
        ("kopf.dev", ["clusterkopfpeerings"], ["get", "patch"], ["ferry"]),
        ("", ["events"], ["create", "patch"]), ("events.k8s.io", ["events"], ["create", "patch"]),
    )
    assert rules_of(docs, "ferry-operator-secrets") == flat(("", ["secrets"], ["create", "get", "delete"]))


def test_agent_rules_are_reads_two_status_subresources_and_its_vm_pods(helm: str) -> None:
    docs = render(helm)
    rules = rules_of(docs, "ferry-agent")
    assert rules == flat(
        ("ferry.dev", ["hosts", "droplets", "livemigrations"], ["get", "list", "watch"]),
        ("ferry.dev", ["hosts/status", "livemigrations/status"], ["get", "patch"]),
        *EVENTS,
        ("", ["pods"], ["get", "list", "watch", "create", "delete"]),
        ("policy", ["poddisruptionbudgets"], ["get", "create"]),
    )
    # the launcher pods: only on the agent's own node, only unprivileged
    policy = one(docs, "ValidatingAdmissionPolicy", "ferry-agent-launcher")
    assert policy["spec"]["matchConstraints"]["resourceRules"][0]["resources"] == ["pods"]
    assert not {r for r in rules if r[1].startswith("droplets") and r[2] not in ("get", "list", "watch")}
    assert rules_of(docs, "ferry-agent-secrets") == flat(("", ["secrets"], ["get"]))


def test_metadata_rules_read_droplets_only(helm: str) -> None:
    assert rules_of(render(helm), "ferry-metadata") == flat(("ferry.dev", ["droplets"], ["get", "list", "watch"]))


def test_secret_namespaces_turn_cluster_bindings_into_role_bindings(helm: str) -> None:
    docs = render(helm, {"rbac": {"secretNamespaces": ["team-a", "team-b"]}})
    crbs = {d["metadata"]["name"] for d in docs if d["kind"] == "ClusterRoleBinding"}
    assert crbs == {"ferry-operator", "ferry-agent", "ferry-metadata"}
    rbs = {(d["metadata"]["namespace"], d["metadata"]["name"], d["roleRef"]["name"])
           for d in docs if d["kind"] == "RoleBinding"}
    assert rbs == {(ns, f"ferry-{c}-secrets", f"ferry-{c}-secrets")
                   for ns in ("team-a", "team-b") for c in ("operator", "agent")}
    default = render(helm)
    assert {"ferry-operator-secrets", "ferry-agent-secrets"} <= {
        d["metadata"]["name"] for d in default if d["kind"] == "ClusterRoleBinding"}
    assert not [d for d in default if d["kind"] == "RoleBinding"]


def test_admission_policy_targets_the_agent_identity_of_this_release(helm: str) -> None:
    docs = render(helm, release="prod")
    policy = one(docs, "ValidatingAdmissionPolicy", "prod-ferry-agent-scope")
    [cond] = policy["spec"]["matchConditions"]
    assert cond["expression"] == 'request.userInfo.username == "system:serviceaccount:ferry-system:prod-ferry-agent"'
    [rule] = policy["spec"]["matchConstraints"]["resourceRules"]
    assert rule["resources"] == ["hosts/status", "livemigrations/status"] and rule["operations"] == ["UPDATE"]
    binding = one(docs, "ValidatingAdmissionPolicyBinding", "prod-ferry-agent-scope")
    assert binding["spec"] == {"policyName": "prod-ferry-agent-scope", "validationActions": ["Deny"]}
    launcher = one(docs, "ValidatingAdmissionPolicy", "prod-ferry-agent-launcher")
    assert launcher["spec"]["matchConditions"] == policy["spec"]["matchConditions"]
    assert not [d for d in render(helm, {"admissionPolicy": {"enabled": False}})
                if d["kind"].startswith("ValidatingAdmissionPolicy")]


def test_namespaced_objects_carry_the_release_namespace(helm: str) -> None:
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering",
                      "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding", "RuntimeClass"}
    for d in render(helm, {"agent": {"launcherPod": {"overhead": {"memory": "256Mi"}}}}):
        if d["kind"] in cluster_scoped:
            assert "namespace" not in d["metadata"], d["metadata"]["name"]
        else:
            assert d["metadata"]["namespace"] == NS, (d["kind"], d["metadata"]["name"])


# -- the chart against the programs' command line ---------------------------------------------

def container_argv(container: dict[str, Any], env: dict[str, str], tmp_path: pathlib.Path) -> list[str]:
    """The argv the image's entrypoint (tini -- ferry) would exec for this container, with the
    kubelet's $(VAR) expansion and, for shell commands, the shell's own expansion."""
    def expand(arg: str) -> str:
        return re.sub(r"\$\(([A-Z_]+)\)", lambda m: env[m.group(1)], arg)

    if "command" not in container:
        return ["ferry", *map(expand, container["args"])]
    command = [expand(a) for a in container["command"] + container.get("args", [])]
    assert command[:2] == ["/usr/bin/tini", "--"], command
    fake = tmp_path / "ferry"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    fake.chmod(0o755)
    proc = subprocess.run(command[2:], capture_output=True, text=True, timeout=10,
                          env={**env, "PATH": f"{tmp_path}:/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    return ["ferry", *proc.stdout.splitlines()]


@pytest.mark.parametrize("workload, values", [
    ("ferry-operator", {}),
    ("ferry-operator", {"operator": {"peering": {"enabled": False}, "replicas": 1}}),
    ("ferry-agent", {}),
    ("ferry-agent", {"settings": {"driver": "qemu"}}),
    ("ferry-metadata", {}),
])
def test_the_programs_accept_the_arguments_the_chart_gives_them(helm: str, tmp_path: pathlib.Path,
                                                                 workload: str, values: dict[str, Any]) -> None:
    docs = render(helm, values)
    pod = next(d for d in docs if d["metadata"]["name"] == workload and d["kind"] in ("Deployment", "DaemonSet"))
    for container in pod["spec"]["template"]["spec"]["containers"]:  # the agent's net container too
        env = {"NODE_NAME": "node-1", "HOST_IP": "10.0.0.7", "POD_UID": "0000002a-1111-2222-3333-444444444444",
               "POD_ID": "ferry-operator-abc"}
        argv = container_argv(container, env, tmp_path)
        # click parses every option before it acts on --help: an unknown option fails here.
        proc = subprocess.run([sys.executable, "-m", "ferry.cli.main", *argv[1:], "--help"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"{' '.join(argv)}: {proc.stderr.strip()}"
        assert "Usage:" in proc.stdout
