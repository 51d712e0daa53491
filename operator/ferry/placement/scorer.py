"""Filter and score hosts for one droplet. PURE: no kopf, no pykube, no I/O.

``place`` runs every host through the filters of :data:`FILTERS` (first failure wins),
scores the survivors and returns the best one with an explanation. ``check_host`` explains
the verdict on one host in words (the same rules, the slow way).

Scoring, on a 0..100 scale: for each dimension d in (cpu, memory, disk)
``free_after_d = (capacity_d - allocated_d - reserved_d - request_d) / capacity_d``;
``spread`` scores ``100 * free_after_d`` (prefer the emptiest host), ``pack`` scores
``100 * (1 - free_after_d)`` (prefer the fullest host that fits). The total is the weighted
mean of the three minus ``migration_penalty`` per migration in flight on the host. Ties are
broken by host name (smallest first), so the result never depends on input order.

Performance: one pass over ``hosts`` with local variables and no per-host objects except
one tuple per feasible host; ``heapq.nsmallest`` picks the top N. About 1 µs per host in
CPython 3.11 (see tests/perf/bench_placement.py).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence

from ferry.api.sizes import Resources
from ferry.placement.model import (
    FILTER_PHRASES,
    FILTERS,
    STRATEGIES,
    Candidate,
    DropletRequest,
    HostInfo,
    PlacementResult,
    Reservation,
    incompatibility,
)

__all__ = [
    "DEFAULT_MIGRATION_PENALTY",
    "DEFAULT_WEIGHTS",
    "HostVerdict",
    "check_host",
    "place",
    "reserved_by_host",
]

#: Weights of (cpu, memory, disk) in the score.
DEFAULT_WEIGHTS: tuple[float, float, float] = (1.0, 1.0, 1.0)
#: Score points (0..100 scale) subtracted per migration already in flight on a host.
DEFAULT_MIGRATION_PENALTY = 10.0


def reserved_by_host(
    reservations: Iterable[Reservation], *, ignore_droplet: str | None = None
) -> dict[str, tuple[int, int, int]]:
    """Sum reservations per host as ``{host: (cpu, memory_mib, disk_gib)}``.

    Reservations whose ``droplet`` equals ``ignore_droplet`` are left out.
    """
    out: dict[str, tuple[int, int, int]] = {}
    for r in reservations:
        if ignore_droplet is not None and r.droplet == ignore_droplet and r.droplet:
            continue
        res = r.resources
        c, m, d = out.get(r.host, (0, 0, 0))
        out[r.host] = (c + res.cpu, m + res.memory_mib, d + res.disk_gib)
    return out


class HostVerdict:
    """The verdict on one host: ``filter`` is the first failing filter (None: it fits) and
    ``detail`` says why in words, e.g. ``insufficient memory (needs 4096 MiB, 2048 free)``."""

    __slots__ = ("host", "filter", "detail", "free")

    def __init__(self, host: str, filter: str | None, detail: str, free: Resources | None):
        self.host = host
        self.filter = filter
        self.detail = detail
        self.free = free

    def __repr__(self) -> str:
        return f"HostVerdict({self.host!r}, {self.filter!r}, {self.detail!r})"


def check_host(
    request: DropletRequest,
    host: HostInfo,
    reserved: Mapping[str, tuple[int, int, int]] | Iterable[Reservation] = (),
    *,
    inbound_limit: int | None = None,
) -> HostVerdict:
    """Run ``host`` through every filter in order and explain the first failure.

    ``reserved`` is either the output of :func:`reserved_by_host` or the reservations
    themselves (the request's own reservation is ignored either way when given as a list).
    Agrees with ``place`` on every host (a property test checks it).
    """
    if not isinstance(reserved, Mapping):
        reserved = reserved_by_host(reserved, ignore_droplet=request.name)
    name = host.name
    if host.datacenter != request.datacenter:
        return HostVerdict(
            name,
            "datacenter",
            f"wrong datacenter (host in {host.datacenter}, droplet in {request.datacenter})",
            None,
        )
    if not host.ready:
        return HostVerdict(name, "ready", "not ready (no recent agent heartbeat)", None)
    if not host.schedulable:
        return HostVerdict(name, "schedulable", "not schedulable (cordoned)", None)
    if host.in_maintenance:
        return HostVerdict(name, "maintenance", "in maintenance", None)
    if request.source_host is not None and name == request.source_host:
        return HostVerdict(name, "source", "is the droplet's current (source) host", None)
    labels = host.labels
    for key, want in request.host_selector.items():
        have = labels.get(key)
        if have != want:
            shown = "absent" if have is None else f"{key}={have}"
            return HostVerdict(
                name, "hostSelector", f"hostSelector needs {key}={want}, host has {shown}", None
            )
    why = incompatibility(request.platform, request.resources.cpu, host.platform)
    if why is not None:
        return HostVerdict(name, "compatible", f"incompatible: {why}", None)
    rc, rm, rd = reserved.get(name, (0, 0, 0))
    cap, alloc, req = host.capacity, host.allocated, request.resources
    free = Resources(
        cap.cpu - alloc.cpu - rc,
        cap.memory_mib - alloc.memory_mib - rm,
        cap.disk_gib - alloc.disk_gib - rd,
    )
    if req.cpu > free.cpu:
        return HostVerdict(
            name, "cpu", f"insufficient cpu (needs {req.cpu}, {max(free.cpu, 0)} free)", free
        )
    if req.memory_mib > free.memory_mib:
        return HostVerdict(
            name,
            "memory",
            f"insufficient memory (needs {req.memory_mib} MiB, {max(free.memory_mib, 0)} free)",
            free,
        )
    if req.disk_gib > free.disk_gib:
        return HostVerdict(
            name,
            "disk",
            f"insufficient disk (needs {req.disk_gib} GiB, {max(free.disk_gib, 0)} free)",
            free,
        )
    if inbound_limit is not None and host.inbound_migrations >= inbound_limit:
        return HostVerdict(
            name,
            "inbound",
            f"already receives {host.inbound_migrations} migrations (limit {inbound_limit})",
            free,
        )
    return HostVerdict(name, None, "fits", free)


def _candidate(
    host: HostInfo,
    req: Resources,
    reserved: Mapping[str, tuple[int, int, int]],
    weights: tuple[float, float, float],
    spread: bool,
    penalty: float,
    total: float | None = None,
) -> Candidate:
    """Per-dimension scores of a host known to fit. ``total`` is the hot loop's score, passed
    so the reported score is bit-identical to the one that ranked the host."""
    rc, rm, rd = reserved.get(host.name, (0, 0, 0))
    cap, alloc = host.capacity, host.allocated
    fc = (cap.cpu - alloc.cpu - rc - req.cpu) / cap.cpu
    fm = (cap.memory_mib - alloc.memory_mib - rm - req.memory_mib) / cap.memory_mib
    fd = (cap.disk_gib - alloc.disk_gib - rd - req.disk_gib) / cap.disk_gib
    wc, wm, wd = weights
    wsum = wc + wm + wd
    ac, am, ad = 100.0 * wc / wsum, 100.0 * wm / wsum, 100.0 * wd / wsum
    s = ac * fc + am * fm + ad * fd
    base = s if spread else (ac + am + ad) - s
    pen = penalty * host.migrations_in_flight
    if spread:
        dims = (100.0 * fc, 100.0 * fm, 100.0 * fd)
    else:
        dims = (100.0 * (1.0 - fc), 100.0 * (1.0 - fm), 100.0 * (1.0 - fd))
    return Candidate(host.name, base - pen if total is None else total, dims[0], dims[1], dims[2], pen)


def place(
    request: DropletRequest,
    hosts: Sequence[HostInfo],
    reservations: Iterable[Reservation] = (),
    strategy: str = "spread",
    target_host: str | None = None,
    top: int = 3,
    *,
    weights: tuple[float, float, float] = DEFAULT_WEIGHTS,
    migration_penalty: float = DEFAULT_MIGRATION_PENALTY,
    inbound_limit: int | None = None,
    avoid: Mapping[str, str] | None = None,
) -> PlacementResult:
    """Choose a host for ``request`` among ``hosts``, counting ``reservations``.

    Filters run in the order of :data:`FILTERS`; each rejected host is counted once, under
    the first filter it fails. Survivors are scored (see the module doc) and the best
    ``top`` become ``candidates``. With ``target_host`` the choice is that host if it passes
    every filter; otherwise ``chosen`` is None and ``message`` names exactly why, e.g.
    ``target host h3 rejected: insufficient memory (needs 4096 MiB, 2048 free)``.
    ``inbound_limit`` (None: no limit) rejects hosts that already receive that many
    migrations. ``avoid`` maps hosts to why a choice should avoid them (a retry: the hosts
    earlier attempts failed on); without a target they are chosen only when no other host
    fits, and the message says which were avoided. Host names must be unique. Raises ``ValueError`` on an unknown strategy,
    ``top < 1`` or non-positive weights.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown placement strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    wc, wm, wd = weights
    if wc < 0 or wm < 0 or wd < 0 or wc + wm + wd <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {weights}")

    req = request.resources
    rc, rm, rd = req.cpu, req.memory_mib, req.disk_gib
    dc = request.datacenter
    source = request.source_host
    selector = tuple(request.host_selector.items())
    reserved = reserved_by_host(reservations, ignore_droplet=request.name)
    reserved_get = reserved.get
    has_reserved = bool(reserved)
    no_res = (0, 0, 0)
    spread = strategy == "spread"
    wsum = wc + wm + wd
    ac, am, ad = 100.0 * wc / wsum, 100.0 * wm / wsum, 100.0 * wd / wsum
    # spread: total = ac*fc + am*fm + ad*fd - pen ; pack: total = 100 - (that sum) - pen.
    # Candidates are kept as (-total, name, host) so nsmallest yields best score first and
    # the smallest name among equal scores.
    sign = 1.0 if spread else -1.0
    offset = 0.0 if spread else ac + am + ad
    ac, am, ad = sign * ac, sign * am, sign * ad
    pen = float(migration_penalty)
    limit = inbound_limit

    n_dc = n_ready = n_sched = n_maint = n_source = n_sel = n_cpu = n_mem = n_disk = n_in = n_compat = 0
    incompatible: dict[str, str] = {}
    guest = request.platform
    feasible: list[tuple[float, str, HostInfo]] = []
    append = feasible.append

    for h in hosts:
        if h.datacenter != dc:
            n_dc += 1
            continue
        if not h.ready:
            n_ready += 1
            continue
        if not h.schedulable:
            n_sched += 1
            continue
        if h.in_maintenance:
            n_maint += 1
            continue
        name = h.name
        if name == source:
            n_source += 1
            continue
        if selector:
            labels = h.labels
            ok = True
            for k, v in selector:
                if labels.get(k) != v:
                    ok = False
                    break
            if not ok:
                n_sel += 1
                continue
        if h.platform is not None:
            why = incompatibility(guest, rc, h.platform)
            if why is not None:
                n_compat += 1
                incompatible[name] = why
                continue
        cap = h.capacity
        alc = h.allocated
        if has_reserved:
            xc, xm, xd = reserved_get(name, no_res)
        else:
            xc = xm = xd = 0
        cc = cap.cpu
        fc = cc - alc.cpu - xc - rc
        if fc < 0:
            n_cpu += 1
            continue
        cm = cap.memory_mib
        fm = cm - alc.memory_mib - xm - rm
        if fm < 0:
            n_mem += 1
            continue
        cd = cap.disk_gib
        fd = cd - alc.disk_gib - xd - rd
        if fd < 0:
            n_disk += 1
            continue
        if limit is not None and h.inbound_migrations >= limit:
            n_in += 1
            continue
        append((pen * h.migrations_in_flight - offset - ac * fc / cc - am * fm / cm - ad * fd / cd, name, h))

    rejected = dict(
        zip(FILTERS, (n_dc, n_ready, n_sched, n_maint, n_source, n_sel, n_compat, n_cpu, n_mem, n_disk, n_in))
    )
    considered = len(hosts)
    avoided: dict[str, str] = {}
    if avoid and target_host is None:
        others = [f for f in feasible if f[1] not in avoid]
        avoided = {f[1]: avoid[f[1]] for f in feasible if f[1] in avoid}
        if others:
            feasible = others
    try:
        best = heapq.nsmallest(top, feasible)
    except TypeError:  # equal score and equal name: the tuples fell through to HostInfo
        raise ValueError("host names must be unique") from None
    candidates = [_candidate(h, req, reserved, weights, spread, pen, -key) for key, _, h in best]
    if len({c.host for c in candidates}) != len(candidates):
        raise ValueError("host names must be unique")

    if target_host is None:
        if candidates:
            chosen = candidates[0]
            message = (
                f"chose {chosen.host} (score {chosen.score:.2f}, {strategy}) among "
                f"{len(feasible)} fitting of {considered} hosts"
            )
            if chosen.host in avoided:
                message += f"; {chosen.host} again although {avoided[chosen.host]}: no other host fits"
            elif avoided:
                message += "; avoided " + ", ".join(f"{h} ({why})" for h, why in sorted(avoided.items()))
            return PlacementResult(
                chosen.host, strategy, tuple(candidates), rejected, considered, message, "Placed",
                avoided=avoided, incompatible=incompatible,
            )
        return PlacementResult(
            None, strategy, (), rejected, considered, _no_fit_message(rejected, considered, incompatible),
            "NoHostFits", incompatible=incompatible,
        )

    # Explicit target: honoured only if it passes every filter.
    target = next((h for h in hosts if h.name == target_host), None)
    if target is None:
        return PlacementResult(
            None,
            strategy,
            tuple(candidates),
            rejected,
            considered,
            f"target host {target_host} rejected: no such host",
            "TargetHostRejected",
            target_host,
            "notFound",
        )
    verdict = check_host(request, target, reserved, inbound_limit=inbound_limit)
    if verdict.filter is not None:
        return PlacementResult(
            None,
            strategy,
            tuple(candidates),
            rejected,
            considered,
            f"target host {target_host} rejected: {verdict.detail}",
            "TargetHostRejected",
            target_host,
            verdict.filter,
        )
    if all(c.host != target_host for c in candidates):
        candidates.append(_candidate(target, req, reserved, weights, spread, pen))
    mine = next(c for c in candidates if c.host == target_host)
    return PlacementResult(
        target_host,
        strategy,
        tuple(candidates),
        rejected,
        considered,
        f"target host {target_host} accepted (score {mine.score:.2f}, {strategy})",
        "Placed",
        target_host,
        None,
    )


def _no_fit_message(rejected: Mapping[str, int], considered: int,
                    incompatible: Mapping[str, str] | None = None) -> str:
    if considered == 0:
        return "no host fits: no hosts known"
    parts = [f"{n} {FILTER_PHRASES[f]}" for f, n in rejected.items() if n]
    out = "no host fits: " + ", ".join(parts)
    if incompatible:
        out += " (" + "; ".join(f"{h}: {why}" for h, why in sorted(incompatible.items())[:5]) + ")"
    return out
