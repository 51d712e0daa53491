"""Text for the user commands: plain data in, lines of text out; no I/O, no API calls.

Hosts and droplets come as the API returns them (dicts in which any field may be missing or
of the wrong type); migrations come already read into ``MigrationView``s.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ferry.api.times import parse
from ferry.api.phases import TRANSFER, Phase
from ferry.api.livemigration import LiveMigration
from ferry.cli.progress import MigrationView, human_bytes, human_duration


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


# --- tables ---------------------------------------------------------------------------------


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
    return "-" if t is None else human_duration(max(0.0, (now - t).total_seconds()))


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


def migrations_table(views: Sequence[MigrationView], now: dt.datetime, qualify: bool) -> list[str]:
    """The migrations in flight (not terminal), oldest first, and a count of finished ones."""
    active = sorted((v for v in views if not v.terminal),
                    key=lambda v: (v.created or dt.datetime.max.replace(tzinfo=dt.timezone.utc), v.key))
    lines: list[str] = []
    if active:
        rows = []
        for v in active:
            row = [v.namespace] if qualify else []
            row += [v.name, v.droplet, (v.phase or "New") + (" (cancelling)" if v.cancel_requested else ""),
                    f"{v.source or '?'} -> {v.target or '?'}",
                    f"{v.progress}%" if v.progress is not None and v.phase in TRANSFER else "-",
                    v.round if v.round else "-",
                    f"{v.throttle_percent}%" if v.throttle_percent is not None and v.phase in TRANSFER
                    else "-",
                    v.reason or "-", _age(v.created, now)]
            rows.append(row)
        headers = (["NAMESPACE"] if qualify else []) + ["NAME", "DROPLET", "PHASE", "SOURCE -> TARGET", "PROGRESS",
                                                         "ROUND", "THROTTLE", "REASON", "AGE"]
        lines += table(headers, rows)
    else:
        lines.append("no migrations in flight")
    done = {p: sum(1 for v in views if v.phase == p) for p in (Phase.COMPLETED, Phase.FAILED, Phase.CANCELLED)}
    if any(done.values()):
        lines.append("finished: " + ", ".join(f"{n} {p}" for p, n in done.items() if n))
    return lines


def status_lines(hosts: Sequence[Mapping[str, Any]], droplets: Sequence[Mapping[str, Any]],
                 migrations: Sequence[MigrationView], now: dt.datetime, namespace: str | None) -> list[str]:
    """`ferry status`: hosts, droplets per host, migrations in flight. ``namespace`` None = all."""
    where = "all namespaces" if namespace is None else f"namespace {namespace}"
    out = ["HOSTS"]
    out += hosts_table(hosts, now) if hosts else ["no hosts"]
    out += ["", f"DROPLETS ({where})"]
    out += droplets_by_host(droplets, hosts, namespace is None) if droplets or hosts else ["no droplets"]
    out += ["", f"MIGRATIONS IN FLIGHT ({where})"]
    out += migrations_table(migrations, now, namespace is None)
    return out


# --- explain --------------------------------------------------------------------------------


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
    for host, why in sorted(_m(p.get("incompatible")).items()):
        lines.append(f"  incompatible {host}: {why}")
    for host, why in sorted(_m(p.get("avoided")).items()):
        lines.append(f"  avoided {host}: {why}")
    if _s(p.get("message")):
        lines.append(f"  {p['message']}")
    return lines


def explain_lines(droplet: Mapping[str, Any], migration: MigrationView | None, migration_placement: Any,
                  now: dt.datetime) -> list[str]:
    """`ferry explain`: the droplet, its placement, and its migration with the target choice
    (``migration_placement``, the migration's status.placement)."""
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
    v = migration
    age = f", created {_age(v.created, now)} ago" if v.created else ""
    lines.append(f"migration {v.key}: {v.phase or 'New'}, {v.source or '?'} -> {v.target or '?'}{age}")
    if v.phase == "Failed":
        lines.append(f"  reason: {v.failure_reason or v.message or v.reason or 'unknown'}")
    elif v.reason or v.message:
        lines.append(f"  {v.reason or ''}{': ' if v.reason and v.message else ''}{v.message or ''}")
    lines.append("target choice (status.placement):")
    lines += placement_lines(migration_placement)
    return lines


# --- report ---------------------------------------------------------------------------------


def report_title(m: LiveMigration) -> str:
    st = m.status
    route = f"{st.source_host or '?'} -> {st.target_host or '?'}"
    return f"{m.namespace}/{m.name}: droplet {m.droplet}, {route}, {st.phase or 'New'}"


def report_subtitle(m: LiveMigration) -> str:
    tr = m.transfer
    facts = [f"attempt {tr.attempt}" if tr.attempt else "no transfer reported"]
    if tr.state:
        facts.append(f"transfer {tr.state}")
    if tr.rounds:
        facts.append(f"{tr.round} rounds")
    if tr.bytes_sent:
        facts.append(f"{human_bytes(tr.bytes_sent)} sent")
    if tr.max_throttle_percent:
        facts.append(f"throttle up to {tr.max_throttle_percent}%")
    downtime = tr.downtime_ms if tr.downtime_ms is not None else m.status.downtime_ms
    if downtime is not None:
        budget = m.status.downtime_budget_ms or tr.downtime_budget_ms
        extra = [f"budget {budget} ms" if budget else "",
                 f"predicted {tr.predicted_downtime_ms} ms" if tr.predicted_downtime_ms is not None else ""]
        extra = [x for x in extra if x]
        facts.append(f"downtime {downtime} ms" + (f" ({', '.join(extra)})" if extra else ""))
    v = m.status.verification
    if v is not None:
        hashed = ", ".join(x for x in (
            f"source {v.source_verify_ms} ms" if v.source_verify_ms is not None else "",
            f"target {v.target_verify_ms} ms" if v.target_verify_ms is not None else "") if x)
        where = " after the resume" if v.method == "frozen-point" else ""
        facts.append(f"verification {v.state} ({v.method}" + (f"; hashed{where}: {hashed}" if hashed else "") + ")")
    if tr.downtime_steps:
        facts.append(f"{tr.downtime_steps} downtime steps to {tr.allowed_downtime_ms} ms (ceiling {tr.max_downtime_ms} ms)")
    if tr.forced:
        facts.append("force-completed")
    return ", ".join(facts)


def report_lines(m: LiveMigration) -> list[str]:
    """``ferry report``: the migration in two lines, then its rounds as a table."""
    tr = m.transfer
    lines = [report_title(m), "  " + report_subtitle(m)]
    if not tr.rounds:
        return lines + ["  no rounds reported (yet)"]
    downtime = tr.downtime_ms if tr.downtime_ms is not None else m.status.downtime_ms
    rows = []
    shown = 0
    for r in tr.rounds:
        if shown and r.round > shown + 1:
            rows.append(["...", "", "", "", "", "", "", f"rounds {shown + 1}-{r.round - 1} not kept"])
        shown = r.round
        note = " "  # blank, not "-": most rounds have nothing to add
        if r.paused:
            note = "pause" + (f": downtime {downtime} ms" if downtime is not None else "")
        rows.append([r.round, f"{r.start_ms / 1000:.1f}s" if r.start_ms is not None else None,
                     f"{r.ms} ms", human_bytes(r.bytes), human_bytes(r.dirty_bytes),
                     human_bytes(r.dirty_rate_bps) + "/s" if r.dirty_rate_bps is not None else None,
                     f"{r.throttle_percent}%" if r.throttle_percent is not None else None, note])
    return lines + [""] + table(["ROUND", "START", "TOOK", "SENT", "DIRTIED", "DIRTY RATE", "THROTTLE", ""], rows)
