"""Builders and fakes shared by tests (no tests here; import as ``from fakes import ...``): API
bodies, VM observations, an in-memory Kube and driver, a scripted list/watch source and a
fake API server that speaks list/watch over HTTP."""

from __future__ import annotations

import copy
import datetime as dt
import json
import itertools
import threading
import types
from collections import deque
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import pykube

from ferry.api.reports import RoundReport
from ferry.agent.plan import VMObs
from ferry.api.livemigration import LiveMigration
from ferry.api.models import Droplet
from ferry.drivers.base import (
    DriverError,
    MigrationOptions,
    MigrationState,
    MigrationStats,
    TransferCounters,
    VMInfo,
    VMKey,
    VMSpec,
    VMState,
)
from ferry.storage import Conflict, Kube, NotFound, StorageError

NOW = dt.datetime(2030, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
NS = "ns"


def ts(seconds_ago: float = 0.0) -> str:
    return (NOW - dt.timedelta(seconds=seconds_ago)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def droplet_body(name: str = "web", host: str | None = "a", *, power: str = "on", ns: str = NS, rv: str = "1",
                 label: str | None = "same", ip: str | None = None) -> dict:
    labels = {} if label is None else {"ferry.dev/host": host if label == "same" else label}
    body = {"apiVersion": "ferry.dev/v1alpha1", "kind": "Droplet",
            "metadata": {"name": name, "namespace": ns, "resourceVersion": rv, "labels": labels, "uid": "u-" + name},
            "spec": {"size": "s-1vcpu-1gb", "datacenter": "nyc3", "powerState": power,
                     "workload": {"pattern": "hotspot", "writeRateKiBps": 64}},
            "status": {}}
    if host is not None:
        body["status"]["host"] = host
    if ip is not None:
        body["spec"]["ip"] = ip
    return body


def droplet(name: str = "web", host: str | None = "a", **kw: Any) -> Droplet:
    return Droplet.from_body(droplet_body(name, host, **kw))


def lm_body(name: str = "move", droplet: str = "web", *, phase: str = "PreCopy", attempt: int = 1, source: str = "a",
            target: str = "b", ns: str = NS, target_report: dict | None = None, transfer: dict | None = None,
            mode: str | None = None, limits: dict | None = None, rv: str = "1") -> dict:
    status: dict[str, Any] = {"phase": phase, "attempt": attempt, "sourceHost": source, "targetHost": target}
    if target_report is not None:
        status["target"] = target_report
    if transfer is not None:
        status["transfer"] = transfer
    if mode is not None:
        status["effectiveMode"] = mode
    if limits is not None:
        status["effectiveLimits"] = limits
    return {"apiVersion": "ferry.dev/v1alpha1", "kind": "LiveMigration",
            "metadata": {"name": name, "namespace": ns, "resourceVersion": rv, "uid": "u-" + name,
                         "labels": {"ferry.dev/source-host": source, "ferry.dev/target-host": target,
                                    "ferry.dev/droplet": droplet}},
            "spec": {"droplet": droplet}, "status": status}


def lm(name: str = "move", droplet: str = "web", **kw: Any) -> LiveMigration:
    return LiveMigration.from_body(lm_body(name, droplet, **kw))


def treport(attempt: int, state: str, address: str | None = "127.0.0.1:4000", digest: str | None = None,
            updated: float = 0.0) -> dict:
    d = {"attempt": attempt, "state": state, "updatedAt": ts(updated)}
    if address:
        d["address"] = address
    if digest:
        d["digest"] = digest
    return d


def stats(mid: str | None, state: MigrationState, *, digest: str | None = None, error: str | None = None,
          total: int = 1000, remaining: int = 0, sent: int = 0, rounds: int = 0) -> MigrationStats:
    return MigrationStats(
        migration_id=mid, state=state, round=rounds,
        disk=TransferCounters(total=total // 2, sent=sent // 2, remaining=remaining // 2),
        memory=TransferCounters(total=total - total // 2, sent=sent - sent // 2, remaining=remaining - remaining // 2),
        rounds=[RoundReport(i + 1, 100, 10, 5) for i in range(rounds)], digest=digest, error=error)


def vm(name: str = "web", state: VMState = VMState.RUNNING, mid: str | None = None, st: MigrationStats | None = None,
       ns: str = NS, pid: int | None = 123) -> VMObs:
    live_mid = mid if state != VMState.STOPPED or pid else None
    return VMObs(VMInfo(VMKey(ns, name), state, pid=pid, migration_id=live_mid), st)


def key(name: str = "web", ns: str = NS) -> VMKey:
    return VMKey(ns, name)


# --- an in-memory API ---------------------------------------------------------------------

def merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


class FakeKube:
    """Enough of ferry.storage.Kube for the agent, the operator's shell and the CLI: objects in
    memory, merge patches guarded by resourceVersion (Conflict), metadata.generation bumped on
    spec changes, generateName, secrets, Events. ``on_get(kind, name, n)`` runs before the
    n-th get made while a hook is set (a test's way to move the world between two reads)."""

    def __init__(self, namespace: str = NS) -> None:
        self.api = types.SimpleNamespace(config=types.SimpleNamespace(namespace=namespace), url="https://fake:6443")
        self.objects: dict[tuple[str, str, str], dict] = {}
        self.secrets: dict[tuple[str, str], bytes] = {}
        self.patches: list[tuple[str, str, str, dict]] = []
        self.created: list[dict] = []
        self.events: list[tuple[str, str, str]] = []
        self.rv = 100
        self.lock = threading.Lock()
        self.fail_gets = False
        self.gets: list[tuple[str, str, str]] = []
        self.on_get: Callable[[str, str, int], None] | None = None
        self.hooked_gets = itertools.count(1)  # gets made while a hook is set
        self.names = itertools.count(1)

    def add(self, kind: str, body: dict) -> dict:
        """Store ``body`` as the API would have it (generation 1, a creation time)."""
        meta = body.setdefault("metadata", {})
        meta.setdefault("generation", 1)
        meta.setdefault("creationTimestamp", "2030-01-02T03:04:05Z")
        return self.put({**body, "kind": kind})

    def set_status(self, kind: str, name: str, namespace: str | None, status: dict) -> None:
        """Another writer (an agent, the operator) changed the status."""
        body = self.objects[(kind, namespace or "", name)]
        body["status"] = merge_patch(body.get("status") or {}, status)

    def put(self, body: dict) -> dict:
        with self.lock:
            self.rv += 1
            body = copy.deepcopy(body)
            body["metadata"]["resourceVersion"] = str(self.rv)
            m = body["metadata"]
            self.objects[(body["kind"], m.get("namespace") or "", m["name"])] = body
            return copy.deepcopy(body)

    def remove(self, kind: str, name: str, namespace: str = "") -> None:
        self.objects.pop((kind, namespace, name), None)

    def obj(self, kind: str, name: str, namespace: str = "") -> dict:
        return self.objects[(kind, namespace, name)]

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict:
        self.gets.append((kind, namespace or "", name))
        if self.on_get:
            self.on_get(kind, name, next(self.hooked_gets))
        if self.fail_gets:
            raise StorageError("connection refused")
        try:
            return copy.deepcopy(self.objects[(kind, namespace or "", name)])
        except KeyError:
            raise NotFound(f"{kind} {name} not found") from None

    def get_or_none(self, kind: str, name: str, namespace: str | None = None) -> dict | None:
        try:
            return self.get(kind, name, namespace)
        except NotFound:
            return None

    def list_with_version(self, kind: str, namespace: str | None = None, selector: str | None = None):
        out = []
        for (k, ns, _), body in sorted(self.objects.items()):
            if k != kind or (namespace and ns != namespace):
                continue
            if selector:
                lk, _, lv = selector.partition("=")
                if (body["metadata"].get("labels") or {}).get(lk) != lv:
                    continue
            out.append(copy.deepcopy(body))
        return out, str(self.rv)

    def list(self, kind: str, namespace: str | None = None, selector: str | None = None) -> list[dict]:
        return self.list_with_version(kind, namespace, selector)[0]

    def list_watch(self, kind: str, namespace: str | None = None, selector: str | None = None) -> FakeSource:
        """A source that lists the objects as they are now, then watches nothing."""
        return FakeSource(lists=[self.list_with_version(kind, namespace, selector)], watches=[])

    def patch_status(self, kind: str, name: str, status: dict, namespace: str | None = None,
                     resource_version: str | None = None) -> dict:
        return self._patch(kind, name, namespace, {"status": status}, resource_version)

    def patch(self, kind: str, name: str, patch: dict, namespace: str | None = None,
              resource_version: str | None = None) -> dict:
        return self._patch(kind, name, namespace, patch, resource_version)

    def _patch(self, kind: str, name: str, namespace: str | None, patch: dict, resource_version: str | None) -> dict:
        with self.lock:
            k = (kind, namespace or "", name)
            if k not in self.objects:
                raise NotFound(f"{kind} {name} not found")
            body = self.objects[k]
            if resource_version and body["metadata"]["resourceVersion"] != resource_version:
                raise Conflict(f"{kind} {name}: resourceVersion {resource_version} is stale")
            self.patches.append((kind, namespace or "", name, copy.deepcopy(patch.get("status", patch))))
            spec = copy.deepcopy(body.get("spec"))
            self.objects[k] = body = merge_patch(body, patch)
            if body.get("spec") != spec:
                body["metadata"]["generation"] = body["metadata"].get("generation", 1) + 1
            self.rv += 1
            body["metadata"]["resourceVersion"] = str(self.rv)
            return copy.deepcopy(body)

    def create(self, kind: str, body: dict, namespace: str | None = None) -> dict:
        body = copy.deepcopy(dict(body))
        m = body["metadata"]
        if "name" not in m:
            m["name"] = m.pop("generateName") + f"x{next(self.names):04d}"
        m["namespace"] = namespace or m.get("namespace")
        if (kind, m["namespace"] or "", m["name"]) in self.objects:
            raise Conflict(f"create {kind} {m['namespace']}/{m['name']}: already exists (HTTP 409)")
        self.created.append(copy.deepcopy(body))
        return self.add(kind, body)

    def create_secret(self, namespace: str, name: str, data: dict, owner: dict | None = None,
                      labels: dict | None = None) -> None:
        self.secrets.setdefault((namespace, name), data["key"])

    def delete_secret(self, namespace: str, name: str) -> None:
        self.secrets.pop((namespace, name), None)

    def read_secret_key(self, namespace: str, name: str, key: str = "key") -> bytes:
        try:
            return self.secrets[(namespace, name)]
        except KeyError:
            raise NotFound(f"secret {namespace}/{name} not found") from None

    def event(self, obj: dict, type_: str, reason: str, message: str, component: str = "x") -> None:
        self.events.append((type_, reason, message))


# --- a scripted list/watch source (what storage.watch.Reflector runs on) ---------------------

class FakeSource:
    """Plays a script: each ``list()``/``watch()`` call takes the next entry: a value (a list's
    (items, resourceVersion); a watch's events), or an exception to raise; an exception among
    a watch's events is raised there. When the script is over, both block until ``close()``
    (and ``idle`` is set)."""

    def __init__(self, lists: list[Any], watches: list[Any]):
        self.lists = deque(lists)
        self.watches = deque(watches)
        self.list_calls = 0
        self.watch_calls: list[str] = []
        self.closed = threading.Event()
        self.idle = threading.Event()

    def list(self) -> tuple[list[dict], str]:
        self.list_calls += 1
        if not self.lists:
            self.idle.set()
            self.closed.wait(10)
            raise StorageError("closed")
        step = self.lists.popleft()
        if isinstance(step, Exception):
            raise step
        return step

    def watch(self, resource_version: str, timeout_seconds: int) -> Iterator[tuple[str, dict]]:
        self.watch_calls.append(resource_version)
        if not self.watches:
            self.idle.set()
            self.closed.wait(10)
            return
        step = self.watches.popleft()
        if isinstance(step, Exception):
            raise step
        for event in step:
            if isinstance(event, Exception):
                raise event
            yield event

    def close(self) -> None:
        self.closed.set()


# --- a fake API server over HTTP (what storage.ListWatch talks to) ---------------------------

class FakeAPI:
    """An HTTP server on loopback that speaks the Kubernetes list/watch protocol (pagination,
    chunked watch streams, error statuses) from a script. Scripted responses. `lists` and `watches` are queues of handlers' outputs:
    a list page is (status, body); a watch is (status, [event dicts], hold_open)."""

    def __init__(self):
        self.requests: list[tuple[str, dict]] = []
        self.lists: list = []
        self.watches: list = []
        self.release = threading.Event()
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                api.requests.append((url.path, query))
                if query.get("watch") == "true":
                    status, events, hold = api.watches.pop(0) if api.watches else (200, [], True)
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    if status != 200:
                        body = json.dumps({"kind": "Status", "code": status, "message": "nope"}).encode()
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        self.wfile.write(body)
                        return
                    # Like kube-apiserver: chunked transfer, one event per chunk.
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    try:
                        for event in events:
                            data = json.dumps(event).encode() + b"\n"
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                            self.wfile.flush()
                        if hold:
                            api.release.wait(20)
                        self.wfile.write(b"0\r\n\r\n")
                    except OSError:
                        pass
                    self.close_connection = True
                    return
                status, body = api.lists.pop(0)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def api(self) -> pykube.HTTPClient:
        return pykube.HTTPClient(pykube.KubeConfig.from_url(self.url))

    def kube(self) -> Kube:
        return Kube(self.api())

    def stop(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def page(items: list[dict], rv: str, token: str | None = None) -> tuple[int, dict]:
    """One scripted list page for ``FakeAPI.lists``."""
    return (200, {"kind": "DropletList", "metadata": {"resourceVersion": rv, **({"continue": token} if token else {})},
                  "items": items})


# --- in-memory drivers ------------------------------------------------------------------------

class Network:
    """Where fake drivers of several hosts meet: listening incoming VMs by address."""

    def __init__(self) -> None:
        self.listeners: dict[str, tuple["FakeDriver", VMKey, bytes, str]] = {}
        self.next_port = 40000


class FakeVM:
    def __init__(self, spec: VMSpec, state: VMState):
        self.spec = spec
        self.state = state
        self.migration_id: str | None = None
        self.role: str | None = None
        self.mstate = MigrationState.NONE
        self.progress = 0
        self.digest = "d-" + spec.key.name
        self.error: str | None = None
        self.address: str | None = None
        self.peer: tuple[FakeDriver, VMKey] | None = None


class FakeDriver:
    """An in-memory driver: a migration advances one step (of ``steps``) per query_migration."""

    name = "fake"

    def __init__(self, host: str, network: Network | None = None, steps: int = 3):
        self.host = host
        self.network = network or Network()
        self.steps = steps
        self.vms: dict[VMKey, FakeVM] = {}
        self.calls: list[tuple[str, str]] = []
        self.fail: dict[str, str] = {}  # method -> error message

    def _check(self, method: str, key: VMKey) -> None:
        self.calls.append((method, str(key)))
        if method in self.fail:
            raise DriverError(self.fail[method])

    def list_vms(self) -> list[VMInfo]:
        if "list_vms" in self.fail:
            raise DriverError(self.fail["list_vms"])
        return [VMInfo(k, v.state, pid=1, migration_id=v.migration_id) for k, v in sorted(self.vms.items())]

    def start(self, spec: VMSpec) -> VMInfo:
        self._check("start", spec.key)
        v = self.vms.get(spec.key)
        if v is None:
            v = self.vms[spec.key] = FakeVM(spec, VMState.STOPPED)
        if v.state == VMState.INCOMING:
            raise DriverError("incoming VM")
        if spec.power_on:
            v.state = VMState.RUNNING
        return VMInfo(spec.key, v.state, pid=1, migration_id=v.migration_id)

    def stop(self, key: VMKey) -> None:
        self._check("stop", key)
        if key in self.vms:
            self.vms[key].state = VMState.STOPPED

    def destroy(self, key: VMKey) -> None:
        self._check("destroy", key)
        v = self.vms.pop(key, None)
        if v is not None and v.address:
            self.network.listeners.pop(v.address, None)

    def prepare_incoming(self, spec: VMSpec, bind_host: str, secret: bytes, migration_id: str) -> str:
        self._check("prepare_incoming", spec.key)
        v = self.vms.get(spec.key)
        if v is not None and v.state == VMState.INCOMING and v.migration_id == migration_id:
            return v.address or ""
        if v is not None and v.state != VMState.INCOMING:
            raise DriverError("a VM of that name runs here")
        v = self.vms[spec.key] = FakeVM(spec, VMState.INCOMING)
        v.migration_id, v.role = migration_id, "target"
        self.network.next_port += 1
        v.address = f"{bind_host}:{self.network.next_port}"
        self.network.listeners[v.address] = (self, spec.key, secret, migration_id)
        return v.address

    def start_migration(self, key: VMKey, target: str, secret: bytes, migration_id: str,
                        options: MigrationOptions) -> None:
        self._check("start_migration", key)
        v = self.vms.get(key)
        if v is None:
            raise DriverError("no such VM")
        if v.role == "source" and v.migration_id == migration_id and v.mstate not in (MigrationState.FAILED,
                                                                                       MigrationState.ABORTED):
            return
        listener = self.network.listeners.get(target)
        if listener is None or listener[2] != secret or listener[3] != migration_id:
            raise DriverError(f"cannot connect to {target}")
        v.migration_id, v.role, v.mstate, v.progress = migration_id, "source", MigrationState.COPYING, 0
        v.peer = (listener[0], listener[1])
        v.options = options  # type: ignore[attr-defined]
        tv = listener[0].vms[listener[1]]
        tv.mstate = MigrationState.COPYING

    def _advance(self, v: FakeVM) -> None:
        if v.role != "source" or v.mstate not in (MigrationState.COPYING, MigrationState.CONVERGING):
            return
        v.progress += 1
        if v.progress >= self.steps:
            v.mstate = MigrationState.COMPLETED
            v.state = VMState.PAUSED
            assert v.peer is not None
            peer_driver, peer_key = v.peer
            tv = peer_driver.vms.get(peer_key)
            if tv is not None and tv.migration_id == v.migration_id:
                tv.mstate = MigrationState.RECEIVED
                tv.digest = v.digest

    def query_migration(self, key: VMKey) -> MigrationStats:
        self.calls.append(("query_migration", str(key)))
        if "query_migration" in self.fail:
            raise DriverError(self.fail["query_migration"])
        v = self.vms.get(key)
        if v is None:
            return MigrationStats()
        self._advance(v)
        total = 1000
        remaining = 0 if v.mstate in (MigrationState.COMPLETED, MigrationState.RECEIVED) else \
            total * max(0, self.steps - v.progress) // max(1, self.steps)
        return MigrationStats(migration_id=v.migration_id, state=v.mstate,
                              disk=TransferCounters(total, total - remaining, remaining),
                              digest=v.digest if v.mstate in (MigrationState.COMPLETED, MigrationState.RECEIVED) else None,
                              error=v.error, round=1 if v.role == "source" else 0)

    def wait_migration(self, key: VMKey, timeout: float) -> None:
        """A fake migration moves only when it is queried: nothing happens while waiting."""

    def cancel_migration(self, key: VMKey) -> None:
        self._check("cancel_migration", key)
        v = self.vms.get(key)
        if v is not None and v.role == "source" and v.mstate in (MigrationState.COPYING, MigrationState.CONVERGING,
                                                                 MigrationState.PAUSED, MigrationState.COMPLETED):
            v.mstate = MigrationState.ABORTED
            v.state = VMState.RUNNING

    def force_complete(self, key: VMKey) -> None:
        self._check("force_complete", key)

    def resume(self, key: VMKey) -> None:
        self._check("resume", key)
        v = self.vms[key]
        if v.state == VMState.INCOMING and v.mstate != MigrationState.RECEIVED:
            raise DriverError("not received")
        v.state = VMState.RUNNING
