"""The user's commands: migrate, watch, cancel, drain, uncordon, status, explain.

Pure functions first (request builders, time parsing, tables: plain dicts in, text lines
out), then the click commands, thin shells that read through ``ferry.storage.Kube``, call
them and print. Errors are one line ``ferry: error: ...`` (raised as ``CliError``, which the
group in main.py prints) and exit code 1, never a traceback.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import click

from ferry.api import constants as c
from ferry.api.times import fmt, now as utcnow, parse
from ferry.cli import progress as pg
from ferry.storage import Conflict, Kube, NotFound, StorageError


class CliError(StorageError):
    """A user-facing error; main.py's group prints ``ferry: error: <message>`` and exits 1."""


# --- pure: requests -------------------------------------------------------------------------

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
                      offline: bool = False) -> dict[str, Any]:
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
                                ("maxAttempts", max_attempts)) if v is not None}
    if limits:
        spec["limits"] = limits
    return {"apiVersion": c.API_VERSION, "kind": "LiveMigration", "metadata": meta, "spec": spec}


def drain_patch(reason: str, start: dt.datetime | None) -> dict[str, Any]:
    """Merge patch putting a host into maintenance (a missing start means now: clear any old one)."""
    return {"spec": {"maintenance": {"reason": reason, "start": fmt(start) if start else None}}}


UNCORDON_PATCH: dict[str, Any] = {"spec": {"maintenance": None, "schedulable": True}}


def connection_message(text: str, server: str) -> str | None:
    """A short line for an unreachable API server, from a StorageError's text; else None."""
    if not any(k in text for k in ("ConnectionError", "ConnectTimeout", "ReadTimeout", "Max retries",
                                    "SSLError", "Timeout")):
        return None
    low = text.lower()
    if "refused" in low:
        why = "connection refused"
    elif "timed out" in low or "timeout" in low:
        why = "timed out"
    elif "name or service not known" in low or "nodename nor servname" in low or "resolution" in low:
        why = "host name not resolvable"
    elif "ssl" in low or "certificate" in low:
        why = "TLS error"
    else:
        why = "connection failed"
    return f"cannot reach the Kubernetes API server at {server} ({why}); check --kubeconfig or KUBECONFIG"


# --- pure: tables ---------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """Left-aligned columns separated by two spaces (like kubectl); no trailing blanks."""
    cells = [[str(h) for h in headers]] + [["-" if v is None or v == "" else str(v) for v in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]


def _m(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _s(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _l(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value


def _g(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def _used(alloc: Any, cap: Any, scale: float = 1.0, unit: str = "") -> str:
    a, k = _num(alloc), _num(cap)
    if a is None and k is None:
        return "-"
    a = None if a is None else a / scale
    k = None if k is None else k / scale
    return f"{_g(a if a is not None else 0)}/{_g(k)}{unit}"


def _name(body: Mapping[str, Any], qualify: bool) -> str:
    meta = _m(body.get("metadata"))
    return f"{meta.get('namespace')}/{meta.get('name')}" if qualify else str(meta.get("name") or "")


def _age(t: dt.datetime | None, now: dt.datetime) -> str:
    return "-" if t is None else pg.human_duration(max(0.0, (now - t).total_seconds()))


def _parse_time(value: Any) -> dt.datetime | None:
    try:
        return parse(value) if isinstance(value, str) else None
    except ValueError:
        return None


def hosts_table(hosts: Sequence[Mapping[str, Any]], now: dt.datetime) -> list[str]:
    rows = []
    for h in sorted(hosts, key=lambda b: str(_m(b.get("metadata")).get("name"))):
        spec, status = _m(h.get("spec")), _m(h.get("status"))
        cap, alloc, agent = _m(spec.get("capacity")), _m(status.get("allocated")), _m(status.get("agent"))
        hb = _parse_time(agent.get("heartbeatTime"))
        maint = _m(spec.get("maintenance"))
        phase = _s(status.get("phase")) or "-"
        if spec.get("schedulable") is False and phase not in ("Cordoned",):
            phase += ",unschedulable"
        rows.append([
            _name(h, False), spec.get("datacenter"), phase,
            status.get("droplets") if isinstance(status.get("droplets"), int) else "-",
            _used(alloc.get("cpu"), cap.get("cpu")),
            _used(alloc.get("memoryMiB"), cap.get("memoryMiB"), 1024, "Gi"),
            _used(alloc.get("diskGiB"), cap.get("diskGiB"), 1, "Gi"),
            f"{_age(hb, now)} ago" if hb else "never",
            (_s(maint.get("reason")) or "maintenance")[:40] if spec.get("maintenance") else "-",
        ])
    return table(["NAME", "DATACENTER", "PHASE", "DROPLETS", "CPU", "MEMORY", "DISK", "HEARTBEAT", "MAINTENANCE"],
                 rows)


def droplets_by_host(droplets: Sequence[Mapping[str, Any]], hosts: Sequence[Mapping[str, Any]],
                     qualify: bool, limit: int = 8) -> list[str]:
    """One row per host (every known host, then unknown ones, then unplaced droplets)."""
    groups: dict[str, list[str]] = {str(_m(h.get("metadata")).get("name")): [] for h in hosts}
    unplaced: list[str] = []
    for d in sorted(droplets, key=lambda b: _name(b, True)):
        status = _m(d.get("status"))
        label = _name(d, qualify)
        phase = _s(status.get("phase"))
        if phase and phase != "Placed":
            label += f" ({phase})"
        host = _s(status.get("host"))
        (groups.setdefault(str(host), []) if host else unplaced).append(label)
    rows = []
    for host in sorted(groups):
        names = groups[host]
        shown = ", ".join(names[:limit]) + (f", +{len(names) - limit} more" if len(names) > limit else "")
        rows.append([host, len(names), shown])
    if unplaced:
        shown = ", ".join(unplaced[:limit]) + (f", +{len(unplaced) - limit} more" if len(unplaced) > limit else "")
        rows.append(["(no host)", len(unplaced), shown])
    return table(["HOST", "COUNT", "DROPLETS"], rows)


def migrations_table(migrations: Sequence[Mapping[str, Any]], now: dt.datetime, qualify: bool) -> list[str]:
    """The migrations in flight (not terminal), oldest first, and a count of finished ones."""
    views = [pg.migration_view(b) for b in migrations]
    active = sorted((v for v in views if not v.terminal),
                    key=lambda v: (v.created or dt.datetime.max.replace(tzinfo=dt.timezone.utc), v.key))
    lines: list[str] = []
    if active:
        rows = []
        for v in active:
            row = [v.namespace] if qualify else []
            row += [v.name, v.droplet, (v.phase or "New") + (" (cancelling)" if v.cancel_requested else ""),
                    f"{v.source or '?'} -> {v.target or '?'}",
                    f"{v.progress}%" if v.progress is not None and v.phase in pg.TRANSFER_PHASES else "-",
                    v.round if v.round else "-",
                    f"{v.throttle_percent}%" if v.throttle_percent is not None and v.phase in pg.TRANSFER_PHASES
                    else "-",
                    v.reason or "-", _age(v.created, now)]
            rows.append(row)
        headers = (["NAMESPACE"] if qualify else []) + ["NAME", "DROPLET", "PHASE", "SOURCE -> TARGET", "PROGRESS",
                                                         "ROUND", "THROTTLE", "REASON", "AGE"]
        lines += table(headers, rows)
    else:
        lines.append("no migrations in flight")
    done = {p: sum(1 for v in views if v.phase == p) for p in c.TERMINAL_PHASES}
    if any(done.values()):
        lines.append("finished: " + ", ".join(f"{n} {p}" for p, n in done.items() if n))
    return lines


def status_lines(hosts: Sequence[Mapping[str, Any]], droplets: Sequence[Mapping[str, Any]],
                 migrations: Sequence[Mapping[str, Any]], now: dt.datetime, namespace: str | None) -> list[str]:
    """`ferry status`: hosts, droplets per host, migrations in flight. ``namespace`` None = all."""
    where = "all namespaces" if namespace is None else f"namespace {namespace}"
    out = ["HOSTS"]
    out += hosts_table(hosts, now) if hosts else ["no hosts"]
    out += ["", f"DROPLETS ({where})"]
    out += droplets_by_host(droplets, hosts, namespace is None) if droplets or hosts else ["no droplets"]
    out += ["", f"MIGRATIONS IN FLIGHT ({where})"]
    out += migrations_table(migrations, now, namespace is None)
    return out


# --- pure: explain --------------------------------------------------------------------------


def _phrase(filter_name: str) -> str:
    try:
        from ferry.placement.model import FILTER_PHRASES
    except ImportError:  # pragma: no cover - placement always ships with the CLI
        return filter_name
    return FILTER_PHRASES.get(filter_name, filter_name)


def _score(value: Any) -> str:
    n = _num(value)
    return "-" if n is None else f"{n:.1f}"


def placement_lines(placement: Any, top: int = 5) -> list[str]:
    """A placement explanation (status.placement), indented by two; any field may be missing."""
    p = _m(placement)
    if not p:
        return ["  no placement recorded (is the operator running?)"]
    chosen = _s(p.get("chosen"))
    candidates = [x for x in _l(p.get("candidates")) if isinstance(x, Mapping)]
    rejected = {str(k): v for k, v in _m(p.get("rejected")).items() if isinstance(v, int) and v > 0}
    considered = p.get("considered") if isinstance(p.get("considered"), int) else None
    head = [f"strategy {p.get('strategy') or '?'}"]
    if considered is not None:
        head.append(f"{considered} host(s) considered")
        head.append(f"{considered - sum(rejected.values())} feasible")
    head.append(f"chosen {chosen}" if chosen else "no host chosen")
    lines = ["  " + ", ".join(head)]
    if candidates:
        rows = []
        for cand in candidates[:top]:
            host = str(cand.get("host") or "?")
            rows.append([host + (" *" if host == chosen else ""), _score(cand.get("score")), _score(cand.get("cpu")),
                         _score(cand.get("memory")), _score(cand.get("disk")), _score(cand.get("penalty"))])
        lines += ["  " + line for line in table(["HOST", "SCORE", "CPU", "MEMORY", "DISK", "PENALTY"], rows)]
        more = len(candidates) - top
        if more > 0:
            lines.append(f"  ... {more} more candidate(s)")
    else:
        lines.append("  no candidates")
    if rejected:
        lines.append("  rejected: " + ", ".join(f"{n} {_phrase(k)} ({k})" for k, n in rejected.items()))
    elif considered is not None:
        lines.append("  rejected: none")
    if _s(p.get("message")):
        lines.append(f"  {p['message']}")
    return lines


def pick_migration(migrations: Sequence[Mapping[str, Any]], droplet: str) -> Mapping[str, Any] | None:
    """The droplet's active migration if any, else its most recent one."""
    mine = [b for b in migrations if _m(b.get("spec")).get("droplet") == droplet]
    if not mine:
        return None

    def created(b: Mapping[str, Any]) -> tuple[dt.datetime, str]:
        t = _parse_time(_m(b.get("metadata")).get("creationTimestamp"))
        return (t or dt.datetime.min.replace(tzinfo=dt.timezone.utc), _name(b, False))

    active = [b for b in mine if _m(b.get("status")).get("phase") not in c.TERMINAL_PHASES]
    return max(active or mine, key=created)


def explain_lines(droplet: Mapping[str, Any], migration: Mapping[str, Any] | None, now: dt.datetime) -> list[str]:
    meta, spec, status = _m(droplet.get("metadata")), _m(droplet.get("spec")), _m(droplet.get("status"))
    key = f"{meta.get('namespace')}/{meta.get('name')}"
    size = _s(spec.get("size")) or ", ".join(f"{k} {v}" for k, v in _m(spec.get("resources")).items()) or "?"
    host = _s(status.get("host"))
    lines = [f"droplet {key}: {_s(status.get('phase')) or 'no phase yet'}"
             + (f" on {host}" if host else " (no host)")
             + f", size {size}, datacenter {_s(spec.get('datacenter')) or '?'}"]
    reason, message = _s(status.get("reason")), _s(status.get("message"))
    if reason or message:
        lines.append(f"  {reason or ''}{': ' if reason and message else ''}{message or ''}")
    for cond in _l(status.get("conditions")):
        if isinstance(cond, Mapping) and cond.get("status") == "True" and cond.get("type") != "Placed":
            lines.append(f"  condition {cond.get('type')}: {cond.get('message') or cond.get('reason') or ''}")
    last = _m(status.get("lastMigration"))
    if last:
        lines.append(f"  last migration {last.get('name') or '?'}: {last.get('fromHost') or '?'} -> "
                     f"{last.get('toHost') or '?'} at {last.get('completedAt') or '?'}")
    lines += ["", "placement of the droplet (status.placement):"]
    lines += placement_lines(status.get("placement"))
    lines.append("")
    if migration is None:
        lines.append("no LiveMigration for this droplet in its namespace")
        return lines
    v = pg.migration_view(migration)
    age = f", created {_age(v.created, now)} ago" if v.created else ""
    lines.append(f"migration {v.key}: {v.phase or 'New'}, {v.source or '?'} -> {v.target or '?'}{age}")
    if v.phase == "Failed":
        lines.append(f"  reason: {v.failure_reason or v.message or v.reason or 'unknown'}")
    elif v.reason or v.message:
        lines.append(f"  {v.reason or ''}{': ' if v.reason and v.message else ''}{v.message or ''}")
    lines.append("target choice (status.placement):")
    lines += placement_lines(_m(migration.get("status")).get("placement"))
    return lines


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
            raise CliError(connection_message(text, server) or text) from None

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


def _follow_migration(s: Session, name: str) -> int:
    """Show a migration's progress until it ends; return 0/1/2 (Completed/Failed/Cancelled)."""
    qual = f"{s.namespace}/{name}"

    def fetch() -> dict[str, Any]:
        return s.kube.get("LiveMigration", name, s.namespace)

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
                     f"(`{_prog()} watch {name}` to follow it, `{_prog()} cancel {name}` to cancel it)")
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
@click.option("--offline", is_flag=True, help="Stop the droplet and copy it once instead of live.")
@click.option("--name", metavar="NAME", help="Name of the LiveMigration (default: <droplet>-<random>).")
@click.option("--wait", is_flag=True,
              help="Follow the migration until it ends; exit 0 Completed, 1 Failed, 2 Cancelled.")
@_one_line_errors
def migrate(droplet: str, target: str | None, at: str | None, bandwidth: int | None, downtime: int | None,
            max_attempts: int | None, offline: bool, name: str | None, wait: bool) -> None:
    """Live-migrate DROPLET to another host; prints the LiveMigration's name."""
    when = _when(at)
    s = _connect()
    d = s.get("Droplet", droplet)
    if target:
        s.get("Host", target)
        if _m(d.get("status")).get("host") == target:
            raise CliError(f"droplet {s.namespace}/{droplet} already runs on {target}")
    body = migration_request(droplet, name=name, target=target, at=when, bandwidth_mibps=bandwidth,
                             downtime_ms=downtime, max_attempts=max_attempts, offline=offline)
    try:
        created = s.kube.create("LiveMigration", body, s.namespace)
    except Conflict as exc:
        if not name:
            raise
        raise CliError(f"migration {s.namespace}/{name} already exists") from exc
    mname = created["metadata"]["name"]
    click.echo(mname)
    if wait:
        sys.exit(_follow_migration(s, mname))


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
        migrations = s.kube.list("LiveMigration", None, selector=selector)
        return h, sorted(migrations, key=lambda b: _name(b, True))

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
    spec = _m(before.get("spec"))
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
    for line in status_lines(hosts, droplets, migrations, utcnow(), ns):
        click.echo(line)


@click.command()
@click.argument("droplet")
@_one_line_errors
def explain(droplet: str) -> None:
    """Why DROPLET is where it is: placement scores, rejected hosts, its last migration."""
    s = _connect()
    body = s.get("Droplet", droplet)
    migrations = s.kube.list("LiveMigration", s.namespace)
    for line in explain_lines(body, pick_migration(migrations, droplet), utcnow()):
        click.echo(line)
