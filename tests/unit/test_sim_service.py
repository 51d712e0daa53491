"""The sim guest's UDP service (ferry.drivers.sim.service) through a migration between two
SimDrivers on loopback: the running guest answers on its droplet's address, a paused one does
not, and after the move the target's guest answers with the same boot and a seq that went on."""

import json
import os
import socket

import pytest
from support import wait_until

from ferry.drivers.base import MigrationOptions, MigrationState, VMKey, VMSpec, Workload
from ferry.drivers.sim import SimDriver

SCALE = 1 / 512
KEY = VMKey("prod", "web-1")
MiB = 1 << 20


def free_udp_port(ip: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def ask(ip: str, port: int, text: str = "probe", timeout: float = 0.2) -> dict | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(text.encode(), (ip, port))
        try:
            return json.loads(s.recv(1024))
        except (TimeoutError, socket.timeout):
            return None


@pytest.fixture
def service():
    ip = f"127.{os.getpid() % 200 + 20}.{os.getpid() // 200 % 250}.{7}"
    return ip, free_udp_port(ip)


@pytest.fixture
def hosts(tmp_path, service):
    _, port = service
    src = SimDriver(str(tmp_path / "host-a"), size_scale=SCALE, service_port=port, host="host-a")
    dst = SimDriver(str(tmp_path / "host-b"), size_scale=SCALE, service_port=port, host="host-b")
    yield src, dst
    for d in (src, dst):
        for vm in d.list_vms():
            d.destroy(vm.key)


def test_the_guest_answers_while_it_runs_and_the_target_answers_after_the_move(hosts, service):
    src, dst = hosts
    ip, port = service
    spec = VMSpec(key=KEY, cpu=1, memory_mib=1024, disk_gib=1, workload=Workload("uniform", 512), ip=ip)
    src.start(spec)
    first = wait_until(lambda: ask(ip, port, "one"), 10, what="the guest's service to answer")
    assert first["droplet"] == "prod/web-1" and first["host"] == "host-a" and first["echo"] == "one"
    assert first["boot"] == 1
    src.pause(KEY)
    wait_until(lambda: src.status(KEY)["service"]["bound"] is False, 5, what="paused guest's socket closed")
    assert ask(ip, port) is None, "a paused guest answered"
    src.execute(KEY, "cont")
    before = wait_until(lambda: ask(ip, port), 5, what="the resumed guest to answer")

    secret = os.urandom(32)
    addr = dst.prepare_incoming(spec, "127.0.0.1", secret, "lm-net")
    # an incoming VM must not answer: the source still does, and only it
    assert {wait_until(lambda: ask(ip, port), 5, what="an answer")["host"] for _ in range(5)} == {"host-a"}
    src.start_migration(KEY, addr, secret, "lm-net", MigrationOptions(downtime_budget_ms=50))
    wait_until(lambda: src.query_migration(KEY).state is MigrationState.COMPLETED, 30, what="copy completed")
    assert ask(ip, port) is None, "the paused source (or the unresumed target) answered"
    dst.resume(KEY)
    after = wait_until(lambda: ask(ip, port), 5, what="the target's guest to answer")
    assert after["host"] == "host-b" and after["droplet"] == "prod/web-1"
    assert after["boot"] == before["boot"] == 1, "the guest rebooted in the move"
    assert after["seq"] >= before["seq"]
    # counted after the answer is sent: the client can read it before the guest counts it
    wait_until(lambda: dst.status(KEY)["service"]["answered"] >= 1, 5, what="the target's guest to count its answer")


def test_no_address_no_service(hosts):
    src, _ = hosts
    src.start(VMSpec(key=KEY, cpu=1, memory_mib=1024, disk_gib=1))
    assert src.status(KEY)["service"] is None
