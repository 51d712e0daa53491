"""Prometheus exposition shared by the operator and the agents: gauges served from a
snapshot, and the /metrics HTTP server.

A ``Snapshot`` is rebuilt whole by the program's own loop (``set``) and read whole by every
scrape (which runs in the HTTP server's thread): a series that is not in the latest snapshot
does not exist any more, so label sets stay bounded by what exists now.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

#: metric name -> [(label values, value)]
Samples = Mapping[str, Sequence[tuple[tuple[str, ...], float]]]
#: metric name -> (help, label names)
Spec = Mapping[str, tuple[str, tuple[str, ...]]]


class Snapshot(Collector):
    """Gauges named by ``spec``; each scrape serves the samples ``set`` put in last."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self._families: Sequence[GaugeMetricFamily] = ()
        self.set({})

    def set(self, samples: Samples) -> None:
        families = []
        for name, (help_, labels) in self.spec.items():
            fam = GaugeMetricFamily(name, help_, labels=list(labels))
            for values, value in samples.get(name, ()):
                fam.add_metric(list(values), value)
            families.append(fam)
        self._families = tuple(families)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        return iter(self._families)

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())


def serve(registry: CollectorRegistry, port: int, log: logging.Logger, what: str, *, addr: str = "0.0.0.0") -> bool:
    """Serve ``registry`` on ``addr:port``/metrics in a thread; False (logged) if the port is taken."""
    try:
        start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        log.warning("%s metrics not served: port %d: %s", what, port, exc)
        return False
    log.info("%s metrics on :%d/metrics", what, port)
    return True
