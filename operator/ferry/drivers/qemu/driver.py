"""The qemu driver: one real QEMU process per droplet, migrated the way libvirt does.

Per VM, under ``<data_dir>/vms/<ns>__<name>/``: ``disk.img`` (raw, sparse),
``vm.json`` (the spec, the scaled size, the migration role), ``migration.json`` (the
last migration's stats), ``qemu.pid`` (locked by QEMU while it runs), ``qmp.sock`` (kept
connected by the driver), ``qmp-aux.sock`` (for people and tests), ``serial.log`` (the
guest's console), ``qemu.stderr`` (QEMU's own output under the process launcher).

QEMU is started through the agent's launcher (``ferry.drivers.launcher``), in the
foreground: as a plain process in its own session (``ProcessLauncher``: local development,
the tests) or as the one process of a pod on the host's node (``PodLauncher``: in a
cluster), so it outlives the agent either way. The agent reaches it only through files of
the VM's directory: the monitor socket, and the pid file's lock for "is it alive"
(``process.running``, good across pid namespaces). A new driver instance finds it again
(``list_vms``) and finishes or rolls back a migration that was in flight when the previous
agent died.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Mapping
from typing import Any

from ferry.api.times import fmt, now as utc_now
from ferry.drivers.base import (
    DriverError,
    MigrationOptions,
    MigrationState,
    MigrationStats,
    VMInfo,
    VMKey,
    VMSpec,
    VMState,
    Workload,
    poll_migration,
)
from ferry.drivers.launcher import Launch, Launcher, ProcessLauncher, VMResources
from ferry.drivers.network import FabricError, Taps, guest_mac, is_loopback, tap_name

from . import process
from .config import (
    GuestSize,
    Nic,
    QemuConfig,
    VMLayout,
    build_argv,
    format_address,
    guest_size,
    parse_address,
    safe_id,
)
from .sequence import (
    FINAL_STATES,
    EXPORT_NAME,
    FrozenVerify,
    SourceMigration,
    TargetMigration,
    add_tls_creds,
    disk_hash,
    object_ids,
    write_json,
)
from .qmp import QMPClient, QMPConnectionError, QMPError
from .stats import stats_from_dict, stats_to_dict

log = logging.getLogger("ferry.drivers.qemu")

# QEMU run states in which the guest is not running but the process may continue it.
_STOPPED_RUNSTATES = {"shutdown", "guest-panicked", "internal-error"}


def vm_state(alive: bool, runstate: str | None, meta: Mapping[str, Any]) -> VMState:
    """PURE: what a VM is, from its process, QEMU's run state and its vm.json.

    An incoming VM stays INCOMING until it is resumed or destroyed, even when its QEMU
    died (its migration then reports FAILED): partial data is never a stopped droplet.
    """
    if meta.get("role") == "target":
        return VMState.INCOMING
    if not alive:
        return VMState.STOPPED
    if meta.get("offline_source"):
        return VMState.STOPPED  # a stopped droplet's disk being served; the guest never runs
    if runstate == "running":
        return VMState.RUNNING
    if runstate in _STOPPED_RUNSTATES:
        return VMState.STOPPED
    return VMState.PAUSED


class QemuDriver:
    """Driver protocol implementation over QEMU (see ferry.drivers.base)."""

    name = "qemu"

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        config: QemuConfig | None = None,
        launcher: Launcher | None = None,
        taps: Taps | None = None,
        **overrides: Any,
    ):
        """``QemuDriver(data_dir, size_scale=0.001, kernel=..., initrd=...)``; any
        :class:`QemuConfig` field may be given as a keyword. ``launcher``: where QEMU runs
        (default: a plain process, ``ProcessLauncher``). ``taps``: who makes the guests' tap
        devices (``ferry.drivers.network``); None: guests have no NIC."""
        self.data_dir = pathlib.Path(data_dir).resolve()
        base = config or QemuConfig()
        self.config = dataclasses.replace(base, **overrides) if overrides else base
        self.config.validate()
        self.launcher: Launcher = launcher or ProcessLauncher()
        self.taps = taps
        (self.data_dir / "vms").mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._clients: dict[VMKey, QMPClient] = {}
        self._migrations: dict[VMKey, SourceMigration | TargetMigration] = {}
        self._verifies: dict[VMKey, FrozenVerify] = {}
        self._source_hashes: dict[VMKey, threading.Thread] = {}

    @classmethod
    def from_env(cls, data_dir: str | os.PathLike[str], environ: Mapping[str, str] | None = None,
                 launcher: Launcher | None = None, taps: Taps | None = None, **overrides: Any) -> QemuDriver:
        """Configured by FERRY_QEMU_KERNEL, FERRY_QEMU_INITRD, FERRY_QEMU_BINARY, FERRY_SIZE_SCALE, ..."""
        return cls(data_dir, config=QemuConfig.from_env(environ, **overrides), launcher=launcher, taps=taps)

    @classmethod
    def from_settings(cls, settings: Any, data_dir: str | os.PathLike[str],
                      environ: Mapping[str, str] | None = None, launcher: Launcher | None = None,
                      taps: Taps | None = None, **overrides: Any) -> QemuDriver:
        """From ferry.settings.Settings (size_scale) plus the FERRY_QEMU_* variables."""
        return cls.from_env(data_dir, environ, launcher, taps, size_scale=getattr(settings, "size_scale", None),
                            **overrides)

    @property
    def owns_addresses(self) -> bool:
        """The guests hold their own addresses (a NIC each): nothing goes on the node, and the
        network cut-over is ``announce`` (docs/architecture.md, "A qemu guest's NIC")."""
        return self.taps is not None

    def _nic(self, key: VMKey, meta: dict[str, Any]) -> Nic | None:
        """The guest's NIC, its tap made (idempotent); None without taps or without an address."""
        ip = meta["spec"].get("ip")
        if self.taps is None or not ip or is_loopback(ip):  # a loopback address stays the node's
            return None
        tap = tap_name(str(self.layout(key).root))
        try:
            self.taps.add_tap(tap)
        except FabricError as exc:
            raise DriverError(f"{key}: no tap device for its NIC: {exc}") from exc
        return Nic(tap=tap, mac=guest_mac(key.namespace, key.name), ip=ip, tcp_port=self.config.tcp_port)

    def _drop_tap(self, key: VMKey) -> None:
        """The VM's tap goes with its QEMU (a tap QEMU still holds goes when QEMU closes it)."""
        if self.taps is None:
            return
        try:
            self.taps.del_tap(tap_name(str(self.layout(key).root)))
        except FabricError as exc:
            log.warning("%s: its tap device stays: %s", key, exc)

    def announce(self, key: VMKey) -> None:
        """The network cut-over of a guest with a NIC: QEMU's ``announce-self`` (RARP frames from
        the guest's MAC, and a gratuitous ARP from the guest itself where virtio-net negotiated
        GUEST_ANNOUNCE), so the segment's bridges send the guest's traffic to this node's tap.
        The first round leaves at once, four more 50 ms apart (a frame lost on the way)."""
        try:
            self._qmp(key).execute("announce-self", {"initial": 0, "max": 200, "rounds": 5, "step": 50},
                                   timeout=self.config.qmp_timeout)
        except (QMPError, QMPConnectionError) as exc:
            raise DriverError(f"{key}: announce-self failed: {exc}") from exc

    def hypervisor_version(self) -> str | None:
        """QEMU's version (``qemu-system-x86_64 --version``), None if it cannot be run."""
        import re
        import subprocess

        try:
            out = subprocess.run([self.config.binary, "--version"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        m = re.search(r"version (\d+(?:\.\d+)*)", out)
        return m.group(1) if m else None

    def max_vcpus(self) -> int | None:
        return self.config.max_vcpus

    def close(self) -> None:
        """Let go of every QEMU (they keep running) and stop background threads."""
        with self._lock:
            for m in self._migrations.values():
                m.detach()
            for c in self._clients.values():
                c.close()
            migrations = list(self._migrations.values())
            verifies = list(self._verifies.values())
            self._verifies.clear()
            self._clients.clear()
            self._migrations.clear()
        for m in migrations:
            m.thread.join(timeout=5)
        for v in verifies:  # their monitor is closed: they end (a new instance starts them again)
            v.thread.join(timeout=5)

    # -- helpers: files ----------------------------------------------------------------

    def layout(self, key: VMKey) -> VMLayout:
        return VMLayout.of(self.data_dir, key)

    def guest_size(self, spec: VMSpec) -> GuestSize:
        return guest_size(spec, self.config)

    def _read_meta(self, layout: VMLayout) -> dict[str, Any] | None:
        try:
            return json.loads(layout.meta.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _write_meta(self, layout: VMLayout, meta: dict[str, Any]) -> None:
        layout.root.mkdir(parents=True, exist_ok=True)
        write_json(layout.meta, meta)

    def _new_meta(self, spec: VMSpec, role: str | None = None, migration_id: str | None = None) -> dict[str, Any]:
        size = self.guest_size(spec)
        return {
            "spec": _spec_to_dict(spec),
            "size": dataclasses.asdict(size),
            "machine": self.config.machine,
            "role": role,
            "migration_id": migration_id,
            "offline_source": False,
        }

    def _ensure_disk(self, layout: VMLayout, size: GuestSize) -> None:
        layout.root.mkdir(parents=True, exist_ok=True)
        path = layout.disk
        if path.exists():
            current = path.stat().st_size
            if current > size.disk_bytes:
                raise DriverError(f"{path} is {current} bytes, larger than the droplet's {size.disk_bytes}")
            if current < size.disk_bytes:
                with open(path, "r+b") as f:
                    f.truncate(size.disk_bytes)
            return
        with open(path, "xb") as f:
            f.truncate(size.disk_bytes)  # sparse

    # -- helpers: processes and monitors --------------------------------------------

    def _alive(self, layout: VMLayout) -> bool:
        return process.running(layout)

    def _qmp(self, key: VMKey) -> QMPClient:
        with self._lock:
            client = self._clients.get(key)
            if client is not None and not client.closed:
                return client
            layout = self.layout(key)
            if not self._alive(layout):
                raise DriverError(f"{key}: QEMU is not running")
            try:
                client = QMPClient.connect(str(layout.qmp), timeout=self.config.qmp_timeout)
            except QMPConnectionError as exc:
                raise DriverError(f"{key}: cannot reach QEMU's monitor: {exc}") from exc
            self._clients[key] = client
            return client

    def _drop_client(self, key: VMKey) -> None:
        with self._lock:
            client = self._clients.pop(key, None)
        if client is not None:
            client.close()

    def _launch(self, key: VMKey, meta: dict[str, Any], *, incoming: bool = False, prelaunch: bool = False) -> None:
        """Start QEMU through the launcher and return once its monitor answers."""
        layout = self.layout(key)
        if not incoming:
            self._settle_overlay(key, meta)
        size = GuestSize(**meta["size"])
        self._ensure_disk(layout, size)
        self._write_meta(layout, meta)
        nic = None if prelaunch else self._nic(key, meta)
        argv = build_argv(self.config, layout, size, safe_id(f"{key.namespace}-{key.name}"),
                          incoming=incoming, prelaunch=prelaunch, nic=nic)
        log.info("starting QEMU for %s (launcher %s): %s", key, self.launcher.name, " ".join(argv))
        self._drop_client(key)
        for stale in (layout.pidfile, layout.qmp, layout.qmp_aux):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        spec = meta["spec"]
        self.launcher.launch(Launch(
            key=key, argv=tuple(argv), vm_dir=str(layout.root), log_path=str(layout.stderr), env=(),
            resources=VMResources.of(int(spec["cpu"]), int(spec["memory_mib"]), self.config.size_scale),
            role="incoming" if incoming else "vm", tun=nic is not None))
        deadline = time.monotonic() + self.config.launch_timeout
        next_check = 0.0
        last: Exception | None = None
        while time.monotonic() < deadline:
            if layout.qmp.exists() and self._alive(layout):
                try:
                    self._qmp(key)
                    return
                except DriverError as exc:
                    last = exc
            if time.monotonic() >= next_check:  # a pod's state is an API call: not every 50 ms
                why = self.launcher.exited(key)
                if why is not None and not self._alive(layout):
                    raise DriverError(f"{key}: QEMU failed to start: {why}: {self._stderr_tail(layout)}")
                next_check = time.monotonic() + (0.5 if self.launcher.name != "process" else 0.0)
            time.sleep(0.05)
        self.launcher.kill(key, str(layout.root))
        raise DriverError(f"{key}: QEMU's monitor did not answer within {self.config.launch_timeout:.0f} s"
                          f" ({last or 'no socket'}): {self._stderr_tail(layout)}")

    def _stderr_tail(self, layout: VMLayout, size: int = 500) -> str:
        """QEMU's last words (a launcher pod's QEMU writes them to its container log)."""
        try:
            with open(layout.stderr, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - size))
                return f.read().decode(errors="replace").strip() or "(no output)"
        except OSError:
            return "(see the launcher pod's log)"

    def _runstate(self, key: VMKey) -> str | None:
        try:
            return self._qmp(key).execute("query-status", timeout=self.config.qmp_timeout).get("status")
        except (DriverError, QMPError, QMPConnectionError):
            return None

    def _kill(self, key: VMKey, graceful: bool) -> None:
        """Stop this VM's QEMU (``quit`` first when graceful) and drop what held it (its
        launcher pod, or its plain process)."""
        layout = self.layout(key)
        if not self._alive(layout):
            self._drop_client(key)
            self.launcher.release(key)
            return
        if graceful:
            with contextlib.suppress(DriverError, QMPError, QMPConnectionError):
                self._qmp(key).execute("quit", timeout=self.config.qmp_timeout)
            if process.wait_gone(layout, self.config.stop_timeout):
                self._drop_client(key)
                self.launcher.release(key)
                return
        self.launcher.kill(key, str(layout.root), timeout=max(30.0, self.config.stop_timeout))
        if not process.wait_gone(layout, self.config.stop_timeout):
            raise DriverError(f"{key}: QEMU still holds its pid file after it was killed")
        with contextlib.suppress(FileNotFoundError):
            layout.pidfile.unlink()  # killed on purpose: not a crash (QEMU removes it itself on quit)
        self._drop_client(key)

    def _crashed(self, layout: VMLayout, meta: dict[str, Any]) -> bool:
        """No live QEMU, but its pidfile is left: it did not quit (QEMU removes the file on a
        clean exit, and so does the driver after killing it on purpose)."""
        return layout.pidfile.exists() and not self._alive(layout) and meta.get("role") != "target"

    def _info(self, key: VMKey, meta: dict[str, Any] | None = None) -> VMInfo:
        layout = self.layout(key)
        meta = meta if meta is not None else (self._read_meta(layout) or {})
        holder = process.lock_holder(layout)
        alive = holder is not None
        runstate = self._runstate(key) if alive else None
        state = vm_state(alive, runstate, meta)
        # pid: set exactly while QEMU runs (the agent's plan reads "None" as "its process is
        # gone"): the lock holder as seen from here, or, for a launcher pod's QEMU (another pid
        # namespace: F_GETLK says 0), the pid QEMU wrote itself
        return VMInfo(key=key, state=state, pid=None if holder is None else holder or process.own_pid(layout),
                      migration_id=meta.get("migration_id") if meta.get("role") else None,
                      crashed=state == VMState.STOPPED and self._crashed(layout, meta),
                      restarts=int(meta.get("restarts") or 0), restarted_at=meta.get("restarted_at"))

    # -- Driver protocol -----------------------------------------------------------

    def list_vms(self) -> list[VMInfo]:
        out: list[VMInfo] = []
        vms = self.data_dir / "vms"
        for d in sorted(vms.iterdir()) if vms.exists() else []:
            meta = self._read_meta(VMLayout(d))
            if not meta or "spec" not in meta:
                continue
            key = VMKey(meta["spec"]["namespace"], meta["spec"]["name"])
            self._recover(key, meta)
            self._resume_frozen_verify(key, meta)
            out.append(self._info(key, meta))
        return out

    def start(self, spec: VMSpec) -> VMInfo:
        """Create the image if missing and boot the guest. A VM that runs stays as it is.
        A spec with ``power_on=False`` only creates the image (STOPPED)."""
        key = spec.key
        layout = self.layout(key)
        with self._lock:
            meta = self._read_meta(layout)
            if meta and meta.get("role") == "target":
                raise DriverError(f"{key} is the target of migration {meta.get('migration_id')}; it starts by resume()")
            if self._alive(layout):
                if meta and meta.get("offline_source"):
                    raise DriverError(f"{key} is being copied by offline migration {meta.get('migration_id')}")
                return self._info(key, meta)
            new = self._new_meta(spec)
            if meta:  # crash restarts of this copy (a reboot each) are kept across starts
                restarted = spec.power_on and self._crashed(layout, meta)
                new["restarts"] = int(meta.get("restarts") or 0) + (1 if restarted else 0)
                new["restarted_at"] = fmt(utc_now()) if restarted else meta.get("restarted_at")
            if meta and meta.get("size") and meta["size"] != new["size"]:
                log.warning("%s: size changed from %s to %s", key, meta["size"], new["size"])
            if not spec.power_on:
                self._ensure_disk(layout, GuestSize(**new["size"]))
                self._write_meta(layout, new)
                return VMInfo(key=key, state=VMState.STOPPED)
            self._launch(key, new)
            return self._info(key, new)

    def stop(self, key: VMKey) -> None:
        layout = self.layout(key)
        with self._lock:
            m = self._migrations.get(key)
        if isinstance(m, SourceMigration) and not m.finished:
            m.cancel()
        with self._lock:
            self._kill(key, graceful=True)
            self._drop_tap(key)
            meta = self._read_meta(layout)
            if meta and meta.get("role") == "source":
                meta.update(role=None, migration_id=None, offline_source=False)
                self._write_meta(layout, meta)

    def destroy(self, key: VMKey) -> None:
        layout = self.layout(key)
        with self._lock:
            m = self._migrations.pop(key, None)
            self._verifies.pop(key, None)
        if m is not None:
            m.detach()
        with self._lock:
            self._kill(key, graceful=False)
            self._drop_tap(key)
            shutil.rmtree(layout.root, ignore_errors=True)
        if m is not None:
            m.thread.join(timeout=10)

    def prepare_incoming(self, spec: VMSpec, bind_host: str, secret: bytes, migration_id: str) -> str:
        key = spec.key
        layout = self.layout(key)
        if bind_host in ("0.0.0.0", "::", ""):
            raise DriverError("the migration channel binds to the migration's address, never a wildcard")
        with self._lock:
            meta = self._read_meta(layout)
            if meta and meta.get("role") == "target":
                m = self._migrations.get(key)
                failed = (MigrationState.FAILED, MigrationState.ABORTED)
                if (meta.get("migration_id") == migration_id and meta.get("address")
                        and self._alive(layout) and (m is None or m.state not in failed)):
                    self._recover(key, meta)
                    return meta["address"]
                self.destroy(key)  # a previous attempt's leftovers
            elif meta:
                raise DriverError(f"{key} already exists on this host ({self._info(key, meta).state.value})")
            elif layout.root.exists():
                shutil.rmtree(layout.root, ignore_errors=True)
            meta = self._new_meta(spec, role="target", migration_id=migration_id)
            try:
                self._launch(key, meta, incoming=True)
                address = self._listen(key, layout, bind_host, secret, migration_id)
            except (DriverError, QMPError, QMPConnectionError, OSError) as exc:
                self.destroy(key)
                raise DriverError(f"preparing the incoming VM failed: {exc}") from exc
            meta["address"] = address
            self._write_meta(layout, meta)
            watch = TargetMigration(migration_id=migration_id, layout=layout, config=self.config,
                                    qmp=self._qmp(key), disk_bytes=meta["size"]["disk_bytes"])
            self._migrations[key] = watch
            watch.start()
            log.info("%s: incoming migration %s listening on %s", key, migration_id, address)
            return address

    def _listen(self, key: VMKey, layout: VMLayout, host: str, secret: bytes, migration_id: str) -> str:
        """TLS creds, NBD export and migration listener on host:P (NBD on P+1)."""
        q = self._qmp(key)
        ids = object_ids(migration_id)
        tls = add_tls_creds(q, layout, secret, migration_id, "server")
        q.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
        q.execute("migrate-set-parameters", {"tls-creds": tls})
        last_error: Exception | None = None
        for _ in range(20):
            mig_sock, nbd_sock = _reserve_port_pair(host)
            port = mig_sock.getsockname()[1]
            try:
                # the NBD listener is handed to QEMU as a file descriptor: no race for it
                q.execute("getfd", {"fdname": ids["nbd_fd"]}, fds=[nbd_sock.fileno()])
                nbd_sock.close()
                q.execute("nbd-server-start", {"addr": {"type": "fd", "data": {"str": ids["nbd_fd"]}},
                                               "tls-creds": tls})
                q.execute("block-export-add", {"type": "nbd", "id": ids["export"], "node-name": "disk0",
                                               "name": EXPORT_NAME, "writable": True})
                mig_sock.close()
                q.execute("migrate-incoming", {"uri": "tcp:" + format_address(host, port)})
                return format_address(host, port)
            except QMPError as exc:
                last_error = exc
                mig_sock.close()
                nbd_sock.close()
                with contextlib.suppress(QMPError):
                    q.execute("block-export-del", {"id": ids["export"], "mode": "hard"})
                with contextlib.suppress(QMPError):
                    q.execute("nbd-server-stop")
                with contextlib.suppress(QMPError):
                    q.execute("closefd", {"fdname": ids["nbd_fd"]})
        raise DriverError(f"no port pair on {host} for the incoming migration: {last_error}")

    def start_migration(self, key: VMKey, target: str, secret: bytes, migration_id: str,
                        options: MigrationOptions) -> None:
        layout = self.layout(key)
        host, port = parse_address(target)
        with self._lock:
            m = self._migrations.get(key)
            if m is not None and m.migration_id == migration_id and isinstance(m, SourceMigration):
                return  # idempotent
            if m is not None and not m.finished:
                raise DriverError(f"{key} is already migrating ({m.migration_id})")
            meta = self._read_meta(layout)
            if not meta:
                raise DriverError(f"{key} does not exist on this host")
            if meta.get("role") == "target":
                raise DriverError(f"{key} is itself an incoming VM ({meta.get('migration_id')})")
            v = self._verifies.get(key)
        if meta.get("frozen_verify") or (v is not None and not v.done.is_set()):
            # the guest still writes to the frozen point's overlay: a mirror of disk0 now would
            # copy the frozen base without those writes. Wait for the merge.
            self._resume_frozen_verify(key, meta)
            v = self._verifies.get(key)
            if v is None or not v.done.wait(120) or (self._read_meta(layout) or {}).get("frozen_verify"):
                raise DriverError(f"{key}: the verification of its last incoming migration has not finished "
                                  "(its overlay is not merged back yet)")
        with self._lock:
            meta = self._read_meta(layout) or meta
            alive = self._alive(layout)
            if options.offline:
                if alive and not meta.get("offline_source"):
                    raise DriverError(f"{key} is running: an offline migration needs a stopped VM")
                meta.update(role="source", migration_id=migration_id, offline_source=True)
                if not alive:
                    self._launch(key, meta, prelaunch=True)
            else:
                if not alive or self._runstate(key) != "running":
                    raise DriverError(f"{key} is not running: a live migration needs a running guest")
                meta.update(role="source", migration_id=migration_id, offline_source=False)
            self._write_meta(layout, meta)
            with contextlib.suppress(FileNotFoundError):
                layout.migration.unlink()
            m = SourceMigration(
                migration_id=migration_id, layout=layout, config=self.config, qmp=self._qmp(key),
                target_host=host, target_port=port, secret=secret, options=options,
                disk_bytes=meta["size"]["disk_bytes"], offline=bool(options.offline),
                stop_vm=lambda: self._stop_offline_source(key),
                on_settled=lambda state: self._source_settled(key, migration_id, state),
            )
            self._migrations[key] = m
            m.start()

    def _source_settled(self, key: VMKey, migration_id: str, state: MigrationState) -> None:
        """A failed or aborted migration leaves a plain VM behind (no role)."""
        if state not in (MigrationState.FAILED, MigrationState.ABORTED):
            return
        layout = self.layout(key)
        with self._lock:
            meta = self._read_meta(layout)
            if meta and meta.get("role") == "source" and meta.get("migration_id") == migration_id:
                meta.update(role=None, migration_id=None, offline_source=False)
                self._write_meta(layout, meta)

    def _stop_offline_source(self, key: VMKey) -> None:
        self._kill(key, graceful=True)
        layout = self.layout(key)
        meta = self._read_meta(layout)
        if meta:
            meta.update(role=None, migration_id=None, offline_source=False)
            self._write_meta(layout, meta)

    def query_migration(self, key: VMKey) -> MigrationStats:
        with self._lock:
            m = self._migrations.get(key)
        if m is not None:
            return m.snapshot()
        layout = self.layout(key)
        meta = self._read_meta(layout)
        if meta:
            m = self._recover(key, meta)
            if m is not None:
                return m.snapshot()
        return self._persisted_stats(layout) or MigrationStats()

    def wait_migration(self, key: VMKey, timeout: float) -> None:
        """A migration's state lives in this process (its sequence thread): read it every 20 ms."""
        poll_migration(self, key, timeout, interval=0.02)

    def cancel_migration(self, key: VMKey) -> None:
        layout = self.layout(key)
        with self._lock:
            meta = self._read_meta(layout)
            if meta:
                self._recover(key, meta)
            m = self._migrations.get(key)
        if meta and meta.get("role") == "target":
            self.destroy(key)  # a target that is told to stop has nothing worth keeping
            return
        if isinstance(m, SourceMigration):
            if not m.finished:
                # (a completed one may still be hashing its paused disk: that ends, then it resumes)
                m.cancel()
                if not m.finished:
                    raise DriverError(f"{key}: the migration did not stop within 60 s")
            if m.state == MigrationState.COMPLETED:
                self._undo_completed(key, m)
        elif meta and meta.get("role") == "source":
            stats = self._persisted_stats(layout)
            if stats is not None and stats.state == MigrationState.COMPLETED:
                self._undo_completed(key, None)
        with self._lock:
            meta = self._read_meta(layout)
            if meta and meta.get("role") == "source":
                meta.update(role=None, migration_id=None, offline_source=False)
                self._write_meta(layout, meta)

    def force_complete(self, key: VMKey) -> None:
        """Stop the guest now and let the copy finish with it paused (see sequence.py)."""
        with self._lock:
            m = self._migrations.get(key)
        if not isinstance(m, SourceMigration) or m.finished:
            raise DriverError(f"{key}: no outgoing migration in progress")
        m.force_complete()

    def _undo_completed(self, key: VMKey, m: SourceMigration | None) -> None:
        """The stream completed but the record did not flip: the source runs again
        (a ``cont`` after ``postmigrate`` re-activates its own disk)."""
        meta = self._read_meta(self.layout(key)) or {}
        if meta.get("offline_source"):
            self._stop_offline_source(key)
        elif self._alive(self.layout(key)) and self._runstate(key) != "running":
            self._qmp(key).execute("cont")
        if self.owns_addresses and self._alive(self.layout(key)):
            # the target's QEMU announced the guest's MAC when its copy arrived: take it back
            with contextlib.suppress(DriverError):
                self.announce(key)
        if m is not None:
            m.set_state(MigrationState.ABORTED)
        else:
            stats = self._persisted_stats(self.layout(key)) or MigrationStats()
            stats.state = MigrationState.ABORTED
            write_json(self.layout(key).migration, {**stats_to_dict(stats), "role": "source"})

    def resume(self, key: VMKey) -> None:
        layout = self.layout(key)
        with self._lock:
            meta = self._read_meta(layout)
            if not meta:
                raise DriverError(f"{key} does not exist on this host")
            if meta.get("role") != "target":
                if self._alive(layout) and self._runstate(key) == "running":
                    return  # resumed already
                raise DriverError(f"{key} is not an incoming VM")
            self._recover(key, meta)
            m = self._migrations.get(key)
            stats = m.snapshot() if m is not None else self._persisted_stats(layout)
            if stats is None or stats.state != MigrationState.RECEIVED:
                state = stats.state.value if stats else "unknown"
                raise DriverError(f"{key}: nothing to resume, the incoming migration is {state}")
            spec = _spec_from_dict(meta["spec"])
            runstate = self._runstate(key)
            meta.update(role=None, migration_id=None, resumed_from=meta.get("migration_id"))
            if runstate == "prelaunch":
                # an offline migration: the source guest never ran; boot it afresh
                self._kill(key, graceful=True)
                self._write_meta(layout, meta)
                if spec.power_on:
                    self._launch(key, meta)
            elif spec.power_on:
                if stats.frozen_point:
                    meta["frozen_verify"] = meta["resumed_from"]
                self._write_meta(layout, meta)
                self._qmp(key).execute("cont")
                if stats.frozen_point:
                    self._start_frozen_verify(key, meta, stats)
            else:
                self._kill(key, graceful=True)
                self._write_meta(layout, meta)
                if stats.frozen_point:  # powered off meanwhile: hash the base and merge, no QEMU needed
                    self._settle_overlay(key, meta)
                    self._write_meta(layout, meta)
            self._migrations.pop(key, None)

    # -- the frozen point (target, after resume) -----------------------------------------

    def _start_frozen_verify(self, key: VMKey, meta: dict[str, Any], stats: MigrationStats) -> None:
        """Hash the frozen base and merge the overlay back, in a thread (sequence.FrozenVerify)."""
        with self._lock:
            v = self._verifies.get(key)
            if v is not None and not v.done.is_set():
                return
            layout = self.layout(key)
            mid = meta.get("frozen_verify")

            def done() -> None:
                with self._lock:
                    m = self._read_meta(layout)
                    if m and m.get("frozen_verify") == mid:
                        m.pop("frozen_verify", None)
                        self._write_meta(layout, m)
            v = FrozenVerify(layout=layout, qmp=self._qmp(key), disk_bytes=meta["size"]["disk_bytes"],
                             stats=stats, on_done=done)
            self._verifies[key] = v
            v.start()

    def _hash_paused_source(self, key: VMKey, stats: MigrationStats) -> None:
        """A source whose migration completed but whose agent died before it hashed the paused
        disk (after the switchover, outside the downtime): hash it now, in a thread."""
        with self._lock:
            t = self._source_hashes.get(key)
            if t is not None and t.is_alive():
                return
            layout = self.layout(key)
            size = (self._read_meta(layout) or {}).get("size", {}).get("disk_bytes")
            if size is None:
                return

            def run() -> None:
                try:
                    stats.digest, stats.verify_ms, stats.hashed_bytes = disk_hash(layout.disk, size)
                    write_json(layout.migration, {**stats_to_dict(stats), "role": "source"})
                    log.info("%s: paused source hashed after an agent restart (%s ms)", key, stats.verify_ms)
                except OSError as exc:
                    log.warning("%s: hashing the paused source failed: %s", key, exc)
            t = threading.Thread(target=run, name=f"ferry-qemu-hash:{stats.migration_id}", daemon=True)
            self._source_hashes[key] = t
            t.start()

    def _resume_frozen_verify(self, key: VMKey, meta: dict[str, Any]) -> None:
        """After an agent restart: a resumed target whose verification had not ended."""
        if not meta.get("frozen_verify") or meta.get("role"):
            return
        layout = self.layout(key)
        with self._lock:
            v = self._verifies.get(key)
            if v is not None and not v.done.is_set():
                return
        stats = self._persisted_stats(layout)
        if stats is None or not self._alive(layout):
            return  # a dead QEMU: _launch settles the overlay before the guest boots again
        if v is not None and stats.error:
            return  # this driver's own attempt failed: said in the stats, not retried in a loop
        self._start_frozen_verify(key, meta, stats)

    def _settle_overlay(self, key: VMKey, meta: dict[str, Any]) -> None:
        """Before a QEMU starts again over a disk whose frozen-point overlay is still there (the
        target's QEMU died between the resume and the end of its verification): hash the frozen
        base if that was not done, then merge the overlay into it with ``qemu-img commit``. The
        overlay holds the guest's writes since the resume; booting the raw image alone would
        lose them."""
        layout = self.layout(key)
        if not layout.overlay.exists():
            return
        stats = self._persisted_stats(layout)
        if stats is not None and stats.frozen_point and stats.digest is None:
            stats.digest, stats.verify_ms, stats.hashed_bytes = disk_hash(layout.disk, meta["size"]["disk_bytes"])
            write_json(layout.migration, {**stats_to_dict(stats), "role": "target"})
        img = shutil.which("qemu-img", path=os.path.dirname(shutil.which(self.config.binary) or "") or None) \
            or shutil.which("qemu-img")
        if img is None:
            raise DriverError(f"{key}: the frozen-point overlay {layout.overlay} holds the guest's newest writes and "
                              "qemu-img is not installed to merge it; not booting without them")
        done = subprocess.run([img, "commit", "-q", str(layout.overlay)], capture_output=True, text=True)
        if done.returncode != 0:
            raise DriverError(f"{key}: qemu-img commit of {layout.overlay} failed: {done.stderr.strip()}")
        layout.overlay.unlink()
        meta.pop("frozen_verify", None)
        log.info("%s: merged the frozen-point overlay left by a QEMU that died", key)

    # -- re-attach ---------------------------------------------------------------------

    def _persisted_stats(self, layout: VMLayout) -> MigrationStats | None:
        try:
            return stats_from_dict(json.loads(layout.migration.read_text()))
        except (FileNotFoundError, ValueError, TypeError):
            return None

    def _recover(self, key: VMKey, meta: dict[str, Any]) -> SourceMigration | TargetMigration | None:
        """After an agent restart: pick up (target) or settle (source) a migration that
        the previous driver instance left unfinished."""
        with self._lock:
            if key in self._migrations:
                return self._migrations[key]
            role = meta.get("role")
            mid = meta.get("migration_id")
            if role not in ("source", "target") or not mid:
                return None
            layout = self.layout(key)
            stats = self._persisted_stats(layout)
            if stats is not None and (stats.state in FINAL_STATES or stats.migration_id != mid):
                if (role == "source" and stats.state == MigrationState.COMPLETED and stats.digest is None
                        and stats.migration_id == mid and not meta.get("offline_source")):
                    self._hash_paused_source(key, stats)
                return None
            alive = self._alive(layout)
            if not alive:
                stats = stats or MigrationStats(migration_id=mid)
                stats.state = MigrationState.FAILED
                stats.error = f"the {role} QEMU exited while the agent was away"
                write_json(layout.migration, {**stats_to_dict(stats), "role": role})
                return None
            m: SourceMigration | TargetMigration
            if role == "target":
                m = TargetMigration(migration_id=mid, layout=layout, config=self.config, qmp=self._qmp(key),
                                    disk_bytes=meta["size"]["disk_bytes"])
            else:
                m = SourceMigration(
                    migration_id=mid, layout=layout, config=self.config, qmp=self._qmp(key),
                    target_host="", target_port=0, secret=b"", options=MigrationOptions(),
                    disk_bytes=meta["size"]["disk_bytes"], offline=bool(meta.get("offline_source")),
                    stop_vm=lambda: self._stop_offline_source(key), recover=True,
                    on_settled=lambda state: self._source_settled(key, mid, state),
                )
            if stats is not None:
                m.tracker.stats = stats
            self._migrations[key] = m
            m.start()
            log.info("%s: re-attached to %s migration %s", key, role, mid)
        if role == "source":
            m.done.wait(60)  # settle it before answering
        return m


def _reserve_port_pair(host: str) -> tuple[socket.socket, socket.socket]:
    """Two sockets bound to host:P and host:P+1 (P from the kernel)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(100):
        a = socket.socket(family, socket.SOCK_STREAM)
        try:
            a.bind((host, 0))
        except OSError as exc:
            a.close()
            raise DriverError(f"cannot bind {host}: {exc}") from exc
        port = a.getsockname()[1]
        if port >= 65534:
            a.close()
            continue
        b = socket.socket(family, socket.SOCK_STREAM)
        try:
            b.bind((host, port + 1))
        except OSError:
            a.close()
            b.close()
            continue
        return a, b
    raise DriverError(f"no two consecutive free ports on {host}")


def _spec_to_dict(spec: VMSpec) -> dict[str, Any]:
    return {
        "namespace": spec.key.namespace,
        "name": spec.key.name,
        "cpu": spec.cpu,
        "memory_mib": spec.memory_mib,
        "disk_gib": spec.disk_gib,
        "workload": dataclasses.asdict(spec.workload),
        "power_on": spec.power_on,
        "ip": spec.ip,
    }


def _spec_from_dict(d: Mapping[str, Any]) -> VMSpec:
    return VMSpec(
        key=VMKey(d["namespace"], d["name"]),
        cpu=int(d["cpu"]),
        memory_mib=int(d["memory_mib"]),
        disk_gib=int(d["disk_gib"]),
        workload=Workload(**d.get("workload", {})),
        power_on=bool(d.get("power_on", True)),
        ip=d.get("ip"),
    )
