"""Live migration with non-shared storage, in libvirt's sequence.

Target (``prepare_incoming``, in driver.py): QEMU started with ``-S -incoming defer``;
TLS-PSK credentials derived from the migration's secret; ``nbd-server-start`` on the
migration's address with a writable ``block-export-add`` of its disk;
``migrate-incoming`` on the same address (NBD listens on the next port). A
:class:`TargetMigration` thread then watches ``query-migrate`` and, once the stream is
complete, removes the export, stops the NBD server and freezes the received disk (below); the
guest stays paused until ``resume()``, which starts :class:`FrozenVerify`.

Source (:class:`SourceMigration`, a thread per migration, since ``start_migration``
returns at once): ``blockdev-add`` an NBD client node for the target's export (TLS),
``blockdev-mirror`` (sync full) until ``BLOCK_JOB_READY``; migration capabilities
(events, auto-converge, pause-before-switchover) and parameters (downtime-limit,
max-bandwidth, tls-creds); ``migrate``; at ``pre-switchover`` (guest paused)
``block-job-cancel`` of the READY mirror, which completes it consistently, then
``migrate-continue``; on ``completed`` ``blockdev-del`` the NBD node, report Completed, then
compute the digest of the paused disk. Any failure or cancel before that rolls back: ``migrate_cancel``, forced
``block-job-cancel``, ``blockdev-del``, ``object-del`` and ``cont``: the source runs
on its own disk, which the mirror only ever read.

Verification (what "verified" means for qemu; docs/architecture.md): the whole disk, every
byte, hashed on both sides with the same scheme (XXH3-128 per 1 MiB block, SHA-256 over the
block hashes: ``ferry.transfer.digest``), reading only the ranges that hold data
(SEEK_DATA/SEEK_HOLE; holes hash as zeros without a read), OUTSIDE the downtime, against a
frozen point. Live migration: once the incoming stream completed, the still paused target puts
a qcow2 overlay on its ``disk0`` node (``blockdev-snapshot-sync``, milliseconds whatever the
size): the raw image becomes a read-only backing file that stays exactly as received, and the
guest's new writes go to the overlay. The target reports Received with ``frozen_point`` and no
digest; the operator moves the record on that, and the guest runs again on the target without
waiting for any hash. After ``cont`` (``driver.resume``) a :class:`FrozenVerify` thread hashes
the frozen base, then ``block-commit`` + ``job-complete`` put the guest back on its one raw
image. The source, paused for good after ``completed``, reports Completed with QEMU's downtime
at once and then hashes its own disk, which nothing writes any more. The operator compares the
two digests after the resume and fails the migration loudly on a difference (the source keeps
its paused copy). An offline migration (no guest runs) hashes both sides before Completed /
Received. Memory is not hashed: QEMU's migration stream carries no end-to-end checksum of RAM;
TLS (the PSK channel) authenticates every record of it on the wire, and QEMU's dirty logging
decides what is resent. The qemu tests check memory from inside the guest (a checksum of a
region written once at boot, printed before and after the move).

Force-complete (``force_complete``): the guest is stopped at once (QMP ``stop``) and the
downtime-limit raised to QEMU's maximum, so the mirror and the memory copy finish with the
guest paused; the downtime is measured from that stop. Post-copy is not used: the target
would have to run before the copy ends (before the placement record may name it), and a
crash of either side during post-copy loses the guest, whose state is split between them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pathlib
import shutil
import threading
import time
from collections.abc import Callable
from typing import Any

from ferry import failpoints
from ferry.drivers.base import DriverError, MigrationOptions, MigrationState, MigrationStats
from ferry.transfer.digest import data_bytes, sparse_image_root
from ferry.transfer.policy import KindSample, PolicyConfig, PolicyInput, RoundStep, after_round

from .config import (
    PSK_USERNAME,
    UNLIMITED_BANDWIDTH,
    QemuConfig,
    VMLayout,
    format_address,
    nbd_port,
    psk_file_text,
    safe_id,
)
from .qmp import QMPClient, QMPConnectionError, QMPError, QMPEvent
from .stats import StatsTracker, stats_to_dict

log = logging.getLogger("ferry.drivers.qemu")

POLL = 0.2
EXPORT_NAME = "disk0"
FINAL_STATES = {MigrationState.COMPLETED, MigrationState.RECEIVED, MigrationState.FAILED, MigrationState.ABORTED}


class Cancelled(Exception):
    pass


class Detached(Exception):
    """The driver let go of this migration (agent shutting down): stop without acting."""


# QEMU keeps a block node name in char[32]: longer names fail ("Node name too long").
QEMU_NAME_MAX = 31


def object_ids(migration_id: str) -> dict[str, str]:
    """QEMU ids of everything a migration adds, derived from its id (so a restarted
    agent can find and remove them). A long id (``<namespace>/<name>#<attempt>``) is
    shortened to a prefix plus a hash, so that every id fits QEMU_NAME_MAX."""
    s = safe_id(migration_id)
    room = QEMU_NAME_MAX - len("ferry-mirror-")  # the longest prefix below
    if len(s) > room:
        s = s[: room - 9] + "-" + hashlib.sha256(migration_id.encode()).hexdigest()[:8]
    return {
        "tls": f"ferry-tls-{s}",
        "node": f"ferry-nbd-{s}",
        "job": f"ferry-mirror-{s}",
        "export": f"ferry-export-{s}",
        "nbd_fd": f"ferry-nbdfd-{s}",
    }


def mirror_buf_size(bandwidth_bps: int) -> int:
    """The mirror's in-flight buffer for a rate limit: ~0.5 s of data, 1..16 MiB,
    a power of two (QEMU needs a multiple of the granularity)."""
    want = min(max(bandwidth_bps // 2, 1 << 20), 16 << 20)
    return 1 << (want.bit_length() - 1)


def write_psk(layout: VMLayout, secret: bytes, migration_id: str) -> pathlib.Path:
    """``<vm>/tls-<id>/keys.psk`` (mode 0600), the file QEMU's tls-creds-psk reads."""
    d = layout.tls_dir(migration_id)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = d / "keys.psk"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(psk_file_text(secret, migration_id))
    return d


def add_tls_creds(qmp: QMPClient, layout: VMLayout, secret: bytes, migration_id: str, endpoint: str) -> str:
    ids = object_ids(migration_id)
    d = write_psk(layout, secret, migration_id)
    args: dict[str, Any] = {"qom-type": "tls-creds-psk", "id": ids["tls"], "endpoint": endpoint, "dir": str(d)}
    if endpoint == "client":
        args["username"] = PSK_USERNAME
    qmp.execute("object-add", args)
    return ids["tls"]


def remove_tls_creds(qmp: QMPClient | None, layout: VMLayout, migration_id: str) -> None:
    if qmp is not None:
        with contextlib.suppress(QMPError, QMPConnectionError):
            qmp.execute("object-del", {"id": object_ids(migration_id)["tls"]})
    shutil.rmtree(layout.tls_dir(migration_id), ignore_errors=True)


DIGEST_BLOCK = 1 << 20
MAX_DOWNTIME_LIMIT_MS = 2_000_000  # QEMU's ceiling for downtime-limit (2000 s)


def disk_hash(path: pathlib.Path, size: int) -> tuple[str, int, int]:
    """The digest both ends report for the operator to compare, the milliseconds it took and
    the bytes it read: ``sha256:`` + the root of the raw image's XXH3-128 block hashes
    (``ferry.transfer.digest``, 1 MiB blocks; a short file's tail and holes count as zeros,
    as the guest reads them; only ranges holding data are read)."""
    t0 = time.monotonic()
    fd = os.open(path, os.O_RDONLY)
    try:
        hashed = data_bytes(fd, size, DIGEST_BLOCK)
        root = sparse_image_root(fd, size, DIGEST_BLOCK)
    finally:
        os.close(fd)
    return "sha256:" + root.hex(), int(round((time.monotonic() - t0) * 1000)), hashed


def disk_digest(path: pathlib.Path, size: int) -> tuple[str, int]:
    """``disk_hash`` without the byte count."""
    digest, ms, _ = disk_hash(path, size)
    return digest, ms


def write_json(path: pathlib.Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


class _Migration:
    """What source and target migrations share: a thread, a stats snapshot, persistence."""

    role = ""

    def __init__(self, migration_id: str, layout: VMLayout, config: QemuConfig, qmp: QMPClient):
        self.migration_id = migration_id
        self.layout = layout
        self.config = config
        self.qmp = qmp
        self.lock = threading.Lock()
        self.tracker = StatsTracker(migration_id)
        self.cancel_requested = threading.Event()
        self.detached = threading.Event()
        self.done = threading.Event()
        self._last_persist = 0.0
        self.thread = threading.Thread(target=self._main, name=f"ferry-qemu-{self.role}:{migration_id}", daemon=True)

    def start(self) -> None:
        self.persist(force=True)
        self.thread.start()

    @property
    def state(self) -> MigrationState:
        with self.lock:
            return self.tracker.stats.state

    @property
    def finished(self) -> bool:
        return self.done.is_set()

    def snapshot(self) -> MigrationStats:
        with self.lock:
            return self.tracker.snapshot()

    def detach(self) -> None:
        self.detached.set()
        self.cancel_requested.set()

    def persist(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_persist < 1.0:
            return
        self._last_persist = now
        with self.lock:
            data = stats_to_dict(self.tracker.stats)
        data["role"] = self.role
        with contextlib.suppress(OSError):
            write_json(self.layout.migration, data)

    def set_state(self, state: MigrationState, error: str | None = None) -> None:
        with self.lock:
            self.tracker.stats.state = state
            if error is not None:
                self.tracker.stats.error = error
        self.persist(force=True)

    def _sleep(self, seconds: float = POLL) -> None:
        if self.cancel_requested.wait(seconds):
            self._check()

    def _check(self) -> None:
        if self.detached.is_set():
            raise Detached()
        if self.cancel_requested.is_set():
            raise Cancelled()

    def _main(self) -> None:
        try:
            self.run()
        except Detached:
            pass
        except Exception:  # noqa: BLE001 - a thread must never die silently
            log.exception("%s migration %s crashed", self.role, self.migration_id)
            with contextlib.suppress(Exception):
                self.set_state(MigrationState.FAILED, "driver thread crashed (see agent log)")
        finally:
            self.done.set()

    def run(self) -> None:
        raise NotImplementedError


class SourceMigration(_Migration):
    role = "source"

    def __init__(
        self,
        *,
        migration_id: str,
        layout: VMLayout,
        config: QemuConfig,
        qmp: QMPClient,
        target_host: str,
        target_port: int,
        secret: bytes,
        options: MigrationOptions,
        disk_bytes: int,
        offline: bool,
        stop_vm: Callable[[], None],
        on_settled: Callable[[MigrationState], None] | None = None,
        recover: bool = False,
    ):
        super().__init__(migration_id, layout, config, qmp)
        self.target_host = target_host
        self.target_port = target_port
        self.secret = secret
        self.options = options
        self.disk_bytes = disk_bytes
        self.offline = offline
        self.stop_vm = stop_vm
        self.on_settled = on_settled
        self.recover = recover
        self.ids = object_ids(migration_id)
        # what has been set up, so a rollback undoes exactly that
        self._tls = self._node = self._mirror = self._migrate = recover
        self._force = threading.Event()
        self._forced_at: float | None = None  # when force-complete stopped the guest
        self._begun_wall = time.time()  # QEMU events stamped before this are an earlier migration's
        # downtime steps: ferry's policy decides them per dirty-sync round (QEMU's auto-converge
        # does the throttle and the switchover itself)
        self._policy = PolicyConfig(downtime_budget_ms=max(1, int(options.downtime_budget_ms)),
                                    max_downtime_ms=options.max_downtime_ms,
                                    throttle_max=max(1, min(99, int(options.max_throttle_percent))))
        self._allowed_ms = float(self._policy.downtime_budget_ms)
        self._at_limit = 0
        self._policy_round = 0
        self._prev_remaining: int | None = None
        if options.force_complete:
            self._force.set()

    def force_complete(self) -> None:
        """Stop the guest now and finish whatever the budget (acted on by the migration thread)."""
        self._force.set()

    def _check(self) -> None:
        super()._check()
        if self._force.is_set() and self._forced_at is None and not self.offline:
            self._do_force()

    def _do_force(self) -> None:
        q = self.qmp
        self._forced_at = time.monotonic()
        if q.execute("query-status").get("status") == "running":
            q.execute("stop")
        with contextlib.suppress(QMPError):
            q.execute("migrate-set-parameters", {"downtime-limit": MAX_DOWNTIME_LIMIT_MS})
        with self.lock:
            self.tracker.stats.forced = True
        log.info("migration %s: force-complete, guest stopped", self.migration_id)

    def cancel(self, wait: float = 60.0) -> None:
        self.cancel_requested.set()
        self.done.wait(wait)

    def run(self) -> None:
        try:
            self._run_or_recover()
        finally:
            if self.on_settled is not None and not self.detached.is_set():
                self.on_settled(self.state)

    def _run_or_recover(self) -> None:
        if self.recover:
            self._recover()
            return
        try:
            self._run()
        except Cancelled:
            self._rollback(MigrationState.ABORTED, "cancelled")
        except Detached:
            raise
        except (DriverError, QMPError, QMPConnectionError, OSError) as exc:
            if self.detached.is_set():
                raise Detached() from exc
            log.warning("migration %s failed: %s", self.migration_id, exc)
            self._rollback(MigrationState.FAILED, str(exc))

    # -- the sequence ----------------------------------------------------------------

    def _run(self) -> None:
        q = self.qmp
        self.set_state(MigrationState.COPYING)
        bandwidth = self.options.bandwidth_bps or 0
        add_tls_creds(q, self.layout, self.secret, self.migration_id, "client")
        self._tls = True
        self._check()
        q.execute(
            "blockdev-add",
            {
                "driver": "nbd",
                "node-name": self.ids["node"],
                "server": {"type": "inet", "host": self.target_host, "port": str(nbd_port(self.target_port))},
                "export": EXPORT_NAME,
                "tls-creds": self.ids["tls"],
            },
            timeout=60,
        )
        self._node = True
        self._check()
        since = q.event_seq
        mirror: dict[str, Any] = {
            "job-id": self.ids["job"],
            "device": "disk0",
            "target": self.ids["node"],
            "sync": "full",
            "speed": bandwidth,
            "copy-mode": self.config.mirror_copy_mode,
        }
        if bandwidth:
            # with a rate limit, keep at most ~0.5 s of data in flight (QEMU's default is
            # 16 MiB): progress stays smooth and a dead target is noticed within seconds
            mirror["buf-size"] = mirror_buf_size(bandwidth)
        q.execute("blockdev-mirror", mirror)
        self._mirror = True
        # 1. copy the disk until the mirror is READY (then it mirrors every new write)
        while True:
            self._check()
            job = self._mirror_job()
            now = time.monotonic()
            with self.lock:
                self.tracker.update_mirror(job, now)
            self.persist()
            if job is None:
                raise DriverError(f"disk mirror ended early: {self._job_end_reason(since)}")
            if job.get("ready") or job.get("status") == "ready":
                break
            if job.get("status") in ("aborting", "concluded", "null"):
                raise DriverError(f"disk mirror ended early: {self._job_end_reason(since)}")
            self._sleep()
        # 2. memory: pre-copy rounds with auto-converge, pausing before the switchover
        caps = ["events", "auto-converge", "pause-before-switchover"]
        q.execute("migrate-set-capabilities", {"capabilities": [{"capability": c, "state": True} for c in caps]})
        q.execute(
            "migrate-set-parameters",
            {
                "tls-creds": self.ids["tls"],
                "downtime-limit": MAX_DOWNTIME_LIMIT_MS if self._forced_at is not None
                else max(1, int(self.options.downtime_budget_ms)),
                "max-bandwidth": bandwidth or UNLIMITED_BANDWIDTH,
            },
        )
        with self.lock:
            self.tracker.stats.downtime_budget_ms = int(self.options.downtime_budget_ms)
            self.tracker.stats.max_downtime_ms = max(int(self.options.downtime_budget_ms),
                                                     int(self.options.max_downtime_ms or 0))
            self.tracker.stats.allowed_downtime_ms = int(self.options.downtime_budget_ms)
        self._check()
        uri = "tcp:" + format_address(self.target_host, self.target_port)
        q.execute("migrate", {"uri": uri})
        self._migrate = True
        while True:
            self._check()
            status = self._sample()
            if status == "pre-switchover":
                break
            if status == "active" and self._forced_at is None:
                self._downtime_step()
            if status in ("failed", "cancelled", "cancelling"):
                raise DriverError(f"migration {status}: {self._migration_error()}")
            if self._mirror_job() is None:
                raise DriverError(f"disk mirror ended during the memory copy: {self._job_end_reason(since)}")
            self._sleep()
        # 3. switchover: guest paused; finish the mirror consistently, then the device state
        self._check()
        since = q.event_seq
        q.execute("block-job-cancel", {"device": self.ids["job"]})
        ev = self._wait_job_end(since, timeout=120)
        if ev is None:
            raise DriverError("disk mirror did not finish at the switchover within 120 s")
        if ev.name != "BLOCK_JOB_COMPLETED" or ev.data.get("error"):
            peer = self._mirror_write_failed(since)
            raise DriverError(peer or f"disk mirror did not complete: {ev.name} {ev.data.get('error', '')}".strip())
        with self.lock:
            self.tracker.update_mirror(ev.data, time.monotonic())
            self.tracker.mirror_done()
        self._mirror = False
        self._check()
        q.execute("migrate-continue", {"state": "pre-switchover"})
        while True:
            status = self._sample()
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                raise DriverError(f"migration {status} at the switchover: {self._migration_error()}")
            self._sleep(0.05)
        self._settle_downtime()
        self._finish()

    def _downtime_step(self) -> None:
        """After each new dirty-sync round: raise downtime-limit one step when auto-converge
        is at its maximum and the rest still does not fit; fail NotConverging at the ceiling."""
        with self.lock:
            st = self.tracker.stats
            rnd, remaining, bw, throttle = st.round, st.memory.remaining, st.bandwidth_bps, st.throttle_percent
        if rnd <= self._policy_round or rnd < 2:
            return
        self._policy_round = rnd
        d = after_round(self._policy, PolicyInput(
            round=rnd, disk=KindSample(0, 0), memory=KindSample(remaining, self._prev_remaining, throttle),
            bandwidth_bps=float(bw), allowed_downtime_ms=self._allowed_ms, rounds_at_limit=self._at_limit))
        self._prev_remaining = remaining
        self._at_limit = d.rounds_at_limit
        if d.action is RoundStep.FAIL and d.not_converging:
            raise DriverError(d.reason)
        if d.allowed_downtime_ms > self._allowed_ms:
            self._allowed_ms = d.allowed_downtime_ms
            self.qmp.execute("migrate-set-parameters", {"downtime-limit": int(round(self._allowed_ms))})
            with self.lock:
                self.tracker.stats.downtime_steps += 1
                self.tracker.stats.allowed_downtime_ms = int(round(self._allowed_ms))
            log.info("migration %s: %s", self.migration_id, d.reason)

    def _settle_downtime(self) -> None:
        """QEMU sets "completed" a moment before it computes the downtime (it reads 0
        until then): sample again until it is there, for at most a second."""
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            qm = self.qmp.execute("query-migrate")
            if qm.get("downtime"):
                with self.lock:
                    self.tracker.update_migration(qm, time.monotonic())
                return
            time.sleep(0.02)

    def _finish(self) -> None:
        """After ``completed``: drop the NBD node and credentials and report Completed with
        QEMU's downtime; then hash the paused source's disk and report the digest. A live
        migration's target froze its copy at the switchover, so nobody waits for this hash: the
        operator moves the record on the frozen point and compares the digests after the
        resume. An offline migration (no guest runs) hashes before Completed."""
        with contextlib.suppress(QMPError):
            self.qmp.execute("blockdev-del", {"node-name": self.ids["node"]})
        self._node = False
        remove_tls_creds(self.qmp, self.layout, self.migration_id)
        self._tls = False
        if self.offline:
            self._hash()
        with self.lock:
            self.tracker.mirror_done()
            st = self.tracker.stats
            if self._forced_at is not None:
                # QEMU's figure is its own stop -> completed; force-complete stopped the guest
                # earlier (the hash after this is not downtime: the target resumes without it)
                st.downtime_ms = max(st.downtime_ms or 0, int(round((time.monotonic() - self._forced_at) * 1000)))
            self.tracker.stats.throttle_percent = 0
            if not self.offline:
                # when the guest stopped for the switchover: QEMU's STOP event, stamped by QEMU
                stops = [e for e in self.qmp.events() if e.name == "STOP" and e.timestamp >= self._begun_wall]
                st.paused_at = stops[-1].timestamp if stops else None
            if self.offline:
                # one copy of a stopped VM: no rounds, and no guest to be down
                self.tracker.stats.round = 1
                self.tracker.stats.rounds = []
                self.tracker.stats.downtime_ms = None
                self.tracker.stats.expected_downtime_ms = 0
            self.tracker.stats.state = MigrationState.COMPLETED
        self.persist(force=True)
        log.info("migration %s completed, downtime %s ms", self.migration_id, self.tracker.stats.downtime_ms)
        if not self.offline and self.snapshot().digest is None:
            failpoints.hit("qemu.source-before-hash")
            self._hash()
            log.info("migration %s: paused source hashed after the switchover (%s ms, %s bytes)", self.migration_id,
                     self.tracker.stats.verify_ms, self.tracker.stats.hashed_bytes)

    def _hash(self) -> None:
        digest, verify_ms, hashed = disk_hash(self.layout.disk, self.disk_bytes)
        with self.lock:
            self.tracker.stats.digest = digest
            self.tracker.stats.verify_ms = verify_ms
            self.tracker.stats.hashed_bytes = hashed
        self.persist(force=True)

    # -- rollback ------------------------------------------------------------------

    def _rollback(self, state: MigrationState, reason: str) -> None:
        """Undo what was set up; the source keeps running on its own disk."""
        q = self.qmp
        problems: list[str] = []

        def step(what: str, fn: Callable[[], Any]) -> None:
            try:
                fn()
            except (QMPError, QMPConnectionError, DriverError, OSError) as exc:
                problems.append(f"{what}: {exc}")

        if self._migrate:
            step("migrate_cancel", lambda: q.execute("migrate_cancel"))
            step("wait for the cancel", self._wait_migration_ended)
        if self._mirror:
            step("block-job-cancel", lambda: self._force_cancel_mirror())
        if self._node:
            step("blockdev-del", lambda: self._blockdev_del())
        if self._tls or self.recover:
            remove_tls_creds(None if q.closed else q, self.layout, self.migration_id)
        lost = q.closed
        if self.offline:
            step("stop the offline source", self.stop_vm)
        elif not lost:
            step("resume the guest", self._resume_guest)
        with self.lock:
            self.tracker.stats.throttle_percent = 0
        if problems:
            log.warning("rollback of %s: %s", self.migration_id, "; ".join(problems))
        if lost:
            # the source QEMU itself is gone (or unreachable): nothing runs any more
            self.set_state(MigrationState.FAILED, f"{reason}; the source QEMU is gone or unreachable")
        else:
            self.set_state(state, reason if state == MigrationState.FAILED else None)

    def _wait_migration_ended(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status = self._sample()
            if status in ("cancelled", "failed", "completed", "", None):
                return
            time.sleep(0.05)
        raise DriverError("migration did not end within 30 s of migrate_cancel")

    def _force_cancel_mirror(self) -> None:
        if self._mirror_job() is None:
            return
        with contextlib.suppress(QMPError):
            self.qmp.execute("block-job-cancel", {"device": self.ids["job"], "force": True})
        deadline = time.monotonic() + 30
        while self._mirror_job() is not None:
            if time.monotonic() > deadline:
                raise DriverError("disk mirror still present 30 s after a forced cancel")
            time.sleep(0.05)

    def _blockdev_del(self) -> None:
        try:
            self.qmp.execute("blockdev-del", {"node-name": self.ids["node"]})
        except QMPError as exc:
            if "not found" not in exc.desc.lower() and "cannot find" not in exc.desc.lower():
                raise

    def _resume_guest(self) -> None:
        status = self.qmp.execute("query-status")
        if status.get("status") != "running":
            self.qmp.execute("cont")

    # -- recovery after an agent restart ---------------------------------------------

    def _recover(self) -> None:
        """A migration found unfinished by a new driver instance: finish it if QEMU
        already completed it, otherwise roll it back (nobody waits at its switchover)."""
        try:
            qm = self.qmp.execute("query-migrate")
        except (QMPError, QMPConnectionError) as exc:
            self.set_state(MigrationState.FAILED, f"agent restarted during the migration; QEMU unreachable: {exc}")
            return
        with self.lock:
            self.tracker.update_migration(qm, time.monotonic())
        if qm.get("status") == "completed":
            self._finish()
        else:
            self._rollback(MigrationState.FAILED, "agent restarted during the migration")

    # -- helpers -----------------------------------------------------------------------

    def _mirror_job(self) -> dict | None:
        for job in self.qmp.execute("query-block-jobs"):
            if job.get("device") == self.ids["job"]:
                return job
        return None

    def _sample(self) -> str | None:
        qm = self.qmp.execute("query-migrate")
        job = self._mirror_job() if self._mirror else None
        now = time.monotonic()
        with self.lock:
            self.tracker.update_migration(qm, now)
            if job is not None:
                self.tracker.update_mirror(job, now)
        self.persist()
        return qm.get("status")

    def _migration_error(self) -> str:
        with contextlib.suppress(QMPError, QMPConnectionError):
            qm = self.qmp.execute("query-migrate")
            if qm.get("error-desc"):
                return str(qm["error-desc"])
        return "no detail from QEMU"

    def _job_end_reason(self, since: int) -> str:
        peer = self._mirror_write_failed(since)
        if peer:
            return peer
        for ev in self.qmp.events(since):
            if ev.name in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR") and (
                ev.data.get("device") == self.ids["job"]
            ):
                return f"{ev.name} {ev.data.get('error') or ev.data.get('operation') or ''}".strip()
        return "no block-job event"

    def _mirror_write_failed(self, since: int) -> str | None:
        """The mirror failed writing: its target is the peer's NBD export, so the peer (or the
        link) failed, not this side. Said with the ``PeerLost:`` mark the operator reads
        (``ferry.api.reports.peer_lost``) to name the side that failed."""
        for ev in self.qmp.events(since):
            if ev.name == "BLOCK_JOB_ERROR" and ev.data.get("device") == self.ids["job"] \
                    and ev.data.get("operation") == "write":
                return "PeerLost: the disk mirror could not write to the target's NBD export"
        return None

    def _wait_job_end(self, since: int, timeout: float) -> QMPEvent | None:
        job = self.ids["job"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check()
            ev = self.qmp.wait_event(
                lambda e: e.name in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED") and e.data.get("device") == job,
                timeout=POLL,
                since=since,
            )
            if ev is not None:
                return ev
        return None


class TargetMigration(_Migration):
    """Watches the incoming side; RECEIVED once the stream completed and the export is gone."""

    role = "target"

    def __init__(self, *, migration_id: str, layout: VMLayout, config: QemuConfig, qmp: QMPClient, disk_bytes: int):
        super().__init__(migration_id, layout, config, qmp)
        self.disk_bytes = disk_bytes
        self.ids = object_ids(migration_id)

    def run(self) -> None:
        try:
            while True:
                self._check()
                qm = self.qmp.execute("query-migrate")
                status = qm.get("status")
                if status in ("setup", "active", "device", "pre-switchover") and self.state == MigrationState.NONE:
                    self.set_state(MigrationState.COPYING)
                if status == "completed":
                    break
                if status in ("failed", "cancelled"):
                    self.set_state(MigrationState.FAILED, f"incoming migration {status}: {qm.get('error-desc', '')}")
                    return
                self._sleep(0.1)
            self.cleanup_nbd()
            remove_tls_creds(self.qmp, self.layout, self.migration_id)
            if self.qmp.execute("query-status").get("status") == "prelaunch":
                # an offline migration: no guest waits, so both sides hash before Received
                digest, verify_ms, hashed = disk_hash(self.layout.disk, self.disk_bytes)
                with self.lock:
                    self.tracker.stats.digest = digest
                    self.tracker.stats.verify_ms = verify_ms
                    self.tracker.stats.hashed_bytes = hashed
            else:
                # freeze the received disk while the guest is still paused: the raw image becomes
                # the read-only base of an overlay, hashed after the guest runs (FrozenVerify)
                t0 = time.monotonic()
                freeze(self.qmp, self.layout)
                with self.lock:
                    self.tracker.stats.frozen_point = True
                    self.tracker.stats.freeze_ms = int(round((time.monotonic() - t0) * 1000))
                failpoints.hit("qemu.target-frozen")
            with self.lock:
                self.tracker.stats.state = MigrationState.RECEIVED
            self.persist(force=True)
        except Cancelled:
            self.set_state(MigrationState.ABORTED)
        except QMPConnectionError as exc:
            if self.detached.is_set():
                raise Detached() from exc
            self.set_state(MigrationState.FAILED, f"target QEMU exited or is unreachable: {exc}")
        except QMPError as exc:
            self.set_state(MigrationState.FAILED, str(exc))

    def cleanup_nbd(self) -> None:
        with contextlib.suppress(QMPError):
            self.qmp.execute("block-export-del", {"id": self.ids["export"], "mode": "hard"})
        with contextlib.suppress(QMPError):
            self.qmp.execute("nbd-server-stop")


# -- the frozen point (target) -----------------------------------------------------------

FROZEN_NODE = "ferry-frozen"
COMMIT_JOB = "ferry-commit"


def freeze(qmp: QMPClient, layout: VMLayout) -> None:
    """Put a qcow2 overlay on ``disk0`` (the guest paused): the raw image stays as received.
    Idempotent: an overlay already in place is kept."""
    nodes = [n.get("node-name") for n in qmp.execute("query-named-block-nodes")]
    if FROZEN_NODE in nodes:
        return
    with contextlib.suppress(FileNotFoundError):
        layout.overlay.unlink()
    qmp.execute("blockdev-snapshot-sync", {"node-name": "disk0", "snapshot-file": str(layout.overlay),
                                           "snapshot-node-name": FROZEN_NODE, "format": "qcow2"})


class FrozenVerify:
    """Target, after ``cont``: hash the frozen base (the raw image as received at the
    switchover), then merge the overlay back (``block-commit`` of the active layer,
    ``BLOCK_JOB_READY``, ``job-complete``) so the guest runs on its one raw image again.
    The result goes into the VM's persisted stats (``migration.json``: digest, verify_ms,
    hashed_bytes), which ``query_migration`` returns; ``on_done`` runs at the end. A new driver
    instance (agent restart) starts it again while the overlay is still in place."""

    def __init__(self, *, layout: VMLayout, qmp: QMPClient, disk_bytes: int, stats: MigrationStats,
                 on_done: Callable[[], None] | None = None):
        self.layout = layout
        self.qmp = qmp
        self.disk_bytes = disk_bytes
        self.stats = stats
        self.on_done = on_done
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._main, name=f"ferry-qemu-verify:{stats.migration_id}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _main(self) -> None:
        try:
            self.run()
        except Exception:  # noqa: BLE001 - a thread must never die silently
            log.exception("verification of the frozen point of %s failed", self.stats.migration_id)
            self.stats.error = "verification after resume failed (see agent log); the overlay stays in place"
            with contextlib.suppress(OSError):
                write_json(self.layout.migration, {**stats_to_dict(self.stats), "role": "target"})
        finally:
            self.done.set()

    def run(self) -> None:
        self.stats.error = None
        if self.stats.digest is None:
            digest, verify_ms, hashed = disk_hash(self.layout.disk, self.disk_bytes)
            self.stats.digest, self.stats.verify_ms, self.stats.hashed_bytes = digest, verify_ms, hashed
            write_json(self.layout.migration, {**stats_to_dict(self.stats), "role": "target"})
            log.info("%s: frozen point hashed after resume (%s ms, %s bytes)", self.stats.migration_id,
                     verify_ms, hashed)
        failpoints.hit("qemu.target-before-commit")
        self.commit()
        if self.on_done is not None:
            self.on_done()

    def commit(self) -> None:
        q = self.qmp
        nodes = [n.get("node-name") for n in q.execute("query-named-block-nodes")]
        if FROZEN_NODE in nodes:
            jobs = [j for j in q.execute("query-block-jobs") if j.get("device") == COMMIT_JOB]
            since = q.event_seq
            if not jobs:
                q.execute("block-commit", {"job-id": COMMIT_JOB, "device": FROZEN_NODE})
            if not (jobs and jobs[0].get("ready")):
                ev = q.wait_event(lambda e: e.name in ("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR")
                                  and e.data.get("device") == COMMIT_JOB, timeout=600, since=since)
                if ev is None or ev.name != "BLOCK_JOB_READY":
                    raise DriverError(f"committing the overlay: {ev.name if ev else 'no event in 600 s'}")
            since = q.event_seq
            q.execute("job-complete", {"id": COMMIT_JOB})
            ev = q.wait_event(lambda e: e.name in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR")
                              and e.data.get("device") == COMMIT_JOB, timeout=600, since=since)
            if ev is None or ev.name != "BLOCK_JOB_COMPLETED" or ev.data.get("error"):
                raise DriverError(f"committing the overlay: {ev.name if ev else 'no event in 600 s'} "
                                  f"{(ev.data.get('error') if ev else '') or ''}".strip())
        with contextlib.suppress(FileNotFoundError):
            self.layout.overlay.unlink()
