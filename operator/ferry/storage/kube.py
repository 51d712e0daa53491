"""A small typed facade over pykube-ng for the three ferry kinds, Secrets and Events, and
``ListWatch``, the list/watch transport of one kind that ``storage.watch.Reflector`` runs on."""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import pykube
import requests

from ferry.api import constants as c
from ferry.api.times import fmt, now

log = logging.getLogger(__name__)

KINDS = {
    "Host": ("hosts", False),
    "Droplet": ("droplets", True),
    "LiveMigration": ("livemigrations", True),
}


class StorageError(Exception):
    """An API call failed; the message says which call and why, in one line."""


class NotFound(StorageError):
    pass


class Conflict(StorageError):
    """A precondition (resourceVersion) failed or the object already exists."""


class Forbidden(StorageError):
    pass


class Gone(StorageError):
    """HTTP 410: the resourceVersion asked for is too old (compacted); only a new list can go on."""


def _raise(resp: requests.Response, what: str) -> None:
    if resp.ok:
        return
    try:
        message = resp.json().get("message", resp.text)
    except ValueError:
        message = resp.text
    cls = {404: NotFound, 409: Conflict, 403: Forbidden, 410: Gone}.get(resp.status_code, StorageError)
    raise cls(f"{what}: {message} (HTTP {resp.status_code})")


def load_config(kubeconfig: str | None = None) -> pykube.KubeConfig:
    path = kubeconfig or os.environ.get("KUBECONFIG")
    try:
        if path:
            return pykube.KubeConfig.from_file(path.split(os.pathsep)[0])
        return pykube.KubeConfig.from_env()
    except (FileNotFoundError, pykube.exceptions.PyKubeError) as exc:
        raise StorageError(f"no Kubernetes credentials: {exc} (set KUBECONFIG or run in a cluster)") from None


class Kube:
    """ferry's API client. Methods take and return plain dicts (bodies as the API has them)."""

    def __init__(self, api: pykube.HTTPClient):
        self.api = api
        self.requests = 0  # counted for the operator-overhead benchmark

    @classmethod
    def connect(cls, kubeconfig: str | None = None, timeout: float = 30, *, context: str | None = None) -> Kube:
        config = load_config(kubeconfig)
        if context:
            config.set_current_context(context)
        return cls(pykube.HTTPClient(config, timeout=timeout))

    # --- plumbing -----------------------------------------------------------------------
    def _url(self, kind: str, namespace: str | None = None, name: str | None = None, sub: str | None = None) -> str:
        plural, namespaced = KINDS[kind]
        parts = [f"/apis/{c.API_VERSION}"]
        if namespaced and namespace:
            parts.append(f"namespaces/{namespace}")
        parts.append(plural)
        if name:
            parts.append(name)
        if sub:
            parts.append(sub)
        return "/".join(parts)

    def _call(self, method: str, url: str, what: str, *, base: str = "/", **kw: Any) -> dict[str, Any]:
        self.requests += 1
        try:
            resp = getattr(self.api.session, method)(self.api.url + url, timeout=self.api.timeout, **kw)
        except requests.RequestException as exc:
            raise StorageError(f"{what}: {exc.__class__.__name__}: {exc}") from None
        _raise(resp, what)
        return resp.json() if resp.content else {}

    def _get(self, url: str, what: str, params: Mapping[str, str] | None = None) -> dict[str, Any]:
        return self._call("get", url, what, params=params)

    def _merge_patch(self, url: str, patch: Mapping[str, Any], what: str) -> dict[str, Any]:
        return self._call("patch", url, what, data=json.dumps(patch),
                          headers={"Content-Type": "application/merge-patch+json"})

    # --- generic ------------------------------------------------------------------------
    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
        return self._get(self._url(kind, namespace, name), f"get {kind} {_qual(namespace, name)}")

    def get_or_none(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        try:
            return self.get(kind, name, namespace)
        except NotFound:
            return None

    def list(self, kind: str, namespace: str | None = None, selector: str | None = None) -> list[dict[str, Any]]:
        params = {"labelSelector": selector} if selector else None
        return self._get(self._url(kind, namespace), f"list {kind}", params).get("items") or []

    def list_with_version(self, kind: str, namespace: str | None = None,
                          selector: str | None = None) -> tuple[list[dict[str, Any]], str]:
        params = {"labelSelector": selector} if selector else None
        body = self._get(self._url(kind, namespace), f"list {kind}", params)
        return body.get("items") or [], body.get("metadata", {}).get("resourceVersion", "")

    def list_watch(self, kind: str, namespace: str | None = None, selector: str | None = None,
                   **options: Any) -> ListWatch:
        """The list/watch transport of ``kind`` (all namespaces when ``namespace`` is None)."""
        return ListWatch(self.api, self._url(kind, namespace), kind, selector, **options)

    def create(self, kind: str, body: Mapping[str, Any], namespace: str | None = None) -> dict[str, Any]:
        name = body.get("metadata", {}).get("name")
        return self._call("post", self._url(kind, namespace), f"create {kind} {_qual(namespace, name)}",
                          data=json.dumps(dict(body)), headers={"Content-Type": "application/json"})

    def delete(self, kind: str, name: str, namespace: str | None = None) -> None:
        try:
            self._call("delete", self._url(kind, namespace, name), f"delete {kind} {_qual(namespace, name)}")
        except NotFound:
            pass

    def patch(self, kind: str, name: str, patch: Mapping[str, Any], namespace: str | None = None,
              resource_version: str | None = None) -> dict[str, Any]:
        if resource_version:
            patch = {**patch, "metadata": {**patch.get("metadata", {}), "resourceVersion": resource_version}}
        return self._merge_patch(self._url(kind, namespace, name), patch, f"patch {kind} {_qual(namespace, name)}")

    def patch_status(self, kind: str, name: str, status: Mapping[str, Any], namespace: str | None = None,
                     resource_version: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        return self._merge_patch(self._url(kind, namespace, name, "status"), body,
                                 f"patch {kind} {_qual(namespace, name)} status")

    # --- secrets ------------------------------------------------------------------------
    def read_secret_key(self, namespace: str, name: str, key: str = c.TRANSFER_SECRET_KEY) -> bytes:
        body = self._get(f"/api/v1/namespaces/{namespace}/secrets/{name}", f"get secret {namespace}/{name}")
        data = (body.get("data") or {}).get(key)
        if not data:
            raise NotFound(f"secret {namespace}/{name} has no key {key!r}")
        return base64.b64decode(data)

    def create_secret(self, namespace: str, name: str, data: Mapping[str, bytes],
                      owner: Mapping[str, Any] | None = None, labels: Mapping[str, str] | None = None) -> None:
        meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": dict(labels or {})}
        if owner:
            meta["ownerReferences"] = [owner]
        body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": meta,
                "data": {k: base64.b64encode(v).decode() for k, v in data.items()}}
        try:
            self._call("post", f"/api/v1/namespaces/{namespace}/secrets", f"create secret {namespace}/{name}",
                       data=json.dumps(body), headers={"Content-Type": "application/json"})
        except Conflict:
            pass  # idempotent: it exists already

    def delete_secret(self, namespace: str, name: str) -> None:
        try:
            self._call("delete", f"/api/v1/namespaces/{namespace}/secrets/{name}", f"delete secret {namespace}/{name}")
        except NotFound:
            pass

    # --- core objects the launcher manages (pods, disruption budgets) --------------------
    def create_core(self, path: str, body: Mapping[str, Any], what: str) -> dict[str, Any]:
        """POST ``body`` to a namespaced collection, e.g. ``/api/v1/namespaces/NS/pods``."""
        return self._call("post", path, what, data=json.dumps(dict(body)), headers={"Content-Type": "application/json"})

    def list_core(self, path: str, what: str, selector: str | None = None,
                  field_selector: str | None = None) -> list[dict[str, Any]]:
        params = {k: v for k, v in (("labelSelector", selector), ("fieldSelector", field_selector)) if v}
        return self._get(path, what, params or None).get("items") or []

    def get_core(self, path: str, what: str) -> dict[str, Any] | None:
        try:
            return self._get(path, what)
        except NotFound:
            return None

    def delete_core(self, path: str, what: str, grace_seconds: int | None = None) -> None:
        """Delete one object (absent: nothing to do); ``grace_seconds=0`` ends a pod at once."""
        kw: dict[str, Any] = {}
        if grace_seconds is not None:
            kw["data"] = json.dumps({"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": grace_seconds,
                                     "propagationPolicy": "Background"})
            kw["headers"] = {"Content-Type": "application/json"}
        try:
            self._call("delete", path, what, **kw)
        except NotFound:
            pass

    # --- events -------------------------------------------------------------------------
    def event(self, obj: Mapping[str, Any], type_: str, reason: str, message: str,
              component: str = "ferry-operator") -> str | None:
        """Post a core/v1 Event about ``obj``; its name (None if it failed: failures are
        logged, never raised)."""
        meta = obj.get("metadata", {})
        namespace = meta.get("namespace") or "default"
        t = fmt(now(), fraction=True)
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{meta.get('name', 'x')}.{uuid.uuid4().hex[:12]}", "namespace": namespace},
            "involvedObject": {"apiVersion": obj.get("apiVersion", c.API_VERSION), "kind": obj.get("kind"),
                               "name": meta.get("name"), "namespace": meta.get("namespace"),
                               "uid": meta.get("uid"), "resourceVersion": meta.get("resourceVersion")},
            "type": type_, "reason": reason, "message": message[:1024],
            "source": {"component": component, "host": socket.gethostname()},
            "firstTimestamp": fmt(now()), "lastTimestamp": fmt(now()), "eventTime": t, "count": 1,
            "reportingComponent": component, "reportingInstance": socket.gethostname(), "action": reason,
        }
        try:
            self._call("post", f"/api/v1/namespaces/{namespace}/events", "create event",
                       data=json.dumps(body), headers={"Content-Type": "application/json"})
        except StorageError as exc:
            log.warning("could not post event %s on %s: %s", reason, meta.get("name"), exc)
            return None
        return body["metadata"]["name"]

    def event_repeat(self, namespace: str, name: str, count: int) -> None:
        """The Event ``name`` happened again: its ``count`` and ``lastTimestamp`` (client-go's
        event correlation). Failures are logged, never raised."""
        try:
            self._call("patch", f"/api/v1/namespaces/{namespace}/events/{name}", "update event",
                       data=json.dumps({"count": count, "lastTimestamp": fmt(now())}),
                       headers={"Content-Type": "application/merge-patch+json"})
        except StorageError as exc:
            log.warning("could not update event %s: %s", name, exc)


class ListWatch:
    """List and watch one kind (one namespace or all, one label selector or none): plain
    dicts out, ``Gone`` for 410 and ``StorageError`` for any other failure, as an HTTP status
    or as an ERROR event in the stream alike. Decisions (resume, relist, back off) belong to
    ``storage.watch.Reflector``."""

    def __init__(self, api: pykube.HTTPClient, url: str, kind: str, selector: str | None = None, *,
                 page_size: int = 500, connect_timeout: float = 10.0, request_timeout: float = 60.0):
        self.api = api
        self.url = url
        self.kind = kind
        self.selector = selector
        self.page_size = page_size
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self._lock = threading.Lock()
        self._response: requests.Response | None = None
        self._closed = False

    def _get(self, params: dict[str, Any], **kw: Any) -> requests.Response:
        if self.selector:
            params = {**params, "labelSelector": self.selector}
        try:
            return self.api.session.get(self.api.url + self.url, params=params, **kw)
        except requests.RequestException as exc:
            raise StorageError(f"{'watch' if params.get('watch') else 'list'} {self.kind}: "
                               f"{exc.__class__.__name__}: {exc}") from None

    def list(self) -> tuple[list[dict[str, Any]], str]:
        """All objects (page by page) and the list's resourceVersion."""
        items: list[dict[str, Any]] = []
        params: dict[str, Any] = {"limit": self.page_size}
        while True:
            response = self._get(params, timeout=(self.connect_timeout, self.request_timeout))
            _raise(response, f"list {self.kind}")
            body = response.json()
            items.extend(body.get("items") or [])
            meta = body.get("metadata") or {}
            token = meta.get("continue")
            if not token:
                return items, str(meta.get("resourceVersion") or "")
            params = {"limit": self.page_size, "continue": token}

    def watch(self, resource_version: str, timeout_seconds: int) -> Iterator[tuple[str, dict[str, Any]]]:
        """(type, object) after ``resource_version`` until the server ends the watch (after
        ``timeout_seconds``) or ``close()`` is called; BOOKMARK events included."""
        params = {"watch": "true", "resourceVersion": resource_version, "allowWatchBookmarks": "true",
                  "timeoutSeconds": str(int(timeout_seconds))}
        what = f"watch {self.kind}"
        response = self._get(params, stream=True, timeout=(self.connect_timeout, timeout_seconds + 30))
        with self._lock:
            if self._closed:
                response.close()
                return
            self._response = response
        try:
            _raise(response, what)
            for line in response.iter_lines():
                if not line:
                    continue
                try:
                    event = json.loads(line)
                except ValueError as exc:
                    raise StorageError(f"{what}: undecodable line: {exc}") from None
                if not isinstance(event, dict):
                    raise StorageError(f"{what}: not an event: {str(event)[:200]}")
                if event.get("kind") == "Status":  # a bare Status instead of an event
                    event = {"type": "ERROR", "object": event}
                obj = event.get("object") if isinstance(event.get("object"), dict) else {}
                if event.get("type") == "ERROR":
                    code = obj.get("code")
                    message = f"{what}: {obj.get('message') or str(obj)[:200]} (code {code})"
                    raise (Gone if code == 410 else StorageError)(message)
                yield str(event.get("type", "")), obj
        except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError, AttributeError) as exc:
            # close() from another thread surfaces as one of these.
            with self._lock:
                if self._closed:
                    return
            raise StorageError(f"{what}: {exc.__class__.__name__}: {exc}") from None
        finally:
            with self._lock:
                self._response = None
            response.close()

    def close(self) -> None:
        """Interrupt the running watch (from any thread) and refuse new ones."""
        with self._lock:
            self._closed = True
            response = self._response
        if response is None:
            return
        try:
            # close() alone does not wake a thread blocked in recv(); shutdown() does.
            sock = getattr(getattr(response.raw, "connection", None), "sock", None)
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            response.close()
        except Exception:  # noqa: BLE001 - best effort
            log.debug("closing the watch response failed", exc_info=True)


def _qual(namespace: str | None, name: str | None) -> str:
    return f"{namespace}/{name}" if namespace else str(name)


def owner_reference(body: Mapping[str, Any]) -> dict[str, Any]:
    meta = body["metadata"]
    return {"apiVersion": body.get("apiVersion", c.API_VERSION), "kind": body["kind"], "name": meta["name"],
            "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}
