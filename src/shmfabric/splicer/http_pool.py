"""Backend connection pools of the HTTP splicer (asyncio shell side).

Per backend server (`BackendServer`):

* `free`: a queue of idle pooled connections, ready for a request;
* `in_use`: the in-use directory, pooled connection -> the exchanges (client requests) it
  serves, oldest first (one, or up to `pool.pipeline` pipelined idempotent requests);
* `waiters`: exchanges waiting for a connection (when `max` connections are all in use);
* `fresh_waiters`: retried exchanges waiting for a newly opened connection (below);
* `min` connections are opened at start and re-opened (with jittered exponential backoff) when
  they close; up to `max` are opened on demand;
* `paused`: in-use connections whose reading is paused because their client reads slowly
  (backpressure). They do not count against `max` for requests of clients that read: the pool
  opens that many more for them, up to `hard_max` (2 x `max`) in all, and closes the extra ones
  once no such request waits. Requests of a client that is itself held back
  (`Exchange.held_back`) are served after the others and never beyond `max`, so one client
  that stops reading cannot take a backend's whole pool (nginx and HAProxy give each client
  connection its own backend connection; this pool is shared).

A connection carries one request at a time; the end of each response is found by parsing it
(`ResponseFramer`), after which the connection returns to `free` or goes straight to the next
waiter.

A backend may close a keep-alive connection at any time between responses (nginx after
`keepalive_requests`, idle timeouts), and the close can cross a request already handed to that
connection, or pipelined behind the last response. Such a request is retried (see
`Exchange.on_backend_failure`) on a connection opened for it: a new connection is not subject to
a keep-alive limit before its first response, whereas another pooled one may be closing just the
same (retried on pooled connections, up to a quarter of the requests got 502s against a backend
closing after every 5th). Retried exchanges are served before the other waiters: their clients' later
responses are held behind them.

Health: active checks every `health.interval` (TCP connect, or `GET health.path`), plus
passive results from connects; a server that fails `fall` times leaves rotation, and comes back
after `rise` successes (`HealthState`). With active checks off, a down server is probed by
connects alone (one at a time, after the backoff delay, closed once open) until `rise` succeed
in a row. `BackendGroup.pick()` chooses the up server with the fewest requests in flight.

Live traffic is observed too (HAProxy's `observe layer7` with `on-error mark-down`, Envoy's
consecutive gateway failures): after `health.eject_after` requests in a row failed by the
server's doing (closed or reset before a complete response, a bad response, the request
timeout; `exchange_failed`), it is taken out as `fall` failed checks would (`_eject`). Any
complete response, whatever its status, restarts the count (`exchange_ok`). A server so
ejected accepts TCP connections, most likely: its connects no longer count as passing checks,
only `rise` active checks (or, with them off, probe connects `health.interval` apart) bring it
back, the first one `health.interval` after the ejection at the earliest.

Exchanges talk to this module through a small interface: `on_connection(conn)`,
`on_response_event(event)`, `on_backend_failure(kind, message)`, `on_tunnel_data(data)`; the
failure kinds are connect, reset (closed before the response began), truncated (closed in the
middle of it, or malformed after its status line), protocol (bytes that do not start a response),
timeout and unavailable.
"""
from __future__ import annotations

import asyncio
import socket
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

from .backoff import Backoff, HealthState
from .config import HealthConfig, PoolConfig, TimeoutConfig, split_address
from .workers import say
from .http_framer import NEED_DATA, PAUSED, ConnectionClosed, IncompleteResponse, RemoteProtocolError, ResponseFramer

if TYPE_CHECKING:
    from .metrics import BackendMetrics

__all__ = ["BackendConnection", "BackendServer", "BackendGroup", "ExchangeLike"]


class ExchangeLike(Protocol):
    """What a pool needs from the request it serves."""

    def on_connection(self, conn: "BackendConnection") -> None: ...
    def on_response_event(self, event: Any) -> None: ...
    def on_backend_failure(self, kind: str, message: str) -> None: ...
    def on_tunnel_data(self, data: bytes) -> None: ...

    @property
    def held_back(self) -> bool:
        """Its client reads slowly and has not reached it: no connection beyond `max` for it."""
        ...


class BackendConnection(asyncio.Protocol):
    """One pooled connection to a backend server.

    `exchanges` holds the requests sent on it and not yet answered, oldest first: one at a
    time normally, up to `pool.pipeline` when idempotent requests are pipelined to the backend.
    """

    __slots__ = ("server", "transport", "framer", "exchanges", "alive", "used", "idled", "tunnel", "pipelined",
                 "answered", "failed", "_paused", "_cork")

    def __init__(self, server: "BackendServer") -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.framer = ResponseFramer(server.max_head_bytes, server.max_headers)
        self.exchanges: deque[ExchangeLike] = deque()
        self.alive = False
        self.used = 0          # requests served so far (a reused connection may be stale)
        self.idled = False     # has sat in the free queue (the backend may have closed it meanwhile)
        self.tunnel = False    # after 101 Switching Protocols: raw bytes both ways
        self.pipelined = False  # carries pipelined (idempotent, bodiless) requests
        self.answered = False  # a complete response came on it (`BackendServer.exchange_ok`)
        self.failed = False    # a failure of a request on it was counted (`BackendServer.exchange_failed`)
        self._paused = False
        self._cork: list[bytes] | None = None

    @property
    def exchange(self) -> ExchangeLike | None:
        """The exchange whose response is read next."""
        return self.exchanges[0] if self.exchanges else None

    # -- asyncio callbacks ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.alive = True

    def data_received(self, data: bytes) -> None:
        if self.tunnel:
            ex = self.exchange
            if ex is not None:
                ex.on_tunnel_data(data)
            return
        self.framer.receive_data(data)
        self._drain()

    def _drain(self) -> None:
        framer = self.framer
        exchanges = self.exchanges
        while not self.tunnel:  # after a 101 the bytes are the tunnel's (its exchange stays, to end it)
            try:
                ev = framer.next_event()
            except RemoteProtocolError as exc:
                self.abort()
                if exchanges:
                    ex = exchanges.popleft()
                    # "truncated": its response had begun (its status line parsed, then it broke
                    # off or failed to parse: a malformed field, a head too large, a 101 without
                    # Upgrade), so the backend acted on it (no retry: 502). "protocol": bytes that
                    # are not the start of a response at all (left over from an earlier one, say),
                    # which an idempotent request may be retried after. The error counter takes
                    # the same kind as the failure, so the two metrics tell the cases alike.
                    kind = "truncated" if isinstance(exc, IncompleteResponse) else "protocol"
                    self.server.metrics.error(kind)
                    ex.on_backend_failure(kind, f"bad response from backend {self.server.name}: {exc}")
                return
            if ev is NEED_DATA or ev is PAUSED:
                # PAUSED: 101 Switching Protocols was parsed; the exchange has switched to a
                # tunnel and took the raw bytes held after the response head.
                return
            if isinstance(ev, ConnectionClosed):
                return
            if not exchanges:
                # Bytes nobody asked for (e.g. a late response after a timeout): unusable.
                self.abort()
                return
            exchanges[0].on_response_event(ev)

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        was_alive = self.alive
        self.alive = False
        self._unpause()
        if self.tunnel:
            ex = self.exchange
            self.exchanges.clear()
            if ex is not None:
                ex.on_tunnel_data(b"")
        elif self.exchanges:
            # Let the framer finish a read-until-close body; anything else is a failure of
            # every request still on this connection (idempotent ones may be retried).
            # A reset (exc: ConnectionResetError, or another error) is no end of a body: a body
            # delimited by the close and cut by a reset must fail like any response cut off
            # mid-body, not be passed on as complete. A response whose head had not all come
            # is judged by the framer either way (cut off in its head: "truncated").
            if exc is None or not getattr(self.exchanges[0], "resp_started", False):
                self.framer.receive_data(b"")
                self._drain()
            failed = list(self.exchanges)
            self.exchanges.clear()
            how = "closed the connection" if exc is None else f"reset the connection ({exc})"
            for ex in failed:
                self.server.metrics.error("reset")
                ex.on_backend_failure("reset", f"backend {self.server.name} {how}")
        if was_alive:
            self.server._on_lost(self)

    def pause_writing(self) -> None:
        ex = self.exchange
        if ex is not None and hasattr(ex, "on_backend_pause_writing"):
            ex.on_backend_pause_writing(True)  # type: ignore[attr-defined]

    def resume_writing(self) -> None:
        ex = self.exchange
        if ex is not None and hasattr(ex, "on_backend_pause_writing"):
            ex.on_backend_pause_writing(False)  # type: ignore[attr-defined]

    def remove(self, ex: ExchangeLike) -> None:
        """Forget `ex` (it failed or timed out); the caller aborts the connection."""
        try:
            self.exchanges.remove(ex)
        except ValueError:
            pass

    # -- helpers --------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        cork = self._cork
        if cork is not None:
            cork.append(data)
            return
        t = self.transport
        if t is not None and self.alive:
            t.write(data)

    def cork(self) -> None:
        """Collect writes until `uncork()` (one send for a batch of pipelined requests)."""
        if self._cork is None:
            self._cork = []

    def uncork(self) -> None:
        cork = self._cork
        self._cork = None
        t = self.transport
        if cork and t is not None and self.alive:
            t.writelines(cork)

    @property
    def paused(self) -> bool:
        """True while we hold back reading its responses (the client side is slow)."""
        return self._paused

    def pause_reading(self, pause: bool) -> None:
        """Stop/restart reading responses (backpressure from the client side)."""
        t = self.transport
        if t is None or not self.alive or pause == self._paused:
            return
        self._paused = pause
        if not self.tunnel:  # a pooled one: the pool counts it (`BackendServer.paused`)
            self.server.paused += 1 if pause else -1
        if pause:
            t.pause_reading()
        else:
            t.resume_reading()

    def _unpause(self) -> None:
        """No longer held back: it is closed (or leaves the pool)."""
        if self._paused:
            self._paused = False
            if not self.tunnel:
                self.server.paused -= 1

    def abort(self) -> None:
        """Drop the connection at once (its state is unknown or unwanted).

        It leaves the pool now; requests still on it fail from `connection_lost`.
        """
        t = self.transport
        if t is not None:
            t.abort()
        if self.alive:
            self.alive = False
            self._unpause()
            self._cork = None
            self.server._on_lost(self)

    @property
    def reusable(self) -> bool:
        """True if another request may be sent on it: open, not a tunnel, and the backend sent
        nothing beyond the responses asked for (bytes after a response to HEAD, say: they are
        never read as the next request's response)."""
        return self.alive and not self.tunnel and not self.framer.broken


class BackendServer:
    """Pool, in-use directory and health of one backend server."""

    def __init__(self, address: str, pool: PoolConfig, timeouts: TimeoutConfig, health: HealthConfig,
                 metrics: "BackendMetrics", *, max_head_bytes: int = 64 * 1024, max_headers: int = 100) -> None:
        self.name = address
        self.host, self.port = split_address(address)
        self.min = pool.min
        self.max = pool.max
        # Connections whose reading is paused because their client reads slowly (backpressure)
        # do not count against `max` for requests of other clients, up to `hard_max` in all.
        self.paused = 0
        self.hard_max = 2 * pool.max
        self.pipeline = pool.pipeline
        self._batch: BackendConnection | None = None
        self.timeouts = timeouts
        self.health_cfg = health
        self.metrics = metrics
        self.max_head_bytes = max_head_bytes
        self.max_headers = max_headers
        self.free: deque[BackendConnection] = deque()
        self.in_use: dict[BackendConnection, deque[ExchangeLike]] = {}
        self.waiters: deque[ExchangeLike] = deque()
        self.fresh_waiters: deque[ExchangeLike] = deque()  # retries: a new connection each
        self.connecting = 0
        self.health = HealthState(rise=health.rise, fall=health.fall)
        self.last_check = ""  # what the last active check found (check_once)
        self.backoff = Backoff(cap=max(1.0, health.interval))
        self.inflight = 0
        self.eject_after = health.eject_after
        self.fail_streak = 0    # requests in a row that failed on live traffic (`exchange_failed`)
        self.ejected = False    # down because of them (`_eject`), until `rise` checks pass
        self._hold_until = 0.0  # after an ejection, checks passing before this do not count
        self._closed = False
        self._refill_handle: asyncio.TimerHandle | None = None
        self._health_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        metrics.bind_pool(lambda: len(self.free), lambda: len(self.in_use), lambda: 1.0 if self.health.up else 0.0,
                          lambda: self.inflight)

    # -- life cycle -----------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Open `min` connections and start health checks."""
        self._loop = loop
        self._fill()
        if self.health_cfg.enabled:
            self._health_task = loop.create_task(self._health_loop())

    async def close(self) -> None:
        """Close every connection and stop health checks."""
        self._closed = True
        if self._refill_handle is not None:
            self._refill_handle.cancel()
        if self._health_task is not None:
            self._health_task.cancel()
        for t in list(self._tasks):
            t.cancel()
        for conn in list(self.free) + list(self.in_use):
            conn.abort()
        self.free.clear()
        for queue in (self.fresh_waiters, self.waiters):
            while queue:
                queue.popleft().on_backend_failure("unavailable", "splicer is shutting down")
        await asyncio.sleep(0)

    @property
    def up(self) -> bool:
        return self.health.up and not self._closed

    @property
    def _probing(self) -> bool:
        """Down with active checks off: connects are the only checks (see `_fill`)."""
        return not self.health.up and not self.health_cfg.enabled

    @property
    def size(self) -> int:
        """Pooled connections open (free + in use), not counting ones being opened."""
        return len(self.free) + len(self.in_use)

    # -- acquire / release ------------------------------------------------------------------
    def acquire(self, ex: ExchangeLike, pipelinable: bool = False, fresh: bool = False) -> BackendConnection | None:
        """A connection for `ex` now, or None (then `ex.on_connection` is called later).

        With `pool.pipeline` > 1 a `pipelinable` request (idempotent, no body, not HEAD) may
        join a connection that already carries pipelined requests: first the one collecting
        this event-loop turn's batch (so the batch leaves in one send), else a free one, else
        the least loaded pipelined one with room that is not paused (a slow client's response
        at its head would hold this one back for as long as that client takes).

        `fresh`: `ex` is a retry after the backend closed a connection under it; it gets a
        connection opened for it (always later), ahead of the other waiters. At `max`, an idle
        connection is closed to make room (the oldest: the likeliest to be stale anyway).
        """
        if fresh:
            self.fresh_waiters.append(ex)
            if len(self.fresh_waiters) > self.connecting and self.size + self.connecting >= self.max and self.free:
                self.free.popleft().abort()  # refills through _on_lost
            self._fill()
            return None
        depth = self.pipeline
        if pipelinable and depth > 1:
            conn = self._batch
            if conn is not None and conn.alive and not conn._paused and len(conn.exchanges) < depth:
                conn.exchanges.append(ex)
                return conn
        free = self.free
        while free:
            conn = free.pop()  # LIFO: the most recently used connection is the least likely stale
            if conn.alive:
                self.in_use[conn] = conn.exchanges
                conn.exchanges.append(ex)
                if pipelinable and depth > 1:
                    conn.pipelined = True
                    self._start_batch(conn)
                return conn
        if pipelinable and depth > 1:
            best = None
            for conn in self.in_use:
                # Never behind a paused one: its response waits for a client that does not read it
                # (backpressure), and this request's clock would not run meanwhile.
                if conn.pipelined and conn.alive and not conn._paused and len(conn.exchanges) < depth and (
                        best is None or len(conn.exchanges) < len(best.exchanges)):
                    best = conn
            if best is not None:
                best.exchanges.append(ex)
                self._start_batch(best)
                return best
        self.waiters.append(ex)
        self._fill()
        return None

    def _start_batch(self, conn: BackendConnection) -> None:
        if self._batch is not None and self._batch is not conn:
            self._end_batch()
        if self._batch is None:
            self._batch = conn
            conn.cork()
            assert self._loop is not None
            self._loop.call_soon(self._end_batch)

    def _end_batch(self) -> None:
        conn = self._batch
        if conn is not None:
            self._batch = None
            conn.uncork()

    def cancel_wait(self, ex: ExchangeLike) -> None:
        """Forget a waiting exchange (timed out, client gone)."""
        for queue in (self.waiters, self.fresh_waiters):
            try:
                queue.remove(ex)
                return
            except ValueError:
                pass

    def release(self, conn: BackendConnection, ex: ExchangeLike, reusable: bool) -> None:
        """`ex` got its complete response on `conn`: keep `conn` for the next request, or drop it."""
        exchanges = conn.exchanges
        if exchanges and exchanges[0] is ex:
            exchanges.popleft()
        else:
            conn.remove(ex)
        if not (reusable and conn.reusable and not self._closed):
            self.in_use.pop(conn, None)
            conn.abort()  # requests still on it fail (and retry) from connection_lost
            self._fill()
            return
        conn.used += 1
        if exchanges:
            return  # pipelined requests are still on it
        conn.pipelined = False
        self._hand_over(conn)

    def _hand_over(self, conn: BackendConnection, new: bool = False) -> None:
        """An idle, healthy connection: to the first waiter, else to the free queue.

        `new`: just opened, so it goes to a retried exchange first. A used connection while a
        retry has no connection coming is closed instead, making room for one under `max`.
        """
        conn.pause_reading(False)
        fresh = self.fresh_waiters
        if new and fresh:
            ex = fresh.popleft()
        elif fresh and len(fresh) > self.connecting and self.size + self.connecting >= self.max:
            self.in_use.pop(conn, None)
            conn.abort()  # _on_lost -> _fill opens the retry's connection
            return
        elif self.waiters:
            total = self.size + self.connecting + (1 if new else 0)  # this connection included
            waiters = self.waiters
            if total <= self.max and not waiters[0].held_back:
                ex = waiters.popleft()
            else:
                # A reading client's request first (`_reader_waiting`), else, within `max`, the
                # first one: a request its slow client holds back.
                ex = self._reader_waiting(total)
                if ex is None:
                    if total > self.max:  # a connection beyond `max` that no reading client needs
                        self.in_use.pop(conn, None)
                        conn.abort()
                        return
                    ex = waiters.popleft()
        elif self._probing:
            # Down with active checks off: no request comes to an idle connection, and keeping
            # it would hold the pool at `min`, so nothing would connect again, the only way back
            # (`rise` connects in a row). Close it; the next probe follows the backoff delay.
            self._schedule_refill()
            conn.abort()
            return
        else:
            self.in_use.pop(conn, None)
            if len(self.free) + len(self.in_use) + self.connecting >= self.max:
                conn.abort()  # opened beyond `max` for a reading client (`_reader_waiting`): not kept idle
                return
            conn.idled = True
            self.free.append(conn)
            return
        self.in_use[conn] = conn.exchanges
        conn.exchanges.append(ex)
        ex.on_connection(conn)

    def _reader_waiting(self, total: int) -> ExchangeLike | None:
        """The first waiter that may have a connection making `total` beyond `max`: one whose
        client reads its answers (not `held_back`), while fewer than `total - max` connections are
        paused because their clients read slowly, and `total` stays within `hard_max`. So a
        client that stops reading holds at most the connections its requests have (about `max`
        of them, all paused), and requests of other clients still get connections."""
        if total > self.max + self.paused or total > self.hard_max:
            return None
        waiters = self.waiters
        for i, ex in enumerate(waiters):
            if not ex.held_back:
                del waiters[i]
                return ex
        return None

    def detach(self, conn: BackendConnection) -> None:
        """Take `conn` out of the pool for good (it became a tunnel); the pool refills."""
        if conn._paused:
            conn._paused = False
            self.paused -= 1
            conn.transport.resume_reading()  # type: ignore[union-attr]
        self.in_use.pop(conn, None)
        self._fill()

    def _on_lost(self, conn: BackendConnection) -> None:
        if self._batch is conn:
            self._batch = None
        if self.in_use.pop(conn, None) is None:
            try:
                self.free.remove(conn)
            except ValueError:
                pass
        if not self._closed:
            self._fill()

    # -- connecting -----------------------------------------------------------------------
    def _fill(self) -> None:
        """Open connections up to `min`, and more (up to `max`) while exchanges wait."""
        if self._closed or self._loop is None:
            return
        total = len(self.free) + len(self.in_use) + self.connecting
        want = max(self.min - total, len(self.waiters) + len(self.fresh_waiters) - self.connecting)
        room = self.max - total
        if want > room and self.paused and self.waiters:
            # Connections held back by slow-reading clients do not count against `max` for the
            # requests of clients that read (`_reader_waiting`), up to `hard_max`.
            over = min(self.max + self.paused, self.hard_max) - total
            if over > room:
                readers = sum(1 for ex in self.waiters if not ex.held_back) - self.connecting
                room = max(room, min(over, readers))
        want = min(want, room)
        if self._probing:
            # Connects are the only checks: probe, whatever `min`, paced by the backoff.
            if self._refill_handle is not None or total >= self.max:
                return
            want = 1
        if want <= 0:
            return
        if not self.health.up and self.connecting:
            return  # a down server gets one probe at a time
        for _ in range(want if self.health.up else 1):
            self.connecting += 1
            task = self._loop.create_task(self._connect())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _connect(self) -> None:
        loop = self._loop
        assert loop is not None
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: BackendConnection(self), self.host, self.port),
                self.timeouts.connect)
        except (OSError, asyncio.TimeoutError) as exc:
            self.connecting -= 1
            self.metrics.error("connect")
            self.health.record(False)
            self._connect_failed(f"cannot connect to backend {self.name}: {getattr(exc, 'strerror', None) or exc or 'timeout'}")
            return
        except asyncio.CancelledError:
            self.connecting -= 1
            raise
        self.connecting -= 1
        self.backoff.reset()
        # A successful connect counts as a passing check, so a server comes back into rotation
        # by passive results alone (active checks may be off), unless the active check is an
        # HTTP one: a server that accepts TCP but fails `health.path` must stay out. Nor does it
        # count for a server ejected for failing requests (it accepted TCP all along), except as
        # the probe that, with active checks off, is the only way back (`_eject`).
        cfg = self.health_cfg
        if self.ejected:
            counts = not cfg.enabled and loop.time() >= self._hold_until
        else:
            counts = not (cfg.enabled and cfg.path)
        if counts and self.health.record(True):
            self.ejected = False
        if self._closed:
            conn.abort()
            return
        sock = conn.transport.get_extra_info("socket") if conn.transport else None
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self._hand_over(conn, new=True)
        self._fill()  # keep going up to `min` (one probe at a time while the server is down)

    def _connect_failed(self, message: str) -> None:
        # A retry waits for a connection of its own: with none coming, it fails now (502).
        while len(self.fresh_waiters) > self.connecting:
            self.fresh_waiters.popleft().on_backend_failure("connect", message)
        # With no connection left to wait for, the waiters fail now (502, or retried elsewhere).
        if self.size == 0 and self.connecting == 0:
            waiters, self.waiters = self.waiters, deque()
            for ex in waiters:
                ex.on_backend_failure("connect", message)
        self._schedule_refill()

    def _schedule_refill(self, delay: float | None = None) -> None:
        """`_fill` again after `delay`, by default the backoff delay (while an ejected server is
        probed, at least `health.interval`: a probe stands for an active check)."""
        if self._closed or self._loop is None or self._refill_handle is not None:
            return
        if delay is None:
            delay = self.backoff.next_delay()
            if self.ejected and self._probing:
                delay = max(delay, self.health_cfg.interval)

        def refill() -> None:
            self._refill_handle = None
            self._fill()
        self._refill_handle = self._loop.call_later(delay, refill)

    def _drop_idle(self) -> None:
        """Leaving rotation: idle connections to a failing server are likely bad too."""
        while self.free:
            self.free.pop().abort()

    # -- passive health (live traffic) ----------------------------------------------------
    def exchange_ok(self, conn: BackendConnection) -> None:
        """A request got its complete response on `conn`, whatever its status: the server is
        alive and speaks HTTP."""
        conn.answered = True
        self.fail_streak = 0

    def exchange_failed(self, conn: BackendConnection, kind: str) -> None:
        """A request failed on `conn` by the server's doing: the connection closed or reset
        before its complete response, a bad response, or the request timeout (not a client
        that went away, not a failed connect: `fall` counts those). The requests one broken
        connection fails (pipelined ones, or a timeout and the close it causes) count once.
        After `eject_after` in a row, the server leaves rotation (`_eject`).

        Not counted either: a close ("reset") on a connection that has carried a complete
        response. That is a keep-alive connection ending (nginx's `keepalive_requests`, an
        idle timeout) across a request sent on it, which is retried: a backend whose
        connections all reach their limit together fails several requests in a row so, and is
        healthy. A server that fails every request never answers on a connection."""
        if conn.failed or self._closed or not self.health.up or (kind == "reset" and conn.answered):
            return
        conn.failed = True
        self.fail_streak += 1
        if self.eject_after and self.fail_streak >= self.eject_after:
            self._eject()

    def _eject(self) -> None:
        """Take the server out of rotation after `eject_after` failed requests in a row, as
        `fall` failed checks would (`HealthState`: the `up` gauge, `BackendGroup.pick` and the
        way back are theirs). It comes back after `rise` passing checks, none counted before
        `health.interval` has passed, so a server that fails every request while it accepts
        TCP (and passes a TCP check) cycles no faster than that. With active checks off, the
        checks are probe connects `health.interval` apart (`_probing`, `_schedule_refill`)."""
        count = self.fail_streak
        self.fail_streak = 0
        self.ejected = True
        self.health.mark_down()
        loop = self._loop
        assert loop is not None
        cfg = self.health_cfg
        self._hold_until = loop.time() + cfg.interval
        if not cfg.enabled:
            # The first probe after the hold (set before the connections below are closed:
            # their loss refills the pool, which while probing waits for this timer).
            if self._refill_handle is not None:
                self._refill_handle.cancel()
                self._refill_handle = None
            self._schedule_refill(cfg.interval)
        self._drop_idle()
        back = (f"{cfg.rise} passing check(s), from {cfg.interval:g} s on" if cfg.enabled else
                f"{cfg.rise} successful probe connect(s) {cfg.interval:g} s apart")
        say(f"splice http: backend {self.name} is down: its last {count} requests failed "
            f"(health.eject_after); back after {back}")

    # -- health ---------------------------------------------------------------------------
    async def _health_loop(self) -> None:
        cfg = self.health_cfg
        while not self._closed:
            await asyncio.sleep(cfg.interval)
            ok = await self.check_once()
            if ok and self.ejected and self._loop is not None and self._loop.time() < self._hold_until:
                continue  # ejected by live traffic a moment ago: a pass counts after the hold
            changed = self.health.record(ok)
            if changed is False:
                self._drop_idle()
                # Said, as HAProxy logs "Server ... is DOWN, reason: ...": a check that can never
                # pass (a wrong path, a status the backend gives) must not fail in silence.
                say(f"splice http: backend {self.name} is down: {cfg.fall} health checks in a row failed, "
                    f"the last: {self.last_check}")
            elif changed is True:
                self.ejected = False
                self.backoff.reset()
                self._fill()
                say(f"splice http: backend {self.name} is up: {cfg.rise} health checks in a row passed")

    async def check_once(self) -> bool:
        """One active check: TCP connect, or GET `health.path` wanting a 2xx/3xx status. What
        it found is kept in `last_check`."""
        cfg = self.health_cfg
        writer = None
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), cfg.timeout)
            self.last_check = "connected"
            if cfg.path is None:
                return True
            writer.write(b"GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\nUser-Agent: shmfabric-splicer-health\r\n\r\n"
                         % (cfg.path.encode(), self.host.encode()))
            line = await asyncio.wait_for(reader.readline(), cfg.timeout)
            parts = line.split()
            self.last_check = (f"GET {cfg.path} answered {line.strip().decode('latin-1')[:60]!r}" if line
                               else f"GET {cfg.path}: connection closed without an answer")
            return len(parts) >= 2 and parts[0].startswith(b"HTTP/1.") and parts[1][:1] in (b"2", b"3")
        except asyncio.TimeoutError:
            self.last_check = f"no answer within health.timeout ({cfg.timeout:g} s)"
            return False
        except (OSError, ValueError) as exc:
            self.last_check = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            return False
        finally:
            if writer is not None:
                writer.close()


class BackendGroup:
    """The servers one route sends to.

    A request goes to the up server with the fewest requests in flight for its weight; among
    servers equally loaded for their weights, smooth weighted round-robin decides (nginx's
    `least_conn`: so with fast backends, which are mostly idle when a request comes, requests
    still split in the ratio of the weights). Backup servers take requests only while no other
    server of the group is up (nginx's and HAProxy's `backup`).
    """

    def __init__(self, name: str, servers: list[BackendServer], weights: list[int] | None = None,
                 backup: list[bool] | None = None) -> None:
        self.name = name
        self.servers = servers
        weights = weights or [1] * len(servers)
        backup = backup or [False] * len(servers)
        # [server, weight, current weight of the smooth round-robin]
        self.primary = [[s, w, 0] for s, w, b in zip(servers, weights, backup) if not b]
        self.backup = [[s, w, 0] for s, w, b in zip(servers, weights, backup) if b]
        if not self.primary:  # every server is a backup: they are simply the servers
            self.primary, self.backup = self.backup, []
        self._single = self.primary[0][0] if len(self.primary) == 1 and not self.backup else None

    def pick(self, exclude: tuple = ()) -> BackendServer | None:
        """An up server (see the class docstring), or None if every server is down. `exclude`
        (the servers a request failed on) are taken only when no other is up: the last one."""
        single = self._single
        if single is not None:
            return single if single.up else None
        best = _least(self.primary, exclude)
        if best is None and self.backup:
            best = _least(self.backup, exclude)
        if best is None and exclude and exclude[-1].up:
            return exclude[-1]
        return best


def _least(members: list[list], exclude: tuple) -> BackendServer | None:
    """Weighted least-connections over `members` ([server, weight, current]), ties broken by
    smooth weighted round-robin (nginx's ngx_http_upstream_get_least_conn_peer)."""
    best_load, best_weight = 1, 0  # the lowest load/weight so far, compared by cross-multiplying
    tied = 0
    for m in members:
        s = m[0]
        if not s.up or s in exclude:
            continue
        load, w = s.inflight, m[1]
        if tied == 0 or load * best_weight < best_load * w:
            best_load, best_weight, tied = load, w, 1
        elif load * best_weight == best_load * w:
            tied += 1
    if tied == 0:
        return None
    total = 0
    chosen = None
    for m in members:
        s = m[0]
        if not s.up or s in exclude or s.inflight * best_weight != best_load * m[1]:
            continue
        m[2] += m[1]
        total += m[1]
        if chosen is None or m[2] > chosen[2]:
            chosen = m
    chosen[2] -= total  # type: ignore[index]
    return chosen[0]  # type: ignore[index]
