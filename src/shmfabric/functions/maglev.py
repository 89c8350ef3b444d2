"""L4 load-balancer logic: Maglev consistent hashing (Eisenbud et al., NSDI 2016) plus a flow table
so that established flows stay on their backend, and HAProxy's admin states. Pure (sans-IO):
5-tuples and `now` come in, backend names go out.

* `MaglevTable`: the lookup table of prime size M, filled by each backend in turn with the next
  free slot of its own permutation (`offset + j * skip mod M`). Every backend owns M/N slots give
  or take one, and when a backend leaves, only its slots and a small share of the others change.
* `MaglevBalancer`: the table over the *ready* backends, a bounded flow table with idle expiry
  (amortized O(1) per flow: see `_sweep`), and the states `ready` (gets new flows), `drain` (keeps its flows, gets no new ones) and
  `maint` (out: its flows are moved).

Hashes are blake2b over backend names and CRC32 (`shmfabric.net.flow.flow_hash`) over 5-tuples:
stable across processes and runs, so several balancer instances with the same backends agree.
"""
from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum
from operator import itemgetter
from struct import Struct
from typing import Any, Iterable, Mapping, Sequence

from shmfabric.functions import lru
from shmfabric.net.errors import Reason
from shmfabric.net.flow import FiveTuple, canonical, flow_hash
from shmfabric.net.packet import LINK_IP, decode

__all__ = ["MaglevTable", "MaglevBalancer", "BackendState", "is_prime", "check_table_size", "fragment_key",
           "fragment_keys", "DEFAULT_TABLE_SIZE", "MAX_TABLE_SIZE"]

#: The paper's size: prime, and large against the backend count (it advises M >> N; at M = 100 N
#: the share of each backend stays within about 1% of even).
DEFAULT_TABLE_SIZE = 65537
#: The largest table accepted: building one takes ~1.2 s in CPython at 2**20 slots (~10 s at 2**22,
#: growing faster than M), and a trial-division primality test of a huge number never ends.
MAX_TABLE_SIZE = 1 << 20


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    i = 3
    while i * i <= n:
        if n % i == 0:
            return False
        i += 2
    return True


def check_table_size(size: object) -> int:
    """`size` if it is a usable table size (a prime up to MAX_TABLE_SIZE), else ValueError.
    The bound is checked first, so a huge number is refused at once instead of hanging the
    primality test."""
    if not isinstance(size, int) or isinstance(size, bool):
        raise ValueError(f"Maglev table size must be a whole number (a prime such as 65537), got {size!r}")
    if size > MAX_TABLE_SIZE:
        raise ValueError(f"Maglev table size {size} is too large: at most {MAX_TABLE_SIZE} (2**20; e.g. 1048573, "
                         f"which takes about a second to build); the default 65537 suits up to ~650 backends")
    if not is_prime(size):
        raise ValueError(f"Maglev table size must be prime (e.g. 65537, 16381, 4099), got {size}")
    return size


# --- IP fragments ------------------------------------------------------------------------------------
# A non-first fragment has no L4 header, hence no ports: `parse_5tuple_ip` answers Reason.FRAGMENT.
# Balancers (the Maglev paper, section 3.3) and policers use (src, dst, proto) for fragments.

_V4_ADDRS = Struct("!9xB2xII").unpack_from  # protocol, source, destination of an IPv4 header
_V6_ADDRS = Struct("!8x16s16sB").unpack_from  # source, destination, then a Fragment header's next header
_FRAGMENT = Reason.FRAGMENT


def fragment_key(buf: Any) -> tuple | None:
    """(src, dst, proto) of an IP packet (no Ethernet header), in the 5-tuple's address forms
    (IPv4 int, IPv6 16 bytes); for IPv6 `proto` is the header after the extension headers (for a
    non-first fragment: the Fragment header's next header). None if it is not IP. Meant for
    frames `parse_5tuple_ip` classified as Reason.FRAGMENT, whose IP header it validated."""
    n = len(buf)
    if n >= 20 and buf[0] >> 4 == 4:
        proto, src, dst = _V4_ADDRS(buf, 0)
        return (src, dst, proto)
    if n >= 48 and buf[0] >> 4 == 6 and buf[6] == 44:  # the Fragment header right after the fixed one
        src, dst, proto = _V6_ADDRS(buf, 0)
        return (src, dst, proto)
    ip = decode(buf, 0, LINK_IP).ip  # other extension headers first: walk them
    if ip is None:
        return None
    return (ip.src, ip.dst, _fragment_proto(ip))


def _fragment_proto(ip: Any) -> int:
    """The protocol of an IP fragment's 3-tuple: for IPv6 the Fragment header's next header
    (`frag_next_header`: a first fragment's `proto` would give it another key than the rest)."""
    nh = ip.frag_next_header if ip.version == 6 else None
    return ip.proto if nh is None else nh


def _table(pick) -> bytes:  # type: ignore[no-untyped-def]
    return bytes(0xFF if pick(b) else 0 for b in range(256))


_T_V4 = _table(lambda b: b >> 4 == 4)                   # version/IHL byte of IPv4
_T_V6 = _table(lambda b: b >> 4 == 6)                   # first byte of IPv6
_T_V4_FRAG = _table(lambda b: b & 0x3F)                 # IPv4 byte 6: MF or offset bits (high 5)
_T_NONZERO = _table(lambda b: b)                        # IPv4 byte 7: offset bits (low 8)
_T_V6_EXT = _table(lambda b: b not in (6, 17, 58, 59))  # IPv6 next header: not TCP/UDP/ICMPv6/none
_V4_FIRST = bytes(range(0x40, 0x50))                   # deleted: what remains is not IPv4
_V6_FIRST = bytes(range(0x60, 0x70))
_V4_NOT_FRAG = bytes(b for b in range(256) if not b & 0x3F)  # deleted: what remains has MF or offset bits
_V6_PLAIN = bytes((6, 17, 58, 59))
_HEAD8 = itemgetter(slice(0, 8))
_FF = re.compile(b"\xff")


def _candidates(frames: Any) -> list[int] | None:
    """Indices of frames that may be IP fragments, from their first 8 bytes at C speed: IPv4 with
    MF or an offset, IPv6 with an extension header (a Fragment header may be among them). None:
    the screen could not run (a frame shorter than 8 bytes): look at every frame."""
    n = len(frames)
    gather = getattr(frames, "gather", None)
    if gather is not None:  # a fabric FrameBatch: one copy of every frame's first bytes
        g = gather(8)
        vers, b6, b7 = g[4::12], g[10::12], g[11::12]
    else:
        g = b"".join(map(_HEAD8, frames))
        if len(g) != 8 * n:
            return None
        vers, b6, b7 = g[0::8], g[6::8], g[7::8]
    # the common cases in three C calls: all IPv4 and none fragmented; all IPv6 with TCP/UDP/ICMPv6 next
    if not vers.translate(None, _V4_FIRST):
        if b7.count(0) == n and not b6.translate(None, _V4_NOT_FRAG):
            return []
    elif not vers.translate(None, _V6_FIRST) and not b6.translate(None, _V6_PLAIN):
        return []
    v4 = int.from_bytes(vers.translate(_T_V4), "big")
    frag = int.from_bytes(b6.translate(_T_V4_FRAG), "big") | int.from_bytes(b7.translate(_T_NONZERO), "big")
    hit = v4 & frag
    v6 = int.from_bytes(vers.translate(_T_V6), "big")
    if v6:
        hit |= v6 & int.from_bytes(b6.translate(_T_V6_EXT), "big")
    if not hit:
        return []
    return [m.start() for m in _FF.finditer(hit.to_bytes(n, "big"))]


def fragment_keys(frames: Any, keys: list) -> int:
    """Give every IP fragment of a batch the key (src, dst, proto, 0, 0) in `keys` (the batch's
    `classify_batch(frames, None, "ip")` result), in place: first fragments (MF set, offset 0)
    too, whose 5-tuple has ports the later fragments lack, so that all fragments of a datagram
    get the same key and go the same way (the Maglev paper's 3-tuple for fragments). Unfragmented
    packets keep their 5-tuple; an IPv6 atomic fragment (offset 0, M clear) is unfragmented.
    Returns how many keys it changed. Unfragmented traffic pays a screen of the frames' first
    8 bytes at C speed (see `_candidates`); only the frames it flags are looked at in Python."""
    idx = _candidates(frames)
    if idx is None:
        idx = range(len(frames))
    changed = 0
    for i in idx:
        k = keys[i]
        if k.__class__ is tuple:
            f = frames[i]
            if f[0] >> 4 == 4:
                if not f[6] & 0x20:  # a 5-tuple has offset 0: MF decides
                    continue
            else:
                ip = decode(f, 0, LINK_IP).ip
                if ip is None or ip.version != 6 or not ip.first_fragment:
                    continue
                keys[i] = (k[0], k[1], _fragment_proto(ip), 0, 0)
                changed += 1
                continue
            keys[i] = (k[0], k[1], k[2], 0, 0)
            changed += 1
        elif k is _FRAGMENT:
            t = fragment_key(frames[i])
            if t is not None:
                keys[i] = (t[0], t[1], t[2], 0, 0)
                changed += 1
    return changed


def _name_hashes(name: str, seed: int) -> tuple[int, int]:
    d = hashlib.blake2b(name.encode(), digest_size=16, salt=seed.to_bytes(8, "little")).digest()
    return int.from_bytes(d[:8], "little"), int.from_bytes(d[8:], "little")


class MaglevTable:
    """The Maglev lookup table for `backends` (names; weights are whole numbers of turns per round).

    `lookup(h)` maps any hash value to a backend name. Construction is O(M log M) in the worst
    case: 30-80 ms in CPython for M = 65537 and 2-100 backends, so rebuild on membership changes,
    not per packet.
    """

    def __init__(self, backends: Sequence[str] | Mapping[str, int], size: int = DEFAULT_TABLE_SIZE, seed: int = 0) -> None:
        check_table_size(size)
        if not isinstance(backends, Mapping) and len(set(backends)) != len(backends):
            raise ValueError("backend names must be unique")
        weights = dict(backends) if isinstance(backends, Mapping) else {b: 1 for b in backends}
        if not weights:
            raise ValueError("a Maglev table needs at least one backend")
        if any(not isinstance(w, int) or w < 1 for w in weights.values()):
            raise ValueError("weights must be whole numbers >= 1")
        if len(weights) > size:
            raise ValueError(f"more backends ({len(weights)}) than table slots ({size}): use a larger prime size")
        # Sorted, so the table depends on the set of backends, not on the order they were given in.
        self.backends: list[str] = sorted(weights)
        self.size = size
        self.seed = seed
        self.table: list[int] = self._populate([weights[b] for b in self.backends])

    def _populate(self, weights: list[int]) -> list[int]:
        m = self.size
        offsets, skips = [], []
        for name in self.backends:
            h1, h2 = _name_hashes(name, self.seed)
            offsets.append(h1 % m)
            skips.append(h2 % (m - 1) + 1)
        nxt = [0] * len(self.backends)
        entry = [-1] * m
        filled = 0
        turns = [(i, w) for i, w in enumerate(weights)]
        while True:
            for i, w in turns:
                off, skip = offsets[i], skips[i]
                for _ in range(w):
                    j = nxt[i]
                    c = (off + j * skip) % m
                    while entry[c] >= 0:
                        j += 1
                        c = (off + j * skip) % m
                    entry[c] = i
                    nxt[i] = j + 1
                    filled += 1
                    if filled == m:
                        return entry

    def lookup(self, h: int) -> str:
        return self.backends[self.table[h % self.size]]

    def shares(self) -> dict[str, int]:
        """How many table slots each backend owns."""
        out = dict.fromkeys(self.backends, 0)
        for i in self.table:
            out[self.backends[i]] += 1
        return out


class BackendState(str, Enum):
    READY = "ready"
    DRAIN = "drain"
    MAINT = "maint"


@dataclass
class _Flow:
    __slots__ = ("backend", "expires", "placed")
    backend: str
    expires: float
    placed: float  # `expires` when the flow was put at its place in the table's order (see _sweep)


def _flow_expired(f: Any, now: float) -> bool:
    return f.expires <= now


def _flow_requeue(f: Any) -> bool:
    """Used since it was placed (its expiry moved): placed anew, to the new end."""
    if f.expires != f.placed:
        f.placed = f.expires
        return True
    return False


class MaglevBalancer:
    """Consistent-hash balancer with flow affinity. `pick(key, now)` returns a backend name, or
    None when no backend is ready and the flow has none to stay on.

    `symmetric=True` gives both directions of a flow the same backend (for balancers that see
    replies too). Counters: `new_flows`, `moved_flows` (their backend went to maint or away),
    `no_backend`, `expired_flows`, `flows_evicted` (live flows forgotten because the table held
    `max_flows` and none had expired: the least recently used one goes; if it sends again it
    gets the consistent-hash choice, the same backend unless membership changed meanwhile).

    The flow table is kept in last-use order, lazily: a packet of a known flow only moves its
    expiry time, and `_sweep` re-queues such a flow when it reaches the old end. Expiry and
    eviction work from the old end, so each costs O(1) amortized, never a scan of the table."""

    def __init__(self, backends: Iterable[str] | Mapping[str, int] = (), *, table_size: int = DEFAULT_TABLE_SIZE,
                 seed: int = 0, flow_timeout: float = 300.0, max_flows: int = 1_000_000, symmetric: bool = False) -> None:
        check_table_size(table_size)
        self.table_size, self.seed, self.flow_timeout, self.max_flows = table_size, seed, flow_timeout, max_flows
        self.symmetric = symmetric
        ws = dict(backends) if isinstance(backends, Mapping) else {b: 1 for b in backends}
        self.weights: dict[str, int] = ws
        self.states: dict[str, BackendState] = {b: BackendState.READY for b in ws}
        self.table: MaglevTable | None = None
        if max_flows < 1:
            raise ValueError(f"max_flows must be at least 1, got {max_flows}")
        # OrderedDict, not dict: popping a plain dict's first entry again and again is O(n) each
        # (deleted slots at the front are skipped on every iter() until the next resize).
        self._flows: OrderedDict[FiveTuple, _Flow] = OrderedDict()
        self.new_flows = self.moved_flows = self.no_backend = self.expired_flows = self.flows_evicted = 0
        self.swept = 0  # entries looked at by _sweep (a work count for tests)
        self._rebuild()

    # --- membership ----------------------------------------------------------------------------
    def add_backend(self, name: str, weight: int = 1, state: BackendState | str = BackendState.READY) -> None:
        if name in self.weights:
            raise ValueError(f"backend {name!r} already exists")
        self.weights[name] = weight
        self.states[name] = BackendState(state)
        self._rebuild()

    def remove_backend(self, name: str) -> None:
        self._known(name)
        del self.weights[name], self.states[name]
        self._rebuild()

    def set_state(self, name: str, state: BackendState | str) -> None:
        """ready / drain / maint, as HAProxy's `set server ... state`."""
        self._known(name)
        self.states[name] = BackendState(state)
        self._rebuild()

    def set_backends(self, backends: Mapping[str, tuple[int, BackendState | str]], *, table_size: int | None = None,
                     seed: int | None = None) -> None:
        """The whole membership at once, {name: (weight, state)}, and optionally a new table size
        or seed: backends not listed are removed, new ones added, the others re-weighted and put in
        their state, with one table build (adding, removing or changing backends one by one
        builds it per change) and none when the ready set, the size and the seed are unchanged.
        All or nothing: on ValueError nothing changed. Remembered flows keep their backend (those
        of a backend gone or in maint move at their next packet); the table decides new flows."""
        for name, (weight, _) in backends.items():
            if not isinstance(weight, int) or isinstance(weight, bool) or weight < 1:
                raise ValueError(f"backend {name!r}: weight must be a whole number >= 1, got {weight!r}")
        states = {name: BackendState(st) for name, (_, st) in backends.items()}
        weights = {name: w for name, (w, _) in backends.items()}
        size = self.table_size if table_size is None else check_table_size(table_size)
        sd = self.seed if seed is None else seed
        table, key = self._build(weights, states, size, sd)  # may raise: nothing is changed yet
        self.weights, self.states, self.table_size, self.seed = weights, states, size, sd
        self.table, self._table_key = table, key

    def _known(self, name: str) -> None:
        if name not in self.weights:
            raise KeyError(f"no backend {name!r} (have: {', '.join(sorted(self.weights)) or 'none'})")

    def _rebuild(self) -> None:
        self.table, self._table_key = self._build(self.weights, self.states, self.table_size, self.seed)

    def _build(self, weights: Mapping[str, int], states: Mapping[str, BackendState], size: int,
               seed: int) -> tuple[MaglevTable | None, tuple]:
        """The table for the ready backends (None if there is none) and its key; the current table
        when the key is the current one."""
        ready = {b: w for b, w in weights.items() if states[b] is BackendState.READY}
        key = (size, seed, tuple(sorted(ready.items())))
        if getattr(self, "_table_key", None) == key:
            return self.table, key
        return (MaglevTable(ready, size, seed) if ready else None), key

    # --- data path -------------------------------------------------------------------------------
    def pick(self, key: FiveTuple, now: float) -> str | None:
        """The backend for this packet's flow."""
        k = canonical(key) if self.symmetric else key
        f = self._flows.get(k)
        if f is not None:
            if f.expires > now and self.states.get(f.backend) in (BackendState.READY, BackendState.DRAIN):
                f.expires = now + self.flow_timeout
                return f.backend
            if f.expires > now:
                self.moved_flows += 1
            else:  # expired but not swept yet: it expires now (the sweep would have counted it)
                self.expired_flows += 1
            del self._flows[k]
        if self.table is None:
            self.no_backend += 1
            return None
        backend = self.table.lookup(flow_hash(k, self.seed))
        self.new_flows += 1
        flows = self._flows
        # a little expiry per new flow keeps the table near the live flows even when on_timer
        # is not called; a full table then frees the least recently used flow
        self._sweep(now, 2)
        if len(flows) >= self.max_flows:
            self._sweep(now, None, evict=len(flows) - self.max_flows + 1)
        exp = now + self.flow_timeout
        flows[k] = _Flow(backend, exp, exp)
        return backend

    @property
    def table_full(self) -> int:
        """Old name of `flows_evicted` (a full table now forgets its least recently used flow)."""
        return self.flows_evicted

    def pick_into(self, keys: Sequence[FiveTuple | int], now: float, out: bytearray, codes: Mapping[str, int],
                  none_code: int) -> int:
        """`pick` per entry, written as `out[i] = codes[backend]` (`none_code` where pick gives
        None, or the entry is not a 5-tuple). Returns how many got `none_code`.

        Same choices, flow table and counters as calling `pick` in order: a packet of a known
        flow on a live backend (the bulk of traffic) takes an inlined lookup, saving two calls
        per packet; everything else calls `pick`."""
        pick = self.pick
        get = self._flows.get
        live = {b: codes[b] for b, st in self.states.items()
                if (st is BackendState.READY or st is BackendState.DRAIN) and b in codes}
        live_get = live.get
        sym = self.symmetric
        expires = now + self.flow_timeout
        misses = 0
        for i, key in enumerate(keys):
            if key.__class__ is tuple:
                k = key
                if sym:  # canonical(), inlined
                    src, dst, proto, sport, dport = key
                    if src > dst or (src == dst and sport > dport):
                        k = (dst, src, proto, dport, sport)
                f = get(k)
                if f is not None and f.expires > now:
                    code = live_get(f.backend)
                    if code is not None:
                        f.expires = expires
                        out[i] = code
                        continue
                b = pick(key, now)  # type: ignore[arg-type]
            else:
                b = None
            if b is None:
                out[i] = none_code
                misses += 1
            else:
                out[i] = codes[b]
        return misses

    def pick_batch(self, keys: Iterable[FiveTuple | int], now: float) -> list[str | None]:
        """`pick` per entry; entries that are not 5-tuples (a `Reason`) get None."""
        return [self.pick(k, now) if isinstance(k, tuple) else None for k in keys]  # type: ignore[arg-type]

    def _sweep(self, now: float, limit: int | None, evict: int = 0) -> int:
        """Work from the old end of the flow table: forget expired flows, re-queue flows used
        since they were placed, and stop at the first live one that was not (every flow behind
        it was placed later and expires later). With `evict`, then forget that many live
        flows from the old end too: the least recently used ones. `limit` bounds the entries
        looked at (None: no bound). Returns how many flows expired.

        Cost: each flow is looked at once when it expires or is evicted, plus once per time
        it was re-queued, which needs a packet in between: O(1) amortized per packet."""
        expired, evicted, n = lru.sweep(self._flows, now, limit, _flow_expired, _flow_requeue, evict)
        self.flows_evicted += evicted
        self.swept += n
        self.expired_flows += expired
        return expired

    def expire(self, now: float, limit: int | None = None) -> int:
        """Forget idle flows (looking at no more than `limit` entries if given); returns how many."""
        return self._sweep(now, limit)

    def expire_pending(self, now: float) -> bool:
        """True if the oldest entry of the flow table needs a look (expired or re-queue)."""
        if not self._flows:
            return False
        f = next(iter(self._flows.values()))
        return f.expires <= now or f.expires != f.placed

    def flows(self) -> int:
        return len(self._flows)

    def status(self) -> list[dict[str, object]]:
        """Per backend: state, weight, table share and remembered flows (sorted by name)."""
        shares = self.table.shares() if self.table else {}
        per = dict.fromkeys(self.weights, 0)
        for f in self._flows.values():
            if f.backend in per:
                per[f.backend] += 1
        return [{"backend": b, "state": self.states[b].value, "weight": self.weights[b],
                 "table_slots": shares.get(b, 0), "flows": per[b]} for b in sorted(self.weights)]
