"""The crash matrix (issue 13): every failpoint x crash then a restart of the crashed
component, the API server stopped 20 s, the data channel cut, VM processes killed, the
active operator of two killed; after each case the invariants of ``checks`` are checked by
looking at processes, write logs and API objects, never at ferry's own verdict alone.

One droplet (5 MiB disk, 256 KiB memory, writing 256 KiB/s) moves from host a to host b.
The failpoint environment is given only to the process that must crash; after the crash that
process is started again without it (for a VM process: its agent is restarted without it, so
later VMs do not inherit it; the VM itself is restarted, or not, by its agent).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import signal
import time

import pytest
from checks import ROWS, compare_with_replay, kill_ss, vm_processes
from probe import ask
from stack import Stack
from support import wait_until

from ferry.drivers.base import VMKey
from ferry.drivers.sim import SimDriver

ROOT = pathlib.Path(__file__).resolve().parents[2]
CRASH_EXIT = 86  # ferry.failpoints.CRASH_EXIT_CODE (not imported: a renamed constant must not pass by accident)
TERMINAL = ("Completed", "Failed")


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    component: str  # operator | source-agent | target-agent | source-vm | target-vm | apiserver | data-channel | active-operator
    fault: str  # a failpoint name, or the fault from outside
    reboot_ok: bool = False  # no copy with the guest's memory is left: a reboot is the right outcome
    also: tuple[tuple[str, str], ...] = ()  # (component, failpoint) armed too, to reach this one
    core: bool = False
    slow_copy: bool = False  # a bandwidth limit, so the fault lands mid-copy


FP = Case
CASES = [
    # the operator
    FP("op-before-record", "operator", "operator.before-record-write", core=True),
    FP("op-after-record", "operator", "operator.after-record-write", core=True),
    FP("op-after-label", "operator", "operator.after-label-write"),
    FP("op-before-secret-delete", "operator", "operator.before-secret-delete"),
    FP("op-before-release", "operator", "operator.before-release"),
    FP("op-before-record-return", "operator", "operator.before-record-return",
       also=(("target-vm", "vm.target-before-resume"),)),
    # the source agent
    FP("src-before-start", "source-agent", "source-agent.before-start-migration"),
    FP("src-before-completed", "source-agent", "source-agent.before-report-completed"),
    FP("src-before-destroy", "source-agent", "source-agent.before-destroy"),
    FP("src-before-cancel", "source-agent", "source-agent.before-cancel",
       also=(("target-vm", "vm.target-before-resume"),)),
    # the target agent
    FP("tgt-before-received", "target-agent", "target-agent.before-report-received"),
    FP("tgt-before-resume", "target-agent", "target-agent.before-resume", core=True),
    FP("tgt-after-resume", "target-agent", "target-agent.after-resume"),
    FP("tgt-before-address", "target-agent", "target-agent.before-address", core=True),
    FP("tgt-after-address", "target-agent", "target-agent.after-address"),
    # the VM processes (a crash loses the memory)
    FP("vm-source-paused", "source-vm", "vm.source-paused", reboot_ok=True),
    FP("vm-source-completed", "source-vm", "vm.source-completed"),
    FP("vm-target-received", "target-vm", "vm.target-received"),
    FP("vm-target-before-resume", "target-vm", "vm.target-before-resume", core=True),
    # faults from outside
    Case("apiserver-precopy", "apiserver", "SIGSTOP 20 s mid-PreCopy", slow_copy=True),
    Case("apiserver-cutover", "apiserver", "SIGSTOP 20 s once the copy is verified"),
    Case("channel-cut", "data-channel", "TCP connection aborted mid-copy (ss -K)", slow_copy=True),
    Case("kill-source-vm-precopy", "source-vm", "SIGKILL mid-PreCopy", reboot_ok=True, slow_copy=True),
    Case("kill-source-vm-cutover", "source-vm", "SIGKILL once it reported Completed"),
    Case("kill-target-vm-precopy", "target-vm", "SIGKILL mid-PreCopy", slow_copy=True),
    # The target resumes as soon as the record names it, so this kill mostly lands after the
    # guest ran there (a reboot from its disk is then right); vm-target-before-resume holds the
    # target before its resume with a failpoint.
    Case("kill-target-vm-cutover", "target-vm", "SIGKILL once it reported Received"),
]
# two operator replicas with peering: the active one crashes at each operator failpoint
CASES += [Case(f"peered-{c.id}", "active-operator", c.fault, also=c.also)
          for c in list(CASES) if c.component == "operator"]


def _params():
    return [pytest.param(c, id=c.id, marks=[pytest.mark.core] if c.core else []) for c in CASES]


@pytest.fixture
def stack(ferry_process, kubectl, namespace):
    s = Stack(ferry_process, kubectl, namespace, env={"FERRY_SIM_WRITE_LOG": "1"})
    yield s
    s.close()


def _fp_env(case: Case, component: str) -> dict[str, str]:
    names = [fp for comp, fp in ((case.component, case.fault), *case.also)
             if comp == component or (component == "operator" and comp == "active-operator")]
    names = [n for n in names if "." in n and " " not in n]
    return {"FERRY_FAILPOINTS": ",".join(names)} if names else {}


def _fired_path(kubeconfig: str, side: str) -> pathlib.Path:
    return pathlib.Path(kubeconfig).parent / f"failpoints-fired-{side}"


def _fired_env(kubeconfig: str, side: str) -> dict[str, str]:
    """Where a host's processes (its agent and the VMs it starts) record a failpoint firing: a
    VM's own log goes with its directory, which a fast cleanup removes before a poll reads it."""
    return {"FERRY_FAILPOINTS_FIRED": str(_fired_path(kubeconfig, side))}


def _fired_recorded(kubeconfig: str, side: str, name: str) -> bool:
    try:
        return f"ferry failpoint {name}:" in _fired_path(kubeconfig, side).read_text(errors="replace")
    except OSError:
        return False


def _lm(stack: Stack) -> dict:
    return stack.lm("move")


def _apiserver_pid(kubeconfig: str) -> int:
    pidfile = pathlib.Path(kubeconfig).parent / "run" / "kube-apiserver.pid"
    assert pidfile.exists(), ("the API server cases stop the control plane this session started "
                              "(unset FERRY_TEST_KUBECONFIG)")
    return int(pidfile.read_text().strip())


def _vm_pid(stack: Stack, host: str) -> int | None:
    for h, pid in vm_processes(stack.dirs, stack.ns, "web"):
        if h == host:
            return pid
    return None


def _start_operators(stack: Stack, case: Case, kubectl) -> list:
    env = _fp_env(case, "operator")
    if case.component != "active-operator":
        return [stack.start_operator(env)]
    kubectl("apply", "--server-side", "-f", str(ROOT / "charts" / "ferry" / "crds" / "kopf-peerings.yaml"))
    kubectl("apply", "-n", stack.ns, "-f", "-", input=json.dumps({
        "apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "ferry-chaos"}}))
    active = stack.ferry_process("-n", stack.ns, "operator", "--peering", "--peering-name", "ferry-chaos",
                                 "--priority", "20", env={**stack.env, **env})
    standby = stack.ferry_process("-n", stack.ns, "operator", "--peering", "--peering-name", "ferry-chaos",
                                  "--priority", "10", env=stack.env)
    stack.operator = active
    return [active, standby]


@pytest.mark.parametrize("case", _params())
def test_crash_case(case: Case, stack: Stack, kubectl, kubeconfig):
    t0 = time.monotonic()
    ns, key = stack.ns, VMKey(stack.ns, "web")
    a = stack.host("a", agent=False)
    stack.start_agent(a, env=_fp_env(case, "source-agent") | _fp_env(case, "source-vm") | _fired_env(kubeconfig, f"{case.id}-a"))
    operators = _start_operators(stack, case, kubectl)
    stack.wait_hosts_ready()
    ip = f"127.{90 + os.getpid() % 100}.{(os.getpid() // 100) % 250}.{1 + int(stack.tag, 16) % 250}"
    if case.slow_copy:  # a disk full of data and a 1 MiB/s link: the copy lasts seconds
        stack.droplet("web", write_kibps=768, pattern="sequential", ip=ip)
    else:
        stack.droplet("web", write_kibps=256, ip=ip)
    assert stack.wait_running("web") == a
    if case.slow_copy:
        wait_until(lambda: (_driver(stack, a).status(key) or {}).get("bytes_written", 0) >= 4 << 20, 60,
                   what="4 MiB written by the guest")
    b = stack.host("b", agent=False)
    stack.start_agent(b, env=_fp_env(case, "target-agent") | _fp_env(case, "target-vm") | _fired_env(kubeconfig, f"{case.id}-b"))
    stack.wait_hosts_ready()
    source_pid = _vm_pid(stack, a)
    assert source_pid, "no VM process of the droplet on its host"
    spec = {"limits": {"bandwidthMiBps": 1}} if case.slow_copy else {}
    stack.migrate("web", **spec)

    crashed = _inject(case, stack, kubeconfig, a, b, operators)

    # 1. terminal, never stuck
    def terminal():
        st = _lm(stack)
        return st if st.get("phase") in TERMINAL else None
    try:
        st = wait_until(terminal, 180, interval=0.5, what="the migration Completed or Failed")
    except (AssertionError, pytest.fail.Exception):  # stuck: the row says so, the test fails below
        st = _lm(stack)
    outcome = st.get("phase") or "none"
    attempts = len(st.get("attempts") or [])
    failed = [x.get("reason") or "?" for x in st.get("attempts") or [] if x.get("result") == "Failed"]
    returned = any(e.get("reason") == "RecordReturned" for e in stack.events("LiveMigration", "move"))

    # settle: the agents converge on the record (destroy the other copy, restart a lost one)
    def settled():
        procs = vm_processes(stack.dirs, ns, "web")
        d = stack.get("droplet", "web")
        host = (d.get("status") or {}).get("host")
        others = [h for h in (a, b) if h != host]
        orphan = any(key in [v.key for v in _driver(stack, h).list_vms()] for h in others)
        running = host is not None and (_driver(stack, host).status(key) or {}).get("status") == "running"
        return len(procs) == 1 and procs[0][0] == host and not orphan and running
    try:
        wait_until(settled, 60, interval=0.5, what="one running copy, on the host of the record")
    except (AssertionError, pytest.fail.Exception):
        pass

    inv: dict[str, tuple[bool, str] | None] = {}
    inv["terminal"] = (outcome in TERMINAL, f"{outcome} after {attempts} attempt(s)")
    d = stack.get("droplet", "web")
    host = (d.get("status") or {}).get("host")
    label = (d.get("metadata", {}).get("labels") or {}).get("ferry.dev/host")
    procs = vm_processes(stack.dirs, ns, "web")
    inv["one-process"] = (len(procs) == 1 and procs[0][0] == host, f"processes {procs}, record {host}")
    inv["record=label"] = (host == label and host in (a, b), f"record {host}, label {label}")
    status = _driver(stack, host).status(key) if host in (a, b) else None
    boot = (status or {}).get("boot")
    # a target killed after it ran took the guest's newer writes with it: its reboot is right
    if case.reboot_ok or "after the target ran" in crashed:
        inv["no-reboot"] = (boot is not None, f"boot {boot} (a reboot is allowed: no copy with the memory was left)")
    else:
        inv["no-reboot"] = (boot == 1, f"boot {boot}")
    inv["writes"] = compare_with_replay(_driver(stack, host), key, stack.dirs) if status else (False, "no running copy")
    if outcome == "Failed":
        same = _vm_pid(stack, a) == source_pid
        inv["source-ran"] = (host == a and (same or case.component == "source-vm"),
                             f"record {host}, source VM pid {source_pid} -> {_vm_pid(stack, a)}")
    else:
        inv["source-ran"] = None
    # the droplet's address answers, from the guest of the record's host (loopback fabric: the
    # guest that runs answers; a paused or dead copy does not)
    port = int(stack.env["FERRY_SIM_SERVICE_PORT"])
    try:
        answer = wait_until(lambda: ask(ip, port), 10, interval=0.2, what=f"an answer on {ip}:{port}")
    except (AssertionError, pytest.fail.Exception):
        answer = None
    inv["address"] = (answer is not None and answer.get("host") == host,
                      f"answered by {(answer or {}).get('host')}, record {host}")
    inv["no-orphans"] = _no_orphans(stack, kubectl, a, b, host)

    final = {a: "a (source)", b: "b (target)"}.get(host, str(host))
    ROWS.append({"case": case.id, "component": case.component, "fault": case.fault, "injected": crashed,
                 "outcome": f"{outcome}, {attempts} att." + (f" ({', '.join(failed)} failed)" if failed else "")
                            + (", record returned" if returned else "") + ("" if crashed else ", NOT FIRED"),
                 "final_host": final, "invariants": inv, "seconds": time.monotonic() - t0})
    assert crashed, f"the fault {case.fault} was never injected: {crashed!r}"
    broken = {k: v[1] for k, v in inv.items() if v is not None and not v[0]}
    assert not broken, f"{case.id}: invariants broken: {broken}"


def _driver(stack: Stack, host: str) -> SimDriver:
    return SimDriver(str(stack.dirs[host]), size_scale=float(stack.env["FERRY_SIZE_SCALE"]), write_log=True)


def _no_orphans(stack: Stack, kubectl, a: str, b: str, host: str | None) -> tuple[bool, str]:
    problems = []
    key = VMKey(stack.ns, "web")
    for h in (a, b):
        if h != host and key in [v.key for v in _driver(stack, h).list_vms()]:
            problems.append(f"a copy on {h}")
    secret = kubectl("get", "secret", "move-transfer", "-n", stack.ns, check=False)
    if secret.returncode == 0:
        problems.append("transfer Secret left")
    other = b if host == a else a

    def released():
        alloc = ((stack.get("host", other).get("status") or {}).get("allocated") or {})
        return int(alloc.get("cpu") or 0) == 0
    try:
        wait_until(released, 15, what="nothing allocated or reserved on the other host")
    except (AssertionError, pytest.fail.Exception):
        problems.append(f"{other} still counts capacity for it")
    kubectl("delete", "livemigration", "move", "-n", stack.ns, "--wait=false", check=False)
    try:
        wait_until(lambda: kubectl("get", "livemigration", "move", "-n", stack.ns, check=False).returncode != 0, 30,
                   what="the finished migration deletable (no finalizer left)")
    except (AssertionError, pytest.fail.Exception):
        problems.append("the migration's finalizer holds it")
    return (not problems, "; ".join(problems) or "none")


# --- injecting the fault ------------------------------------------------------------------

def _inject(case: Case, stack: Stack, kubeconfig: str, a: str, b: str, operators: list) -> str:
    """Make the fault happen (or wait for the failpoint to fire) and restart what crashed.
    Returns a description of what was done ("" if the fault never happened)."""
    if case.component == "apiserver":
        return _stop_apiserver(case, stack, kubeconfig)
    if case.component == "data-channel":
        _await_copying(stack)
        port = int(_lm(stack)["target"]["address"].rpartition(":")[2])
        where = _progress(stack)
        n = kill_ss(port)
        return f"{n} socket(s) aborted at {where}" if n else ""
    if case.fault.startswith("SIGKILL"):
        return _kill_vm(case, stack, a, b)
    return _await_failpoint(case, stack, a, b, operators, kubeconfig)


def _copying(stack: Stack) -> bool:
    st = _lm(stack)
    tr = st.get("transfer") or {}
    return (st.get("phase") == "PreCopy" and tr.get("state") in ("Copying", "Converging")
            and int(tr.get("bytesSent") or 0) > 0 and int(tr.get("progress") or 0) < 80)


def _await_copying(stack: Stack) -> None:
    wait_until(lambda: _copying(stack), 90, interval=0.05, what="the copy under way (under 80 %)")


def _progress(stack: Stack) -> str:
    st = _lm(stack)
    tr = st.get("transfer") or {}
    return f"{st.get('phase')} {tr.get('state')} {tr.get('progress')}%"


def _fired_in_vm_log(stack: Stack, host: str, name: str) -> bool:
    return _in_vm_log(stack, host, f"ferry failpoint {name}:")


def _target_took_the_guest(stack: Stack, host: str) -> bool:
    spec = pathlib.Path(stack.dirs[host]) / "vms" / f"{stack.ns}__web" / "vm.json"
    with contextlib.suppress(OSError, ValueError):
        if json.loads(spec.read_text()).get("incoming_pending") is False:
            return True
    return _in_vm_log(stack, host, "resumed after incoming migration")


def _in_vm_log(stack: Stack, host: str, text: str) -> bool:
    for log in pathlib.Path(stack.dirs[host]).glob("vms/*/log"):
        try:
            if text in log.read_text(errors="replace"):
                return True
        except OSError:
            pass
    return False


def _await_failpoint(case: Case, stack: Stack, a: str, b: str, operators: list, kubeconfig: str) -> str:
    """Wait until the case's failpoint crashed its process; restart what crashed without
    failpoints (the processes of `also` points too, once they fired)."""
    armed = [(case.component, case.fault), *case.also]
    fired: list[str] = []
    pending = list(armed)
    ended: list[float] = []

    def step():
        for comp, name in list(pending):
            done = False
            if comp in ("operator", "active-operator"):
                p = operators[0]
                done = p.proc.poll() == CRASH_EXIT
                if done and comp == "operator":
                    stack.start_operator()
            elif comp in ("source-agent", "target-agent"):
                host = a if comp == "source-agent" else b
                done = stack.agents[host].proc.poll() == CRASH_EXIT
                if done:
                    stack.start_agent(host)
            elif comp in ("source-vm", "target-vm"):
                host = a if comp == "source-vm" else b
                side = f"{case.id}-{'a' if comp == 'source-vm' else 'b'}"
                done = _fired_in_vm_log(stack, host, name) or _fired_recorded(kubeconfig, side, name)
                if done:  # later VMs of this host must not inherit the failpoint
                    stack.agents[host].stop()
                    stack.start_agent(host)
            if done:
                pending.remove((comp, name))
                fired.append(f"{name} crashed {comp}")
        if (case.component, case.fault) not in pending:
            return True
        st = _lm(stack)
        if st.get("phase") in TERMINAL:  # a point after the end (e.g. the source's destroy) may still come
            ended.append(time.monotonic())
            if ended[-1] - ended[0] > 20:
                return True  # it never fired: the migration ended without reaching it
        return None
    try:
        wait_until(step, 150, interval=0.1, what=f"failpoint {case.fault} fired")
    except (AssertionError, pytest.fail.Exception):
        pass
    if (case.component, case.fault) in pending:
        return ""
    return "; ".join(fired)


def _stop_apiserver(case: Case, stack: Stack, kubeconfig: str) -> str:
    pid = _apiserver_pid(kubeconfig)
    if "PreCopy" in case.fault:
        _await_copying(stack)
    else:
        wait_until(lambda: (_lm(stack).get("target") or {}).get("state") in ("Received", "Running"), 90,
                   interval=0.05, what="the copy verified")
    phase = _progress(stack)
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(20)  # the fault itself lasts 20 s (not a wait for a condition)
    finally:
        os.kill(pid, signal.SIGCONT)
    return f"stopped in {phase}"


def _kill_vm(case: Case, stack: Stack, a: str, b: str) -> str:
    host = a if case.component == "source-vm" else b
    lm = lambda: _lm(stack)  # noqa: E731
    if "PreCopy" in case.fault:
        _await_copying(stack)
    elif case.component == "source-vm":
        wait_until(lambda: (lm().get("transfer") or {}).get("state") == "Completed", 90, interval=0.05,
                   what="the source reported Completed")
    else:
        # The target resumes as soon as the record names it: Received may last less than a poll.
        wait_until(lambda: (lm().get("target") or {}).get("state") in ("Received", "Running"), 90, interval=0.05,
                   what="the target reported Received")
    pid = _vm_pid(stack, host)
    if pid is None:
        return ""
    before = lm()
    where = _progress(stack)
    os.kill(pid, signal.SIGKILL)
    # Whether the target had taken the guest as its own (``cont``: from there a crash reboots it)
    # before it died: its VM's files say so (read at once, before the agent clears the VM's
    # directory); the status read before the kill can be late.
    ran = ((before.get("target") or {}).get("state") == "Running" or before.get("phase") == "Completed"
           or _target_took_the_guest(stack, host))
    return f"killed at {where}" + (" (after the target ran)" if ran and case.component == "target-vm" else "")
