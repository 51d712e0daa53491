"""What kopf spends on every watch event to decide that nothing changed, with its own diff base
against ferry's (``ferry.controller.app.NoDiffBase``), measured in the same run.

    .venv/bin/python tests/perf/bench_kopf_essence.py [--events 3000]

Per watch event kopf fetches the last-handled essence, builds the new one, clears its progress
annotations from both and diffs them (``kopf/_core/reactor/processing.py``). kopf's essence is a
deep copy of the whole object (status included, then dropped) and the clearing copies it again;
ferry has no on.create/on.update handlers, so its essence is empty. The bodies are shaped like
what the operator watches mid-migration (managed fields, conditions, a status of some size).
CPU time per event, one thread, no API server."""

from __future__ import annotations

import argparse
import json
import time

import kopf
from kopf._cogs.structs import diffs

from ferry.controller.app import NoDiffBase


class KopfDiffBase(kopf.DiffBaseStorage):
    """kopf's own essence, never stored (what ferry ran before NoDiffBase's empty essence)."""

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return self.build(body=body)

    def store(self, **_kw) -> None:
        return None


def _managed(fields: int) -> list[dict]:
    return [{"manager": m, "operation": "Update", "apiVersion": "ferry.dev/v1alpha1", "fieldsType": "FieldsV1",
             "fieldsV1": {"f:status": {f"f:k{i}": {} for i in range(fields)}}} for m in ("ferry", "ferry-agent", "kubectl")]


def _meta(name: str, **extra) -> dict:
    return {"name": name, "namespace": "team", "uid": "0" * 36, "resourceVersion": "123456", "generation": 1,
            "creationTimestamp": "2026-01-01T00:00:00Z", "managedFields": _managed(30), **extra}


def _conditions(types: str) -> list[dict]:
    return [{"type": t, "status": "True", "reason": "Reason", "message": "m" * 80,
             "lastTransitionTime": "2026-01-01T00:00:00Z"} for t in types]


BODIES = {
    "LiveMigration in PreCopy": {
        "apiVersion": "ferry.dev/v1alpha1", "kind": "LiveMigration",
        "metadata": _meta("web-1-move", labels={"ferry.dev/droplet": "web-1", "ferry.dev/evacuation": "host-a"},
                          annotations={"ferry.dev/reported": "1"}, finalizers=["ferry.dev/finalizer"]),
        "spec": {"droplet": "web-1", "limits": {"bandwidthMiBps": 100}, "downtimeBudgetMs": 300},
        "status": {"phase": "PreCopy", "conditions": _conditions("ABCDE"),
                   "transfer": {f"k{i}": i for i in range(30)},
                   "rounds": [{"n": i, "bytes": i * 1000, "ms": i} for i in range(20)],
                   "phaseTimes": {p: "2026-01-01T00:00:00Z" for p in ("Pending", "Announced", "Scheduling", "Preparing")}}},
    "Host with 10 droplets": {
        "apiVersion": "ferry.dev/v1alpha1", "kind": "Host", "metadata": _meta("host-a"),
        "spec": {"datacenter": "nyc3", "capacity": {"cpu": 32, "memoryMiB": 131072, "diskGiB": 2000}},
        "status": {"phase": "Ready", "conditions": _conditions("AB"), "allocated": {"cpu": 10, "memoryMiB": 10240},
                   "agent": {"address": "10.0.0.1", "heartbeatTime": "2026-01-01T00:00:00Z",
                             "vms": {f"team/web-{i}": {"state": "Running", "pid": 1000 + i} for i in range(10)}}}},
    "Droplet": {
        "apiVersion": "ferry.dev/v1alpha1", "kind": "Droplet", "metadata": _meta("web-1", labels={"app": "web"}),
        "spec": {"size": "s-1vcpu-1gb", "datacenter": "nyc3", "ip": "10.10.0.7"},
        "status": {"phase": "Placed", "host": "host-a", "conditions": _conditions("A"),
                   "lastMigration": {"name": "web-1-move", "phase": "Completed"}}},
}


def per_event_us(storage: kopf.DiffBaseStorage, body: kopf.Body, events: int) -> float:
    progress = kopf.AnnotationsProgressStorage(prefix="ferry.dev")
    t = time.process_time()
    for _ in range(events):  # what kopf's _detect_causes does with the two storages
        old = storage.fetch(body=body)
        new = storage.build(body=body, extra_fields=set())
        old = progress.clear(essence=old) if old is not None else None
        new = progress.clear(essence=new) if new is not None else None
        if diffs.diff(old, new):
            raise AssertionError("a watch event with no change made a diff")
    return (time.process_time() - t) / events * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=3000)
    args = p.parse_args()
    rows = []
    for name, raw in BODIES.items():
        body = kopf.Body(raw)
        base = per_event_us(KopfDiffBase(), body, args.events)
        this = per_event_us(NoDiffBase(), body, args.events)
        rows.append((name, len(json.dumps(raw)), base, this))
    print(f"kopf's cause detection per watch event, CPU us ({args.events} events each, one thread)")
    print(f"{'object':28} {'JSON bytes':>10} {'kopf essence':>13} {'ferry (empty)':>14} {'ratio':>7}")
    for name, size, base, this in rows:
        print(f"{name:28} {size:>10} {base:>13.1f} {this:>14.1f} {this / base:>6.3f}x")


if __name__ == "__main__":
    main()
