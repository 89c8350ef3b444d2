"""Prometheus metrics of a splicer (shared by the HTTP and Redis splicers).

Per backend server (label ``backend="HOST:PORT"``) and protocol (label ``proto="http"|"redis"``):

=============================================  =========  ==============================================
``shmfabric_splicer_requests_total``           counter    requests sent to the backend
``shmfabric_splicer_errors_total``             counter    failures, label ``kind`` (connect, reset,
                                                          timeout, truncated, protocol, queue,
                                                          unavailable)
``shmfabric_splicer_failed_requests_total``    counter    requests answered with an error (502/504,
                                                          ``-ERR``) because of the backend, label
                                                          ``kind``: one failure may fail many
``shmfabric_splicer_request_duration_seconds``  histogram  dispatch to end of response
``shmfabric_splicer_inflight``                 gauge      requests sent and not yet answered
``shmfabric_splicer_pool_connections``         gauge      pooled connections, label ``state`` (free, in_use)
``shmfabric_splicer_server_up``                gauge      1 while health checks pass (Redis ``health.mode:
                                                          passive``: 0 only while ejected)
=============================================  =========  ==============================================

and per splicer: ``shmfabric_splicer_client_connections`` (gauge),
``shmfabric_splicer_client_errors_total{kind}`` (bad requests, client resets) and, with TLS,
``shmfabric_splicer_tls_handshake_failures_total`` (handshakes that failed, timed out or were
given up by the client: not TLS at all, no common version or cipher, the certificate refused,
nothing said for ``timeouts.request_head``; asyncio does not tell these apart to the splicer).

Gauges that mirror pool state are read at scrape time through callbacks (``bind_pool``);
request counters, error counters and latency histograms are plain Python numbers
(`FastCounter`, `FastHistogram`) exported by a collector at scrape time, so the hot path pays an
add and a bisect per request and no lock. Each
`SpliceMetrics` owns its own registry, so several splicers (or tests) in one process do not clash.
`serve(registry, "127.0.0.1:9100")` starts the tiny text-format endpoint (a daemon thread from
prometheus-client; it only runs during a scrape); `serve_socket` does the same on a listening
socket the splicer's master process made (see `workers.Master`).
"""
from __future__ import annotations

import socket
import threading
from bisect import bisect_left
from typing import Any, Callable
from wsgiref.simple_server import WSGIRequestHandler

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest, make_wsgi_app, start_http_server
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.utils import floatToGoString

__all__ = ["SpliceMetrics", "BackendMetrics", "FastCounter", "FastHistogram", "serve"]

# Buckets from 100 µs to 10 s: loopback backends answer in well under a millisecond, slow ones
# and timeouts land in the top buckets.
_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class FastCounter:
    """A counter the hot path bumps with a plain add; exported by the collector at scrape time.

    prometheus-client's own children take a lock per update (about 1 µs each); at tens of
    thousands of requests per second per process that is a visible share of the splicer's time.
    Updates happen on the event loop thread only, reads happen in the scrape thread; an int add
    under the GIL is atomic, so a scrape sees a consistent value.
    """

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class FastHistogram:
    """A histogram with fixed buckets, updated with one bisect and two adds."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # last: above the largest bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> tuple[list[tuple[str, int]], float, int]:
        counts = list(self.counts)
        total, cum, buckets = 0, 0, []
        for bound, n in zip(self.bounds, counts):
            cum += n
            buckets.append((floatToGoString(bound), cum))
        total = cum + counts[-1]
        buckets.append(("+Inf", total))
        return buckets, self.sum, total


class BackendMetrics:
    """Metric children of one backend server: `requests.inc(n)`, `duration.observe(s)`, `error(kind, n)`."""

    __slots__ = ("requests", "duration", "errors", "failed", "inflight", "_owner", "name")

    def __init__(self, owner: "SpliceMetrics", name: str) -> None:
        self._owner = owner
        self.name = name
        self.requests = FastCounter()
        self.duration = FastHistogram(_BUCKETS)
        self.errors: dict[str, FastCounter] = {}
        self.failed: dict[str, FastCounter] = {}
        self.inflight = owner._inflight.labels(owner.proto, name)

    def error(self, kind: str, failed_requests: int = 0) -> None:
        """Count one failure of `kind` (connect, reset, timeout, protocol, unavailable) and the
        client requests it answered with an error (a reset connection fails all it carried)."""
        child = self.errors.get(kind)
        if child is None:
            child = self.errors[kind] = FastCounter()
        child.value += 1
        if failed_requests:
            self.failed_requests(kind, failed_requests)

    def failed_requests(self, kind: str, n: int = 1) -> None:
        """Count `n` client requests answered with an error because of this backend."""
        child = self.failed.get(kind)
        if child is None:
            child = self.failed[kind] = FastCounter()
        child.value += n

    def bind_pool(self, free: Callable[[], float], in_use: Callable[[], float], up: Callable[[], float],
                  inflight: Callable[[], float] | None = None) -> None:
        """Read pool sizes, health (and optionally requests in flight) through callbacks at scrape time."""
        o = self._owner
        o._pool.labels(o.proto, self.name, "free").set_function(free)
        o._pool.labels(o.proto, self.name, "in_use").set_function(in_use)
        o._up.labels(o.proto, self.name).set_function(up)
        if inflight is not None:
            self.inflight.set_function(inflight)


class _FastCollector:
    """Exports the FastCounter/FastHistogram values of every backend."""

    def __init__(self, owner: "SpliceMetrics") -> None:
        self._owner = owner

    def collect(self):  # noqa: ANN201 - prometheus-client collector protocol
        o = self._owner
        req = CounterMetricFamily("shmfabric_splicer_requests", "Requests sent to a backend", labels=("proto", "backend"))
        err = CounterMetricFamily("shmfabric_splicer_errors", "Backend failures by kind",
                                  labels=("proto", "backend", "kind"))
        failed = CounterMetricFamily("shmfabric_splicer_failed_requests",
                                     "Requests answered with an error because of the backend, by kind",
                                     labels=("proto", "backend", "kind"))
        dur = HistogramMetricFamily("shmfabric_splicer_request_duration_seconds", "Dispatch to end of response",
                                    labels=("proto", "backend"))
        for name, bm in sorted(o._backends.items()):
            req.add_metric((o.proto, name), bm.requests.value)
            for kind, c in sorted(bm.errors.items()):
                err.add_metric((o.proto, name, kind), c.value)
            for kind, c in sorted(bm.failed.items()):
                failed.add_metric((o.proto, name, kind), c.value)
            buckets, total_sum, _ = bm.duration.snapshot()
            dur.add_metric((o.proto, name), buckets, total_sum)
        yield req
        yield err
        yield failed
        yield dur
        log = o.access_log
        if o.tls_handshake_failures is not None:
            tls = CounterMetricFamily("shmfabric_splicer_tls_handshake_failures",
                                      "TLS handshakes that failed, timed out or were abandoned", labels=("proto",))
            tls.add_metric((o.proto,), o.tls_handshake_failures.value)
            yield tls
        if log is not None:
            lines = CounterMetricFamily("shmfabric_splicer_access_log_lines",
                                        "Access-log lines written, and dropped because a write failed",
                                        labels=("proto", "outcome"))
            lines.add_metric((o.proto, "written"), log.written)
            lines.add_metric((o.proto, "dropped"), log.dropped)
            yield lines


class SpliceMetrics:
    """All metrics of one splicer instance, in its own registry."""

    def __init__(self, proto: str, registry: CollectorRegistry | None = None) -> None:
        self.proto = proto
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        lb = ("proto", "backend")
        self._inflight = Gauge("shmfabric_splicer_inflight", "Requests sent and not yet answered", lb, registry=r)
        self._pool = Gauge("shmfabric_splicer_pool_connections", "Pooled backend connections",
                           lb + ("state",), registry=r)
        self._up = Gauge("shmfabric_splicer_server_up", "1 while the backend passes health checks", lb, registry=r)
        self.client_connections = Gauge("shmfabric_splicer_client_connections", "Open client connections",
                                        ("proto",), registry=r).labels(proto)
        self._client_errors = Counter("shmfabric_splicer_client_errors", "Client-side errors by kind",
                                      ("proto", "kind"), registry=r)
        self._backends: dict[str, BackendMetrics] = {}
        self.access_log: Any = None  # an access_log.AccessLog whose line counts are exported
        self.tls_handshake_failures: FastCounter | None = None  # set (and exported) when TLS is on
        r.register(_FastCollector(self))

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


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        """Log nothing (a scrape every few seconds is not news)."""


class _SocketServer(ThreadingWSGIServer):
    # prometheus-client's start_http_server binds its own socket; this one serves a socket the
    # master process holds, so a worker that replaces another (reload, respawn) serves the same
    # metrics port at once, with no "address in use" while the old one finishes.

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock.getsockname()[:2], _QuietHandler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.server_name, self.server_port = str(sock.getsockname()[0]), sock.getsockname()[1]
        self.setup_environ()


def serve_socket(registry: CollectorRegistry, sock: socket.socket) -> Callable[[], None]:
    """Serve `registry` at /metrics on the listening socket `sock` (a daemon thread); returns a
    function that stops serving (and closes this process's copy of the socket) without waiting."""
    server = _SocketServer(sock)
    server.set_app(make_wsgi_app(registry))
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()

    def stop() -> None:
        def shut() -> None:
            server.shutdown()
            server.server_close()

        threading.Thread(target=shut, name="metrics-stop", daemon=True).start()

    return stop
