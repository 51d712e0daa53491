"""``PodLauncher``: each VM process in its own pod on the host's node (KubeVirt's virt-launcher).

The pod:

- lives in the droplet's namespace and is owned by the Droplet (deleting the droplet deletes
  its pods); labels ``ferry.dev/vm=<droplet>`` and ``ferry.dev/node=<node>`` find it;
- is bound to the host's node by ``spec.nodeName``: a VM runs where its placement record (or
  its migration's target) says, never where a scheduler would prefer. The kubelet still
  admits it against the node's allocatable, and kube-scheduler counts its requests for every
  other pod; a cordon (``NoSchedule``) does not stop a VM restarting on its own host, and it
  tolerates ``NoExecute`` taints (a VM leaves a node by migrating, not by the taint manager);
- requests the droplet's size scaled by ``FERRY_SIZE_SCALE`` (``VMResources``) and has no
  limits: a limit would let the kernel kill a guest that the Host's accounting admitted;
- runs the VM process with host networking (its migration channel binds the node's address,
  as the agent's did) and the agent's data directory mounted at the same path from the
  node (control socket, lock, images);
- runs as the agent's unprivileged user with the restricted security context, no service
  account token (the VM process never talks to the API), ``restartPolicy: Never`` (a crashed
  guest is restarted by the agent's plan, not behind its back);
- the same for both drivers: the sim VM process, or QEMU in the foreground (its pid file's
  lock and its monitor socket in the data directory). QEMU under TCG needs nothing more. With
  KVM it needs /dev/kvm only, given as a device plugin's extended resource
  (``device_resources``, e.g. ``devices.kubevirt.io/kvm: 1``, requested and limited) and,
  if the device is not world-writable, its group (``supplemental_groups``): no privilege, no
  capability (KVM checks none; a hostPath /dev/kvm would be refused by the container's
  device cgroup, and ``privileged`` would grant every device of the node);
- optionally names a RuntimeClass (``runtime_class``) whose pod overhead covers what the VM
  process uses beyond the guest (QEMU's translation cache and device model): kube-scheduler
  and kubelet add it to the pod's requests, which stay the droplet's scaled size.

A PodDisruptionBudget per droplet (``minAvailable: 2``, owned by the Droplet) refuses the
eviction of its pods: ``kubectl drain`` cordons the node, the operator turns the cordon into
host maintenance, the droplets migrate, and each source pod is deleted by its agent only
after the placement record names the target; drain then finds the node empty.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Mapping
from typing import Any

from ferry.api import constants as c
from ferry.drivers.base import DriverError, VMKey
from ferry.drivers.launcher import Launch
from ferry.storage import Kube, StorageError

log = logging.getLogger("ferry.launcher")

COMPONENT = "vm"
LABEL_VM = "ferry.dev/vm"
LABEL_NODE = "ferry.dev/node"
ANNOTATION_ROLE = "ferry.dev/vm-role"
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_WAITING_FATAL = {"ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull", "CreateContainerConfigError",
                  "CreateContainerError", "InvalidImageName", "RunContainerError"}


def label_value(s: str) -> str:
    """``s`` when it is a valid label value, else a stable short digest of it."""
    if _LABEL_VALUE.match(s):
        return s
    return "h-" + hashlib.sha256(s.encode()).hexdigest()[:40]


def selector(key: VMKey, node: str) -> str:
    return f"{LABEL_VM}={label_value(key.name)},{LABEL_NODE}={label_value(node)}"


def _quantity_bytes(n: int) -> str:
    """Exact: the scheduler's sum must be the Host's allocation times the scale."""
    return f"{n >> 20}Mi" if n % (1 << 20) == 0 else str(n)


def parse_device_resources(text: str) -> dict[str, int]:
    """``FERRY_LAUNCHER_DEVICE_RESOURCES``: ``name=count,...`` (e.g. ``devices.kubevirt.io/kvm=1``)."""
    out: dict[str, int] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, sep, count = item.partition("=")
        if not sep or "/" not in name or not count.strip().isdigit() or int(count) < 1:
            raise ValueError(f"FERRY_LAUNCHER_DEVICE_RESOURCES: {item!r} is not DOMAIN/NAME=COUNT")
        out[name.strip()] = int(count)
    return out


def parse_groups(text: str) -> tuple[int, ...]:
    """``FERRY_LAUNCHER_SUPPLEMENTAL_GROUPS``: ``gid,...``."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"FERRY_LAUNCHER_SUPPLEMENTAL_GROUPS: {text!r} is not a list of group ids") from None


def launcher_pod(req: Launch, *, node: str, image: str, pull_policy: str, host_data_dir: str,
                 data_dir: str, owner: Mapping[str, Any] | None, uid: int = 10001,
                 device_resources: Mapping[str, int] | None = None,
                 supplemental_groups: tuple[int, ...] = (), runtime_class: str = "") -> dict[str, Any]:
    """The pod of one VM process (PURE: tested without a cluster). ``runtime_class``: a
    RuntimeClass whose ``overhead.podFixed`` (what QEMU uses beyond its guest) the API server
    copies into the pod's ``spec.overhead``; the container's requests stay the scaled size."""
    name = req.key.name[:40].rstrip("-.")
    labels = {"app.kubernetes.io/name": "ferry", "app.kubernetes.io/component": COMPONENT,
              LABEL_VM: label_value(req.key.name), LABEL_NODE: label_value(node)}
    meta: dict[str, Any] = {"generateName": f"ferry-vm-{name}-", "namespace": req.key.namespace,
                            "labels": labels, "annotations": {ANNOTATION_ROLE: req.role}}
    if owner:
        meta["ownerReferences"] = [{**owner, "blockOwnerDeletion": False}]
    requests = {"cpu": f"{req.resources.cpu_millis}m", "memory": _quantity_bytes(req.resources.memory_bytes)}
    resources: dict[str, Any] = {"requests": requests}
    if device_resources:  # extended resources: requested and limited alike (the API wants both)
        devices = {k: str(v) for k, v in sorted(device_resources.items())}
        resources = {"requests": {**requests, **devices}, "limits": devices}
    pod_security: dict[str, Any] = {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid,
                                    "seccompProfile": {"type": "RuntimeDefault"}}
    if supplemental_groups:
        pod_security["supplementalGroups"] = list(supplemental_groups)
    extra: dict[str, Any] = {"runtimeClassName": runtime_class} if runtime_class else {}
    mounts: list[dict[str, Any]] = [{"name": "data", "mountPath": data_dir}]
    volumes: list[dict[str, Any]] = [{"name": "data", "hostPath": {"path": host_data_dir, "type": "Directory"}}]
    if req.tun:
        # the guest's NIC: QEMU opens /dev/net/tun and attaches to its tap, which the node's
        # network helper made owned by this pod's user (no capability needed for that; the
        # runtime's default device rules allow c 10:200, the node's device node is mounted)
        mounts.append({"name": "tun", "mountPath": "/dev/net/tun"})
        volumes.append({"name": "tun", "hostPath": {"path": "/dev/net/tun", "type": "CharDevice"}})
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": meta,
        "spec": {
            "nodeName": node,
            "hostNetwork": True,
            "dnsPolicy": "Default",
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": 30,
            "tolerations": [{"operator": "Exists", "effect": "NoExecute"},
                            {"operator": "Exists", "effect": "NoSchedule"}],
            **extra,
            "securityContext": pod_security,
            "containers": [{
                "name": COMPONENT,
                "image": image,
                "imagePullPolicy": pull_policy,
                "command": list(req.argv),
                "workingDir": req.vm_dir,
                "env": [{"name": k, "value": v} for k, v in req.env],
                "resources": resources,
                "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}},
                "volumeMounts": mounts,
            }],
            "volumes": volumes,
        },
    }


def disruption_budget(key: VMKey, owner: Mapping[str, Any] | None) -> dict[str, Any]:
    """Eviction of a droplet's pods is refused: a VM leaves its node by migrating (PURE).

    ``minAvailable: 2``, the most VM pods a droplet has at once (its source and, during a
    migration, its target): the disruption controller never allows an eviction (healthy pods
    minus 2 is at most 0). Not ``maxUnavailable: 0``, which says the same but makes the
    controller read the owner's scale subresource; a Droplet has none, so every budget would
    be flagged SyncFailed (CalculateExpectedPodCountFailed) and only refuse as a fail-safe.
    Not ``minAvailable: 1``: mid-migration, with two pods, one of them would be evictable."""
    meta: dict[str, Any] = {"name": f"ferry-vm-{key.name}"[:253], "namespace": key.namespace,
                            "labels": {"app.kubernetes.io/name": "ferry", "app.kubernetes.io/component": COMPONENT}}
    if owner:
        meta["ownerReferences"] = [{**owner, "blockOwnerDeletion": False}]
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": meta,
            "spec": {"minAvailable": 2,
                     "selector": {"matchLabels": {"app.kubernetes.io/component": COMPONENT,
                                                  LABEL_VM: label_value(key.name)}}}}


def pod_exit_reason(pod: Mapping[str, Any]) -> str | None:
    """Why a launcher pod's VM process is gone or will not start (None: running or starting)."""
    name = pod.get("metadata", {}).get("name")
    if pod.get("metadata", {}).get("deletionTimestamp"):
        return f"launcher pod {name} is being deleted"
    status = pod.get("status") or {}
    phase = status.get("phase")
    for cs in status.get("containerStatuses") or []:
        state = cs.get("state") or {}
        if "terminated" in state:
            t = state["terminated"]
            return f"launcher pod {name}: VM process exited (code {t.get('exitCode')}, {t.get('reason')})"
        waiting = (state.get("waiting") or {}).get("reason")
        if waiting in _WAITING_FATAL:
            return f"launcher pod {name}: {waiting}: {(state.get('waiting') or {}).get('message', '')}"
    if phase in ("Succeeded", "Failed"):
        return f"launcher pod {name} {phase}: {status.get('reason') or status.get('message') or ''}".rstrip(": ")
    return None


class PodLauncher:
    name = "pod"

    def __init__(self, kube: Kube, node: str, *, image: str, pull_policy: str = "IfNotPresent",
                 host_data_dir: str, data_dir: str, uid: int = 10001,
                 device_resources: Mapping[str, int] | None = None, supplemental_groups: tuple[int, ...] = (),
                 runtime_class: str = ""):
        self.kube = kube
        self.runtime_class = runtime_class
        self.device_resources = dict(device_resources or {})
        self.supplemental_groups = tuple(supplemental_groups)
        self.node = node
        self.image = image
        self.pull_policy = pull_policy
        self.host_data_dir = host_data_dir
        self.data_dir = data_dir
        self.uid = uid

    def _pods_path(self, namespace: str) -> str:
        return f"/api/v1/namespaces/{namespace}/pods"

    def _pods(self, key: VMKey) -> list[dict[str, Any]]:
        try:
            return self.kube.list_core(self._pods_path(key.namespace), f"list launcher pods of {key}",
                                       selector=selector(key, self.node))
        except StorageError as e:
            raise DriverError(f"{key}: {e}") from None

    def _owner(self, key: VMKey) -> dict[str, Any] | None:
        try:
            body = self.kube.get("Droplet", key.name, key.namespace)
        except StorageError as e:
            raise DriverError(f"{key}: the launcher pod's owner: {e}") from None
        meta = body["metadata"]
        return {"apiVersion": body.get("apiVersion", c.API_VERSION), "kind": "Droplet", "name": meta["name"],
                "uid": meta["uid"], "controller": True}

    def _ensure_budget(self, key: VMKey, owner: Mapping[str, Any] | None) -> None:
        body = disruption_budget(key, owner)
        path = f"/apis/policy/v1/namespaces/{key.namespace}/poddisruptionbudgets"
        if self.kube.get_core(f"{path}/{body['metadata']['name']}", f"get budget of {key}") is not None:
            return
        try:
            self.kube.create_core(path, body, f"create budget of {key}")
        except StorageError as e:  # exists already (a race with the other host), or refused: logged
            if "already exists" not in str(e):
                log.warning("%s: no PodDisruptionBudget: %s", key, e)

    def launch(self, req: Launch) -> None:
        self._delete_all(req.key, grace_seconds=0, wait=30.0)  # a crashed or finished VM's pod
        owner = self._owner(req.key)
        self._ensure_budget(req.key, owner)
        body = launcher_pod(req, node=self.node, image=self.image, pull_policy=self.pull_policy,
                            host_data_dir=self.host_data_dir, data_dir=self.data_dir, owner=owner, uid=self.uid,
                            device_resources=self.device_resources, supplemental_groups=self.supplemental_groups,
                            runtime_class=self.runtime_class)
        try:
            pod = self.kube.create_core(self._pods_path(req.key.namespace), body, f"create launcher pod of {req.key}")
        except StorageError as e:
            raise DriverError(f"{req.key}: {e}") from None
        log.info("launched %s in pod %s/%s on node %s (requests %s)", req.key, req.key.namespace,
                 pod["metadata"]["name"], self.node, body["spec"]["containers"][0]["resources"]["requests"])

    def exited(self, key: VMKey) -> str | None:
        pods = self._pods(key)
        if not pods:
            return f"no launcher pod of {key} on node {self.node}"
        reasons = [pod_exit_reason(p) for p in pods]
        return None if any(r is None for r in reasons) else reasons[0]

    def _delete_all(self, key: VMKey, grace_seconds: int | None, wait: float) -> None:
        pods = self._pods(key)
        for p in pods:
            name = p["metadata"]["name"]
            try:
                self.kube.delete_core(f"{self._pods_path(key.namespace)}/{name}", f"delete launcher pod {name}",
                                      grace_seconds=grace_seconds)
            except StorageError as e:
                raise DriverError(f"{key}: {e}") from None
        deadline = time.monotonic() + wait
        while pods and wait > 0 and time.monotonic() < deadline:
            time.sleep(0.2)
            pods = self._pods(key)
        if pods and wait > 0:
            raise DriverError(f"{key}: launcher pods still there after {wait:.0f}s: "
                              f"{', '.join(p['metadata']['name'] for p in pods)}")

    def kill(self, key: VMKey, vm_dir: str, timeout: float = 30.0) -> None:
        self._delete_all(key, grace_seconds=0, wait=timeout)

    def release(self, key: VMKey) -> None:
        self._delete_all(key, grace_seconds=None, wait=0)
