"""Benchmark: time per placement decision for 100, 1,000 and 10,000 hosts.

    .venv/bin/python tests/perf/bench_placement.py [--sizes 100,1000,10000] [--repeats N]

Compares, in the same run and on the same fleet:

* ``place``        ferry.placement.place (the production scorer), strategy spread
* ``place/pack``   the same, strategy pack
* ``naive``        a straightforward implementation of the same rules: per-host Resources
                   objects, a list of filter functions, a Candidate for every fitting host,
                   a full sort (the baseline)
* ``filters only`` one pass over the hosts running the filters and nothing else (a floor:
                   what any single-pass scorer must pay)

and prints median and p95 per decision, the ratio naive/place and place/filters-only.
It checks that ``naive`` and ``place`` choose the same host. No assertions on time.
The goal is <= 20 ms per decision at 10,000 hosts.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence

from ferry.api.sizes import Resources
from ferry.placement import Candidate, DropletRequest, HostInfo, Reservation, place

DATACENTER = "nyc3"


def fleet(n: int, seed: int = 1) -> tuple[list[HostInfo], list[Reservation]]:
    """One datacenter (the worst case: every host runs every filter), a few hosts not
    ready, cordoned or in maintenance, random load, reservations on 1% of hosts."""
    rnd = random.Random(seed)
    hosts = []
    for i in range(n):
        cap = Resources(rnd.choice((32, 64, 96)), rnd.choice((131072, 262144)), rnd.choice((2000, 4000)))
        alloc = Resources(rnd.randint(0, cap.cpu), rnd.randint(0, cap.memory_mib), rnd.randint(0, cap.disk_gib))
        hosts.append(
            HostInfo(
                name=f"host-{i:05d}",
                datacenter=DATACENTER,
                capacity=cap,
                allocated=alloc,
                labels={"tier": "gold" if rnd.random() < 0.9 else "silver"},
                ready=rnd.random() > 0.03,
                schedulable=rnd.random() > 0.02,
                in_maintenance=rnd.random() < 0.01,
                migrations_in_flight=rnd.choice((0, 0, 0, 0, 1, 2)),
            )
        )
    reservations = [
        Reservation(f"host-{rnd.randrange(n):05d}", Resources(2, 4096, 80), f"ns/r{i}") for i in range(max(1, n // 100))
    ]
    return hosts, reservations


REQUEST = DropletRequest(
    "ns/bench", DATACENTER, Resources(4, 8192, 160), host_selector={"tier": "gold"}, source_host="host-00001"
)


def naive_place(request: DropletRequest, hosts: Sequence[HostInfo], reservations: Sequence[Reservation],
                strategy: str = "spread", top: int = 3) -> str | None:
    """The same rules written the obvious way (the baseline)."""
    reserved: dict[str, Resources] = {}
    for r in reservations:
        if r.droplet != request.name:
            reserved[r.host] = reserved.get(r.host, Resources(0, 0, 0)) + r.resources
    need = request.resources
    filters: list[tuple[str, Callable[[HostInfo, Resources], bool]]] = [
        ("datacenter", lambda h, f: h.datacenter == request.datacenter),
        ("ready", lambda h, f: h.ready),
        ("schedulable", lambda h, f: h.schedulable),
        ("maintenance", lambda h, f: not h.in_maintenance),
        ("source", lambda h, f: h.name != request.source_host),
        ("hostSelector", lambda h, f: all(h.labels.get(k) == v for k, v in request.host_selector.items())),
        ("cpu", lambda h, f: f.cpu >= need.cpu),
        ("memory", lambda h, f: f.memory_mib >= need.memory_mib),
        ("disk", lambda h, f: f.disk_gib >= need.disk_gib),
    ]
    rejected = {name: 0 for name, _ in filters}
    candidates: list[Candidate] = []
    for h in hosts:
        free = h.capacity - h.allocated - reserved.get(h.name, Resources(0, 0, 0))
        failed = next((name for name, ok in filters if not ok(h, free)), None)
        if failed is not None:
            rejected[failed] += 1
            continue
        after = free - need
        fractions = [after.cpu / h.capacity.cpu, after.memory_mib / h.capacity.memory_mib,
                     after.disk_gib / h.capacity.disk_gib]
        dims = [100 * x if strategy == "spread" else 100 * (1 - x) for x in fractions]
        penalty = 10.0 * h.migrations_in_flight
        candidates.append(Candidate(h.name, sum(dims) / 3 - penalty, dims[0], dims[1], dims[2], penalty))
    candidates.sort(key=lambda c: (-c.score, c.host))
    best = candidates[:top]
    return best[0].host if best else None


def filters_only(request: DropletRequest, hosts: Sequence[HostInfo], reservations: Sequence[Reservation]) -> int:
    """One pass with the filters and nothing else (no scoring, no top-N)."""
    reserved: dict[str, tuple[int, int, int]] = {}
    for r in reservations:
        c, m, d = reserved.get(r.host, (0, 0, 0))
        reserved[r.host] = (c + r.resources.cpu, m + r.resources.memory_mib, d + r.resources.disk_gib)
    dc, src, sel = request.datacenter, request.source_host, tuple(request.host_selector.items())
    rc, rm, rd = request.resources.cpu, request.resources.memory_mib, request.resources.disk_gib
    fit = 0
    get = reserved.get
    zero = (0, 0, 0)
    for h in hosts:
        if h.datacenter != dc or not h.ready or not h.schedulable or h.in_maintenance or h.name == src:
            continue
        if sel:
            labels = h.labels
            ok = True
            for k, v in sel:
                if labels.get(k) != v:
                    ok = False
                    break
            if not ok:
                continue
        xc, xm, xd = get(h.name, zero)
        cap, alc = h.capacity, h.allocated
        if cap.cpu - alc.cpu - xc < rc or cap.memory_mib - alc.memory_mib - xm < rm or cap.disk_gib - alc.disk_gib - xd < rd:
            continue
        fit += 1
    return fit


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000.0)
    return out


def p95(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))]


def run(sizes: Sequence[int], repeats: int | None = None) -> list[dict]:
    """Measure every implementation at every size; returns one row per (size, impl)."""
    rows = []
    for n in sizes:
        hosts, res = fleet(n)
        reps = repeats or max(60, min(300, 300_000 // n))
        ours = place(REQUEST, hosts, res).chosen
        theirs = naive_place(REQUEST, hosts, res)
        if ours != theirs:
            raise SystemExit(f"naive and place disagree at n={n}: {theirs} != {ours}")
        impls: list[tuple[str, Callable[[], object]]] = [
            ("place", lambda: place(REQUEST, hosts, res)),
            ("place/pack", lambda: place(REQUEST, hosts, res, "pack")),
            ("naive", lambda: naive_place(REQUEST, hosts, res)),
            ("filters only", lambda: filters_only(REQUEST, hosts, res)),
        ]
        for name, fn in impls:
            fn()  # warm up
            t = timed(fn, reps)
            rows.append({"hosts": n, "impl": name, "repeats": reps, "median_ms": statistics.median(t), "p95_ms": p95(t),
                         "chosen": ours})
    return rows


def print_table(rows: list[dict]) -> None:
    by = {(r["hosts"], r["impl"]): r for r in rows}
    print(f"{'hosts':>6} {'impl':<13} {'reps':>5} {'median ms':>10} {'p95 ms':>9} {'per host µs':>12}")
    for r in rows:
        print(f"{r['hosts']:>6} {r['impl']:<13} {r['repeats']:>5} {r['median_ms']:>10.3f} {r['p95_ms']:>9.3f} "
              f"{1000 * r['median_ms'] / r['hosts']:>12.3f}")
    print()
    print(f"{'hosts':>6} {'naive/place':>12} {'place/filters-only':>19} {'place p95 <= 20 ms':>19}")
    for n in sorted({r["hosts"] for r in rows}):
        p, nv, fo = by[(n, "place")], by[(n, "naive")], by[(n, "filters only")]
        print(f"{n:>6} {nv['median_ms'] / p['median_ms']:>11.2f}x {p['median_ms'] / fo['median_ms']:>18.2f}x "
              f"{'yes' if p['p95_ms'] <= 20 else 'NO':>19}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,1000,10000")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per size and impl (default: by size)")
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",")]
    print(f"placement benchmark, Python {sys.version.split()[0]}, one decision = one place() call")
    print_table(run(sizes, args.repeats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
