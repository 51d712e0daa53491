"""Configuration of the qemu driver and the pure functions derived from it.

Everything here is plain data: the scaled guest size of a droplet, the files of a VM
under the data directory, the QEMU command line, the PSK derived from a migration's
secret, and address parsing. No process is started and no file is touched here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import math
import os
import pathlib
from collections.abc import Mapping
from typing import Any

from ferry.drivers.base import VMKey, VMSpec

MIB = 1 << 20

# QEMU's "unlimited" migration bandwidth (its own default is 128 MiB/s, not unlimited).
UNLIMITED_BANDWIDTH = 1 << 40

PSK_USERNAME = "ferry"


@dataclasses.dataclass(frozen=True)
class QemuConfig:
    """How the driver runs QEMU. ``from_env`` reads the ``FERRY_QEMU_*`` variables."""

    binary: str = "qemu-system-x86_64"
    kernel: str | None = None  # None: boot from the disk image (firmware boot)
    initrd: str | None = None
    append: str = "console=ttyS0 quiet panic=-1"
    accel: str = "tcg"  # "kvm" in production
    machine: str = "pc"  # pin a versioned type (e.g. pc-i440fx-7.2) across mixed QEMU versions
    cpu_model: str | None = None  # None: QEMU's default for the accelerator
    size_scale: float = 1.0
    min_memory_mib: int = 96  # Debian's kernel does not boot in 64 MiB under SeaBIOS
    min_disk_mib: int = 16
    max_vcpus: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)
    tb_size_mib: int = 64  # TCG translation cache (QEMU's default is 1 GiB)
    mirror_copy_mode: str = "background"  # or "write-blocking" (libvirt's synchronous writes)
    qmp_timeout: float = 10.0
    stop_timeout: float = 10.0
    launch_timeout: float = 30.0  # until QEMU's monitor answers (the agent gives a launcher pod 120 s)
    extra_args: tuple[str, ...] = ()
    #: the guest's TCP echo service port (the test guest's ferry.tcp_port; docs only otherwise)
    tcp_port: int = 7078

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> QemuConfig:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        names = {
            "FERRY_QEMU_BINARY": ("binary", str),
            "FERRY_QEMU_KERNEL": ("kernel", str),
            "FERRY_QEMU_INITRD": ("initrd", str),
            "FERRY_QEMU_APPEND": ("append", str),
            "FERRY_QEMU_ACCEL": ("accel", str),
            "FERRY_QEMU_MACHINE": ("machine", str),
            "FERRY_QEMU_CPU": ("cpu_model", str),
            "FERRY_SIZE_SCALE": ("size_scale", float),
            "FERRY_QEMU_MIN_MEMORY_MIB": ("min_memory_mib", int),
            "FERRY_QEMU_MAX_VCPUS": ("max_vcpus", int),
            "FERRY_QEMU_MIRROR_COPY_MODE": ("mirror_copy_mode", str),
        }
        for var, (field, cast) in names.items():
            raw = env.get(var)
            if raw not in (None, ""):
                try:
                    values[field] = cast(raw)
                except ValueError as exc:
                    raise ValueError(f"{var}={raw!r}: {exc}") from None
        if env.get("FERRY_QEMU_EXTRA_ARGS"):
            values["extra_args"] = tuple(env["FERRY_QEMU_EXTRA_ARGS"].split())
        values.update({k: v for k, v in overrides.items() if v is not None})
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        if self.size_scale <= 0:
            raise ValueError("size_scale must be positive")
        if self.mirror_copy_mode not in ("background", "write-blocking"):
            raise ValueError(f"mirror_copy_mode must be background or write-blocking, not {self.mirror_copy_mode!r}")
        if self.initrd and not self.kernel:
            raise ValueError("an initrd needs a kernel")
        if self.max_vcpus < 1 or self.min_memory_mib < 1 or self.min_disk_mib < 1:
            raise ValueError("max_vcpus, min_memory_mib and min_disk_mib must be at least 1")


@dataclasses.dataclass(frozen=True)
class Nic:
    """A guest's virtio-net NIC: on the tap ``tap`` (the node's, per VM), with the droplet's
    ``mac`` (the same on every host) and ``ip`` (handed to the guest on the kernel command line
    as ``ferry.ip``, with ``ferry.tcp_port``, when QEMU boots a kernel directly)."""

    tap: str
    mac: str
    ip: str
    tcp_port: int = 7078


@dataclasses.dataclass(frozen=True)
class GuestSize:
    memory_mib: int
    vcpus: int
    disk_bytes: int


def guest_size(spec: VMSpec, config: QemuConfig) -> GuestSize:
    """The droplet's size scaled by ``size_scale``, with floors (and a vCPU cap)."""
    memory = max(config.min_memory_mib, math.ceil(spec.memory_mib * config.size_scale))
    vcpus = max(1, min(config.max_vcpus, math.floor(spec.cpu * config.size_scale + 0.5)))
    disk_mib = max(config.min_disk_mib, math.ceil(spec.disk_gib * 1024 * config.size_scale))
    return GuestSize(memory_mib=memory, vcpus=vcpus, disk_bytes=disk_mib * MIB)


@dataclasses.dataclass(frozen=True)
class VMLayout:
    """The files of one VM: ``<data_dir>/vms/<ns>__<name>/``."""

    root: pathlib.Path

    @classmethod
    def of(cls, data_dir: pathlib.Path, key: VMKey) -> VMLayout:
        return cls(pathlib.Path(data_dir) / "vms" / key.dirname)

    @property
    def disk(self) -> pathlib.Path:
        return self.root / "disk.img"

    @property
    def qmp(self) -> pathlib.Path:
        return self.root / "qmp.sock"

    @property
    def qmp_aux(self) -> pathlib.Path:
        """A second monitor for people and tests (the driver keeps qmp.sock connected)."""
        return self.root / "qmp-aux.sock"

    @property
    def serial(self) -> pathlib.Path:
        return self.root / "serial.log"

    @property
    def pidfile(self) -> pathlib.Path:
        return self.root / "qemu.pid"

    @property
    def stderr(self) -> pathlib.Path:
        return self.root / "qemu.stderr"

    @property
    def meta(self) -> pathlib.Path:
        return self.root / "vm.json"

    @property
    def overlay(self) -> pathlib.Path:
        """The target's qcow2 overlay between the switchover and the end of its verification
        (the raw ``disk.img`` is its frozen backing file meanwhile)."""
        return self.root / "frozen.qcow2"

    @property
    def migration(self) -> pathlib.Path:
        return self.root / "migration.json"

    def tls_dir(self, migration_id: str) -> pathlib.Path:
        return self.root / f"tls-{safe_id(migration_id)}"


def safe_id(text: str) -> str:
    """A QEMU-id-safe rendering of ``text`` (letters, digits, '-', '_'; starts with a letter)."""
    out = "".join(c if c.isalnum() or c in "-_" else "-" for c in text)[:48]
    return out if out[:1].isalpha() else "m" + out


def build_argv(
    config: QemuConfig,
    layout: VMLayout,
    size: GuestSize,
    name: str,
    *,
    incoming: bool = False,
    prelaunch: bool = False,
    nic: Nic | None = None,
) -> list[str]:
    """The QEMU command line of a VM; the same for a source and its incoming target.

    ``incoming``: ``-S -incoming defer`` (libvirt's target: paused until told to ``cont``).
    ``prelaunch``: ``-S`` only (a stopped droplet's disk served for an offline migration,
    the guest never runs).
    """
    accel = config.accel
    if accel == "tcg" and config.tb_size_mib:
        accel = f"tcg,tb-size={config.tb_size_mib}"
    argv = [
        config.binary,
        "-name", f"{name},debug-threads=on",
        "-accel", accel,
        "-machine", config.machine,
        "-m", str(size.memory_mib),
        "-smp", str(size.vcpus),
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-blockdev", f"driver=file,filename={_opt(layout.disk)},node-name=file0,cache.direct=off",
        "-blockdev", "driver=raw,file=file0,node-name=disk0",
        "-device", "virtio-blk-pci,drive=disk0,id=vda",
        "-chardev", f"file,id=serial0,path={_opt(layout.serial)},append=on",
        "-serial", "chardev:serial0",
        # unix socket paths are limited to 107 bytes: QEMU starts in the VM's directory
        # (the launcher's working directory) and binds them relative to it; clients connect
        # through /proc/self/fd (qmp.connect_unix)
        "-qmp", f"unix:{layout.qmp.name},server=on,wait=off",
        "-qmp", f"unix:{layout.qmp_aux.name},server=on,wait=off",
        # locked by QEMU while it runs: the agent's "is it alive", across pid namespaces
        # (process.running). No -daemonize: QEMU stays in the foreground as its launcher's
        # process (a plain process in its own session, or a launcher pod's one process).
        "-pidfile", str(layout.pidfile),
    ]
    if config.cpu_model:
        argv += ["-cpu", config.cpu_model]
    append = config.append
    if nic is not None:
        # the tap exists already (the node's network helper made it, owned by QEMU's user):
        # QEMU attaches to it by name through /dev/net/tun, without any capability
        argv += ["-netdev", f"tap,id=net0,ifname={nic.tap},script=no,downscript=no",
                 "-device", f"virtio-net-pci,netdev=net0,mac={nic.mac},id=nic0"]
        append = f"{append} ferry.ip={nic.ip} ferry.tcp_port={nic.tcp_port}".strip()
    if config.kernel:
        argv += ["-kernel", config.kernel, "-append", append]
        if config.initrd:
            argv += ["-initrd", config.initrd]
    if incoming:
        argv += ["-S", "-incoming", "defer"]
    elif prelaunch:
        argv += ["-S"]
    argv += list(config.extra_args)
    return argv


def _opt(path: pathlib.Path) -> str:
    """A path as a QEMU option value (commas are doubled)."""
    return str(path).replace(",", ",,")


def psk_hex(secret: bytes, migration_id: str) -> str:
    """The TLS pre-shared key both ends derive from the migration's transfer secret."""
    return hmac.new(secret, b"ferry qemu tls-psk v1:" + migration_id.encode(), hashlib.sha256).hexdigest()


def psk_file_text(secret: bytes, migration_id: str) -> str:
    """The contents of QEMU's ``keys.psk`` (``username:hexkey``)."""
    return f"{PSK_USERNAME}:{psk_hex(secret, migration_id)}\n"


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"not a host:port address: {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    p = int(port)
    if not 0 < p < 65535:
        raise ValueError(f"port out of range in {address!r}")
    return host, p


def nbd_port(migration_port: int) -> int:
    """The target's NBD server listens on the port after the migration port."""
    return migration_port + 1
