"""The connection table of a global address (pure: no I/O, no clock of its own).

Several nodes share one IP address, the *global address* (each holds it on its `lo`, as LVS's
direct-return servers do). For every packet a client sends to it, the table names the node that
gets it, from the packet's 5-tuple seen from the nodes' side: <protocol, local address, local
port, foreign address, foreign port>, the local address being the global one. In the design's
order:

1. **exact match**: a connection a node holds (its sockets, as the last walk of its namespace
   showed them: `set_view`), or a TCP connection this table gave a node a moment ago that no walk
   has shown yet;
2. **the local address wildcarded**: a node's socket bound to any address and connected to this
   foreign address and port (a connected UDP socket);
3. **the foreign part dropped**: a node waiting for anyone on this port (a TCP listener, an
   unbound-peer UDP socket), bound to the global address or to any.

Several nodes matching at step 2 or 3: a new TCP connection takes them in turn (round robin) and
the choice is kept until a walk shows the node holding it (then the node's own socket is the
exact match); a UDP or ICMP flow has no connection to hold it, so it is placed by a hash of its
5-tuple over those nodes (rendezvous hashing): the same flow goes to the same node after a
pause, after a dispatcher restart, and while other nodes come and go, with no entry to keep.
Nothing matching: the packet is dropped.

Each node has a *weight* (an integer from 1 to 256, default 1: `weights=` or `set_weight`), as a
load balancer's servers have (HAProxy's `weight`, IPVS's wrr). Among candidates of unequal
weights, new TCP connections go by smooth weighted round robin (nginx's: over any run of
sum(weights) connections each node gets exactly its weight, interleaved, not in blocks), and
datagram flows by weighted rendezvous hashing (score weight / -ln(u), u the flow and node's hash
in (0, 1)): a node's share is its weight's, and a change of one node's weight moves only flows
to or from that node. Equal weights place exactly as unweighted round robin and hashing do.

TCP is stricter than the design's words, because a wrong guess is a reset: only a SYN opens a
connection; any other segment without an exact match is dropped (the connection is not one of
ours, or its node is gone). A node's live connections win over another's ending ones (TIME_WAIT)
for the same 5-tuple, and a SYN that finds only an ending one goes to that node only if it still
listens there (its kernel takes a new SYN over TIME_WAIT); otherwise it is placed anew.

Memory is bounded by what the nodes' kernels hold plus `max_placed` connections placed and not
yet shown by a walk (each forgotten after `confirm_timeout` seconds): packets with made-up
sources (a SYN flood, spoofed UDP) leave nothing behind for long.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum
from hashlib import blake2b
from typing import Hashable, Iterable, Mapping, Protocol, Union

Address = Union[int, bytes]  # IPv4 as int, IPv6 as 16 bytes (shmfabric.net.flow's convention)
TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
#: (proto, foreign address, foreign port, local port): the local address is always the global one.
Key = tuple
#: TCP states of a connection still in use (sock_diag's names, as `sockwalk` gives them); the
#: others (time_wait, close) are ending: held, but any node may take a new connection on the key.
LIVE = frozenset({"syn_sent", "syn_recv", "established", "fin_wait1", "fin_wait2", "close_wait", "last_ack",
                  "closing", "connected"})
MIN_WEIGHT, MAX_WEIGHT = 1, 256  # a node's weight (HAProxy's range, without its 0: leave a node out instead)


def check_weight(weight: object) -> int:
    """`weight` if it is an integer from MIN_WEIGHT to MAX_WEIGHT, else ValueError saying so."""
    if type(weight) is not int:  # (not bool, not 2.0: a weight is a count of turns)
        raise ValueError(f"weight {weight!r} is not an integer; give one from {MIN_WEIGHT} to {MAX_WEIGHT}")
    if not MIN_WEIGHT <= weight <= MAX_WEIGHT:
        raise ValueError(f"weight {weight} is out of range; give one from {MIN_WEIGHT} to {MAX_WEIGHT}")
    return weight


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
    queued: int  # a listener's accept queue now, and its most (the listen() backlog)
    backlog: int


@dataclass(frozen=True)
class NodeView:
    """What one walk of a node's sockets showed that concerns the global address."""

    live: frozenset  # keys of its connections to the global address in use
    ending: frozenset  # keys of its connections ending (TIME_WAIT, ...)
    wild: frozenset  # keys of its any-address sockets with a peer
    listen: frozenset  # (proto, port) it waits on for anyone
    full: frozenset = frozenset()  # (TCP, port) listeners whose accept queue is full (not accepting)


def view_of(address: Address, family: int, sockets: Iterable[SocketLike]) -> NodeView:
    """The part of a walk's sockets that concerns global address `address` (pure: call it from any
    thread, e.g. where the walk ran, so the table's thread only swaps views). Only sockets of the
    address's family count, bound to it or to any address."""
    live: set = set()
    ending: set = set()
    wild: set = set()
    listen: set = set()
    full: set = set()
    full_any: set = set()  # (TCP, port) with a full listener bound to any address
    exact: set = set()  # (TCP, port) with a listener bound to the global address itself
    for s in sockets:
        if s.family != family or s.proto not in (TCP, UDP):
            continue
        if s.laddr is not None and s.laddr != address:
            continue  # bound to another address: never reached through the global one
        if s.raddr is None:
            if s.proto == UDP or s.state == "listen":
                listen.add((s.proto, s.lport))
                if s.proto == TCP:
                    if s.laddr is not None:
                        exact.add((TCP, s.lport))
                    if s.queued > s.backlog:
                        # (the kernel's own test, sk_acceptq_is_full. Among several listeners of a
                        # reuseport group the kernel picks one by the connection's hash and never
                        # skips a full one: one full makes the port full)
                        (full if s.laddr is not None else full_any).add((TCP, s.lport))
            continue
        key = (s.proto, s.raddr, s.rport, s.lport)
        if s.laddr is None:
            wild.add(key)
        elif s.state in LIVE:
            live.add(key)
        else:
            ending.add(key)
    return NodeView(frozenset(live), frozenset(ending - live), frozenset(wild), frozenset(listen),
                    # (a listener bound to the address itself takes its connections before any
                    # wildcard one does: a full wildcard listener then does not matter)
                    frozenset(full | (full_any - exact)))


EMPTY = NodeView(frozenset(), frozenset(), frozenset(), frozenset())


@dataclass(slots=True)
class Placed:
    """A TCP connection this table gave a node, until a walk shows the node holding it."""

    node: Hashable
    at: float


class ConnectionTable:
    """The table for one global address (`address`, IPv4 int or IPv6 bytes; `family` 4 or 6).

    Nodes are whatever hashable names the caller uses (fabric node names; their text decides the
    hash placement). `set_view` (or `update_node`) gives the table what a walk of a node's sockets
    showed; `set_placeable` says whether a node takes new connections (attached to the fabric);
    `lookup` places a packet; `collect` forgets placements no walk confirmed. `answers_ping`:
    every node counts as waiting for ICMP echo (their kernels answer it). `weights`: node ->
    weight (1 to 256; a node not named has 1), changed later with `set_weight`."""

    def __init__(self, address: Address, family: int, confirm_timeout: float = 5.0, max_placed: int = 262144,
                 answers_ping: bool = True, full_after: float = 1.0, weights: Mapping[Hashable, int] | None = None):
        if family not in (4, 6):
            raise ValueError(f"family must be 4 or 6, not {family}")
        self.address = address
        self.family = family
        self.confirm_timeout = confirm_timeout
        self.max_placed = max_placed
        self.echo = ICMP if family == 4 else ICMPV6
        self.answers_ping = answers_ping
        self.placed: dict[Key, Placed] = {}
        self.held: dict[Key, tuple[Hashable, bool]] = {}  # key -> (node, live)
        self._views: dict[Hashable, NodeView] = {}
        self._away: set = set()  # nodes with a view that take no new connection (detached)
        self._wild: dict[Key, list] = {}
        self._listen: dict[tuple[int, int], list] = {}
        self._nodes: list = []
        self._turn: dict[tuple[int, int] | Key, int] = {}  # round-robin position per listener or wildcard key
        # weighted round robin's state per listener or wildcard key: (candidates, their weights,
        # their current values); started over when either changes
        self._swrr: dict[tuple[int, int] | Key, tuple[tuple, tuple, list]] = {}
        self._weights: dict[Hashable, int] = {}  # weights other than 1
        self._hashed: dict[Key, Hashable] = {}  # flows placed by hash since the candidates last changed
        # (TCP, port) listeners of each node seen full at every walk for `full_after` seconds: one
        # walk finding a busy server's queue full at that instant would move its traffic away for
        # a whole walk (and walks come sooner than their period when packets miss)
        self.full_after = full_after
        self._full_since: dict[Hashable, dict] = {}
        self._full: dict[Hashable, frozenset] = {}
        self.counts = {"placed": 0, "hashed": 0, "collected": 0, "full": 0}
        for node, weight in (weights or {}).items():
            self.set_weight(node, weight)

    # -- what the nodes hold ---------------------------------------------------------------------
    @property
    def nodes(self) -> list:
        """The nodes that take new connections, in the order round robin takes them."""
        return self._nodes

    def weight(self, node: Hashable) -> int:
        """`node`'s weight (1 unless set)."""
        return self._weights.get(node, 1)

    def set_weight(self, node: Hashable, weight: int) -> None:
        """Give `node` weight `weight` (an integer from 1 to 256, else ValueError), known to the
        table or not yet. Its share of new TCP connections and datagram flows follows from now on:
        the weighted rounds start over, and only datagram flows to or from `node` move."""
        check_weight(weight)
        if weight == self.weight(node):
            return
        if weight == 1:
            del self._weights[node]
        else:
            self._weights[node] = weight
        if node in self._views:
            self._rebuild(wild=False)  # (the datagram flows placed by hash are placed again)

    def update_node(self, node: Hashable, sockets: Iterable[SocketLike], now: float) -> None:
        """`set_view` from a walk's sockets."""
        self.set_view(node, view_of(self.address, self.family, sockets), now)

    def set_view(self, node: Hashable, view: NodeView, now: float, since: NodeView | None = None,
                 changed: Iterable | None = None) -> None:
        """Replace what the table knows of `node`'s sockets with a walk's view (taken at `now`). A
        node not known yet is added. `changed` (from `changes(since, view)`, worked out where the
        walk ran) is used when `since` is the view the table holds: then this costs what changed,
        not the view's size."""
        old = self._views.get(node, EMPTY)
        self._views[node] = view
        keys = changed if changed is not None and since is not None and old is since else changes(old, view)
        for key in keys:
            self._resolve(key)
        before = self._full_since.get(node, {})
        full_since = {k: before.get(k, now) for k in view.full}
        self._full_since[node] = full_since
        full = frozenset(k for k, t in full_since.items() if now - t >= self.full_after)
        full_changed = full != self._full.get(node, frozenset())
        self._full[node] = full
        if node not in self._nodes and node not in self._away or view.wild != old.wild:
            self._rebuild()
        elif view.listen != old.listen:
            self._rebuild(wild=False)
        elif full_changed:
            self._rebuild(wild=False, hashed=False)  # (TCP only: the datagram flows stay where they are)

    def set_placeable(self, node: Hashable, placeable: bool) -> None:
        """Whether `node` takes new connections (its connections go on being placed on it either
        way: a member whose adapter restarts keeps them)."""
        if placeable == (node not in self._away):
            return
        (self._away.discard if placeable else self._away.add)(node)
        if node in self._views:
            self._rebuild()

    def remove_node(self, node: Hashable) -> int:
        """Forget `node` (its namespace cannot be read any more): nothing is placed on it from now
        on. Returns how many of its connections were known (their packets are dropped now)."""
        view = self._views.pop(node, None)
        self._away.discard(node)
        self._full.pop(node, None)
        self._full_since.pop(node, None)
        if view is None:
            return 0
        for key in view.live | view.ending:
            self._resolve(key)
        gone = [k for k, p in self.placed.items() if p.node == node]
        for k in gone:
            del self.placed[k]
        self._rebuild()
        return len(view.live) + len(gone)

    def _resolve(self, key: Key) -> None:
        """Who holds `key` now: a node holding it live wins over one holding it ending; among
        equals the current holder stays."""
        cur = self.held.get(key)
        best: tuple[Hashable, bool] | None = None
        for node, v in self._views.items():
            if key in v.live:
                cand = (node, True)
            elif key in v.ending:
                cand = (node, False)
            else:
                continue
            if best is None or cand[1] and not best[1] or cand[1] == best[1] and cur is not None and node == cur[0]:
                best = cand
        if best is None:
            self.held.pop(key, None)
        else:
            self.held[key] = best

    def _rebuild(self, wild: bool = True, hashed: bool = True) -> None:
        """The candidates for new flows, from the views of the nodes that take them: the wildcard
        sockets' (`wild`: costs their number: only when they or the nodes changed) and the
        listeners'; the datagram flows' placements start over (`hashed`)."""
        self._nodes = sorted((n for n in self._views if n not in self._away), key=repr)
        listen: dict[tuple[int, int], list] = {}
        full: dict[tuple[int, int], list] = {}
        for node in self._nodes:
            view, node_full = self._views[node], self._full.get(node, frozenset())
            for key in view.listen:
                (full if key in node_full else listen).setdefault(key, []).append(node)
        # A node whose listener's accept queue is full (its server stopped accepting: hung, or
        # overloaded) gets no new connection while another node listening there has room; if
        # every one is full, they all take their turn (nothing better to do).
        for key, nodes in full.items():
            if key not in listen:
                listen[key] = nodes
        self._listen = listen
        if wild:
            w: dict[Key, list] = {}
            for node in self._nodes:
                for key in self._views[node].wild:
                    w.setdefault(key, []).append(node)
            self._wild = w
        if hashed:
            self._hashed = {}
        self._turn = {k: v for k, v in self._turn.items() if k in listen or k in self._wild}
        if self._swrr:
            self._swrr = {k: v for k, v in self._swrr.items() if k in listen or k in self._wild}

    # -- placing packets ---------------------------------------------------------------------------
    def lookup(self, proto: int, faddr: Address, fport: int, lport: int, now: float,
               opening: bool = True) -> Hashable | Miss:
        """The node that gets a packet from `faddr`:`fport` to the global address's port `lport`,
        or why none does (a `Miss`). For TCP, `opening` says the segment is a SYN (without ACK):
        only a SYN may open a connection. For ICMP echo, pass the identifier as `fport` and 0 as
        `lport`."""
        key = (proto, faddr, fport, lport)
        held = self.held.get(key)
        if held is not None and held[1]:
            return held[0]
        syn = proto == TCP and opening
        p = self.placed.get(key)
        if p is not None:
            # (a retransmitted SYN goes where the first went, unless that node went away or stopped
            # accepting meanwhile: it is a candidate no more)
            if not syn or p.node in (self._wild.get(key) or self._listen.get((TCP, lport), ())):
                return p.node
            del self.placed[key]
        if held is not None:
            if not syn:
                return held[0]  # an ending connection's last segments
            if held[0] in (self._wild.get(key) or self._listen.get((TCP, lport), ())):
                # A new SYN over its TIME_WAIT goes to that node, whose kernel takes it; placed, so
                # that its ACK still finds it when the node's next walk shows nothing in between
                # (a SYN cookie keeps no socket until the ACK comes).
                self._record(key, held[0], now)
                return held[0]
        if proto == TCP:
            if not opening:
                return Miss.NOT_OPENING
            pick = self._wild.get(key) or self._listen.get((TCP, lport))
            if not pick:
                return Miss.NO_LISTENER
            turn = key if key in self._wild else (TCP, lport)
            node = self._weighted_turn(turn, pick) if self._weights and len(pick) > 1 else None
            if node is None:  # equal weights: plain round robin
                i = self._turn.get(turn, 0)
                self._turn[turn] = i + 1
                node = pick[i % len(pick)]
            self._record(key, node, now)
            return node
        node = self._hashed.get(key)
        if node is not None:
            return node
        pick = self._wild.get(key)
        if not pick:
            if proto == self.echo and self.answers_ping:
                pick = self._nodes
            else:
                pick = self._listen.get((proto, lport))  # type: ignore[assignment]
            if not pick:
                return Miss.NO_LISTENER
        node = pick[0] if len(pick) == 1 else rendezvous(key, pick, self._weights or None)
        if len(self._hashed) >= 65536:
            self._hashed = {}
        self._hashed[key] = node
        self.counts["hashed"] += 1
        return node

    def _weighted_turn(self, turn: tuple, pick: list) -> Hashable | None:
        """The next of `pick` by smooth weighted round robin (nginx's): each candidate's current
        value grows by its weight, the largest (the first of equals) is taken and drops by the
        total. From all zeros the values are all zero again after sum(weights) picks, each node
        picked exactly its weight's times, spread out. None if the weights are all equal (plain
        round robin then, as without weights)."""
        weights = tuple(self._weights.get(n, 1) for n in pick)
        if weights.count(weights[0]) == len(weights):
            return None
        state = self._swrr.get(turn)
        nodes = tuple(pick)
        if state is None or state[0] != nodes or state[1] != weights:
            # (the candidates or their weights changed: a new cycle; values kept across a change
            # would make its first cycle's counts inexact)
            state = self._swrr[turn] = (nodes, weights, [0] * len(nodes))
        current = state[2]
        best = 0
        for j, w in enumerate(weights):
            current[j] += w
            if current[j] > current[best]:
                best = j
        current[best] -= sum(weights)
        return nodes[best]

    def _record(self, key: Key, node: Hashable, now: float) -> None:
        placed = self.placed
        if len(placed) >= self.max_placed:
            # The oldest goes (a SYN flood's, most likely: a real connection is shown by a walk
            # within a second and forgotten here then): refusing the newest instead would drop
            # every real connection's next segment for as long as a flood lasts.
            del placed[next(iter(placed))]
            self.counts["full"] += 1
        placed[key] = Placed(node, now)
        self.counts["placed"] += 1

    def collect(self, now: float) -> int:
        """Forget the connections placed that a walk now shows held (the node's socket answers for
        them from now on) or that none showed within `confirm_timeout` seconds (refused by the node,
        or never opened: a SYN flood); returns how many went. Call on a timer."""
        limit = now - self.confirm_timeout
        held = self.held
        # (shown held live by the node it was placed on: another node's TIME_WAIT on the key is not
        # it, nor is the node's own TIME_WAIT that a new SYN is replacing)
        gone = [k for k, p in self.placed.items() if p.at < limit or held.get(k) == (p.node, True)]
        for k in gone:
            del self.placed[k]
        self.counts["collected"] += len(gone)
        return len(gone)

    def describe(self) -> dict:
        """Sizes and counts, for a stats reply."""
        return {"held": len(self.held), "placed_pending": len(self.placed),
                "listeners": sum(len(v) for v in self._listen.values()),
                "wildcard_sockets": sum(len(v) for v in self._wild.values()),
                "nodes": len(self._views), "nodes_away": len(self._away),
                "placed": self.counts["placed"], "hashed": self.counts["hashed"],
                "collected": self.counts["collected"], "full": self.counts["full"],
                # (every node known or weighted: node -> weight)
                "weights": {n: self.weight(n) for n in sorted(set(self._views) | set(self._weights), key=repr)}}


def changes(old: NodeView, new: NodeView) -> frozenset:
    """The connection keys whose holding differs between two views of one node (pure: the
    walking thread works it out, so the table's thread does not)."""
    return (new.live ^ old.live) | (new.ending ^ old.ending)


def rendezvous(key: Key, nodes: list, weights: Mapping[Hashable, int] | None = None) -> Hashable:
    """The node with the highest hash of (`key`, node): the same answer for a flow whenever the
    same nodes are candidates, and only the flows of a node that leaves move. BLAKE2b of the
    text: stable across processes (Python's hash of bytes and str is not), and not linear as a
    CRC is (a CRC's maximum over names follows a trie of their bits: 50/25/25 over three).

    `weights` (node -> weight, 1 if not named): among unequal weights, the node with the highest
    weight / -ln(u), u the hash mapped into (0, 1). Each -ln(u) is an exponential draw, so a node
    wins with probability weight / sum(weights) (the least of exponential draws of rates
    1/weight), and a score depends only on its own node: a change of one node's weight moves only
    flows to it (it rose) or from it (it fell). Equal weights: the highest hash, as without."""
    text = f"{key[0]}|{key[1]!r}|{key[2]}|{key[3]}|".encode()
    if weights:
        ws = [weights.get(n, 1) for n in nodes]
        if ws.count(ws[0]) != len(ws):
            def score(j: int) -> tuple[float, bytes]:
                digest = blake2b(text + str(nodes[j]).encode(), digest_size=8).digest()
                return ws[j] / _neg_log_unit(int.from_bytes(digest, "big")), digest
            return nodes[max(range(len(nodes)), key=score)]
    return max(nodes, key=lambda n: blake2b(text + str(n).encode(), digest_size=8).digest())


def _neg_log_unit(h: int) -> float:
    """-ln(u) for u = (h + 0.5) / 2**64, h a 64-bit hash (u in (0, 1), never 0 nor 1), precise at
    both ends: through 1 - u where u is near 1 (a float u would round to 1 there, ln(u) to 0)."""
    if h < 1 << 63:
        return -math.log((h + 0.5) / 2.0 ** 64)
    return -math.log1p(-(((1 << 64) - h) - 0.5) / 2.0 ** 64)
