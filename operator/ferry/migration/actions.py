"""The side effects a decision asks for: plain data, applied in order by the operator's shell
(``ferry.controller.effects``). Each is idempotent or re-emitted only while the observation
does not reflect it yet."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Union


@dataclasses.dataclass(frozen=True)
class Announce:
    """Set ``ferry.dev/maintenance-event: live_migrate``, ``-since: since`` and
    ``-not-before: not_before`` on the droplet (overwrite if present)."""

    droplet: str
    since: dt.datetime
    not_before: dt.datetime


@dataclasses.dataclass(frozen=True)
class ClearAnnouncement:
    """Remove the three maintenance annotations from the droplet (no-op if absent)."""

    droplet: str


@dataclasses.dataclass(frozen=True)
class SetLabels:
    """Label the LiveMigration ``ferry.dev/source-host``, ``ferry.dev/target-host``,
    ``ferry.dev/droplet`` (so each agent watches only its own work)."""

    droplet: str
    source_host: str
    target_host: str


@dataclasses.dataclass(frozen=True)
class CreateSecret:
    """Create the transfer Secret ``name`` (key ``key``: 32 random bytes), owned by the
    LiveMigration; an AlreadyExists answer is success."""

    name: str


@dataclasses.dataclass(frozen=True)
class DeleteSecret:
    """Delete the transfer Secret ``name`` (NotFound is success)."""

    name: str


@dataclasses.dataclass(frozen=True)
class FlipRecord:
    """THE commit point: in ONE patch guarded by the droplet's resourceVersion, set the
    droplet's ``status.host`` and label ``ferry.dev/host`` to ``to_host``, only if the
    record (read fresh) still names ``from_host``. If it already names ``to_host`` that is
    success; if it names anything else, fail the action."""

    droplet: str
    from_host: str
    to_host: str


@dataclasses.dataclass(frozen=True)
class ReturnRecord:
    """Undo a flip whose target failed before it ran the droplet: move ``status.host`` (and
    the label) from ``from_host`` (the target) back to ``to_host`` (the source, which still
    holds its paused copy), guarded as ``FlipRecord``."""

    droplet: str
    from_host: str
    to_host: str


@dataclasses.dataclass(frozen=True)
class EmitEvent:
    """Post a Kubernetes Event (``type`` Normal | Warning) on the migration or the droplet."""

    type: str
    reason: str
    message: str
    on: str = "migration"  # "migration" | "droplet"


@dataclasses.dataclass(frozen=True)
class MarkDropletCondition:
    """Set a condition on the droplet's status (``OfflineMigrationNeeded``,
    ``NestedVirtualizationRestartNeeded``); keep lastTransitionTime if status is unchanged."""

    droplet: str
    type: str
    status: bool
    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class RecordLastMigration:
    """Set the droplet's ``status.lastMigration`` {name, completedAt, fromHost, toHost}."""

    droplet: str
    migration: str
    completed_at: dt.datetime
    from_host: str
    to_host: str


@dataclasses.dataclass(frozen=True)
class RecomputeAllocations:
    """Recompute ``status.allocated``/``droplets`` of these hosts from the droplets' records."""

    hosts: tuple[str, ...]


Action = Union[
    Announce,
    ClearAnnouncement,
    SetLabels,
    CreateSecret,
    DeleteSecret,
    FlipRecord,
    ReturnRecord,
    EmitEvent,
    MarkDropletCondition,
    RecordLastMigration,
    RecomputeAllocations,
]
