"""``SimDriver``: runs each droplet as its own sim VM process (``ferry.drivers.sim.vm``).

State lives in ``<data_dir>/vms/<ns>__<name>/``: ``vm.json`` (spec and sizes), ``disk.img``
(sparse, 64 KiB blocks), ``mem.img`` (4 KiB pages), ``control.sock``, ``pid``, ``log``,
and ``writes.log`` when ``write_log`` is on. VM processes are started by a launcher
(``ferry.drivers.launcher``: a plain process in its own session, or a pod on the host's node),
so they outlive the agent; ``list_vms()`` re-attaches by scanning the directory (the VM
process holds its ``lock`` and its control socket answers).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time

from ferry.api.reports import RoundReport
from ferry.api.times import fmt, now as utc_now
from ferry.drivers.base import (
    DriverError,
    MigrationOptions,
    MigrationState,
    MigrationStats,
    TransferCounters,
    VMInfo,
    VMKey,
    VMSpec,
    VMState,
)
from ferry.drivers.launcher import Launch, Launcher, ProcessLauncher, VMResources, vm_alive
from ferry.drivers.sim import control
from ferry.drivers.sim.image import image_sizes
from ferry.drivers.sim.layout import LOCK_FILE, LOG_FILE, MIGRATION_FILE, PID_FILE, SOCKET_FILE, SPEC_FILE, WRITE_LOG
from ferry.transfer.channel import AES_256_GCM, CHANNELS

_STATUS_TO_STATE = {
    "running": VMState.RUNNING,
    "paused": VMState.PAUSED,
    "finish-migrate": VMState.PAUSED,
    "postmigrate": VMState.PAUSED,
    "stopped": VMState.STOPPED,
    "inmigrate": VMState.INCOMING,
}


def stats_from_dict(d: dict) -> MigrationStats:
    """query-migrate's answer -> MigrationStats."""

    def counters(x) -> TransferCounters:
        x = x or {}
        return TransferCounters(total=int(x.get("total", 0)), sent=int(x.get("sent", 0)), remaining=int(x.get("remaining", 0)))

    try:
        state = MigrationState(d.get("state") or "None")
    except ValueError:
        state = MigrationState.FAILED
    return MigrationStats(
        migration_id=d.get("migration_id"),
        state=state,
        round=int(d.get("round") or 0),
        disk=counters(d.get("disk")),
        memory=counters(d.get("memory")),
        dirty_rate_bps=int(d.get("dirty_rate_bps") or 0),
        bandwidth_bps=int(d.get("bandwidth_bps") or 0),
        throttle_percent=int(d.get("throttle_percent") or 0),
        max_throttle_percent=int(d.get("max_throttle_percent") or 0),
        throttled_ms=int(d.get("throttled_ms") or 0),
        expected_downtime_ms=int(d.get("expected_downtime_ms") or 0),
        eta_seconds=d.get("eta_seconds"),
        rounds=[RoundReport(round=r["round"], bytes=r["bytes"], dirty_bytes=r["dirty_bytes"], ms=r["ms"],
                           start_ms=r.get("start_ms"), dirty_rate_bps=r.get("dirty_rate_bps"),
                           throttle_percent=r.get("throttle_percent"), paused=bool(r.get("paused")))
                for r in d.get("rounds") or []],
        downtime_ms=d.get("downtime_ms"),
        downtime_budget_ms=d.get("downtime_budget_ms"),
        max_downtime_ms=d.get("max_downtime_ms"),
        allowed_downtime_ms=d.get("allowed_downtime_ms"),
        downtime_steps=int(d.get("downtime_steps") or 0),
        predicted_downtime_ms=d.get("predicted_downtime_ms"),
        forced=bool(d.get("forced")),
        digest=d.get("digest"),
        error=d.get("error"),
        channel=d.get("channel"),
        paused_at=d.get("paused_at"),
        resumed_at=d.get("resumed_at"),
    )


def _not_listening(e: Exception) -> bool:
    """The socket is not there or refuses: a VM process that has its lock but has not bound
    its control socket yet (starting), as opposed to one that hangs."""
    return isinstance(e, control.ControlUnavailable) and ("Connection refused" in str(e) or
                                                           "No such file or directory" in str(e))


class SimDriver:
    name = "sim"

    def hypervisor_version(self) -> str:
        """The sim VM process is ferry's own: its version is ferry's."""
        from ferry import __version__
        return __version__

    def max_vcpus(self) -> int | None:
        return None  # a sim VM's vCPUs are a number, not threads

    def __init__(self, data_dir: str, size_scale: float = 1.0, write_log: bool = False, *,
                 python: str | None = None, start_timeout: float = 15.0, channel: str = AES_256_GCM,
                 launcher: Launcher | None = None, service_port: int = 0, host: str = ""):
        if size_scale <= 0:
            raise ValueError("size_scale must be > 0")
        if channel not in CHANNELS:
            raise ValueError(f"channel must be one of {', '.join(CHANNELS)}")
        self.channel = channel  # the data channel migrations ask for (and, for plain, also take)
        self.reads = "mmap"  # how a source reads its images: "mmap" or "preadv" (the benchmark's baseline)
        self.data_dir = os.path.realpath(data_dir)
        self.vms_dir = os.path.join(self.data_dir, "vms")
        self.size_scale = size_scale
        self.write_log = write_log
        #: UDP port of the guest's network service on the droplet's address (0: no service)
        self.service_port = int(service_port)
        self.host = host  # named in the guest service's answers
        self.python = python or sys.executable
        self.start_timeout = start_timeout
        self.launcher: Launcher = launcher or ProcessLauncher(PID_FILE)
        os.makedirs(self.vms_dir, exist_ok=True)

    # --- paths and processes -------------------------------------------------------

    def vm_dir(self, key: VMKey) -> str:
        return os.path.join(self.vms_dir, key.dirname)

    def _sock(self, key: VMKey) -> str:
        return os.path.join(self.vm_dir(key), SOCKET_FILE)

    def _alive(self, key: VMKey) -> bool:
        """A VM process of this VM lives (it holds the VM's lock), wherever it was launched."""
        return vm_alive(os.path.join(self.vm_dir(key), LOCK_FILE))

    def execute(self, key: VMKey, command: str, arguments: dict | None = None, timeout: float = 30.0) -> dict:
        """Send one control command to the VM process (raw QMP-like access)."""
        try:
            return control.execute(self._sock(key), command, arguments, timeout=timeout)
        except control.ControlError as e:
            raise DriverError(f"{key}: {command}: {e.desc}") from None
        except control.ControlUnavailable as e:
            raise DriverError(f"{key}: VM process not reachable: {e}") from None

    def _status(self, key: VMKey) -> dict | None:
        """query-status of a live VM process; None if there is none. A live process that
        does not answer raises (it must never be mistaken for a stopped VM)."""
        if not self._alive(key):
            return None
        last: Exception | None = None
        starting_until = time.monotonic() + 5.0
        for timeout in (5.0, 15.0):
            while True:
                try:
                    return control.execute(self._sock(key), "query-status", timeout=timeout)
                except (control.ControlUnavailable, control.ControlError, ValueError) as e:
                    last = e
                    if not self._alive(key):
                        return None  # it just exited
                    if _not_listening(e) and time.monotonic() < starting_until:
                        time.sleep(0.05)  # its lock is taken, its socket not bound yet: it is starting
                        continue
                    break
        raise DriverError(f"{key}: VM process is alive but its control socket does not answer: {last}")

    def _write_spec(self, spec: VMSpec, incoming: bool = False, restarted: bool = False) -> dict:
        disk_bytes, memory_bytes = image_sizes(spec.memory_mib, spec.disk_gib, self.size_scale)
        before = {} if incoming else self._read_spec(spec.key)
        restarts = int(before.get("restarts") or 0) + (1 if restarted else 0)
        restarted_at = fmt(utc_now()) if restarted else before.get("restarted_at")
        data = {
            "key": {"namespace": spec.key.namespace, "name": spec.key.name},
            "cpu": spec.cpu,
            "memory_mib": spec.memory_mib,
            "disk_gib": spec.disk_gib,
            "size_scale": self.size_scale,
            "disk_bytes": disk_bytes,
            "memory_bytes": memory_bytes,
            "workload": {"pattern": spec.workload.pattern, "write_rate_kibps": spec.workload.write_rate_kibps},
            "power_on": spec.power_on,
            "write_log": self.write_log,
            # the guest's network service (ferry.drivers.sim.service): its address and port
            "ip": spec.ip,
            "service_port": self.service_port if spec.ip else 0,
            "host": self.host,
            # a target not resumed yet: its images are partial or unconfirmed and must
            # never run as the droplet (cleared by the VM process on `cont`)
            "incoming_pending": incoming,
            # crash restarts of this copy (a reboot each): kept across starts, reported by list_vms
            "restarts": restarts,
            "restarted_at": restarted_at,
        }
        d = self.vm_dir(spec.key)
        os.makedirs(d, exist_ok=True)
        tmp = os.path.join(d, SPEC_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, os.path.join(d, SPEC_FILE))
        return data

    def _spawn(self, key: VMKey, *flags: str) -> None:
        d = self.vm_dir(key)
        for stale in (SOCKET_FILE, PID_FILE):
            try:
                os.unlink(os.path.join(d, stale))
            except FileNotFoundError:
                pass
        with open(os.path.join(d, SPEC_FILE)) as f:
            spec = json.load(f)
        self.launcher.launch(Launch(
            key=key,
            argv=(self.python, "-m", "ferry.drivers.sim.vm", "--dir", d, *flags),
            vm_dir=d,
            log_path=os.path.join(d, LOG_FILE),
            env=tuple(self._child_env().items()),
            resources=VMResources.of(int(spec["cpu"]), int(spec["memory_mib"]), self.size_scale),
            role="incoming" if "--incoming" in flags else "vm",
        ))
        deadline = time.monotonic() + self.start_timeout
        next_check = 0.0
        while time.monotonic() < deadline:
            if time.monotonic() >= next_check:  # a pod's state is an API call: not every 20 ms
                why = self.launcher.exited(key)
                if why is not None and not self._alive(key):
                    raise DriverError(f"{key}: {why} at start: {self._log_tail(key)}")
                next_check = time.monotonic() + (0.5 if self.launcher.name != "process" else 0.0)
            try:
                control.execute(self._sock(key), "query-status", timeout=2.0)
                return
            except (control.ControlUnavailable, ValueError):
                time.sleep(0.02)
        self.launcher.kill(key, d)
        raise DriverError(f"{key}: VM process did not answer within {self.start_timeout}s")

    def _log_tail(self, key: VMKey, size: int = 600) -> str:
        try:
            with open(os.path.join(self.vm_dir(key), LOG_FILE), "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - size))
                return f.read().decode(errors="replace").strip().replace("\n", " | ")
        except OSError as e:
            return f"(no log: {e})"

    @staticmethod
    def _child_env() -> dict:
        """What the VM process needs beyond its launcher's environment: ferry's settings, and
        the package importable even when run from a source tree."""
        env = {k: v for k, v in os.environ.items() if k.startswith("FERRY_")}
        pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        pythonpath = os.environ.get("PYTHONPATH")
        env["PYTHONPATH"] = pkg_root + (os.pathsep + pythonpath if pythonpath else "")
        return env

    def _kill(self, key: VMKey, timeout: float = 30.0) -> None:
        """End the VM process now; returns when it no longer holds its lock."""
        self.launcher.kill(key, self.vm_dir(key), timeout)
        deadline = time.monotonic() + timeout
        while self._alive(key):
            if time.monotonic() >= deadline:
                raise DriverError(f"{key}: VM process still alive {timeout:.0f}s after it was killed")
            time.sleep(0.05)

    def _quit(self, key: VMKey, timeout: float = 10.0) -> None:
        if not self._alive(key):
            self.launcher.release(key)
            return
        try:
            control.execute(self._sock(key), "quit", timeout=5.0)
        except (control.ControlUnavailable, control.ControlError, ValueError):
            self._kill(key)  # not answering: it cannot quit cleanly
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._alive(key):
                self.launcher.release(key)
                return
            time.sleep(0.02)
        self._kill(key)

    def _incoming_pending(self, key: VMKey) -> bool:
        try:
            with open(os.path.join(self.vm_dir(key), SPEC_FILE)) as f:
                return bool(json.load(f).get("incoming_pending"))
        except (OSError, ValueError):
            return False

    def _read_spec(self, key: VMKey) -> dict:
        try:
            with open(os.path.join(self.vm_dir(key), SPEC_FILE)) as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _crashed(self, key: VMKey) -> bool:
        """No live process, but the last one left its pid file: it did not exit cleanly (a
        clean quit removes it; a new start removes a stale one)."""
        return (os.path.exists(os.path.join(self.vm_dir(key), PID_FILE)) and not self._alive(key)
                and not self._incoming_pending(key))

    def _info(self, key: VMKey, status: dict | None) -> VMInfo:
        spec = self._read_spec(key)
        restarts = {"restarts": int(spec.get("restarts") or 0), "restarted_at": spec.get("restarted_at")}
        if status is None:
            state = VMState.INCOMING if self._incoming_pending(key) else VMState.STOPPED
            return VMInfo(key=key, state=state, crashed=state == VMState.STOPPED and self._crashed(key), **restarts)
        return VMInfo(
            key=key,
            state=_STATUS_TO_STATE.get(status.get("status"), VMState.PAUSED),
            pid=status.get("pid"),
            migration_id=status.get("migration_id"),
            **restarts,
        )

    # --- Driver protocol ----------------------------------------------------------

    def list_vms(self) -> list[VMInfo]:
        out = []
        try:
            names = sorted(os.listdir(self.vms_dir))
        except FileNotFoundError:
            return out
        for name in names:
            spec_path = os.path.join(self.vms_dir, name, SPEC_FILE)
            try:
                with open(spec_path) as f:
                    k = json.load(f)["key"]
                key = VMKey(k["namespace"], k["name"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            try:
                out.append(self._info(key, self._status(key)))
            except DriverError:
                # alive but not answering: it exists; never report it as stopped
                out.append(VMInfo(key=key, state=VMState.PAUSED))
        return out

    def start(self, spec: VMSpec) -> VMInfo:
        status = self._status(spec.key)
        if status is not None:
            return self._info(spec.key, status)
        if self._incoming_pending(spec.key):
            raise DriverError(f"{spec.key}: holds an unfinished incoming migration; destroy it first")
        restart = self._crashed(spec.key) and spec.power_on
        self._write_spec(spec, restarted=restart)
        if not spec.power_on:
            return VMInfo(key=spec.key, state=VMState.STOPPED)
        self._spawn(spec.key)
        return self._info(spec.key, self._status(spec.key))

    def stop(self, key: VMKey) -> None:
        self._quit(key)

    def destroy(self, key: VMKey) -> None:
        try:
            self._quit(key)
        except DriverError:
            pass
        if self._alive(key):
            self._kill(key)
        self._keep_write_log(key)
        self.launcher.release(key)
        shutil.rmtree(self.vm_dir(key), ignore_errors=True)

    def _keep_write_log(self, key: VMKey) -> None:
        """With ``write_log`` (a test feature), a destroyed VM's log of acknowledged writes is
        kept under ``<data_dir>/writelogs/`` so a checker can replay a droplet's whole history
        across hosts (the source's part of a migrated guest is destroyed with its copy)."""
        log_path = os.path.join(self.vm_dir(key), WRITE_LOG)
        if not self.write_log or not os.path.exists(log_path) or os.path.getsize(log_path) == 0:
            return
        keep = os.path.join(self.data_dir, "writelogs")
        os.makedirs(keep, exist_ok=True)
        os.replace(log_path, os.path.join(keep, f"{key.dirname}.{time.time_ns()}.log"))

    def prepare_incoming(self, spec: VMSpec, bind_host: str, secret: bytes, migration_id: str) -> str:
        status = self._status(spec.key)
        if status is not None:
            if status.get("status") == "inmigrate" and status.get("migration_id") == migration_id \
                    and status.get("migration_state") not in ("Failed", "Aborted"):
                st = self.execute(spec.key, "query-migrate")
                if st.get("address"):
                    return st["address"]
            if status.get("status") != "inmigrate":
                raise DriverError(f"{spec.key}: a VM of that name runs here ({status.get('status')})")
            self.destroy(spec.key)  # an incoming VM of another attempt
        elif self._alive(spec.key):
            raise DriverError(f"{spec.key}: a VM process of that name exists here but does not answer")
        elif os.path.exists(os.path.join(self.vm_dir(spec.key), SPEC_FILE)):
            if not self._incoming_pending(spec.key):
                raise DriverError(f"{spec.key}: a stopped VM of that name has its images here; not overwriting them")
            shutil.rmtree(self.vm_dir(spec.key), ignore_errors=True)  # partial images of an earlier attempt
        self._write_spec(spec, incoming=True)
        self._spawn(spec.key, "--incoming")
        host = bind_host or "127.0.0.1"
        listen = f"[{host}]:0" if ":" in host else f"{host}:0"
        ret = self.execute(spec.key, "migrate-incoming", {"listen": listen, "secret": bytes(secret).hex(), "id": migration_id,
                                                              "channel": self.channel})
        return ret["uri"] if ":" not in host else f"[{host}]:{ret['uri'].rpartition(':')[2]}"

    def start_migration(self, key: VMKey, target: str, secret: bytes, migration_id: str, options: MigrationOptions) -> None:
        if self._status(key) is None:
            if not options.offline:
                raise DriverError(f"{key}: VM is not running; only an offline migration can copy it")
            if not os.path.exists(os.path.join(self.vm_dir(key), SPEC_FILE)):
                raise DriverError(f"{key}: no such VM")
            if self._incoming_pending(key):
                raise DriverError(f"{key}: an unfinished incoming VM cannot migrate")
            self._spawn(key, "--stopped")
        self.execute(
            key,
            "migrate",
            {
                "uri": target,
                "secret": bytes(secret).hex(),
                "id": migration_id,
                "downtime_ms": options.downtime_budget_ms,
                "bandwidth_bps": options.bandwidth_bps,
                "offline": options.offline,
                "max_downtime_ms": options.max_downtime_ms,
                "force_complete": options.force_complete,
                "max_throttle_percent": options.max_throttle_percent,
                "channel": self.channel,
                "reads": self.reads,
            },
        )

    def force_complete(self, key: VMKey) -> None:
        if self._status(key) is None:
            raise DriverError(f"{key}: VM is not running")
        self.execute(key, "migrate-force-complete")

    def query_migration(self, key: VMKey) -> MigrationStats:
        if self._status(key) is not None:
            return stats_from_dict(self.execute(key, "query-migrate"))
        try:
            with open(os.path.join(self.vm_dir(key), MIGRATION_FILE)) as f:
                return stats_from_dict(json.load(f))
        except (OSError, ValueError):
            return MigrationStats()

    def wait_migration(self, key: VMKey, timeout: float) -> None:
        """The VM process answers ``wait-migrate`` when its migration has ended."""
        if not self._alive(key):
            return
        try:
            control.execute(self._sock(key), "wait-migrate", {"timeout": timeout}, timeout=timeout + 5.0)
        except (control.ControlError, control.ControlUnavailable, ValueError):
            return

    def cancel_migration(self, key: VMKey) -> None:
        if self._status(key) is None:
            return
        self.execute(key, "migrate_cancel", timeout=30.0)

    def resume(self, key: VMKey) -> None:
        self.execute(key, "cont")

    # --- extras (tests, CLI) ------------------------------------------------------------

    def set_workload(self, key: VMKey, pattern: str | None = None, write_rate_kibps: float | None = None) -> dict:
        args = {}
        if pattern is not None:
            args["pattern"] = pattern
        if write_rate_kibps is not None:
            args["write_rate_kibps"] = write_rate_kibps
        return self.execute(key, "set-workload", args)

    def pause(self, key: VMKey) -> None:
        self.execute(key, "stop")

    def digest(self, key: VMKey) -> str:
        """Digest of the VM's images by re-reading them (pause the guest for a stable answer)."""
        return self.execute(key, "query-digest", timeout=120.0)["digest"]

    def status(self, key: VMKey) -> dict | None:
        """The VM's query-status answer, or None if no process answers."""
        return self._status(key)

    def stats_dict(self, key: VMKey) -> dict:
        return dataclasses.asdict(self.query_migration(key))
