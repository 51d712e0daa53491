"""The user's commands: migrate, watch, complete, cancel, drain, uncordon, status, explain.

Pure functions first (``--at`` parsing, request bodies, which migration to explain), then
the click commands: thin shells that read through ``ferry.storage.Kube`` and print the text
of ``ferry.cli.render``. Errors are one line ``ferry: error: ...`` (raised as ``CliError``,
which the group in main.py prints) and exit code 1, never a traceback.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import click

from ferry.api import constants as c
from ferry.api.livemigration import LiveMigration
from ferry.api.phases import Phase
from ferry.api.times import fmt, now as utcnow, parse
from ferry.cli import progress as pg
from ferry.cli import chart, render
from ferry.storage import Conflict, Kube, NotFound, StorageError


class CliError(StorageError):
    """A user-facing error; main.py's group prints ``ferry: error: <message>`` and exits 1."""


# --- pure: requests and lookups ------------------------------------------------------------

_REL = re.compile(r"^\+?\s*((?:\d+\s*[smhd]\s*)+)$", re.IGNORECASE)
_REL_PART = re.compile(r"(\d+)\s*([smhd])", re.IGNORECASE)
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


def parse_when(text: str, now: dt.datetime) -> dt.datetime:
    """``--at``: RFC 3339 (``2030-01-02T03:04:05Z``, ``...+02:00``), ``now``, or relative
    ``+10m``, ``+30s``, ``+1h30m``, ``+2d``. Raises ``ValueError`` with what is accepted."""
    t = text.strip()
    if t.lower() == "now":
        return now
    m = _REL.match(t)
    if m:
        seconds = sum(int(n) * _SECONDS[u.lower()] for n, u in _REL_PART.findall(m.group(1)))
        return now + dt.timedelta(seconds=seconds)
    try:
        if "T" not in t.upper():
            raise ValueError
        parsed = parse(t.upper() if t.endswith(("z",)) else t)
    except ValueError:
        raise ValueError(f"{text!r} is not a time: use RFC 3339 (e.g. 2030-01-02T03:04:05Z) "
                         "or a relative time such as +10m, +30s, +1h30m") from None
    assert parsed is not None
    return parsed


def migration_request(droplet: str, *, name: str | None = None, target: str | None = None,
                      at: dt.datetime | None = None, bandwidth_mibps: int | None = None,
                      downtime_ms: int | None = None, max_attempts: int | None = None,
                      offline: bool = False, max_downtime_ms: int | None = None) -> dict[str, Any]:
    """The LiveMigration body `ferry migrate` creates (namespace set by the caller's URL)."""
    meta: dict[str, Any] = {"name": name} if name else {"generateName": f"{droplet}-"}
    if _LABEL_VALUE.match(droplet) and len(droplet) <= 63:
        meta["labels"] = {c.DROPLET_LABEL: droplet}
    spec: dict[str, Any] = {"droplet": droplet, "mode": "offline" if offline else "live"}
    if target:
        spec["targetHost"] = target
    if at is not None:
        spec["scheduledAt"] = fmt(at)
    limits = {k: v for k, v in (("bandwidthMiBps", bandwidth_mibps), ("downtimeMs", downtime_ms),
                                ("maxAttempts", max_attempts), ("maxDowntimeMs", max_downtime_ms)) if v is not None}
    if limits:
        spec["limits"] = limits
    return {"apiVersion": c.API_VERSION, "kind": "LiveMigration", "metadata": meta, "spec": spec}


def drain_patch(reason: str, start: dt.datetime | None) -> dict[str, Any]:
    """Merge patch putting a host into maintenance (a missing start means now: clear any old one)."""
    return {"spec": {"maintenance": {"reason": reason, "start": fmt(start) if start else None}}}


UNCORDON_PATCH: dict[str, Any] = {"spec": {"maintenance": None, "schedulable": True}}


def _map(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _key(body: Mapping[str, Any]) -> str:
    meta = _map(body.get("metadata"))
    return f"{meta.get('namespace')}/{meta.get('name')}"


def pick_migration(migrations: Sequence[Mapping[str, Any]], droplet: str) -> Mapping[str, Any] | None:
    """The droplet's active migration if any, else its most recent one."""
    mine = [(b, LiveMigration.from_body(b, lenient=True)) for b in migrations]
    mine = [(b, lm) for b, lm in mine if lm.droplet == droplet]
    if not mine:
        return None
    oldest = dt.datetime.min.replace(tzinfo=dt.timezone.utc)
    active = [x for x in mine if not x[1].terminal]
    return max(active or mine, key=lambda x: (x[1].meta.created or oldest, x[1].name))[0]


# --- I/O shell ------------------------------------------------------------------------------


#: What the API server says for a kind it does not serve (CRDs missing), as opposed to a missing object.
NO_CRDS = ("the server could not find the requested resource", "404 page not found")

#: Seconds between two reads while following (tests set 0).
POLL_INTERVAL = 0.5


class Session:
    """A connected client and the namespace commands act in."""

    def __init__(self, kube: Kube, namespace: str, server: str):
        self.kube = kube
        self.namespace = namespace
        self.server = server

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
        ns = None if kind == "Host" else (namespace or self.namespace)
        try:
            return self.kube.get(kind, name, ns)
        except NotFound as exc:
            if any(m in str(exc) for m in NO_CRDS):
                raise
            what = {"Host": "host", "Droplet": "droplet", "LiveMigration": "migration"}[kind]
            raise CliError(f"{what} {ns + '/' if ns else ''}{name} not found") from None


def _session(ctx: click.Context) -> Session:
    obj = ctx.obj or {}
    kube = Kube.connect(obj.get("kubeconfig"), timeout=15)
    config = getattr(kube.api, "config", None)
    namespace = obj.get("namespace") or getattr(config, "namespace", None) or "default"
    server = getattr(kube.api, "url", "") or "?"
    return Session(kube, namespace, server)


def _one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Unreachable API server -> one short line; any message -> one line."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CliError:
            raise
        except StorageError as exc:
            text = " ".join(str(exc).split())
            ctx = click.get_current_context(silent=True)
            server = "?"
            if ctx is not None and isinstance(ctx.meta.get("ferry.session"), Session):
                server = ctx.meta["ferry.session"].server
            if any(m in text for m in NO_CRDS):
                raise CliError(f"the ferry.dev API is not served by {server}: install ferry's CRDs "
                               "(kubectl apply -f crds/) or check the kubeconfig's cluster") from None
            raise CliError(render.connection_message(text, server) or text) from None

    return wrapper


def _connect() -> Session:
    ctx = click.get_current_context()
    s = _session(ctx)
    ctx.meta["ferry.session"] = s
    return s


def _is_tty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def _prog() -> str:
    """How the user called us: ``ferry`` or ``kubectl ferry`` (for the hints we print)."""
    ctx = click.get_current_context(silent=True)
    return (ctx.find_root().info_name if ctx else None) or "ferry"


def _interrupted(message: str) -> None:
    click.echo(f"\n{message}", err=True)
    sys.exit(130)


def request_force_complete(s: Session, name: str) -> str:
    """Set spec.forceComplete on MIGRATION; return what to tell the user."""
    v = pg.migration_view(s.get("LiveMigration", name))
    if v.terminal:
        raise CliError(f"migration {v.key} already ended ({v.phase}); there is nothing to complete")
    if v.force_requested:
        return f"migration {v.key}: force-complete already requested (phase {v.phase or 'New'})"
    s.kube.patch("LiveMigration", name, {"spec": {"forceComplete": True}}, s.namespace)
    if v.phase in (Phase.CUTOVER,) or v.transfer_state in ("Paused", "Completed"):
        return f"migration {v.key}: force-complete requested, but the guest is already paused for the final copy"
    what = ("the guest pauses now and the copy finishes" if v.phase == Phase.PRECOPY
            else "the guest will be paused as soon as its copy starts (the whole copy is then downtime)")
    return (f"migration {v.key}: force-complete requested (phase {v.phase or 'New'}): {what}, whatever the "
            f"downtime budget; the downtime is reported in status.downtimeMs")


def _follow_migration(s: Session, name: str, force_after: float | None = None) -> int:
    """Show a migration's progress until it ends; return 0/1/2 (Completed/Failed/Cancelled).
    ``force_after``: seconds of copying after which force-complete is requested."""
    qual = f"{s.namespace}/{name}"
    copying_since: list[float] = []

    def fetch() -> dict[str, Any]:
        body = s.kube.get("LiveMigration", name, s.namespace)
        if force_after is not None:
            v = pg.migration_view(body)
            if v.phase == Phase.PRECOPY and not copying_since:
                copying_since.append(time.monotonic())
            if (copying_since and not v.force_requested and v.phase == Phase.PRECOPY
                    and time.monotonic() - copying_since[0] >= force_after):
                click.echo(f"copying for {force_after:.0f} s: " + request_force_complete(s, name), err=True)
                body = s.kube.get("LiveMigration", name, s.namespace)
        return body

    def warn(exc: Exception) -> None:
        click.echo(f"ferry: warning: {' '.join(str(exc).split())}; retrying", err=True)

    display: Any
    if _is_tty():
        from rich.console import Console

        display = pg.RichMigrationDisplay(Console(file=sys.stdout))
    else:
        display = pg.LineMigrationDisplay(sys.stdout)
    try:
        with display:
            body, code = pg.poll(fetch, display.show, lambda b: pg.migration_exit_code(pg.migration_view(b)),
                                 interval=POLL_INTERVAL, on_error=warn)
    except NotFound:
        raise CliError(f"migration {qual} was deleted") from None
    except KeyboardInterrupt:
        _interrupted(f"stopped watching; migration {qual} keeps running "
                     f"(`{_prog()} watch {name}` to follow it, `{_prog()} cancel {name}` to cancel it, "
                     f"`{_prog()} complete {name}` to pause it now and finish)")
    for line in pg.migration_summary(pg.migration_view(body), utcnow()):
        click.echo(line)
    return code


def _when(value: str | None) -> dt.datetime | None:
    if value is None:
        return None
    try:
        return parse_when(value, utcnow())
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--at'") from None


# --- commands -------------------------------------------------------------------------------


@click.command()
@click.argument("droplet")
@click.option("--to", "target", metavar="HOST", help="Target host (default: the best host by score).")
@click.option("--at", "at", metavar="TIME",
              help="Earliest time data moves: RFC 3339 or relative (+10m, +30s). The droplet is told at once.")
@click.option("--bandwidth", type=click.IntRange(1, 100000), metavar="MiBps", help="Limit the copy rate (MiB/s).")
@click.option("--downtime", type=click.IntRange(1, 60000), metavar="MS", help="Downtime budget in ms (default 300).")
@click.option("--max-attempts", type=click.IntRange(1, 10), help="Attempts before giving up (default 3).")
@click.option("--max-downtime", type=click.IntRange(1, 60000), metavar="MS",
              help="Ceiling of the downtime steps when the guest does not converge (default: the budget, no steps).")
@click.option("--offline", is_flag=True, help="Stop the droplet and copy it once instead of live.")
@click.option("--name", metavar="NAME", help="Name of the LiveMigration (default: <droplet>-<random>).")
@click.option("--wait", is_flag=True,
              help="Follow the migration until it ends; exit 0 Completed, 1 Failed, 2 Cancelled. A copy that "
                   "does not converge shows how to force-complete it.")
@click.option("--force-after", type=click.FloatRange(0), metavar="SECONDS",
              help="With --wait: force-complete (pause now and finish) after this long copying.")
@_one_line_errors
def migrate(droplet: str, target: str | None, at: str | None, bandwidth: int | None, downtime: int | None,
            max_attempts: int | None, max_downtime: int | None, offline: bool, name: str | None, wait: bool,
            force_after: float | None) -> None:
    """Live-migrate DROPLET to another host; prints the LiveMigration's name."""
    if force_after is not None and not wait:
        raise CliError("--force-after needs --wait (or run `ferry complete NAME` later)")
    when = _when(at)
    s = _connect()
    d = s.get("Droplet", droplet)
    if target:
        s.get("Host", target)
        if _map(d.get("status")).get("host") == target:
            raise CliError(f"droplet {s.namespace}/{droplet} already runs on {target}")
    body = migration_request(droplet, name=name, target=target, at=when, bandwidth_mibps=bandwidth,
                             downtime_ms=downtime, max_attempts=max_attempts, offline=offline,
                             max_downtime_ms=max_downtime)
    try:
        created = s.kube.create("LiveMigration", body, s.namespace)
    except Conflict as exc:
        if not name:
            raise
        raise CliError(f"migration {s.namespace}/{name} already exists") from exc
    mname = created["metadata"]["name"]
    click.echo(mname)
    if wait:
        sys.exit(_follow_migration(s, mname, force_after))


@click.command()
@click.argument("migration")
@_one_line_errors
def watch(migration: str) -> None:
    """Follow MIGRATION's progress until it ends; exit 0 Completed, 1 Failed, 2 Cancelled."""
    s = _connect()
    s.get("LiveMigration", migration)
    sys.exit(_follow_migration(s, migration))


@click.command()
@click.argument("migration")
@_one_line_errors
def complete(migration: str) -> None:
    """Force-complete MIGRATION: pause the guest now and finish the copy, whatever the downtime budget."""
    s = _connect()
    click.echo(request_force_complete(s, migration))


@click.command()
@click.argument("migration")
@_one_line_errors
def cancel(migration: str) -> None:
    """Cancel MIGRATION; the droplet keeps running on its source host."""
    s = _connect()
    body = s.get("LiveMigration", migration)
    v = pg.migration_view(body)
    if v.phase == "Cancelled":
        click.echo(f"migration {v.key} is already Cancelled")
        return
    if v.terminal:
        raise CliError(f"migration {v.key} already ended ({v.phase}); there is nothing to cancel")
    if v.cancel_requested:
        click.echo(f"migration {v.key}: cancellation already requested (phase {v.phase or 'New'})")
        return
    s.kube.patch("LiveMigration", migration, {"spec": {"cancel": True}}, s.namespace)
    where = f"; droplet {v.droplet} stays on {v.source}" if v.source else ""
    click.echo(f"migration {v.key}: cancellation requested (phase {v.phase or 'New'}){where}")
    if v.phase == "CutOver":
        click.echo("note: the migration is cutting over; if the placement record already moved it completes",
                   err=True)


@click.command()
@click.argument("host")
@click.option("--reason", default="maintenance", show_default=True, help="Why (shown in status and Events).")
@click.option("--at", "at", metavar="TIME", help="When evacuation starts: RFC 3339 or relative (+10m). Default now.")
@click.option("--wait", is_flag=True,
              help="Follow the evacuation; exit 0 when Evacuated, 1 when a migration failed and none runs.")
@_one_line_errors
def drain(host: str, reason: str, at: str | None, wait: bool) -> None:
    """Put HOST into maintenance: cordon it and live-migrate every droplet off it."""
    if not reason.strip():
        raise click.BadParameter("must not be empty", param_hint="'--reason'")
    when = _when(at)
    s = _connect()
    s.get("Host", host)
    try:
        s.kube.patch("Host", host, drain_patch(reason, when))
    except NotFound:
        raise CliError(f"host {host} not found") from None
    start = f" from {fmt(when)}" if when else ""
    click.echo(f"host {host}: maintenance set ({reason}); droplets will be evacuated{start}")
    if not wait:
        return
    sys.exit(_follow_drain(s, host))


def _follow_drain(s: Session, host: str) -> int:
    selector = f"{c.EVACUATION_LABEL}={host}"

    def fetch() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        h = s.kube.get("Host", host)
        # only this maintenance window's evacuation, not the finished ones of earlier drains
        # (an operator that records no window: all of them)
        window = ((h.get("status") or {}).get("evacuation") or {}).get("window")
        migrations = [m for m in s.kube.list("LiveMigration", None, selector=selector)
                      if window is None or
                      ((m.get("metadata") or {}).get("labels") or {}).get(c.EVACUATION_WINDOW_LABEL, "1") == str(window)]
        return h, sorted(migrations, key=_key)

    def done(value: tuple[dict[str, Any], list[dict[str, Any]]]) -> int | None:
        return pg.drain_exit_code(pg.evacuation_view(value[0]))

    def warn(exc: Exception) -> None:
        click.echo(f"ferry: warning: {' '.join(str(exc).split())}; retrying", err=True)

    display: Any
    if _is_tty():
        from rich.console import Console

        display = pg.RichDrainDisplay(Console(file=sys.stdout))
    else:
        display = pg.LineDrainDisplay(sys.stdout)
    try:
        with display:
            value, code = pg.poll(fetch, display.show, done, interval=POLL_INTERVAL, on_error=warn)
    except NotFound:
        raise CliError(f"host {host} was deleted") from None
    except KeyboardInterrupt:
        _interrupted(f"stopped watching; host {host} stays in maintenance and its evacuation goes on "
                     f"(`{_prog()} uncordon {host}` ends the maintenance)")
    for line in pg.drain_summary(pg.evacuation_view(value[0]), value[1], prog=_prog()):
        click.echo(line)
    return code


@click.command()
@click.argument("host")
@_one_line_errors
def uncordon(host: str) -> None:
    """End HOST's maintenance and make it schedulable again."""
    s = _connect()
    before = s.get("Host", host)
    spec = _map(before.get("spec"))
    try:
        s.kube.patch("Host", host, UNCORDON_PATCH)
    except NotFound:
        raise CliError(f"host {host} not found") from None
    if spec.get("maintenance") or spec.get("schedulable") is False:
        click.echo(f"host {host}: maintenance cleared, schedulable")
    else:
        click.echo(f"host {host} was not in maintenance nor cordoned; it is schedulable")


@click.command()
@click.option("-A", "--all-namespaces", is_flag=True, help="Droplets and migrations of every namespace.")
@_one_line_errors
def status(all_namespaces: bool) -> None:
    """Hosts, droplets per host and the migrations in flight."""
    s = _connect()
    ns = None if all_namespaces else s.namespace
    hosts = s.kube.list("Host")
    droplets = s.kube.list("Droplet", ns)
    migrations = s.kube.list("LiveMigration", ns)
    views = [pg.migration_view(b) for b in migrations]
    for line in render.status_lines(hosts, droplets, views, utcnow(), ns):
        click.echo(line)


@click.command()
@click.argument("droplet")
@_one_line_errors
def explain(droplet: str) -> None:
    """Why DROPLET is where it is: placement scores, rejected hosts, its last migration."""
    s = _connect()
    body = s.get("Droplet", droplet)
    migrations = s.kube.list("LiveMigration", s.namespace)
    migration = pick_migration(migrations, droplet)
    view = pg.migration_view(migration) if migration is not None else None
    placement = LiveMigration.from_body(migration, lenient=True).status.placement if migration is not None else None
    for line in render.explain_lines(body, view, placement, utcnow()):
        click.echo(line)


@click.command()
@click.argument("migration")
@click.option("--svg", "svg", type=click.Path(dir_okay=False, writable=True), metavar="FILE",
              help="Also draw it: remaining bytes and dirty rate over time, the throttle, the pause.")
@_one_line_errors
def report(migration: str, svg: str | None) -> None:
    """The story of MIGRATION: each pre-copy round (bytes, time, dirty rate, throttle) and the pause."""
    s = _connect()
    m = LiveMigration.from_body(s.get("LiveMigration", migration), lenient=True)
    for line in render.report_lines(m):
        click.echo(line)
    if svg:
        text = chart.migration_svg(render.report_title(m), m.transfer.rounds,
                                   m.transfer.downtime_ms if m.transfer.downtime_ms is not None
                                   else m.status.downtime_ms, render.report_subtitle(m))
        with open(svg, "w", encoding="utf-8") as f:
            f.write(text)
        click.echo(f"wrote {svg}")
