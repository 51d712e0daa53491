"""The droplet cache behind the maintenance-event endpoint. PURE: no I/O, no asyncio.

The cache holds one small record per Droplet (namespace/name -> ip + maintenance state)
and an index ip -> the droplet that answers for that address. It is fed by a list
(`replace`) and by watch events (`apply`); both return the set of addresses whose
answer changed, so the server can wake the long-polls waiting on exactly those.

Two droplets claiming the same ip: the OLDEST claim answers (``ferry.api.addresses``:
creationTimestamp, then namespace, then name), whatever order the events arrive in. A later
droplet cannot take over the answers of an address that already belongs to another one; the
operator flags it with the ``AddressConflict`` condition.

Revisions: every change of an address's answer takes the next number of one counter
for the whole cache, so a (address, revision) pair is never reused within a process;
the server turns it into an opaque ETag (hashed with a per-process secret, so ETags never
repeat across restarts and leak nothing about other droplets).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable, Iterable, Mapping

from ferry.api.addresses import claim_order, normalize_ip
from ferry.api.meta import ObjectKey
from ferry.api import constants as c
from ferry.api.models import Droplet
from ferry.api.times import fmt

# Annotation names (docs/architecture.md, "Names").
ANNOTATION_EVENT = c.MAINTENANCE_ANNOTATION
ANNOTATION_SINCE = c.MAINTENANCE_SINCE_ANNOTATION
ANNOTATION_NOT_BEFORE = c.MAINTENANCE_NOT_BEFORE_ANNOTATION

# An event value is passed through only if it looks like DigitalOcean's tokens
# (`live_migrate`); anything else (empty, junk) reads as "no event".
_EVENT_TOKEN = re.compile(r"^[a-z][a-z0-9_]{0,62}$")



@dataclass(frozen=True)
class MaintenanceState:
    """What one droplet is told. `event` is None when nothing is scheduled."""

    event: str | None = None
    since: str | None = None
    not_before: str | None = None

    @property
    def text(self) -> str:
        """The plain-text body of GET /v1/maintenance_event."""
        return self.event or ""

    def as_json(self) -> dict[str, str | None]:
        """The body of GET /v1/maintenance_event.json (null fields when no event)."""
        if self.event is None:
            return {"event": None, "since": None, "notBefore": None}
        return {"event": self.event, "since": self.since, "notBefore": self.not_before}


NO_EVENT = MaintenanceState()


@dataclass(frozen=True)
class DropletRecord:
    """The part of a Droplet the endpoint needs, parsed at the boundary."""

    namespace: str
    name: str
    ip: str | None  # normalised IPv4/IPv6 text, None when absent or invalid
    state: MaintenanceState = NO_EVENT
    created: str = ""  # metadata.creationTimestamp (RFC 3339, sorts as text)

    @property
    def key(self) -> ObjectKey:
        return (self.namespace, self.name)

    @property
    def claim_order(self) -> tuple[str, str, str]:
        return claim_order(self.created, self.namespace, self.name)


@dataclass(frozen=True)
class Answer:
    """The current answer for one address, with the revisions the ETags come from."""

    key: ObjectKey  # which droplet answers (never shown to clients)
    state: MaintenanceState
    text_rev: int  # last change of the plain-text body
    json_rev: int  # last change of any field of the JSON body


def _timestamp(value: object) -> str | None:
    if not isinstance(value, str) or not value or len(value) > 64:
        return None
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return None
    return value


def state_from_annotations(annotations: Mapping[str, object] | None) -> MaintenanceState:
    """The maintenance state a Droplet's annotations announce."""
    if not annotations:
        return NO_EVENT
    event = annotations.get(ANNOTATION_EVENT)
    if not isinstance(event, str) or not _EVENT_TOKEN.match(event):
        return NO_EVENT
    return MaintenanceState(
        event=event,
        since=_timestamp(annotations.get(ANNOTATION_SINCE)),
        not_before=_timestamp(annotations.get(ANNOTATION_NOT_BEFORE)),
    )


def record_from_object(obj: Mapping) -> DropletRecord:
    """A Droplet body (as the API returns it) -> its record, parsed by ``ferry.api``.

    Raises ValueError when the droplet cannot be parsed or has no namespace/name.
    """
    d = Droplet.from_body(obj)
    if not isinstance(d.namespace, str) or not isinstance(d.name, str) or not d.namespace or not d.name:
        raise ValueError("droplet without metadata.namespace/name")
    return DropletRecord(
        namespace=d.namespace,
        name=d.name,
        ip=normalize_ip(d.ip),
        state=state_from_annotations(d.meta.annotations),
        created=fmt(d.meta.created) or "",
    )


@dataclass
class DropletCache:
    """ip -> answer, keyed also by namespace/name. Not thread-safe: one owner thread."""

    _records: dict[ObjectKey, DropletRecord] = field(default_factory=dict)
    _claims: dict[str, set[ObjectKey]] = field(default_factory=dict)  # ip -> droplets claiming it
    _answers: dict[str, Answer] = field(default_factory=dict)
    _revision: int = 0
    synced: bool = False  # the first full list has been applied
    resource_version: str | None = None
    _listeners: list[Callable[[set[str]], None]] = field(default_factory=list)

    # ---- reading -------------------------------------------------------------------------

    def lookup(self, ip: str | None) -> Answer | None:
        """The answer for a source address, None when no droplet has it."""
        if ip is None:
            return None
        return self._answers.get(ip)

    def __len__(self) -> int:
        return len(self._records)

    def record(self, namespace: str, name: str) -> DropletRecord | None:
        return self._records.get((namespace, name))

    def conflicts(self) -> dict[str, list[ObjectKey]]:
        """Addresses claimed by more than one droplet (claim order, winner first)."""
        out = {}
        for ip, keys in self._claims.items():
            if len(keys) > 1:
                out[ip] = sorted(keys, key=lambda k: self._records[k].claim_order)
        return out

    # ---- listening -----------------------------------------------------------------------

    def subscribe(self, listener: Callable[[set[str]], None]) -> None:
        """Call `listener(changed_addresses)` after every change that altered answers."""
        self._listeners.append(listener)

    def unsubscribe(self, listener: Callable[[set[str]], None]) -> None:
        self._listeners.remove(listener)

    def _notify(self, changed: set[str]) -> set[str]:
        if changed:
            for listener in list(self._listeners):
                listener(changed)
        return changed

    # ---- writing -------------------------------------------------------------------------

    def apply(self, event_type: str, record: DropletRecord, resource_version: str | None = None) -> set[str]:
        """Apply one watch event (ADDED, MODIFIED, DELETED). Returns the changed addresses."""
        if resource_version is not None:
            self.resource_version = resource_version
        if event_type == "DELETED":
            touched = self._remove(record.key)
        elif event_type in ("ADDED", "MODIFIED"):
            touched = self._remove(record.key) | self._put(record)
        else:
            raise ValueError(f"unknown event type {event_type!r}")
        return self._notify(self._refresh(touched))

    def replace(self, records: Iterable[DropletRecord], resource_version: str | None = None) -> set[str]:
        """Replace the whole content with a fresh list (a relist). Returns changed addresses.

        Droplets missing from the list were deleted while the watch was down; answers
        that did not change keep their revisions (their long-polls stay asleep).
        """
        fresh: dict[ObjectKey, DropletRecord] = {}
        for record in records:
            fresh[record.key] = record
        touched: set[str] = set()
        for key in [k for k in self._records if k not in fresh]:
            touched |= self._remove(key)
        for key, record in fresh.items():
            if self._records.get(key) != record:
                touched |= self._remove(key) | self._put(record)
        self.resource_version = resource_version
        self.synced = True
        return self._notify(self._refresh(touched))

    def _remove(self, key: ObjectKey) -> set[str]:
        old = self._records.pop(key, None)
        if old is None or old.ip is None:
            return set()
        claims = self._claims.get(old.ip)
        if claims is not None:
            claims.discard(key)
            if not claims:
                del self._claims[old.ip]
        return {old.ip}

    def _put(self, record: DropletRecord) -> set[str]:
        self._records[record.key] = record
        if record.ip is None:
            return set()
        self._claims.setdefault(record.ip, set()).add(record.key)
        return {record.ip}

    def _refresh(self, addresses: set[str]) -> set[str]:
        """Recompute the answers of `addresses`; returns those whose answer changed."""
        changed = set()
        for ip in addresses:
            claims = self._claims.get(ip)
            old = self._answers.get(ip)
            if not claims:
                if old is not None:
                    del self._answers[ip]
                    changed.add(ip)
                continue
            winner = min((self._records[k] for k in claims), key=lambda r: r.claim_order)
            if old is not None and old.key == winner.key and old.state == winner.state:
                continue
            self._revision += 1
            if old is None:
                text_rev = json_rev = self._revision
            else:
                text_rev = self._revision if old.state.text != winner.state.text else old.text_rev
                json_rev = self._revision if old.state != winner.state else old.json_rev
                if old.key != winner.key:  # another droplet answers now: new ETags for both
                    text_rev = json_rev = self._revision
            self._answers[ip] = Answer(key=winner.key, state=winner.state, text_rev=text_rev, json_rev=json_rev)
            changed.add(ip)
        return changed
