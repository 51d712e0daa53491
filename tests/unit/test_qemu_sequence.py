"""The source-side migration sequence against a scripted QEMU monitor.

Checks the order of QMP commands (libvirt's sequence) and that every failure or
cancel before the switchover rolls back to a source running on its own disk.
The real-QEMU versions of these are in tests/qemu/.
"""

from __future__ import annotations

import json
import pathlib
import threading
import time
from typing import Any

import pytest
from support import wait_until

from ferry.drivers.base import MigrationOptions, MigrationState, MigrationStats
from ferry.drivers.qemu.config import QemuConfig, VMLayout
from ferry.drivers.qemu.sequence import FrozenVerify, SourceMigration, TargetMigration, disk_digest, freeze, object_ids
from ferry.drivers.qemu.stats import stats_from_dict
from ferry.drivers.qemu.qmp import QMPError, QMPEvent

MIB = 1 << 20
MID = "lm-1"
IDS = object_ids(MID)


class FakeQEMU:
    """A QMP stand-in with just enough state for the source sequence."""

    def __init__(self, *, mirror_polls_until_ready: int = 2, migrate_outcome: str = "pre-switchover",
                 mirror_end: str = "BLOCK_JOB_COMPLETED", hold_mirror: bool = False):
        self.calls: list[tuple[str, dict]] = []
        self.closed = False
        self._events: list[QMPEvent] = []
        self._lock = threading.Lock()
        self.runstate = "running"
        self.job: dict | None = None
        self.job_polls = 0
        self.mirror_polls_until_ready = mirror_polls_until_ready
        self.hold_mirror = hold_mirror
        self.migrate_outcome = migrate_outcome
        self.mirror_end = mirror_end
        self.migration: str | None = None

    # -- the QMPClient surface SourceMigration uses ----------------------------------
    @property
    def event_seq(self) -> int:
        return len(self._events)

    def events(self, since: int = 0) -> list[QMPEvent]:
        return [e for e in self._events if e.seq > since]

    def wait_event(self, match, timeout: float, since: int = 0) -> QMPEvent | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in self.events(since):
                if match(e):
                    return e
            time.sleep(0.01)  # paces the fake's own wait_event (the QMP client's interface), not a test wait
        return None

    def _emit(self, name: str, data: dict) -> None:
        with self._lock:
            self._events.append(QMPEvent(len(self._events) + 1, name, data, time.time()))

    def execute(self, command: str, arguments: dict | None = None, timeout: float = 30.0, fds=None) -> Any:
        args = arguments or {}
        self.calls.append((command, args))
        handler = getattr(self, "q_" + command.replace("-", "_"), None)
        return handler(args) if handler else {}

    # -- commands ---------------------------------------------------------------------
    def q_blockdev_mirror(self, args: dict) -> dict:
        self.job = {"device": args["job-id"], "len": 64 * MIB, "offset": 0, "ready": False, "status": "running"}
        return {}

    def q_query_block_jobs(self, args: dict) -> list:
        if self.job is None:
            return []
        self.job_polls += 1
        if not self.hold_mirror:
            self.job["offset"] = min(64 * MIB, self.job["offset"] + 32 * MIB)
            if self.job_polls >= self.mirror_polls_until_ready:
                self.job.update(ready=True, status="ready")
        return [dict(self.job)]

    def q_block_job_cancel(self, args: dict) -> dict:
        if self.job is None:
            raise QMPError("block-job-cancel", "DeviceNotActive", "Block job not found")
        data = {"device": self.job["device"], "len": self.job["len"], "offset": self.job["offset"], "type": "mirror"}
        self.job = None
        self._emit("BLOCK_JOB_CANCELLED" if args.get("force") else self.mirror_end, data)
        return {}

    def q_migrate(self, args: dict) -> dict:
        self.migration = "active"
        return {}

    def q_query_migrate(self, args: dict) -> dict:
        if self.migration is None:
            return {}
        if self.migration == "active":
            self.migration = self.migrate_outcome
            if self.migrate_outcome == "pre-switchover":
                self.runstate = "finish-migrate"
        out = {"status": self.migration, "ram": {"total": 100 * MIB, "transferred": 50 * MIB,
                                                 "remaining": 50 * MIB, "dirty-sync-count": 1}}
        if self.migration == "failed":
            out["error-desc"] = "Connection reset by peer"
        if self.migration == "completed":
            out["downtime"] = 42
        return out

    def q_migrate_continue(self, args: dict) -> dict:
        self.migration = "completed"
        self.runstate = "postmigrate"
        return {}

    def q_migrate_cancel(self, args: dict) -> dict:
        if self.migration in ("active", "pre-switchover", "failed"):
            self.migration = "cancelled" if self.migration != "failed" else "failed"
            self.runstate = "paused" if self.runstate != "running" else "running"
        return {}

    def q_query_status(self, args: dict) -> dict:
        return {"status": self.runstate, "running": self.runstate == "running"}

    def q_cont(self, args: dict) -> dict:
        self.runstate = "running"
        return {}

    def names(self) -> list[str]:
        return [c for c, _ in self.calls if not c.startswith("query-")]


def make(tmp_path: pathlib.Path, qemu: FakeQEMU, **options: Any) -> SourceMigration:
    layout = VMLayout(tmp_path / "vm")
    layout.root.mkdir()
    layout.disk.write_bytes(b"disk" * 1024)
    stopped: list[bool] = []
    m = SourceMigration(
        migration_id=MID, layout=layout, config=QemuConfig(), qmp=qemu,  # type: ignore[arg-type]
        target_host="127.0.0.1", target_port=4000, secret=b"k" * 32,
        options=MigrationOptions(**options), disk_bytes=4096, offline=False,
        stop_vm=lambda: stopped.append(True),
    )
    return m


def run(m: SourceMigration, timeout: float = 10) -> None:
    m.start()
    assert m.done.wait(timeout), "the migration thread did not finish"


def test_happy_path_follows_libvirts_sequence(tmp_path: pathlib.Path) -> None:
    q = FakeQEMU()
    m = make(tmp_path, q, downtime_budget_ms=250, bandwidth_bps=32 * MIB)
    run(m)
    stats = m.snapshot()
    assert stats.state == MigrationState.COMPLETED, stats.error
    assert q.names() == [
        "object-add", "blockdev-add", "blockdev-mirror", "migrate-set-capabilities", "migrate-set-parameters",
        "migrate", "block-job-cancel", "migrate-continue", "blockdev-del", "object-del",
    ]
    args = dict(q.calls)
    assert args["object-add"] == {"qom-type": "tls-creds-psk", "id": IDS["tls"], "endpoint": "client",
                                  "dir": str(m.layout.tls_dir(MID)), "username": "ferry"}
    assert args["blockdev-add"]["server"] == {"type": "inet", "host": "127.0.0.1", "port": "4001"}
    assert args["blockdev-add"]["tls-creds"] == IDS["tls"]
    assert args["blockdev-mirror"]["sync"] == "full" and args["blockdev-mirror"]["speed"] == 32 * MIB
    caps = {c["capability"] for c in args["migrate-set-capabilities"]["capabilities"]}
    assert caps == {"events", "auto-converge", "pause-before-switchover"}
    assert args["migrate-set-parameters"] == {"tls-creds": IDS["tls"], "downtime-limit": 250,
                                              "max-bandwidth": 32 * MIB}
    assert args["migrate"] == {"uri": "tcp:127.0.0.1:4000"}
    assert args["block-job-cancel"] == {"device": IDS["job"]}  # soft: completes the READY mirror
    assert args["migrate-continue"] == {"state": "pre-switchover"}
    # QEMU's pause only: the source's hash comes after Completed (the target froze its copy, so
    # the guest resumes there without waiting for it) and still reaches the stats
    assert stats.downtime_ms == 42 and stats.disk.remaining == 0
    assert stats.digest and stats.digest.startswith("sha256:") and stats.verify_ms is not None
    assert stats.hashed_bytes == 4096
    assert "cont" not in q.names()  # the source stays paused for the cut-over
    assert not m.layout.tls_dir(MID).exists()  # the PSK file is gone


def test_unlimited_bandwidth_is_really_unlimited(tmp_path: pathlib.Path) -> None:
    q = FakeQEMU()
    run(make(tmp_path, q))
    args = dict(q.calls)
    assert args["blockdev-mirror"]["speed"] == 0 and "buf-size" not in args["blockdev-mirror"]
    assert args["migrate-set-parameters"]["max-bandwidth"] >= 1 << 40  # not QEMU's 128 MiB/s default


def test_failed_memory_copy_rolls_back_and_resumes(tmp_path: pathlib.Path) -> None:
    q = FakeQEMU(migrate_outcome="failed")
    m = make(tmp_path, q)
    run(m)
    stats = m.snapshot()
    assert stats.state == MigrationState.FAILED
    assert "Connection reset by peer" in (stats.error or "")
    names = q.names()
    assert names[names.index("migrate") + 1:] == ["migrate_cancel", "block-job-cancel", "blockdev-del", "object-del"]
    assert ("block-job-cancel", {"device": IDS["job"], "force": True}) in q.calls
    assert q.runstate == "running"
    assert not m.layout.tls_dir(MID).exists()


def test_mirror_that_does_not_complete_at_switchover_aborts(tmp_path: pathlib.Path) -> None:
    q = FakeQEMU(mirror_end="BLOCK_JOB_CANCELLED")
    m = make(tmp_path, q)
    run(m)
    stats = m.snapshot()
    assert stats.state == MigrationState.FAILED and "did not complete" in (stats.error or "")
    names = q.names()
    assert "migrate-continue" not in names  # never switched over with a partial disk
    assert "migrate_cancel" in names and names[-1] == "cont"
    assert q.runstate == "running"


def test_cancel_during_the_mirror(tmp_path: pathlib.Path) -> None:
    q = FakeQEMU(hold_mirror=True)
    m = make(tmp_path, q)
    m.start()
    wait_until(lambda: q.job_polls >= 2, 5, interval=0.01, what="the mirror job polled twice")
    m.cancel(wait=10)
    stats = m.snapshot()
    assert stats.state == MigrationState.ABORTED and stats.error is None
    names = q.names()
    assert "migrate" not in names and "migrate_cancel" not in names
    assert names[-3:] == ["block-job-cancel", "blockdev-del", "object-del"]
    assert q.runstate == "running" and "cont" not in names


class _Target(FakeQEMU):
    def __init__(self, runstate: str = "paused") -> None:
        super().__init__()
        self.polls = 0
        self.runstate = runstate
        self.nodes = ["disk0"]

    def q_query_migrate(self, args: dict) -> dict:
        self.polls += 1
        return {"status": ["setup", "active", "active", "completed"][min(self.polls - 1, 3)]}

    def q_query_named_block_nodes(self, args: dict) -> list:
        return [{"node-name": n} for n in self.nodes]

    def q_blockdev_snapshot_sync(self, args: dict) -> dict:
        self.nodes.append(args["snapshot-node-name"])
        return {}

    def q_block_commit(self, args: dict) -> dict:
        self._emit("BLOCK_JOB_READY", {"device": args["job-id"]})
        return {}

    def q_job_complete(self, args: dict) -> dict:
        self.nodes.remove("ferry-frozen")
        self._emit("BLOCK_JOB_COMPLETED", {"device": args["id"]})
        return {}


def _target_layout(tmp_path: pathlib.Path) -> VMLayout:
    layout = VMLayout(tmp_path / "vm")
    layout.root.mkdir()
    layout.disk.write_bytes(bytes(4096))
    return layout


def test_target_freezes_its_disk_at_the_switchover_and_reports_received_without_a_digest(tmp_path: pathlib.Path) -> None:
    q = _Target()
    layout = _target_layout(tmp_path)
    t = TargetMigration(migration_id=MID, layout=layout, config=QemuConfig(), qmp=q,  # type: ignore[arg-type]
                        disk_bytes=4096)
    t.start()
    assert t.done.wait(10)
    stats = t.snapshot()
    assert stats.state == MigrationState.RECEIVED and stats.frozen_point and stats.digest is None
    assert q.names() == ["block-export-del", "nbd-server-stop", "object-del", "blockdev-snapshot-sync"]
    assert ("block-export-del", {"id": IDS["export"], "mode": "hard"}) in q.calls
    snap = dict(q.calls)["blockdev-snapshot-sync"]
    assert snap == {"node-name": "disk0", "snapshot-file": str(layout.overlay), "snapshot-node-name": "ferry-frozen",
                    "format": "qcow2"}
    # idempotent: a restarted agent's new watch does not stack a second overlay
    freeze(q, layout)  # type: ignore[arg-type]
    assert q.names().count("blockdev-snapshot-sync") == 1


def test_an_offline_target_hashes_before_received(tmp_path: pathlib.Path) -> None:
    q = _Target(runstate="prelaunch")
    t = TargetMigration(migration_id=MID, layout=_target_layout(tmp_path), config=QemuConfig(), qmp=q,  # type: ignore[arg-type]
                        disk_bytes=4096)
    t.start()
    assert t.done.wait(10)
    stats = t.snapshot()
    assert stats.state == MigrationState.RECEIVED and not stats.frozen_point
    assert stats.digest and stats.digest.startswith("sha256:") and "blockdev-snapshot-sync" not in q.names()


def test_frozen_verify_hashes_the_base_then_commits_the_overlay(tmp_path: pathlib.Path) -> None:
    q = _Target(runstate="running")
    q.nodes.append("ferry-frozen")
    layout = _target_layout(tmp_path)
    layout.overlay.write_bytes(b"qcow2")
    stats = MigrationStats(migration_id=MID, state=MigrationState.RECEIVED, frozen_point=True)
    ended: list[bool] = []
    v = FrozenVerify(layout=layout, qmp=q, disk_bytes=4096, stats=stats, on_done=lambda: ended.append(True))  # type: ignore[arg-type]
    v.start()
    assert v.done.wait(10)
    assert ended == [True]
    assert stats.digest == disk_digest(layout.disk, 4096)[0] and stats.hashed_bytes == 4096
    assert q.names() == ["block-commit", "job-complete"]
    assert not layout.overlay.exists() and "ferry-frozen" not in q.nodes
    persisted = stats_from_dict(json.loads(layout.migration.read_text()))
    assert persisted.digest == stats.digest and persisted.frozen_point  # what query_migration answers


@pytest.mark.parametrize("status", ["failed", "cancelled"])
def test_target_reports_a_failed_stream(tmp_path: pathlib.Path, status: str) -> None:
    class Target(FakeQEMU):
        def q_query_migrate(self, args: dict) -> dict:
            return {"status": status, "error-desc": "boom"}

    layout = VMLayout(tmp_path / "vm")
    layout.root.mkdir()
    t = TargetMigration(migration_id=MID, layout=layout, config=QemuConfig(), qmp=Target(),  # type: ignore[arg-type]
                        disk_bytes=4096)
    t.start()
    assert t.done.wait(10)
    assert t.snapshot().state == MigrationState.FAILED and "boom" in (t.snapshot().error or "")


def test_downtime_is_read_once_qemu_computed_it(tmp_path: pathlib.Path) -> None:
    class Late(FakeQEMU):
        completed_reads = 0

        def q_query_migrate(self, args: dict) -> dict:
            out = super().q_query_migrate(args)
            if out.get("status") == "completed":
                self.completed_reads += 1
                if self.completed_reads <= 2:
                    out["downtime"] = 0  # QEMU says "completed" before it sets the downtime
            return out

    q = Late()
    m = make(tmp_path, q)
    run(m)
    assert m.snapshot().state == MigrationState.COMPLETED
    assert m.snapshot().downtime_ms == 42
