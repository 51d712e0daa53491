"""The launcher pod of a VM and the resources it asks of its node (pure builders)."""

from __future__ import annotations

import pytest

from ferry.api.sizes import SIZES
from ferry.drivers.base import VMKey
from ferry.drivers.launcher import Launch, VMResources
from ferry.drivers.pod_launcher import (
    disruption_budget,
    label_value,
    launcher_pod,
    parse_device_resources,
    parse_groups,
    pod_exit_reason,
    selector,
)

KEY = VMKey("team-a", "web-1")
OWNER = {"apiVersion": "ferry.dev/v1alpha1", "kind": "Droplet", "name": "web-1", "uid": "u-1", "controller": True}


def req(cpu=2, memory_mib=4096, scale=0.001, role="vm") -> Launch:
    return Launch(key=KEY, argv=("/opt/ferry/bin/python", "-m", "ferry.drivers.sim.vm", "--dir", "/var/lib/ferry/vms/x"),
                  vm_dir="/var/lib/ferry/vms/x", log_path="/var/lib/ferry/vms/x/log",
                  env=(("FERRY_SIZE_SCALE", str(scale)),), resources=VMResources.of(cpu, memory_mib, scale), role=role)


def pod(**kw):
    return launcher_pod(req(**kw), node="host-a", image="ferry:dev", pull_policy="Never",
                        host_data_dir="/srv/ferry", data_dir="/var/lib/ferry", owner=OWNER)


@pytest.mark.parametrize("slug", sorted(SIZES))
@pytest.mark.parametrize("scale", [1.0, 0.01, 0.001])
def test_requests_are_the_size_times_the_scale(slug, scale):
    size = SIZES[slug]
    r = VMResources.of(size.cpu, size.memory_mib, scale)
    assert r.cpu_millis == max(1, round(size.cpu * scale * 1000))
    assert r.memory_bytes == max(1 << 20, round(size.memory_mib * scale * (1 << 20)))
    # at full scale the pod asks exactly what the Host's accounting counts
    if scale == 1.0:
        assert (r.cpu_millis, r.memory_bytes) == (size.cpu * 1000, size.memory_mib << 20)


def test_the_pod_is_the_droplets_and_bound_to_its_node():
    p = pod()
    meta, spec = p["metadata"], p["spec"]
    assert meta["namespace"] == "team-a" and meta["generateName"] == "ferry-vm-web-1-"
    assert meta["ownerReferences"] == [{**OWNER, "blockOwnerDeletion": False}]
    assert meta["labels"]["ferry.dev/vm"] == "web-1" and meta["labels"]["ferry.dev/node"] == "host-a"
    assert spec["nodeName"] == "host-a" and spec["restartPolicy"] == "Never" and spec["hostNetwork"] is True
    assert spec["automountServiceAccountToken"] is False
    [c] = spec["containers"]
    assert c["command"][0] == "/opt/ferry/bin/python" and c["workingDir"] == "/var/lib/ferry/vms/x"
    assert c["resources"] == {"requests": {"cpu": "2m", "memory": str(round(4096 * 0.001 * 2**20))}}
    assert "limits" not in c["resources"]
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert spec["volumes"] == [{"name": "data", "hostPath": {"path": "/srv/ferry", "type": "Directory"}}]
    assert c["volumeMounts"] == [{"name": "data", "mountPath": "/var/lib/ferry"}]
    assert {"name": "FERRY_SIZE_SCALE", "value": "0.001"} in c["env"]


def test_the_budget_refuses_every_eviction_of_the_droplets_pods():
    b = disruption_budget(KEY, OWNER)
    # 2 = source + target during a migration: no healthy count ever exceeds it (no eviction
    # is allowed), and an integer minAvailable needs no scale subresource on the owner
    assert b["spec"]["minAvailable"] == 2 and "maxUnavailable" not in b["spec"]
    labels = pod()["metadata"]["labels"]
    assert all(labels[k] == v for k, v in b["spec"]["selector"]["matchLabels"].items())
    assert b["metadata"]["ownerReferences"][0]["uid"] == "u-1"


def test_long_names_become_valid_label_values():
    long = "a" * 70
    v = label_value(long)
    assert len(v) <= 63 and v == label_value(long) and v != label_value("b" * 70)
    assert selector(VMKey("ns", long), "host-a") == f"ferry.dev/vm={v},ferry.dev/node=host-a"


@pytest.mark.parametrize("status,gone", [
    ({"phase": "Pending"}, False),
    ({"phase": "Running", "containerStatuses": [{"state": {"running": {}}}]}, False),
    ({"phase": "Pending", "containerStatuses": [{"state": {"waiting": {"reason": "ContainerCreating"}}}]}, False),
    ({"phase": "Pending", "containerStatuses": [{"state": {"waiting": {"reason": "ErrImageNeverPull"}}}]}, True),
    ({"phase": "Running", "containerStatuses": [{"state": {"terminated": {"exitCode": 3}}}]}, True),
    ({"phase": "Failed"}, True),
    ({"phase": "Succeeded"}, True),
])
def test_exit_reason(status, gone):
    reason = pod_exit_reason({"metadata": {"name": "p"}, "status": status})
    assert (reason is not None) == gone


def qemu_req() -> Launch:
    d = "/var/lib/ferry/vms/team-a__web-1"
    return Launch(key=KEY, argv=("qemu-system-x86_64", "-name", "team-a-web-1,debug-threads=on", "-accel", "tcg",
                                 "-pidfile", f"{d}/qemu.pid"),
                  vm_dir=d, log_path=f"{d}/qemu.stderr", env=(), resources=VMResources.of(2, 4096, 0.001))


def test_qemu_runs_in_the_same_unprivileged_pod_in_the_foreground():
    p = launcher_pod(qemu_req(), node="host-b", image="ferry:dev-qemu", pull_policy="Never",
                     host_data_dir="/srv/ferry", data_dir="/var/lib/ferry", owner=OWNER)
    [c] = p["spec"]["containers"]
    assert c["command"][0] == "qemu-system-x86_64" and "-daemonize" not in c["command"]
    assert c["workingDir"] == "/var/lib/ferry/vms/team-a__web-1"  # QEMU binds its sockets relative to it
    assert c["resources"] == {"requests": {"cpu": "2m", "memory": str(round(4096 * 0.001 * 2**20))}}
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert "privileged" not in c["securityContext"] and c["env"] == []
    assert p["spec"]["securityContext"]["runAsNonRoot"] is True and "supplementalGroups" not in p["spec"]["securityContext"]


def test_kvm_is_one_device_resource_and_a_group_not_a_privilege():
    p = launcher_pod(qemu_req(), node="host-b", image="ferry:dev-qemu", pull_policy="Never",
                     host_data_dir="/srv/ferry", data_dir="/var/lib/ferry", owner=OWNER,
                     device_resources={"devices.kubevirt.io/kvm": 1}, supplemental_groups=(108,))
    [c] = p["spec"]["containers"]
    assert c["resources"]["limits"] == {"devices.kubevirt.io/kvm": "1"}
    assert c["resources"]["requests"]["devices.kubevirt.io/kvm"] == "1" and c["resources"]["requests"]["cpu"] == "2m"
    assert "memory" not in c["resources"]["limits"]  # still no memory limit: no OOM kill of an admitted guest
    assert p["spec"]["securityContext"]["supplementalGroups"] == [108]
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]} and "privileged" not in c["securityContext"]
    assert p["spec"]["volumes"] == [{"name": "data", "hostPath": {"path": "/srv/ferry", "type": "Directory"}}]


@pytest.mark.parametrize("text, want", [
    ("", {}), ("devices.kubevirt.io/kvm=1", {"devices.kubevirt.io/kvm": 1}),
    ("a.io/x=2, b.io/y=1", {"a.io/x": 2, "b.io/y": 1}),
])
def test_device_resources_parse(text, want):
    assert parse_device_resources(text) == want


@pytest.mark.parametrize("text", ["kvm=1", "a.io/x", "a.io/x=0", "a.io/x=two"])
def test_bad_device_resources_are_refused(text):
    with pytest.raises(ValueError, match="FERRY_LAUNCHER_DEVICE_RESOURCES"):
        parse_device_resources(text)


def test_groups_parse():
    assert parse_groups("") == () and parse_groups("108,5") == (108, 5)
    with pytest.raises(ValueError):
        parse_groups("kvm")


def test_a_runtime_class_carries_the_overhead_and_the_requests_stay_the_scaled_size():
    p = launcher_pod(qemu_req(), node="host-b", image="ferry:dev-qemu", pull_policy="Never",
                     host_data_dir="/srv/ferry", data_dir="/var/lib/ferry", owner=OWNER, runtime_class="ferry-vm")
    assert p["spec"]["runtimeClassName"] == "ferry-vm"
    assert p["spec"]["containers"][0]["resources"] == {
        "requests": {"cpu": "2m", "memory": str(round(4096 * 0.001 * 2**20))}}
    assert "runtimeClassName" not in pod()["spec"]


def test_a_guest_with_a_nic_gets_dev_net_tun_and_still_no_capability():
    import dataclasses

    req = dataclasses.replace(qemu_req(), tun=True)
    p = launcher_pod(req, node="host-b", image="ferry:dev-qemu", pull_policy="Never",
                     host_data_dir="/srv/ferry", data_dir="/var/lib/ferry", owner=OWNER)
    [c] = p["spec"]["containers"]
    assert {"name": "tun", "mountPath": "/dev/net/tun"} in c["volumeMounts"]
    assert {"name": "tun", "hostPath": {"path": "/dev/net/tun", "type": "CharDevice"}} in p["spec"]["volumes"]
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]} and "privileged" not in c["securityContext"]
    assert p["spec"]["securityContext"]["runAsUser"] == 10001  # the taps' owner (agent-net --tap-uid)
    plain = launcher_pod(qemu_req(), node="host-b", image="ferry:dev-qemu", pull_policy="Never",
                         host_data_dir="/srv/ferry", data_dir="/var/lib/ferry", owner=OWNER)
    assert [v["name"] for v in plain["spec"]["volumes"]] == ["data"]
