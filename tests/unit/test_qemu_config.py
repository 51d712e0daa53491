"""The qemu driver's pure parts: sizes, command line, addresses, PSK, VM states."""

from __future__ import annotations

import pathlib

import pytest

from ferry.drivers.base import VMKey, VMSpec, VMState
from ferry.drivers.qemu.config import (
    MIB,
    GuestSize,
    Nic,
    QemuConfig,
    VMLayout,
    build_argv,
    format_address,
    guest_size,
    nbd_port,
    parse_address,
    psk_file_text,
    psk_hex,
    safe_id,
)
from ferry.drivers.qemu.driver import vm_state
from ferry.drivers.qemu.sequence import disk_digest, mirror_buf_size

SPEC = VMSpec(key=VMKey("ns", "web-1"), cpu=2, memory_mib=4096, disk_gib=80)


@pytest.mark.parametrize(
    ("scale", "memory", "vcpus", "disk_mib"),
    [
        (1.0, 4096, 2, 80 * 1024),
        (0.5, 2048, 1, 40 * 1024),
        (0.001, 96, 1, 82),  # floors: memory 96 MiB, 1 vCPU; disk 80 GiB * 0.001 rounded up
        (0.0001, 96, 1, 16),
    ],
)
def test_guest_size_scales_with_floors(scale: float, memory: int, vcpus: int, disk_mib: int) -> None:
    size = guest_size(SPEC, QemuConfig(size_scale=scale, max_vcpus=8))
    assert size == GuestSize(memory_mib=memory, vcpus=vcpus, disk_bytes=disk_mib * MIB)


def test_guest_size_caps_vcpus_at_the_host() -> None:
    big = VMSpec(key=SPEC.key, cpu=8, memory_mib=16384, disk_gib=320)
    assert guest_size(big, QemuConfig(max_vcpus=2)).vcpus == 2


def test_argv_of_a_source_and_its_incoming_target_differ_only_in_incoming() -> None:
    config = QemuConfig(kernel="/k", initrd="/i", size_scale=0.001)
    layout = VMLayout.of(pathlib.Path("/data"), SPEC.key)
    size = guest_size(SPEC, config)
    source = build_argv(config, layout, size, "ns-web-1")
    target = build_argv(config, layout, size, "ns-web-1", incoming=True)
    assert target[: len(source)] == source
    assert target[len(source):] == ["-S", "-incoming", "defer"]
    joined = " ".join(source)
    assert "-accel tcg,tb-size=64" in joined and "-m 96" in joined and "-smp 1" in joined
    assert "-pidfile" in source  # its lock says whether QEMU runs
    assert "-daemonize" not in source  # QEMU stays in the foreground as its launcher's process
    assert "driver=file,filename=/data/vms/ns__web-1/disk.img" in joined
    assert "virtio-blk-pci,drive=disk0" in joined
    assert "-kernel /k" in joined and "-initrd /i" in joined
    assert "unix:qmp.sock,server=on,wait=off" in joined  # relative: QEMU starts in the VM dir
    assert "0.0.0.0" not in joined
    prelaunch = build_argv(config, layout, size, "x", prelaunch=True)
    assert prelaunch[-1] == "-S" and "-incoming" not in prelaunch


def test_argv_kvm_and_commas_in_paths() -> None:
    config = QemuConfig(accel="kvm", cpu_model="host")
    layout = VMLayout(pathlib.Path("/data/a,b"))
    argv = build_argv(config, layout, GuestSize(128, 1, 16 * MIB), "x")
    joined = " ".join(argv)
    assert "-accel kvm " in joined and "-cpu host" in joined and "-kernel" not in argv
    assert "filename=/data/a,,b/disk.img" in joined


def test_argv_with_a_nic_on_a_tap_and_the_address_on_the_kernel_command_line() -> None:
    config = QemuConfig(kernel="/k", initrd="/i", size_scale=0.001)
    layout = VMLayout.of(pathlib.Path("/data"), SPEC.key)
    size = guest_size(SPEC, config)
    nic = Nic(tap="ft0123456789ab", mac="52:aa:bb:cc:dd:ee", ip="10.250.0.210")
    argv = build_argv(config, layout, size, "ns-web-1", nic=nic)
    assert argv[argv.index("-netdev") + 1] == "tap,id=net0,ifname=ft0123456789ab,script=no,downscript=no"
    assert argv[argv.index("-device", argv.index("-netdev")) + 1] == "virtio-net-pci,netdev=net0,mac=52:aa:bb:cc:dd:ee,id=nic0"
    assert argv[argv.index("-append") + 1] == "console=ttyS0 quiet panic=-1 ferry.ip=10.250.0.210 ferry.tcp_port=7078"
    # the target's command line: the same NIC (its own tap), paused for the incoming stream
    target = build_argv(config, layout, size, "ns-web-1", incoming=True, nic=nic)
    assert target[: len(argv)] == argv
    assert "-netdev" not in build_argv(config, layout, size, "ns-web-1")


@pytest.mark.parametrize(
    ("address", "expected"),
    [("127.0.0.1:4000", ("127.0.0.1", 4000)), ("[::1]:80", ("::1", 80)), ("host.example:1", ("host.example", 1))],
)
def test_parse_address(address: str, expected: tuple[str, int]) -> None:
    assert parse_address(address) == expected
    assert parse_address(format_address(*expected)) == expected


@pytest.mark.parametrize("bad", ["127.0.0.1", ":80", "h:", "h:x", "h:0", "h:70000"])
def test_parse_address_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_address(bad)


def test_nbd_listens_next_to_the_migration_port() -> None:
    assert nbd_port(4000) == 4001


def test_psk_is_derived_per_secret_and_migration() -> None:
    k = psk_hex(b"s" * 32, "m1")
    assert len(k) == 64 and int(k, 16) >= 0
    assert psk_hex(b"s" * 32, "m1") == k
    assert psk_hex(b"t" * 32, "m1") != k
    assert psk_hex(b"s" * 32, "m2") != k
    assert psk_file_text(b"s" * 32, "m1") == f"ferry:{k}\n"
    assert b"s" * 32 not in psk_file_text(b"s" * 32, "m1").encode()  # the secret itself never lands on disk


def test_safe_id() -> None:
    assert safe_id("lm-1/attempt 2") == "lm-1-attempt-2"
    assert safe_id("1abc")[0].isalpha()
    assert len(safe_id("x" * 200)) <= 49


def test_config_from_env() -> None:
    env = {
        "FERRY_QEMU_KERNEL": "/boot/vmlinuz",
        "FERRY_QEMU_INITRD": "/boot/initrd",
        "FERRY_SIZE_SCALE": "0.01",
        "FERRY_QEMU_BINARY": "/opt/qemu",
        "FERRY_QEMU_ACCEL": "kvm",
        "FERRY_QEMU_EXTRA_ARGS": "-cpu host",
    }
    c = QemuConfig.from_env(env)
    assert (c.kernel, c.initrd, c.size_scale, c.binary, c.accel) == ("/boot/vmlinuz", "/boot/initrd", 0.01,
                                                                      "/opt/qemu", "kvm")
    assert c.extra_args == ("-cpu", "host")
    assert QemuConfig.from_env({}, size_scale=0.5).size_scale == 0.5
    with pytest.raises(ValueError, match="FERRY_SIZE_SCALE"):
        QemuConfig.from_env({"FERRY_SIZE_SCALE": "big"})
    with pytest.raises(ValueError):
        QemuConfig.from_env({"FERRY_QEMU_INITRD": "/i"})  # an initrd without a kernel
    with pytest.raises(ValueError):
        QemuConfig(mirror_copy_mode="sometimes").validate()


def test_driver_from_settings(tmp_path: pathlib.Path) -> None:
    from ferry.drivers.qemu import QemuDriver
    from ferry.settings import Settings

    d = QemuDriver.from_settings(Settings(size_scale=0.25, driver="qemu"), tmp_path,
                                 environ={"FERRY_QEMU_KERNEL": "/k"})
    assert d.name == "qemu" and d.config.size_scale == 0.25 and d.config.kernel == "/k"
    assert d.list_vms() == []
    assert (tmp_path / "vms").is_dir()


@pytest.mark.parametrize(
    ("alive", "runstate", "meta", "expected"),
    [
        (False, None, {}, VMState.STOPPED),
        (False, None, {"role": "target"}, VMState.INCOMING),  # died: its migration says FAILED
        (True, "running", {}, VMState.RUNNING),
        (True, "paused", {}, VMState.PAUSED),
        (True, "postmigrate", {"role": "source"}, VMState.PAUSED),
        (True, "inmigrate", {"role": "target"}, VMState.INCOMING),
        (True, "paused", {"role": "target"}, VMState.INCOMING),
        (True, "prelaunch", {"role": "source", "offline_source": True}, VMState.STOPPED),
        (True, "shutdown", {}, VMState.STOPPED),
        (True, None, {}, VMState.PAUSED),  # monitor unreachable: not claimed to run
    ],
)
def test_vm_state(alive: bool, runstate: str | None, meta: dict, expected: VMState) -> None:
    assert vm_state(alive, runstate, meta) == expected


def test_mirror_buf_size() -> None:
    assert mirror_buf_size(2 * MIB) == 1 * MIB
    assert mirror_buf_size(32 * MIB) == 16 * MIB
    assert mirror_buf_size(1000) == 1 * MIB
    assert mirror_buf_size(10 * MIB) == 4 * MIB  # 5 MiB rounded down to a power of two


def test_disk_digest(tmp_path: pathlib.Path) -> None:
    a = tmp_path / "a"
    b = tmp_path / "b"
    a.write_bytes(b"x" * 1000 + bytes(24))
    b.write_bytes(b"x" * 1000)  # shorter file: the tail reads as zeros
    assert disk_digest(a, 1024)[0] == disk_digest(b, 1024)[0]
    assert disk_digest(a, 1024)[0].startswith("sha256:")
    b.write_bytes(b"y" * 1000)
    assert disk_digest(a, 1024)[0] != disk_digest(b, 1024)[0]


def test_disk_digest_of_a_big_sparse_disk_is_real(tmp_path: pathlib.Path) -> None:
    """No size above which the digest stops looking at the data (the old ``token:``)."""
    size = 3 << 30
    a, b = tmp_path / "a", tmp_path / "b"
    for p in (a, b):
        with open(p, "wb") as f:
            f.truncate(size)
            f.seek(size - (5 << 20))
            f.write(b"guest data" * 1000)
    assert disk_digest(a, size)[0] == disk_digest(b, size)[0]
    with open(b, "r+b") as f:
        f.seek(size - (5 << 20) + 4321)
        f.write(b"\x00")
    assert disk_digest(a, size)[0] != disk_digest(b, size)[0]
    digest, ms = disk_digest(a, size)
    assert digest.startswith("sha256:") and not digest.startswith("token:") and ms >= 0


class _RecordingQMP:
    def __init__(self):
        self.calls = []

    def execute(self, command, args=None, **_kw):
        self.calls.append((command, args))
        return {}


def _source(tmp_path, **options):
    from ferry.drivers.base import MigrationOptions
    from ferry.drivers.qemu.config import QemuConfig, VMLayout
    from ferry.drivers.qemu.sequence import SourceMigration

    qmp = _RecordingQMP()
    m = SourceMigration(migration_id="ns/m#1", layout=VMLayout(tmp_path), config=QemuConfig(), qmp=qmp,
                        target_host="127.0.0.1", target_port=1, secret=b"k" * 32,
                        options=MigrationOptions(**options), disk_bytes=1 << 20, offline=False,
                        stop_vm=lambda: None)
    return m, qmp


def _round(m, rnd, remaining, throttle, bw=10 << 20):
    from ferry.drivers.base import TransferCounters

    st = m.tracker.stats
    st.round, st.memory, st.bandwidth_bps, st.throttle_percent = rnd, TransferCounters(1, 1, remaining), bw, throttle
    m._downtime_step()


def test_qemu_downtime_steps_then_not_converging(tmp_path):
    """Auto-converge at 99 % and the rest still 3 s at the link: the downtime-limit goes up in
    steps to the ceiling (migrate-set-parameters), then the attempt fails NotConverging."""
    from ferry.drivers.base import DriverError

    m, qmp = _source(tmp_path, downtime_budget_ms=100, max_downtime_ms=500)
    limits = []
    with pytest.raises(DriverError, match="^NotConverging: .*ceiling 500 ms"):
        for rnd in range(2, 40):
            _round(m, rnd, 30 << 20, 99)
            limits = [a["downtime-limit"] for c, a in qmp.calls if c == "migrate-set-parameters"]
    assert limits == [200, 300, 400, 500]
    assert m.tracker.stats.downtime_steps == 4 and m.tracker.stats.allowed_downtime_ms == 500


def test_qemu_no_steps_while_auto_converge_still_ramps(tmp_path):
    m, qmp = _source(tmp_path, downtime_budget_ms=100, max_downtime_ms=500)
    for rnd, thr in zip(range(2, 10), (20, 30, 40, 50, 60, 70, 80, 90)):
        _round(m, rnd, 30 << 20, thr)
    assert qmp.calls == [] and m.tracker.stats.downtime_steps == 0
