"""Decisions this operator made that its watch has not shown back yet (client-go's
"expectations").

One active operator owns all writes, so remembering its own decisions until they come back
makes back-to-back decisions safe: two migrations scheduled within one watch round trip
never both take the last free capacity of a host (invariant 5), admission never exceeds
the concurrency limits, and a droplet placed a moment ago is not placed twice. Each
expectation ends when the watch shows the decision, when the write that carried it failed
(``forget_migration``), or when its object is deleted.
"""

from __future__ import annotations

import dataclasses

from ferry.api.meta import ObjectKey
from ferry.api.livemigration import LiveMigration
from ferry.api.models import Droplet
from ferry.api.phases import QUEUED, Phase
from ferry.api.sizes import Resources
from ferry.placement import Reservation



@dataclasses.dataclass(frozen=True)
class ExpectedReservation:
    """A target host chosen for a migration, not yet seen in its status."""

    host: str
    droplet: ObjectKey
    resources: Resources


class Expectations:
    def __init__(self) -> None:
        self._reservations: dict[ObjectKey, ExpectedReservation] = {}
        self._placements: dict[ObjectKey, tuple[str, Resources]] = {}  # new droplets placed
        self._admitted: set[ObjectKey] = set()  # Announced -> Scheduling (took a concurrency slot)
        self._announcing: set[ObjectKey] = set()  # Pending -> Announced (owns its droplet)
        self._secrets_deleted: set[ObjectKey] = set()  # transfer Secrets deleted
        #: bumped when a phase that ``phase_of`` reports changes (cached admission verdicts)
        self.version = 0

    # --- what this operator just decided --------------------------------------------------
    def announced(self, key: ObjectKey) -> None:
        self._announcing.add(key)
        self.version += 1

    def admitted(self, key: ObjectKey) -> None:
        self._admitted.add(key)
        self.version += 1

    def reserved(self, key: ObjectKey, host: str, droplet: ObjectKey, resources: Resources) -> None:
        self._reservations[key] = ExpectedReservation(host, droplet, resources)

    def placed(self, key: ObjectKey, host: str, resources: Resources) -> None:
        self._placements[key] = (host, resources)

    def secret_created(self, key: ObjectKey) -> None:
        self._secrets_deleted.discard(key)

    def secret_deleted(self, key: ObjectKey) -> None:
        self._secrets_deleted.add(key)

    def forget_migration(self, key: ObjectKey) -> None:
        """The write that carried a decision failed: it never happened."""
        self._reservations.pop(key, None)
        if key in self._admitted or key in self._announcing:
            self._admitted.discard(key)
            self._announcing.discard(key)
            self.version += 1

    def forget_placement(self, key: ObjectKey) -> None:
        self._placements.pop(key, None)

    # --- what the watch shows back -------------------------------------------------------
    def saw_migration(self, key: ObjectKey, m: LiveMigration | None) -> None:
        """``m`` as the watch now shows it (None: deleted)."""
        if m is None:
            self.forget_migration(key)
            self._secrets_deleted.discard(key)
            return
        r = self._reservations.get(key)
        if r is not None and (m.terminal or m.status.target_host == r.host):
            del self._reservations[key]
        if m.phase not in (None, *QUEUED) and key in self._admitted:
            self._admitted.discard(key)
            self.version += 1
        if m.phase not in (None, Phase.PENDING) and key in self._announcing:
            self._announcing.discard(key)
            self.version += 1

    def saw_droplet(self, key: ObjectKey, d: Droplet | None) -> None:
        if d is None or d.host:
            self._placements.pop(key, None)

    # --- what the decisions read ---------------------------------------------------------
    def phase_of(self, m: LiveMigration) -> Phase | None:
        """``m``'s phase as this operator knows it, its own decisions included."""
        if m.key in self._admitted and m.phase in (None, *QUEUED):
            return Phase.SCHEDULING
        if m.key in self._announcing and m.phase in (None, Phase.PENDING):
            return Phase.ANNOUNCED
        return m.phase

    def placements(self) -> list[tuple[ObjectKey, str, Resources]]:
        """The placements decided and not seen back: (droplet, host, resources)."""
        return [(k, h, r) for k, (h, r) in self._placements.items()]

    def placement(self, key: ObjectKey) -> str | None:
        p = self._placements.get(key)
        return p[0] if p else None

    def is_placing(self, key: ObjectKey) -> bool:
        return key in self._placements

    def reservations(self, exclude: ObjectKey | None = None) -> dict[ObjectKey, ExpectedReservation]:
        return {k: r for k, r in self._reservations.items() if k != exclude}

    def has_secret_been_deleted(self, key: ObjectKey) -> bool:
        return key in self._secrets_deleted

    def as_reservations(self, exclude: ObjectKey | None = None) -> list[Reservation]:
        return [Reservation(r.host, r.resources, f"{r.droplet[0]}/{r.droplet[1]}")
                for r in self.reservations(exclude).values()]
