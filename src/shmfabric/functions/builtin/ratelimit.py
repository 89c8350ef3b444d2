"""`ratelimit`: token buckets per class or per flow, policing (drop over rate) or shaping (delay).

Classes are tried in order; the first whose match fits a packet's 5-tuple owns it:

    mode: police                  # default for classes that don't say (police | shape)
    classes:
      - name: web
        match: {proto: tcp, dport: [80, 443]}
        rate: 20mbit              # pps/kpps/mpps, bit/kbit/mbit/gbit (per second), B/s kB/s MB/s GB/s
        burst: 64kB               # packets for packet rates, bytes for byte rates (default: 10 ms, >= 1 packet)
      - name: per-host-dns
        match: {proto: udp, dport: 53}
        rate: 100pps
        per: flow                 # one bucket per 5-tuple instead of one for the class
      - name: rest
        rate: 1gbit
        mode: shape

Policing answers at once: a conforming frame goes on (NEXT, zero copy), an excess one is
dropped. Shaping delays excess frames instead: the frame is copied into the bucket's FIFO queue
(its slot goes back at once, verdict CONSUMED), and released through `ctx.emit` when the bucket
has tokens again: from the next `process()` call, or from `on_timer` at the time
`next_deadline()` names, which the runtime honours. A frame that would wait longer than
`max_delay` (or find its queue full) is dropped at arrival — the tail drop of tc's `tbf latency`.
While a bucket has a backlog, newer frames of it queue behind it, so shaping never reorders a
class or flow. Copying is the cost of delaying: a fabric slot cannot be kept past its batch.

IP fragments: a non-first fragment has no L4 header, hence no ports. With `fragments: police`
(the default) it is classified by (src, dst, proto) against the classes whose match has no port
condition (it matches no class with `sport`/`dport`), and policed or shaped there; with `per:
flow` its bucket is per (src, dst, proto). The first fragment has its ports and goes by its
5-tuple like any packet. `pass` lets non-first fragments through, `drop` drops them all.

Buckets are pure: time is the `now` passed in, nothing here reads the clock.
"""
from __future__ import annotations

import heapq
import math
import re
from collections import OrderedDict, deque
from typing import Any, ClassVar, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shmfabric.functions import lru
from shmfabric.functions.api import FunctionContext, Verdict
from shmfabric.functions.builtin._match import CompiledMatch, Match
from shmfabric.functions.maglev import fragment_key
from shmfabric.net.errors import Reason
from shmfabric.net.flow import parse_5tuple_ip

NEXT, DROP, CONSUMED = int(Verdict.NEXT), int(Verdict.DROP), int(Verdict.CONSUMED)
_FRAGMENT = Reason.FRAGMENT
#: per-flow buckets one on_timer call looks at per class (~0.3 µs each); more waits for the next call
SWEEP_SLICE = 4096

# --- rates and sizes as people write them --------------------------------------------------------

_NUM = r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)"
_RATE_RE = re.compile(rf"^\s*{_NUM}\s*([A-Za-z/]*)\s*$")
# unit -> (factor, "packets" | "bytes"); bit units are lower-cased first, byte units are case-sensitive
_PACKET_UNITS = {"pps": 1.0, "p/s": 1.0, "kpps": 1e3, "mpps": 1e6}
_BIT_UNITS = {"bit": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8}
_BYTE_UNITS = {"B/s": 1.0, "kB/s": 1e3, "KB/s": 1e3, "MB/s": 1e6, "GB/s": 1e9}
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 10**6, "mb": 10**6, "mib": 2**20,
               "p": 1, "pkt": 1, "pkts": 1, "packets": 1}
# what a size unit counts; a plain number and the bare multipliers k, m fit either kind of rate
_SIZE_KIND = {"b": "bytes", "kb": "bytes", "kib": "bytes", "mb": "bytes", "mib": "bytes",
              "p": "packets", "pkt": "packets", "pkts": "packets", "packets": "packets"}


def parse_rate(text: str | float | int) -> tuple[float, str]:
    """'20mbit' -> (2.5e6, 'bytes'); '100pps' -> (100.0, 'packets'). Rates are per second.
    ValueError (never another exception) for anything else, whatever its type."""
    if text is None or text == "":
        raise ValueError("rate is empty; write a number with a unit, e.g. 1000pps, 10mbit or 5MB/s")
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise ValueError(f"rate {text!r} is not a rate; write a number with a unit, e.g. 1000pps, 10mbit or 5MB/s")
    if isinstance(text, (int, float)):
        raise ValueError(f"rate {text!r} needs a unit: e.g. '{text}pps' (packets) or '{text}mbit' (bits)")
    m = _RATE_RE.match(text)
    if not m:
        raise ValueError(f"rate {text!r} is not a number with a unit (e.g. 1000pps, 10mbit, 5MB/s)")
    value, unit = float(m.group(1)), m.group(2)
    lu = unit.lower()
    if lu in _PACKET_UNITS:
        factor, kind = _PACKET_UNITS[lu], "packets"
    elif lu.removesuffix("/s") in _BIT_UNITS:
        factor, kind = _BIT_UNITS[lu.removesuffix("/s")], "bytes"
    elif unit in _BYTE_UNITS:
        factor, kind = _BYTE_UNITS[unit], "bytes"
    elif lu in ("bps", "kbps", "mbps", "gbps"):
        p = lu[:-3]
        raise ValueError(f"rate {text!r}: {unit!r} is ambiguous (tc reads it as bytes, most people as bits); "
                         f"write {value:g}{p}bit for bits or {value:g}{p.upper() if p != 'k' else p}B/s for bytes")
    elif not unit:
        raise ValueError(f"rate {text!r} needs a unit: e.g. '{value:g}pps' (packets) or '{value:g}mbit' (bits)")
    else:
        raise ValueError(f"rate {text!r}: unknown unit {unit!r}; use pps, kpps, mpps, bit, kbit, mbit, gbit, "
                         f"B/s, kB/s, MB/s or GB/s")
    rate = value * factor
    if not rate > 0 or math.isinf(rate):
        raise ValueError(f"rate {text!r} must be positive and finite")
    return rate, kind


def parse_size(text: str | int | float) -> float:
    """'64kB' -> 64000; '32' -> 32; '2KiB' -> 2048 (packets or bytes, the rate's kind decides)."""
    return size_and_kind(text)[0]


def size_and_kind(text: str | int | float) -> tuple[float, str | None]:
    """(size, what its unit counts): '64kB' -> (64000, 'bytes'); '10p' -> (10, 'packets');
    32 or '2k' -> (32, None) (either). ValueError (never another exception) for anything else."""
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise ValueError(f"burst {text!r} is not a size; write a number, with a unit if you like "
                         f"(e.g. 32, 10p, 64kB, 1MiB)")
    if isinstance(text, (int, float)):
        value, unit = float(text), ""
    else:
        m = _RATE_RE.match(text)
        if not m or m.group(2).lower() not in _SIZE_UNITS:
            raise ValueError(f"burst {text!r} is not a size (e.g. 32, 64kB, 1MiB, 10p)")
        value, unit = float(m.group(1)), m.group(2).lower()
    size = value * _SIZE_UNITS[unit]
    if not size > 0 or math.isinf(size):
        raise ValueError(f"burst {text!r} must be positive and finite")
    return size, _SIZE_KIND.get(unit)


# --- the bucket -------------------------------------------------------------------------------------

class Bucket:
    """A token bucket: `rate` tokens per second up to `burst`; a token is a packet or a byte.

    It starts full. `take(now, cost)` spends `cost` tokens if there are enough. Time only moves
    forward: a `now` older than the last one refills nothing (monotonic time is the contract).
    For shaping it also holds a FIFO of (cost, frame copy) waiting for tokens.
    """

    __slots__ = ("rate", "burst", "tokens", "last", "queue", "qcost", "in_heap", "placed")

    def __init__(self, rate: float, burst: float, now: float | None = None) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.last: float | None = None
        self.placed = now  # per-flow buckets: `last` when put at its place in the LRU order
        self.queue: deque[tuple[float, bytes]] | None = None
        self.qcost = 0.0
        self.in_heap = False

    def refill(self, now: float) -> None:
        last = self.last
        if last is None:
            self.last = now
        elif now > last:
            t = self.tokens + (now - last) * self.rate
            self.tokens = t if t < self.burst else self.burst
            self.last = now

    def take(self, now: float, cost: float) -> bool:
        """Spend `cost` tokens if there are enough now; False: over the rate (nothing spent)."""
        self.refill(now)
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False

    def wait(self, now: float, cost: float) -> float:
        """Seconds from `now` until `cost` tokens will be there (0 if they are)."""
        self.refill(now)
        short = cost - self.tokens
        return short / self.rate if short > 0 else 0.0

    def idle_full(self, now: float) -> bool:
        """True when the bucket is indistinguishable from a new one (full, nothing queued)."""
        if self.queue:
            return False
        last = self.last if self.last is not None else now
        return self.tokens + max(0.0, now - last) * self.rate >= self.burst


# --- configuration ----------------------------------------------------------------------------------

class ClassConfig(BaseModel):
    """One traffic class: which packets, what rate, one bucket for all or one per flow."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    match: Match = Field(default_factory=Match, description="header match; empty = every packet")
    rate: str = Field(description="e.g. 1000pps, 10mbit, 5MB/s")
    burst: str | int | float | None = Field(None, description="packets for packet rates (a number, or 10p), bytes "
                                             "for byte rates (a number, or 64kB, 1MiB); default 10 ms at the rate, "
                                             "at least one packet (for byte rates: the largest frame the network "
                                             "carries)")
    per: Literal["class", "flow"] = "class"
    mode: Literal["police", "shape"] | None = Field(None, description="default: the function's mode")

    @field_validator("rate", mode="before")
    @classmethod
    def _rate(cls, v: object) -> str:
        parse_rate(v)  # type: ignore[arg-type]
        return str(v)

    @field_validator("burst", mode="before")
    @classmethod
    def _burst(cls, v: object) -> object:
        if v is not None:
            size_and_kind(v)  # type: ignore[arg-type]  # one clear message for a bool, a list, a bad unit
        return v

    @model_validator(mode="after")
    def _burst_fits(self) -> "ClassConfig":
        if self.burst is not None:
            kind = size_and_kind(self.burst)[1]
            rate_kind = parse_rate(self.rate)[1]
            if kind is not None and kind != rate_kind:
                if rate_kind == "packets":
                    raise ValueError(f"class {self.name!r}: burst {self.burst!r} is in bytes but rate {self.rate!r} "
                                     f"counts packets; give the burst in packets (e.g. 10 or 10p)")
                raise ValueError(f"class {self.name!r}: burst {self.burst!r} is in packets but rate {self.rate!r} "
                                 f"counts bytes; give the burst in bytes (e.g. 16000 or 16kB)")
        rate, burst, by_bytes = self.bucket_params()
        if not by_bytes and burst < 1:
            raise ValueError(f"class {self.name!r}: burst {self.burst!r} is under one packet; use at least 1")
        if by_bytes and burst < 64:
            raise ValueError(f"class {self.name!r}: burst {self.burst!r} is under 64 bytes, smaller than any packet; "
                             f"use at least the largest packet size (e.g. 1600 or 16kB)")
        return self

    def bucket_params(self, max_frame: float = 1600.0) -> tuple[float, float, bool]:
        """(rate, burst, counts_bytes). `max_frame`: the largest cost of one frame for byte rates
        (the network's MTU plus `overhead`), the least default burst, so that every frame the
        network can carry fits in a full bucket."""
        rate, kind = parse_rate(self.rate)
        by_bytes = kind == "bytes"
        if self.burst is None:
            burst = max(rate * 0.01, float(max_frame) if by_bytes else 1.0)
        else:
            burst = parse_size(self.burst)
        return rate, burst, by_bytes


class RateLimitConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["police", "shape"] = "police"
    classes: list[ClassConfig] = Field(min_length=1, description="tried in order; the first match wins")
    unmatched: Literal["pass", "drop"] = Field("pass", description="packets no class matches")
    unparsed: Literal["pass", "drop"] = Field("pass", description="frames without a 5-tuple (malformed, not IP); "
                                              "non-first IP fragments follow `fragments`")
    fragments: Literal["police", "pass", "drop"] = Field(
        "police", description="non-first IP fragments (no ports): police = classified by (src, dst, proto) against "
                              "the classes without port conditions; pass; drop")
    overhead: int = Field(0, ge=0, le=1000, description="bytes added to each packet's length for byte rates "
                                                       "(e.g. 14 for an Ethernet header, 24 for preamble+FCS+gap too)")
    max_flows: int = Field(65536, ge=1, le=10_000_000, description="per-flow buckets kept; when full, idle "
                           "(refilled) ones are freed first, then the least recently used (flows_evicted)")
    queue_limit: int = Field(1000, ge=1, le=1_000_000, description="shaping: frames queued per bucket")
    max_queued: int = Field(100_000, ge=1, le=10_000_000, description="shaping: frames held in all queues")
    max_delay: float = Field(0.5, gt=0, le=60, description="shaping: a frame that would wait longer is dropped")
    gc_interval: float = Field(1.0, gt=0, le=3600, description="seconds between sweeps of idle per-flow buckets")

    @model_validator(mode="after")
    def _unique_names(self) -> "RateLimitConfig":
        seen: set[str] = set()
        for c in self.classes:
            if c.name in seen:
                raise ValueError(f"class name {c.name!r} is used twice; class names must be unique")
            seen.add(c.name)
        return self


def _bucket_refilled(b: Bucket, now: float) -> bool:
    """Free to forget: it holds no frames and refilled completely (a new one is identical)."""
    return not b.queue and b.idle_full(now)


def _bucket_requeue(b: Bucket) -> bool:
    """Used since it was placed: placed anew, to the new end."""
    if b.last is not None and b.last != b.placed:
        b.placed = b.last
        return True
    return False


class _Class:
    """A compiled class and its counters."""

    __slots__ = ("name", "match", "rate", "burst", "by_bytes", "per_flow", "shape", "bucket", "flows",
                 "passed", "dropped", "delayed", "released", "too_big", "explicit_burst")

    def __init__(self, c: ClassConfig, default_mode: str, max_frame: int) -> None:
        self.name = c.name
        self.match = CompiledMatch(c.match)
        self.rate, self.burst, self.by_bytes = c.bucket_params(max_frame)
        self.explicit_burst = c.burst is not None
        self.per_flow = c.per == "flow"
        self.shape = (c.mode or default_mode) == "shape"
        self.bucket = None if self.per_flow else Bucket(self.rate, self.burst)
        # per-flow buckets in least-recently-used order, kept lazily (see RateLimiter._sweep)
        self.flows: OrderedDict[tuple, Bucket] = OrderedDict()
        self.passed = self.dropped = self.delayed = self.released = self.too_big = 0


# --- the function -----------------------------------------------------------------------------------

class RateLimiter:
    """Token-bucket rate limiter (see the module docstring)."""

    name: ClassVar[str] = "ratelimit"
    version: ClassVar[str] = "1"
    Config = RateLimitConfig

    def __init__(self, config: RateLimitConfig, ctx: FunctionContext | None = None) -> None:
        self.ctx = ctx or FunctionContext()
        self._heap: list[tuple[float, int, Bucket, _Class]] = []  # backlogged buckets by ready time
        self._seq = 0
        self.held = 0
        self.c = {"passed": 0, "dropped": 0, "delayed": 0, "released": 0, "shape_dropped": 0, "unparsed": 0,
                  "unmatched": 0, "flows_evicted": 0, "flows_freed": 0, "too_big": 0, "fragments": 0}
        self.swept = 0  # per-flow buckets looked at by _sweep (a work count for tests)
        self._configure(config)

    def _configure(self, config: RateLimitConfig) -> None:
        self.cfg = config
        # the dearest frame: the network's largest (ctx.mtu, set by the runtime) plus the overhead
        max_frame = self.ctx.mtu + config.overhead
        self.classes = [_Class(c, config.mode, max_frame) for c in config.classes]
        self._per_flow = [cl for cl in self.classes if cl.per_flow]
        for cl in self.classes:
            if cl.by_bytes and cl.burst < max_frame:
                # tc's tbf has the same limit: a frame over the burst never conforms (too_big)
                self.ctx.log("config_warning", {
                    "node": self.ctx.node, "class": cl.name,
                    "problem": f"burst {cl.burst:g} bytes is smaller than the largest frame this network carries "
                               f"({self.ctx.mtu} + overhead {config.overhead} = {max_frame} bytes): larger frames "
                               f"are dropped and counted as too_big",
                    "fix": f"set burst to at least {max_frame}, or leave it out for the default"})
        self._cache: dict[tuple, _Class | None] = {}  # 5-tuple -> class (bounded by max_flows)
        self._next_gc = 0.0

    def reconfigure(self, config: RateLimitConfig) -> None:
        """New classes and rates; frames the old shaper held are released at once (no loss)."""
        while self._heap:
            _, _, b, _ = heapq.heappop(self._heap)
            for _, data in b.queue or ():
                self.ctx.emit(data)
                self.c["released"] += 1
            b.queue, b.qcost, b.in_heap = None, 0.0, False
        self.held = 0
        self._configure(config)

    # -- classification ------------------------------------------------------------------------------
    def _classify(self, key: tuple) -> _Class | None:
        if len(key) == 3:  # a non-first fragment's (src, dst, proto): no ports, so no port-based class
            src, dst, proto = key
            full = (src, dst, proto, 0, 0)
            for cl in self.classes:
                m = cl.match
                if m.sport is None and m.dport is None and m.matches(full):
                    return cl
            return None
        for cl in self.classes:
            if cl.match.matches(key):
                return cl
        return None

    def _flow_bucket(self, cl: _Class, key: tuple, now: float) -> Bucket:
        b = cl.flows.get(key)
        if b is None:
            self._sweep(cl, now, 2)  # a little reclaiming per new flow, even without on_timer
            if self._n_flows() >= self.cfg.max_flows:
                self._evict_lru(now)
            b = cl.flows[key] = Bucket(cl.rate, cl.burst, now)
        return b

    def _n_flows(self) -> int:
        return sum(len(cl.flows) for cl in self._per_flow)

    def _sweep(self, cl: _Class, now: float, limit: int | None) -> int:
        """From the least recently used end of `cl.flows`: free buckets that refilled completely
        (a new one would be identical), re-queue buckets used since they were placed, and stop
        at the first one that is neither: it is the least recently used bucket of the class.

        Each bucket is looked at once when it is freed, plus once per re-queue, which needs a
        packet in between: O(1) amortized. A bucket is certainly full `burst / rate` seconds
        after its last use, and buckets are ordered by last use, so none stays longer than that
        plus one sweep interval. `limit` bounds the buckets looked at; returns how many freed."""
        freed, _, n = lru.sweep(cl.flows, now, limit, _bucket_refilled, _bucket_requeue)
        self.swept += n
        self.c["flows_freed"] += freed
        return freed

    def _evict_lru(self, now: float) -> None:
        """The table is full: free what refilled, else drop the least recently used bucket that
        holds no frames (its flow starts over with a full bucket if it sends again). Buckets
        holding frames are skipped; if the few looked at all do, the table goes over max_flows
        for now (by at most the frames held, max_queued)."""
        for _ in range(8):
            best: tuple[float, _Class] | None = None
            for cl in self._per_flow:
                if self._sweep(cl, now, None):
                    return  # freed an idle one: room
                if cl.flows:
                    b = next(iter(cl.flows.values()))
                    t = b.last if b.last is not None else now
                    if best is None or t < best[0]:
                        best = (t, cl)
            if best is None:
                return
            cl = best[1]
            k = next(iter(cl.flows))
            b = cl.flows[k]
            if b.queue:  # shaping it: in use, to the new end
                b.placed = b.last
                cl.flows.move_to_end(k)
                continue
            del cl.flows[k]
            self.c["flows_evicted"] += 1
            return

    def _gc(self, now: float) -> bool:
        """Free per-flow buckets that refilled completely, a bounded slice per class; True if
        there is more to do."""
        more = False
        for cl in self._per_flow:
            self._sweep(cl, now, SWEEP_SLICE)
            if cl.flows:
                b = next(iter(cl.flows.values()))
                if (not b.queue and b.idle_full(now)) or (b.last is not None and b.last != b.placed):
                    more = True
        self._next_gc = now if more else now + self.cfg.gc_interval
        return more

    # -- the batch -----------------------------------------------------------------------------------
    def process(self, frames: Sequence[Any], now: float, out: bytearray) -> None:
        if self._heap and self._heap[0][0] <= now:
            self._release(now)  # first, so held frames leave before newer ones
        cfg = self.cfg
        cache = self._cache
        overhead = cfg.overhead
        c = self.c
        for i, f in enumerate(frames):
            key = parse_5tuple_ip(f)
            if key.__class__ is not tuple:
                if key is _FRAGMENT:
                    c["fragments"] += 1
                    if cfg.fragments == "police":
                        key = fragment_key(f)  # (src, dst, proto): classified and policed below
                    elif cfg.fragments == "drop":
                        out[i] = DROP
                        continue
                    else:
                        continue
                if key.__class__ is not tuple:
                    c["unparsed"] += 1
                    if cfg.unparsed == "drop":
                        out[i] = DROP
                    continue
            cl = cache.get(key, False)
            if cl is False:
                cl = self._classify(key)
                if len(cache) >= cfg.max_flows:
                    cache.clear()  # cheaper than LRU bookkeeping; classification is a few compares
                cache[key] = cl
            if cl is None:
                c["unmatched"] += 1
                if cfg.unmatched == "drop":
                    out[i] = DROP
                continue
            b = cl.bucket if cl.bucket is not None else self._flow_bucket(cl, key, now)
            cost = len(f) + overhead if cl.by_bytes else 1
            if cost > b.burst:  # could never conform: the burst is smaller than this packet
                cl.too_big += 1
                cl.dropped += 1
                c["too_big"] += 1
                out[i] = DROP
                continue
            if not b.queue and b.take(now, cost):
                cl.passed += 1
                continue  # NEXT
            if not cl.shape:
                cl.dropped += 1
                out[i] = DROP
                continue
            out[i] = self._enqueue(cl, b, cost, f, now)

    def _enqueue(self, cl: _Class, b: Bucket, cost: float, f: Any, now: float) -> int:
        """Hold a copy of an over-rate frame, or drop it when it would wait too long."""
        cfg = self.cfg
        if b.queue is None:
            b.queue = deque()
        delay = b.wait(now, b.qcost + cost)
        if len(b.queue) >= cfg.queue_limit or self.held >= cfg.max_queued or delay > cfg.max_delay:
            cl.dropped += 1
            self.c["shape_dropped"] += 1
            return DROP
        b.queue.append((cost, bytes(f)))  # a copy: the slot goes back when the batch is released
        b.qcost += cost
        self.held += 1
        cl.delayed += 1
        self.c["delayed"] += 1
        if not b.in_heap:
            self._push(b, cl, now + b.wait(now, b.queue[0][0]))
        return CONSUMED

    def _push(self, b: Bucket, cl: _Class, ready: float) -> None:
        self._seq += 1
        b.in_heap = True
        heapq.heappush(self._heap, (ready, self._seq, b, cl))

    def _release(self, now: float) -> None:
        """Emit every held frame whose bucket has the tokens for it now, in FIFO order per bucket."""
        heap, emit = self._heap, self.ctx.emit
        while heap and heap[0][0] <= now:
            _, _, b, cl = heapq.heappop(heap)
            b.in_heap = False
            q = b.queue
            while q and b.take(now, q[0][0]):
                cost, data = q.popleft()
                b.qcost -= cost
                self.held -= 1
                cl.released += 1
                self.c["released"] += 1
                emit(data)
            if q:
                # float rounding can leave a hair short of the tokens: never schedule in the past
                self._push(b, cl, now + max(b.wait(now, q[0][0]), 1e-6))

    # -- timers --------------------------------------------------------------------------------------
    def next_deadline(self, now: float) -> float | None:
        """When the next held frame can go; None when nothing is held."""
        return self._heap[0][0] if self._heap else None

    def on_timer(self, now: float) -> float | None:
        if self._heap and self._heap[0][0] <= now:
            self._release(now)
        if now >= self._next_gc:
            self._gc(now)
        return self._next_gc if self._per_flow else None

    def counters(self) -> dict[str, int | float]:
        c: dict[str, int | float] = dict(self.c)
        c["passed"] = sum(cl.passed for cl in self.classes)
        c["dropped"] = sum(cl.dropped for cl in self.classes)
        c["held"] = self.held
        c["flows"] = self._n_flows()
        for cl in self.classes:
            p = f"class.{cl.name}."
            c[p + "passed"], c[p + "dropped"] = cl.passed, cl.dropped
            c[p + "delayed"], c[p + "released"] = cl.delayed, cl.released
            if cl.too_big:
                c[p + "too_big"] = cl.too_big
            if cl.per_flow:
                c[p + "flows"] = len(cl.flows)
        return c
