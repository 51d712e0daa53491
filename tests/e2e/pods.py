"""The launcher pods of droplets as a cluster user sees them (kubectl only), and the guests in
them: each guest's write sequence number, read through its pod, shows it never restarted."""

from __future__ import annotations

import contextlib
import json
import time

import pytest
from guest_console import GuestKernelCrashed, kernel_crash
from steps import example_droplet, migration

QUERY_SEQ = ("import json,socket;s=socket.socket(socket.AF_UNIX);s.connect('control.sock');"
             "s.sendall(b'{\"execute\": \"query-status\"}\\n');b=b''\n"
             "while not b.endswith(b'\\n'): b+=s.recv(65536)\n"
             "print(json.loads(b)['return']['seq'])")


def memory_bytes(q: str) -> int:
    """A Kubernetes memory quantity (plain bytes or Ki/Mi/Gi) in bytes."""
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    for suffix, factor in units.items():
        if q.endswith(suffix):
            return int(q[:-2]) * factor
    return int(q)


def figure(e2e, line: str) -> None:
    """A figure for the closing note: printed, and kept in FERRY_E2E_FIGURES when set."""
    import os

    print(line)
    path = os.environ.get("FERRY_E2E_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def create_droplet(e2e, ns: str, name: str, *, size: str | None = None, ip: str | None = None,
                   rate_kibps: int | None = None) -> None:
    import yaml

    body = yaml.safe_load(example_droplet(name, ip))
    if size:
        body["spec"]["size"] = size
    if rate_kibps is not None:
        body["spec"]["workload"]["writeRateKiBps"] = rate_kibps
    e2e.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(body))


def vm_pods(e2e, ns: str, name: str | None = None) -> list[dict]:
    """The live (not terminating) launcher pods of droplet NAME (all droplets of NS if None)."""
    sel = "app.kubernetes.io/component=vm" + (f",ferry.dev/vm={name}" if name else "")
    items = json.loads(e2e.kubectl("get", "pods", "-n", ns, "-l", sel, "-o", "json").stdout)["items"]
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


def running_pod(e2e, ns: str, name: str) -> dict | None:
    """The one Running launcher pod of NAME, if exactly one (a migration has two for a while)."""
    pods = [p for p in vm_pods(e2e, ns, name) if p["status"].get("phase") == "Running"]
    return pods[0] if len(pods) == 1 else None


def qemu_serial(e2e, pod: dict) -> str:
    """A qemu guest's serial console: serial.log in the VM's directory (its pod's working dir)."""
    return e2e.kubectl("exec", "-n", pod["metadata"]["namespace"], pod["metadata"]["name"], "-c", "vm", "--",
                       "tail", "-c", "200000", "serial.log", timeout=60).stdout


@contextlib.contextmanager
def blame_guest_kernel(e2e, ns: str, name: str):
    """A failed check in the block is QEMU's TCG crash (``GuestKernelCrashed``: the e2e qemu tests
    rerun once on it) when the migrated guest's console shows its kernel crashed; any other
    failure stays what it is."""
    try:
        yield
    except (AssertionError, pytest.fail.Exception) as e:
        pod = running_pod(e2e, ns, name)
        crash = kernel_crash(qemu_serial(e2e, pod)) if pod else None
        if crash:
            raise GuestKernelCrashed(f"{e}\nthe guest kernel crashed on {pod['spec']['nodeName']}:\n{crash}") from e
        raise


def guest_seq(e2e, pod: dict) -> int:
    """The guest's write sequence number, asked of its VM process inside its pod."""
    python = pod["spec"]["containers"][0]["command"][0]
    out = e2e.kubectl("exec", "-n", pod["metadata"]["namespace"], pod["metadata"]["name"], "-c", "vm", "--",
                      python, "-c", QUERY_SEQ, timeout=60).stdout
    return int(out.strip().splitlines()[-1])


def guests(e2e, ns: str, names: list[str]) -> dict[str, tuple[str, str, int, int]]:
    """name -> (pod uid, node, container restarts, guest seq) of each droplet's running pod."""
    out = {}
    for name in names:
        pod = running_pod(e2e, ns, name)
        assert pod is not None, f"{ns}/{name}: not exactly one running launcher pod: {vm_pods(e2e, ns, name)}"
        restarts = sum(c.get("restartCount", 0) for c in pod["status"].get("containerStatuses") or [])
        out[name] = (pod["metadata"]["uid"], pod["spec"]["nodeName"], restarts, guest_seq(e2e, pod))
    return out


def assert_no_guest_restarted(before: dict, after: dict) -> int:
    """Every guest runs in the same pod and process, its sequence counter went on. Returns the
    number of restarts (0, or the assertion fails first)."""
    restarts = 0
    for name, (uid, node, n, seq) in before.items():
        uid2, node2, n2, seq2 = after[name]
        if (uid2, node2) != (uid, node) or n2 != n or seq2 < seq:
            restarts += 1
    assert restarts == 0, f"guests restarted: before {before}, after {after}"
    return restarts


class Stopwatch:
    def __init__(self):
        self.t0 = time.monotonic()

    def __call__(self) -> float:
        return time.monotonic() - self.t0


def finished(e2e, ns: str, name: str) -> dict | None:
    """The migration's status once it reached a terminal phase, else None."""
    st = migration(e2e, ns, name).get("status") or {}
    return st if st.get("phase") in ("Completed", "Failed", "Cancelled") else None
