"""``ferry operator``: run kopf with ferry's handlers until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import os

import kopf

from ferry import logs
from ferry.settings import Settings


def run(*, kubeconfig: str | None, namespace: str | None, standalone: bool, peering_name: str,
        liveness: str | None, metrics_port: int | None, priority: int = 0) -> None:
    settings = Settings.from_env(metrics_port=metrics_port, namespace=namespace)  # fails fast on bad settings
    if kubeconfig:
        os.environ["KUBECONFIG"] = kubeconfig  # kopf's pykube login reads it
    from ferry.controller import handlers  # noqa: F401  (registers the handlers with kopf)

    kopf.configure(verbose=False)  # kopf's handler on the root logger, replacing click's basicConfig one
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if type(h).__name__ == "_KopfStreamHandler"]
    logging.getLogger("kopf").setLevel(logging.WARNING)  # per-handler "succeeded" lines are noise
    logs.for_server()
    kopf.run(
        standalone=standalone,
        peering_name=None if standalone else peering_name,
        # kopf's scope is `-n` only: FERRY_NAMESPACE narrows what the operator loads and decides
        # about, while Hosts (cluster-scoped) and the peering stay cluster-wide.
        clusterwide=not namespace,
        namespaces=[namespace] if namespace else (),
        liveness_endpoint=liveness,
        priority=priority,
        memo=kopf.Memo(settings=settings),
    )
