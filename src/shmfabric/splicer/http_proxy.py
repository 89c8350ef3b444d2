"""The asyncio shell of the HTTP splicer: one `ClientConnection` per client, one `Exchange` per request.

A client connection reads ahead: every request it parses gets a slot in an `OrderedMerge` and an
`Exchange`. Safe requests (GET, HEAD, OPTIONS, TRACE) start at once, each on its own
pooled backend connection, so a pipeline of 16 requests to two backends runs 16 at a time.
Any other method is a *barrier*: it starts when every earlier request of this client is
answered, and nothing after it starts until it is answered (so a POST never overtakes, or is
overtaken by, the requests around it). Responses are written strictly in request order; the
head response streams, later ones are held in their slots.

Failures stay in place: a backend that fails before its response began yields a 502 (504 on
timeout) in that request's slot and the pipeline goes on; a connect failure, or an idempotent
request (the safe ones, PUT, DELETE) that sent no body byte, on a connection the backend closed
(or broke) before this request's response began, when the connection had been used before or
the request was pipelined behind another, is retried once, the latter on a new connection
(`Exchange.on_backend_failure`). If a response already started streaming when its backend
fails, the only honest thing left is to close the client connection after the bytes sent so
far; no request after it is sent to a backend any more (`ClientConnection.abort_after`).

Backpressure: reading from the client stops while the merge holds `max_pipeline` requests or
`max_buffer_bytes` bytes (or request-body bytes waiting for a backend pass that bound, or the
client's socket buffer is full); backend connections serving non-head requests stop being read
while the held response bytes pass the bound. Requests such a client has waiting for a pooled
connection are `held_back`: the time does not count against `timeouts.queue`, and the pool
serves other clients' requests first (see http_pool.py). A client that takes none of its
answers for `timeouts.client_idle` is disconnected (`HttpSplicer._sweep_idle`).

Upgrade requests (WebSocket and the like) are barriers too; a 101 from the backend turns the
client connection and that backend connection into a raw tunnel (the backend connection leaves
its pool). CONNECT is refused with 405: this is a reverse proxy, not a forward proxy.
"""
from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Any

from .http_framer import (
    BODY_CHUNKED, BODY_NONE, BODY_UNTIL_CLOSE, IDEMPOTENT_METHODS, NEED_DATA, PAUSED, SAFE_METHODS,
    ConnectionClosed, Data, EndOfMessage, InformationalResponse, RemoteProtocolError, Request, RequestFramer,
    Response, encode_chunk, encode_last_chunk, encode_request_head, encode_response_head, simple_response,
)
from .access_log import AccessLog
from .ordered import OrderedMerge
from .teardown import _unsent as _kernel_unsent, close_lingering

if TYPE_CHECKING:
    from .http_pool import BackendConnection, BackendGroup, BackendServer
    from .http_server import HttpSplicer

__all__ = ["ClientConnection", "Exchange"]

#: During a graceful stop, an idle keep-alive connection stays open this long for one more request
#: (answered with `Connection: close`), so a client sending on it as the stop begins is answered.
DRAIN_IDLE_GRACE = 1.0

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


# Positions in a held access-log line (ClientConnection._log_line), AccessLog.record's order.
_STATUS, _SENT, _ERROR, _HELD = 4, 5, 12, 13


class Exchange:
    """One client request and its response, from read to written."""

    __slots__ = ("client", "seq", "req", "group", "server", "conn", "barrier", "started", "finished", "gone",
                 "req_done", "body", "body_held", "t0", "resp_started", "client_framing", "attempts",
                 "reused", "body_sent", "tunnel", "head_request", "backend_keep", "pipelinable", "behind",
                 "last_rx", "clock", "interim", "t_in", "status", "sent", "tried", "queued", "qclock", "qheld")

    def __init__(self, client: "ClientConnection", seq: int, req: Request, group: "BackendGroup | None") -> None:
        self.client = client
        self.seq = seq
        self.req = req
        self.group = group
        self.server: BackendServer | None = None
        self.conn: BackendConnection | None = None
        self.barrier = req.upgrade or req.method not in SAFE_METHODS
        self.started = False
        self.finished = False
        self.gone = False          # the client went away: drain and discard the response
        self.req_done = req.framing == BODY_NONE
        # Encoded request-body bytes waiting for a connection, in one buffer: held bytes cost
        # about what they count against max_buffer_bytes, however small the client's chunks.
        self.body = bytearray()
        self.body_held = 0
        self.t0 = 0.0
        self.resp_started = False
        self.client_framing = BODY_NONE
        self.attempts = 0
        self.reused = False
        self.body_sent = False     # some request-body bytes went to a backend (no retry then)
        self.tunnel = False
        self.head_request = req.method == b"HEAD"
        self.backend_keep = True
        self.behind = False  # pipelined behind another request on its backend connection
        self.last_rx = 0.0   # when the backend last sent part of this response (see the timeout sweep)
        self.clock = 0.0     # when the request timeout's clock (re)started (0: not yet on a connection)
        self.queued = False  # waiting in a pool's queue for a connection (see `on_queue_timeout`)
        self.qclock = 0.0    # when the queue wait's clock (re)started
        self.qheld = 0.0     # of the wait since then, the time its own client held it back (not counted)
        self.interim = False  # a 1xx came: the backend acted on the request (no retry)
        self.t_in = client.last_seen  # when the read that completed the request head came (access log)
        self.status = 0
        self.sent = 0  # answer bytes given to the client (access log)
        self.tried: tuple = ()  # servers this request failed on, not to be picked again
        # may share a pooled connection with other pipelined requests (pool.pipeline > 1)
        self.pipelinable = (req.framing == BODY_NONE and not req.upgrade and req.method != b"HEAD"
                            and req.method in SAFE_METHODS)

    # -- request side (called by the client connection) -----------------------------------
    def add_body(self, data: bytes) -> None:
        if self.finished:
            return
        conn = self.conn
        if conn is not None:
            conn.write(encode_chunk(data) if self.req.framing == BODY_CHUNKED else data)
            self.body_sent = True
        else:
            body = self.body
            n = len(body)
            if self.req.framing == BODY_CHUNKED:
                body += b"%x\r\n" % len(data)
                body += data
                body += b"\r\n"
            else:
                body += data
            n = len(body) - n
            self.body_held += n
            self.client.body_held += n

    def end_body(self, trailers: tuple[tuple[bytes, bytes], ...]) -> None:
        if self.req.framing == BODY_CHUNKED and not self.finished:
            enc = encode_last_chunk(trailers)
            if self.conn is not None:
                self.conn.write(enc)
            else:
                self.body += enc
        self.req_done = True

    def start(self) -> None:
        """Dispatch (called by the client's scheduler when ordering allows)."""
        self.started = True
        client = self.client
        client.inflight += 1
        self.t0 = client.loop.time()
        self._dispatch()

    def _dispatch(self, exclude: tuple = (), fresh: bool = False) -> None:
        group = self.group
        server = group.pick(exclude) if group is not None else None
        if server is None:
            self._fail_local(503, "no backend server is up for this route")
            return
        self.server = server
        server.inflight += 1
        server.metrics.requests.inc()
        conn = server.acquire(self, self.pipelinable, fresh)
        if conn is not None:
            self.on_connection(conn)
        elif not fresh:
            # In the pool's queue: the queue wait has its own clock (`timeouts.queue`, 503), and
            # the request timeout starts once a connection carries the request.
            self.queued = True
            self.qclock = now = self.client.loop.time()
            self.qheld = 0.0
            self.client.splicer.queue_deadlines.append((now, self))

    # -- pool side ------------------------------------------------------------------------
    def on_connection(self, conn: "BackendConnection") -> None:
        if self.finished or self.gone:
            self.server.release(conn, self, True)  # type: ignore[union-attr]
            return
        if self.client.ends_before(self.seq):
            # It waited for a connection while an earlier answer came that ends the client
            # connection (cut off, or delimited by the close): it is never answered, so never
            # sent. It waits, unsent, for the close (which abandons it and logs it unsent).
            self.queued = False
            self.server.release(conn, self, True)  # type: ignore[union-attr]
            return
        self.conn = conn
        if self.queued or self.clock == 0.0:
            # Timeouts: the splicer sweeps a queue of (clock, exchange) in clock order, instead
            # of one event-loop timer per request; a retry on a new connection keeps its clock.
            self.queued = False
            self.clock = now = self.client.loop.time()
            self.client.splicer.deadlines.append((now, self))
        self.reused = conn.used > 0 or conn.idled
        self.behind = len(conn.exchanges) > 1
        conn.framer.expect(self.req.method)
        head = encode_request_head(self.req, keep_upgrade=self.req.upgrade, extra=self.client.forward_lines,
                                   default_host=self.server.name.encode())  # type: ignore[union-attr]
        if self.body:
            conn.transport.writelines([head, self.body])  # type: ignore[union-attr]
            self.client.body_held -= self.body_held
            self.body_held = 0
            self.body = bytearray()
            self.body_sent = True
            self.client.check_resume()
        else:
            conn.write(head)

    def on_response_event(self, ev: object) -> None:
        self.last_rx = self.client.loop.time()
        t = type(ev)
        if t is Data:
            if self.gone:
                return
            data = ev.data  # type: ignore[attr-defined]
            if self.client_framing == BODY_CHUNKED:
                data = encode_chunk(data)
            self.sent += len(data)
            self.client.emit(self.seq, data)
        elif t is Response:
            self._on_head(ev)  # type: ignore[arg-type]
        elif t is EndOfMessage:
            tail = b""
            if self.client_framing == BODY_CHUNKED:
                tail = encode_last_chunk(ev.trailers)  # type: ignore[attr-defined]
            self._complete(tail)
        elif t is InformationalResponse:
            self._on_informational(ev)  # type: ignore[arg-type]

    def _on_head(self, resp: Response) -> None:
        self.resp_started = True
        self.status = resp.status
        self.backend_keep = resp.keep_alive
        if self.gone:
            return
        req = self.req
        client = self.client
        framing = resp.framing
        if resp.transfer_codings and framing != BODY_NONE and req.http_version != b"1.1":
            # A body still in a transfer coding (`Transfer-Encoding: gzip, chunked`) cannot go
            # to an HTTP/1.0 client: it has no Transfer-Encoding (a server MUST NOT send one to
            # it, RFC 9112 section 6.1), so every transfer coding must come off. Naming them in
            # Content-Encoding instead would change the representation (end-to-end, cached and
            # validated as such), and the splicer does not decode bodies: 502, as for any
            # response it cannot relay. The rest of the response is read and dropped (as for a
            # client gone), so the backend connection stays usable.
            client.local_answer(self, 502, f"backend sent the body in transfer coding "
                                           f"{resp.transfer_codings.decode('latin-1')[:60]!r}, which "
                                           "cannot be relayed to an HTTP/1.0 client")
            self.gone = True
            return
        if framing == BODY_CHUNKED or framing == BODY_UNTIL_CLOSE:
            # Chunked to HTTP/1.1 clients, so a read-until-close backend body does not cost the
            # client its connection; HTTP/1.0 clients get the body delimited by close.
            framing = BODY_CHUNKED if req.http_version == b"1.1" else BODY_UNTIL_CLOSE
        self.client_framing = framing
        close = client.close_after(self) or framing == BODY_UNTIL_CLOSE
        if framing == BODY_UNTIL_CLOSE:
            # The body ends where the connection does (an HTTP/1.0 client, no length known):
            # close after it, and nothing of later requests may follow it.
            client.abort_after(self.seq)
        head = encode_response_head(resp, framing=framing, content_length=resp.content_length, close=close,
                                    head_request=self.head_request,
                                    keep_alive_10=req.http_version == b"1.0" and not close)
        if not close:
            head_request = self.head_request
            client.last_head = (self.seq, head, lambda: encode_response_head(
                resp, framing=framing, content_length=resp.content_length, close=True, head_request=head_request))
        self.sent += len(head)
        client.emit(self.seq, head)

    def _on_informational(self, ev: InformationalResponse) -> None:
        # The response has begun: a retry would send the request again and the client (which may
        # have this 1xx already) would get the retry's 1xx too. Unlike `resp_started`, the final
        # answer can still be a 502 in place.
        self.interim = True
        if ev.status == 101:
            if self.req.upgrade and not self.gone:
                self._switch_to_tunnel(ev)
            else:
                self.on_backend_failure("protocol", "backend sent 101 Switching Protocols to a request without Upgrade")
            return
        if self.gone or self.req.http_version == b"1.0":
            return  # HTTP/1.0 clients do not understand 1xx (RFC 9110 section 15.2)
        if ev.status == 100:
            if self.req.expect_continue:
                self.sent += len(_CONTINUE)
                self.client.emit(self.seq, _CONTINUE)
            return
        head = encode_response_head(ev, framing=BODY_NONE)
        self.sent += len(head)
        self.client.emit(self.seq, head)

    def _complete(self, tail: bytes) -> None:
        if self.finished:
            return
        self.finished = True
        conn, server = self.conn, self.server
        self.conn = None
        assert server is not None and conn is not None
        server.inflight -= 1
        server.metrics.duration.observe(self.client.loop.time() - self.t0)
        server.exchange_ok(conn)  # passive health: a complete response, whatever its status
        # A connection whose request body was not fully sent cannot carry another request.
        server.release(conn, self, self.backend_keep and self.req_done)
        client = self.client
        if not self.gone:
            client.finish(self.seq, tail)
            self.sent += len(tail)
            if client.log is not None:
                client.log_exchange(self, self.status, self.sent)
        client.exchange_done(self)

    def on_backend_failure(self, kind: str, message: str) -> None:
        """The backend connection failed (connect, reset, protocol, timeout) for this request."""
        if self.finished:
            return
        self.queued = False
        conn, server = self.conn, self.server
        self.conn = None
        # A request behind an answer that ends the client connection is never answered (it is
        # logged unsent when the connection closes): no failure of its own to count or answer.
        unanswered = self.gone or self.client.ends_before(self.seq)
        if conn is not None:
            if server is not None and not unanswered and (kind != "timeout" or self.req_done):
                # Passive health: the backend failed a request it had (retried or not). Not
                # counted: a client that went away, nor a timeout while the client's own
                # request body was still coming.
                server.exchange_failed(conn, kind)
            conn.remove(self)
            conn.abort()
        if server is not None:
            server.inflight -= 1
        if (not self.resp_started and not self.interim and not unanswered and kind != "timeout" and kind != "truncated"
                and not self.body_sent
                and ((kind == "connect" and self.attempts < max(1, len(self.group.servers) - 1))  # type: ignore[union-attr]
                     or (self.attempts < 1 and (self.reused or self.behind)
                         and self.req.method in IDEMPOTENT_METHODS))):
            # Safe to retry: nothing reached a backend (connect), or an idempotent request
            # (RFC 9110 section 9.2.2: GET, HEAD, OPTIONS, TRACE, PUT, DELETE) that sent no body
            # byte met a pooled connection the backend had just closed, or was pipelined behind
            # the response after which the backend closed or broke the connection (nginx's
            # keepalive_requests), and no byte of its own response that parses as one came (a
            # response cut off in its head or malformed after its status line, "truncated", or
            # after a 1xx, had begun: the backend acted on it). Bytes that are not the start of
            # a response at all (left over from an earlier one) do not count: "protocol". Never
            # a request the client connection ends before (`ends_before`): no answer to it
            # would be written.
            # The latter go to a new connection, alone: any pooled one may be closing as well
            # (the close crosses the hand-over), and a new connection is never closed by a
            # keep-alive limit before its first response, so one retry is enough. A request
            # that was first on a new connection is not retried: it may be what brings
            # backends down. A refused connection is tried on each other server of the route in
            # turn, backups included (nginx's proxy_next_upstream error): nothing was sent.
            self.attempts += 1
            if server is not None:
                self.tried += (server,)
            fresh = kind != "connect"
            if fresh:
                self.pipelinable = False
            self._dispatch(self.tried, fresh)
            return
        self.finished = True
        client = self.client
        if not unanswered:
            if server is not None:
                server.metrics.failed_requests(kind)  # answered 502/504, or cut off mid-response
            if not self.resp_started:
                client.local_answer(self, 504 if kind == "timeout" else 502, message)
            else:
                if self.client_framing == BODY_UNTIL_CLOSE:
                    # Only the end of the connection delimits this body (an HTTP/1.0 client): a
                    # clean end would pass the cut answer on as complete. Withholding the last
                    # chunk is the signal to an HTTP/1.1 client; this one gets a reset.
                    client.cut_off = True
                client.abort_after(self.seq)
                client.finish(self.seq, b"")
                if client.log is not None:
                    client.log_exchange(self, self.status, self.sent, f"response cut off: {message}")
        client.exchange_done(self)

    def _fail_local(self, status: int, message: str) -> None:
        self.finished = True
        if not self.gone:
            self.client.local_answer(self, status, message)
        self.client.exchange_done(self)

    def on_timeout(self) -> None:
        """Called by the splicer's sweep when the request timeout has passed."""
        if self.finished:
            return
        server = self.server
        if server is not None:
            server.metrics.error("timeout")
            if self.conn is None:
                server.cancel_wait(self)
        self.on_backend_failure("timeout", f"backend {server.name if server else '?'} did not answer within "
                                           f"{self.client.request_timeout:g} s")

    def on_queue_timeout(self, seconds: float) -> None:
        """Called by the splicer's sweep when the request waited `seconds` in its pool's queue
        (its client reading all the while): 503, the request never reached the backend."""
        if self.finished or not self.queued:
            return
        self.queued = False
        self.finished = True
        server = self.server
        assert server is not None
        server.cancel_wait(self)
        server.inflight -= 1
        server.metrics.error("queue", 0 if self.gone else 1)
        if not self.gone:
            self.client.local_answer(self, 503, f"no connection to backend {server.name} came free within {seconds:g} s "
                                                f"(timeouts.queue; its pool.max of {server.max} were busy); the "
                                                "request was not sent")
        self.client.exchange_done(self)

    @property
    def held_back(self) -> bool:
        """Its client reads its answers slowly (the splicer holds its backends back) and has not
        reached this one: time it waits for a connection is the client's, and it gets none
        beyond `pool.max` (see `BackendServer._reader_waiting`)."""
        c = self.client
        return (c.write_paused or c.backends_paused) and self.seq != c.merge.head

    def abandon(self) -> None:
        """The client is gone: stop waiting; an in-flight response is read to its end and dropped
        so the pooled connection can be reused (the request timeout still bounds it)."""
        self.gone = True
        if self.finished or not self.started:
            return
        if self.conn is None:
            self.queued = False
            if self.server is not None:
                self.server.cancel_wait(self)
            self.finished = True
            if self.server is not None:
                self.server.inflight -= 1
            self.client.exchange_done(self)
        elif self.tunnel:
            self.conn.abort()
        else:
            self.conn.pause_reading(False)
            if not self.req_done:
                # The request body will never be complete: the connection is unusable.
                self.on_backend_failure("reset", "client closed during the request body")

    # -- tunnel (after 101) -----------------------------------------------------------------
    def _switch_to_tunnel(self, ev: InformationalResponse) -> None:
        conn, server = self.conn, self.server
        assert conn is not None and server is not None
        self.tunnel = True
        self.finished = True
        conn.tunnel = True
        server.inflight -= 1
        server.detach(conn)
        head = encode_response_head(ev, framing=BODY_NONE, keep_upgrade=True)
        self.status = 101
        if self.client.log is not None:
            self.client.log_exchange(self, 101, len(head), "")
        self.client.start_tunnel(self, conn, head + conn.framer.take_raw())

    def on_tunnel_data(self, data: bytes) -> None:
        self.client.tunnel_from_backend(data)

    def on_backend_pause_writing(self, paused: bool) -> None:
        self.client.backend_write_paused(paused)


class ClientConnection(asyncio.Protocol):
    """One client connection: read ahead, dispatch, merge in order, write back."""

    def __init__(self, splicer: "HttpSplicer") -> None:
        self.splicer = splicer
        splicer.accepting.add(self)
        cfg = splicer.cfg
        lim = cfg.limits
        self.loop = splicer.loop
        self.request_timeout = cfg.timeouts.request
        self.max_bytes = lim.max_buffer_bytes
        self.framer = RequestFramer(lim.max_head_bytes, lim.max_headers, lim.max_url_bytes)
        self.merge = OrderedMerge(lim.max_pipeline, lim.max_buffer_bytes)
        self.router = splicer.router
        self.transport: asyncio.Transport | None = None
        self.exchanges: dict[int, Exchange] = {}
        self.queue: deque[Exchange] = deque()
        self.inflight = 0
        self.barrier_active = False
        self.current: Exchange | None = None
        self.body_held = 0
        self.last_seen = 0.0
        self.head_since: float | None = None  # when the request head being read began
        self.read_paused = False
        self.write_paused = False
        # While writing is paused: when the client last took some of its answers, and the bytes
        # it had not taken then (HttpSplicer._sweep_idle, `took_some`).
        self.write_paused_at = 0.0
        self.write_buffered = 0
        self.backends_paused = False
        self.stop_reading = False     # a Connection: close request or an error ended the input
        self.close_seq: int | None = None  # close once every slot up to this one is written
        self.peer_eof = False
        self.closed = False
        self.draining = False         # graceful stop: answer what was read, then close
        # The newest answer head encoded without close: (seq, the chunk, how to make it with
        # close), for a drain to rewrite while it is still held (`drain`).
        self.last_head: tuple[int, bytes, Any] | None = None
        self.tunnel_conn: BackendConnection | None = None
        self.upgrade_ex: Exchange | None = None
        self._flush_scheduled = False
        self._scheduling = False
        self._reschedule = False
        self._processing = False
        self._transport_paused = False
        self._reparse = False  # the framer was resumed and _process is scheduled to parse on
        self.log: AccessLog | None = splicer.access_log
        self.log_wait: dict[int, list] = {}  # access-log lines by seq, until the answer is released
        self.ending = ""  # why the splicer itself cut the connection (logged with 444)
        self.peer = "-"  # the client's address, for the access log
        self.forward_lines = b""  # X-Forwarded-For / Forwarded lines added to each request
        self.plain = splicer.cfg.tls is None  # not TLS: a half-closed client can still be answered
        self.cut_off = False  # the last answer broke off and only the close delimits it: end with a reset

    # -- asyncio callbacks ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.last_seen = self.loop.time()
        if self.log is not None or self.splicer.forwarding:
            peer = transport.get_extra_info("peername")
            if peer:
                self.peer = f"[{peer[0]}]:{peer[1]}" if ":" in peer[0] else f"{peer[0]}:{peer[1]}"
                self.forward_lines = self.splicer.forward_lines(peer[0])
        self.splicer.clients.add(self)
        self.splicer.accepting.made(self)
        self.splicer.metrics.client_connections.inc()
        if self.splicer.draining:  # accepted just before the listener closed
            self.drain()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return  # lingering after the last answer (teardown.close_lingering): dropped
        self.last_seen = self.loop.time()
        if self.tunnel_conn is not None:
            self.tunnel_conn.write(data)
            return
        if self.stop_reading:
            return
        self.framer.receive_data(data)
        if self.framer.in_head:
            if self.head_since is None:
                self.head_since = self.last_seen  # see HttpSplicer._sweep_idle
        else:
            self.head_since = None
        self._process()

    def eof_received(self) -> bool:
        if self.closed:
            return False  # the client closed its side after our last answer: close for good
        if self.tunnel_conn is not None:
            # pass the half-close through the tunnel; the backend's answer may still come
            conn = self.tunnel_conn
            t = conn.transport
            if conn.alive and t is not None and not t.is_closing() and t.can_write_eof():
                t.write_eof()
            return self.plain
        self.peer_eof = True
        if not self.stop_reading:
            self.framer.receive_data(b"")
            self._process()
        self._maybe_close()
        # Keep our sending side open for the answers still owed. Not possible under TLS: asyncio
        # ends a TLS connection once the client's side is closed (what is still owed is lost, as
        # with any TLS server that does not support half-close; HTTP clients do not half-close).
        return self.plain

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.splicer.clients.discard(self)
        self.splicer.metrics.client_connections.dec()
        if self.log is not None:
            self._log_unsent()
        for ex in list(self.exchanges.values()):
            ex.abandon()
        self.exchanges.clear()
        self.queue.clear()
        if self.tunnel_conn is not None:
            self.tunnel_conn.abort()
            self.tunnel_conn = None

    def pause_writing(self) -> None:
        self.write_paused = True
        self.write_paused_at = self.loop.time()
        self.write_buffered = self.unsent()
        self._pause_reading()
        self._backend_flow()
        if self.tunnel_conn is not None:
            self.tunnel_conn.pause_reading(True)

    def unsent(self) -> int:
        """Answer bytes not yet taken by the client: in our write buffer and in the kernel's
        send queue (which takes from ours only when a third of it is free: with a large send
        buffer, a slow reader leaves ours unchanged for many seconds)."""
        t = self.transport
        return t.get_write_buffer_size() + _kernel_unsent(t)  # type: ignore[union-attr]

    def took_some(self) -> bool:
        """While writing is paused: True if the client took some of its answers since the last
        look (the bytes it has not taken, `unsent`, are fewer), which restarts its
        `timeouts.client_idle` clock. A client that reads steadily but slowly is paused most of
        the time (asyncio resumes writing only below the low-water mark), and is not idle:
        nginx's `send_timeout` runs between two successive writes too."""
        size = self.unsent()
        took = size < self.write_buffered
        self.write_buffered = size
        if took:
            self.write_paused_at = self.loop.time()
        return took

    def resume_writing(self) -> None:
        self.write_paused = False
        self.last_seen = self.loop.time()
        self._backend_flow()
        if self.tunnel_conn is not None:
            self.tunnel_conn.pause_reading(False)
        self.check_resume()

    # -- reading requests -----------------------------------------------------------------
    def _process(self) -> None:
        self._reparse = False
        if self._processing:
            return
        self._processing = True
        try:
            self._process_events()
        finally:
            self._processing = False
        self._schedule()
        self._maybe_close()

    def _process_events(self) -> None:
        # Events stay queued in the framer while the merge is full: reading ahead stops at the
        # bound (the framer holds at most one socket read of parsed-but-unused requests).
        framer = self.framer
        merge = self.merge
        while not self.stop_reading:
            if merge.full or self.body_held > self.max_bytes:
                self._pause_reading()
                break
            try:
                ev = framer.next_event()
            except RemoteProtocolError as exc:
                self._bad_request(exc)
                break
            if ev is NEED_DATA:
                break
            t = type(ev)
            if t is Request:
                self._on_request(ev)  # type: ignore[arg-type]
            elif t is Data:
                cur = self.current
                if cur is not None:
                    cur.add_body(ev.data)  # type: ignore[attr-defined]
            elif t is EndOfMessage:
                cur = self.current
                self.current = None
                if cur is not None:
                    cur.end_body(ev.trailers)  # type: ignore[attr-defined]
                    if not cur.req.keep_alive or self.draining:
                        self._end_input(cur.seq)
            elif ev is PAUSED:
                ex = self.upgrade_ex
                if ex is not None and ex.finished and not ex.tunnel:
                    self.upgrade_ex = None
                    if self.draining:  # declined during a graceful stop: that was the last one
                        self._end_input(ex.seq)
                        break
                    framer.resume()  # the upgrade was declined: what follows is HTTP again
                    continue
                break
            elif isinstance(ev, ConnectionClosed):
                self.stop_reading = True
                break

    def _on_request(self, req: Request) -> None:
        seq = self.merge.open()
        if req.method == b"CONNECT":
            self.splicer.metrics.client_error("connect_refused")
            answer = simple_response(405, "CONNECT is not supported: this splicer is a reverse proxy", close=True)
            self.finish(seq, answer)
            if self.log is not None:
                self._log_line(seq, req, None, 405, len(answer), 0.0, self.loop.time() - self.last_seen, 0,
                               "CONNECT refused")
            self._end_input(seq)
            return
        group = self.router.match(req.host, req.target)
        ex = Exchange(self, seq, req, group)
        self.exchanges[seq] = ex
        self.current = ex
        if req.upgrade:
            self.upgrade_ex = ex
            if self.splicer.cfg.upgrade == "refuse":
                ex._fail_local(501, "Upgrade is not supported by this splicer (upgrade: refuse)")
                return
        if group is None:
            ex._fail_local(404, f"no route for {req.target.decode('latin-1')[:200]}")
            return
        self.queue.append(ex)

    def _bad_request(self, exc: RemoteProtocolError) -> None:
        self.splicer.metrics.client_error("bad_request")
        answer = simple_response(exc.status, f"bad request: {exc}", close=True)
        cur = self.current
        self.current = None
        if cur is not None and not cur.req_done and not cur.finished:
            # The error is inside this request's body: its own slot carries the error answer.
            try:
                self.queue.remove(cur)
            except ValueError:
                pass
            cur.abandon()
            self.exchanges.pop(cur.seq, None)
            seq = cur.seq
        else:
            seq = self.merge.open()
        self.finish(seq, answer)
        if self.log is not None:
            if seq == getattr(cur, "seq", None):  # the error is in this request's body: its answer
                self.log_exchange(cur, exc.status, len(answer), str(exc))  # type: ignore[arg-type]
            else:  # no request head could be read: nothing of it is logged
                self._log_line(seq, None, None, exc.status, len(answer), 0.0,
                               max(0.0, self.loop.time() - (self.head_since or self.last_seen)), 0, str(exc))
        self._end_input(seq)

    def head_timed_out(self, seconds: float) -> None:
        """A request head took longer than `seconds` to arrive: 408, then close."""
        self.head_since = None
        self._bad_request(RemoteProtocolError(f"request head not complete within {seconds:g} s", 408))
        self._schedule()
        self._maybe_close()

    def drain(self) -> None:
        """Graceful stop: answer every request already taken in (the last answer says
        `Connection: close`), read no new one, then close. A request whose body is still
        arriving is read to its end first. A tunnel goes on until either side closes it."""
        if self.closed or self.transport is None or self.draining:
            return
        self.draining = True
        if self.tunnel_conn is not None or self.upgrade_ex is not None:
            return
        if self.current is None:
            last = self.merge.opened - 1
            if last < 0 or (self.merge.idle and not self.exchanges):
                # Nothing is owed. A client that used the connection a moment ago (or has just
                # opened it) may be sending its next request now: closing would fail that
                # request. So it stays open for one more request, answered with `Connection:
                # close` (HAProxy's idle-close-on-response), and is closed by the sweep once idle
                # for DRAIN_IDLE_GRACE (`HttpSplicer._sweep_idle`), at once if it is already.
                if self.loop.time() - self.last_seen >= DRAIN_IDLE_GRACE:
                    self._close()
                return
            lh = self.last_head
            if lh is not None and lh[0] == last:
                # The last answer's head was encoded before the stop. Still held (behind a slower
                # answer): it is rewritten to say the connection closes after it. Already on its
                # way without `Connection: close`: the client may send another request on the
                # connection, which is then taken in and answered with close, as on an idle one
                # (or the sweep closes the connection once idle for DRAIN_IDLE_GRACE).
                seq, old, remake = lh
                if not self.merge.replace_unsent(seq, old, remake()):
                    return
            self._end_input(last)
            self._maybe_close()

    @property
    def idle_draining(self) -> bool:
        """Draining with nothing owed and no request under way (see `drain`)."""
        return (self.draining and not self.closed and not self.stop_reading and self.current is None
                and not self.exchanges and self.merge.idle and self.tunnel_conn is None and self.upgrade_ex is None)

    def _end_input(self, seq: int) -> None:
        """No request after `seq` will be read; close once its answer is written."""
        self.stop_reading = True
        if self.close_seq is None or seq < self.close_seq:
            self.close_seq = seq
        self._pause_reading()

    # -- scheduling -------------------------------------------------------------------------
    def _schedule(self) -> None:
        if self._scheduling:
            self._reschedule = True
            return
        self._scheduling = True
        try:
            while True:
                self._reschedule = False
                q = self.queue
                while q and not self.barrier_active and not self.closed:
                    ex = q[0]
                    if self.ends_before(ex.seq):
                        # The connection ends with an earlier answer (one cut off, one delimited
                        # by the close, a `Connection: close`): this request is never answered,
                        # so it is never sent (the backend would act on it, a POST included).
                        break
                    if ex.barrier:
                        if self.inflight:
                            break
                        q.popleft()
                        self.barrier_active = True
                        ex.barrier = True
                        ex.start()
                    else:
                        q.popleft()
                        ex.start()
                if not self._reschedule:
                    break
        finally:
            self._scheduling = False

    def exchange_done(self, ex: Exchange) -> None:
        self.exchanges.pop(ex.seq, None)
        if ex.started:
            self.inflight -= 1
            if ex.barrier:
                self.barrier_active = False
        if ex is self.upgrade_ex and not ex.tunnel and not self.closed:
            self.upgrade_ex = None
            if self.draining:  # declined during a graceful stop: nothing more is read
                self._end_input(ex.seq)
                self._maybe_close()
            elif self.framer.paused:
                self.framer.resume()
                # Requests read behind the declined upgrade are parsed on the next pass; until
                # then a half-closed client's connection is not "done" (_maybe_close).
                self._reparse = True
                self.loop.call_soon(self._process)
        if not self.closed:
            self._schedule()

    def local_answer(self, ex: Exchange, status: int, message: str) -> None:
        """Answer `ex` with a response of the splicer's own (502, 504, 404, ...). It says
        `Connection: close` when the connection ends after it (the client's own close, a
        graceful stop), as a backend's answer would; one held behind a slower answer when a drain
        begins is rewritten so (`last_head`)."""
        close = self.close_after(ex)
        # An HTTP/1.0 client that asked for keep-alive is told it has it, as in a backend's
        # answer (`encode_response_head`), or it would take the answer as the connection's last.
        answer = simple_response(status, message, head_request=ex.head_request, close=close,
                                 keep_alive_10=not close and ex.req.http_version == b"1.0")
        if not close:
            head_request = ex.head_request
            self.last_head = (ex.seq, answer, lambda: simple_response(status, message, head_request=head_request,
                                                                      close=True))
        self.finish(ex.seq, answer)
        if self.log is not None:
            ex.status = status
            self.log_exchange(ex, status, len(answer), message)

    def log_exchange(self, ex: Exchange, status: int, sent: int, error: str = "") -> None:
        """The access-log line of `ex`, once its answer is complete (see access_log.py): wait is the
        time from reading the request to sending it to a backend (ordering, barriers, a pool's
        queue), total the time to the end of the answer, held the time the complete answer then
        waited for earlier ones (set at release); tries counts sends to a backend (a retry makes
        2). It is written once the answer is handed to the connection (`_release_logs`), or as
        not sent if the connection ends first (`_log_unsent`)."""
        server = ex.server
        now = self.loop.time()
        self._log_line(ex.seq, ex.req, server, status, sent, (ex.t0 - ex.t_in) if ex.started else 0.0,
                       now - ex.t_in, ex.attempts + 1 if server is not None else 0, error, now)

    def _log_line(self, seq: int, req: Request | None, server: "BackendServer | None", status: int, sent: int,
                  wait: float, total: float, tries: int, error: str, now: float | None = None) -> None:
        """Hold the line of answer `seq` in `log_wait` until the answer is released: a list in
        AccessLog.record's order, whose last item is the completion time until then (`_held`);
        `req` None: input that was not a request head (logged as "- - HTTP/-")."""
        latin = "latin-1"
        method, target, version, host = (("-", "-", "-", "") if req is None else
                                         (req.method.decode(latin), req.target.decode(latin),
                                          req.http_version.decode(latin), req.host.decode(latin)))
        self.log_wait[seq] = [self.peer, method, target, version, status, sent, host,
                              server.name if server is not None else "-", wait, total, tries, seq, error,
                              self.loop.time() if now is None else now]

    def _release_logs(self) -> None:
        """Write the lines of answers the merge has released to the connection."""
        merge = self.merge
        base, last = merge._base, merge._last
        record = self.log.record  # type: ignore[union-attr]
        wait = self.log_wait
        now = self.loop.time()
        for seq in sorted(s for s in wait if s < base and (last is None or s <= last)):
            args = wait.pop(seq)
            args[_HELD] = now - args[_HELD]  # from the answer's completion to its release
            record(*args)

    def _log_unsent(self) -> None:
        """The connection ends: lines for the answers it never carried. A request still being
        answered is logged 499 (nginx's code: the client closed the connection first) or, when
        the splicer ended the connection, 444 (nginx's "closed without a response"); so is a
        complete answer that was waiting for an earlier one. Bytes: what went out of it."""
        self._release_logs()
        us = self.ending
        status = 444 if us else 499
        why = us or "the client closed the connection before this answer"
        head = self.merge.head
        for ex in self.exchanges.values():
            if not ex.finished and not ex.gone and ex.seq not in self.log_wait:
                self.log_exchange(ex, status, ex.sent if ex.seq == head else 0, why)
        now = self.loop.time()
        for seq in sorted(self.log_wait):
            args = self.log_wait[seq]
            args[_HELD] = now - args[_HELD]
            if seq != head:
                args[_SENT] = 0  # none of it was released
            if args[_STATUS] not in (444, 499):
                error = args[_ERROR]
                args[_STATUS], args[_ERROR] = status, f"{error}; not sent: {why}" if error else f"not sent: {why}"
            self.log.record(*args)  # type: ignore[union-attr]
        self.log_wait.clear()

    def ends_before(self, seq: int) -> bool:
        """True if the connection ends before answer `seq` (see `abort_after`, `_end_input`)."""
        return self.close_seq is not None and seq > self.close_seq

    def close_after(self, ex: Exchange) -> bool:
        """True if the client connection ends with the response to `ex`."""
        return not ex.req.keep_alive or (self.close_seq is not None and ex.seq >= self.close_seq)

    # -- writing responses ------------------------------------------------------------------
    def emit(self, seq: int, data: bytes) -> None:
        merge = self.merge
        merge.append(seq, data)
        if seq == merge._base:
            self._schedule_flush()
        elif merge.held_bytes > self.max_bytes:
            self._backend_flow()

    def finish(self, seq: int, tail: bytes) -> None:
        merge = self.merge
        merge.finish(seq, tail)
        if merge._ready or seq < merge._base:
            # Released: its bytes go out, its log line is written, and a connection that ends
            # with it closes (an answer that ends in nothing more, e.g. one cut off or ended by
            # the backend's close, has no bytes left to trigger that).
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.closed:
            return
        chunks = self.merge.pop_ready()
        if chunks:
            if self.write_paused:
                # The buffer grows now: what the client took since the last look counts first.
                self.took_some()
                self.transport.writelines(chunks)  # type: ignore[union-attr]
                self.write_buffered = self.unsent()
            else:
                self.transport.writelines(chunks)  # type: ignore[union-attr]
            # Activity both ways counts: a client reads an answer, then sends its next request;
            # the idle timeout and a drain's grace (`drain`) start from whichever came last.
            self.last_seen = self.loop.time()
        if self.log_wait:
            self._release_logs()
        if self.backends_paused:
            self._backend_flow()
        self._maybe_close()
        self.check_resume()

    def _maybe_close(self) -> None:
        if self.closed or self.transport is None:
            return
        merge = self.merge
        if self.close_seq is not None:
            head = merge.head
            if (head is None or head > self.close_seq) and not merge._ready:
                self._close()
        elif (self.peer_eof and merge.idle and not self.exchanges and self.tunnel_conn is None
              and not self._reparse):
            self._close()

    def _close(self) -> None:
        if self.closed:
            return  # closing already (lingering) or gone
        self.closed = True
        if self.log is not None:
            self.ending = self.ending or "the connection ended with an earlier answer (a close it asked for, " \
                                         "a broken answer or a bad request)"
            self._log_unsent()
        for ex in list(self.exchanges.values()):
            ex.abandon()
        self.exchanges.clear()
        self.queue.clear()
        close_lingering(self.transport, self.loop, self.peer_eof,  # type: ignore[arg-type]  # after what is buffered
                        idle=self.splicer.cfg.timeouts.client_idle, abortive=self.cut_off)

    def abort_after(self, seq: int) -> None:
        """Close after the bytes of slots up to `seq`, and write nothing of later ones: a
        response broke mid-stream, or its body is delimited by the close. Requests after it
        are never sent to a backend from now on (`_schedule`, `Exchange.on_connection`, no
        retry); those already sent are read to their end and dropped once the connection closes."""
        self.stop_reading = True
        if self.close_seq is None or seq < self.close_seq:
            self.close_seq = seq
        self.merge.cut_after(seq)

    # -- flow control -----------------------------------------------------------------------
    def _pause_reading(self) -> None:
        self.read_paused = True
        if not self._transport_paused and self.transport is not None and not self.closed:
            self._transport_paused = True
            self.transport.pause_reading()

    def check_resume(self) -> None:
        """Resume reading the client once the merge has drained to half its bounds."""
        if (self.read_paused and not self.stop_reading and not self.write_paused and not self.closed
                and not self._processing and self.merge.drained and self.body_held <= self.max_bytes // 2):
            self.read_paused = False
            self._process()  # requests already parsed come first; this may pause again
            if not self.read_paused and not self.closed and not self.stop_reading and self._transport_paused:
                self._transport_paused = False
                self.transport.resume_reading()  # type: ignore[union-attr]

    def _backend_flow(self) -> None:
        merge = self.merge
        over = merge.held_bytes > self.max_bytes
        head = self.exchanges.get(merge.head) if merge.head is not None else None
        head_conn = head.conn if head is not None else None
        if over or self.write_paused:
            for ex in self.exchanges.values():
                c = ex.conn
                if c is not None:
                    c.pause_reading(self.write_paused or c is not head_conn)
            self.backends_paused = True
        elif self.backends_paused:
            resume_all = merge.held_bytes <= self.max_bytes // 2
            for ex in self.exchanges.values():
                c = ex.conn
                if c is not None and (resume_all or c is head_conn):
                    c.pause_reading(False)
            if resume_all:
                self.backends_paused = False

    def backend_write_paused(self, paused: bool) -> None:
        # A backend is slow to take a request body: stop reading more of it from the client.
        if paused:
            self._pause_reading()
        else:
            self.check_resume()

    # -- tunnel -------------------------------------------------------------------------------
    def start_tunnel(self, ex: Exchange, conn: "BackendConnection", first: bytes) -> None:
        self.tunnel_conn = conn
        self.upgrade_ex = None
        self.finish(ex.seq, first)
        self.exchange_done(ex)
        raw = self.framer.take_raw()
        if raw:
            conn.write(raw)
        self.stop_reading = False
        self.read_paused = False
        if self._transport_paused:
            self._transport_paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]

    def tunnel_from_backend(self, data: bytes) -> None:
        if self.closed:
            return
        if not data:  # the backend closed the tunnel
            self.tunnel_conn = None
            self._flush()
            self.closed = True
            self.transport.close()  # type: ignore[union-attr]
            return
        if self.merge._ready or self._flush_scheduled:
            self._flush()
        self.transport.write(data)  # type: ignore[union-attr]
