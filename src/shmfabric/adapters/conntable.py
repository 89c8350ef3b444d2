"""The connection table of a global address (pure: no I/O, no clock of its own).

Several nodes share one IP address, the *global address* (each holds it on its `lo`, as LVS's
direct-return servers do). For every packet a client sends to it, the table names the node that
gets it, from the packet's 5-tuple seen from the nodes' side: <protocol, local address, local
port, foreign address, foreign port>, the local address being the global one. In the design's
order:

1. **exact match**: a connection a node holds (its sockets, as the last walk of its namespace
   showed them) or one this table gave a node before;
2. **the local address wildcarded**: a node's socket bound to any address and connected to this
   foreign address and port (a connected UDP socket);
3. **the foreign part dropped**: a node waiting for anyone on this port (a TCP listener, an
   unbound-peer UDP socket), bound to the global address or to any.

Several nodes matching at step 2 or 3 are taken in turn (round robin) and the choice is kept as
an exact entry, so the rest of the connection follows it. Nothing matching: the packet is
dropped. Entries nobody used for `idle_timeout` seconds and no walk saw since are collected
(`collect`, on a timer).

TCP is stricter than the design's words, because a wrong guess is a reset: only a SYN opens a
connection (steps 2-3); any other segment without an exact entry is dropped (the connection is
not one of ours, or its node is gone), and a SYN that finds an entry whose node neither holds
that connection nor listens there any more (the client reused its port after the node stopped
serving) is placed anew.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Hashable, Iterable, Protocol, Union

Address = Union[int, bytes]  # IPv4 as int, IPv6 as 16 bytes (shmfabric.net.flow's convention)
TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
#: (proto, foreign address, foreign port, local port): the local address is always the global one.
Key = tuple


class Miss(IntEnum):
    """Why `lookup` found no node (negative: never a node index)."""

    NO_LISTENER = -1  # nobody holds or waits for this 5-tuple
    NOT_OPENING = -2  # a TCP segment other than a SYN for a connection no node holds


class SocketLike(Protocol):
    """What the table reads of a socket (`shmfabric.adapters.sockwalk.SocketRecord` is one)."""

    family: int
    proto: int
    laddr: Address | None
    lport: int
    raddr: Address | None
    rport: int
    state: str


@dataclass(slots=True)
class Entry:
    """An exact entry: the node, when a packet last used it, when a walk last saw its socket."""

    node: Hashable
    used: float
    seen: float = -1.0  # never seen by a walk (given by this table to a new connection)


@dataclass(slots=True)
class _NodeView:
    """What the last walk of one node showed that concerns the global address."""

    exact: set = field(default_factory=set)  # keys of its connections to the global address
    wild: set = field(default_factory=set)  # keys of its any-address sockets with a peer
    listen: set = field(default_factory=set)  # (proto, port) it waits on for anyone


class ConnectionTable:
    """The table for one global address (`address`, IPv4 int or IPv6 bytes; `family` 4 or 6).

    Nodes are whatever hashable names the caller uses (fabric node names). `update_node` gives
    the table what a walk of a node's sockets showed; `lookup` places a packet; `collect` drops
    entries gone idle. `answers_ping`: every node counts as waiting for ICMP echo (their kernels
    answer it), so pings are spread as connections are."""

    def __init__(self, address: Address, family: int, idle_timeout: float = 30.0, answers_ping: bool = True):
        if family not in (4, 6):
            raise ValueError(f"family must be 4 or 6, not {family}")
        self.address = address
        self.family = family
        self.idle_timeout = idle_timeout
        self.echo = ICMP if family == 4 else ICMPV6
        self.answers_ping = answers_ping
        self.exact: dict[Key, Entry] = {}
        self._views: dict[Hashable, _NodeView] = {}
        self._wild: dict[Key, list] = {}
        self._listen: dict[tuple[int, int], list] = {}
        self._turn: dict[Hashable, int] = {}  # round-robin position per listener or wildcard key
        self.placed = 0  # connections placed at steps 2-3 (counters for stats)
        self.collected = 0

    # -- what the nodes hold ---------------------------------------------------------------------
    @property
    def nodes(self) -> list:
        """The nodes the table places packets on, in the order round robin takes them."""
        return sorted(self._views, key=repr)

    def update_node(self, node: Hashable, sockets: Iterable[SocketLike], now: float) -> None:
        """Replace what the table knows of `node`'s sockets with a walk's result (taken at `now`).

        Only sockets of the global address's family count: bound to it or to any address. A
        node not known yet is added (it now gets its share of new connections)."""
        view = _NodeView()
        mine = self.address
        for s in sockets:
            if s.family != self.family or s.proto not in (TCP, UDP):
                continue
            if s.laddr is not None and s.laddr != mine:
                continue  # bound to another address: never reached through the global one
            if s.raddr is None:
                if s.proto == UDP or s.state == "listen":
                    view.listen.add((s.proto, s.lport))
                continue
            key = (s.proto, s.raddr, s.rport, s.lport)
            (view.exact if s.laddr is not None else view.wild).add(key)
        self._views[node] = view
        exact = self.exact
        for key in view.exact:
            e = exact.get(key)
            if e is None:
                exact[key] = Entry(node, now, now)
            else:
                e.node, e.seen = node, now
        self._rebuild()

    def remove_node(self, node: Hashable) -> int:
        """Stop placing anything on `node` (it left, or its namespace cannot be read); its entries
        go (their packets are dropped from now on). Returns how many entries went."""
        if self._views.pop(node, None) is None:
            return 0
        gone = [k for k, e in self.exact.items() if e.node == node]
        for k in gone:
            del self.exact[k]
        self._turn.pop(node, None)
        self._rebuild()
        return len(gone)

    def _rebuild(self) -> None:
        wild: dict[Key, list] = {}
        listen: dict[tuple[int, int], list] = {}
        for node in self.nodes:
            view = self._views[node]
            for key in view.wild:
                wild.setdefault(key, []).append(node)
            for key in view.listen:
                listen.setdefault(key, []).append(node)
        self._wild, self._listen = wild, listen

    # -- placing packets ---------------------------------------------------------------------------
    def lookup(self, proto: int, faddr: Address, fport: int, lport: int, now: float,
               opening: bool = True) -> Hashable | Miss:
        """The node that gets a packet from `faddr`:`fport` to the global address's port `lport`,
        or why none does (a `Miss`). For TCP, `opening` says the segment is a SYN (without ACK):
        only a SYN may open a connection. For ICMP echo, pass the identifier as `fport` and 0 as
        `lport`."""
        key = (proto, faddr, fport, lport)
        e = self.exact.get(key)
        if e is not None:
            if proto == TCP and opening:
                # A SYN that finds an entry: a retransmission (the node listens: it goes where the
                # first went), or a client reusing its port. Kept while the node holds the old
                # connection (its kernel sorts out TIME_WAIT) or still listens; else placed anew.
                view = self._views.get(e.node)
                keep = view is not None and (key in view.exact or (proto, lport) in view.listen)
            else:
                keep = True
            if keep:
                e.used = now
                return e.node
            del self.exact[key]
        if proto == TCP and not opening:
            return Miss.NOT_OPENING
        pick = self._wild.get(key)
        turn_key: Hashable = key
        if not pick:
            if proto == self.echo and self.answers_ping:
                pick, turn_key = self.nodes, self.echo
            else:
                turn_key = (proto, lport)
                pick = self._listen.get(turn_key)  # type: ignore[arg-type]
            if not pick:
                return Miss.NO_LISTENER
        i = self._turn.get(turn_key, 0)
        node = pick[i % len(pick)]
        self._turn[turn_key] = i + 1
        self.exact[key] = Entry(node, now)
        self.placed += 1
        return node

    def collect(self, now: float) -> int:
        """Drop the exact entries neither used nor seen by a walk for `idle_timeout` seconds
        (call on a timer); returns how many went."""
        limit = now - self.idle_timeout
        gone = [k for k, e in self.exact.items() if e.used < limit and e.seen < limit]
        for k in gone:
            del self.exact[k]
        # round-robin positions of keys no longer matched (a wildcard socket that closed)
        if len(self._turn) > 4 * (len(self._listen) + len(self._wild)) + 64:
            live = set(self._listen) | set(self._wild) | {self.echo}
            self._turn = {k: v for k, v in self._turn.items() if k in live}
        self.collected += len(gone)
        return len(gone)

    def describe(self) -> dict:
        """Sizes, for a stats reply: entries, listeners and nodes."""
        return {"entries": len(self.exact), "listeners": sum(len(v) for v in self._listen.values()),
                "wildcard_sockets": sum(len(v) for v in self._wild.values()), "nodes": len(self._views),
                "placed": self.placed, "collected": self.collected}
