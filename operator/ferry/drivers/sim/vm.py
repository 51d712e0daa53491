"""A sim VM process: ``python -m ferry.drivers.sim.vm --dir <vm dir> [--incoming|--stopped]``.

One process per droplet, like a QEMU process. It owns ``disk.img`` and ``mem.img`` in its
directory, runs the guest workload thread, and answers a QMP-like JSON line protocol on
``control.sock``:

    query-status                          -> {status, running, pid, key, migration_id, role, seq, ...}
    stop / cont                           pause / run the guest (cont on a received target adopts it)
    quit                                  stop everything and exit
    migrate {uri, secret, id, downtime_ms, bandwidth_bps, offline, channel, max_downtime_ms,
             force_complete, max_throttle_percent, reads}
    migrate-force-complete                pause the guest now and finish the outgoing migration
    migrate-incoming {listen, secret, id, channel} -> {uri}
    query-migrate                         -> MigrationStats fields
    migrate_cancel                        abort the source side (resume the guest)
    set-workload {pattern, write_rate_kibps}
    query-digest                          -> {disk_root, memory_root, digest} by re-reading the images
    x-debug-corrupt {frame}               test hook: corrupt the Nth data frame sent (as a bad copy:
                                          without FLAG_LIVE, so the target fails at once)

``status`` is one of running, paused, stopped, inmigrate (a target not yet resumed),
finish-migrate (source paused for the final copy), postmigrate (source done, waiting for
cut-over). Secrets arrive hex-encoded over the (0600) control socket and are kept in
memory only. ``channel`` (``ferry.transfer.channel``): ``aes-256-gcm`` (the default) or
``plain``; an incoming VM given ``plain`` takes either, one given ``aes-256-gcm`` only that.
``reads``: how the source reads its images, ``mmap`` (the default: through a mapping, with
the resend rule, ``ferry.transfer.source``) or ``preadv`` (the copy it replaced: what the
data-plane benchmark compares it with in the same run).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import signal
import socketserver
import sys
import threading
import time

from ferry import failpoints, logs
from ferry.drivers.sim.layout import (
    DISK_FILE,
    GUEST_FILE,
    LOCK_FILE,
    MEMORY_FILE,
    MIGRATION_FILE,
    PID_FILE,
    SOCKET_FILE,
    SPEC_FILE,
    WRITE_LOG,
)
from ferry.drivers.sim.image import DISK_BLOCK_SIZE, MEMORY_PAGE_SIZE, Image
from ferry.drivers.sim.service import GuestService, identity_fields
from ferry.drivers.sim.workload import Guest, last_logged_seq, log_memory_lost
from ferry.transfer import session
from ferry.transfer.channel import AES_256_GCM, CHANNELS, PLAIN
from ferry.transfer.digest import combine, image_root
from ferry.transfer.policy import PolicyConfig
from ferry.transfer.source import SourceEngine
from ferry.transfer.target import TargetEngine

log = logging.getLogger("ferry.sim.vm")



#: how often a wait-migrate re-reads the state besides the finish callbacks' notices
WAIT_RECHECK_SECONDS = 0.25


class CommandError(Exception):
    def __init__(self, desc: str, cls: str = "GenericError"):
        super().__init__(desc)
        self.cls = cls


def _write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


class _EngineGuest:
    """The guest as the migration engine sees it."""

    def __init__(self, vm: "VM"):
        self.vm = vm

    def pause(self) -> bool:
        was = self.vm.guest.pause()
        self.vm.paused_at = time.time()
        failpoints.hit("vm.source-paused")
        return was

    def resume(self) -> None:
        if self.vm.power == "running":
            self.vm.guest.run()

    def set_throttle(self, disk_percent: int, memory_percent: int) -> None:
        self.vm.guest.set_throttle(disk_percent, memory_percent)

    def export_state(self) -> dict:
        return {**self.vm.guest.export_state(), "boot": self.vm.boot}


class VM:
    def __init__(self, vm_dir: str, *, incoming: bool = False, stopped: bool = False):
        self.dir = vm_dir
        with open(self.path(SPEC_FILE)) as f:
            self.spec = json.load(f)
        saved: dict = {}
        if not incoming and os.path.exists(self.path(GUEST_FILE)):
            with open(self.path(GUEST_FILE)) as f:
                saved = json.load(f)
        # The guest file says "clean" only after an orderly quit (close). Without it the last
        # process died (SIGKILL, a crash): like a real guest, the memory is gone and the guest
        # boots again from its disk, with a new boot number. An orderly stop keeps the memory
        # image (the sim's power-off is a managed save: a shortcut, see docs/failpoints.md).
        crashed = bool(saved) and not saved.get("clean", False)
        fresh = incoming
        self.disk = Image(self.path(DISK_FILE), self.spec["disk_bytes"], DISK_BLOCK_SIZE, fresh=fresh)
        self.memory = Image(self.path(MEMORY_FILE), self.spec["memory_bytes"], MEMORY_PAGE_SIZE,
                            fresh=fresh or crashed)
        workload = dict(self.spec.get("workload") or {})
        seq = int(saved.get("seq", 0))  # the workload itself comes from the spec
        #: boot number of the guest: 1 at creation, +1 each time it boots again from disk; it
        #: travels with a migration (a moved guest did not reboot); 0 for an incoming VM
        self.boot = 0 if incoming else int(saved.get("boot", 1)) + (1 if crashed else 0)
        self.memory_lost = crashed
        if not incoming and self.spec.get("write_log"):
            seq = max(seq, last_logged_seq(self.path(WRITE_LOG)))  # after a crash: never reuse a number
            if crashed:
                log_memory_lost(self.path(WRITE_LOG), seq, self.boot)
        if incoming:
            for stale in (MIGRATION_FILE, GUEST_FILE):
                try:
                    os.unlink(self.path(stale))
                except FileNotFoundError:
                    pass
        self.guest = Guest(
            self.disk,
            self.memory,
            pattern=workload.get("pattern") or "uniform",
            rate_kibps=workload.get("write_rate_kibps") or 0,
            seq=seq,
            log_path=self.path(WRITE_LOG) if self.spec.get("write_log") else None,
        )
        self.source: SourceEngine | None = None
        self.target: TargetEngine | None = None
        self.power = "inmigrate" if incoming else "stopped"
        self._lock = threading.RLock()
        #: notified when a migration of this VM ends a step the agent waits for (wait-migrate)
        self._changed = threading.Condition()
        self.paused_at: float | None = None  # wall clock of the source's pause for the final copy
        self.resumed_at: float | None = None  # wall clock of the target's resume
        self._corrupt_frame: int | None = None
        self.quit_event = threading.Event()
        self.service: GuestService | None = None
        if self.spec.get("ip") and int(self.spec.get("service_port") or 0) > 0:
            self.service = GuestService(
                self.spec["ip"], int(self.spec["service_port"]),
                running=lambda: self.power == "running" and self.guest.running,
                identity=lambda: identity_fields(self.spec.get("key"), str(self.spec.get("host") or ""), self.boot,
                                                 self.guest.seq))
            self.service.start()
        if not incoming:
            self._persist_guest()  # not clean from now on: a crash from here loses the memory
            if crashed:
                log.warning("the last VM process died: memory lost, guest boots from disk (boot %d)", self.boot)
        if not incoming and not stopped:
            self.power = "running"
            self.guest.run()

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    # --- state ------------------------------------------------------------------

    def status(self) -> str:
        if self.power == "inmigrate":
            return "inmigrate"
        src = self.source
        if src is not None:
            if src.state == session.PAUSED:
                return "finish-migrate"
            if src.state == session.COMPLETED:
                return "postmigrate"
        return self.power

    def _engine(self):
        return self.source or self.target

    def _guest_state(self, clean: bool = False) -> dict:
        return {**self.guest.export_state(), "boot": self.boot, "clean": clean}

    def _persist_guest(self) -> None:
        _write_json(self.path(GUEST_FILE), self._guest_state())

    def _persist_migration(self, stats: dict) -> None:
        try:
            _write_json(self.path(MIGRATION_FILE), stats)
        except OSError:
            log.exception("cannot persist migration stats")

    # --- commands ---------------------------------------------------------------

    # read-only commands answer without waiting for a state change in progress
    LOCK_FREE = frozenset({"query-status", "query-migrate", "query-digest", "wait-migrate"})

    def dispatch(self, command: str, args: dict) -> dict:
        handler = getattr(self, "cmd_" + command.replace("-", "_"), None)
        if handler is None:
            raise CommandError(f"unknown command {command!r}", "CommandNotFound")
        if command in self.LOCK_FREE:
            return handler(**args)
        with self._lock:
            return handler(**args)

    def cmd_query_status(self) -> dict:
        eng = self._engine()
        return {
            "status": self.status(),
            "running": self.guest.running,
            "pid": os.getpid(),
            "key": self.spec.get("key"),
            "migration_id": eng.migration_id if eng else None,
            "role": "source" if self.source else "target" if self.target else None,
            "migration_state": eng.state if eng else None,
            "seq": self.guest.seq,
            "boot": self.boot,
            "memory_lost": self.memory_lost,
            "workload": {"pattern": self.guest.pattern, "write_rate_kibps": self.guest.rate_kibps},
            "throttle": {"disk": self.guest.disk_throttle, "memory": self.guest.memory_throttle},
            "bytes_written": self.guest.bytes_written,
            "disk_bytes": self.disk.size,
            "memory_bytes": self.memory.size,
            "service": ({"ip": self.service.ip, "port": self.service.port, "bound": self.service.bound,
                         "answered": self.service.answered} if self.service else None),
        }

    def cmd_stop(self) -> dict:
        if self.power == "running":
            self.power = "paused"
            self.guest.pause()
            self._persist_guest()
        return {}

    def cmd_cont(self) -> dict:
        if self.power == "inmigrate":
            tgt = self.target
            if tgt is None or tgt.state != session.RECEIVED:
                raise CommandError("incoming migration not received and verified yet", "MigrationNotReceived")
            failpoints.hit("vm.target-before-resume")
            state = tgt.guest_state or {}
            self.guest.seq = int(state.get("seq", self.guest.seq))
            self.boot = int(state.get("boot", 1))  # the same guest, still in its boot
            if state.get("pattern"):
                self.guest.set_workload(state["pattern"], float(state.get("write_rate_kibps") or 0))
            self._persist_guest()  # before the spec says it is ours: a crash from here reboots it, never renumbers
            self.spec["incoming_pending"] = False
            _write_json(self.path(SPEC_FILE), self.spec)
            self.power = "running"
            self.guest.run()
            self.resumed_at = time.time()
            self._persist_guest()
            log.info("resumed after incoming migration %s (seq %d)", tgt.migration_id, self.guest.seq)
            return {}
        src = self.source
        if src is not None and src.state not in (session.FAILED, session.ABORTED):
            raise CommandError(f"migration {src.migration_id} is {src.state}; cancel it first", "MigrationActive")
        self.power = "running"
        self.guest.run()
        return {}

    def cmd_quit(self) -> dict:
        self.quit_event.set()
        return {}

    def cmd_set_workload(self, pattern: str | None = None, write_rate_kibps: float | None = None) -> dict:
        try:
            self.guest.set_workload(pattern or self.guest.pattern,
                                    self.guest.rate_kibps if write_rate_kibps is None else float(write_rate_kibps))
        except ValueError as e:
            raise CommandError(str(e), "InvalidParameter") from None
        return {"pattern": self.guest.pattern, "write_rate_kibps": self.guest.rate_kibps}

    def cmd_x_debug_corrupt(self, frame: int = 1) -> dict:
        self._corrupt_frame = int(frame)
        if self.source is not None and not self.source.finished:
            self.source.corrupt_data_frame = int(frame)
        return {}

    def cmd_migrate(self, uri: str, secret: str, id: str, downtime_ms: int = 300, bandwidth_bps: int | None = None,
                    offline: bool = False, channel: str = AES_256_GCM, max_downtime_ms: int | None = None,
                    force_complete: bool = False, max_throttle_percent: int = 99, reads: str = "mmap",
                    **_ignored) -> dict:
        if self.power == "inmigrate":
            raise CommandError("an incoming VM cannot migrate out", "InvalidState")
        if self.source is not None and not self.source.finished:
            if self.source.migration_id == id:
                return {}  # idempotent
            raise CommandError(f"migration {self.source.migration_id} in progress", "MigrationActive")
        if self.source is not None and self.source.state == session.COMPLETED:
            raise CommandError("a completed migration is waiting for cut-over; cancel it first", "MigrationActive")
        if self.power == "stopped" and not offline:
            raise CommandError("the VM is stopped: use an offline migration", "InvalidState")
        try:
            key = bytes.fromhex(secret)
        except ValueError:
            raise CommandError("secret must be hex", "InvalidParameter") from None
        if channel not in CHANNELS:
            raise CommandError(f"channel must be one of {', '.join(CHANNELS)}", "InvalidParameter")
        if reads not in ("mmap", "preadv"):
            raise CommandError("reads must be mmap or preadv", "InvalidParameter")
        eng = SourceEngine(
            disk=self.disk,
            memory=self.memory,
            guest=_EngineGuest(self),
            target=uri,
            secret=key,
            migration_id=id,
            policy=PolicyConfig(downtime_budget_ms=int(downtime_ms),
                                max_downtime_ms=int(max_downtime_ms) if max_downtime_ms else None,
                                throttle_max=max(1, min(99, int(max_throttle_percent)))),
            force_complete=bool(force_complete),
            bandwidth_bps=int(bandwidth_bps) if bandwidth_bps else None,
            offline=bool(offline),
            on_finish=self._source_finished,
            channel=channel,
            reads=reads,
        )
        if self._corrupt_frame is not None:
            eng.corrupt_data_frame, self._corrupt_frame = self._corrupt_frame, None
        self.source, self.target = eng, None
        self.paused_at = None
        # On disk before a byte moves: if this process dies mid-copy, the agent still learns
        # which migration it was sending (and says the source failed, not the target).
        self._persist_migration({**eng.stats(), "state": session.COPYING})
        eng.start()
        log.info("migration %s to %s started (offline=%s, budget %s ms, limit %s B/s)", id, uri, offline, downtime_ms, bandwidth_bps)
        return {}

    def _source_finished(self, eng: SourceEngine) -> None:
        self._persist_migration({**eng.stats(), "paused_at": self.paused_at})
        self._persist_guest()
        self.changed()
        if eng.state == session.COMPLETED:
            failpoints.hit("vm.source-completed")

    def cmd_migrate_force_complete(self) -> dict:
        if self.source is None or self.source.finished:
            raise CommandError("no outgoing migration in progress", "InvalidState")
        self.source.force_complete()
        return {}

    def cmd_migrate_incoming(self, listen: str, secret: str, id: str, channel: str = AES_256_GCM) -> dict:
        if self.power != "inmigrate":
            raise CommandError("not an incoming VM", "InvalidState")
        if self.target is not None and self.target.state not in session.TERMINAL:
            if self.target.migration_id == id:
                host, port = self.target.address
                return {"uri": f"{host}:{port}"}
            raise CommandError(f"already waiting for migration {self.target.migration_id}", "MigrationActive")
        if self.target is not None:
            raise CommandError("this incoming VM was used already; prepare a new one", "InvalidState")
        host, _, port = listen.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        try:
            key = bytes.fromhex(secret)
        except ValueError:
            raise CommandError("secret must be hex", "InvalidParameter") from None
        if channel not in CHANNELS:
            raise CommandError(f"channel must be one of {', '.join(CHANNELS)}", "InvalidParameter")
        eng = TargetEngine(
            disk=self.disk, memory=self.memory, secret=key, migration_id=id, allow_plain=channel == PLAIN,
            on_finish=self._target_finished,
        )
        try:
            addr = eng.listen(host, int(port or 0))
        except (OSError, ValueError) as e:
            raise CommandError(f"cannot listen on {listen}: {e}", "InvalidParameter") from None
        self.target = eng
        eng.start()
        log.info("waiting for migration %s on %s:%s", id, *addr)
        return {"uri": f"{addr[0]}:{addr[1]}"}

    def _target_finished(self, eng: TargetEngine) -> None:
        self._persist_migration(eng.stats())
        self.changed()
        if eng.state == session.RECEIVED:
            failpoints.hit("vm.target-received")

    def changed(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def _migration_state(self) -> str:
        eng = self._engine()
        return eng.state if eng is not None else session.NONE

    def cmd_wait_migrate(self, timeout: float = 10.0) -> dict:
        """Answer when the migration has ended (Completed, Received, Failed, Aborted; or there is
        none), or after ``timeout`` s, at most 30: the agent learns that a copy ended when it
        does, not at its next poll. The engines' finish callbacks notify; the state is also read
        every WAIT_RECHECK_SECONDS."""
        end = time.monotonic() + min(max(float(timeout), 0.0), 30.0)
        with self._changed:
            while self._migration_state() not in session.TERMINAL and self._engine() is not None:
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(min(left, WAIT_RECHECK_SECONDS))
        return self.cmd_query_migrate()

    def cmd_query_migrate(self) -> dict:
        eng = self._engine()
        if eng is not None:
            return {**eng.stats(), "paused_at": self.paused_at, "resumed_at": self.resumed_at}
        try:
            with open(self.path(MIGRATION_FILE)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {"state": session.NONE}

    def cmd_migrate_cancel(self) -> dict:
        src, tgt = self.source, self.target
        if src is not None:
            if src.state == session.COMPLETED:
                src.abort_completed()
                self._persist_migration(src.stats())
            elif not src.finished:
                src.cancel()
                self._lock.release()  # let the engine's guest callbacks run while we wait
                try:
                    src.join(15)
                finally:
                    self._lock.acquire()
            return src.stats()
        if tgt is not None:
            tgt.cancel("cancelled")
            return tgt.stats()
        return {"state": session.NONE}

    def cmd_query_digest(self) -> dict:
        disk_root = image_root(self.disk.fd, self.disk.size, self.disk.block_size)
        mem_root = image_root(self.memory.fd, self.memory.size, self.memory.block_size)
        return {"disk_root": disk_root.hex(), "memory_root": mem_root.hex(), "digest": combine(disk_root, mem_root)}

    # --- shutdown ---------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self.source is not None and not self.source.finished:
                self.source.cancel()
        if self.source is not None:
            self.source.join(10)
        if self.target is not None:
            self.target.cancel("VM quit")
        was_running = self.guest.running
        if self.service is not None:
            self.service.stop()
        self.guest.shutdown()
        if self.power != "inmigrate":
            state = self._guest_state(clean=True)
            state["was_running"] = was_running
            _write_json(self.path(GUEST_FILE), state)
        self.disk.close()
        self.memory.close()


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        vm: VM = self.server.vm  # type: ignore[attr-defined]
        for line in self.rfile:
            if not line.strip():
                continue
            command = None
            try:
                req = json.loads(line)
                command = req["execute"]
                args = req.get("arguments") or {}
                if not isinstance(args, dict):
                    raise CommandError("arguments must be an object", "InvalidParameter")
                resp = {"return": vm.dispatch(command, args)}
            except CommandError as e:
                resp = {"error": {"class": e.cls, "desc": str(e)}}
            except TypeError as e:
                resp = {"error": {"class": "InvalidParameter", "desc": str(e)}}
            except (ValueError, KeyError) as e:
                resp = {"error": {"class": "GenericError", "desc": f"bad request: {e}"}}
            except Exception as e:  # noqa: BLE001
                log.exception("command %s failed", command)
                resp = {"error": {"class": "GenericError", "desc": str(e)}}
            try:
                self.wfile.write(json.dumps(resp).encode() + b"\n")
                self.wfile.flush()
            except OSError:
                return


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ferry-sim-vm")
    parser.add_argument("--dir", required=True)
    parser.add_argument("--incoming", action="store_true", help="wait for an incoming migration (fresh images)")
    parser.add_argument("--stopped", action="store_true", help="do not start the guest")
    args = parser.parse_args(argv)
    logs.configure(logging.INFO)
    vm_dir = os.path.abspath(args.dir)
    lock_fd = os.open(os.path.join(vm_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
    # the agent tests this lock for an instant (ferry.drivers.launcher.vm_alive): retry briefly
    for attempt in range(50):
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if attempt == 49:
                log.error("another VM process owns %s", vm_dir)
                return 3
            time.sleep(0.02)
    vm = VM(vm_dir, incoming=args.incoming, stopped=args.stopped)
    # bind by a name relative to the VM directory: the absolute path may exceed sun_path
    os.chdir(vm_dir)
    try:
        os.unlink(SOCKET_FILE)
    except FileNotFoundError:
        pass
    old_umask = os.umask(0o177)
    try:
        server = _Server(SOCKET_FILE, _Handler)
    finally:
        os.umask(old_umask)
    server.vm = vm  # type: ignore[attr-defined]
    signal.signal(signal.SIGTERM, lambda *_: vm.quit_event.set())
    signal.signal(signal.SIGINT, lambda *_: vm.quit_event.set())
    with open(vm.path(PID_FILE) + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(vm.path(PID_FILE) + ".tmp", vm.path(PID_FILE))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    log.info("VM %s started (pid %d, status %s)", vm.spec.get("key"), os.getpid(), vm.status())
    while not vm.quit_event.wait(1.0):
        pass
    log.info("quitting")
    server.shutdown()
    server.server_close()
    vm.close()
    for name in (SOCKET_FILE, PID_FILE):
        try:
            os.unlink(vm.path(name))
        except FileNotFoundError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
