"""The asyncio shell of the Redis splicer: client connections, pooled backend connections, timers.

The protocol decisions are elsewhere and pure (`redis_resp` frames bytes, `redis_session`
decides what each command does, `redis_session.ReplyOrder` releases replies in request order);
this file moves bytes and keeps time.

Backend pools. Each server has `pool.max` *lanes*; lane i is one pipelined connection (opened at
start for the first `pool.min` lanes, on first use for the others). A key's hash picks its lane,
so one key's commands stay in order on one connection, while different keys of one client run
on several connections (and servers) at once. Each lane keeps its in-flight requests in a FIFO
(the "in-use directory": which client request each pending reply belongs to); a reply's end is
found by `ReplyScanner` and the reply goes to the request at the head of the FIFO.

Failures. A lane whose connection drops, answers garbage, or leaves its oldest request
unanswered past `timeouts.request` is closed; every request it held gets ``-ERR splicer: ...`` in
its own place in each client's reply stream, and the rest of the pipelines go on. The lane
reconnects on its next use, after an exponential backoff with jitter; until then requests for it
are answered with an error at once instead of queueing. Health checks (PING on a separate
connection, HAProxy-style rise/fall) mark servers up or down; with `auto_eject` a down server
leaves the continuum as in twemproxy.

Own connections. What a connection shared by many clients cannot carry goes over a client's
own connection to the server concerned, opened on first use and closed with the client:
subscriptions (`_Subscriber`: messages are pushed at any time) and blocking commands and WATCH
(`_Blocker`: a blocked command would hold the pooled connection; a WATCH lives on the
connection that sent it, where EXEC must run).

Backpressure. A client is read only while it holds fewer than `limits.max_pipeline` unanswered
requests and fewer than `limits.max_buffer_bytes` reply bytes, and while its socket accepts our
writes; reading resumes when it has drained to half (ReplyOrder's hysteresis). So a client
that pipelines a million commands is slowed down, never dropped.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import time
from collections import deque
from typing import Any, Callable

from .. import __version__
from .backoff import Backoff, HealthState
from .config import RedisSpliceConfig, split_address
from .redis_commands import COMMANDS, Kind
from .redis_ketama import Ketama, KetamaServer, server_name
from .redis_resp import (
    OK,
    PONG,
    ReplyScanner,
    RequestReader,
    RespProtocolError,
    encode_command,
    encode_error,
)
from .redis_fanout import ALL_OR_NONE
from .redis_pubsub import CONFIRM_KINDS, MESSAGE_KINDS, message_run, push_kind
from .redis_session import (
    CLOSE,
    EXEC,
    BLOCK,
    FORWARD,
    WATCH_SET,
    WATCH_USE,
    PUBSUB,
    REPLY,
    SPLIT,
    UNWATCH,
    RedisSession,
    ReplyOrder,
    Router,
    SessionConfig,
    merge_parts,
)
from .teardown import close_lingering
from .workers import Accepting, GracefulStop, install_uvloop

__all__ = ["RedisSplicer", "run_redis_splicer"]

log = logging.getLogger("shmfabric.splicer.redis")

_GATE = object()  # in a client's wait queue: later requests wait until earlier ones are answered
_DISCONNECTED, _CONNECTING, _READY = 0, 1, 2
# One-key commands (key at argument 1) -> arity: the commands the client fast path takes.
_SINGLE_ARITY = {name: spec.arity for name, spec in COMMANDS.items() if spec.single}
# PUBLISH and SPUBLISH as clients send them: the fast path takes these too (placed by channel).
_PUBLISH_FAST = frozenset({b"PUBLISH", b"publish", b"SPUBLISH", b"spublish"})
# Socket write buffer of a client above which we stop reading it (asyncio's pause_writing).
_CLIENT_WRITE_HIGH = 1024 * 1024


# Split commands not sent at all while one of their servers is known to be down, as ALL_OR_NONE (see _execute).
_WHOLE_OR_NOTHING = frozenset({Kind.MSET, Kind.SUM})


class _Server:
    """One backend server: its lanes per protocol version, health, metrics."""

    __slots__ = ("splicer", "index", "host", "port", "label", "weight", "name", "lanes",
                 "health", "backoff", "retry_at", "metrics", "version", "up", "last_error", "failing",
                 "down_at", "went_down", "failed_at")

    def __init__(self, splicer: "RedisSplicer", index: int, host: str, port: int, weight: int, name: str) -> None:
        self.splicer = splicer
        self.index = index
        self.host = host
        self.port = port
        self.label = f"{host}:{port}"
        self.weight = weight
        self.name = name
        nl = splicer.lanes
        self.lanes: dict[int, list[_Lane]] = {2: [_Lane(self, 2, i) for i in range(nl)],
                                              3: [_Lane(self, 3, i) for i in range(nl)]}
        h = splicer.config.health
        self.health = HealthState(rise=h.rise, fall=h.fall)
        self.backoff = Backoff()
        self.retry_at = 0.0  # no new connection attempt before this (after a failed one)
        self.last_error = ""  # why the last connection failed (told to clients while it is down)
        self.metrics = splicer.metrics.backend(self.label) if splicer.metrics is not None else None
        self.version: str | None = None
        self.up = True
        # health.mode passive: failures on live traffic not yet cleared by a reply (twemproxy's
        # failure_count), when this server went down, and the wake-up of its health loop.
        self.failing = False
        self.down_at = 0.0
        self.went_down = asyncio.Event()
        self.failed_at = -1.0  # when the last failure counted against it (passive mode)

    def connection_failed(self, now: float, counts: bool = True) -> float:
        """A connect or an established connection failed: back off before the next attempt, and
        (`counts`) count it against the server's health."""
        delay = self.backoff.next_delay()
        self.retry_at = now + delay
        if counts:
            self.splicer._record_health(self, False)
        return delay

    def counts_against(self, entries: list, now: float) -> bool:
        """Passive health (twemproxy's): does a failure of a connection holding `entries`
        ((target, arg, sent_at) in send order) count toward ejection? Only when live requests
        met it (a reconnect nobody waited for, such as the pool's `min` or `preconnect`, is no
        failure of a request), and once per stall: a failure whose requests were all sent
        before the last counted one is that same stall seen on another connection (a server
        has one per protocol version per lane, and a stall times them all out together)."""
        if self.splicer.config.health.mode != "passive":
            return True
        sent = [t for target, _, t in entries if target is not _HANDSHAKE]
        if not sent or sent[-1] <= self.failed_at:
            return False
        self.failed_at = now
        return True

    def all_lanes(self) -> list["_Lane"]:
        return self.lanes[2] + self.lanes[3]


class _BackendProtocol(asyncio.Protocol):
    """Transport callbacks of one TCP connection, forwarded to its lane while it is current."""

    __slots__ = ("lane", "gen")

    def __init__(self, lane: "_Lane", gen: int) -> None:
        self.lane = lane
        self.gen = gen

    def data_received(self, data: bytes) -> None:
        lane = self.lane
        if lane.gen == self.gen:
            lane.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        lane = self.lane
        if lane.gen == self.gen:
            lane.lost("connection lost" if exc is None else f"connection lost ({exc})")


class _Lane:
    """One pooled, pipelined backend connection slot (reconnects in place)."""

    __slots__ = ("server", "proto", "index", "state", "transport", "scanner", "inflight", "out",
                 "gen", "dirty", "splicer", "connect_task", "last_rx")

    def __init__(self, server: _Server, proto: int, index: int) -> None:
        self.server = server
        self.splicer = server.splicer
        self.proto = proto
        self.index = index
        self.state = _DISCONNECTED
        self.transport: asyncio.Transport | None = None
        self.scanner = ReplyScanner()
        # Entries: (target, arg, sent_at). target._on_reply(arg, reply_bytes); None drops the reply.
        self.inflight: deque[tuple[Any, Any, float]] = deque()
        self.out: list[bytes] = []
        self.gen = 0
        self.dirty = False
        self.connect_task: asyncio.Task | None = None
        self.last_rx = 0.0  # when the server last sent us bytes (a busy server is not a stalled one)

    # -- sending ---------------------------------------------------------------------------
    def send(self, payload: bytes, target: Any, arg: Any, now: float) -> bool:
        """Queue one request; False (nothing queued) if the server is unreachable right now."""
        if self.state != _READY and not self._ensure(now):
            return False
        self.out.append(payload)
        self.inflight.append((target, arg, now))
        if not self.dirty:
            self.dirty = True
            self.splicer._dirty_lanes.append(self)
        return True

    def known_down(self, now: float) -> bool:
        """Is this lane's server known to be down (health checks, or its last connection
        attempt failed and the next is not due)? Only a request can tell that it is up."""
        srv = self.server
        if self.state == _DISCONNECTED and now < srv.retry_at:
            return True
        # `up` comes back only through health checks: without them (--no-health) a server
        # marked down by failed connects would stay "down" after it returned.
        return not srv.up and self.splicer.config.health.enabled

    def _ensure(self, now: float) -> bool:
        if self.state == _CONNECTING:
            return True
        srv = self.server
        if now < srv.retry_at or (self.splicer.config.auto_eject and not srv.up):
            return False
        self.connect()
        return True

    def connect(self) -> None:
        """Start opening the connection; requests queue behind the handshake meanwhile."""
        self.state = _CONNECTING
        self.gen += 1
        self.scanner = ReplyScanner()
        self.out = []
        for payload in self.splicer._handshake(self.proto):
            self.out.append(payload)
            self.inflight.append((_HANDSHAKE, self, time.monotonic()))
        self.connect_task = asyncio.ensure_future(self._open(self.gen))

    async def _open(self, gen: int) -> None:
        srv = self.server
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await asyncio.wait_for(
                loop.create_connection(lambda: _BackendProtocol(self, gen), srv.host, srv.port),
                self.splicer.config.timeouts.connect)
        except (OSError, asyncio.TimeoutError) as exc:
            if self.gen == gen:
                self._fail(f"cannot connect ({exc.__class__.__name__}: {exc})", "connect")
                self.splicer._schedule_flush()
            return
        if self.gen != gen:  # closed while connecting
            transport.close()
            return
        self.transport = transport  # type: ignore[assignment]
        self.state = _READY
        if not self.inflight or self.inflight[0][0] is not _HANDSHAKE:
            srv.backoff.reset()  # no handshake to wait for: connected is good enough
        if self.out:
            transport.write(b"".join(self.out))  # type: ignore[attr-defined]
            self.out = []
        self.dirty = False

    def flush(self) -> None:
        self.dirty = False
        if self.state == _READY and self.out:
            out = self.out
            self.out = []
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))  # type: ignore[union-attr]
            m = self.server.metrics
            if m is not None:
                m.requests.inc(len(out))

    # -- receiving -------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        sc = self.scanner
        sc.feed(data)
        q = self.inflight
        metrics = self.server.metrics
        now = time.monotonic()
        self.last_rx = now
        gen = self.gen
        replied = 0  # replies to requests (not to the connection handshake): passive health
        try:
            popleft = q.popleft
            dirty_clients = self.splicer._dirty_clients
            for reply in sc.drain(len(q)):
                target, arg, sent = popleft()
                replied += 1
                if metrics is not None:
                    metrics.duration.observe(now - sent)
                if type(target) is _Client:
                    # _Client._on_reply inlined (keep the two alike): this runs once per reply.
                    target.outstanding -= 1
                    if target.closed:
                        continue
                    merge = target.merge
                    merge.held_bytes += len(reply)
                    base = merge._base
                    if arg != base:
                        merge._slots[arg - base] = reply
                    else:
                        slots = merge._slots
                        ready = merge._ready
                        ready.append(reply)
                        slots.popleft()
                        base += 1
                        while slots and slots[0] is not None:
                            ready.append(slots.popleft())
                            base += 1
                        merge._base = base
                        if not target.dirty:
                            target.dirty = True
                            dirty_clients.append(target)
                    if not target.outstanding and target.waiting:
                        target._drain_waiting()
                elif type(target) is _Join:
                    target._on_part(arg, reply, sc.parsed(reply))
                elif target is not None:
                    if target is _HANDSHAKE:
                        replied -= 1
                    target._on_reply(arg, reply)
                    if self.gen != gen:  # the handshake failed and closed this connection
                        break
            else:
                if not q and sc.buffered:
                    raise RespProtocolError("reply without a request")
        except (RespProtocolError, ValueError) as exc:
            self._fail(f"protocol error from the server: {exc}", "protocol")
        else:
            srv = self.server
            if srv.failing and self.gen == gen and replied > 0:
                # health.mode passive: a reply clears the server's failures (twemproxy's server_ok).
                self.splicer._replied(srv)
        self.splicer._schedule_flush()

    def lost(self, why: str) -> None:
        """The transport closed under us."""
        self._fail(why, "reset")
        self.splicer._schedule_flush()

    def _fail(self, why: str, kind: str) -> None:
        """Close this connection; every request it held gets an error in its place."""
        srv = self.server
        self.gen += 1
        self.state = _DISCONNECTED
        if self.transport is not None:
            self.transport.abort()
            self.transport = None
        self.out = []
        self.scanner = ReplyScanner()
        q = list(self.inflight)
        self.inflight.clear()
        err = encode_error(f"ERR splicer: backend {srv.label} {why}")
        srv.last_error = why
        if q or kind == "connect":
            # Requests were lost, or no connection could be made: count it against the
            # server and back off. An idle connection closed by the server (its `timeout`
            # setting) is not a failure: the lane just reconnects on next use.
            if srv.metrics is not None:
                srv.metrics.error(kind, sum(1 for target, _, _ in q if target is not None and type(target) is not _Handshake))
            now = time.monotonic()
            srv.connection_failed(now, srv.counts_against(q, now))
        for target, arg, _ in q:
            # The handshake's own entries are this failure already: answering them would fail
            # the lane a second time, with the first error nested in the second's text.
            if target is not None and target is not _HANDSHAKE:
                target._on_reply(arg, err)
        if not self.splicer.closing:
            log.warning("backend %s lane %d/resp%d: %s", srv.label, self.index, self.proto, why)

    def close(self) -> None:
        self.gen += 1
        self.state = _DISCONNECTED
        if self.transport is not None:
            self.transport.close()
            self.transport = None


class _Handshake:
    """Checks the replies to the commands sent when a lane connects (AUTH, SELECT, HELLO)."""

    @staticmethod
    def _on_reply(lane: _Lane, reply: bytes) -> None:
        if reply[:1] == b"-":
            lane._fail(f"refused the connection handshake: {reply[1:-2].decode(errors='replace')}", "connect")
        else:
            lane.server.backoff.reset()


_HANDSHAKE = _Handshake()


_PING = b"*1\r\n$4\r\nPING\r\n"


class _Probe:
    """The PINGs ahead of a write to every server: the write goes out once every server has
    answered, else the first failure is the client's reply and nothing runs anywhere."""

    __slots__ = ("client", "seq", "action", "left", "error")

    def __init__(self, client: "_Client", seq: int, action: tuple) -> None:
        self.client = client
        self.seq = seq
        self.action = action
        self.left = len(action[5])
        self.error: bytes | None = None

    def _on_reply(self, server: int, reply: bytes) -> None:
        if reply != PONG and self.error is None:
            self.error = reply if reply[:1] == b"-" else encode_error(
                f"ERR splicer: backend {self.client.splicer._servers[server].label} answered PING with an unexpected reply")
        self.left -= 1
        if self.left == 0:
            client = self.client
            if self.error is not None or client.closed:
                client._on_reply(self.seq, self.error or b"")
            else:
                client._split(self.seq, self.action, time.monotonic())
                client.splicer._schedule_flush()


class _Join:
    """Collects the part replies of one split command and merges them into the client's slot."""

    __slots__ = ("client", "seq", "kind", "nkeys", "parts", "values", "left", "proto")

    def __init__(self, client: "_Client", seq: int, kind: int, nkeys: int, nparts: int, proto: int) -> None:
        self.client = client
        self.seq = seq
        self.kind = kind
        self.nkeys = nkeys
        self.parts: list[Any] = [None] * nparts
        self.values: list[Any] = [None] * nparts  # parts' replies already parsed by the lane's scanner
        self.left = nparts
        self.proto = proto

    def _on_reply(self, idx: tuple[int, Any], reply: bytes) -> None:
        self._on_part(idx, reply, None)

    def _on_part(self, idx: tuple[int, Any], reply: bytes, parsed: Any) -> None:
        i, positions = idx
        self.parts[i] = (positions, reply)
        self.values[i] = parsed
        self.left -= 1
        if self.left == 0:
            self.client._on_reply(self.seq, merge_parts(self.kind, self.nkeys, self.parts, self.proto, self.values))


class _SubOp:
    """One (P|S)(UN)SUBSCRIBE waiting for the servers' confirmations (redis_pubsub)."""

    __slots__ = ("client", "seq", "left", "reply", "early", "subscribing")

    def __init__(self, client: "_Client", seq: int, left: int, reply: bytes, subscribing: bool) -> None:
        self.client = client
        self.seq = seq
        self.left = left  # servers still to confirm their part
        self.reply = reply  # the client's confirmations, made by its Subscriptions
        # Messages a server sent before it confirmed its part. They go after a subscription's
        # confirmations (a message of a new channel may follow its "subscribe") and ahead of an
        # unsubscription's (none may follow its "unsubscribe"), as with Redis.
        self.early: list[bytes] = []
        self.subscribing = subscribing

    def server_done(self) -> None:
        self.left -= 1
        if self.left == 0:
            early = self.early
            client = self.client
            subs = client.session.subs
            if subs is not None and not client.held_messages:
                # A server the client no longer subscribes on loses its connection, so its
                # failing later does not cut the client, and after a HELLO new connections speak
                # the new protocol. Only with no (UN)SUBSCRIBE waiting (the session's sets count
                # the commands already read, and a connection closed early would lose messages
                # sent before a later UNSUBSCRIBE), and before the reply, which may start the
                # next command (each (UN)SUBSCRIBE is a barrier, so none is in flight now).
                keep = subs.servers()
                for server in [s for s in client.subscribers if s not in keep]:
                    client.subscribers.pop(server).close()
            if not early:
                reply = self.reply
            elif self.subscribing:
                reply = self.reply + b"".join(early)
            else:
                reply = b"".join(early) + self.reply
            client._on_reply(self.seq, reply)


class _OwnConnection(asyncio.Protocol):
    """A connection of one client's own to one server, outside the pools: what a pooled
    connection shared by many clients cannot carry (subscriptions, blocking commands, WATCH).

    Opened on first use with the lanes' handshake (AUTH, HELLO, SELECT), closed with the
    client. Subclasses take the replies after the handshake (`frames`) and say what a failure
    means (`fail`).
    """

    what = "connection"  # for messages

    def __init__(self, client: "_Client", server: _Server, proto: int) -> None:
        self.client = client
        self.server = server
        self.proto = proto
        self.last_rx = time.monotonic()
        self.transport: asyncio.Transport | None = None
        self.scanner = ReplyScanner()
        self.closed = False
        hs = client.splicer._handshake(proto)
        self.handshake_left = len(hs)
        self.out: list[bytes] = list(hs)
        self.task = asyncio.ensure_future(self._open())

    async def _open(self) -> None:
        srv = self.server
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.create_connection(lambda: self, srv.host, srv.port),
                                   self.client.splicer.config.timeouts.connect)
        except (OSError, asyncio.TimeoutError) as exc:
            self.fail(f"cannot connect ({exc.__class__.__name__}: {exc})")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.closed:
            transport.close()
            return
        self.transport = transport  # type: ignore[assignment]
        transport.write(b"".join(self.out))  # type: ignore[attr-defined]
        self.out = []

    def write(self, payload: bytes) -> None:
        if self.transport is not None:
            self.transport.write(payload)
        else:
            self.out.append(payload)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.last_rx = time.monotonic()
        sc = self.scanner
        sc.feed(data)
        try:
            frames = sc.drain(1 << 30)
        except RespProtocolError as exc:
            self.fail(f"protocol error from the server: {exc}")
            return
        while self.handshake_left and frames:
            self.handshake_left -= 1
            frame = frames.pop(0)
            if frame[:1] == b"-":
                self.fail(f"refused the connection handshake: {frame[1:-2].decode(errors='replace')}")
                return
            self.handshake_reply(frame)
        if frames:
            self.frames(frames)
        self.client.splicer._schedule_flush()

    def frames(self, frames: list[bytes]) -> None:
        raise NotImplementedError

    def handshake_reply(self, frame: bytes) -> None:
        """One reply to the handshake (subclasses that add to it read theirs here)."""

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.fail(f"closed the {self.what}" + (f" ({exc})" if exc is not None else ""))

    def fail(self, why: str) -> None:
        raise NotImplementedError

    def _warn(self, about: str, why: str) -> None:
        client = self.client
        if not client.splicer.closing:
            log.warning("backend %s, %s of client %s: %s", self.server.label, about,
                        client.transport.get_extra_info("peername") if client.transport else "?", why)

    def close(self) -> None:
        self.closed = True
        self.task.cancel()
        if self.transport is not None:
            self.transport.close()
            self.transport = None


class _Subscriber(_OwnConnection):
    """A client's own connection to one server, for its subscriptions on that server.

    A subscribed connection cannot be pooled: the server pushes messages down it at any time.
    Messages are relayed to the client as they come; confirmations are counted against what
    was sent (`pending`), and each (UN)SUBSCRIBE is confirmed to the client once every server
    it went to has confirmed. If the connection fails the client's connection is closed (its
    subscriptions are gone, and a client library resubscribes when it reconnects).
    """

    what = "subscribed connection"

    def __init__(self, client: "_Client", server: _Server, proto: int) -> None:
        super().__init__(client, server, proto)
        self.pending: deque[list[Any]] = deque()  # [op, confirmations still due, sent at], in send order
        client.splicer._subscribers.add(self)  # the ticker times confirmations out

    def send(self, payload: bytes, op: _SubOp, confirmations: int, now: float) -> None:
        self.pending.append([op, confirmations, now])
        self.write(payload)

    def data_received(self, data: bytes) -> None:
        if self.closed or self.handshake_left:  # (the handshake's replies: only just after connecting)
            super().data_received(data)
            return
        # Runs of whole messages, most of what a subscribed connection carries, are framed by
        # message_run and relayed as they came, one bytes object per run; anything else (a
        # confirmation, an error, the rest of a push split between reads) one reply at a time.
        self.last_rx = time.monotonic()
        sc = self.scanner
        sc.feed(data)
        messages: list[bytes] = []  # relayed together: one slot in the client's order per read
        take_run = sc.take_run
        drain = sc.drain
        try:
            while True:
                run = take_run(message_run)
                if run:
                    self._message(run, messages)
                got = drain(1)  # (not next(): drain leaves a large push arriving unjoined until whole)
                if not got:
                    break
                frame = got[0]
                if not self._frame(frame, messages):  # it failed the connection
                    self.client.splicer._schedule_flush()
                    return
                if self.closed:  # by a confirmation just handled: nothing more comes from it
                    break
        except RespProtocolError as exc:
            self.fail(f"protocol error from the server: {exc}")
            return
        if messages:
            self.client._push(messages[0] if len(messages) == 1 else b"".join(messages))
        self.client.splicer._schedule_flush()

    def frames(self, frames: list[bytes]) -> None:
        messages: list[bytes] = []  # relayed together: one slot in the client's order per read
        for frame in frames:
            if self.closed:  # by a confirmation just handled: nothing more comes from it
                break
            if not self._frame(frame, messages):
                return
        if messages:
            self.client._push(messages[0] if len(messages) == 1 else b"".join(messages))

    def _message(self, frames: bytes, messages: list[bytes]) -> None:
        """One or more whole messages, in the place they go."""
        pending = self.pending
        if pending:  # with the (UN)SUBSCRIBE this server has not confirmed yet
            pending[0][0].early.append(frames)
        else:
            held = self.client.held_messages
            if held:  # ahead of the first one still waiting to be sent
                held[next(iter(held))].append(frames)
            else:
                messages.append(frames)

    def _frame(self, frame: bytes, messages: list[bytes]) -> bool:
        """One push or reply from the server; False if it failed the connection."""
        kind = push_kind(frame)
        if kind in MESSAGE_KINDS:
            self._message(frame, messages)
        elif kind in CONFIRM_KINDS and self.pending:
            pending = self.pending
            head = pending[0]
            head[1] -= 1
            if head[1] == 0:
                pending.popleft()
                head[0].server_done()
        else:
            self.fail("answered a subscription with "
                      + (frame[1:-2].decode(errors="replace") if frame[:1] == b"-" else "an unexpected reply"))
            return False
        return True

    def fail(self, why: str) -> None:
        """This subscription connection is gone: so are the client's subscriptions, and its
        connection is closed once what it was sent so far is written."""
        if self.closed:
            return
        self._warn("subscriptions", why)
        self.client._subscriptions_lost(encode_error(f"ERR splicer: backend {self.server.label} {why}; subscriptions lost"))

    def close(self, error: bytes = b"") -> None:
        """Close the connection; pending (un)subscriptions are answered with `error`."""
        super().close()
        self.client.splicer._subscribers.discard(self)
        pending, self.pending = self.pending, deque()
        for op, _, _ in pending:
            if op.left > 0:
                op.left = 1  # one error answers the whole command, whatever else is due
                op.reply = error
                op.server_done()


class _Blocker(_OwnConnection):
    """A client's own connection to one server for its blocking commands (BLPOP, BLMOVE,
    XREAD BLOCK...) and its WATCH: a blocked command would hold up a pooled connection shared
    with other clients, and a WATCH lives on the connection that sent it, where EXEC must run.
    Each command is a barrier, so at most one is in flight; none has a request timeout (a
    blocking one waits as long as it asked to). If the connection fails its command gets the
    error in its place, a WATCH it held is lost (EXEC then fails), and the next command opens
    a new connection.
    """

    what = "connection of blocking commands"

    def __init__(self, client: "_Client", server: _Server, proto: int) -> None:
        super().__init__(client, server, proto)
        # [client's sequence number, replies still due, reply to give in place of the last,
        #  deadline (None: may block for ever)]
        self.pending: deque[list[Any]] = deque()
        self.watching = False  # holds the client's WATCH
        # The server's id for this connection (CLIENT ID, after the handshake): a client that
        # half-closes has its blocked command ended by CLIENT UNBLOCK from a pooled connection.
        self.out.append(b"*2\r\n$6\r\nCLIENT\r\n$2\r\nID\r\n")
        self.handshake_left += 1
        self.server_id: int | None = None
        self.unblocking = False
        client.splicer._blockers.add(self)  # the ticker times out what does not block for ever

    def handshake_reply(self, frame: bytes) -> None:
        if frame[:1] == b":":
            self.server_id = int(frame[1:-2])

    def send(self, payload: bytes, seq: int, nreplies: int, override: bytes | None, deadline: float | None) -> None:
        self.pending.append([seq, nreplies, override, deadline])
        self.write(payload)

    def unblock(self, tries: int = 0) -> None:
        """End a command blocked for a client that sent its last byte (redis-server frees such a
        client, so nothing is popped for it) or that a graceful stop is closing (it would hold
        the old worker for the whole drain, and a client leaving meanwhile goes unnoticed: its
        command would pop an item nobody reads); one that completes at once still answers.
        CLIENT UNBLOCK makes a blocked command answer as if timed out; a command that had not
        reached the server yet is caught by trying again until nothing is pending."""
        if self.closed or not self.pending:
            self.unblocking = False
            return
        if tries > 100:  # 2 s of tries: give up on this connection
            self.close(encode_error("ERR splicer: the client closed its side while a blocking command waited"))
            return
        self.unblocking = True
        loop = self.client.splicer._loop
        if self.server_id is None:  # still connecting
            loop.call_later(0.02, self.unblock, tries + 1)
            return
        lane = self.server.lanes[self.proto][0]
        payload = encode_command([b"CLIENT", b"UNBLOCK", b"%d" % self.server_id])
        if not lane.send(payload, self, tries, time.monotonic()):
            self.close(encode_error(f"ERR splicer: backend {self.server.label} is unavailable"))
        else:
            self.client.splicer._schedule_flush()

    def _on_reply(self, tries: int, reply: bytes) -> None:  # CLIENT UNBLOCK's, from a pooled connection
        if self.pending and not self.closed:
            self.client.splicer._loop.call_later(0.02, self.unblock, tries + 1)
        else:
            self.unblocking = False

    def frames(self, frames: list[bytes]) -> None:
        client = self.client
        pending = self.pending
        for frame in frames:
            if not pending:
                self.fail("sent a reply without a request")
                return
            head = pending[0]
            head[1] -= 1
            if head[1]:  # MULTI's +OK and the +QUEUED before EXEC's reply
                continue
            pending.popleft()
            client._on_reply(head[0], frame if head[2] is None else head[2])
            if self.closed:  # the reply made the client drop its own connections (RESET)
                return

    def fail(self, why: str) -> None:
        if self.closed:
            return
        self._warn("blocking command or WATCH", why)
        self.close(encode_error(f"ERR splicer: backend {self.server.label} {why}"))

    def close(self, error: bytes = b"") -> None:
        """Close the connection; a command in flight is answered with `error`."""
        super().close()
        client = self.client
        client.splicer._blockers.discard(self)
        if client.blockers.get(self.server.index) is self:
            del client.blockers[self.server.index]
        pending, self.pending = self.pending, deque()
        for seq, _, _, _ in pending:
            client._on_reply(seq, error)


def _address(name: Any) -> str:
    """A socket address as Redis prints it in CLIENT INFO (host:port, or a UNIX path)."""
    if isinstance(name, tuple) and len(name) >= 2:
        return f"{name[0]}:{name[1]}"
    return str(name or "")


#: How long a connection accepted just as a graceful stop began may take to send its first
#: commands (they are answered, then it closes).
DRAIN_FIRST_READ = 1.0


class _Client(asyncio.Protocol):
    """One client connection: read, decide, dispatch, and write replies back in order."""

    def __init__(self, splicer: "RedisSplicer") -> None:
        self.splicer = splicer
        splicer.accepting.add(self)
        cfg = splicer.config
        self.reader = RequestReader(cfg.limits.max_request_bytes)
        self.session = RedisSession(splicer.router, splicer.session_config)
        self.session.own_info = splicer.own_info
        self.merge = ReplyOrder(cfg.limits.max_pipeline, cfg.limits.max_buffer_bytes)
        self.max_unread = cfg.limits.max_unread_bytes
        self.max_unread_pubsub = cfg.limits.max_unread_pubsub_bytes
        self.pubsub_soft = cfg.limits.pubsub_soft_limit_bytes
        self.pubsub_soft_seconds = cfg.limits.pubsub_soft_limit_seconds
        self.pubsub_soft_since: float | None = None  # when the unread messages went over the soft limit
        self.transport: asyncio.Transport | None = None
        self.late: asyncio.TimerHandle | None = None  # accepted as a stop began (connection_made)
        self.outstanding = 0  # actions sent to backends and not yet answered
        self.waiting: deque = deque()  # actions held behind a barrier
        self.read_paused = False
        self.write_paused = False
        self.closing = False  # QUIT or protocol error: answer what we have, then close
        self.eof = False  # the client half-closed: answer what it sent, then close
        self.closed = False
        self.dirty = False
        self.subscribers: dict[int, _Subscriber] = {}  # by server index, while it has subscriptions
        self.blockers: dict[int, _Blocker] = {}  # by server index, once it sent a blocking command there
        # (UN)SUBSCRIBEs read but waiting to run, by sequence number, in order: the messages that
        # arrive meanwhile, for the slot opened just ahead of each
        self.held_messages: dict[int, list[bytes]] = {}
        # The last slot holding pub/sub confirmations or messages: RESP3 messages may skip the
        # client's pending replies only once it is written (see _push).
        self.last_pubsub_seq = -1

    # -- transport callbacks ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=_CLIENT_WRITE_HIGH)  # type: ignore[attr-defined]
        session = self.session
        session.addr, session.laddr = (_address(transport.get_extra_info(k)) for k in ("peername", "sockname"))
        sock = transport.get_extra_info("socket")
        session.fd = sock.fileno() if sock is not None else -1
        self.splicer._clients.add(self)
        self.splicer.accepting.made(self)
        if self.splicer.metrics is not None:
            self.splicer.metrics.client_connections.inc()
        if self.splicer.draining:
            # Accepted just before the listener closed (a reload or stop): what it sent with its
            # connect is its first read, taken in and answered before it closes like the others;
            # closing it unread would cut a client that did nothing wrong. One that sends nothing
            # within DRAIN_FIRST_READ is closed.
            self.late = asyncio.get_running_loop().call_later(DRAIN_FIRST_READ, self.drain)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.waiting.clear()
        self._drop_subscribers()
        self._drop_blockers()
        self.splicer._clients.discard(self)
        if self.splicer.metrics is not None:
            self.splicer.metrics.client_connections.dec()
            if exc is not None:
                self.splicer.metrics.client_error("reset")

    def pause_writing(self) -> None:
        self.write_paused = True
        self._pause()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._maybe_resume()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.reader.feed(data)
        self._process()
        if self.late is not None:  # its first read, accepted as a stop began: now drain
            self.late.cancel()
            self.late = None
            self.drain()
        self.splicer._schedule_flush()

    def eof_received(self) -> bool | None:
        if self.closed:
            return False  # the client closed its side after our last answer: close for good
        # Half-close: the client sent all it will send (`printf ... | nc -N` does). Answer what
        # it sent, then close; keeping the transport open lets us still write.
        self.eof = True
        for b in list(self.blockers.values()):
            # A command blocked for a client that sent its last byte may wait for ever, and pop
            # an item nobody reads: redis-server frees such a client at EOF, and we end it.
            if b.pending:
                b.unblock()
        self._mark()
        self.splicer._schedule_flush()
        return True

    def drain(self) -> None:
        """Graceful stop: answer the commands already taken in, read no more, then close. The
        client sees a prefix of its pipeline answered, then EOF: every command that ran was
        answered, and none after the last answer ran (those were never read)."""
        if self.closed:
            return
        self.closing = True  # data_received ignores what comes; flush closes once all is answered
        self._pause()
        for b in list(self.blockers.values()):
            if b.pending:  # ended now (it answers as timed out); the client retries elsewhere
                b.unblock()
        self._mark()

    # -- request side ----------------------------------------------------------------------
    def _process(self) -> None:
        merge = self.merge
        slots = merge._slots
        max_slots = merge.max_slots
        session = self.session
        handle = session.handle
        splicer = self.splicer
        router = splicer.router
        cache_get = router._cache.get
        lane_table = splicer._lane_table
        dirty_lanes = splicer._dirty_lanes
        single_arity = _SINGLE_ARITY.get
        per_server = router.lanes
        now = time.monotonic()
        while True:
            room = max_slots - len(slots)
            if room <= 0 or merge.full:
                break
            cmds, error = self.reader.drain(room)
            # The one-key fast path (most of the traffic) applies while the session is plain:
            # no MULTI, authenticated, nothing held behind a barrier. Only the slow path
            # (session.handle, _execute) changes that, so it is re-checked after each of those.
            fast = session.multi is None and session.authed and not self.waiting and not session.subscribed
            lanes = lane_table[session.proto]
            # The next sequence number: base + open slots, which replies finishing the head
            # (popleft, base + 1) leave as is; recomputed after the slow path.
            seq = merge._base + len(slots)
            outstanding = self.outstanding
            for args in cmds:
                if fast:
                    # What session.handle + _execute do for a one-key command going to a ready
                    # lane, inlined (ReplyOrder.open and encode_command's common shapes too).
                    arity = single_arity(args[0])
                    argc = len(args)
                    ln = None
                    if arity is not None:
                        if argc == arity if arity > 0 else argc >= -arity:
                            code = cache_get(args[1])
                            if code is None:
                                code = router.code(args[1])
                            ln = lanes[code]
                    elif argc == 3 and args[0] in _PUBLISH_FAST and router.channels is router.ketama:
                        # PUBLISH / SPUBLISH: to the first lane of the channel's server (see
                        # RedisSession.handle; Router.channel_place while no server is ejected).
                        code = cache_get(args[1])
                        if code is None:
                            code = router.code(args[1])
                        ln = lanes[code - code % per_server]
                    if ln is not None and ln.state == _READY:
                        slots.append(None)
                        if argc == 2:
                            a, b = args
                            ln.out.append(b"*2\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(a), a, len(b), b))
                        elif argc == 3:
                            a, b, c = args
                            ln.out.append(b"*3\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n"
                                          % (len(a), a, len(b), b, len(c), c))
                        else:
                            ln.out.append(encode_command(args))
                        ln.inflight.append((self, seq, now))
                        seq += 1
                        outstanding += 1
                        if not ln.dirty:
                            ln.dirty = True
                            dirty_lanes.append(ln)
                        continue
                self.outstanding = outstanding
                session.idle = not outstanding and not self.waiting
                action = handle(args)
                tag = action[0]
                if tag == PUBSUB and (self.waiting or self.outstanding):
                    # It waits: messages that come meanwhile go in a slot of their own ahead of
                    # it (Redis would send them before it runs; see _Subscriber.frames).
                    self.held_messages[merge.open() + 1] = []
                seq = merge.open()
                if tag == PUBSUB:
                    self.last_pubsub_seq = seq
                if tag == REPLY:
                    merge.finish(seq, action[1])
                    if len(action) > 2 and action[2] and (self.outstanding or self.waiting):
                        self.waiting.append((None, _GATE))
                elif tag == CLOSE:
                    merge.finish(seq, action[1])
                    self.closing = True
                    outstanding = self.outstanding
                    break
                elif self.waiting or (action[1] and self.outstanding):
                    self.waiting.append((seq, action))
                else:
                    self._execute(seq, action, now)
                fast = session.multi is None and session.authed and not self.waiting and not session.subscribed
                lanes = lane_table[session.proto]
                seq = merge._base + len(slots)
                outstanding = self.outstanding
            self.outstanding = outstanding
            if error is not None and not self.closing:
                seq = merge.open()
                merge.finish(seq, encode_error(f"ERR Protocol error: {error}"))
                self.closing = True
                if splicer.metrics is not None:
                    splicer.metrics.client_error("bad_request")
            if self.closing or len(cmds) < room:
                break
        # Forwarded requests only dirty their lanes; the client needs a flush when a reply is
        # ready (answered here, or an error in place) or it is to be closed.
        if merge._ready or self.closing or self.eof:
            self._mark()
        if merge.full and not self.read_paused:
            self._pause()

    def _execute(self, seq: int, action: tuple, now: float) -> None:
        tag = action[0]
        splicer = self.splicer
        if tag == FORWARD:
            _, barrier, proto, server, lane, payload = action
            if splicer._servers[server].lanes[proto][lane].send(payload, self, seq, now):
                self.outstanding += 1
            else:
                self.merge.finish(seq, splicer._down_error(server))
        elif tag == SPLIT:
            _, barrier, proto, kind, nkeys, parts = action
            # Writes that must run everywhere or nowhere (FLUSHALL...: ALL_OR_NONE) and MSET and
            # DEL, atomic on one server, are refused at once while a server of theirs is known to
            # be down, rather than run on the others and then answer the error.
            down = next((server for server, lane, _, _ in parts
                         if splicer._servers[server].lanes[proto][lane].known_down(now)), None) \
                if kind in ALL_OR_NONE or kind in _WHOLE_OR_NOTHING else None
            if down is not None:
                self.merge.finish(seq, splicer._down_error(down))
            elif kind in ALL_OR_NONE:
                # Sent only once each server has answered a PING: one that died since its last
                # reply is found out before anything runs on the others. (Not for MSET and DEL:
                # it would cost every one a round trip.)
                probe = _Probe(self, seq, action)
                self.outstanding += 1
                for server, lane, _, _ in parts:
                    if not splicer._servers[server].lanes[proto][lane].send(_PING, probe, server, now):
                        probe._on_reply(server, splicer._down_error(server))
            else:
                self.outstanding += 1
                self._split(seq, action, now)
        elif tag == EXEC:
            _, barrier, proto, server, lane, payload, nreplies = action
            ln = splicer._servers[server].lanes[proto][lane]
            # One write holds MULTI, the commands and EXEC, so nothing else interleaves on the
            # connection; the replies before EXEC's (+OK, +QUEUED...) are dropped.
            if ln.send(payload, None, None, now):
                for _ in range(nreplies - 2):
                    ln.inflight.append((None, None, now))
                ln.inflight.append((self, seq, now))
                self.outstanding += 1
            else:
                self.merge.finish(seq, splicer._down_error(server))
        elif tag == PUBSUB:
            _, barrier, proto, reply, sends, drop, subscribing = action
            held = self.held_messages.pop(seq, None)
            if held is not None:  # the slot opened ahead of it: the messages that came meanwhile
                self.merge.finish(seq - 1, b"".join(held))
            if drop:  # RESET: subscriptions and WATCHes end with the client's own connections
                self._drop_subscribers()
                self._drop_blockers()
            if not sends:
                self.merge.finish(seq, reply)
            else:
                op = _SubOp(self, seq, len(sends), reply, subscribing)
                self.outstanding += 1
                subscribers = self.subscribers
                for server, payload, confirmations in sends:
                    sub = subscribers.get(server)
                    if sub is None or sub.proto != proto:
                        if sub is not None:  # left over from before a HELLO (no subscriptions on it)
                            sub.close()
                        sub = subscribers[server] = _Subscriber(self, splicer._servers[server], proto)
                    sub.send(payload, op, confirmations, now)
        elif tag == BLOCK:
            _, barrier, proto, server, payload, nreplies, override, watch, wait = action
            b = self.blockers.get(server)
            if watch == WATCH_USE and (b is None or not b.watching):
                # The connection that held the WATCH was lost since: the keys were not watched
                # all along, so EXEC must not run. UNWATCH (or DISCARD) has nothing to undo.
                if payload == UNWATCH:
                    self.merge.finish(seq, OK if override is None else override)
                else:
                    self.merge.finish(seq, encode_error("ERR splicer: the connection holding this client's WATCH was "
                                                        "lost; the transaction did not run, WATCH again"))
            elif splicer._servers[server].lanes[proto][0].known_down(now):
                if watch == WATCH_SET and self.session.watching == server:
                    self.session.watching = None  # refused: nothing is watched
                self.merge.finish(seq, splicer._down_error(server))
            else:
                if b is None or b.proto != proto:
                    if b is not None:  # opened before a HELLO changed the protocol
                        b.close()
                    b = self.blockers[server] = _Blocker(self, splicer._servers[server], proto)
                self.outstanding += 1
                b.send(payload, seq, nreplies, override,
                       None if wait is None else now + splicer.config.timeouts.request + wait)
                if watch is not None:
                    b.watching = watch == WATCH_SET
                if self.eof or self.closing:  # read before its last byte, or a graceful stop: no blocking
                    b.unblock()
        else:
            raise AssertionError(tag)
        if action[1] and self.outstanding:
            self.waiting.appendleft((None, _GATE))

    def _split(self, seq: int, action: tuple, now: float) -> None:
        """Send the parts of a SPLIT action (its slot already counted in `outstanding`)."""
        _, barrier, proto, kind, nkeys, parts = action
        splicer = self.splicer
        join = _Join(self, seq, kind, nkeys, len(parts), proto)
        for i, (server, lane, payload, positions) in enumerate(parts):
            if not splicer._servers[server].lanes[proto][lane].send(payload, join, (i, positions), now):
                join._on_reply((i, positions), splicer._down_error(server))

    def _drain_waiting(self) -> None:
        w = self.waiting
        now = time.monotonic()
        while w:
            seq, action = w[0]
            if action is _GATE:
                if self.outstanding:
                    return
                w.popleft()
                continue
            if action[1] and self.outstanding:
                return
            w.popleft()
            self._execute(seq, action, now)

    # -- reply side ------------------------------------------------------------------------
    def _on_reply(self, seq: int, reply: bytes) -> None:
        self.outstanding -= 1
        if self.closed:
            return
        # ReplyOrder.finish, inlined: this runs once per reply.
        merge = self.merge
        merge.held_bytes += len(reply)
        base = merge._base
        if seq != base:
            merge._slots[seq - base] = reply
        else:
            slots = merge._slots
            ready = merge._ready
            ready.append(reply)
            slots.popleft()
            base += 1
            while slots and slots[0] is not None:
                ready.append(slots.popleft())
                base += 1
            merge._base = base
            if not self.dirty:  # only a finished head makes anything writable
                self.dirty = True
                self.splicer._dirty_clients.append(self)
        if self.outstanding == 0 and self.waiting:
            self._drain_waiting()

    def _push(self, frame: bytes) -> None:
        """Messages a server pushed for this client's subscriptions: after every reply of the
        commands read before them, as Redis writes them."""
        if self.closed:
            return
        merge = self.merge
        unread = merge.held_bytes + self.transport.get_write_buffer_size()  # type: ignore[union-attr]
        # Like Redis's client-output-buffer-limit for pub/sub (checked, as Redis does, when a
        # message is added): a subscriber that does not read is disconnected rather than held
        # in memory without bound, at once past the hard limit, or after staying over the soft
        # one for its seconds on end.
        over = None
        if unread > self.max_unread_pubsub:
            over = "limits.max_unread_pubsub_bytes"
        elif self.pubsub_soft and unread > self.pubsub_soft:
            now = time.monotonic()
            if self.pubsub_soft_since is None:
                self.pubsub_soft_since = now
            if now - self.pubsub_soft_since >= self.pubsub_soft_seconds:
                over = "limits.pubsub_soft_limit_bytes for limits.pubsub_soft_limit_seconds"
        else:
            self.pubsub_soft_since = None
        if over is not None:
            log.warning("client %s left %d bytes of messages unread (%s): disconnected",
                        self.transport.get_extra_info("peername"), unread, over)  # type: ignore[union-attr]
            if self.splicer.metrics is not None:
                self.splicer.metrics.client_error("unread_replies")
            self.transport.abort()  # type: ignore[union-attr]
            return
        if self.session.proto == 3 and merge._base > self.last_pubsub_seq:
            # RESP3 pushes are out of band: once every slot holding confirmations or messages
            # is written, they go out now, not behind the replies still due (a BLPOP blocked
            # for seconds held them back); before that, in order behind those slots.
            merge._ready.append(frame)
            merge.held_bytes += len(frame)
        else:
            seq = merge.open()
            merge.finish(seq, frame)
            self.last_pubsub_seq = seq
        self._mark()

    def _drop_subscribers(self, error: bytes = b"") -> None:
        subscribers, self.subscribers = self.subscribers, {}
        for sub in subscribers.values():
            sub.close(error)

    def _drop_blockers(self) -> None:
        for b in list(self.blockers.values()):
            b.close()

    def _subscriptions_lost(self, error: bytes) -> None:
        """A subscribed connection failed: answer what is pending with `error`, then close."""
        self._drop_subscribers(error)
        if not self.closed:
            self.closing = True
            self._pause()
            self._mark()

    def _mark(self) -> None:
        if not self.dirty:
            self.dirty = True
            self.splicer._dirty_clients.append(self)

    def flush(self) -> None:
        self.dirty = False
        if self.closed:
            return
        merge = self.merge
        if merge._ready:
            self.transport.write(merge.pop_ready())  # type: ignore[union-attr]
            if self.write_paused and self.transport.get_write_buffer_size() > self.max_unread:  # type: ignore[union-attr]
                # Reading stops at max_buffer_bytes, but the replies of requests already sent
                # still come: a client that never reads would hold them all.
                log.warning("client %s left %d reply bytes unread (limits.max_unread_bytes): disconnected",
                            self.transport.get_extra_info("peername"), self.transport.get_write_buffer_size())  # type: ignore[union-attr]
                if self.splicer.metrics is not None:
                    self.splicer.metrics.client_error("unread_replies")
                self.transport.abort()  # type: ignore[union-attr]
                return
        if self.read_paused and not self.closing:
            self._maybe_resume()
        if (self.closing or self.eof) and merge.idle and not self.outstanding:
            close_lingering(self.transport, self.splicer._loop, self.eof)  # type: ignore[arg-type]
            self.closed = True

    def _pause(self) -> None:
        if not self.read_paused and not self.closed:
            self.read_paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]

    def _maybe_resume(self) -> None:
        if not self.read_paused or self.closed or self.closing or self.write_paused or not self.merge.drained:
            return  # closing (QUIT, a protocol error, a graceful stop): nothing more is read
        # Requests already buffered are handled before reading more from the socket.
        self._process()
        if not self.merge.full and not self.write_paused:
            self.read_paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]


class RedisSplicer:
    """A Redis splicing proxy configured by a `RedisSpliceConfig`.

    `await start()` binds the listener and opens the first `pool.min` connections per server;
    `await stop()` closes everything. `stats()` reports pools and clients (for tests and CLI).
    """

    def __init__(self, config: RedisSpliceConfig, metrics: Any = None) -> None:
        self.config = config
        self.metrics = metrics
        self.lanes = config.pool.max
        specs = []
        for s in config.servers:
            host, port = split_address(s.address)
            specs.append((host, port, s.weight, server_name(host, port, s.name)))
        self._ketama_args = dict(hash_name=config.hash, hash_tag=(config.hash_tag or "").encode(),
                                 distribution=config.distribution)
        self._kservers = [KetamaServer(name, weight) for _, _, weight, name in specs]
        self.router = Router(Ketama(self._kservers, **self._ketama_args), self.lanes)
        self.session_config = SessionConfig(password=config.password, db=config.db)
        self._servers = [_Server(self, i, h, p, w, n) for i, (h, p, w, n) in enumerate(specs)]
        # proto -> placement code (server * lanes + lane, see Router) -> lane
        self._lane_table = {proto: [srv.lanes[proto][ln] for srv in self._servers for ln in range(self.lanes)]
                            for proto in (2, 3)}
        self._clients: set[_Client] = set()
        self.accepting = Accepting(5.0)  # accepted, not yet connected: a graceful stop waits for them
        self._subscribers: set[_Subscriber] = set()  # every client's subscribed connections
        self._blockers: set[_Blocker] = set()  # every client's connections for blocking commands and WATCH
        self._started = time.monotonic()
        self._run_id = os.urandom(20).hex()  # INFO's run_id: this worker's, as a server's is its process's
        self.draining = False
        self._dirty_lanes: list[_Lane] = []
        self._dirty_clients: list[_Client] = []
        self._listener: asyncio.AbstractServer | None = None
        self._tasks: list[asyncio.Task] = []
        self.closing = False
        self.address: tuple[str, int] | None = None
        self._handshake_cache: dict[int, list[bytes]] = {}
        self._flush_scheduled = False
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by start()
        if metrics is not None:
            for srv in self._servers:
                srv.metrics.bind_pool(  # type: ignore[union-attr]
                    free=lambda s=srv: float(sum(1 for ln in s.all_lanes() if ln.state == _READY and not ln.inflight)),
                    in_use=lambda s=srv: float(sum(1 for ln in s.all_lanes() if ln.state == _READY and ln.inflight)),
                    up=lambda s=srv: 1.0 if s.up else 0.0)
                srv.metrics.inflight.set_function(  # type: ignore[union-attr]
                    lambda s=srv: float(sum(len(ln.inflight) for ln in s.all_lanes())))

    # -- life cycle ------------------------------------------------------------------------
    async def start(self, sock: socket.socket | None = None) -> tuple[str, int]:
        """Listen (on `config.listen`, or an already bound `sock`) and open the minimum pools."""
        loop = self._loop = asyncio.get_running_loop()
        await self._learn_version()
        if sock is not None:
            self._listener = await loop.create_server(lambda: _Client(self), sock=sock, backlog=1024)
        else:
            host, port = split_address(self.config.listen)
            self._listener = await loop.create_server(lambda: _Client(self), host, port, backlog=1024,
                                                      reuse_address=True)
        self.address = self._listener.sockets[0].getsockname()[:2]
        for srv in self._servers:
            for proto in (2, 3):  # redis-py 8 speaks RESP3 by default, redis-cli and most others RESP2
                for lane in srv.lanes[proto][: self.config.pool.min]:
                    lane.connect()
        self._tasks.append(asyncio.ensure_future(self._ticker()))
        if self.config.health.enabled:
            for srv in self._servers:
                self._tasks.append(asyncio.ensure_future(self._health_loop(srv)))
        return self.address  # type: ignore[return-value]

    def drain(self) -> None:
        """Start a graceful stop: stop listening, and have every client answer the commands it
        has read and then close (`_Client.drain`). Backends stay up until `stop`."""
        self.draining = True
        if self._listener is not None:
            self._listener.close()
        for c in list(self._clients):
            c.drain()
        self._schedule_flush()

    @property
    def client_count(self) -> int:
        """Client connections open now, and those accepted on their way to being so."""
        return len(self._clients) + self.accepting.count()

    async def stop(self) -> None:
        """Stop listening, close clients and backend connections, cancel timers."""
        self.closing = True
        if self._listener is not None:
            self._listener.close()
        for t in self._tasks:
            t.cancel()
        for c in list(self._clients):
            c._drop_subscribers()
            c._drop_blockers()
            if c.transport is not None:
                c.transport.close()
        for srv in self._servers:
            for lane in srv.all_lanes():
                lane.close()
                if lane.connect_task is not None:
                    lane.connect_task.cancel()
        # Bounded, and the loops below also end on `closing`: Python 3.11's wait_for can swallow
        # a cancellation that lands as its inner wait completes (CPython gh-86296), and a health
        # loop that missed its cancel kept stop() waiting for ever (seen once in CI).
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)
        if self._listener is not None:
            await self._listener.wait_closed()

    async def serve_forever(self) -> None:
        """Run until cancelled."""
        await asyncio.Event().wait()

    # -- helpers used by clients and lanes ------------------------------------------------------
    def _schedule_flush(self) -> None:
        # Writes wait for the end of this event-loop round, so requests of many clients bound
        # for one lane (and replies from many lanes bound for one client) leave in one write.
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        lanes = self._dirty_lanes
        clients = self._dirty_clients
        while lanes or clients:
            if lanes:
                self._dirty_lanes = []
                for ln in lanes:
                    ln.flush()
            if clients:
                self._dirty_clients = []
                for c in clients:
                    c.flush()
            lanes = self._dirty_lanes
            clients = self._dirty_clients

    def _down_error(self, server: int) -> bytes:
        srv = self._servers[server]
        if srv.metrics is not None:
            srv.metrics.error("unavailable", 1)  # one request refused at once
        why = f"last error: {srv.last_error}; " if srv.last_error else ""
        cfg = self.config
        if cfg.auto_eject and not srv.up and cfg.health.mode == "passive":
            h = cfg.health
            checks = "a passing check" if h.rise == 1 else f"{h.rise} passing checks"
            return encode_error(f"ERR splicer: backend {srv.label} is unavailable ({why}ejected after {h.fall} "
                                f"failure(s) in a row: back after {checks}, one every {h.interval:g} s from "
                                "the ejection)")
        if cfg.auto_eject and not srv.up:
            # Ejected: no connection is tried until health checks pass again, whatever retry_at says.
            return encode_error(f"ERR splicer: backend {srv.label} is unavailable ({why}ejected by health checks: "
                                f"back after {cfg.health.rise} passing checks, one every {cfg.health.interval:g} s)")
        wait = max(0.0, srv.retry_at - time.monotonic())
        return encode_error(f"ERR splicer: backend {srv.label} is unavailable ({why}next connection attempt in "
                            f"{wait * 1000:.0f} ms)")

    def own_info(self) -> dict[str, dict[str, str]]:
        """INFO's fields about the splicer itself (redis_info.merge_info lays them over the
        servers'): this worker process and its clients."""
        up = int(time.monotonic() - self._started)
        return {
            "Server": {"process_id": str(os.getpid()), "run_id": self._run_id,
                       "tcp_port": str(self.address[1]) if self.address else "",
                       "uptime_in_seconds": str(up), "uptime_in_days": str(up // 86400), "executable": "",
                       "config_file": "", "splicer_version": f"shmfabric {__version__}",
                       "splicer_servers": str(len(self._servers))},
            "Clients": {"connected_clients": str(len(self._clients))},
        }

    def _handshake(self, proto: int) -> list[bytes]:
        hs = self._handshake_cache.get(proto)
        if hs is None:
            cfg = self.config
            hs = []
            if cfg.backend_password is not None and proto == 2:
                auth = [b"AUTH"] + ([cfg.backend_username.encode()] if cfg.backend_username else []) + [cfg.backend_password.encode()]
                hs.append(encode_command(auth))
            if proto == 3:
                hello = [b"HELLO", b"3"]
                if cfg.backend_password is not None:
                    hello += [b"AUTH", (cfg.backend_username or "default").encode(), cfg.backend_password.encode()]
                hs.append(encode_command(hello))
            if cfg.db:
                hs.append(encode_command([b"SELECT", str(cfg.db).encode()]))
            self._handshake_cache[proto] = hs
        return hs

    def _record_health(self, srv: _Server, ok: bool) -> None:
        h = self.config.health
        if h.mode == "passive":
            # twemproxy's way: failures count only where they can eject (auto_eject, and checks to
            # bring the server back); without, every request tries the server.
            if not (self.config.auto_eject and h.enabled):
                return
            srv.failing = not ok and srv.up
        changed = srv.health.record(ok)
        if changed is None:
            return
        srv.up = changed
        if not changed:
            srv.down_at = time.monotonic()
            srv.went_down.set()
        log.warning("backend %s is %s", srv.label, "up" if changed else "down")
        if changed:
            srv.retry_at = 0.0
            srv.backoff.reset()
        if self.config.auto_eject:
            live = [s.up for s in self._servers]
            if any(live):
                self.router.set_ketama(Ketama(self._kservers, live=live, **self._ketama_args))

    def _replied(self, srv: _Server) -> None:
        """A request's reply came from `srv` (a handshake's does not count): with health.mode
        passive, its failures so far are forgotten, as twemproxy's server_ok does."""
        if srv.up:
            srv.health.record(True)
            srv.failing = False

    async def _learn_version(self) -> None:
        """Ask one server for its version, reported to clients in HELLO."""
        for srv in self._servers:
            try:
                # not as long as a check may wait (passive mode: a request's timeout): a hung
                # server must not hold the start back (workers have 30 s to accept)
                reply = await self._probe(srv, [b"INFO", b"server"], min(2.0, self.config.health.timeout))
            except (OSError, asyncio.TimeoutError, RespProtocolError):
                continue
            for line in reply.split(b"\r\n"):
                if line.startswith(b"redis_version:"):
                    version = line.split(b":", 1)[1].decode(errors="replace")
                    self.session_config = SessionConfig(password=self.config.password, db=self.config.db,
                                                        server_version=version)
                    return

    async def _probe(self, srv: _Server, command: list[bytes], timeout: float | None = None) -> bytes:
        """Open a short connection, authenticate, send one command, return its reply bytes
        (each step within `timeout`, health.timeout by default)."""
        if timeout is None:
            timeout = self.config.health.timeout
        connect = timeout
        if self.config.health.mode == "passive":
            # There a check may wait for a reply as long as a request does (health.timeout is
            # the pool's timeout), but a connection is opened within timeouts.connect like any other.
            connect = min(timeout, self.config.timeouts.connect)
        reader, writer = await asyncio.wait_for(asyncio.open_connection(srv.host, srv.port), connect)
        try:
            payload = b"".join(self._handshake(2)) + encode_command(command)
            writer.write(payload)
            scanner = ReplyScanner()
            want = len(self._handshake(2)) + 1
            replies: list[bytes] = []
            while len(replies) < want:
                data = await asyncio.wait_for(reader.read(65536), timeout)
                if not data:
                    raise ConnectionResetError("closed by the server")
                scanner.feed(data)
                while (r := scanner.next()) is not None:
                    replies.append(r)
            for r in replies[:-1]:
                if r[:1] == b"-":
                    raise RespProtocolError(r[1:-2].decode(errors="replace"))
            return replies[-1]
        finally:
            writer.close()

    async def _health_loop(self, srv: _Server) -> None:
        h = self.config.health
        passive = h.mode == "passive"
        while not self.closing:
            if passive:
                # No check while the server is up (twemproxy checks nothing); once down, the first
                # check comes `interval` after it went down, the next `interval` after each failed one.
                if srv.up:
                    srv.went_down.clear()
                    await srv.went_down.wait()
                    continue
                await asyncio.sleep(max(0.0, srv.down_at + h.interval - time.monotonic()))
            else:
                await asyncio.sleep(h.interval)
            try:
                reply = await self._probe(srv, [b"PING"])
                ok = reply == b"+PONG\r\n"
            except (OSError, asyncio.TimeoutError, RespProtocolError):
                ok = False
            self._record_health(srv, ok)
            if passive and not srv.up:
                srv.down_at = time.monotonic()

    async def _ticker(self) -> None:
        """Enforce the per-request timeout and keep `pool.min` connections open."""
        timeout = self.config.timeouts.request
        period = min(0.1, timeout / 4)
        pool_min = self.config.pool.min
        auto_eject = self.config.auto_eject
        while not self.closing:
            await asyncio.sleep(period)
            now = time.monotonic()
            for srv in self._servers:
                for lanes in srv.lanes.values():
                    for lane in lanes:
                        # Timed out: the oldest request waited past the timeout and the server
                        # sent nothing for as long (a server still streaming a large reply, or
                        # the replies of a deep pipeline, is busy, not stalled).
                        q = lane.inflight
                        if q and now - q[0][2] > timeout and now - lane.last_rx > timeout:
                            lane._fail(f"did not answer within {timeout:g} s", "timeout")
                if auto_eject and not srv.up:
                    continue  # ejected: its health checks say when it is back, not reconnects
                for lanes in srv.lanes.values():
                    for lane in lanes[:pool_min]:
                        if lane.state == _DISCONNECTED and now >= srv.retry_at and not self.closing:
                            lane.connect()
            for b in list(self._blockers):
                p = b.pending
                if p and p[0][3] is not None and now > p[0][3] and now - b.last_rx > timeout:
                    b.fail(f"did not answer within {timeout:g} s (beyond the command's own timeout)")
            for sub in list(self._subscribers):
                p = sub.pending
                if p and now - p[0][2] > timeout and now - sub.last_rx > timeout:
                    sub.fail(f"did not confirm a subscription within {timeout:g} s")
            self._flush()

    # -- introspection ---------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Pools, in-flight requests and clients, in a fixed shape (tests, CLI)."""
        servers = []
        for srv in self._servers:
            lanes = srv.all_lanes()
            servers.append({
                "server": srv.label,
                "up": srv.up,
                "connections": sum(1 for ln in lanes if ln.state == _READY),
                "connecting": sum(1 for ln in lanes if ln.state == _CONNECTING),
                "inflight": sum(len(ln.inflight) for ln in lanes),
            })
        return {"clients": len(self._clients), "servers": servers}


def run_redis_splicer(config: RedisSpliceConfig, *, sock: socket.socket, metrics_sock: socket.socket | None,
                      ready: Callable[[], None]) -> None:
    """Run a splicer in this process until its graceful stop is over (uvloop when installed).

    It listens on `sock` (a worker of `workers.Master`), serves metrics on `metrics_sock` if
    given, and calls `ready()` once it accepts connections.
    """
    install_uvloop()
    metrics = None
    stop_metrics: Callable[[], None] | None = None
    if metrics_sock is not None:
        from .metrics import SpliceMetrics, serve_socket

        metrics = SpliceMetrics("redis")
        stop_metrics = serve_socket(metrics.registry, metrics_sock)

    async def main() -> None:
        splicer = RedisSplicer(config, metrics)
        host, port = await splicer.start(sock=sock)
        # Per-request objects are acyclic and freed by reference counting; the cyclic GC only
        # adds pauses (a full collection walks every live object). Start-up objects are frozen
        # out of its reach and collections made rarer.
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        log.info("redis splicer listening on %s:%d", host, port)
        stop = GracefulStop(asyncio.get_running_loop())
        ready()

        def drain() -> None:
            splicer.drain()
            if stop_metrics is not None:
                stop_metrics()  # the metrics port goes to the worker that replaces this one

        try:
            cutting = await stop.run(drain, lambda: splicer.client_count, config.timeouts.drain)
            if cutting:
                log.warning("%s", cutting)
        finally:
            await splicer.stop()

    asyncio.run(main())
