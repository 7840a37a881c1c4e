"""Prometheus metrics: per-RPC counts, latencies and bytes, and what the server holds.

Each server owns its own CollectorRegistry (tests run several servers in one process). The
`method` label only takes the names of the service's RPCs (or "unknown"), so a client cannot
grow the label set by calling made-up methods.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from paramhub_server.core.registry import Registry

log = logging.getLogger(__name__)

#: Latency buckets in seconds: sub-millisecond metadata calls up to multi-second GiB transfers.
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            10.0, 30.0, 60.0)


class _HeldCollector(Collector):
    """Models, parameter elements and bytes held, read from the registry at scrape time."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[GaugeMetricFamily]:
        models = self.registry.list()
        numel = nbytes = 0
        for m in models:
            n, b = m.stats()
            numel += n
            nbytes += b
        yield GaugeMetricFamily("paramhub_models", "Models held.", value=len(models))
        yield GaugeMetricFamily("paramhub_parameters",
                                "Parameter elements held (tied storage counted once).",
                                value=numel)
        yield GaugeMetricFamily("paramhub_held_bytes",
                                "Bytes of parameters and buffers held (tied storage once).",
                                value=nbytes)
        # Write-log lag: what a restart would replay, and logs whose last appends await an
        # fsync (--fsync batch / off). Memory-only servers (no journal) report nothing.
        journals = [m.journal for m in models if hasattr(getattr(m, "journal", None), "lag")]
        if journals:
            lags = [j.lag() for j in journals]
            yield GaugeMetricFamily("paramhub_wal_bytes",
                                    "Write-ahead log bytes not yet compacted into snapshots.",
                                    value=sum(b for b, _ in lags))
            yield GaugeMetricFamily("paramhub_wal_unsynced_models",
                                    "Models whose log has appends not yet fsynced.",
                                    value=sum(1 for _, dirty in lags if dirty))
        if self.registry.max_total_bytes is not None:
            yield GaugeMetricFamily("paramhub_max_total_bytes", "The --max-total-bytes budget.",
                                    value=self.registry.max_total_bytes)


class _AdmissionCollector(Collector):
    """Calls in progress per waiting class (admission.py), read at scrape time."""

    def __init__(self, admission: Any) -> None:
        self.admission = admission

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily("paramhub_waiting_calls",
                              "Calls in progress per waiting class (watch, transfer, round).",
                              labels=["class"])
        for cls, n in self.admission.active().items():
            g.add_metric([cls], n)
        yield g
        limits = GaugeMetricFamily("paramhub_waiting_call_limit",
                                   "Limit of calls in progress per waiting class.",
                                   labels=["class"])
        for cls, gate in self.admission.gates.items():
            limits.add_metric([cls], gate.limit)
        yield limits


class Metrics:
    """The server's metrics and, optionally, the HTTP endpoint that exposes them."""

    def __init__(self, registry: Registry, methods: list[str], admission: Any = None) -> None:
        self.methods = set(methods)
        self.prom = CollectorRegistry(auto_describe=True)
        self.rpcs = Counter("paramhub_rpcs", "RPCs finished, by method and status code.",
                            ["method", "code"], registry=self.prom)
        self.latency = Histogram("paramhub_rpc_duration_seconds",
                                 "RPC latency from handler start to the last response, seconds.",
                                 ["method", "code"], buckets=_BUCKETS, registry=self.prom)
        self.bytes_in = Counter("paramhub_received_bytes",
                                "Serialized request bytes received, by method.", ["method"],
                                registry=self.prom)
        self.bytes_out = Counter("paramhub_sent_bytes",
                                 "Serialized response bytes sent, by method.", ["method"],
                                 registry=self.prom)
        self.prom.register(_HeldCollector(registry))
        if admission is not None:
            self.prom.register(_AdmissionCollector(admission))
        #: Child metrics by (method, code): prometheus_client's labels() costs a lock, a tuple
        #: and a dict lookup per call (~10 us for the four series of one RPC).
        self._children: dict[tuple[str, str], tuple[Any, Any, Any, Any]] = {}
        self._http: Any = None
        self._thread: Any = None
        self.port: int | None = None

    def label(self, method: str) -> str:
        """The method label: the RPC name if it is one of the service's, else "unknown"."""
        return method if method in self.methods else "unknown"

    def observe(self, method: str, code: str, seconds: float) -> None:
        """Records one finished RPC."""
        m = self.label(method)
        self.rpcs.labels(m, code).inc()
        self.latency.labels(m, code).observe(seconds)

    def finished(self, method: str, code: str, seconds: float, received: int, sent: int
                 ) -> None:
        """Records one finished RPC: count, latency and bytes in one step."""
        key = (method, code)
        children = self._children.get(key)
        if children is None:
            m = self.label(method)
            children = (self.rpcs.labels(m, code), self.latency.labels(m, code),
                        self.bytes_in.labels(m), self.bytes_out.labels(m))
            if len(self._children) < 4096:  # codes and methods are bounded; stay safe anyway
                self._children[key] = children
        rpcs, latency, bytes_in, bytes_out = children
        rpcs.inc()
        latency.observe(seconds)
        if received:
            bytes_in.inc(received)
        if sent:
            bytes_out.inc(sent)

    def add_bytes(self, method: str, received: int = 0, sent: int = 0) -> None:
        """Counts serialized bytes in and out."""
        m = self.label(method)
        if received:
            self.bytes_in.labels(m).inc(received)
        if sent:
            self.bytes_out.labels(m).inc(sent)

    def serve(self, host: str, port: int) -> int:
        """Exposes /metrics over HTTP on host:port (0 picks a free port); returns the port."""
        self._http, self._thread = start_http_server(port, addr=host, registry=self.prom)
        self.port = self._http.server_port
        log.info("metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    def stop(self) -> None:
        """Stops the HTTP endpoint, if any."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
