"""SimDriver lifecycle: VM processes, control socket, re-attach, stop/destroy."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
from support import wait_until

from ferry.drivers.base import Driver, DriverError, VMKey, VMSpec, VMState, Workload
from ferry.drivers.sim import SimDriver

SCALE = 1 / 512  # 1 GiB disk -> 2 MiB, 1024 MiB memory -> 2 MiB
KEY = VMKey("team-a", "web-1")


def spec(key=KEY, rate=1024, pattern="uniform", power_on=True):
    return VMSpec(key=key, cpu=1, memory_mib=1024, disk_gib=1, workload=Workload(pattern, rate), power_on=power_on)


@pytest.fixture
def driver(tmp_path):
    d = SimDriver(str(tmp_path / "host"), size_scale=SCALE, write_log=True)
    yield d
    for vm in d.list_vms():
        d.destroy(vm.key)


def raw_control(path, line: bytes) -> dict:
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.sendall(line)
    buf = b""
    while not buf.endswith(b"\n"):
        buf += s.recv(65536)
    s.close()
    return json.loads(buf)


def test_implements_the_driver_protocol(driver):
    assert isinstance(driver, Driver) and driver.name == "sim"


def test_start_creates_a_vm_process_with_its_files(driver):
    info = driver.start(spec())
    assert info.state is VMState.RUNNING and info.pid
    d = driver.vm_dir(KEY)
    assert d.endswith("vms/team-a__web-1")
    for name in ("vm.json", "disk.img", "mem.img", "control.sock", "pid", "log"):
        assert os.path.exists(os.path.join(d, name)), name
    assert os.path.getsize(os.path.join(d, "disk.img")) == 2 << 20
    assert os.path.getsize(os.path.join(d, "mem.img")) == 2 << 20
    assert oct(os.stat(os.path.join(d, "control.sock")).st_mode & 0o777) == "0o600"
    # its own process, its own session
    assert info.pid != os.getpid() and os.getsid(info.pid) == info.pid
    # the guest writes
    wait_until(lambda: driver.status(KEY)["seq"] > 10, what="guest writes")
    assert os.path.getsize(os.path.join(d, "writes.log")) > 0
    # idempotent
    assert driver.start(spec()).pid == info.pid


def test_control_protocol(driver):
    driver.start(spec(rate=0))
    path = os.path.join(driver.vm_dir(KEY), "control.sock")
    ok = raw_control(path, b'{"execute": "query-status"}\n')
    assert ok["return"]["status"] == "running" and ok["return"]["key"] == {"namespace": "team-a", "name": "web-1"}
    err = raw_control(path, b'{"execute": "no-such-thing"}\n')
    assert err["error"]["class"] == "CommandNotFound"
    err = raw_control(path, b"this is not json\n")
    assert "error" in err
    err = raw_control(path, b'{"execute": "set-workload", "arguments": {"pattern": "zigzag"}}\n')
    assert err["error"]["class"] == "InvalidParameter"
    assert raw_control(path, b'{"execute": "stop"}\n') == {"return": {}}
    assert raw_control(path, b'{"execute": "query-status"}\n')["return"]["status"] == "paused"
    assert driver.list_vms()[0].state is VMState.PAUSED
    assert raw_control(path, b'{"execute": "cont"}\n') == {"return": {}}
    assert driver.list_vms()[0].state is VMState.RUNNING
    assert raw_control(path, b'{"execute": "query-migrate"}\n')["return"]["state"] == "None"
    with pytest.raises(DriverError, match="pattern"):
        driver.set_workload(KEY, pattern="zigzag")


def test_reattach_after_agent_restart(driver, tmp_path):
    """A VM started by another (now dead) agent process keeps running and is found."""
    code = (
        "from ferry.drivers.sim import SimDriver; from ferry.drivers.base import *;"
        f"d = SimDriver({str(tmp_path / 'host')!r}, size_scale={SCALE});"
        "print(d.start(VMSpec(VMKey('team-a','db'), 1, 1024, 1, Workload('hotspot', 512))).pid)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    pid = int(out.stdout.strip())
    # the "agent" exited; the VM runs on
    fresh = SimDriver(str(tmp_path / "host"), size_scale=SCALE)
    vms = {v.key: v for v in fresh.list_vms()}
    db = vms[VMKey("team-a", "db")]
    assert db.state is VMState.RUNNING and db.pid == pid
    seq = fresh.status(db.key)["seq"]
    wait_until(lambda: fresh.status(db.key)["seq"] > seq, what="guest still writing")
    fresh.destroy(db.key)
    assert not os.path.exists(fresh.vm_dir(db.key))
    wait_until(lambda: not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split(") ")[1][0] in "ZX",
               what="VM process gone")


def test_liveness_is_the_vms_lock_not_its_pid_file(driver):
    """A VM process in another pid namespace (a launcher pod) has a pid that means nothing
    here: the VM's lock decides whether it lives, and a killed VM is never attached."""
    info = driver.start(spec(rate=0))
    pid_file = os.path.join(driver.vm_dir(KEY), "pid")
    with open(pid_file, "w") as f:
        f.write("1")  # what a pod's VM process writes: its own pid 1
    assert driver.list_vms()[0].state is VMState.RUNNING
    os.kill(info.pid, signal.SIGKILL)
    wait_until(lambda: driver.list_vms()[0].state is VMState.STOPPED, what="killed VM seen as stopped")
    assert os.path.exists(os.path.join(driver.vm_dir(KEY), "lock"))  # the file stays; the lock went with the process


def test_stop_keeps_images_and_start_continues(driver):
    info = driver.start(spec(rate=2048))
    wait_until(lambda: driver.status(KEY)["seq"] > 20)
    driver.stop(KEY)
    assert driver.list_vms() == [type(info)(key=KEY, state=VMState.STOPPED)]
    d = driver.vm_dir(KEY)
    assert os.path.exists(os.path.join(d, "disk.img")) and not os.path.exists(os.path.join(d, "control.sock"))
    seq = json.load(open(os.path.join(d, "guest.json")))["seq"]
    assert seq > 20
    driver.stop(KEY)  # idempotent
    info2 = driver.start(spec(rate=2048))
    assert info2.state is VMState.RUNNING and info2.pid != info.pid
    assert driver.status(KEY)["seq"] >= seq  # continues, never reuses sequence numbers


def test_power_off_spec_creates_no_process(driver):
    info = driver.start(spec(power_on=False))
    assert info.state is VMState.STOPPED and info.pid is None
    assert [v.state for v in driver.list_vms()] == [VMState.STOPPED]


def test_destroy_removes_everything(driver):
    info = driver.start(spec())
    driver.destroy(KEY)
    assert not os.path.exists(driver.vm_dir(KEY))
    assert driver.list_vms() == []
    driver.destroy(KEY)  # idempotent
    wait_until(lambda: not os.path.exists(f"/proc/{info.pid}") or "Z" in open(f"/proc/{info.pid}/stat").read().split(") ")[1][:1])


def test_incoming_vm_cannot_be_started_or_resumed_early(driver, tmp_path):
    addr = driver.prepare_incoming(spec(), "127.0.0.1", os.urandom(32), "lm-7")
    host, port = addr.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0
    assert [v.state for v in driver.list_vms()] == [VMState.INCOMING]
    assert driver.list_vms()[0].migration_id == "lm-7"
    with pytest.raises(DriverError, match="not received"):
        driver.resume(KEY)
    # idempotent for the same migration
    assert driver.prepare_incoming(spec(), "127.0.0.1", os.urandom(32), "lm-7") == addr
    # the process dies: its partial images must never be started as the droplet
    os.kill(driver.list_vms()[0].pid, 9)
    wait_until(lambda: driver.list_vms()[0].pid is None, what="incoming VM gone")
    assert driver.list_vms()[0].state is VMState.INCOMING
    with pytest.raises(DriverError, match="incoming"):
        driver.start(spec())
    driver.destroy(KEY)
    assert driver.list_vms() == []


def test_prepare_incoming_refuses_to_overwrite_a_running_vm(driver):
    driver.start(spec())
    with pytest.raises(DriverError, match="runs here"):
        driver.prepare_incoming(spec(), "127.0.0.1", os.urandom(32), "lm-1")
    assert driver.list_vms()[0].state is VMState.RUNNING


def test_query_and_cancel_without_migration(driver):
    driver.start(spec(rate=0))
    st = driver.query_migration(KEY)
    assert st.state.value == "None"
    driver.cancel_migration(KEY)  # no-op
    assert driver.query_migration(VMKey("x", "missing")).state.value == "None"


def test_never_two_vm_processes_for_one_vm(driver):
    driver.start(spec(rate=0))
    d = driver.vm_dir(KEY)
    second = subprocess.run([sys.executable, "-m", "ferry.drivers.sim.vm", "--dir", d], capture_output=True, text=True, timeout=30)
    assert second.returncode == 3 and "another VM process" in second.stderr
    assert driver.list_vms()[0].state is VMState.RUNNING


def test_prepare_incoming_never_overwrites_a_stopped_vm(driver):
    driver.start(spec(rate=4096))
    wait_until(lambda: driver.status(KEY)["seq"] > 5)
    driver.stop(KEY)
    before = open(os.path.join(driver.vm_dir(KEY), "disk.img"), "rb").read()
    with pytest.raises(DriverError, match="not overwriting"):
        driver.prepare_incoming(spec(), "127.0.0.1", os.urandom(32), "lm-x")
    assert open(os.path.join(driver.vm_dir(KEY), "disk.img"), "rb").read() == before


def test_long_names_beyond_the_unix_socket_path_limit(driver):
    key = VMKey("n" * 63, "droplet-" + "x" * 120)
    assert len(os.path.join(driver.vm_dir(key), "control.sock")) > 108
    info = driver.start(spec(key=key, rate=256))
    assert info.state is VMState.RUNNING
    assert [v.key for v in driver.list_vms()] == [key]
    driver.destroy(key)
    assert driver.list_vms() == []


def test_a_crashed_vm_boots_again_from_disk_with_empty_memory(driver, tmp_path):
    """Like a real guest: SIGKILL loses the memory (the disk survives), the guest boots again
    with a new boot number, and the write log says where the memory was lost, so a replay
    of every acknowledged write still rebuilds exactly what runs."""
    from ferry.drivers.sim.workload import MEMORY_LOST, read_log, replay

    info = driver.start(spec(rate=4096))
    wait_until(lambda: driver.status(KEY)["seq"] > 200, what="guest writes")
    assert driver.status(KEY)["boot"] == 1
    d = driver.vm_dir(KEY)
    os.kill(info.pid, 9)
    wait_until(lambda: driver.status(KEY) is None, what="the VM process gone")
    disk_before = open(os.path.join(d, "disk.img"), "rb").read()
    assert any(open(os.path.join(d, "mem.img"), "rb").read())
    driver.start(spec(rate=0))  # no new writes: what runs is exactly what was left
    st = driver.status(KEY)
    assert st["boot"] == 2 and st["memory_lost"] is True
    assert not any(open(os.path.join(d, "mem.img"), "rb").read()), "the memory survived the crash"
    assert open(os.path.join(d, "disk.img"), "rb").read() == disk_before, "the disk must survive"
    kinds = [r[1] for r in read_log(os.path.join(d, "writes.log"))]
    assert kinds[-1] == MEMORY_LOST and kinds.count(MEMORY_LOST) == 1
    replay(os.path.join(d, "writes.log"), str(tmp_path / "rd"), str(tmp_path / "rm"), len(disk_before),
           os.path.getsize(os.path.join(d, "mem.img")))
    assert (tmp_path / "rm").read_bytes() == open(os.path.join(d, "mem.img"), "rb").read()
    # an orderly stop is a managed save: the memory stays, no new boot
    driver.set_workload(KEY, write_rate_kibps=4096)
    wait_until(lambda: driver.status(KEY)["seq"] > st["seq"] + 100, what="guest writes again")
    driver.stop(KEY)
    mem = open(os.path.join(d, "mem.img"), "rb").read()
    driver.start(spec(rate=0))
    assert driver.status(KEY)["boot"] == 2 and driver.status(KEY)["memory_lost"] is False
    assert open(os.path.join(d, "mem.img"), "rb").read() == mem
