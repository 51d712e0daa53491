"""Following a LiveMigration or a host evacuation: pure renderers and a small poll loop.

Pure part: ``migration_view`` / ``evacuation_view`` turn a resource body (a plain dict as the
API returns it, any field possibly missing) into a frozen view; ``migration_detail``,
``migration_line``, ``migration_summary``, ``evacuation_line`` and ``drain_summary`` turn views
into text; ``migration_exit_code`` / ``drain_exit_code`` say when following is done.

I/O part: ``poll`` fetches until a ``done`` function answers an exit code; the displays
(``LineMigrationDisplay`` when stdout is not a terminal: one line per change;
``RichMigrationDisplay``: a live rich progress bar) show each fetched body.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

from ferry.api.livemigration import LiveMigration
from ferry.api.phases import TERMINAL, TRANSFER, Phase
from ferry.api.reports import NO_TRANSFER
from ferry.api.times import parse

# --- small formatters ---------------------------------------------------------------------

_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")


def human_bytes(n: Any) -> str:
    """``1536`` -> ``1.5 KiB``; ``None``/garbage -> ``-``."""
    try:
        value = float(n)
    except (TypeError, ValueError):
        return "-"
    if not math.isfinite(value):
        return "-"
    if value < 1024:
        return f"{int(value)} B"
    for unit in _UNITS:
        value /= 1024
        if value < 1024 or unit == _UNITS[-1]:
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def human_duration(seconds: Any) -> str:
    """``65`` -> ``1m05s``; ``3700`` -> ``1h01m``; ``None`` -> ``-``."""
    try:
        s = float(seconds)
    except (TypeError, ValueError):
        return "-"
    if not math.isfinite(s):
        return "-"
    if s < 0:  # clock skew
        s = 0.0
    if s < 10:
        return f"{s:.1f}s" if s % 1 else f"{int(s)}s"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600}h"


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _map(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _time(value: Any) -> dt.datetime | None:
    try:
        return parse(value) if isinstance(value, str) else None
    except ValueError:
        return None


# --- LiveMigration ------------------------------------------------------------------------

EXIT_CODES = {Phase.COMPLETED: 0, Phase.FAILED: 1, Phase.CANCELLED: 2}


@dataclasses.dataclass(frozen=True)
class MigrationView:
    """What a user wants to see of one LiveMigration; every field may be missing (None)."""

    namespace: str
    name: str
    droplet: str
    phase: str | None
    reason: str | None
    message: str | None
    failure_reason: str | None
    cancel_requested: bool
    attempt: int | None
    max_attempts: int | None
    source: str | None
    target: str | None
    transfer_state: str | None
    round: int | None
    rounds: int | None
    bytes_sent: int | None
    bytes_total: int | None
    progress: int | None
    throttle_percent: int | None
    eta_seconds: float | None
    downtime_ms: int | None
    created: dt.datetime | None
    finished: dt.datetime | None
    next_attempt_at: dt.datetime | None
    not_before: dt.datetime | None
    downtime_budget_ms: int | None = None
    expected_downtime_ms: int | None = None
    downtime_steps: int | None = None
    forced: bool = False
    force_requested: bool = False
    slow: bool = False  # not converging yet: throttle at its maximum, downtime steps taken, or ETA over budget
    guest_pause_ms: int | None = None  # the guest's whole pause: the source's pause to the target's resume

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL


def migration_view(body: Mapping[str, Any]) -> MigrationView:
    lm = LiveMigration.from_body(body, lenient=True)
    st = lm.status
    phase = st.phase
    # A transfer report of another attempt describes old work: ignore its numbers.
    tr = lm.transfer if lm.transfer.attempt == st.attempt or not st.attempt else NO_TRANSFER
    progress = st.progress
    if tr.progress is not None and (progress is None or phase in TRANSFER):
        progress = tr.progress if progress is None else max(progress, tr.progress)
    if phase == Phase.COMPLETED:
        progress = 100
    limits = st.effective_limits or lm.spec.limits
    return MigrationView(
        namespace=lm.namespace,
        name=lm.name if isinstance(lm.name, str) else "",
        droplet=lm.spec.droplet,
        phase=phase,
        reason=st.reason,
        message=st.message,
        failure_reason=st.failure_reason,
        cancel_requested=lm.spec.cancel,
        attempt=st.attempt or None,
        max_attempts=limits.max_attempts,
        source=st.source_host,
        target=st.target_host or lm.spec.target_host,
        transfer_state=tr.state,
        round=tr.round if tr.state else None,
        rounds=max(tr.round, len(tr.rounds)) if tr.state else None,  # the history is bounded
        bytes_sent=tr.bytes_sent if tr.state else None,
        bytes_total=tr.bytes_total if tr.state else None,
        progress=None if progress is None else max(0, min(100, progress)),
        throttle_percent=tr.throttle_percent,
        eta_seconds=tr.eta_seconds,
        downtime_ms=st.downtime_ms if st.downtime_ms is not None else tr.downtime_ms,
        created=lm.meta.created,
        finished=st.phase_times.get(phase) if phase in TERMINAL else None,
        next_attempt_at=st.next_attempt_at,
        not_before=st.not_before,
        downtime_budget_ms=st.downtime_budget_ms or tr.downtime_budget_ms or limits.downtime_ms,
        expected_downtime_ms=tr.expected_downtime_ms,
        downtime_steps=tr.downtime_steps,
        forced=tr.forced,
        force_requested=lm.spec.force_complete,
        guest_pause_ms=st.guest_pause_ms,
        slow=phase == Phase.PRECOPY and tr.state in ("Copying", "Converging") and (
            (tr.throttle_percent or 0) >= 99 or bool(tr.downtime_steps)
            or (st.condition("CompletionAtRisk") is not None and st.condition("CompletionAtRisk").status == "True")),
    )


def migration_exit_code(view: MigrationView) -> int | None:
    """0 Completed, 1 Failed, 2 Cancelled; None while the migration is still going."""
    return EXIT_CODES.get(view.phase or "")


def _clock(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%H:%M:%SZ")


def migration_detail(view: MigrationView) -> str:
    """Everything but the phase, in one line, without anything that changes by itself."""
    parts: list[str] = []
    if view.attempt:
        parts.append(f"attempt {view.attempt}/{view.max_attempts}" if view.max_attempts else f"attempt {view.attempt}")
    if view.source or view.target:
        parts.append(f"{view.source or '?'} -> {view.target or '?'}")
    if view.terminal:
        if view.phase == Phase.FAILED:
            parts.append(view.failure_reason or view.message or view.reason or "unknown reason")
        elif view.phase == Phase.CANCELLED and view.reason:
            parts.append(view.reason)
        return " · ".join(parts)
    if view.phase in TRANSFER or view.bytes_sent:
        if view.round:
            parts.append(f"round {view.round}")
        if view.bytes_total or view.bytes_sent:
            parts.append(f"sent {human_bytes(view.bytes_sent or 0)} of {human_bytes(view.bytes_total)}")
        if view.throttle_percent:
            parts.append(f"throttle {view.throttle_percent}%")
        if view.eta_seconds is not None and not view.terminal:
            parts.append(f"ETA {human_duration(view.eta_seconds)}")
        if view.transfer_state and view.transfer_state not in ("Copying",):
            parts.append(view.transfer_state.lower())
    if view.phase is None:
        parts.append("waiting for the operator to pick it up")
    elif view.phase not in TRANSFER:
        if view.reason:
            parts.append(view.reason)
        if view.phase == "Announced" and view.not_before:
            parts.append(f"data moves from {_clock(view.not_before)}")
        elif view.next_attempt_at and view.phase == "Scheduling":
            parts.append(f"next attempt at {_clock(view.next_attempt_at)}")
    if view.downtime_steps:
        parts.append(f"{view.downtime_steps} downtime step{'s' if view.downtime_steps != 1 else ''}")
    if view.force_requested:
        parts.append("force-complete requested")
    elif view.slow:
        parts.append(f"not converging yet: `ferry complete {view.name}` pauses it now"
                     + (f" (about {view.expected_downtime_ms} ms down)" if view.expected_downtime_ms else ""))
    if view.cancel_requested:
        parts.append("cancel requested")
    return " · ".join(parts)


def migration_line(view: MigrationView) -> str:
    """One plain line: phase, progress, detail (used when stdout is not a terminal)."""
    progress = f"{view.progress:>3d}%" if view.progress is not None else "   -"
    return f"{view.phase or 'New':<10} {progress}  {migration_detail(view)}".rstrip()


def migration_summary(view: MigrationView, now: dt.datetime) -> list[str]:
    """The final lines after following a migration (works for a non-terminal one too)."""
    src, dst = view.source or "?", view.target or "?"
    head = f"migration {view.key} {view.phase or 'New'}: droplet {view.droplet or '?'} {src} -> {dst}"
    if view.phase in (Phase.FAILED, Phase.CANCELLED) and view.source:
        head += f" (the droplet stays on {view.source})"
    end = view.finished or (now if not view.terminal else None)
    facts = []
    if view.created and end:
        facts.append(f"duration {human_duration((end - view.created).total_seconds())}")
    if view.attempt:
        facts.append(f"attempts {view.attempt}")
    if view.rounds:
        facts.append(f"rounds {view.rounds}")
    if view.bytes_sent is not None or view.bytes_total is not None:
        facts.append(f"sent {human_bytes(view.bytes_sent or 0)} of {human_bytes(view.bytes_total)}")
    if view.downtime_ms is not None:
        budget = f" (budget {view.downtime_budget_ms} ms)" if view.downtime_budget_ms else ""
        facts.append(f"downtime {view.downtime_ms} ms{budget}" + (", force-completed" if view.forced else ""))
    if view.guest_pause_ms is not None:
        facts.append(f"guest paused {view.guest_pause_ms} ms in all")
    lines = [head]
    if facts:
        lines.append("  " + ", ".join(facts))
    if view.phase == Phase.FAILED:
        lines.append(f"  reason: {view.failure_reason or view.message or view.reason or 'unknown'}")
    elif view.phase == Phase.CANCELLED and (view.message or view.reason):
        lines.append(f"  {view.message or view.reason}")
    return lines


# --- Host evacuation ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EvacuationView:
    host: str
    phase: str | None
    maintenance: str | None  # the reason, None when not in maintenance
    left: int | None
    running: int
    failed: int
    completed: int
    current: bool  # status describes the latest spec (observedGeneration >= generation)

    @property
    def total(self) -> int:
        return (self.left or 0) + self.completed


def evacuation_view(host: Mapping[str, Any]) -> EvacuationView:
    meta = _map(host.get("metadata"))
    spec = _map(host.get("spec"))
    status = _map(host.get("status"))
    ev = _map(status.get("evacuation"))
    gen, seen = _int(meta.get("generation")), _int(status.get("observedGeneration"))
    maint = spec.get("maintenance")
    return EvacuationView(
        host=_str(meta.get("name")) or "",
        phase=_str(status.get("phase")),
        maintenance=(_str(_map(maint).get("reason")) or "maintenance") if maint else None,
        left=_int(ev.get("dropletsLeft")) if ev else _int(status.get("droplets")),
        running=_int(ev.get("migrationsRunning")) or 0,
        failed=_int(ev.get("migrationsFailed")) or 0,
        completed=_int(ev.get("migrationsCompleted")) or 0,
        current=bool(status) and (gen is None or seen is None or seen >= gen),
    )


def drain_exit_code(view: EvacuationView) -> int | None:
    """0 once Evacuated, 1 once a migration failed and nothing runs any more, else None."""
    if not view.current or view.maintenance is None:
        return None
    if view.phase == "Evacuated":
        return 0
    if view.failed and not view.running and view.left:
        return 1
    return None


def evacuation_line(view: EvacuationView) -> str:
    if not view.current:
        return f"host {view.host}: waiting for the operator to see the maintenance"
    left = "?" if view.left is None else str(view.left)
    return (f"host {view.host} {view.phase or '-'}: {left} droplet(s) left, {view.running} migrating, "
            f"{view.completed} completed, {view.failed} failed")


def drain_summary(view: EvacuationView, migrations: Sequence[Mapping[str, Any]], prog: str = "ferry") -> list[str]:
    """Final lines of `ferry drain --wait`: the outcome and each failed migration's reason."""
    lines = [evacuation_line(view)]
    for body in migrations:
        m = migration_view(body)
        if m.phase == Phase.FAILED:
            lines.append(f"  {m.key} (droplet {m.droplet}) failed: "
                         f"{m.failure_reason or m.message or m.reason or 'unknown'}")
    if view.phase == "Evacuated":
        lines.append(f"host {view.host} is empty; `{prog} uncordon {view.host}` puts it back in service")
    return lines


# --- the poll loop ------------------------------------------------------------------------


def poll(fetch: Callable[[], Any], show: Callable[[Any], None], done: Callable[[Any], int | None], *,
         interval: float = 0.5, error_grace: float = 60.0, on_error: Callable[[Exception], None] | None = None,
         sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> tuple[Any, int]:
    """Fetch, show and test until ``done`` answers an exit code; return (last value, code).

    ``NotFound`` propagates at once (the object is gone). Other storage errors (API server
    briefly unreachable) are retried for ``error_grace`` seconds, reported once through
    ``on_error``, then raised.
    """
    from ferry.storage import NotFound, StorageError

    failing_since: float | None = None
    while True:
        try:
            value = fetch()
        except NotFound:
            raise
        except StorageError as exc:
            t = clock()
            if failing_since is None:
                failing_since = t
                if on_error:
                    on_error(exc)
            if t - failing_since >= error_grace:
                raise
            sleep(interval)
            continue
        failing_since = None
        show(value)
        code = done(value)
        if code is not None:
            return value, code
        sleep(interval)


# --- displays -----------------------------------------------------------------------------


class LineMigrationDisplay:
    """Prints one timestamped line whenever the rendered state changes."""

    def __init__(self, out: TextIO, now: Callable[[], dt.datetime] | None = None, prefix: str = ""):
        self.out = out
        self.now = now or (lambda: dt.datetime.now(dt.timezone.utc))
        self.prefix = prefix
        self.last: str | None = None

    def __enter__(self) -> LineMigrationDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def show(self, body: Mapping[str, Any]) -> None:
        line = self.prefix + migration_line(migration_view(body))
        if line != self.last:
            self.last = line
            self.out.write(f"{_clock(self.now())} {line}\n")
            self.out.flush()


def _detailed_progress(console: Any) -> Any:
    """A rich Progress drawing each task as a bar line and, under it, its detail line.

    Details (attempt, hosts, round, bytes, throttle, ETA) are too long to share a line with
    a bar on an 80-column terminal; on their own line they never squeeze the bar away.
    """
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.text import Text

    class DetailedProgress(Progress):
        def get_renderables(self):  # type: ignore[no-untyped-def]
            for task in self.tasks:
                yield self.make_tasks_table([task])
                detail = task.fields.get("detail")
                if detail:
                    yield Text(f"    {detail}", style="dim")

    return DetailedProgress(
        SpinnerColumn(),
        TextColumn("{task.description}", markup=False),
        BarColumn(bar_width=30),
        TextColumn("{task.fields[percent]}", markup=False),
        TimeElapsedColumn(),
        console=console, refresh_per_second=4, transient=False,
    )


def _migration_fields(v: MigrationView, label: str) -> dict[str, Any]:
    return {"description": f"{label} {v.phase or 'New'}",
            "completed": v.progress or 0,
            "percent": f"{v.progress:>3d}%" if v.progress is not None else "   -",
            "detail": migration_detail(v)}


def _pad(fields: dict[str, Any], width: int) -> dict[str, Any]:
    return {**fields, "description": fields["description"].ljust(width)}


class RichMigrationDisplay:
    """A live rich progress bar: phase, percent, elapsed; below it attempt, round, bytes, throttle, ETA."""

    def __init__(self, console: Any):
        self.progress = _detailed_progress(console)
        self.task: Any = None

    def __enter__(self) -> RichMigrationDisplay:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def show(self, body: Mapping[str, Any]) -> None:
        v = migration_view(body)
        fields = _migration_fields(v, v.droplet or v.name)
        if self.task is None:
            self.task = self.progress.add_task(total=100, **fields)
        else:
            self.progress.update(self.task, **fields)
        if v.terminal:
            self.progress.stop_task(self.task)


class LineDrainDisplay:
    """Host evacuation as lines: the host line and each evacuation migration's changes."""

    def __init__(self, out: TextIO, now: Callable[[], dt.datetime] | None = None):
        self.out = out
        self.now = now or (lambda: dt.datetime.now(dt.timezone.utc))
        self.last_host: str | None = None
        self.last: dict[str, str] = {}

    def __enter__(self) -> LineDrainDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def _emit(self, line: str) -> None:
        self.out.write(f"{_clock(self.now())} {line}\n")
        self.out.flush()

    def show(self, value: tuple[Mapping[str, Any], Sequence[Mapping[str, Any]]]) -> None:
        host, migrations = value
        line = evacuation_line(evacuation_view(host))
        if line != self.last_host:
            self.last_host = line
            self._emit(line)
        for body in migrations:
            v = migration_view(body)
            text = f"  {v.droplet or v.name}: {migration_line(v)}"
            if self.last.get(v.key) != text:
                self.last[v.key] = text
                self._emit(text)


class RichDrainDisplay:
    """A bar for the host (droplets moved of all) and one per evacuation migration."""

    def __init__(self, console: Any):
        self.progress = _detailed_progress(console)
        self.host_task: Any = None
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> RichDrainDisplay:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def show(self, value: tuple[Mapping[str, Any], Sequence[Mapping[str, Any]]]) -> None:
        host, migrations = value
        ev = evacuation_view(host)
        total = max(ev.total, 1)
        rows: list[tuple[str | None, dict[str, Any]]] = [(None, {
            "description": f"host {ev.host} {ev.phase or '-'}", "total": total,
            "completed": total if ev.current and ev.left == 0 else ev.completed,
            "percent": f"{ev.completed}/{ev.total}" if ev.current else "",
            "detail": evacuation_line(ev).split(": ", 1)[-1]})]
        for body in migrations:
            v = migration_view(body)
            rows.append((v.key, _migration_fields(v, f"  {v.droplet or v.name}")))
        width = max(len(f["description"]) for _, f in rows)
        for key, fields in rows:
            fields = _pad(fields, width)
            if key is None:
                if self.host_task is None:
                    self.host_task = self.progress.add_task(**fields)
                else:
                    self.progress.update(self.host_task, **fields)
            elif key not in self.tasks:
                self.tasks[key] = self.progress.add_task(total=100, **fields)
            else:
                self.progress.update(self.tasks[key], **fields)
