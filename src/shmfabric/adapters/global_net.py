"""The dispatcher of a global address: several nodes, one IP (the I/O shell around `conntable`).

The member nodes are TAP adapters (`shmfabric adapter --global VIP`) each holding the global
address on its namespace's `lo`, where its kernel accepts packets to it but never answers ARP for
it. The dispatcher is a fabric node of its own that does answer (ARP, IPv6 neighbour discovery),
so clients on the fabric send every packet for the global address to it; it looks each one up in
the connection table and forwards it, without copying, to the member's ring. The members answer
the clients straight (direct return, as LVS-DR servers do): only the client-to-server half of
each connection crosses the dispatcher.

The table learns what each member holds by walking the sockets of its namespace (`sockwalk`,
sock_diag netlink) every `walk_every` seconds, at once when a packet finds no entry (a member's
own outgoing connection, a listener just opened), and before the first packet: a dispatcher
restarted (even after SIGKILL) finds the connections already open where they are.

Members may have weights (1 to 256, default 1): a member of weight 3 gets three new connections,
and three times the datagram flows, for every one a member of weight 1 gets (see `conntable`).
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Callable, Mapping

from shmfabric.adapters.bridge import WAKE_EVERY, FabricPort
from shmfabric.adapters.conntable import MAX_WEIGHT, MIN_WEIGHT, ConnectionTable, Miss, NodeView, changes, \
    check_weight, view_of
from shmfabric.adapters.ethernet import fabric_mac_node
from shmfabric.adapters.global_packets import (ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, Drop, Flow, arp_reply,
                                               arp_request_for, dad_defence, flow_of_v4, flow_of_v6, gratuitous_arp,
                                               is_dad_for,
                                               neighbour_advert, refusal, solicitation_for, unsolicited_advert)
from shmfabric.adapters.sockwalk import NamespaceGone, SocketWalker
from shmfabric.adapters.tap import TapError, parse_global
from shmfabric.core import native
from shmfabric.fabric import Fabric, Node

DROP = 255  # a frame's code when it is not forwarded (answered, or dropped and counted)
MAX_MEMBERS = 254
FRAGMENT_TTL = 30.0  # seconds a first fragment's placement is kept for the fragments after it
UNPLACED_TTL = 5.0  # seconds a packet that found nobody waits for a walk to refuse its retry
MAX_PENDING = 65536  # first fragments and unplaced keys kept at most (the oldest go first)
MEMBERS_EVERY = 0.25  # seconds between looks at which members are attached, and under which node id
WALK_SOON = 0.25  # seconds: the soonest a miss asks for another walk after the last one (misses are
# what any node can send at will: they must not keep the walker busy)


class GlobalError(Exception):
    """A global address that cannot be set up; the message says what and how to fix it."""


@dataclass
class Member:
    """A node sharing the global address: its fabric node name and the namespace to walk."""

    name: str
    netns: str | None
    ref: tuple[int, int] | None = None  # (node id, incarnation) while attached
    index: int = 0
    weight: int = 1  # its share of new connections and flows against the others'


def parse_member(text: str) -> tuple[str, str | None]:
    """NODE=NETNS (or NODE: its sockets are walked in the dispatcher's own namespace)."""
    name, _, netns = text.partition("=")
    if not name:
        raise GlobalError(f"member {text!r} has no node name: give NODE=NETNS, e.g. web1=ns1")
    return name, netns or None


def parse_weight(text: str) -> tuple[str, int]:
    """NODE=N: a member's weight, an integer from 1 to 256."""
    name, eq, value = text.partition("=")
    if not name or not eq:
        raise GlobalError(f"weight {text!r} is not NODE=N; give a member's node name and an integer from "
                          f"{MIN_WEIGHT} to {MAX_WEIGHT}, e.g. --weight web1=3")
    if not (value.isascii() and value.isdigit()):  # (int() would take "1_0", " 3", "+3")
        raise GlobalError(f"weight {value!r} of member {name!r} is not an integer; give one from {MIN_WEIGHT} "
                          f"to {MAX_WEIGHT}, e.g. --weight {name}=3")
    weight = int(value)
    if not MIN_WEIGHT <= weight <= MAX_WEIGHT:
        raise GlobalError(f"weight {weight} of member {name!r} is out of range; give one from {MIN_WEIGHT} "
                          f"to {MAX_WEIGHT}")
    return name, weight


def check_weights(weights: Mapping[str, int], names: list[str]) -> dict[str, int]:
    """`weights` (member -> weight) if every one names a member of `names` and is in range, else
    GlobalError saying which is not."""
    for name, weight in weights.items():
        if name not in names:
            raise GlobalError(f"a weight is given for {name!r}, which is not a member (members: "
                              f"{', '.join(names) or 'none'}); add --member {name}=NETNS or fix the name")
        try:
            check_weight(weight)
        except ValueError as exc:
            raise GlobalError(f"member {name!r}: {exc}") from None
    return dict(weights)


class Walker(threading.Thread):
    """Walks every member's namespace every `every` seconds (or sooner, `soon()`) and turns each
    walk into the part of it the table needs (`view`, here: the main loop only swaps views in).
    Results are queued as (member, NodeView | WalkError, when the round started); the table itself
    is only ever touched by the main loop."""

    def __init__(self, members: list[Member], every: float, view: Callable[[list], NodeView]):
        super().__init__(name="socket-walk", daemon=True)
        self.members = members
        self.every = every
        self.view = view
        self.results: deque = deque()
        self._walkers: dict[str, SocketWalker] = {}
        self._prev: dict[str, NodeView] = {}  # each member's last view, to send only what changed
        self._lock = threading.Lock()  # _walkers: the thread's, and stop()'s once it has ended
        self._wake = threading.Event()
        self._halt = threading.Event()
        self.last = 0.0  # when the last round ended
        self._took = 0.0  # how long it took
        self._walking = False

    def walk_all(self) -> None:
        """One walk of every member. Queued: (member, NodeView, round start, previous view, keys
        changed) or (member, the exception, round start), then (None, None, round start) once the
        round is over (a refusal waits for a whole round begun after its first packet)."""
        started = time.monotonic()
        self._walking = True
        try:
            for m in self.members:
                with self._lock:
                    if self._halt.is_set():
                        return
                    w = self._walkers.get(m.name)
                    try:
                        if w is None:
                            w = self._walkers[m.name] = SocketWalker(m.netns)
                        view = self.view(w.walk())
                    except Exception as exc:  # noqa: BLE001 - one member's failure is not the others'
                        # (NamespaceGone: it went, a new walker for whatever comes next; anything else,
                        # netlink, an fd limit...: said, and tried again next round with the same
                        # walker, which knows its namespace: one deleted and made again meanwhile is
                        # then seen as such, not silently walked anew)
                        if isinstance(exc, NamespaceGone) and w is not None:
                            w.close()
                            self._walkers.pop(m.name, None)
                        self._prev.pop(m.name, None)
                        self.results.append((m.name, exc, started))
                        continue
                prev = self._prev.get(m.name)
                self._prev[m.name] = view
                self.results.append((m.name, view, started, prev, changes(prev, view) if prev is not None else None))
            self.results.append((None, None, started))
        finally:
            self._walking = False
            self.last = time.monotonic()
            self._took = self.last - started

    def soon(self) -> None:
        """Walk again now (a packet found no entry), unless a round is under way or has just
        ended: misses are what any node can send at will, so the walker rests at least as long as
        its last round took (never busier than half the time)."""
        if not self._walking and time.monotonic() - self.last >= max(WALK_SOON, self._took):
            self._wake.set()

    def run(self) -> None:
        while not self._halt.is_set():
            self._wake.wait(max(0.0, self.last + self.every - time.monotonic()))
            self._wake.clear()
            if self._halt.is_set():
                break
            try:
                self.walk_all()
            except Exception as exc:  # noqa: BLE001 - a walker that ended would freeze the table
                self.results.append(("", exc, time.monotonic()))

    def stop(self) -> None:
        """End the thread and close the walkers (after the walk under way, if any)."""
        self._halt.set()
        self._wake.set()
        if self.is_alive():
            self.join(15)
        with self._lock:
            for w in list(self._walkers.values()):
                w.close()
            self._walkers.clear()


class GlobalDispatcher(FabricPort):
    """The node that owns global address `address` on the fabric; see the module docstring."""

    kind = "global"

    def __init__(self, fabric: Fabric, node: Node, address: str, members: list[tuple[str, str | None]],
                 walk_every: float = 1.0, confirm_timeout: float = 5.0, batch: int = 256,
                 log: Callable[[str], None] = lambda line: None, weights: Mapping[str, int] | None = None):
        """`members`: (node name, namespace or None) each; `weights`: member -> weight (1 to 256,
        1 if not named)."""
        super().__init__(node, batch)
        try:
            ip = parse_global(address)  # (what a member's `--global` takes)
        except TapError as exc:
            raise GlobalError(str(exc)) from None
        if not members:
            raise GlobalError("a global address needs at least one member (--member NODE=NETNS)")
        if len(members) > MAX_MEMBERS:
            raise GlobalError(f"{len(members)} members: at most {MAX_MEMBERS}")
        names = [n for n, _ in members]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise GlobalError(f"member {sorted(dup)[0]!r} given twice")
        if node.name in names:
            raise GlobalError(f"the dispatcher {node.name!r} cannot be its own member")
        weights = check_weights(weights or {}, names)
        self.fabric = fabric
        self.ip = ip
        self.vip_bytes = ip.packed
        self.vip = int(ip) if ip.version == 4 else ip.packed
        if confirm_timeout < 2 * walk_every:
            raise GlobalError(f"confirm timeout {confirm_timeout:g} s is shorter than two walks ({walk_every:g} s "
                              "each): a connection placed would be forgotten before a walk could show it")
        self.table = ConnectionTable(self.vip, ip.version, confirm_timeout, full_after=walk_every, weights=weights)
        self.members = [Member(n, ns, index=i, weight=weights.get(n, 1)) for i, (n, ns) in enumerate(members)]
        self._by_name = {m.name: m for m in self.members}
        vip, family = self.vip, ip.version
        self.walker = Walker(self.members, walk_every, lambda records: view_of(vip, family, records))
        # Both keyed by what any node on the fabric may send, so bounded, the oldest going first:
        self._fragments: OrderedDict[tuple, tuple[str, float]] = OrderedDict()  # first fragment -> (member, when)
        self._unplaced: OrderedDict[tuple, float] = OrderedDict()  # key -> when a packet first found nobody
        self._applied = 0.0  # when the last walk round applied whole to the table started (_maybe_refuse)
        self._walk_failure = ""  # the last walk failure said (other than a namespace gone)
        self._unwalked: set[str] = set()  # members whose last walk failed: what they hold is not known
        self._failing: dict[str, tuple[str, float]] = {}  # member -> (its walk's failure, since when)
        self._defended = 0.0  # when the address was last defended against a DAD probe
        self._announce_at: list[float] = []  # when to announce the address again (set by start: a lost broadcast)
        self._log = log
        self._down: set[str] = set()  # members logged as unreachable (logged once each way)
        self.c = self.from_fabric  # one thread: the loop owns every counter

    @property
    def device_name(self) -> str:
        return str(self.ip)

    @property
    def counters(self) -> dict[str, int]:
        out = dict(self.from_fabric)
        out.update({f"table_{k}": v for k, v in self.table.describe().items() if k != "weights"})
        out.update({f"weight_{m.name}": m.weight for m in self.members})  # (numbers only: a flat reply)
        return dict(sorted(out.items()))

    # -- the members ---------------------------------------------------------------------------
    def _refresh_members(self) -> None:
        """Which members are attached, under which (id, incarnation): one pass over the node table.
        A member that leaves takes no new connection from now on; one that comes (back) takes
        them from its next walk, asked for now."""
        up = self.fabric.node_refs(self._by_name)
        came = False
        for m in self.members:
            ref = up.get(m.name)
            if (ref is None) != (m.ref is None):
                came |= ref is not None
                if ref is None:
                    self.table.set_placeable(m.name, False)
                    self._say_down(m.name, "its node is not attached to the fabric")
            m.ref = ref
        if came:
            self.walker.soon()

    def _apply_walks(self, now: float, budget: float = 0.02) -> None:
        """Take in the walks' results, for at most about `budget` seconds per call (the rest wait
        for the next pass of the loop: frames are not held up behind a round of large members)."""
        results = self.walker.results
        until = time.monotonic() + budget
        while results and time.monotonic() < until:
            item = results.popleft()
            name, got, started = item[0], item[1], item[2]
            if name is None:  # a round is over: refusals may rely on it
                self._applied = max(self._applied, started)
                continue
            if isinstance(got, BaseException):
                self._walk_failed(name, got, now)
                continue
            m = self._by_name[name]
            self._unwalked.discard(name)
            self.c["members_unwalked"] = len(self._unwalked)
            if self._failing.pop(name, None) is not None:
                self._log(f"member {name} walked again")
            # A member whose node is not attached (its adapter restarting) keeps its connections
            # (its kernel holds them; their packets are dropped meanwhile) but takes no new one.
            # (timed by the round's start: a queue is full for a walk period by the walks' clock)
            self.table.set_view(name, got, started, since=item[3], changed=item[4])
            self.table.set_placeable(name, m.ref is not None)
            if m.ref is None:
                self._say_down(name, "its node is not attached to the fabric")
            elif name in self._down:
                self._down.discard(name)
                self._log(f"member {name} is back")
            self.c["walks"] += 1

    def _walk_failed(self, name: str, got: BaseException, now: float) -> None:
        self.c["walk_errors"] += 1
        if not name:  # the round as a whole (said once per kind)
            if self._walk_failure != repr(got):
                self._walk_failure = repr(got)
                self._log(f"walking the members failed: {type(got).__name__}: {got}; tried again every round")
            return
        if isinstance(got, NamespaceGone):
            # what it held is unreachable: forgotten, nothing goes to it
            self._unwalked.discard(name)
            self._failing.pop(name, None)
            gone = self.table.remove_node(name)
            if gone:
                self.c["dropped_connections"] += gone
            self._say_down(name, str(got))
        else:
            # Failed on the way (netlink, fds, no root...): what it holds is not known now, so its
            # last view stands (its connections go on) and nobody is refused anything meanwhile
            # (`_maybe_refuse`). Failing for longer than a placement waits for a walk, it takes
            # no new connection (keeping its own) and refusals go on without it.
            first = self._failing.get(name)
            if first is None or first[0] != repr(got):
                self._log(f"walking member {name} failed: {type(got).__name__}: {got}; its last view stands, "
                          "tried again every round")
            since = first[1] if first is not None else now
            self._failing[name] = (repr(got), since)
            if now - since > self.table.confirm_timeout:
                self._unwalked.discard(name)
                self.table.set_placeable(name, False)
                self._say_down(name, f"its sockets cannot be read ({got})")
            else:
                self._unwalked.add(name)
        self.c["members_unwalked"] = len(self._unwalked)

    def _say_down(self, name: str, why: str) -> None:
        if name not in self._down:
            self._down.add(name)
            self._log(f"member {name} takes no new connections: {why}")

    def announce(self) -> None:
        """Tell every cache on the fabric that the global address is here (run after a start:
        a dispatcher restarted has another node id, so another MAC)."""
        frame = gratuitous_arp(self.node.mac, self.vip_bytes) if self.ip.version == 4 else \
            unsolicited_advert(self.node.mac, self.vip_bytes)
        try:
            self.node.flood(frame)
        except native.TapeBusyError:
            self.c["drop_tape_busy"] += 1

    # -- frames --------------------------------------------------------------------------------
    def pump(self, timeout: float) -> int:
        """Receive a batch (waiting up to `timeout` s for the first frame), answer what asks for
        the global address, forward the rest to their members; the frames handled."""
        c = self.c
        with self.node.recv_batch(self.batch, timeout) as b:
            now = time.monotonic()
            n = len(b)
            if not n:
                return 0
            c["frames"] += n
            codes = bytearray(n)
            used: dict[int, int] = {}
            v4 = self.ip.version == 4
            for i in range(n):
                f = b[i]
                et = f.ethertype
                code = DROP
                if et is None or len(f.dst) < 6:  # (shorter than an Ethernet header: the core took it)
                    c["drop_short"] += 1
                elif et == (ETH_P_IP if v4 else ETH_P_IPV6):
                    if not v4 and self._neighbour(f):
                        codes[i] = DROP
                        continue
                    if f.dst[0] & 1:  # (multicast IP to the group, MLD: not ours to place)
                        c["ignored"] += 1
                    else:
                        code = self._place(f, now, v4)
                elif et == ETH_P_ARP and v4:
                    self._arp(f)
                elif f.dst[0] & 1:
                    c["ignored"] += 1  # others' broadcasts and multicasts (another family's ND, ...)
                else:
                    c["drop_other"] += 1
                codes[i] = code
                if code != DROP:
                    used[code] = used.get(code, 0) + 1
            for idx, want in used.items():
                m = self.members[idx]
                if m.ref is None:
                    c["drop_member_gone"] += want
                    continue
                try:
                    sent = self.node.forward_where(m.ref[0], b, codes, idx, m.ref[1])
                except native.DestinationError:
                    m.ref = self.fabric.node_ref(m.name)
                    c["drop_member_gone"] += want
                    continue
                c["forwarded"] += sent
                c["to_" + m.name] += sent
                if sent < want:
                    c["drop_ring_full"] += want - sent
            return n

    def _place(self, f: native.Frame, now: float, v4: bool) -> int:
        c = self.c
        if v4:
            flow = flow_of_v4(f, self.vip)  # type: ignore[arg-type]  (a frame reads as a buffer)
        else:
            with memoryview(f) as p:  # (IPv6 addresses are sliced out: a frame has no slices)
                flow = flow_of_v6(p, self.vip)  # type: ignore[arg-type]
        if type(flow) is tuple:  # a fragment after the first: where its first went
            got = self._fragments.get(flow[1])
            if got is None or now - got[1] > FRAGMENT_TTL:
                c["drop_fragment_unknown"] += 1
                return DROP
            return self._by_name[got[0]].index
        if not isinstance(flow, Flow):
            c["drop_" + Drop(flow).name.lower()] += 1
            return DROP
        proto, faddr, fport, lport = flow.key
        node = self.table.lookup(proto, faddr, fport, lport, now, flow.opening)
        if isinstance(node, Miss):
            c["drop_" + node.name.lower()] += 1
            self.walker.soon()  # a member may hold what the last walk did not show yet
            if proto != self.table.echo:
                # Nobody listening (a SYN, a datagram), or a segment of a connection no member holds
                # (its member went away, or the dispatcher never knew it): answered as a host would,
                # with a reset or a port unreachable, once a fresh walk agrees, so the client stops
                # instead of retrying until its timeout.
                self._maybe_refuse(f, flow.key, now)
            return DROP
        if self._unplaced:
            self._unplaced.pop(flow.key, None)
        if flow.fragment is not None:
            frags = self._fragments
            frags[flow.fragment] = (node, now)
            frags.move_to_end(flow.fragment)
            if len(frags) > MAX_PENDING:
                frags.popitem(last=False)
        return self._by_name[node].index

    def _maybe_refuse(self, f: native.Frame, key: tuple, now: float) -> None:
        """Refuse a connection nobody waits for, as a host does (a TCP reset, an ICMP port
        unreachable): the client fails at once instead of retrying for minutes. Only once a walk
        done after its first packet still shows no listener: a server that has just started (the
        last walk is up to `walk_every` old) gets the client's retry instead."""
        first = self._unplaced.get(key)
        if first is None or now - first > UNPLACED_TTL:
            self._unplaced[key] = now
            self._unplaced.move_to_end(key)
            if len(self._unplaced) > MAX_PENDING:
                self._unplaced.popitem(last=False)
            return
        if self._applied <= first:  # no walk begun after it has reached the table yet
            return
        if self._unwalked:
            # a member whose last walk failed may hold the connection, or listen on the port: an
            # answer could cut a live connection or refuse a served port. Dropped, not answered.
            return
        del self._unplaced[key]
        with memoryview(f) as p:
            answer = refusal(p, self.node.mac, f.src_mac)
        if answer is not None:
            self._answer(f, answer, "refused")

    def _arp(self, f: native.Frame) -> None:
        asked = arp_request_for(f.raw, self.vip_bytes)
        if asked is None:
            return  # other hosts' ARP: not ours
        mac, ip = asked
        self._answer(f, arp_reply(self.node.mac, self.vip_bytes, mac, ip), "arp_replies")

    def _neighbour(self, f: native.Frame) -> bool:
        """Answer a neighbour solicitation for the global address; True if `f` was one."""
        with memoryview(f) as p:
            src = solicitation_for(p, self.vip_bytes)
            dad = src is None and is_dad_for(p, self.vip_bytes)
        if dad:  # another host checks whether the address is free: it is not (RFC 4861 7.2.4)
            now = time.monotonic()
            if now - self._defended < 1.0:  # (once a second: each probe would flood the tape)
                return True
            self._defended = now
            try:
                self.node.flood(dad_defence(self.node.mac, self.vip_bytes))
                self.c["dad_defended"] += 1
            except native.TapeBusyError:
                self.c["drop_tape_busy"] += 1
            return True
        if src is None:
            return False
        self._answer(f, neighbour_advert(self.node.mac, self.vip_bytes, f.src_mac, src), "nd_replies")
        return True

    def _answer(self, f: native.Frame, frame: bytes, counter: str) -> None:
        # (to the node the source MAC names: a frame's `src` is read from the same bytes, and a MAC
        # outside the fabric's space names no node at all)
        dst = fabric_mac_node(f.src_mac)
        if dst is None or dst == self.node.id:  # (a forged source MAC of our own: never answer ourselves)
            self.c["drop_answer_unroutable"] += 1
            return
        try:
            if self.node.send_batch(dst, (frame,), raw=True):
                self.c[counter] += 1
            else:
                self.c["drop_answer_ring_full"] += 1
        except native.DestinationError:
            self.c["drop_answer_unroutable"] += 1

    def _collect_fragments(self, now: float) -> None:
        frags = self._fragments
        while frags and now - next(iter(frags.values()))[1] > FRAGMENT_TTL:
            frags.popitem(last=False)
        pending = self._unplaced
        while pending and now - next(iter(pending.values())) > UNPLACED_TTL:
            pending.popitem(last=False)

    # -- the loop ------------------------------------------------------------------------------
    def start(self) -> None:
        """Resolve the members, walk them once (connections already open stay where they are),
        announce the address and start the periodic walks."""
        self._refresh_members()
        self.walker.walk_all()
        self._apply_walks(time.monotonic(), budget=float("inf"))
        self.announce()
        now = time.monotonic()
        self._announce_at = [now + 1.0, now + 2.0]  # twice more (RFC 5227's announcements): a broadcast may be lost
        self.walker.start()

    def run(self, stopping: Callable[[], bool], started: bool = False) -> None:
        """Dispatch until `stopping()` or a control `stop` (checked at least every WAKE_EVERY s);
        `started`: `start()` was called already."""
        if not started:
            self.start()
        self.ready = True
        next_look = next_second = time.monotonic() + MEMBERS_EVERY
        try:
            while not stopping() and not self.stop_requested:
                self.pump(WAKE_EVERY)
                now = time.monotonic()
                if self.walker.results:
                    self._apply_walks(now)
                if now >= next_look:  # members come and go (a restarted one has another node id)
                    next_look = now + MEMBERS_EVERY
                    self._refresh_members()
                if now >= next_second:  # placements no walk confirmed go; so do old fragments
                    next_second = now + 1.0
                    self.table.collect(now)
                    self._collect_fragments(now)
                    if self._announce_at and now >= self._announce_at[0]:
                        self._announce_at.pop(0)
                        self.announce()
        finally:
            self.walker.stop()
