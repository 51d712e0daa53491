"""The driver interface: how an agent runs VM processes on its host and migrates them.

A driver manages one VM process per droplet under a data directory. VM processes outlive
the agent: after an agent restart, ``list_vms()`` re-attaches to whatever still runs, so
the agent never keeps state it cannot rebuild from the driver.

Both drivers (``sim``, ``qemu``) implement this protocol and fill ``MigrationStats`` with
the same fields, which the agent copies into ``LiveMigration.status.transfer``.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from typing import Protocol, runtime_checkable

from ferry.api.reports import RoundReport


@dataclasses.dataclass(frozen=True, order=True)
class VMKey:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def dirname(self) -> str:
        """A file-system safe, unique directory name for this VM."""
        return f"{self.namespace}__{self.name}"


@dataclasses.dataclass(frozen=True)
class Workload:
    """The guest's own activity (sim driver; the qemu test guest has its own init)."""

    pattern: str = "uniform"  # uniform | hotspot | sequential
    write_rate_kibps: int = 0


@dataclasses.dataclass(frozen=True)
class VMSpec:
    key: VMKey
    cpu: int
    memory_mib: int
    disk_gib: int
    workload: Workload = Workload()
    power_on: bool = True
    #: the droplet's address (``spec.ip`` in normal form; None: none): the guest's network
    #: service answers on it (sim: docs/architecture.md, "The droplet's address")
    ip: str | None = None


class VMState(str, enum.Enum):
    RUNNING = "Running"
    PAUSED = "Paused"  # e.g. converged source waiting for cut-over
    STOPPED = "Stopped"  # images exist, no guest running
    INCOMING = "Incoming"  # target of a migration, not yet resumed


@dataclasses.dataclass
class VMInfo:
    key: VMKey
    state: VMState
    pid: int | None = None
    migration_id: str | None = None  # the migration this VM is the source/target of
    #: STOPPED because its process ended without being asked to (killed, OOM, crashed): the
    #: guest's memory is gone, its disk remains; starting it again is a reboot
    crashed: bool = False
    restarts: int = 0  # times the driver started it again after a crash
    restarted_at: str | None = None  # RFC 3339 time of the last such restart


@dataclasses.dataclass(frozen=True)
class MigrationOptions:
    downtime_budget_ms: int = 300
    bandwidth_bps: int | None = None  # None: unlimited
    offline: bool = False  # one copy of a stopped VM, no rounds, no throttle
    max_downtime_ms: int | None = None  # ceiling of the downtime steps (None: the budget, no steps)
    force_complete: bool = False  # pause now and finish, whatever the budget
    max_throttle_percent: int = 99  # the throttle's cap (QEMU's max-cpu-throttle); benchmarks lower it to model
    # a guest the throttle cannot slow enough


class MigrationState(str, enum.Enum):
    NONE = "None"
    COPYING = "Copying"
    CONVERGING = "Converging"
    PAUSED = "Paused"
    COMPLETED = "Completed"  # source: all sent, digests equal, guest paused for cut-over
    RECEIVED = "Received"  # target: all received and verified, paused
    FAILED = "Failed"
    ABORTED = "Aborted"


@dataclasses.dataclass
class TransferCounters:
    total: int = 0
    sent: int = 0
    remaining: int = 0


@dataclasses.dataclass
class MigrationStats:
    """Progress of one migration as a driver sees it (source or target side)."""

    migration_id: str | None = None
    state: MigrationState = MigrationState.NONE
    round: int = 0
    disk: TransferCounters = dataclasses.field(default_factory=TransferCounters)
    memory: TransferCounters = dataclasses.field(default_factory=TransferCounters)
    dirty_rate_bps: int = 0
    bandwidth_bps: int = 0
    throttle_percent: int = 0
    max_throttle_percent: int = 0
    throttled_ms: int = 0
    expected_downtime_ms: int = 0
    eta_seconds: float | None = None
    rounds: list[RoundReport] = dataclasses.field(default_factory=list)  # as status.transfer.rounds has them
    downtime_ms: int | None = None
    downtime_budget_ms: int | None = None  # the budget this attempt was given
    max_downtime_ms: int | None = None  # the ceiling of the downtime steps
    allowed_downtime_ms: int | None = None  # the downtime allowed at the end (budget + steps taken)
    downtime_steps: int = 0  # steps taken (the throttle was at its maximum and it still did not fit)
    predicted_downtime_ms: int | None = None  # what was expected when the guest was paused
    forced: bool = False  # paused by force-complete
    verify_ms: int | None = None  # time spent hashing this side's copy (qemu: outside the downtime, see frozen_point)
    hashed_bytes: int | None = None  # bytes of disk data read for that hash (holes hash as zeros without a read)
    #: target (qemu): the received disk was frozen at the switchover point (a qcow2 overlay takes
    #: the guest's new writes), so its digest is computed after the guest resumed, not in the pause
    frozen_point: bool = False
    freeze_ms: int | None = None  # target: what freezing it cost in the pause (blockdev-snapshot-sync)
    digest: str | None = None
    error: str | None = None
    channel: str | None = None  # what protects the data channel (sim: aes-256-gcm or plain); None: not said
    #: wall-clock seconds (time.time()): when the source paused the guest for the final copy, and
    #: when the target resumed it (None: not yet, or the driver cannot tell)
    paused_at: float | None = None
    resumed_at: float | None = None

    @property
    def bytes_total(self) -> int:
        return self.disk.total + self.memory.total

    @property
    def bytes_sent(self) -> int:
        return self.disk.sent + self.memory.sent

    @property
    def dirty_remaining(self) -> int:
        return self.disk.remaining + self.memory.remaining


class DriverError(Exception):
    """A driver operation failed; the message is shown to users as a reason."""


@runtime_checkable
class Driver(Protocol):
    name: str

    def list_vms(self) -> list[VMInfo]:
        """Every VM with images or a process on this host (re-attaches after a restart)."""

    def start(self, spec: VMSpec) -> VMInfo:
        """Create the images if missing and start the guest. Idempotent."""

    def stop(self, key: VMKey) -> None:
        """Power the guest off; keep its images. Idempotent."""

    def destroy(self, key: VMKey) -> None:
        """Stop and delete everything of this VM. Idempotent."""

    def prepare_incoming(self, spec: VMSpec, bind_host: str, secret: bytes, migration_id: str) -> str:
        """Start a paused VM waiting for migration ``migration_id``; return "host:port"."""

    def start_migration(
        self, key: VMKey, target: str, secret: bytes, migration_id: str, options: MigrationOptions
    ) -> None:
        """Source side: start sending to ``target``. Returns at once; poll query_migration."""

    def query_migration(self, key: VMKey) -> MigrationStats:
        """Progress of the VM's current or last migration (either side)."""

    def wait_migration(self, key: VMKey, timeout: float) -> None:
        """Return when the VM's migration has settled (``MIGRATION_SETTLED``: it ended, nothing
        more happens on its own), or after ``timeout`` s, or at once when the VM cannot be asked
        (the agent then reads it as usual). Lets the agent see a copy end when it ends rather
        than at its next poll; the steps in between (Converging, Paused) wait for the poll, so
        they cost no extra report while the guest is paused."""

    def cancel_migration(self, key: VMKey) -> None:
        """Source side: abort, lift any throttle, resume the guest. Idempotent."""

    def resume(self, key: VMKey) -> None:
        """Target side, after the placement record names this host: run the guest."""

    def force_complete(self, key: VMKey) -> None:
        """Source side: pause the guest now and finish the copy whatever the budget. Idempotent."""


#: a migration in these states changes on its own; in the others only when told to
MIGRATION_SETTLED = frozenset({MigrationState.COMPLETED, MigrationState.RECEIVED, MigrationState.FAILED,
                               MigrationState.ABORTED})


def poll_migration(driver: Driver, key: VMKey, timeout: float, interval: float) -> None:
    """``Driver.wait_migration`` for a driver whose state is cheap to read: read it every
    ``interval`` s."""
    end = time.monotonic() + timeout
    while True:
        try:
            if driver.query_migration(key).state in MIGRATION_SETTLED:
                return
        except DriverError:
            return
        left = end - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(interval, left))


def host_cpu(cpuinfo: str = "/proc/cpuinfo") -> tuple[str | None, frozenset[str]]:
    """This machine's CPU model name and flags (what a guest of this host may be using)."""
    model: str | None = None
    flags: frozenset[str] = frozenset()
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip() or None
                elif key in ("flags", "Features") and not flags:
                    flags = frozenset(value.split())
                if model and flags:
                    break
    except OSError:
        pass
    return model, flags

