"""What the machine looks at: its settings, the droplet as seen, and one migration's
:class:`Observation`. Plain data built by the operator's shell from its view of the world."""

from __future__ import annotations

import dataclasses
import datetime as dt

from ferry.api.livemigration import MigrationSpec, MigrationStatus
from ferry.api.models import Droplet
from ferry.api.reports import TargetReport, TransferReport
from ferry.migration.admission import Admission
from ferry.placement.model import PlacementResult


@dataclasses.dataclass(frozen=True)
class MachineConfig:
    """Operator settings the machine uses (defaults = docs/architecture.md).

    ``notice_seconds`` FERRY_NOTICE_SECONDS, ``downtime_budget_ms`` FERRY_DOWNTIME_BUDGET_MS,
    ``max_attempts`` FERRY_MAX_ATTEMPTS, ``retry_backoff_seconds`` FERRY_RETRY_BACKOFF_SECONDS,
    ``progress_timeout_seconds`` FERRY_PROGRESS_TIMEOUT_SECONDS, ``budget_seconds_per_gib``
    FERRY_BUDGET_SECONDS_PER_GIB, ``budget_base_seconds`` FERRY_BUDGET_BASE_SECONDS.
    ``poll_seconds``: longest wait before looking again while waiting on something that has
    no deadline of its own. ``no_host_timeout_seconds``: how long Scheduling waits for a host
    to fit before the migration fails.
    """

    notice_seconds: float = 600.0
    downtime_budget_ms: int = 300
    max_attempts: int = 3
    retry_backoff_seconds: float = 20.0
    progress_timeout_seconds: float = 120.0
    budget_seconds_per_gib: float = 60.0
    budget_base_seconds: float = 120.0
    poll_seconds: float = 30.0
    no_host_timeout_seconds: float = 600.0
    #: a source host silent this long is lost (the migration fails HostNotReady); before that
    #: the machine waits: stale heartbeats after an API server outage are everyone's, not a host's
    host_lost_seconds: float = 150.0


@dataclasses.dataclass(frozen=True)
class DropletObs:
    """What the operator sees of the migration's droplet.

    ``host`` is ``status.host`` (the placement record); ``host_ready`` the readiness of that
    host. ``image_gib`` is what a migration copies (disk GiB + memory GiB, after
    FERRY_SIZE_SCALE) and sizes the completion budget. ``maintenance_since`` is the time of
    ``ferry.dev/maintenance-event-since`` while ``ferry.dev/maintenance-event`` is
    ``live_migrate``, else None.
    """

    exists: bool = True
    deleting: bool = False
    host: str | None = None
    host_ready: bool = False
    power_state: str = "on"
    nested_virtualization: bool = False
    image_gib: float = 0.0
    maintenance_since: dt.datetime | None = None
    #: seconds since that host's last heartbeat (None: it never sent one, or it is unknown)
    host_silent_seconds: float | None = None

    @classmethod
    def missing(cls) -> DropletObs:
        return cls(exists=False)

    @classmethod
    def from_droplet(cls, d: Droplet | None, *, host_ready: bool, size_scale: float = 1.0,
                     host_silent_seconds: float | None = None) -> DropletObs:
        """From the droplet's view (None: the droplet is gone)."""
        if d is None:
            return cls.missing()
        return cls(
            exists=True,
            deleting=d.meta.deleting,
            host=d.host,
            host_ready=host_ready,
            host_silent_seconds=host_silent_seconds,
            power_state="on" if d.power_on else "off",
            nested_virtualization=d.nested_virtualization,
            image_gib=d.resources.image_gib * size_scale,
            maintenance_since=d.maintenance_since,
        )


@dataclasses.dataclass(frozen=True)
class Observation:
    """Everything ``decide`` looks at for one LiveMigration.

    ``name`` is the LiveMigration's name (the transfer Secret is ``<name>-transfer``);
    ``deleting`` is its deletionTimestamp being set; ``generation`` its metadata.generation.
    ``transfer``/``target`` are the agents' reports as found (any attempt: the machine ignores
    other attempts). ``target_host_ready`` is the readiness of ``status.targetHost`` (None if
    unknown or unset). ``admission`` is required while Pending and in Announced once the
    notice is over (see :func:`needs_admission`): this migration's verdict from
    :func:`admit`. ``placement`` is required while Scheduling past any backoff (see
    :func:`needs_placement`): the result of ``place()`` for the droplet with ``source_host``
    = its host, ``target_host`` = ``spec.targetHost``, ``inbound_limit`` =
    FERRY_MAX_INBOUND_PER_HOST, and the reservations of the OTHER migrations in
    :data:`ferry.api.phases.IN_FLIGHT`. ``droplet_owned_by_other``: another migration of
    the droplet is past Pending (None: not known); when False, an announcement on the droplet
    can only be this migration's, even if the status write that recorded it was lost.
    """

    name: str
    spec: MigrationSpec
    created_at: dt.datetime
    status: MigrationStatus = MigrationStatus()
    droplet: DropletObs = DropletObs(exists=False)
    deleting: bool = False
    generation: int | None = None
    transfer: TransferReport | None = None
    target: TargetReport | None = None
    target_host_ready: bool | None = None
    admission: Admission | None = None
    placement: PlacementResult | None = None
    secret_exists: bool = False
    droplet_owned_by_other: bool | None = None

    @property
    def record_at_target(self) -> bool:
        """The droplet's placement record names ``status.targetHost``."""
        t = self.status.target_host
        return bool(t) and self.droplet.exists and self.droplet.host == t
