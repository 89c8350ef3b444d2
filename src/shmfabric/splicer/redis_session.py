"""One client connection's Redis state and the decision for each of its commands (sans-IO).

`RedisSession.handle(args)` takes one parsed command and returns an *action* for the I/O
shell: answer these bytes now, forward these bytes to (server, pool connection), split over
several servers and merge the replies, or close. It keeps what Redis keeps per connection and
a proxy must answer itself: the protocol version (HELLO 2/3), authentication, the client name
and library info, the selected database, a MULTI block in progress.

`Router` places keys: ketama picks the server (twemproxy-compatible, `redis_ketama`), and the
same key hash picks the *lane*, i.e. which of the server's pooled connections carries it. A
key always travels on one lane, so commands on one key run in the order the client sent them
even though a client's commands spread over several connections per server (twemproxy issue
#193 is exactly this reordering). A multi-key command whose keys sit on different lanes of one
server is marked a *barrier*: the shell lets this client's earlier requests finish first and
starts later ones only after it, which keeps per-key order without pinning whole clients.

Pure: no sockets, no asyncio, no clock.
"""
from __future__ import annotations

import os

from bisect import bisect_left
from collections import deque
from dataclasses import dataclass
from typing import Any
from itertools import chain, compress, islice

import hiredis

from .redis_commands import COMMANDS, REFUSED, Kind, check_arity, command_keys, lookup, stream_options
from .ordered import BoundedSlots
from .redis_fanout import MERGES, merge_all_ok, scan_tag
from .redis_fanout import plan as plan_fanout
from .redis_ketama import Ketama
from .redis_pubsub import ALLOWED_IN_RESP2, SUBSCRIBING, Subscriptions, resp2_context_error, subscribed_ping
from .redis_resp import (
    OK,
    PONG,
    QUEUED,
    encode_bulk,
    encode_command,
    encode_error,
    encode_int,
    encode_map,
    encode_value,
    join_bulks,
)

__all__ = [
    "Router",
    "RedisSession",
    "SessionConfig",
    "REPLY",
    "CLOSE",
    "FORWARD",
    "SPLIT",
    "EXEC",
    "PUBSUB",
    "BLOCK",
    "UNWATCH",
    "merge_mget",
    "KeyGroup",
    "merge_sum",
    "merge_mset",
    "merge_parts",
    "command_info",
    "ReplyOrder",
]

# Action tags (first element of the tuples `handle` returns).
REPLY = 1  # (REPLY, bytes)
CLOSE = 2  # (CLOSE, bytes): write the bytes, then close the client (QUIT)
FORWARD = 3  # (FORWARD, barrier, proto, server, lane, payload)
SPLIT = 4  # (SPLIT, barrier, proto, kind, nkeys, parts); parts: [(server, lane, payload, positions)]
EXEC = 5  # (EXEC, barrier, proto, server, lane, payload, nreplies): only the last reply is the client's
# (PUBSUB, barrier, proto, reply, sends, drop, subscribing): close the client's subscribed
# connections if `drop`, send each (server, payload, confirmations) on the client's own
# connection to that server, and answer `reply` once every server confirmed (redis_pubsub);
# `subscribing`: (P|S)SUBSCRIBE, whose confirmations go ahead of the messages a server sends
# meanwhile (an unsubscribe's go after them)
PUBSUB = 6
# (BLOCK, barrier, proto, server, payload, nreplies, override, watch, wait): over the client's
# own connection to `server` (a blocked command must not hold up a pooled connection, and
# WATCH lives on one connection): the last of `nreplies` replies is the client's, or
# `override` in its place if given. `watch`: WATCH_SET (this is a WATCH), WATCH_USE (EXEC,
# DISCARD or UNWATCH of a WATCH: void if the connection that holds it was lost since), or
# None. `wait`: the seconds the command may block (None: for ever), added to the timeout.
BLOCK = 7
WATCH_SET = 1
WATCH_USE = 2
# barrier (bool): start only when this client has no request in flight, and hold later ones
# until it is answered. REPLY actions carry no flag: HELLO that changes the protocol is
# returned as (REPLY, bytes, True) to ask for the "earlier requests first" half.


class Router:
    """Key -> (server index, lane). `lanes` is the pool size (connections) per server.

    Internally a placement is one small int, ``server * lanes + lane`` (a *code*): ints hash
    and compare faster than tuples, which matters when a 1000-key MGET is grouped per lane.
    """

    __slots__ = ("ketama", "channels", "lanes", "pairs", "pool", "scan_tag", "_cache", "_cache_max")

    def __init__(self, ketama: Ketama, lanes: int, cache_size: int = 131072) -> None:
        if lanes < 1:
            raise ValueError("lanes must be at least 1")
        self.ketama = ketama
        # Pub/sub channels are placed on every configured server, whatever auto_eject does:
        # a subscriber stays where publishers will look for it when an ejected server returns.
        self.channels = ketama
        self.lanes = lanes
        self.pairs = [(c // lanes, c % lanes) for c in range(len(ketama.servers) * lanes)]
        self._set_pool()
        # Placement is a pure function of the key, so it is cached: hashing dominates the cost
        # of splitting a large MGET, and hot keys repeat. Bounded; cleared when full or when the
        # continuum changes.
        self._cache: dict[bytes, int] = {}
        self._cache_max = cache_size

    def set_ketama(self, ketama: Ketama) -> None:
        """Swap the continuum (servers ejected or returned) and forget cached placements."""
        self.ketama = ketama
        if all(ketama.live):  # every server back: channels and keys share the continuum again
            self.channels = ketama
        self._cache = {}
        self._set_pool()

    def _set_pool(self) -> None:
        # Whole-server commands go to the servers in the continuum (all but ejected ones), and
        # SCAN cursors carry a tag of their names (redis_fanout).
        k = self.ketama
        self.pool = [i for i, up in enumerate(k.live) if up]
        self.scan_tag = scan_tag([k.servers[i].name for i in self.pool])

    def code(self, key: bytes) -> int:
        """The placement code of `key` (see the class docstring)."""
        cache = self._cache
        hit = cache.get(key)
        if hit is not None:
            return hit
        k = self.ketama
        # Ketama.key_hash and Ketama.dispatch, inlined: a key's first placement is most of a
        # pipelined SET's cost when keys are fresh.
        if k.hash_tag:
            h = k.key_hash(key)
        else:
            h = k._hash(key) if key else 0
        if len(k.servers) == 1:
            server = 0
        else:
            values = k._values
            if not values:
                raise LookupError("no live server")
            if k.modula:
                server = k._index[h % len(values)]
            else:
                i = bisect_left(values, h)
                server = k._index[i if i < len(values) else 0]
        hit = server * self.lanes + h % self.lanes
        if len(cache) >= self._cache_max:
            # Forget the older half (dicts keep insertion order): cheap, and keys that are
            # still hot come back at once.
            for old in list(islice(cache, len(cache) // 2)):
                del cache[old]
        cache[key] = hit
        return hit

    def place(self, key: bytes) -> tuple[int, int]:
        """(server index, lane) of `key`."""
        return self.pairs[self.code(key)]

    def channel_place(self, channel: bytes) -> tuple[int, int]:
        """(server index, lane) of a pub/sub channel: as a key would be placed with every
        configured server in the continuum (the same as `place` while none is ejected)."""
        k = self.channels
        if k is self.ketama:  # nothing ejected: the keys' cached placement
            return self.pairs[self.code(channel)]
        return k.locate(channel), k.key_hash(channel) % self.lanes


class ReplyOrder(BoundedSlots):
    """The replies of one client connection, released strictly in request order.

    The Redis form of `ordered.OrderedMerge`: a Redis reply always arrives whole (the shell
    finds its end before handing it over), so a slot is just ``None`` (waiting) or the reply's
    bytes, and finishing the head moves it and every finished slot after it to `ready`. The
    shell's hot paths do `open` and `finish` inline on these fields (one Python call less per
    request each, which is a tenth of the splicer's cost per pipelined GET), so the fields are
    part of the interface:

    * ``_slots``: deque of ``None | bytes``, slot of sequence number ``_base + i`` at ``i``;
    * ``_base``: sequence number of the head slot; the next one opened is ``_base + len(_slots)``;
    * ``_ready``: bytes that may be written to the client now, in order;
    * ``held_bytes``: bytes in finished slots plus bytes in ``_ready`` (the backpressure bound).

    Bounds as `OrderedMerge`: `full` when `max_slots` requests or `max_bytes` reply bytes are
    held, `drained` at half of both (hysteresis, so reading does not flap at the limit).
    """

    __slots__ = ()

    def __init__(self, max_slots: int = 1024, max_bytes: int = 4 * 1024 * 1024) -> None:
        super().__init__(max_slots, max_bytes)

    def open(self) -> int:
        """Reserve the next slot and return its sequence number."""
        slots = self._slots
        slots.append(None)
        return self._base + len(slots) - 1

    def finish(self, seq: int, reply: bytes) -> None:
        """Give slot `seq` its whole reply (ready at once if it is the head)."""
        idx = seq - self._base
        slots = self._slots
        if idx < 0 or idx >= len(slots) or slots[idx] is not None:
            raise ValueError(f"slot {seq} is not open or already answered")
        self.held_bytes += len(reply)
        if idx:
            slots[idx] = reply
            return
        ready = self._ready
        ready.append(reply)
        slots.popleft()
        base = self._base + 1
        while slots and slots[0] is not None:
            ready.append(slots.popleft())
            base += 1
        self._base = base

    def pop_ready(self) -> bytes:
        """The bytes that may be written to the client now (b"" if none), forgotten here."""
        ready = self._ready
        if not ready:
            return b""
        self._ready = []
        out = ready[0] if len(ready) == 1 else b"".join(ready)
        self.held_bytes -= len(out)
        return out


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """What sessions share: client-facing credentials, database, reported server version."""

    password: str | None = None  # clients must AUTH with this (like requirepass); None: open
    username: str = "default"
    db: int = 0
    server_version: str = "7.0.0"


_next_client_id = 0


def _new_client_id() -> int:
    # The pid in the high bits: the workers of one splicer (forked, same counter) never hand
    # out the same id.
    global _next_client_id
    _next_client_id += 1
    return (os.getpid() << 32) | _next_client_id


_WRONGPASS = encode_error("WRONGPASS invalid username-password pair or user is disabled.")
_NOAUTH = encode_error("NOAUTH Authentication required.")
_EMPTY_ARRAY = b"*0\r\n"


def _err_args(name: bytes) -> bytes:
    return encode_error(f"ERR wrong number of arguments for '{name.decode(errors='replace').lower()}' command")


def _unknown(args: list[bytes]) -> bytes:
    # Worded as redis-server's (server.c processCommand): each argument quoted and followed by a
    # space while the list is under 128 characters, the last one cut to what is left of them.
    shown = ""
    for a in args[1:]:
        if len(shown) >= 128:
            break
        shown += f"'{a.decode(errors='replace')[:128 - len(shown)]}' "
    return encode_error(f"ERR unknown command '{args[0][:128].decode(errors='replace')}', with args beginning with: {shown}")


class RedisSession:
    """The state of one client connection and the action for each of its commands."""

    __slots__ = (
        "router",
        "config",
        "proto",
        "authed",
        "name",
        "lib_name",
        "lib_ver",
        "client_id",
        "multi",
        "multi_error",
        "closing",
        "idle",
        "subs",
        "subscribed",
        "own_info",
        "addr",
        "laddr",
        "fd",
        "watching",
    )

    def __init__(self, router: Router, config: SessionConfig | None = None) -> None:
        self.router = router
        self.config = config or SessionConfig()
        self.proto = 2
        self.authed = self.config.password is None
        self.name: bytes | None = None
        self.lib_name: bytes | None = None
        self.lib_ver: bytes | None = None
        self.client_id = _new_client_id()
        self.multi: list[list[bytes]] | None = None  # commands queued since MULTI
        self.multi_error = False
        self.closing = False
        # Set by the I/O shell before `handle`: True when none of this client's earlier commands
        # is still in flight or held back. Then an MGET may read a server's keys over one of its
        # connections instead of one part per connection (see _split).
        self.idle = False
        self.subs: Subscriptions | None = None  # made by the first (P|S)SUBSCRIBE
        # A RESP2 client with subscriptions may only send ALLOWED_IN_RESP2 (the shell's fast
        # path checks this flag too).
        self.subscribed = False
        # INFO's Server and Clients fields about the splicer itself (set by the I/O shell; see
        # redis_info.merge_info): a function, called when the reply is merged.
        self.own_info: Any = None
        # The client's connection, for CLIENT INFO (the shell sets them; RQ's worker reads addr).
        self.addr = ""
        self.laddr = ""
        self.fd = -1
        self.watching: int | None = None  # the server holding this client's WATCHed keys

    # -- entry point -------------------------------------------------------------------------
    def handle(self, args: list[bytes]) -> tuple:
        """Decide what to do with one command (a non-empty list of bytes arguments)."""
        name = args[0]
        spec = COMMANDS.get(name)
        if spec is not None and spec.single and self.multi is None and self.authed and not self.subscribed:
            # Fast path: a one-key command (GET, SET, INCR, HSET...) goes whole to its lane.
            n = len(args)
            a = spec.arity
            if n == a if a > 0 else n >= -a:
                router = self.router
                code = router._cache.get(args[1])
                if code is None:
                    code = router.code(args[1])
                server, lane = router.pairs[code]
                return (FORWARD, False, self.proto, server, lane, encode_command(args))
        if spec is None:
            name = name.upper()
            spec = COMMANDS.get(name)
        if not self.authed and name not in (b"AUTH", b"HELLO", b"QUIT", b"RESET"):
            return (REPLY, _NOAUTH)
        if spec is None:
            reason = REFUSED.get(name)
            if self.multi is not None:
                self.multi_error = True
            if reason is not None:
                if self.subscribed:  # a command Redis knows: its subscribed-mode refusal
                    return (REPLY, encode_error(resp2_context_error(args)))
                return (REPLY, encode_error(f"ERR '{name.decode().lower()}' is not supported by the splicer: {reason}"))
            return (REPLY, _unknown(args))
        if not check_arity(spec, len(args)):
            if self.multi is not None:
                self.multi_error = True
            return (REPLY, _err_args(name))
        if self.subscribed and name not in ALLOWED_IN_RESP2:  # after Redis's own checks, as Redis does
            return (REPLY, encode_error(resp2_context_error(args)))
        kind = spec.kind
        if self.multi is not None and name not in (b"EXEC", b"DISCARD", b"MULTI", b"QUIT", b"RESET"):
            return self._queue(spec, name, args)
        if name in _PUBLISH:
            # Every PUBLISH to a server goes over one of its connections (the first): a client's
            # pipelined PUBLISHes then run on each server in the order sent, so a subscriber of
            # several channels there gets their messages in that order, as from one redis-server.
            server = self.router.channel_place(args[1])[0]
            return (FORWARD, False, self.proto, server, 0, encode_command(args))
        if kind == Kind.KEYED:
            try:
                keys = command_keys(spec, args)
            except ValueError:
                return (REPLY, _keys_error(spec, name, args))
            return self._keyed(name, args, keys)
        if kind == Kind.LOCAL:
            return self._local(name, args)
        if kind == Kind.MGET:
            return self._split(Kind.MGET, name, args, args[1:], 1)
        if kind == Kind.SUM:
            return self._split(Kind.SUM, name, args, args[1:], 1)
        if kind == Kind.MSET:
            if len(args) % 2 != 1:
                return (REPLY, _err_args(name))
            return self._split(Kind.MSET, name, args, args[1::2], 2)
        if kind == Kind.SCRIPT:
            err = _script_error(args)
            if err is not None:
                return (REPLY, err)
            return self._keyed(name, args, command_keys(spec, args))
        if kind == Kind.FANOUT:
            router = self.router
            planned = plan_fanout(name, args, router.pool, encode_command(args), router.scan_tag,
                                  range(len(router.ketama.servers)), self.own_info)
            if type(planned) is bytes:
                return (REPLY, planned)
            merge, parts = planned
            # A barrier: it sees every earlier write, whichever connection carried it.
            return (SPLIT, True, self.proto, merge, len(parts), parts)
        if kind == Kind.PUBSUB:
            return self._pubsub(name, args)
        if kind == Kind.BLOCKING:
            return self._blocking(spec, name, args)
        if kind == Kind.WATCH:
            return self._watch(name, args)
        raise AssertionError(f"unhandled kind {kind}")

    def _blocking(self, spec, name: bytes, args: list[bytes]) -> tuple:
        try:
            keys = command_keys(spec, args)
        except ValueError:
            return (REPLY, _keys_error(spec, name, args))
        if spec.streams and stream_options(args)[1] is None:
            return self._keyed(name, args, keys)  # XREAD without BLOCK: an ordinary read
        server = self._single_server(keys)
        if server is None:
            return (REPLY, _cross_server(name))
        # A barrier, as on a Redis connection: nothing after it runs while it is blocked.
        return (BLOCK, True, self.proto, server, encode_command(args), 1, None, None, _block_seconds(spec, args))

    def _watch(self, name: bytes, args: list[bytes]) -> tuple:
        """WATCH and UNWATCH: on the client's own connection to the watched keys' server, where
        EXEC then runs the transaction."""
        if name == b"UNWATCH":
            if self.watching is None:
                return (REPLY, OK)
            server, self.watching = self.watching, None
            return (BLOCK, True, self.proto, server, UNWATCH, 1, None, WATCH_USE, 0.0)
        server = self._single_server(args[1:])
        if server is None or (self.watching is not None and self.watching != server):
            return (REPLY, encode_error("CROSSSERVER the keys WATCHed by this connection live on different servers; "
                                        "keep them together with a hash tag ({...})"))
        self.watching = server
        return (BLOCK, True, self.proto, server, encode_command(args), 1, None, WATCH_SET, 0.0)

    def _single_server(self, keys: list[bytes]) -> int | None:
        """The server holding every one of `keys`, or None if they are spread."""
        place = self.router.place
        server = place(keys[0])[0]
        return server if all(place(k)[0] == server for k in keys[1:]) else None

    def _pubsub(self, name: bytes, args: list[bytes]) -> tuple:
        subs = self.subs
        if subs is None:
            router = self.router
            subs = self.subs = Subscriptions(lambda channel: router.channel_place(channel)[0],
                                             lambda: range(len(router.channels.servers)))
        reply, sends = subs.change(name, args[1:], self.proto)
        self.subscribed = self.proto == 2 and subs.active
        # A barrier: later commands run once the subscription is in place on every server.
        return (PUBSUB, True, self.proto, reply, sends, False, name in SUBSCRIBING)

    # -- routing ---------------------------------------------------------------------------
    def _keyed(self, name: bytes, args: list[bytes], keys: list[bytes]) -> tuple:
        if not keys:
            return (REPLY, encode_error(f"ERR the splicer routes '{name.decode().lower()}' by its keys and this call names none"))
        place = self.router.place
        server, lane = place(keys[0])
        barrier = False
        for k in keys[1:]:
            s, ln = place(k)
            if s != server:
                return (REPLY, _cross_server(name))
            if ln != lane:
                barrier = True
        return (FORWARD, barrier, self.proto, server, lane, encode_command(args))

    def _split(self, kind: int, name: bytes, args: list[bytes], keys: list[bytes], width: int) -> tuple:
        # Written with map/compress/translate so the per-key work runs in C: a 1000-key MGET is
        # the case the latency target is about.
        router = self.router
        pairs = router.pairs
        n = len(keys)
        parts = []
        hits: list[int] = []
        if n <= _SMALL_SPLIT:
            # A few keys (a cache's multi-get): the dict grouping below costs less than setting
            # up the C passes, and its position lists let merge_mget splice the parts' replies.
            hits = list(map(router.code, keys))
            barrier = False
            if kind == Kind.MGET and self.idle and router.lanes > 1:
                # As below: an idle client's read of a server goes over one of its connections.
                homes = _home_codes(sorted(set(hits)), router.lanes)
                homed = [homes[c] for c in hits]
                if homed != hits:
                    hits, barrier = homed, True
            return self._split_grouped(kind, name, args, keys, width, hits, barrier)
        try:
            # The placement codes as one bytes object, straight from the cache (TypeError: a
            # key not placed yet; ValueError: codes past 255, i.e. over 255 connections in all).
            packed: bytes | None = bytes(map(router._cache.get, keys))
        except (TypeError, ValueError):
            code = router.code
            hits = list(map(code, keys))
            try:
                packed = bytes(hits)
            except ValueError:
                packed = None
        if packed is not None and len(pairs) <= 16:
            codes = [c for c in range(len(pairs)) if c in packed]  # a memchr each
            barrier = False
            if kind == Kind.MGET and self.idle and router.lanes > 1 and len(codes) > 1:
                # A read whose client has nothing else in flight: each server's keys go in one
                # part over one of its connections (the lowest placed), not one part per
                # connection. That halves the parts (writes, reads, encodes, grouping passes)
                # of a large MGET with pool 2. A key read over another lane than its own could
                # be overtaken by the client's *later* commands on its own lane, so the MGET is
                # a barrier: later commands wait for its reply (nothing earlier is in flight).
                homes = _home_codes(codes, router.lanes)
                used = sorted(set(homes.values()))
                if len(used) < len(codes):
                    table = bytearray(range(256))
                    for c, h in homes.items():
                        table[c] = h
                    packed = packed.translate(table)
                    codes = used
                    barrier = True
            if len(codes) == 1:  # all keys on one connection: forward whole, relay the reply as is
                server, lane = pairs[codes[0]]
                return (FORWARD, barrier, self.proto, server, lane, encode_command(args))
            # Grouped in C: for each code a translate table turns the packed codes into a
            # 1/0 mask for `compress`. A part's keys are where `packed` holds its code, which
            # is all the MGET merge needs to put the values back (see merge_mget).
            for c in codes:
                mask = packed.translate(_mark(c))
                p = pairs[c]
                if width == 1:
                    sub = [name, *compress(keys, mask)]
                else:
                    sub = [name, *chain.from_iterable(compress(zip(keys, islice(args, 2, None, 2)), mask))]
                parts.append((p[0], p[1], encode_command(sub), KeyGroup(packed, c)))
            return (SPLIT, barrier, self.proto, kind, n, parts)
        # Many connections: group with a dict.
        if not hits:
            hits = list(map(router.code, keys))
        return self._split_grouped(kind, name, args, keys, width, hits)

    def _split_grouped(self, kind: int, name: bytes, args: list[bytes], keys: list[bytes], width: int,
                       hits: list[int], barrier: bool = False) -> tuple:
        """The split of `keys` placed at codes `hits`, grouped with a dict (positions as lists)."""
        pairs = self.router.pairs
        n = len(keys)
        parts = []
        groups: dict[int, list[int]] = {}
        for i, h in enumerate(hits):
            g = groups.get(h)
            if g is None:
                groups[h] = [i]
            else:
                g.append(i)
        if len(groups) == 1:
            server, lane = pairs[hits[0]]
            return (FORWARD, barrier, self.proto, server, lane, encode_command(args))
        for c, positions in groups.items():
            p = pairs[c]
            if width == 1:
                sub = [name, *map(keys.__getitem__, positions)]
            else:
                sub = [name]
                for i in positions:
                    sub.append(args[1 + 2 * i])
                    sub.append(args[2 + 2 * i])
            parts.append((p[0], p[1], encode_command(sub), positions))
        return (SPLIT, barrier, self.proto, kind, n, parts)

    def _queue(self, spec, name: bytes, args: list[bytes]) -> tuple:
        """A command inside MULTI: check it now (as Redis does), send it at EXEC."""
        if name == b"SELECT":
            # SELECT of the served database changes nothing on the server: queued and sent with
            # the transaction, so EXEC answers +OK in its place as Redis does; another db aborts.
            reply = self._local(name, args)
            if reply[1] != OK:
                self.multi_error = True
                return reply
            self.multi.append(args)  # type: ignore[union-attr]
            return (REPLY, QUEUED)
        if name == b"WATCH":  # refused, and the transaction goes on (as Redis does)
            return (REPLY, encode_error("ERR WATCH inside MULTI is not allowed"))
        if spec.kind == Kind.LOCAL and name not in (b"PING", b"ECHO"):
            self.multi_error = True
            return (REPLY, encode_error(f"ERR '{name.decode().lower()}' inside MULTI is not supported by the splicer"))
        if spec.kind == Kind.PUBSUB:
            self.multi_error = True
            return (REPLY, encode_error(f"ERR '{name.decode().lower()}' inside MULTI is not supported by the splicer: "
                                        "subscriptions use connections of their own, a transaction one pooled connection"))
        if spec.kind == Kind.FANOUT:
            # A transaction runs on one server; this command runs on all of them.
            self.multi_error = True
            what = name if len(args) < 2 or name not in (b"SCRIPT", b"FUNCTION") else name + b" " + args[1][:128]
            return (REPLY, encode_error(f"ERR '{what.decode(errors='replace').lower()}' inside MULTI is not supported by "
                                        "the splicer: it runs on every server and a transaction on one"))
        if spec.kind == Kind.MSET and len(args) % 2 != 1:
            self.multi_error = True
            return (REPLY, _err_args(name))
        if spec.kind == Kind.SCRIPT:
            err = _script_error(args)
            if err is not None:
                self.multi_error = True
                return (REPLY, err)
        if spec.numkeys or spec.streams:
            try:
                command_keys(spec, args)
            except ValueError:
                self.multi_error = True
                return (REPLY, _keys_error(spec, name, args))
        self.multi.append(args)  # type: ignore[union-attr]
        return (REPLY, QUEUED)

    def _exec(self) -> tuple:
        queued = self.multi or []
        self.multi = None
        watched, self.watching = self.watching, None
        if self.multi_error:
            self.multi_error = False
            return _unwatch(watched, encode_error("EXECABORT Transaction discarded because of previous errors."), self.proto)
        if not queued and watched is None:
            return (REPLY, _EMPTY_ARRAY)
        place = self.router.place
        target: tuple[int, int] | None = None
        for args in queued:
            spec = lookup(args[0])
            assert spec is not None
            for k in command_keys(spec, args):
                p = place(k)
                if target is None:
                    target = p
                elif p[0] != target[0]:
                    return _unwatch(watched, encode_error(
                        "CROSSSERVER EXECABORT the transaction names keys on different servers; "
                        "keep them together with a hash tag ({...})"), self.proto)
        if watched is not None and target is not None and target[0] != watched:
            return _unwatch(watched, encode_error(
                "CROSSSERVER EXECABORT the transaction's keys live on another server than the WATCHed ones; "
                "keep them together with a hash tag ({...})"), self.proto)
        server, lane = target if target is not None else (0, 0)
        payload = b"*1\r\n$5\r\nMULTI\r\n" + b"".join(encode_command(a) for a in queued) + b"*1\r\n$4\r\nEXEC\r\n"
        if watched is not None:
            # On the connection that holds the WATCH: EXEC answers nil if a watched key changed.
            return (BLOCK, True, self.proto, watched, payload, len(queued) + 2, None, WATCH_USE, 0.0)
        return (EXEC, True, self.proto, server, lane, payload, len(queued) + 2)

    # -- connection-level commands ----------------------------------------------------------
    def _local(self, name: bytes, args: list[bytes]) -> tuple:
        if name == b"PING":
            if self.subscribed and len(args) <= 2:
                return (REPLY, subscribed_ping(args))
            if len(args) == 1:
                return (REPLY, PONG)
            if len(args) == 2:
                return (REPLY, encode_bulk(args[1]))
            return (REPLY, _err_args(name))
        if name == b"ECHO":
            return (REPLY, encode_bulk(args[1]))
        if name == b"QUIT":
            self.closing = True
            return (CLOSE, OK)
        if name == b"HELLO":
            return self._hello(args)
        if name == b"AUTH":
            if len(args) > 3:
                return (REPLY, encode_error("ERR syntax error"))
            return (REPLY, self._auth(args[1] if len(args) == 3 else None, args[-1], hello=False))
        if name == b"SELECT":
            try:
                db = int(args[1])
            except ValueError:
                return (REPLY, encode_error("ERR value is not an integer or out of range"))
            if db == self.config.db:
                return (REPLY, OK)
            return (REPLY, encode_error(
                f"ERR SELECT {db} is not supported by the splicer: it serves database {self.config.db} of every server"))
        if name == b"CLIENT":
            return (REPLY, self._client(args))
        if name == b"COMMAND":
            return (REPLY, self._command(args))
        if name == b"MULTI":
            if self.multi is not None:
                return (REPLY, encode_error("ERR MULTI calls can not be nested"))
            self.multi = []
            self.multi_error = False
            return (REPLY, OK)
        if name == b"EXEC":
            if self.multi is None:
                return (REPLY, encode_error("ERR EXEC without MULTI"))
            return self._exec()
        if name == b"DISCARD":
            if self.multi is None:
                return (REPLY, encode_error("ERR DISCARD without MULTI"))
            self.multi = None
            self.multi_error = False
            watched, self.watching = self.watching, None
            return _unwatch(watched, OK, self.proto)
        if name == b"RESET":
            changed = self.proto != 2
            self.proto = 2
            self.multi = None
            self.multi_error = False
            self.name = None
            self.authed = self.config.password is None
            if (self.subs is not None and self.subs.active) or self.watching is not None:
                # Subscriptions and WATCHes end with the client's own connections to the servers
                # (the shell closes them: `drop`); messages already relayed stay ahead of +RESET.
                if self.subs is not None:
                    self.subs.clear()
                self.subscribed = False
                self.watching = None
                return (PUBSUB, True, 2, b"+RESET\r\n", [], True, False)
            return (REPLY, b"+RESET\r\n", changed)
        raise AssertionError(name)

    def _auth(self, user: bytes | None, password: bytes, hello: bool) -> bytes:
        cfg = self.config
        if cfg.password is None:
            if user is None:
                return encode_error(
                    "ERR AUTH <password> called without any password configured for the default user. "
                    "Are you sure your configuration is correct?")
            if user.decode(errors="replace") == cfg.username:
                self.authed = True
                return OK
            return _WRONGPASS
        if (user is None or user.decode(errors="replace") == cfg.username) and password.decode(errors="replace") == cfg.password:
            self.authed = True
            return OK
        return _WRONGPASS

    def _hello(self, args: list[bytes]) -> tuple:
        proto = self.proto
        i = 1
        if len(args) > 1:
            try:
                proto = int(args[1])
            except ValueError:
                return (REPLY, encode_error("ERR Protocol version is not an integer or out of range"))
            if proto not in (2, 3):
                return (REPLY, encode_error("NOPROTO unsupported protocol version"))
            if proto != self.proto and self.watching is not None:
                return (REPLY, encode_error("ERR splicer: HELLO cannot change the protocol while this connection WATCHes "
                                            "keys; EXEC, DISCARD or UNWATCH first"))
            if proto != self.proto and self.subs is not None and self.subs.active:
                # The client's subscribed connections speak the protocol it subscribed in.
                return (REPLY, encode_error("ERR splicer: HELLO cannot change the protocol while this connection has "
                                            "subscriptions; UNSUBSCRIBE and PUNSUBSCRIBE first, or RESET"))
            i = 2
        setname = None
        while i < len(args):
            opt = args[i].upper()
            if opt == b"AUTH" and i + 2 < len(args):
                reply = self._auth(args[i + 1], args[i + 2], hello=True)
                if reply is not OK:
                    return (REPLY, reply)
                i += 3
            elif opt == b"SETNAME" and i + 1 < len(args):
                setname = args[i + 1]
                if not _valid_name(setname):
                    return (REPLY, _BADNAME)
                i += 2
            else:
                return (REPLY, encode_error(f"ERR Syntax error in HELLO option '{args[i].decode(errors='replace')}'"))
        if not self.authed:
            return (REPLY, encode_error("NOAUTH HELLO must be called with the client already authenticated, "
                                        "otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate "
                                        "the client and select the RESP protocol version at the same time"))
        if setname is not None:
            self.name = setname or None
        changed = proto != self.proto
        self.proto = proto
        info = [
            (b"server", b"redis"),
            (b"version", self.config.server_version.encode()),
            (b"proto", proto),
            (b"id", self.client_id),
            (b"mode", b"standalone"),
            (b"role", b"master"),
            (b"modules", []),
        ]
        reply = encode_map([(encode_bulk(k), encode_value(v, proto)) for k, v in info], proto)
        return (REPLY, reply, changed)

    def _client(self, args: list[bytes]) -> bytes:
        sub = args[1].upper()
        if sub == b"SETINFO":
            if len(args) != 4:
                return _err_args(b"client|setinfo")
            attr = args[2].upper()
            if not _valid_name(args[3]):
                return encode_error(f"ERR {attr.decode(errors='replace')} cannot contain spaces, newlines or special characters.")
            if attr == b"LIB-NAME":
                self.lib_name = args[3]
            elif attr == b"LIB-VER":
                self.lib_ver = args[3]
            else:
                return encode_error(f"ERR Unrecognized option '{args[2].decode(errors='replace')}'")
            return OK
        if sub == b"SETNAME":
            if len(args) != 3:
                return _err_args(b"client|setname")
            if not _valid_name(args[2]):
                return _BADNAME
            self.name = args[2] or None
            return OK
        if sub == b"GETNAME" and len(args) == 2:
            return encode_bulk(self.name, self.proto)
        if sub == b"ID" and len(args) == 2:
            return encode_int(self.client_id)
        if sub == b"INFO" and len(args) == 2:
            # Redis's fields that describe the client's connection to the splicer; the memory
            # and buffer fields would describe the splicer's own buffers, and are left out.
            subs = self.subs
            counts = [len(s) for s in subs.sets] if subs is not None else [0, 0, 0]
            line = (f"id={self.client_id} addr={self.addr} laddr={self.laddr} fd={self.fd} "
                    f"name={(self.name or b'').decode(errors='replace')} "
                    f"flags={'P' if subs is not None and subs.active else 'N'} db={self.config.db} "
                    f"sub={counts[0]} psub={counts[1]} ssub={counts[2]} "
                    f"multi={-1 if self.multi is None else len(self.multi)} cmd=client|info user={self.config.username} "
                    f"resp={self.proto} lib-name={(self.lib_name or b'').decode(errors='replace')} "
                    f"lib-ver={(self.lib_ver or b'').decode(errors='replace')}\n")
            return encode_bulk(line.encode())
        return encode_error(
            f"ERR CLIENT {args[1][:64].decode(errors='replace')} is not supported by the splicer "
            "(it answers CLIENT SETINFO, SETNAME, GETNAME, ID and INFO)")

    def _command(self, args: list[bytes]) -> bytes:
        proto = self.proto
        if len(args) == 1:
            return b"*%d\r\n" % len(COMMANDS) + b"".join(command_info(s, proto) for s in COMMANDS.values())
        sub = args[1].upper()
        if sub == b"COUNT":
            return encode_int(len(COMMANDS))
        if sub == b"INFO":
            names = args[2:] or list(COMMANDS)
            out = []
            for n in names:
                spec = lookup(n)
                out.append(command_info(spec, proto) if spec is not None else encode_bulk(None, proto) if proto == 3 else b"*-1\r\n")
            return b"*%d\r\n" % len(out) + b"".join(out)
        if sub == b"DOCS":
            # redis-cli asks for docs to show hints; an empty answer makes it fall back quietly.
            return b"%0\r\n" if proto == 3 else _EMPTY_ARRAY
        if sub == b"LIST":
            return b"*%d\r\n" % len(COMMANDS) + b"".join(encode_bulk(n.lower()) for n in COMMANDS)
        if sub == b"GETKEYS" and len(args) >= 3:
            spec = lookup(args[2])
            if spec is None:
                return encode_error("ERR Invalid command specified")
            if not check_arity(spec, len(args) - 2):
                return encode_error("ERR Invalid number of arguments specified for command")
            try:
                keys = [] if spec.no_keys or spec.kind == Kind.PUBSUB else command_keys(spec, args[2:])
            except (ValueError, IndexError):
                return encode_error("ERR Invalid arguments specified for command")
            if not keys:
                return encode_error("ERR The command has no key arguments")
            return b"*%d\r\n" % len(keys) + b"".join(encode_bulk(k) for k in keys)
        return encode_error(f"ERR COMMAND {args[1][:64].decode(errors='replace')} is not supported by the splicer")


def _keys_error(spec, name: bytes, args: list[bytes]) -> bytes:
    """Redis's error for keys that cannot be found: a bad numkeys, or XREAD's STREAMS list."""
    if name in _ZSTORE:  # redis-server 7's words for these
        n = _strict_int(args[spec.numkeys])
        if n is None:
            return encode_error("ERR value is not an integer or out of range")
        if n < 1:
            return encode_error(f"ERR at least 1 input key is needed for '{name.decode().lower()}' command")
        return encode_error("ERR syntax error")
    if name in _MPOP:  # Redis 7's words for these
        try:
            positive = int(args[spec.numkeys]) > 0
        except ValueError:
            positive = False
        return encode_error("ERR syntax error" if positive else "ERR numkeys should be greater than 0")
    if not spec.streams:
        return encode_error("ERR numkeys should be greater than 0 and at most the number of keys given")
    streams = stream_options(args)[0]
    if streams < 0 or streams == len(args) - 1:  # no STREAMS, or nothing after it
        return encode_error("ERR syntax error")
    # redis-server 7 says XREAD for XREADGROUP too
    return encode_error("ERR Unbalanced XREAD list of streams: for each stream key an ID or '$' must be specified.")


_MPOP = frozenset({b"LMPOP", b"ZMPOP", b"BLMPOP", b"BZMPOP"})
_ZSTORE = frozenset({b"ZINTERSTORE", b"ZUNIONSTORE"})


def _strict_int(arg: bytes) -> int | None:
    """`arg` as Redis's string2ll reads a number (no sign but '-', no leading zero or space,
    within 64 bits), else None."""
    if not (arg.isdigit() or (arg[:1] == b"-" and arg[1:].isdigit())) or arg.lstrip(b"-")[:1] == b"0" and arg != b"0":
        return None
    n = int(arg)
    return n if -(2 ** 63) <= n < 2 ** 63 else None


def _block_seconds(spec, args: list[bytes]) -> float | None:
    """How long a blocking command may block, from its own timeout: None for ever (0), 0.0
    when it does not block or its timeout is not valid (the server answers at once)."""
    try:
        if spec.streams:
            seconds = float(stream_options(args)[1] or b"-1") / 1000
        else:
            seconds = float(args[1] if spec.numkeys else args[-1])
    except ValueError:
        return 0.0
    if seconds == 0:
        return None
    return seconds if seconds > 0 and seconds != float("inf") else (None if seconds > 0 else 0.0)


UNWATCH = b"*1\r\n$7\r\nUNWATCH\r\n"  # what undoes a WATCH (the shell tells it from an EXEC)


def _unwatch(server: int | None, reply: bytes, proto: int) -> tuple:
    """`reply` for the client; first an UNWATCH on the connection holding a WATCH, if any (EXEC
    and DISCARD end a WATCH, also when the splicer answers them itself)."""
    if server is None:
        return (REPLY, reply)
    return (BLOCK, True, proto, server, UNWATCH, 1, reply, WATCH_USE, 0.0)


_PUBLISH = frozenset({b"PUBLISH", b"SPUBLISH"})  # placed by channel (Router.channel_place), not as keys
_BADNAME = encode_error("ERR Client names cannot contain spaces, newlines or special characters.")


def _valid_name(name: bytes) -> bool:
    return all(33 <= c <= 126 for c in name)


def _cross_server(name: bytes) -> bytes:
    return encode_error(
        f"CROSSSERVER keys of '{name.decode().lower()}' live on different servers; "
        "keep them together with a hash tag ({...})")


def _script_error(args: list[bytes]) -> bytes | None:
    try:
        n = int(args[2])
    except ValueError:
        return encode_error("ERR value is not an integer or out of range")
    if n < 0:
        return encode_error("ERR Number of keys can't be negative")
    if n > len(args) - 3:
        return encode_error("ERR Number of keys can't be greater than number of args")
    if n == 0:
        return encode_error(
            f"ERR the splicer routes '{args[0].decode(errors='replace').lower()}' by its keys and this call names none")
    return None


def command_info(spec, proto: int) -> bytes:
    """One COMMAND INFO entry (Redis 7 layout: name, arity, flags, first, last, step, acl, tips, key specs, subcommands)."""
    flags = b"".join(b"+%s\r\n" % f.encode() for f in spec.flags)
    set_head = b"~%d\r\n" if proto == 3 else b"*%d\r\n"
    first, last, step = (0, 0, 0) if spec.no_keys else (spec.first, spec.last, spec.step)
    return (b"*10\r\n" + encode_bulk(spec.name.lower()) + encode_int(spec.arity)
            + set_head % len(spec.flags) + flags
            + encode_int(first) + encode_int(last) + encode_int(step)
            + set_head % 0 + _EMPTY_ARRAY + _EMPTY_ARRAY + _EMPTY_ARRAY)


# -- merging split replies ----------------------------------------------------------------------


def _home_codes(codes: list[int], lanes: int) -> dict[int, int]:
    """Each placement code of `codes` (ascending) mapped to the lowest one on the same server:
    the connection an idle client's MGET reads that server over (RedisSession._split)."""
    home: dict[int, int] = {}
    return {c: home.setdefault(c // lanes, c) for c in codes}


# Split commands of at most this many keys are grouped by a dict, and their MGET replies spliced.
_SMALL_SPLIT = 16


class KeyGroup:
    """The key positions of one part of a split command, without a list of them.

    `packed` holds every key's placement code (one byte per key) and the part's keys are those
    whose code is `code`. Iterating gives the positions in order (tests, slow paths); the MGET
    merge uses `packed` directly, which saves building a list of positions per part.
    """

    __slots__ = ("packed", "code")

    def __init__(self, packed: bytes, code: int) -> None:
        self.packed = packed
        self.code = code

    def __iter__(self):
        return compress(range(len(self.packed)), self.packed.translate(_mark(self.code)))

    def __len__(self) -> int:
        return self.packed.count(self.code)

    def __repr__(self) -> str:
        return f"KeyGroup({list(self)!r})"


_MARKS: dict[int, bytes] = {}


def _mark(code: int) -> bytes:
    """A bytes.translate table mapping `code` to 1 and every other byte to 0."""
    table = _MARKS.get(code)
    if table is None:
        table = _MARKS[code] = bytes(code) + b"\x01" + bytes(255 - code)
    return table


def _parse(reply: bytes):
    r = hiredis.Reader()
    r.feed(reply)
    try:
        return r.gets()
    except (hiredis.ProtocolError, TypeError):  # not what MGET answers: the merge reports it
        return None


def _bulks(reply: bytes, n: int) -> list[bytes] | None:
    """The `n` encoded elements of `reply`, an array of `n` bulk strings or nulls; else None."""
    if reply[:1] != b"*" or not reply.startswith(b"%d\r\n" % n, 1):
        return None
    pos = reply.index(b"\n") + 1
    out = []
    for _ in range(n):
        t = reply[pos:pos + 1]
        if t == b"$":
            nl = reply.find(b"\r\n", pos)
            try:
                size = int(reply[pos + 1:nl])
            except ValueError:
                return None
            end = nl + 2 + max(size, 0) + (2 if size >= 0 else 0)
        elif t == b"_":
            end = pos + 3
        else:
            return None
        out.append(reply[pos:end])
        pos = end
    return out if pos == len(reply) else None


def merge_mget(nkeys: int, parts: list[tuple[Any, bytes]], proto: int, parsed: list[Any] | None = None) -> bytes:
    """Merge MGET part replies into one array in key order.

    Each part is (where, reply): `where` holds the part's key positions, as a list or as a
    `KeyGroup` (what `RedisSession` produces when there are few connections). `parsed[i]`,
    when given and not None, is hiredis's parse of part i's reply (saves parsing it again).
    """
    if nkeys <= _SMALL_SPLIT:
        # A few keys: the parts' values are cut out of their replies, already encoded in the
        # client's protocol, and joined in key order (no parse, no encode).
        spliced: list[bytes] = [b""] * nkeys
        for where, reply in parts:
            if type(where) is not list:
                break
            if len(where) == 1 and reply[:4] == b"*1\r\n":  # the commonest part: one key
                spliced[where[0]] = reply[4:]
                continue
            values = _bulks(reply, len(where))
            if values is None:
                break
            for i, v in zip(where, values):
                spliced[i] = v
        else:
            return b"*%d\r\n" % nkeys + b"".join(spliced)
    iters: list[Any] = [None] * 256  # by placement code (KeyGroup codes are below 256)
    packed = b""
    ordered: list[bytes | None] = []
    for i, (where, reply) in enumerate(parts):
        if reply[:1] == b"-":
            return reply
        values = parsed[i] if parsed is not None and parsed[i] is not None else _parse(reply)
        if type(where) is KeyGroup:
            packed, code = where.packed, where.code
            if type(values) is not list or len(values) != packed.count(code):
                return encode_error("ERR splicer: a backend answered MGET with an unexpected reply")
            iters[code] = iter(values)
        else:
            if type(values) is not list or len(values) != len(where):
                return encode_error("ERR splicer: a backend answered MGET with an unexpected reply")
            if not ordered:
                ordered = [None] * nkeys
            deque(map(ordered.__setitem__, where, values), maxlen=0)  # ordered[where[i]] = values[i], in C
    if packed:
        # Key i's value is the next one of the part that holds code packed[i], in C.
        ordered = list(map(next, map(iters.__getitem__, packed)))
    # Values are put in key order first and encoded once, in one join (no bytes per element).
    try:
        return b"*%d\r\n" % nkeys + join_bulks(ordered, proto)
    except TypeError:  # an element that is not a string or nil (an integer...): not MGET's answer
        return encode_error("ERR splicer: a backend answered MGET with an unexpected reply")


def merge_sum(parts: list[tuple[list[int], bytes]]) -> bytes:
    """Merge DEL/UNLINK/EXISTS/TOUCH part replies (integers) by adding them up."""
    total = 0
    for _, reply in parts:
        if reply[:1] != b":":
            return reply if reply[:1] == b"-" else encode_error("ERR splicer: a backend answered with an unexpected reply")
        total += int(reply[1:-2])
    return b":%d\r\n" % total


def merge_mset(parts: list[tuple[list[int], bytes]]) -> bytes:
    """Merge MSET part replies: +OK when every part said OK, else the first error."""
    return merge_all_ok(parts, "MSET")


def merge_parts(kind: int, nkeys: int, parts: list[tuple[Any, bytes]], proto: int, parsed: list[Any]) -> bytes:
    """The client's reply from the part replies of a SPLIT action of this `kind`.

    `parts` are (where, reply) in part order; `parsed[i]`, if not None, is hiredis's parse of
    part i's reply (the MGET merge reuses it).
    """
    if kind == Kind.MGET:
        return merge_mget(nkeys, parts, proto, parsed)
    if kind == Kind.SUM:
        return merge_sum(parts)
    if kind == Kind.MSET:
        return merge_mset(parts)
    return MERGES[kind](parts)
