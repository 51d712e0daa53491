"""The qemu driver through the whole system: the operator, two agents running real QEMU
(TCG) and the real API server, driven as a user drives them (kubectl apply / patch).

What the guest shows is the evidence: the test guest (hack/guest/init) prints
"ferry-counter N" every ~100 ms on its serial console, and a migrated guest must keep
counting on the target without a second boot banner. The images are read from the
agents' data directories; VM processes from their pid files; everything else comes from
the API (LiveMigration status, the Droplet's record, Host.status.agent.vms).

Windows such as "mid-mirror" come from a bandwidth limit on an image filled with random
data before the guest boots (a sparse image mirrors its zeros almost for free).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import signal
import sys

import pytest
from guest_console import BOOT_BANNER, assert_continues
from qemu_support import (
    counters,
    fill_file,
    last_counter,
    monitor_state,
    serial_text,
    wait_counting,
)
from support import wait_until

from ferry.drivers.base import VMKey
from ferry.drivers.qemu import process
from ferry.drivers.qemu.config import VMLayout

sys.path.append(str(pathlib.Path(__file__).resolve().parents[1] / "integration"))
from stack import Stack  # noqa: E402

QEMU = os.environ.get("FERRY_QEMU_BINARY", "qemu-system-x86_64")

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(180)]

SCALE = 0.001  # s-1vcpu-512mb-10gb: 96 MiB of memory (the floor), a 16 MiB disk (the floor)
SIZE = "s-1vcpu-512mb-10gb"
DISK_BYTES = 16 << 20  # 10 GiB x 0.001 is below the driver's 16 MiB floor
BOOT_TIMEOUT = 60


def sha256_file(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def ferry_digest(path: pathlib.Path) -> str:
    """The digest the qemu driver reports, by an independent full read of the image."""
    from ferry.transfer.digest import image_root

    fd = os.open(path, os.O_RDONLY)
    try:
        return "sha256:" + image_root(fd, os.fstat(fd).st_size, 1 << 20).hex()
    finally:
        os.close(fd)


class QemuStack(Stack):
    """A Stack whose agents run the qemu driver on the test guest."""

    def __init__(self, ferry_process, kubectl, namespace: str, guest: dict[str, str]):
        super().__init__(ferry_process, kubectl, namespace, env={
            "FERRY_DRIVER": "qemu",
            "FERRY_QEMU_BINARY": QEMU,
            "FERRY_QEMU_KERNEL": guest["kernel"],
            "FERRY_QEMU_INITRD": guest["initrd"],
            "FERRY_QEMU_MAX_VCPUS": "1",
            "FERRY_SIZE_SCALE": str(SCALE),
        })

    def layout(self, host: str, droplet: str) -> VMLayout:
        return VMLayout.of(pathlib.Path(self.dirs[host]).resolve(), VMKey(self.ns, droplet))

    def agent_vms(self, host: str) -> dict[str, str]:
        """The VMs of this test's namespace as the host's agent reports them (name -> state)."""
        vms = ((self.get("host", host).get("status") or {}).get("agent") or {}).get("vms") or []
        return {v["name"]: v["state"] for v in vms if v["namespace"] == self.ns}

    def qemu_pid(self, host: str, droplet: str) -> int | None:
        """The live QEMU of this droplet on this host (pid file + command line check)."""
        return process.read_pid(self.layout(host, droplet))

    def place_on_first_host(self, name: str, *, power: str = "on", fill: bool = True) -> tuple[str, str]:
        """Host a with its agent and the operator; the droplet (its image filled with random
        bytes before the guest first boots) lands on a, the only host; then host b joins.
        Returns (a, b) once both are Ready and the droplet is placed (and running if on)."""
        a = self.host("a")
        self.start_operator()
        self.wait_hosts_ready()
        if fill:
            fill_file(self.layout(a, name).disk, DISK_BYTES)
        self.droplet(name, size=SIZE, power=power)
        wait_until(lambda: (self.get("droplet", name).get("status") or {}).get("host") == a, 30,
                   what=f"{name} placed on {a}")
        b = self.host("b")  # joins while the guest boots
        want = "Running" if power == "on" else "Stopped"
        wait_until(lambda: self.agent_vms(a).get(name) == want, 60, what=f"{name} {want} on {a}")
        self.wait_hosts_ready()
        if power == "on":
            serial = self.layout(a, name).serial
            wait_until(lambda: last_counter(serial) >= 3, BOOT_TIMEOUT, what="the guest to boot and count")
        return a, b

    def keeps_counting(self, host: str, droplet: str, more: int = 5, timeout: float = 30) -> None:
        layout = self.layout(host, droplet)
        start = last_counter(layout.serial)
        wait_counting(layout.serial, layout.qmp_aux, lambda c: c[-1] >= start + more, timeout,
                      what=f"{droplet} to count past {start + more} on {host}")

    def assert_runs_alone(self, host: str, droplet: str,
                          migration: tuple[str | None, ...] = (None, "cancelled", "failed")) -> None:
        """The droplet's QEMU on ``host`` runs its guest with no migration left attached:
        no block job, no NBD client node, no NBD export, no migration in flight."""
        st = monitor_state(self.layout(host, droplet).qmp_aux)
        assert st["status"] == "running", st
        assert st["jobs"] == [] and st["ferry_nodes"] == [] and st["exports"] == [], st
        assert st["migration"] in migration, st

    def assert_gone(self, host: str, droplet: str, pid: int | None) -> None:
        """No VM, no image, no QEMU of ``droplet`` left on ``host``."""
        layout = self.layout(host, droplet)
        wait_until(lambda: not layout.root.exists() and droplet not in self.agent_vms(host), 30,
                   what=f"{droplet}'s VM and image removed from {host}")
        if pid is not None:
            assert not process.is_ours(pid, layout), f"QEMU {pid} of {droplet} still runs on {host}"

    def record(self, droplet: str) -> tuple[str | None, str | None]:
        d = self.get("droplet", droplet)
        return (d.get("status") or {}).get("host"), (d["metadata"].get("labels") or {}).get("ferry.dev/host")

    def close(self) -> None:
        for p in [self.operator, self.metadata, *self.agents.values()]:
            if p is not None:
                p.stop()
        # QEMU runs in its own session (the process launcher): it outlives its agent, so it is
        # stopped here by its pid file's lock holder
        for d in self.dirs.values():
            for vm in sorted((pathlib.Path(d) / "vms").glob("*")):
                layout = VMLayout(vm.resolve())
                pid = process.read_pid(layout)
                if pid is not None:
                    process.kill(pid, layout)
            shutil.rmtree(d, ignore_errors=True)
        super().close()


@pytest.fixture
def stack(ferry_process, kubectl, namespace, guest):
    s = QemuStack(ferry_process, kubectl, namespace, guest)
    yield s
    s.close()


def test_live_migration_moves_the_running_guest(stack: QemuStack) -> None:
    a, b = stack.place_on_first_host("web")
    src_layout, dst_layout = stack.layout(a, "web"), stack.layout(b, "web")
    stack.migrate("web", limits={"bandwidthMiBps": 16})  # a window of seconds to hold the operator in

    # Hold the operator (SIGSTOP) once the copy has started: it cannot flip the record, so
    # the target cannot resume and the source cannot be destroyed. Both VMs then sit
    # paused at the switchover and their images can be compared byte for byte.
    stack.wait_phase("move", "PreCopy", timeout=60)
    os.kill(stack.operator.proc.pid, signal.SIGSTOP)
    try:
        assert stack.lm()["phase"] == "PreCopy", "the copy finished before the operator was held"
        st = wait_until(lambda: ((s := stack.lm()).get("transfer") or {}).get("state") == "Completed"
                        and (s.get("target") or {}).get("state") == "Received" and s, 90, interval=0.2,
                        what="source Completed and target Received")
        assert st["phase"] == "PreCopy"
        assert stack.record("web") == (a, a)
        src_mon, dst_mon = monitor_state(src_layout.qmp_aux), monitor_state(dst_layout.qmp_aux)
        assert src_mon["status"] == "postmigrate" and dst_mon["status"] == "paused", (src_mon, dst_mon)
        image = sha256_file(src_layout.disk)
        # the target froze its disk at the switchover: the raw image is the received one, the
        # guest's writes after the resume will go to the overlay; no digest in the pause
        assert sha256_file(dst_layout.disk) == image, "the disks differ at the switchover"
        assert st["target"].get("frozenPoint") is True and "digest" not in st["target"], st["target"]
        assert dst_layout.overlay.exists()
        digest = ferry_digest(src_layout.disk)
        st = wait_until(lambda: (s := stack.lm()).get("transfer", {}).get("digest") and s, 60, interval=0.2,
                        what="the paused source's digest (hashed after the switchover)")
        assert st["transfer"]["digest"] == digest and st["phase"] == "PreCopy"
        source_console = serial_text(src_layout.serial)  # final: the source never runs again
        frozen = last_counter(src_layout.serial)
        assert frozen >= 3
    finally:
        os.kill(stack.operator.proc.pid, signal.SIGCONT)

    st = stack.wait_phase("move", "Completed", timeout=60)
    assert st["sourceHost"] == a and st["targetHost"] == b
    assert st["transfer"]["digest"] == st["target"]["digest"] == digest
    v = st["verification"]
    assert (v["method"], v["state"], v["sourceDigest"], v["targetDigest"]) == ("frozen-point", "Verified", digest, digest)
    assert v["downtimeMs"] == st["downtimeMs"] and v["targetVerifyMs"] >= 0 and v["targetHashedBytes"] > 0
    assert [c for c in st["conditions"] if c["type"] == "Verified"][0]["status"] == "True"
    wait_until(lambda: not dst_layout.overlay.exists(), 30, what="the overlay merged back on the target")
    assert st["target"]["state"] == "Running" and st["progress"] == 100
    assert st["transfer"]["downtimeMs"] is not None and st["transfer"]["bytesSent"] > DISK_BYTES
    # the guest's whole pause: QEMU's STOP on the source (its event's stamp) to the resume on the target
    assert st["transfer"]["pausedAt"] and st["target"]["resumedAt"]
    assert st["guestPauseMs"] >= st["downtimeMs"], st
    assert stack.record("web") == (b, b)

    # the same guest counts on at the target: no gap, no repeat, no second boot
    wait_counting(dst_layout.serial, dst_layout.qmp_aux, lambda c: len(c) >= 10, 30, what="the target to count")
    target_console = serial_text(dst_layout.serial)
    assert_continues(frozen, target_console)
    seen = counters(source_console + target_console)
    assert seen == list(range(1, len(seen) + 1)), seen
    assert BOOT_BANNER in source_console  # the one boot, on the source

    # exactly one host has it: the target runs it, the source copy is gone
    wait_until(lambda: stack.agent_vms(b).get("web") == "Running", 20, what="target reports Running")
    stack.assert_gone(a, "web", None)
    assert stack.qemu_pid(b, "web") is not None
    stack.assert_runs_alone(b, "web", migration=("completed",))  # the incoming one, finished


def test_cancel_mid_mirror_keeps_the_guest_on_its_source(stack: QemuStack) -> None:
    a, b = stack.place_on_first_host("web")
    stack.migrate("web", limits={"bandwidthMiBps": 2})
    # mid-mirror: disk bytes moving, memory not started yet
    st = wait_until(lambda: (s := stack.lm()).get("phase") == "PreCopy"
                    and (t := s.get("transfer") or {}).get("disk", {}).get("sent", 0) > 0
                    and t.get("memory", {}).get("total", 0) == 0 and s, 60, interval=0.1,
                    what="the disk mirror under way")
    assert st["transfer"]["disk"]["remaining"] > 0
    target_pid = stack.qemu_pid(b, "web")
    assert target_pid is not None and stack.agent_vms(b).get("web") == "Incoming"

    stack.kubectl("patch", "lm", "move", "-n", stack.ns, "--type=merge", "-p", json.dumps({"spec": {"cancel": True}}))
    st = stack.wait_phase("move", "Cancelled", timeout=60)
    assert "keeps running" in st["message"]
    assert [x["result"] for x in st["attempts"]] == ["Cancelled"]
    assert stack.record("web") == (a, a)

    # the source runs on, alone, with the same guest; the target's VM and image are gone
    aborted = wait_until(lambda: (t := stack.lm().get("transfer") or {}).get("state") == "Aborted" and t, 20,
                         what="the source to report the copy aborted")
    assert aborted["disk"]["remaining"] > 0 and aborted["memory"]["sent"] == 0, aborted  # it was mid-mirror
    stack.assert_runs_alone(a, "web")
    stack.keeps_counting(a, "web")
    assert serial_text(stack.layout(a, "web").serial).count(BOOT_BANNER) == 1
    assert stack.agent_vms(a).get("web") == "Running"
    stack.assert_gone(b, "web", target_pid)


def test_killed_target_fails_the_migration_and_the_source_runs_on(stack: QemuStack) -> None:
    a, b = stack.place_on_first_host("web")
    stack.migrate("web", limits={"bandwidthMiBps": 2, "maxAttempts": 1})
    wait_until(lambda: (s := stack.lm()).get("phase") == "PreCopy"
               and (s.get("transfer") or {}).get("disk", {}).get("sent", 0) > 0, 60, interval=0.1,
               what="the copy under way")
    target_pid = stack.qemu_pid(b, "web")
    assert target_pid is not None
    os.kill(target_pid, signal.SIGKILL)

    st = stack.wait_phase("move", "Failed", timeout=60)
    assert st["reason"] == "AttemptsExhausted"
    assert [x["result"] for x in st["attempts"]] == ["Failed"]
    reason = st["failureReason"]
    # the target's own report wins: its agent sees QEMU's monitor close at once, the source's
    # mirror notices the dead NBD peer ~0.8 s later
    assert f"TargetFailed: target host {b} failed: target QEMU exited" in reason, reason
    assert "target QEMU exited" in (st["target"].get("error") or ""), st["target"]
    assert "keeps running on " + a in reason
    assert stack.record("web") == (a, a)

    stack.assert_runs_alone(a, "web")
    stack.keeps_counting(a, "web")
    assert serial_text(stack.layout(a, "web").serial).count(BOOT_BANNER) == 1
    assert stack.agent_vms(a).get("web") == "Running"
    conds = {c["type"]: c["status"] for c in stack.get("droplet", "web")["status"].get("conditions", [])}
    assert conds.get("OfflineMigrationNeeded") == "True"
    stack.assert_gone(b, "web", target_pid)


def test_offline_migration_of_a_stopped_droplet(stack: QemuStack) -> None:
    a, b = stack.place_on_first_host("db", power="off", fill=False)
    src_layout = stack.layout(a, "db")
    assert stack.qemu_pid(a, "db") is None  # powered off: an image, no process
    fill_file(src_layout.disk)  # what the droplet wrote before it was powered off
    image = sha256_file(src_layout.disk)
    digest = ferry_digest(src_layout.disk)
    assert src_layout.disk.stat().st_size == DISK_BYTES

    stack.migrate("db")
    st = stack.wait_phase("move", "Completed", timeout=90)
    assert st["effectiveMode"] == "offline"
    assert st["sourceHost"] == a and st["targetHost"] == b
    assert st["transfer"]["digest"] == st["target"]["digest"] == digest
    assert stack.record("db") == (b, b)

    dst_layout = stack.layout(b, "db")
    wait_until(lambda: stack.agent_vms(b).get("db") == "Stopped", 20, what="db Stopped on the target")
    assert stack.qemu_pid(b, "db") is None  # still powered off
    assert sha256_file(dst_layout.disk) == image
    assert BOOT_BANNER not in serial_text(dst_layout.serial)  # the guest never ran
    stack.assert_gone(a, "db", None)


@pytest.mark.timeout(600)
def test_a_byte_corrupted_on_the_target_of_a_one_gib_disk_fails_loudly_and_the_source_copy_is_kept(
        stack: QemuStack) -> None:
    """Through the operator: a 1.1 GiB disk (sparse, 64 MiB of data), one byte flipped on the
    target after the mirror copied it. The record moves on the frozen point and the guest runs
    on the target; then the digests differ: the migration fails VerificationFailed (Warning
    Events, the Verified condition False, the droplet's MigrationUnverified condition), the
    guest keeps running on the target and the source keeps its paused copy. The user keeps the
    target's copy by deleting the LiveMigration: the paused source copy is then removed."""
    stack.env["FERRY_SIZE_SCALE"] = "0.11"  # s-1vcpu-512mb-10gb: a 1.1 GiB disk
    # data near the start and a 128 MiB/s mirror: QEMU's rate limit counts the zeros too, so the
    # 1.1 GiB pass takes ~9 s (70 s at 16 MiB/s with the data in the middle); the flip lands
    # once the data's first MiB is on the target, while the mirror still goes through the zeros
    data_at, data = 16 << 20, os.urandom(64 << 20)
    a = stack.host("a")
    stack.start_operator()
    stack.wait_hosts_ready()
    disk = stack.layout(a, "big").disk
    disk.parent.mkdir(parents=True, exist_ok=True)
    with open(disk, "wb") as f:
        f.truncate(int(10 * 0.11 * (1 << 30)))
        f.seek(data_at)
        f.write(data)
    stack.droplet("big", size=SIZE)
    wait_until(lambda: (stack.get("droplet", "big").get("status") or {}).get("host") == a, 30, what="big placed")
    b = stack.host("b")
    wait_until(lambda: stack.agent_vms(a).get("big") == "Running", 60, what="big Running on a")
    stack.wait_hosts_ready()
    wait_until(lambda: last_counter(stack.layout(a, "big").serial) >= 3, BOOT_TIMEOUT, what="the guest to count")
    assert disk.stat().st_size >= 1 << 30
    stack.migrate("big", limits={"bandwidthMiBps": 128, "maxAttempts": 1})
    target_disk = stack.layout(b, "big").disk

    def copied() -> bool:
        try:
            with open(target_disk, "rb") as f:
                f.seek(data_at)
                return f.read(1 << 20) == data[: 1 << 20]
        except OSError:
            return False
    wait_until(copied, 180, interval=0.02, what="the mirror to copy the data's first MiB to the target")
    with open(target_disk, "r+b") as f:
        f.seek(data_at + 4321)
        f.write(bytes([data[4321] ^ 0x01]))
    st = stack.wait_phase("move", "Failed", timeout=240)
    assert st["reason"] == "VerificationFailed", (st["reason"], st.get("message"))
    v = st["verification"]
    assert v["state"] == "Mismatch" and v["method"] == "frozen-point" and v["sourceDigest"] != v["targetDigest"]
    cond = [c for c in st["conditions"] if c["type"] == "Verified"][0]
    assert (cond["status"], cond["reason"]) == ("False", "DigestMismatch")
    assert "kept paused on " + a in st["failureReason"] and "delete LiveMigration move" in st["failureReason"]
    assert any(e["type"] == "Warning" and e["reason"] == "VerificationFailed" for e in stack.events("LiveMigration", "move"))
    assert any(e["type"] == "Warning" for e in stack.events("Droplet", "big"))
    dconds = {c["type"]: c for c in (stack.get("droplet", "big").get("status") or {}).get("conditions", [])}
    assert dconds["MigrationUnverified"]["status"] == "True"
    # the record moved before the check: the guest runs on the target, the source copy stays paused
    assert stack.record("big") == (b, b)
    stack.keeps_counting(b, "big")
    assert stack.agent_vms(a).get("big") == "Paused" and stack.qemu_pid(a, "big") is not None
    print(f"\noperator, qemu 1.1 GiB disk, one target byte corrupted: Failed ({st['reason']}); downtime "
          f"{st['downtimeMs']} ms; after the resume: source hash {v.get('sourceVerifyMs')} ms, target hash "
          f"{v.get('targetVerifyMs')} ms; source copy kept paused on {a}")
    # still kept a while later (the agents run their cycles): nothing removes it on its own
    stack.keeps_counting(b, "big")
    assert stack.agent_vms(a).get("big") == "Paused"
    # the user keeps the target's copy: deleting the migration releases the paused source
    stack.kubectl("delete", "livemigration", "move", "-n", stack.ns)
    stack.assert_gone(a, "big", None)
    stack.keeps_counting(b, "big")


def test_agent_crashes_around_the_frozen_point_lose_nothing(stack: QemuStack) -> None:
    """Failpoints of the new step (docs/failpoints.md), each a crash of an agent (its QEMU runs
    on), the agent started again without it: the source's agent once the migration completed and
    before it hashed the paused disk; the target's agent once it froze the disk (before
    Received), after it hashed the frozen base (before the overlay is merged back), and before it
    reports that digest. The migration completes verified, the guest never reboots, the overlay
    is merged back and the source copy is removed."""
    a, b = stack.place_on_first_host("web")
    dst_layout = stack.layout(b, "web")
    stack.agents[a].stop()
    stack.agents[b].stop()
    src_agent = stack.start_agent(a, env={"FERRY_FAILPOINTS": "qemu.source-before-hash"})
    dst_agent = stack.start_agent(b, env={"FERRY_FAILPOINTS": "qemu.target-frozen"})
    stack.wait_hosts_ready()
    stack.migrate("web", limits={"bandwidthMiBps": 16})

    def crash(p, point: str) -> None:
        wait_until(lambda: p.proc.poll() is not None, 120, what=f"the agent to crash at {point}")
        assert p.proc.returncode == 86 and f"failpoint {point}" in p.log, p.log[-2000:]

    crash(dst_agent, "qemu.target-frozen")
    assert dst_layout.overlay.exists() and stack.lm()["phase"] == "PreCopy"
    dst_agent = stack.start_agent(b, env={"FERRY_FAILPOINTS": "qemu.target-before-commit"})
    crash(src_agent, "qemu.source-before-hash")
    wait_until(lambda: (stack.lm().get("target") or {}).get("frozenPoint"), 60, what="the target's frozen point reported")
    src_agent = stack.start_agent(a, env={"FERRY_FAILPOINTS": "source-agent.before-report-verified"})
    crash(src_agent, "source-agent.before-report-verified")
    stack.start_agent(a)
    crash(dst_agent, "qemu.target-before-commit")
    assert stack.record("web") == (b, b) and dst_layout.overlay.exists()
    stack.keeps_counting(b, "web")  # the guest runs on the target while its agent is away
    dst_agent = stack.start_agent(b, env={"FERRY_FAILPOINTS": "target-agent.before-report-verified"})
    crash(dst_agent, "target-agent.before-report-verified")
    assert stack.lm()["phase"] == "CutOver" and stack.lm()["verification"]["state"] == "Pending"
    stack.start_agent(b)
    st = stack.wait_phase("move", "Completed", timeout=120)
    v = st["verification"]
    assert v["state"] == "Verified" and v["sourceDigest"] == v["targetDigest"], v
    wait_until(lambda: not dst_layout.overlay.exists(), 60, what="the overlay merged back after the restarts")
    stack.assert_gone(a, "web", None)
    assert BOOT_BANNER not in serial_text(dst_layout.serial)  # the same guest, never rebooted
    stack.keeps_counting(b, "web")
