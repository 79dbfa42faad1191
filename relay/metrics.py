"""Prometheus metrics of one replica, served at ``GET /metrics``.

Counters are bumped where things happen (a few per request: cheap); gauges
are read from the replica's live state when Prometheus scrapes, so nothing
on the hot path keeps them up to date. Each replica object has a registry of
its own, so that several apps in one process (tests) never collide.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# The ``*_created`` timestamp series double every counter for no use here.
disable_created_metrics()  # type: ignore[no-untyped-call]


class _LiveState(Collector):
    """Gauges computed at scrape time from callables returning numbers."""

    def __init__(self, gauges: dict[str, tuple[str, Callable[[], float]]]) -> None:
        self._gauges = gauges

    def collect(self) -> Iterator[Metric]:
        for name, (doc, read) in self._gauges.items():
            yield GaugeMetricFamily(name, doc, value=read())


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "relay_requests",
            "Consumer requests by where routing sent them.",
            ["outcome"],
            registry=r,
        )
        self.tasks = Counter(
            "relay_tasks_finished",
            "Tasks whose consumer waited on this replica, by how they ended.",
            ["result"],
            registry=r,
        )
        self.chunks = Counter(
            "relay_chunks", "Stream chunks passed on to consumers of this replica.", registry=r
        )
        self.wakes = Counter(
            "relay_wakes",
            "Wakes this replica drove (it won the lock), by result.",
            ["result"],
            registry=r,
        )
        self.sessions_opened = Counter(
            "relay_sessions_opened", "Publisher control channels opened here.", registry=r
        )
        self.sessions_closed = Counter(
            "relay_sessions_closed",
            "Publisher control channels closed here, by what became of their rows.",
            ["reason"],
            registry=r,
        )

    def watch(self, gauges: dict[str, tuple[str, Callable[[], float]]]) -> None:
        """Register gauges read at scrape time: {name: (help, read)}."""
        self.registry.register(_LiveState(gauges))

    def render(self) -> bytes:
        return generate_latest(self.registry)
