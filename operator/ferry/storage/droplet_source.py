"""Droplet list/watch over the Kubernetes API with pykube-ng. The only I/O of the cache.

Thin on purpose: it turns HTTP into plain dicts and API errors into the reflector's
`WatchExpired` / `SourceError`; every decision lives in `reflector.py` and `cache.py`.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from typing import Iterator

import pykube
import requests

from ferry.api import constants as c
from ferry.metadata.reflector import SourceError, WatchExpired
from ferry.storage.kube import load_config

log = logging.getLogger("ferry.metadata")

GROUP_VERSION = c.API_VERSION
PLURAL = "droplets"


def make_api(kubeconfig: str | None = None, *, context: str | None = None) -> pykube.HTTPClient:
    """An API client: from `kubeconfig` or $KUBECONFIG if set, else the in-cluster service
    account, else ~/.kube/config (ferry.storage's rules; StorageError when none works)."""
    config = load_config(kubeconfig)
    if context:
        config.set_current_context(context)
    return pykube.HTTPClient(config)


def _error(response: requests.Response) -> Exception:
    message = response.reason or ""
    try:
        body = response.json()
        if isinstance(body, dict):
            message = str(body.get("message", message))
    except ValueError:
        pass
    if response.status_code == 410:
        return WatchExpired(message)
    return SourceError(response.status_code, message)


class DropletSource:
    """List and watch the Droplets of one namespace (or all, with namespace=None)."""

    def __init__(
        self,
        api: pykube.HTTPClient,
        namespace: str | None = None,
        *,
        page_size: int = 500,
        connect_timeout: float = 10.0,
        request_timeout: float = 60.0,
    ):
        self.api = api
        self.namespace = namespace
        self.page_size = page_size
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self._lock = threading.Lock()
        self._response: requests.Response | None = None
        self._closed = False

    def _get(self, params: dict, **kwargs) -> requests.Response:
        call = {"version": GROUP_VERSION, "url": PLURAL, "params": params, **kwargs}
        if self.namespace:
            call["namespace"] = self.namespace
        return self.api.get(**call)

    def list(self) -> tuple[list[dict], str]:
        """All droplets (paginated) and the list's resourceVersion."""
        items: list[dict] = []
        params: dict = {"limit": self.page_size}
        while True:
            response = self._get(params, timeout=(self.connect_timeout, self.request_timeout))
            if not response.ok:
                raise _error(response)
            body = response.json()
            items.extend(body.get("items") or [])
            meta = body.get("metadata") or {}
            token = meta.get("continue")
            if not token:
                return items, str(meta.get("resourceVersion") or "")
            params = {"limit": self.page_size, "continue": token}

    def watch(self, resource_version: str, timeout_seconds: int) -> Iterator[tuple[str, dict]]:
        """Events (type, object) after `resource_version` until the server ends the watch
        (after `timeout_seconds`) or `close()` is called. ERROR events are yielded as such."""
        params = {
            "watch": "true",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(int(timeout_seconds)),
        }
        response = self._get(params, stream=True, timeout=(self.connect_timeout, timeout_seconds + 30))
        with self._lock:
            if self._closed:
                response.close()
                return
            self._response = response
        try:
            if not response.ok:
                raise _error(response)
            for line in response.iter_lines():
                if not line:
                    continue
                try:
                    event = json.loads(line)
                except ValueError as exc:
                    raise SourceError(0, f"undecodable watch line: {exc}") from exc
                if not isinstance(event, dict) or event.get("kind") == "Status":
                    # A bare Status instead of an event: an error the stream cannot recover from.
                    code = event.get("code", 0) if isinstance(event, dict) else 0
                    yield "ERROR", {"code": code, "message": str(event)[:200]}
                    return
                yield str(event.get("type", "")), event.get("object") or {}
        except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError, AttributeError):
            # A closed response raises one of these from another thread's close().
            with self._lock:
                if self._closed:
                    return
            raise
        finally:
            with self._lock:
                self._response = None
            response.close()

    def close(self) -> None:
        """Interrupt the running watch (from any thread) and refuse new ones."""
        with self._lock:
            self._closed = True
            response = self._response
        if response is not None:
            try:
                # close() alone does not wake a thread blocked in recv(); shutdown() does.
                conn = getattr(response.raw, "connection", None)
                sock = getattr(conn, "sock", None)
                if sock is not None:
                    sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                response.close()
            except Exception:  # pragma: no cover - best effort
                log.debug("closing the watch response failed", exc_info=True)
