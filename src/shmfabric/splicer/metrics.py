"""Prometheus metrics of a splicer (shared by the HTTP and Redis splicers).

Per backend server (label ``backend="HOST:PORT"``) and protocol (label ``proto="http"|"redis"``):

=============================================  =========  ==============================================
``shmfabric_splicer_requests_total``           counter    requests sent to the backend
``shmfabric_splicer_errors_total``             counter    failures, label ``kind`` (connect, reset,
                                                          timeout, protocol, unavailable)
``shmfabric_splicer_request_duration_seconds``  histogram  dispatch to end of response
``shmfabric_splicer_inflight``                 gauge      requests sent and not yet answered
``shmfabric_splicer_pool_connections``         gauge      pooled connections, label ``state`` (free, in_use)
``shmfabric_splicer_server_up``                gauge      1 while health checks pass
=============================================  =========  ==============================================

and per splicer: ``shmfabric_splicer_client_connections`` (gauge) and
``shmfabric_splicer_client_errors_total{kind}`` (bad requests, client resets).

Gauges that mirror pool state are read at scrape time through callbacks (``bind_pool``), so the
hot path only pays for a counter increment and a histogram observation per request. Each
`SpliceMetrics` owns its own registry, so several splicers (or tests) in one process do not clash.
`serve(registry, "127.0.0.1:9100")` starts the tiny text-format endpoint (a daemon thread from
prometheus-client; it only runs during a scrape).
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

__all__ = ["SpliceMetrics", "BackendMetrics", "serve"]

# Buckets from 100 µs to 10 s: loopback backends answer in well under a millisecond, slow ones
# and timeouts land in the top buckets.
_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class BackendMetrics:
    """Pre-bound metric children of one backend server (label lookups done once)."""

    __slots__ = ("requests", "duration", "_errors", "inflight", "_owner", "name")

    def __init__(self, owner: "SpliceMetrics", name: str) -> None:
        self._owner = owner
        self.name = name
        p = owner.proto
        self.requests = owner._requests.labels(p, name)
        self.duration = owner._duration.labels(p, name)
        self.inflight = owner._inflight.labels(p, name)
        self._errors: dict[str, Counter] = {}

    def error(self, kind: str) -> None:
        """Count one failure of `kind` (connect, reset, timeout, protocol, unavailable)."""
        child = self._errors.get(kind)
        if child is None:
            child = self._errors[kind] = self._owner._errors.labels(self._owner.proto, self.name, kind)
        child.inc()

    def bind_pool(self, free: Callable[[], float], in_use: Callable[[], float], up: Callable[[], float]) -> None:
        """Read pool sizes and health through callbacks at scrape time."""
        o = self._owner
        o._pool.labels(o.proto, self.name, "free").set_function(free)
        o._pool.labels(o.proto, self.name, "in_use").set_function(in_use)
        o._up.labels(o.proto, self.name).set_function(up)


class SpliceMetrics:
    """All metrics of one splicer instance, in its own registry."""

    def __init__(self, proto: str, registry: CollectorRegistry | None = None) -> None:
        self.proto = proto
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        lb = ("proto", "backend")
        self._requests = Counter("shmfabric_splicer_requests", "Requests sent to a backend", lb, registry=r)
        self._errors = Counter("shmfabric_splicer_errors", "Backend failures by kind", lb + ("kind",), registry=r)
        self._duration = Histogram("shmfabric_splicer_request_duration_seconds",
                                   "Dispatch to end of response", lb, buckets=_BUCKETS, registry=r)
        self._inflight = Gauge("shmfabric_splicer_inflight", "Requests sent and not yet answered", lb, registry=r)
        self._pool = Gauge("shmfabric_splicer_pool_connections", "Pooled backend connections",
                           lb + ("state",), registry=r)
        self._up = Gauge("shmfabric_splicer_server_up", "1 while the backend passes health checks", lb, registry=r)
        self.client_connections = Gauge("shmfabric_splicer_client_connections", "Open client connections",
                                        ("proto",), registry=r).labels(proto)
        self._client_errors = Counter("shmfabric_splicer_client_errors", "Client-side errors by kind",
                                      ("proto", "kind"), registry=r)
        self._backends: dict[str, BackendMetrics] = {}

    def backend(self, name: str) -> BackendMetrics:
        """The metric children of backend `name` (created on first use)."""
        bm = self._backends.get(name)
        if bm is None:
            bm = self._backends[name] = BackendMetrics(self, name)
        return bm

    def client_error(self, kind: str) -> None:
        """Count one client-side error (bad_request, reset, ...)."""
        self._client_errors.labels(self.proto, kind).inc()

    def text(self) -> bytes:
        """The registry in Prometheus text format (for tests and one-shot dumps)."""
        return generate_latest(self.registry)


def serve(registry: CollectorRegistry, address: str) -> object:
    """Serve `registry` at http://ADDRESS/metrics; returns the server (call .shutdown() to stop)."""
    from .config import split_address

    host, port = split_address(address, allow_zero=True)
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
