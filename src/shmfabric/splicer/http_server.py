"""`HttpSplicer`: the listening side of the HTTP splicer, and a runner for N worker processes.

    splicer = HttpSplicer(HttpSpliceConfig(listen="127.0.0.1:8080", default=["127.0.0.1:9001"]))
    await splicer.start()
    ...
    await splicer.close()

`run(cfg, listeners)` runs `cfg.workers` worker processes under a `workers.Master` until
SIGINT/SIGTERM, then stops gracefully (`drain`: every request already read is answered, for up
to `timeouts.drain` seconds; a second signal cuts that short), with uvloop when installed. Each
worker has its own event loop and pools, and its own listening socket on the shared port
(SO_REUSEPORT: the kernel spreads client connections over them); worker i serves its metrics on
the metrics port + i. SIGHUP reloads the configuration without refusing a connection.
"""
from __future__ import annotations

import asyncio
import heapq
import socket
import ssl
import struct
from collections import deque
from typing import Any, Callable

from .access_log import AccessLog, AccessLogError
from .config import HttpSpliceConfig, parse_backend, split_address
from .http_pool import BackendGroup, BackendServer
from .http_proxy import DRAIN_IDLE_GRACE, ClientConnection
from .http_router import Router
from .metrics import FastCounter, SpliceMetrics, serve_socket
from .teardown import LINGER_SECONDS
from .tls import TlsError, server_context
from .workers import Accepting, GracefulStop, Listeners, ReloadRefused, install_uvloop, say, serve_under_master

__all__ = ["HttpSplicer", "run", "install_uvloop"]

#: How long a graceful stop (or a reload's) waits for connections accepted before it and still
#: in their TLS handshake (`Accepting`): a real handshake takes a few round trips.
HANDSHAKE_DRAIN_GRACE = 1.0
#: At most one log line about failed TLS handshakes per this many seconds (the counts are in
#: the metrics): a port scanner or a misconfigured client must not flood the log.
TLS_LOG_SECONDS = 60.0


class HttpSplicer:
    """One HTTP splicer instance (one event loop)."""

    def __init__(self, cfg: HttpSpliceConfig, metrics: SpliceMetrics | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics if metrics is not None else SpliceMetrics("http")
        self.servers: dict[str, BackendServer] = {}
        self.clients: set[ClientConnection] = set()
        # accepted, not yet connected (TLS handshake included): a graceful stop waits for them
        self.accepting = Accepting(cfg.timeouts.request_head + 1.0,
                                   self._handshake_failed if cfg.tls is not None else None)
        self._tls_failures_logged = 0  # failed handshakes said in the log so far (`_say_tls_failures`)
        if cfg.tls is not None:
            self.metrics.tls_handshake_failures = FastCounter()
        self._tls_log_next = 0.0
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._server: asyncio.base_events.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._timeouts: asyncio.Task[None] | None = None
        # (clock, exchange): exchanges on a backend connection, oldest clock first (see
        # _sweep_timeouts), and exchanges waiting in a pool's queue (see _sweep_queue)
        self.deadlines: deque[tuple[float, Any]] = deque()
        self.queue_deadlines: deque[tuple[float, Any]] = deque()
        self.draining = False
        self.drain_started = 0.0
        self.access_log: AccessLog | None = None  # opened by start (it needs the loop)
        self.forwarding = cfg.forwarded_for or cfg.forwarded  # client connections need forward_lines
        lim = cfg.limits

        def server_for(addr: str) -> BackendServer:
            # One pool per address, shared by every route that names it.
            s = self.servers.get(addr)
            if s is None:
                s = self.servers[addr] = BackendServer(addr, cfg.pool, cfg.timeouts, cfg.health,
                                                       self.metrics.backend(addr), max_head_bytes=lim.max_head_bytes,
                                                       max_headers=lim.max_headers)
            return s

        def group(name: str, backends: list[str]) -> BackendGroup:
            members = [parse_backend(b) for b in backends]
            return BackendGroup(name, [server_for(a) for a, _, _ in members], [w for _, w, _ in members],
                                [b for _, _, b in members])

        rules = []
        for i, r in enumerate(cfg.routes):
            rules.append((r.prefix, r.regex, r.host, group(f"route{i}", r.backends)))
        default = group("default", cfg.default) if cfg.default else None
        self.router: Router[BackendGroup] = Router.from_config(rules, default)

    async def start(self, *, sock: socket.socket | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
        """Open the pools and start listening on `cfg.listen` (port 0 picks a free port), or on
        the listening socket `sock`. With `tls` configured, `ssl_context` is the context to serve
        (built from `cfg.tls` when not given)."""
        self.loop = asyncio.get_running_loop()
        ssl_ctx = None
        if self.cfg.tls is not None:
            ssl_ctx = ssl_context if ssl_context is not None else server_context(self.cfg.tls)
        # A client that opens TLS and stalls is bounded like one that stalls in a request head.
        # A connection the splicer ends waits for the client's close_notify as long as a plain one
        # lingers (teardown.LINGER_SECONDS), not asyncio's 30 s: a reload or stop would wait that.
        # That timer starts at close(), which comes once the answers have reached the client
        # (teardown.close_lingering): it bounds the close_notify exchange, not the delivery.
        tls_kw = {"ssl": ssl_ctx, "ssl_handshake_timeout": self.cfg.timeouts.request_head,
                  "ssl_shutdown_timeout": LINGER_SECONDS} if ssl_ctx else {}
        if self.cfg.access_log is not None:
            self.access_log = AccessLog(self.cfg.access_log, self.cfg.access_log_format, loop=self.loop, warn=say)
            self.metrics.access_log = self.access_log
        for s in self.servers.values():
            s.start(self.loop)
        if sock is not None:
            self._server = await self.loop.create_server(lambda: ClientConnection(self), sock=sock, backlog=1024,
                                                         **tls_kw)
        else:
            host, port = split_address(self.cfg.listen, allow_zero=True)
            self._server = await self.loop.create_server(lambda: ClientConnection(self), host, port, backlog=1024,
                                                         **tls_kw)
        self._sweeper = self.loop.create_task(self._sweep_idle())
        self._timeouts = self.loop.create_task(self._sweep_timeouts())

    def _handshake_failed(self, _age: float) -> None:
        # An accepted TLS connection whose protocol was dropped before connection_made: its
        # handshake failed, timed out or was given up (asyncio says nothing else of it).
        self.metrics.tls_handshake_failures.value += 1  # type: ignore[union-attr]

    def _say_tls_failures(self, now: float) -> None:
        """At most one log line per TLS_LOG_SECONDS about the handshakes that failed since the last."""
        total = self.metrics.tls_handshake_failures.value  # type: ignore[union-attr]
        if total == self._tls_failures_logged or now < self._tls_log_next:
            return
        new = total - self._tls_failures_logged
        self._tls_failures_logged = total
        self._tls_log_next = now + TLS_LOG_SECONDS
        say(f"splice http: {new} TLS handshake(s) failed since the last report ({total} in all): clients that "
            f"are not TLS (plain HTTP to the HTTPS port), share no TLS version or cipher, refuse the certificate, "
            f"or say nothing for timeouts.request_head; at most one such line per {TLS_LOG_SECONDS:g} s, the "
            f"count is shmfabric_splicer_tls_handshake_failures_total")

    def forward_lines(self, host: str) -> bytes:
        """The header lines that tell backends the client's address `host` (none unless
        `forwarded_for` or `forwarded` is set)."""
        cfg = self.cfg
        if not self.forwarding:
            return b""
        if host.startswith("::ffff:") and "." in host:
            host = host[7:]  # an IPv4 client of a dual-stack listener, as itself
        proto = b"https" if cfg.tls is not None else b"http"
        out = b""
        if cfg.forwarded_for:
            out += b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\n" % (host.encode("ascii"), proto)
        if cfg.forwarded:
            # RFC 7239 section 6: an IPv6 node is bracketed, and then quoted (":" is not a token char)
            node = f'"[{host}]"' if ":" in host else host
            out += b"Forwarded: for=%s;proto=%s\r\n" % (node.encode("ascii"), proto)
        return out

    @property
    def port(self) -> int:
        """The port actually listened on."""
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    def pool_sizes(self) -> dict[str, dict[str, int]]:
        """Per backend: free and in-use pooled connections, connections being opened, waiters."""
        return {name: {"free": len(s.free), "in_use": len(s.in_use), "connecting": s.connecting,
                       "waiters": len(s.waiters) + len(s.fresh_waiters), "inflight": s.inflight,
                       "paused": s.paused}
                for name, s in sorted(self.servers.items())}

    async def _sweep_idle(self) -> None:
        idle = self.cfg.timeouts.client_idle
        head = self.cfg.timeouts.request_head
        while True:
            # Faster while draining: idle connections are closed DRAIN_IDLE_GRACE after their
            # last use (`ClientConnection.drain`), and the stop waits for them.
            await asyncio.sleep(0.1 if self.draining else min(1.0, idle / 2, head / 2))
            now = self.loop.time()
            if self.cfg.tls is not None:
                self.accepting.count()  # hands handshakes failed since the last look to the metrics
                self._say_tls_failures(now)
            cutoff = now - idle
            drained = now - DRAIN_IDLE_GRACE if self.draining else None
            for c in list(self.clients):
                if c.closed:
                    continue  # lingering after its last answer (teardown.close_lingering bounds it)
                if drained is not None and c.last_seen <= drained and c.idle_draining:
                    c._close()
                elif c.last_seen < cutoff and not c.exchanges and c.merge.idle and c.tunnel_conn is None:
                    c._close()
                elif (c.write_paused and c.tunnel_conn is None and not c.took_some()
                      and c.write_paused_at < cutoff):
                    # Took none of its answers for client_idle (nginx's send_timeout, HAProxy's
                    # timeout client): it would hold its backend connections (paused) forever.
                    # A client that takes some, however slowly, is not cut (`took_some`: the
                    # clock runs from the last look that found fewer bytes untaken). Nothing is left
                    # to save for it: a reset (SO_LINGER 0), not a staged close, which would
                    # wait for the buffered answers to be taken, nor a FIN after the bytes in
                    # the kernel's buffer, which would look like a complete answer's end.
                    c.ending = f"the client read nothing for timeouts.client_idle ({idle:g} s)"
                    _reset_on_close(c.transport)
                    c._close()
                    c.transport.abort()
                elif c.head_since is not None and c.head_since < now - head and not c.closed and not c.stop_reading:
                    # A head trickled in (slowloris) keeps last_seen fresh; its age does not lie.
                    c.head_timed_out(head)

    async def _sweep_timeouts(self) -> None:
        # Request timeouts: every exchange gets the same timeout when a connection carries it,
        # so `deadlines` is in deadline order: pop finished ones and time out due ones from the
        # left, stop at the first that is still in time. An entry whose clock is not the
        # exchange's any more stands for nothing (its clock restarted: a later entry has it). A
        # clock restarted by the sweep itself (the backend still sending, or held back) may lie
        # before the newest entry's: those go to a heap (`rearmed`), in deadline order too.
        timeout = self.cfg.timeouts.request
        qtimeout = self.cfg.timeouts.queue or timeout
        period = min(0.1, timeout / 4, qtimeout / 4)
        q = self.deadlines
        rearmed: list[tuple[float, int, Any]] = []
        tie = 0  # heap entries never compare exchanges
        last = self.loop.time()
        while True:
            await asyncio.sleep(period)
            now = self.loop.time()
            cutoff = now - timeout
            while q or rearmed:
                if rearmed and (not q or rearmed[0][0] <= q[0][0]):
                    clock, _, ex = rearmed[0]
                    fromheap = True
                else:
                    clock, ex = q[0]
                    fromheap = False
                if ex.finished or clock != ex.clock:
                    heapq.heappop(rearmed) if fromheap else q.popleft()
                elif clock <= cutoff:
                    heapq.heappop(rearmed) if fromheap else q.popleft()
                    if ex.queued:
                        # A retry waits in a pool's queue: the queue's clock runs (below), and a
                        # request clock starts again with its connection (`Exchange.on_connection`).
                        ex.clock = 0.0
                        continue
                    conn = ex.conn
                    if conn is not None and (conn.paused or ex.last_rx > cutoff):
                        # Not the backend's fault: we stopped reading it (the client reads
                        # slowly), or it is still sending. The clock restarts past the cutoff.
                        ex.clock = clock = now if conn.paused else ex.last_rx
                        tie += 1
                        heapq.heappush(rearmed, (clock, tie, ex))
                        continue
                    ex.on_timeout()
                else:
                    break
            self._sweep_queue(now, now - last, qtimeout)
            last = now

    def _sweep_queue(self, now: float, step: float, qtimeout: float) -> None:
        """Requests waiting for a pooled connection: 503 once they waited `qtimeout`, not
        counting the time their own client held them back by reading slowly
        (`Exchange.held_back`): each pass adds the time since the last one (`step`) to the
        held time of those held back now (`Exchange.qheld`), so a deadline is always the
        enqueue time + `qtimeout` + the time held back, however the holds come and go. Every
        waiting request is looked at on each pass (the queues' lengths bound the work; a pass
        with no request waiting costs nothing)."""
        qq = self.queue_deadlines
        if not qq:
            return
        keep: deque[tuple[float, Any]] = deque()
        due = []
        for entry in qq:
            clock, ex = entry
            if not ex.queued or clock != ex.qclock or ex.finished:
                continue  # served, gone, or queued again (a later entry has it)
            if ex.held_back:
                ex.qheld += min(step, now - clock)
            elif now - clock - ex.qheld >= qtimeout:
                due.append(ex)
                continue
            keep.append(entry)
        self.queue_deadlines = keep
        for ex in due:  # after the pass: a 503 may queue or serve others
            ex.on_queue_timeout(qtimeout)

    def busy(self) -> int:
        """Client connections a graceful stop waits for: open ones, and accepted ones on their
        way to `connection_made` (see `Accepting`)."""
        if self.draining and self.loop.time() - self.drain_started > HANDSHAKE_DRAIN_GRACE:
            # Those still in their TLS handshake (a client that connected and says nothing) are
            # not waited for past a short grace: the stop would wait timeouts.request_head. They
            # end with the worker (as HAProxy's and nginx's do), having sent no request.
            return len(self.clients)
        return len(self.clients) + self.accepting.count()

    def drain(self) -> None:
        """Start a graceful stop: stop listening, and have every client connection answer the
        requests it has read and then close (`ClientConnection.drain`). The pools stay up until
        `close`; `clients` empties as the connections finish."""
        self.draining = True
        self.drain_started = self.loop.time()
        if self._server is not None:
            self._server.close()
        for c in list(self.clients):
            c.drain()

    async def close(self) -> None:
        """Stop listening, cut the client connections still open, close the pools."""
        if self._timeouts is not None:
            self._timeouts.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
        for c in list(self.clients):
            if c.transport is not None:
                c.ending = "the splicer stopped before this answer (timeouts.drain passed, or a second signal)"
                c.transport.abort()
        for s in self.servers.values():
            await s.close()
        if self._server is not None:
            await self._server.wait_closed()
        if self.access_log is not None:
            self.access_log.close()
            self.access_log = None


def _reset_on_close(transport: asyncio.BaseTransport) -> None:
    """Make the close of `transport` a TCP reset (SO_LINGER with a zero timeout)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except (OSError, ValueError, AttributeError):
            pass


async def _serve(cfg: HttpSpliceConfig, sock: socket.socket, metrics_sock: socket.socket | None,
                 ready: Callable[[], None], ssl_context: ssl.SSLContext | None = None) -> None:
    metrics = SpliceMetrics("http")
    splicer = HttpSplicer(cfg, metrics)
    try:
        await splicer.start(sock=sock, ssl_context=ssl_context)
    except AccessLogError as exc:  # the path changed since the master checked it
        say(f"splice http: worker cannot start: {exc}")
        raise SystemExit(1) from None
    stop_metrics = serve_socket(metrics.registry, metrics_sock) if metrics_sock is not None else None
    stop = GracefulStop(asyncio.get_running_loop())
    ready()

    def drain() -> None:
        splicer.drain()
        if stop_metrics is not None:
            stop_metrics()  # the metrics port goes to the worker that replaces this one

    cutting = await stop.run(drain, splicer.busy, cfg.timeouts.drain)
    if cutting:
        say(f"splice http: {cutting}")
    await splicer.close()


def run(cfg: HttpSpliceConfig, listeners: Listeners, reload: Callable[[], HttpSpliceConfig] | None = None,
        announce: Callable[[], None] | None = None) -> int:
    """Run `cfg.workers` worker processes under a `Master` until SIGINT/SIGTERM; SIGHUP reloads
    (`reload()` returns the re-read configuration, or raises ReloadRefused)."""
    install_uvloop()

    def with_context(c: HttpSpliceConfig) -> tuple[HttpSpliceConfig, ssl.SSLContext | None]:
        # The TLS context is built in the master, once per configuration, and the workers forked
        # from it inherit it: with it the key that encrypts session tickets, so a client resumes
        # its session on whichever worker the kernel hands its next connection to (Python's ssl
        # has no way to give separately built contexts the same ticket key), and a respawned
        # worker serves what its generation loaded, whatever the files hold by then.
        try:
            return c, server_context(c.tls) if c.tls is not None else None
        except TlsError as exc:
            raise ReloadRefused(str(exc)) from None

    try:
        return serve_under_master(
            "splice http", cfg, listeners,
            lambda prepared, sock, msock, ready: asyncio.run(_serve(prepared[0], sock, msock, ready, prepared[1])),
            reload, announce, prepare=with_context)
    except ReloadRefused as exc:  # at start: the files changed since the command line was checked
        say(f"shmfabric: error: {exc}")
        return 2
