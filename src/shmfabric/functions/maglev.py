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
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum
from typing import Any, Iterable, Mapping, Sequence

from shmfabric.functions import lru
from shmfabric.net.flow import FiveTuple, canonical, flow_hash

__all__ = ["MaglevTable", "MaglevBalancer", "BackendState", "is_prime", "DEFAULT_TABLE_SIZE"]

#: The paper's size: prime, and large against the backend count (it advises M >> N; at M = 100 N
#: the share of each backend stays within about 1% of even).
DEFAULT_TABLE_SIZE = 65537


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
        if not is_prime(size):
            raise ValueError(f"Maglev table size must be prime (e.g. 65537, 16381, 4099), got {size}")
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
        if not is_prime(table_size):
            raise ValueError(f"Maglev table size must be prime (e.g. 65537, 16381, 4099), got {table_size}")
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

    def _known(self, name: str) -> None:
        if name not in self.weights:
            raise KeyError(f"no backend {name!r} (have: {', '.join(sorted(self.weights)) or 'none'})")

    def _rebuild(self) -> None:
        ready = {b: w for b, w in self.weights.items() if self.states[b] is BackendState.READY}
        key = tuple(sorted(ready.items()))
        if self.table is not None and getattr(self, "_table_key", None) == key:
            return
        self._table_key = key
        self.table = MaglevTable(ready, self.table_size, self.seed) if ready else None

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
