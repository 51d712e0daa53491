"""The states every ferry object goes through: one enum per state field, and the phase sets.

Enums are ``StrEnum``: a member equals its string (``Phase.COMPLETED == "Completed"``),
so bodies written with them are plain JSON and bodies read back compare as usual.
"""

from __future__ import annotations

import enum


class Phase(enum.StrEnum):
    """``LiveMigration.status.phase``."""

    PENDING = "Pending"
    ANNOUNCED = "Announced"
    SCHEDULING = "Scheduling"
    PREPARING = "Preparing"
    PRECOPY = "PreCopy"
    CUTOVER = "CutOver"
    COMPLETED = "Completed"
    FAILED = "Failed"
    CANCELLED = "Cancelled"


#: Never change again.
TERMINAL = frozenset({Phase.COMPLETED, Phase.FAILED, Phase.CANCELLED})
#: Waiting for their turn (a migration never reconciled has phase None and waits too).
QUEUED = frozenset({Phase.PENDING, Phase.ANNOUNCED})
#: Hold a concurrency slot (taken on Announced -> Scheduling) and, once ``status.targetHost``
#: is set, a capacity reservation on that host.
IN_FLIGHT = frozenset({Phase.SCHEDULING, Phase.PREPARING, Phase.PRECOPY, Phase.CUTOVER})
#: Own their droplet: another migration of the same droplet waits in Pending (DropletBusy).
OWNING = frozenset({Phase.ANNOUNCED}) | IN_FLIGHT
#: An attempt runs: a target host and an attempt record exist.
ATTEMPT = frozenset({Phase.PREPARING, Phase.PRECOPY, Phase.CUTOVER})
#: The source agent copies data (progress figures mean something).
TRANSFER = frozenset({Phase.PRECOPY, Phase.CUTOVER})


class TransferState(enum.StrEnum):
    """``status.transfer.state``, written by the source agent."""

    COPYING = "Copying"
    CONVERGING = "Converging"
    PAUSED = "Paused"
    COMPLETED = "Completed"
    FAILED = "Failed"
    ABORTED = "Aborted"


TRANSFER_FINAL = frozenset({TransferState.COMPLETED, TransferState.FAILED, TransferState.ABORTED})
TRANSFER_FAILED = frozenset({TransferState.FAILED, TransferState.ABORTED})


class TargetState(enum.StrEnum):
    """``status.target.state``, written by the target agent."""

    PREPARING = "Preparing"
    LISTENING = "Listening"
    RECEIVED = "Received"
    RUNNING = "Running"
    FAILED = "Failed"
    CLEANED = "Cleaned"


class DropletPhase(enum.StrEnum):
    """``Droplet.status.phase``."""

    PENDING = "Pending"
    UNSCHEDULABLE = "Unschedulable"
    PLACED = "Placed"
    MIGRATING = "Migrating"
    HOST_LOST = "HostLost"


class HostPhase(enum.StrEnum):
    """``Host.status.phase``."""

    READY = "Ready"
    NOT_READY = "NotReady"
    DRAINING = "Draining"
    EVACUATED = "Evacuated"
    CORDONED = "Cordoned"


class VMState(enum.StrEnum):
    """``Host.status.agent.vms[].state``."""

    RUNNING = "Running"
    PAUSED = "Paused"
    STOPPED = "Stopped"
    INCOMING = "Incoming"
