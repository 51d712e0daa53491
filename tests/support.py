"""Helpers for tests of every layer (import as ``from support import ...``)."""

from __future__ import annotations

import asyncio
import pathlib
import time
from collections.abc import Callable
from typing import Any

import pytest


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.2, what: str = "") -> Any:
    """Poll ``predicate`` until it returns a truthy value; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except AssertionError as exc:  # let predicates assert for a better last message
            last_exc = exc
        if time.monotonic() >= deadline:
            detail = f": {last_exc}" if last_exc else ""
            pytest.fail(f"timed out after {timeout}s waiting for {what or predicate}{detail}")
        time.sleep(interval)


async def wait_until_async(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.01,
                           what: str = "") -> Any:
    """``wait_until`` inside an event loop: polls ``predicate`` without blocking the loop (often:
    its predicates read in-process state)."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except AssertionError as exc:  # let predicates assert for a better last message
            last_exc = exc
        if time.monotonic() >= deadline:
            detail = f": {last_exc}" if last_exc else ""
            pytest.fail(f"timed out after {timeout}s waiting for {what or predicate}{detail}")
        await asyncio.sleep(interval)


def kubeconfig_for_token(admin_kubeconfig: str, token: str, path: pathlib.Path) -> str:
    """A kubeconfig with the admin kubeconfig's server and CA but only ``token`` as credentials."""
    import yaml

    cfg = yaml.safe_load(pathlib.Path(admin_kubeconfig).read_text())
    cluster = cfg["clusters"][0]
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "clusters": [cluster],
        "users": [{"name": "token", "user": {"token": token}}],
        "contexts": [{"name": "token", "context": {"cluster": cluster["name"], "user": "token"}}],
        "current-context": "token",
    }))
    return str(path)


def stop_all(processes) -> None:
    """Stop test processes (objects with ``terminate()`` and ``stop()``; None entries are
    skipped): SIGTERM to every one first, then wait for each, so that their graceful shutdowns
    overlap instead of adding up in a teardown."""
    live = [p for p in processes if p is not None]
    for p in live:
        p.terminate()
    for p in live:
        p.stop()
