"""`ids`: Snort-subset signatures matched with Hyperscan or Aho-Corasick (logic in functions.snort).

In `alert` mode every packet passes and matches are reported; in `drop` mode (inline IPS) a packet
that fires a drop/reject rule is dropped. Each alert is one structured log line (JSON) plus
counters per sid.

IP fragments (IPv4 with MF set or an offset, IPv6 with a Fragment header) are not reassembled, so
a signature could be split across them: `fragments: drop` (the default in drop mode) drops every
fragment, `pass` (the default in alert mode) passes them, inspecting a first fragment's own
payload. Both count them (`fragments`, `fragments_dropped`).

TCP, UDP and ICMP packets are matched on their L4 payload; every other protocol (GRE, ESP, IP in
IP, SCTP, ...) on the IP payload (after IPv6 extension headers), where only `ip` rules can match
it. A packet with a 5-tuple whose payload cannot be located anyway (a malformed L4 header the
5-tuple parser let through) is counted in `not_inspected` and dropped in drop mode, as fragments
are; packets without a 5-tuple (malformed IP) count in `no_5tuple` and pass: the IDS is not a
firewall.
"""
from __future__ import annotations

import struct
from typing import Any, ClassVar, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shmfabric.functions.api import FunctionContext, Verdict
from shmfabric.functions.snort import Ids, IdsVerdict, SignatureSet, SnortSyntaxError, load
from shmfabric.net.flow import classify_batch, ip_payload_span, parse_5tuple_ip
from shmfabric.net.ip import IPPROTO_AH, IPV6_EXT_GENERIC

# IPv4 without options at fixed offsets: (version/IHL, total length, flags/fragment,
# UDP length | TCP data offset)
_UDP4 = struct.Struct("!BxH2xH16xH").unpack_from
_TCP4 = struct.Struct("!BxH2xH24xB").unpack_from
# the extension headers the IPv6 view walks (hop-by-hop, routing, destination options, mobility,
# HIP, shim6) and AH: a Fragment header behind any of them still makes a fragment
_V6_EXT = IPV6_EXT_GENERIC | {IPPROTO_AH}


def _is_fragment(f: Any) -> bool:
    """An IPv4 packet with MF set or a fragment offset, or IPv6 with a Fragment header (44)
    among its first extension headers."""
    n = len(f)
    if n >= 20 and f[0] >> 4 == 4:
        return bool((f[6] & 0x3F) or f[7])
    if n >= 40 and f[0] >> 4 == 6:
        nh, pos = f[6], 40
        for _ in range(9):
            if nh == 44:
                return True
            if nh not in _V6_EXT or pos + 2 > n:
                return False
            nh, pos = f[pos], pos + ((f[pos + 1] + 2) * 4 if nh == 51 else (f[pos + 1] + 1) * 8)
    return False
# version/IHL, total length, flags/fragment, protocol, UDP length, TCP data offset
_IP_HDR = struct.Struct("!BxH2xHxB14xH6xB").unpack_from
# the same after FrameBatch.gather's length word; records are padded to the batch's longest frame,
# so the struct for a batch is this one plus padding (cached by record size)
_GATHERED = struct.Struct("!IBxH2xHxB14xH6xB")
_BY_SIZE: dict[int, struct.Struct] = {}


def _gathered(size: int) -> struct.Struct:
    st = _BY_SIZE.get(size)
    if st is None:
        if len(_BY_SIZE) > 64:
            _BY_SIZE.clear()
        st = _BY_SIZE[size] = struct.Struct(_GATHERED.format + f"{size - _GATHERED.size}x")
    return st


def _key(f: Any) -> tuple | None:
    """The 5-tuple of an IP packet, or None."""
    k = parse_5tuple_ip(f)
    return k if k.__class__ is tuple else None


class _LazyKeys:
    """keys[p]: the 5-tuple of frames[idx[p]], parsed when asked (see SignatureSet.needs_every_key)."""

    __slots__ = ("frames", "idx")

    def __init__(self, frames: Sequence[Any], idx: list[int]) -> None:
        self.frames, self.idx = frames, idx

    def __getitem__(self, p: int) -> Any:
        return _key(self.frames[self.idx[p]])

    def __len__(self) -> int:
        return len(self.idx)


class IdsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rules: str = Field("", description="Snort rules, one per line")
    rules_files: list[str] = Field(default_factory=list)
    variables: dict[str, str] = Field(default_factory=lambda: {"HOME_NET": "any", "EXTERNAL_NET": "any"})
    mode: Literal["alert", "drop"] = "alert"
    log_alerts: bool = Field(True, description="one JSON line per alert on stderr")
    engine: Literal["auto", "hyperscan", "pyahocorasick"] = Field(
        "auto", description="pattern matcher: auto (hyperscan if installed), hyperscan or pyahocorasick")
    fragments: Literal["drop", "pass"] | None = Field(
        None, description="IP fragments, which are not reassembled: drop (default in drop mode) or pass "
                          "(default in alert mode); counted either way")

    @model_validator(mode="after")
    def _parse(self) -> "IdsConfig":
        texts = [("rules", self.rules)] if self.rules.strip() else []
        for path in self.rules_files:
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as e:
                raise ValueError(f"cannot read rules file {path!r}: {e.strerror}") from None
            try:
                texts.append((path, data.decode("utf-8")))
            except UnicodeDecodeError as e:
                line = data.count(b"\n", 0, e.start) + 1
                col = e.start - data.rfind(b"\n", 0, e.start)
                raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {col}) "
                                 f"(save the file as UTF-8; in a content, write such a byte in hex: "
                                 f"|{data[e.start]:02x}|)") from None
        try:
            object.__setattr__(self, "_sigs", load(texts, self.variables, self.engine) if texts
                               else SignatureSet([], self.engine))
        except (SnortSyntaxError, ValueError) as e:
            raise ValueError(str(e)) from None
        return self

    @property
    def signatures(self) -> SignatureSet:
        return self._sigs  # type: ignore[attr-defined]


class IdsFunction:
    name: ClassVar[str] = "ids"
    version: ClassVar[str] = "1"
    Config = IdsConfig

    def __init__(self, config: IdsConfig, ctx: FunctionContext | None = None):
        self.ctx = ctx or FunctionContext()
        self.cfg = config
        self.ids = Ids(config.signatures, mode=config.mode)
        self.seen = self.no_5tuple = self.fragments = self.fragments_dropped = self.not_inspected = 0
        self._frag_drop = self._fragment_policy(config) == "drop"

    @staticmethod
    def _fragment_policy(config: IdsConfig) -> str:
        return config.fragments or ("drop" if config.mode == "drop" else "pass")

    def reconfigure(self, config: IdsConfig) -> None:
        """New signatures or mode; flow state is kept."""
        self.cfg = config
        self.ids.signatures = config.signatures
        self.ids.mode = config.mode
        self._frag_drop = self._fragment_policy(config) == "drop"

    def _fragment(self, i: int, out: bytearray) -> bool:
        """Count fragment frames[i]; True if it is dropped (and so not inspected)."""
        self.fragments += 1
        if self._frag_drop:
            out[i] = Verdict.DROP
            self.fragments_dropped += 1
            return True
        return False

    def _not_inspected(self, i: int, out: bytearray) -> None:
        """Count frames[i], which has a 5-tuple but no payload to match; dropped in drop mode."""
        self.not_inspected += 1
        if self.ids.mode == "drop":
            out[i] = Verdict.DROP

    def process(self, frames: Sequence[Any], now: float, out: bytearray) -> None:
        if not self.ids.signatures.needs_every_key:
            self._process_lazy(frames, now, out)
            return
        flags: list[int] = []
        keys = classify_batch(frames, None, "ip", flags=flags)
        self.seen += len(frames)
        payloads: list[bytes] = []
        idx: list[int] = []
        for i, f in enumerate(frames):
            if keys[i].__class__ is not tuple:
                if _is_fragment(f):
                    # a non-first fragment (or a first one too short for its L4 header): nothing
                    # to inspect either way. A first fragment has a 5-tuple (a UDP one too: its
                    # length may run past the fragment) and is inspected below on its own payload.
                    self._fragment(i, out)
                    continue
                self.no_5tuple += 1
                continue
            proto = keys[i][2]
            n = len(f)
            span = None
            if proto == 17 and n >= 28:
                vihl, tlen, ff, ulen = _UDP4(f)
                if vihl == 0x45 and not ff & 0x3FFF and 8 <= ulen <= tlen - 20 and tlen <= n:
                    span = (28, 20 + ulen)
            elif proto == 6 and n >= 40:
                vihl, tlen, ff, doff = _TCP4(f)
                hl = (doff >> 4) * 4
                if vihl == 0x45 and not ff & 0x3FFF and 20 <= hl and 20 + hl <= tlen <= n:
                    span = (20 + hl, tlen)
            if span is None:  # not the plain case: a first fragment, options, IPv6, ICMP, GRE, ...
                frag = _is_fragment(f)
                if frag and self._fragment(i, out):
                    continue
                span = ip_payload_span(f, "ip")
                if span is None:
                    if not frag:  # (a first fragment too short for its L4 header passes, counted)
                        self._not_inspected(i, out)
                    continue
            payloads.append(bytes(f)[span[0]:span[1]])
            idx.append(i)
        if not payloads:
            return
        hits = self.ids.inspect_batch(payloads, [keys[i] for i in idx], now, [flags[i] for i in idx])
        if hits:
            self._report([(idx[p], v, a) for p, v, a in hits], out)

    def _process_lazy(self, frames: Sequence[Any], now: float, out: bytearray) -> None:
        # No rule needs flow state or fires without content, so a packet's 5-tuple matters only
        # if a pattern hit it: payload spans come straight from the IPv4 header (the conditions
        # of the classify fast path, so such a packet has a 5-tuple), and 5-tuples are parsed
        # only for packets with hits (_LazyKeys). Headers are not scanned: the automaton costs
        # ~16 ns per byte here, far more than slicing the payloads out.
        n = len(frames)
        self.seen += n
        payloads: list[bytes] = []
        idx: list[int] = []
        add, add_i = payloads.append, idx.append
        slow: list[int] = []
        gather = getattr(frames, "gather", None)
        if gather is not None:  # a fabric batch: one copy of all of it, each frame's length first
            data = gather()
            size = len(data) // n if n else 0
            if size >= _GATHERED.size:
                base, i = 4, 0
                for nb, vihl, tlen, ff, proto, ulen, off in _gathered(size).iter_unpack(data):
                    if vihl == 0x45 and not ff & 0x3FFF and 20 <= tlen <= nb:
                        if proto == 17:
                            if 8 <= ulen <= tlen - 20:
                                add(data[base + 28:base + 20 + ulen])
                                add_i(i)
                                base += size
                                i += 1
                                continue
                        elif proto == 6:
                            hl = (off >> 4) * 4
                            if tlen >= 40 and hl >= 20 and hl <= tlen - 20:
                                add(data[base + 20 + hl:base + tlen])
                                add_i(i)
                                base += size
                                i += 1
                                continue
                    slow.append(i)
                    base += size
                    i += 1
            else:  # every payload too short for the fixed-offset fields
                slow = list(range(n))
        else:  # a list of buffers (unit tests, the socket baseline)
            for i, f in enumerate(frames):
                if len(f) >= 33:
                    vihl, tlen, ff, proto, ulen, off = _IP_HDR(f)
                    if vihl == 0x45 and not ff & 0x3FFF and 20 <= tlen <= len(f):
                        if proto == 17:
                            if 8 <= ulen <= tlen - 20:
                                add((f if f.__class__ is bytes else bytes(f))[28:20 + ulen])
                                add_i(i)
                                continue
                        elif proto == 6:
                            hl = (off >> 4) * 4
                            if tlen >= 40 and hl >= 20 and hl <= tlen - 20:
                                add((f if f.__class__ is bytes else bytes(f))[20 + hl:tlen])
                                add_i(i)
                                continue
                slow.append(i)
        if slow:  # not the plain IPv4 TCP/UDP case: the full parsers decide
            extra = []
            for i in slow:
                f = frames[i]
                frag = _is_fragment(f)
                if frag and self._fragment(i, out):
                    continue
                if _key(f) is None:
                    if not frag:
                        self.no_5tuple += 1
                    continue
                span = ip_payload_span(f, "ip")
                if span is not None:
                    extra.append((i, bytes(f)[span[0]:span[1]]))
                elif not frag:
                    self._not_inspected(i, out)
            if extra:  # keep packet order (alerts are logged in it)
                merged = sorted(list(zip(idx, payloads)) + extra, key=lambda x: x[0])
                idx = [i for i, _ in merged]
                payloads = [p for _, p in merged]
        if not payloads:
            return
        hits = self.ids.inspect_batch(payloads, _LazyKeys(frames, idx), now)
        if hits:
            self._report([(idx[p], v, a) for p, v, a in hits], out)

    def _report(self, hits: list, out: bytearray) -> None:
        log = self.ctx.log if self.cfg.log_alerts else None
        for p, verdict, alerts in hits:
            if log is not None:
                for a in alerts:
                    log("alert", {"node": self.ctx.node, **a.as_dict()})
            if verdict is IdsVerdict.DROP:
                out[p] = Verdict.DROP

    def on_timer(self, now: float) -> float:
        """Forget idle flows, a bounded slice per call: called again at once (the runtime checks
        its timer before each batch) while there is more, else in a second. Always a time, even
        with no flow tracked: the runtime does not call on_timer again after a None, and a
        reconfigure may bring rules with `flow:` (whose flows must expire) later."""
        flows = self.ids.flows
        if not len(flows):
            return now + 1.0
        flows.expire(now, 4096)
        return now if flows.expire_pending(now) else now + 1.0

    def counters(self) -> dict[str, int]:
        c = {"seen": self.seen, "alerts": self.ids.alerts, "dropped": self.ids.dropped, "passed": self.ids.passed,
             "no_5tuple": self.no_5tuple, "fragments": self.fragments, "fragments_dropped": self.fragments_dropped,
             "not_inspected": self.not_inspected, "fast_patterns": self.ids.signatures.fast_patterns,
             "flows": len(self.ids.flows), "flows_expired": self.ids.flows.expired,
             "flows_evicted": self.ids.flows.evicted, "patterns": self.ids.signatures.patterns,
             "rules": len(self.ids.signatures.rules)}
        for sid, hits in self.ids.counters().items():
            if hits:  # sidN, or sidG:N for a gid G other than 1
                c[f"sid{sid}" if sid.__class__ is int else f"sid{sid[0]}:{sid[1]}"] = hits
        return c
