"""Firewall logic: an nftables-like rule language, ordered matching, rate limits and connection
tracking. Pure (sans-IO): packets come in as 5-tuples, time comes in as `now`; nothing here reads
the clock, touches a socket or the fabric. The `firewall` function wraps this.

Rule text (one rule per line, `#` starts a comment, matches then a verdict, as in `nft`):

    policy drop                                   # what happens when no rule matches (default: drop)
    ip saddr 10.0.0.0/8 tcp dport { 80, 443, 8000-8080 } accept
    ip6 daddr fd00::/64 udp dport 53 accept
    ip saddr != 192.0.2.0/24 meta l4proto icmp limit rate 10/second burst 20 packets accept
    th dport 22 drop comment "no ssh"
    conntrack off                                 # stateless (default: on)

Matches: `ip|ip6 saddr|daddr [!=] PREFIX|{set}`, `ip protocol`/`meta l4proto NAME|NUMBER|{set}`,
`tcp|udp|sctp|th sport|dport [!=] PORT|LOW-HIGH|{set}` (`th` = any of TCP/UDP/SCTP/DCCP/UDP-Lite),
`limit rate [over] N/second|minute|hour|day [burst N packets]` (one per rule), `ct state [!=]
STATES` (the rules see only new packets, untracked ones with `conntrack off`: the usual nft
preamble is taken and harmless, a rule that could never apply is refused), `counter` (accepted;
counters are always kept). Verdicts: `accept`, `drop`, `reject` (a drop the runtime may answer with
RST/ICMP). A match repeated in a rule narrows it: all must hold, as in nft
(`ip saddr 10.0.0.0/8 ip saddr != 10.1.0.0/16` is 10/8 without 10.1/16).

Connection tracking (on by default): a packet of a connection that an `accept` rule let in, in
either direction, is accepted before the rules are consulted, as nftables does with the usual
first rule `ct state established,related accept`. So return traffic passes under `policy drop`.
Timeouts follow Linux's nf_conntrack defaults where it has one (see `Timeouts`). An entry is
ASSURED once it carried traffic both ways and then again from the original side (for TCP: the
handshake's final ACK); a full table early-drops a non-assured entry for a new connection; a new
SYN that the rules accept reopens a closed TCP 5-tuple (see `ConntrackTable`). TCP windows are
tracked as Linux does (its state machine and window checks, ported in `functions.tcp_track`):
out-of-window segments are dropped, and a RST closes a connection only at the exact sequence
number expected. ICMP is tracked as Linux does (`Firewall._icmp_class`): an error about a tracked
connection is *related* and accepted (path MTU discovery), other errors are invalid and dropped.
"""
from __future__ import annotations

import difflib
import heapq
import ipaddress
import re
from collections import deque
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Iterable, Sequence, Sized

from shmfabric.functions import tcp_track
from shmfabric.functions.tcp_track import ACCEPT as _T_ACCEPT
from shmfabric.functions.tcp_track import CLOSE as _T_CLOSE
from shmfabric.functions.tcp_track import CLOSING_STATES as _T_CLOSING
from shmfabric.functions.tcp_track import IGNORE as _T_IGNORE
from shmfabric.functions.tcp_track import INVALID as _T_INVALID
from shmfabric.functions.tcp_track import REOPEN as _T_REOPEN
from shmfabric.functions.tcp_track import Segment, TcpTrack, may_start, segment
from shmfabric.net.flow import FiveTuple, icmp_error_quote, icmp_type, is_icmp_error, to_proto

__all__ = [
    "Verdict", "RuleSyntaxError", "Rule", "RuleSet", "Timeouts", "ConntrackTable", "Firewall", "TokenBucket",
]


class Verdict(IntEnum):
    ACCEPT = 0
    DROP = 1
    REJECT = 2


class RuleSyntaxError(ValueError):
    """A rule text error. `str()` reads `SOURCE:LINE: problem (fix)`."""

    def __init__(self, source: str, line: int, message: str, hint: str = "") -> None:
        self.source, self.line, self.message, self.hint = source, line, message, hint
        text = f"{source}:{line}: {message}"
        if hint:
            text += f" ({hint})"
        super().__init__(text)


# --- rule representation ---------------------------------------------------------------------------

PORT_PROTOS = frozenset((6, 17, 132, 33, 136))  # protocols whose first 4 bytes are ports
_L4_WORDS = {"tcp": frozenset((6,)), "udp": frozenset((17,)), "sctp": frozenset((132,)), "th": PORT_PROTOS}
_RATE_UNITS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}


class TokenBucket:
    """Packets per second with a burst, refilled from `now` (seconds) passed in by the caller."""

    __slots__ = ("rate", "burst", "tokens", "last")

    def __init__(self, rate: float, burst: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a rate must be > 0 and a burst at least 1")
        self.rate, self.burst, self.tokens, self.last = rate, float(burst), float(burst), None

    def take(self, now: float, n: float = 1.0) -> bool:
        """Take `n` tokens if there are enough; False means over the rate."""
        if self.last is not None and now > self.last:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        if self.last is None or now > self.last:
            self.last = now
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False


@dataclass
class AddrMatch:
    """One or more prefixes of one family; `negate` for `!=`. `exclude` (only with `negate` off)
    holds the prefixes of `!=` matches ANDed into this one (`ip saddr 10.0.0.0/8 ip saddr !=
    10.1.0.0/16`): the address must be in `nets` and in none of `exclude`."""

    version: int
    nets: list[tuple[int, int]]  # (network, mask) as ints
    negate: bool = False
    exclude: list[tuple[int, int]] = field(default_factory=list)

    def match(self, addr: int | bytes) -> bool:
        a = addr if addr.__class__ is int else int.from_bytes(addr, "big")  # type: ignore[arg-type]
        hit = False
        for net, mask in self.nets:
            if a & mask == net:
                hit = True
                break
        if hit and self.exclude:
            for net, mask in self.exclude:
                if a & mask == net:
                    return False
        return hit != self.negate

    def both(self, other: "AddrMatch") -> "AddrMatch":
        """The conjunction of two matches of one field (a rule that repeats `ip saddr`), exactly:
        the intersection of the positive prefix sets, minus every negated prefix."""
        pos = [m for m in (self, other) if not m.negate]
        excl = self.exclude + other.exclude + [n for m in (self, other) if m.negate for n in m.nets]
        if not pos:  # != A and != B: in neither
            return AddrMatch(self.version, _dedup(excl), True)
        nets = pos[0].nets
        if len(pos) == 2:  # two prefixes meet only if one holds the other; then the longer one is the meet
            nets = _dedup([(n2, m2) if m1 & m2 == m1 else (n1, m1)
                           for n1, m1 in pos[0].nets for n2, m2 in pos[1].nets
                           if (m1 & m2 == m1 and n2 & m1 == n1) or (m1 & m2 == m2 and n1 & m2 == n2)])
        return AddrMatch(self.version, nets, False, _dedup(excl))


def _dedup(nets: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return list(dict.fromkeys(nets))


@dataclass
class PortMatch:
    ranges: list[tuple[int, int]]
    negate: bool = False

    def match(self, port: int) -> bool:
        hit = False
        for lo, hi in self.ranges:
            if lo <= port <= hi:
                hit = True
                break
        return hit != self.negate

    def allowed(self) -> list[tuple[int, int]]:
        """The ports this matches, as sorted, merged, non-negated ranges."""
        out: list[tuple[int, int]] = []
        for lo, hi in sorted(self.ranges):
            if out and lo <= out[-1][1] + 1:
                out[-1] = (out[-1][0], max(out[-1][1], hi))
            else:
                out.append((lo, hi))
        if not self.negate:
            return out
        comp, nxt = [], 0
        for lo, hi in out:
            if lo > nxt:
                comp.append((nxt, lo - 1))
            nxt = hi + 1
        if nxt <= 65535:
            comp.append((nxt, 65535))
        return comp

    def both(self, other: "PortMatch") -> "PortMatch":
        """The conjunction of two port matches of one field, as one non-negated set of ranges
        (possibly empty: `tcp dport 22 tcp dport 80` matches nothing, as in nft). Non-negated, so
        a narrow result is still indexed by port (`RuleSet.build_index`)."""
        a, b, out = self.allowed(), other.allowed(), []
        i = j = 0
        while i < len(a) and j < len(b):
            lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
            if lo <= hi:
                out.append((lo, hi))
            if a[i][1] < b[j][1]:
                i += 1
            else:
                j += 1
        return PortMatch(out)


@dataclass
class Rule:
    """One compiled rule. `line` and `text` point back to the source for counters and errors."""

    line: int
    text: str
    verdict: Verdict
    version: int | None = None          # 4, 6 or None (either)
    protos: frozenset[int] | None = None
    saddr: AddrMatch | None = None
    daddr: AddrMatch | None = None
    sport: PortMatch | None = None
    dport: PortMatch | None = None
    limit: TokenBucket | None = None
    limit_over: bool = False
    comment: str = ""
    packets: int = 0
    bytes: int = 0
    # `ct state [!=] STATES`: decided once the whole text is read (`RuleSet.parse`), since every
    # packet that reaches the rules is in one state: "new" (tracking on), "untracked" (off)
    ct_state: tuple[frozenset[str], bool] | None = None
    never: bool = False  # its `ct state` excludes every packet that reaches the rules: not indexed

    def matches(self, key: FiveTuple, now: float) -> bool:
        """Header match, then the rate limit (which spends a token only when the rest matched)."""
        src, dst, proto, sport, dport = key
        if self.version is not None and (src.__class__ is int) != (self.version == 4):
            return False
        if self.protos is not None and proto not in self.protos:
            return False
        if self.saddr is not None and not self.saddr.match(src):
            return False
        if self.daddr is not None and not self.daddr.match(dst):
            return False
        if self.sport is not None and not self.sport.match(sport):
            return False
        if self.dport is not None and not self.dport.match(dport):
            return False
        if self.limit is not None:
            under = self.limit.take(now)
            return under != self.limit_over  # `limit rate over N` matches the excess
        return True


# --- parser ------------------------------------------------------------------------------------------

_TOKEN = re.compile(r'"[^"]*"|!=|\{|\}|,|[^\s{},"]+')
_KEYWORDS = ["ip", "ip6", "meta", "tcp", "udp", "sctp", "th", "limit", "counter", "accept", "drop", "reject",
             "comment", "policy", "conntrack", "saddr", "daddr", "sport", "dport", "protocol", "l4proto", "ct"]
_CT_STATES = frozenset(("new", "established", "related", "invalid", "untracked"))


class _Parser:
    def __init__(self, source: str, line: int, tokens: list[str]) -> None:
        self.source, self.line, self.toks, self.i = source, line, tokens, 0

    def err(self, message: str, hint: str = "") -> RuleSyntaxError:
        return RuleSyntaxError(self.source, self.line, message, hint)

    def peek(self) -> str | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def next(self, what: str) -> str:
        t = self.peek()
        if t is None:
            raise self.err(f"rule ends where {what} was expected")
        self.i += 1
        return t

    def values(self, what: str) -> tuple[list[str], bool]:
        """A single value or a `{ a, b }` set, optionally preceded by `!=`."""
        negate = False
        if self.peek() == "!=":
            self.i += 1
            negate = True
        t = self.next(what)
        if t != "{":
            return [t], negate
        out: list[str] = []
        comma = True  # a value may come (at the start, after a comma)
        while True:
            t = self.next(f"{what} or '}}'")
            if t == "}":
                break
            if t == ",":
                if comma:
                    raise self.err(f"',' where {what} was expected", "write e.g. { 80, 443 }")
                comma = True
                continue
            if not comma:  # as nft: `{ 80 443 }` is a syntax error, not two ports
                raise self.err(f"'{out[-1]} {t}' in a set: its items are separated by commas",
                               f"write {{ {', '.join(out + [t])} }}")
            out.append(t)
            comma = False
        if not out:
            raise self.err(f"empty set where {what} was expected")
        return out, negate


def _unknown(p: _Parser, word: str, expected: Sequence[str]) -> RuleSyntaxError:
    close = difflib.get_close_matches(word, list(expected), n=1)
    hint = f"did you mean '{close[0]}'?" if close else "expected one of: " + ", ".join(expected)
    return p.err(f"unknown word '{word}'", hint)


def _parse_prefix(p: _Parser, text: str, version: int) -> tuple[int, int]:
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        addr, slash, plen = text.partition("/")
        try:
            v = ipaddress.ip_address(addr).version if slash else None
        except ValueError:
            v = None
        if v is not None and plen.isdigit():  # an address, and a prefix length out of range
            bits = 32 if v == 4 else 128
            raise p.err(f"not an address or prefix: '{text}': an IPv{v} prefix length must be 0..{bits}",
                        "write e.g. 10.0.0.0/8 or fd00::/64") from None
        raise p.err(f"not an address or prefix: '{text}'", "write e.g. 10.0.0.0/8 or fd00::/64") from None
    if net.version != version:
        word = "ip6" if net.version == 6 else "ip"
        raise p.err(f"'{text}' is IPv{net.version} but the match is IPv{version}", f"use '{word} saddr/daddr'")
    if "/" in text and ipaddress.ip_interface(text).ip != net.network_address:
        # 10.0.0.1/8: a host address with a prefix length; meant the host, or the network?
        host = text.partition("/")[0]
        raise p.err(f"'{text}' has host bits set (the /{net.prefixlen} network is {net})",
                    f"write {net} for the network, or {host} for the address alone")
    bits = 32 if version == 4 else 128
    mask = ((1 << bits) - 1) ^ ((1 << (bits - net.prefixlen)) - 1)
    return int(net.network_address), mask


def _parse_port(p: _Parser, text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)(?:-(\d+))?", text)
    if not m:
        raise p.err(f"not a port or port range: '{text}'", "write e.g. 80, 1024-65535 or { 80, 443 }")
    lo = int(m.group(1))
    hi = int(m.group(2)) if m.group(2) else lo
    if not (0 <= lo <= hi <= 65535):
        raise p.err(f"port range out of order or above 65535: '{text}'")
    return lo, hi


def _parse_rule(source: str, line: int, text: str, tokens: list[str]) -> Rule:
    p = _Parser(source, line, tokens)
    rule = Rule(line=line, text=text, verdict=Verdict.DROP)
    verdict: Verdict | None = None
    seen_comment = False

    def set_version(v: int) -> None:
        if rule.version is not None and rule.version != v:
            raise p.err("a rule cannot match both IPv4 and IPv6 addresses", "split it into two rules")
        rule.version = v

    def set_protos(protos: frozenset[int], where: str) -> None:
        if rule.protos is not None:
            both = rule.protos & protos
            if not both:
                raise p.err(f"'{where}' conflicts with the protocol matched earlier in the rule")
            rule.protos = frozenset(both)
        else:
            rule.protos = protos

    while (t := p.peek()) is not None:
        p.i += 1
        if verdict is not None and t != "comment":
            raise p.err(f"'{t}' after the verdict", "the verdict (accept/drop/reject) ends a rule; put matches before it")
        if t in ("ip", "ip6"):
            v = 4 if t == "ip" else 6
            what = p.next("saddr, daddr or protocol")
            if what in ("saddr", "daddr"):
                set_version(v)
                vals, neg = p.values("an address or prefix")
                am = AddrMatch(v, [_parse_prefix(p, x, v) for x in vals], neg)
                prev = getattr(rule, what)  # a repeated match narrows (all must hold, as in nft)
                setattr(rule, what, am if prev is None else prev.both(am))
            elif what in ("protocol", "nexthdr") and t == ("ip" if what == "protocol" else "ip6"):
                set_version(v)
                vals, neg = p.values("a protocol")
                set_protos(_protos(p, vals, neg), f"{t} {what}")
            else:
                raise _unknown(p, what, ["saddr", "daddr", "protocol" if t == "ip" else "nexthdr"])
        elif t == "meta":
            what = p.next("l4proto")
            if what != "l4proto":
                raise _unknown(p, what, ["l4proto"])
            vals, neg = p.values("a protocol")
            set_protos(_protos(p, vals, neg), "meta l4proto")
        elif t in _L4_WORDS:
            what = p.next("sport or dport")
            if what not in ("sport", "dport"):
                raise _unknown(p, what, ["sport", "dport"])
            set_protos(_L4_WORDS[t], f"{t} {what}")
            vals, neg = p.values("a port")
            pm = PortMatch([_parse_port(p, x) for x in vals], neg)
            prev = getattr(rule, what)  # a repeated match narrows (all must hold, as in nft)
            setattr(rule, what, pm if prev is None else prev.both(pm))
        elif t == "limit":
            if rule.limit is not None:  # was: the second silently replaced the first
                raise p.err("a rule can have one 'limit'", "keep the rate you mean")
            if p.next("'rate'") != "rate":
                raise p.err("'limit' must be followed by 'rate'", "write e.g. limit rate 100/second burst 10 packets")
            if p.peek() == "over":
                p.i += 1
                rule.limit_over = True
            spec = p.next("a rate like 100/second")
            m = re.fullmatch(r"(\d+(?:\.\d+)?)/(second|minute|hour|day)", spec)
            if not m:
                raise p.err(f"not a rate: '{spec}'", "write N/second, N/minute, N/hour or N/day")
            rate = float(m.group(1)) / _RATE_UNITS[m.group(2)]
            burst = 5.0  # nftables' default burst
            if p.peek() == "burst":
                p.i += 1
                b = p.next("a burst size")
                if not b.isdigit() or int(b) < 1:
                    raise p.err(f"not a burst size: '{b}'", "write e.g. burst 10 packets")
                burst = float(b)
                if p.peek() == "packets":
                    p.i += 1
                elif p.peek() == "bytes":
                    raise p.err("byte-based limits are not supported", "use a packet burst: burst N packets")
            if rate <= 0:
                raise p.err("a rate must be above zero")
            rule.limit = TokenBucket(rate, burst)
        elif t == "counter":
            pass  # every rule counts; accepted so nft habits work
        elif t in ("accept", "drop", "reject"):
            verdict = Verdict[t.upper()]
        elif t == "comment":
            if rule.comment or seen_comment:
                raise p.err("a rule can have one 'comment'", "join the texts into one comment")
            seen_comment = True
            c = p.next("a quoted comment")
            if not (c.startswith('"') and c.endswith('"')):
                raise p.err("a comment must be quoted", 'write comment "text"')
            rule.comment = c[1:-1]
        elif t == "ct":
            what = p.next("state")
            if what != "state":
                raise _unknown(p, what, ["state"])
            if rule.ct_state is not None:
                raise p.err("a rule can have one 'ct state'", "list the states in one set: ct state { new, untracked }")
            if p.peek() == "vmap":
                raise p.err("verdict maps are not supported", "write one rule per verdict, e.g. "
                            "ct state established,related accept")
            vals, neg = p.values("a conntrack state")
            while p.peek() == ",":  # nft's `ct state established,related` (a list without braces)
                p.i += 1
                vals.append(p.next("a conntrack state"))
            for v in vals:
                if v not in _CT_STATES:
                    raise _unknown(p, v, sorted(_CT_STATES))
            rule.ct_state = (frozenset(vals), neg)
        else:
            raise _unknown(p, t, _KEYWORDS)
    if verdict is None:
        raise p.err("rule has no verdict", "end it with accept, drop or reject")
    rule.verdict = verdict
    if rule.ct_state is not None and not rule.ct_state[1]:
        # the habitual lines `ct state established,related accept` and `ct state invalid drop` do
        # what the firewall does anyway (they match nothing the rules see: kept, harmless); a rule
        # that asks for the opposite would silently never apply, so it is refused
        states = rule.ct_state[0]
        if "established" in states and "related" not in states and verdict is Verdict.ACCEPT:
            # (the firewall cannot accept established packets without their ICMP errors: path MTU
            # discovery would break; so a ruleset leaving related out would not do what it says)
            raise p.err("ICMP errors about established connections (related) are accepted with them here",
                        "write 'ct state established,related accept'")
        if states & {"established", "related"} and verdict is not Verdict.ACCEPT:
            raise p.err(f"'ct state {'/'.join(sorted(states & {'established', 'related'}))}' packets are accepted "
                        "before the rules (connection tracking): this rule would never apply to them",
                        "match the packets by address and port without 'ct state', with 'conntrack off'")
        if "invalid" in states and verdict is Verdict.ACCEPT:
            raise p.err("'ct state invalid' packets are dropped before the rules: this rule would never apply "
                        "to them", "to let out-of-window TCP segments through, give the firewall "
                        "tcp_window: liberal (or off)")
    return rule


def _protos(p: _Parser, vals: list[str], negate: bool) -> frozenset[int]:
    out = set()
    for v in vals:
        try:
            out.add(to_proto(int(v) if v.isdigit() else v))
        except ValueError as exc:
            raise p.err(str(exc)) from None
    return frozenset(set(range(256)) - out) if negate else frozenset(out)


#: A rule whose destination ports cover at most this many ports is indexed under each of them;
#: wider ranges (1024-65535) make the rule a candidate for every port of its protocols.
INDEX_MAX_PORTS = 256
#: The most rule references the index's merged tuples may hold (~8 bytes each); beyond it the
#: narrow and wide rules are merged per lookup instead (see `RuleSet.build_index`).
MERGE_BUDGET = 4_000_000


@dataclass
class RuleSet:
    """Parsed rules plus the table-wide settings.

    `candidates(proto, dport)` gives, in rule order, only the rules that can match that protocol
    and destination port: matching 100 rules one by one costs ~45 us per packet in CPython, and
    most rule sets are mostly port rules, so the index cuts the walk to a handful."""

    rules: list[Rule]
    policy: Verdict = Verdict.DROP
    conntrack: bool = True
    source: str = "<rules>"

    def __post_init__(self) -> None:
        self.build_index()

    def build_index(self) -> None:
        """(Re)build the candidate index; call after changing `rules`.

        Per protocol, the rules that are not narrow port rules (`wide`), in order; per protocol
        with narrow port rules, an array of 65,536 ports: None where no narrow rule covers the
        port (the wide rules are the candidates), else the narrow rules covering it merged with
        the wide ones, in rule order. The ports between two range ends share one covering set,
        and one merged tuple serves every port (and protocol) with the same set and wide list:
        200 narrow rules of 256 ports beside 200 wide rules made 256,000 tuples of ~200 rules
        each (4.9 s, 519 MB); now 200 merged tuples (0.1 s, ~4 MB). If even that would exceed MERGE_BUDGET rule
        references (thousands of narrow ranges beside thousands of wide rules), the tuples hold
        the narrow rules alone and `candidates` merges them with the wide ones per lookup (a cost
        of the order of walking the wide rules, which such a lookup does anyway)."""
        rules = self.rules
        narrow: dict[int, list[tuple[int, int, int]]] = {}  # proto -> (low port, high port, rule index)
        wide: list[list[int]] = [[] for _ in range(256)]
        for i, r in enumerate(rules):
            if r.never:
                continue
            protos = range(256) if r.protos is None else sorted(r.protos)
            dp = r.dport
            width = sum(hi - lo + 1 for lo, hi in dp.ranges) if dp is not None and not dp.negate else None
            if width is not None and width <= INDEX_MAX_PORTS:
                for proto in protos:
                    narrow.setdefault(proto, []).extend((lo, hi, i) for lo, hi in dp.ranges)  # type: ignore[union-attr]
            else:
                for proto in protos:
                    wide[proto].append(i)
        interned: dict[tuple[int, ...], tuple[Rule, ...]] = {}

        def rule_tuple(ix: Iterable[int]) -> tuple[Rule, ...]:
            key = tuple(ix)
            t = interned.get(key)
            if t is None:
                t = interned[key] = tuple(rules[i] for i in key)
            return t

        wild = [rule_tuple(wide[p]) for p in range(256)]
        # the covering sets of every protocol's port segments: (proto, low, high, sorted indices)
        segments: list[tuple[int, int, int, tuple[int, ...]]] = []
        for proto, spans in narrow.items():
            events: dict[int, list[tuple[int, int]]] = {}
            for lo, hi, i in spans:
                events.setdefault(lo, []).append((1, i))
                events.setdefault(hi + 1, []).append((-1, i))
            active: dict[int, int] = {}  # rule index -> ranges of it covering the point
            points = sorted(events)
            for k, point in enumerate(points[:-1]):
                for d, i in events[point]:
                    left = active.get(i, 0) + d
                    if left:
                        active[i] = left
                    else:
                        del active[i]
                if active:
                    segments.append((proto, point, points[k + 1] - 1, tuple(sorted(active))))
        sizes = {(ix, id(wild[proto])): len(ix) + len(wide[proto]) for proto, _, _, ix in segments}
        eager = sum(sizes.values()) <= MERGE_BUDGET
        merged: dict[tuple[tuple[int, ...], int], tuple[Rule, ...]] = {}
        ports: list[list | None] = [None] * 256
        for proto, lo, hi, ix in segments:
            key = (ix, id(wild[proto]) if eager else 0)
            t = merged.get(key)
            if t is None:
                t = merged[key] = rule_tuple(sorted(ix + tuple(wide[proto])) if eager else ix)
            arr = ports[proto]
            if arr is None:
                arr = ports[proto] = [None] * 65536
            arr[lo:hi + 1] = [t] * (hi - lo + 1)
        self._wild: list[tuple[Rule, ...]] = wild
        self._ports: list[list | None] = ports
        self._merge_pos: dict[int, int] | None = None
        self._merge_cache: dict[tuple[int, int], tuple[Rule, ...]] = {}
        self._merge_cached = 0
        if eager:
            self.__dict__.pop("candidates", None)  # the method below
        else:
            self._merge_pos = {id(r): i for i, r in enumerate(rules)}
            self.candidates = self._candidates_merged  # type: ignore[method-assign]

    def candidates(self, proto: int, dport: int) -> tuple[Rule, ...]:
        """Rules that may match, in order (a superset of those that do)."""
        arr = self._ports[proto]
        if arr is not None:
            c = arr[dport]
            if c is not None:
                return c
        return self._wild[proto]

    def _candidates_merged(self, proto: int, dport: int) -> tuple[Rule, ...]:
        """`candidates` of an index over MERGE_BUDGET: narrow and wide rules merged at lookup,
        the merges kept while they hold at most a quarter of MERGE_BUDGET references."""
        arr = self._ports[proto]
        wild = self._wild[proto]
        if arr is not None:
            c = arr[dport]
            if c is not None:
                if not wild:
                    return c
                key = (id(c), proto)
                m = self._merge_cache.get(key)
                if m is None:
                    pos = self._merge_pos.__getitem__  # type: ignore[union-attr]
                    m = tuple(heapq.merge(c, wild, key=lambda r: pos(id(r))))
                    if self._merge_cached + len(m) > MERGE_BUDGET // 4:
                        self._merge_cache.clear()
                        self._merge_cached = 0
                    self._merge_cache[key] = m
                    self._merge_cached += len(m)
                return m
        return wild

    @classmethod
    def parse(cls, text: str, source: str = "<rules>") -> "RuleSet":
        """Parse rule text; raises `RuleSyntaxError` naming `source`, the line and the fix."""
        rules: list[Rule] = []
        rs = cls(rules, source=source)
        seen_policy = False
        for n, raw in enumerate(text.splitlines(), 1):
            line = _strip_comment(raw).strip()
            if not line:
                continue
            tokens = _TOKEN.findall(line)
            leftover = _TOKEN.sub("", line).strip()
            if leftover:
                raise RuleSyntaxError(source, n, f"cannot read '{leftover}'", "check quotes")
            if tokens[0] == "policy":
                if len(tokens) != 2 or tokens[1] not in ("accept", "drop"):
                    raise RuleSyntaxError(source, n, "bad policy line", "write 'policy accept' or 'policy drop'")
                if seen_policy:
                    raise RuleSyntaxError(source, n, "policy given twice", "keep one policy line")
                rs.policy, seen_policy = Verdict[tokens[1].upper()], True
            elif tokens[0] == "conntrack":
                if len(tokens) != 2 or tokens[1] not in ("on", "off"):
                    raise RuleSyntaxError(source, n, "bad conntrack line", "write 'conntrack on' or 'conntrack off'")
                rs.conntrack = tokens[1] == "on"
            else:
                rules.append(_parse_rule(source, n, line, tokens))
        # Every packet the rules see is in one conntrack state: established and related ones were
        # accepted and invalid ones dropped before them (`Firewall.check`), so what is left is
        # "new" with tracking on, "untracked" with `conntrack off`.
        state = "new" if rs.conntrack else "untracked"
        for r in rules:
            if r.ct_state is not None:
                states, negate = r.ct_state
                r.never = (state in states) == negate
                # the usual preamble lines (established/related accept, invalid drop) never see a
                # packet, harmlessly: the firewall does what they say before the rules; any other
                # rule that never applies says something the firewall would not do
                if r.never and (negate or states - {"established", "related", "invalid"}):
                    seen = ("only new packets (connection tracking accepted the established and related "
                            "ones and dropped the invalid ones before the rules)" if rs.conntrack else
                            "only untracked packets ('conntrack off')")
                    raise RuleSyntaxError(source, r.line, f"this 'ct state' never matches: the rules see {seen}",
                                          "drop the 'ct state' match, or the rule")
        rs.build_index()
        return rs


def _strip_comment(line: str) -> str:
    """Drop a `#` comment that is not inside a quoted string."""
    quoted = False
    for i, c in enumerate(line):
        if c == '"':
            quoted = not quoted
        elif c == "#" and not quoted:
            return line[:i]
    return line


# --- connection tracking ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Timeouts:
    """Seconds an idle entry lives. Linux nf_conntrack defaults, except `tcp_established`: Linux
    keeps 5 days, which in a table bounded by memory mostly holds dead peers; one hour here.
    The long timeouts (`tcp_established`, `udp_replied`) apply only once an entry is assured
    (traffic both ways, then again from the original side; see `ConntrackTable`)."""

    tcp_unreplied: float = 120.0      # nf_conntrack_tcp_timeout_syn_sent
    tcp_established: float = 3600.0   # assured: the handshake completed
    tcp_closing: float = 10.0         # after FIN or RST (nf_conntrack_tcp_timeout_close is 10)
    udp_unreplied: float = 30.0       # nf_conntrack_udp_timeout; also replied but not yet assured
    udp_replied: float = 120.0        # assured (nf_conntrack_udp_timeout_stream)
    icmp: float = 30.0                # nf_conntrack_icmp_timeout
    other: float = 600.0              # nf_conntrack_generic_timeout
    tcp_half_open: float = 60.0       # SYN-ACK seen, no final ACK yet (nf_conntrack_tcp_timeout_syn_recv)
    # TCP states after a FIN, and Linux's two caps (with window tracking; see functions.tcp_track)
    tcp_fin_wait: float = 120.0
    tcp_close_wait: float = 60.0
    tcp_last_ack: float = 30.0
    tcp_time_wait: float = 120.0
    tcp_retrans: float = 300.0        # after 3 retransmissions of the same segment
    tcp_unack: float = 300.0          # while data is unacknowledged

    def tcp_states(self) -> tuple[float, ...]:
        """Seconds per `tcp_track` state, then the retransmission and unacknowledged caps."""
        return (self.tcp_unreplied, self.tcp_unreplied, self.tcp_half_open, self.tcp_established, self.tcp_fin_wait,
                self.tcp_close_wait, self.tcp_last_ack, self.tcp_time_wait, self.tcp_closing, self.tcp_unreplied,
                self.tcp_retrans, self.tcp_unack)


_FIN, _SYN, _RST, _ACK = 0x01, 0x02, 0x04, 0x10

#: When the table is full, a new connection first reclaims expired entries, examining at most
#: this many (`ConntrackTable.reap`), then early-drops a non-assured entry.
FULL_REAP = 32


class _Entry:
    # ttl: the idle timeout for the entry's current state (ConntrackTable._timeout), kept here so
    # a packet of a known connection refreshes `expires` without a call; recomputed whenever
    # `replied`, `assured` or `closing` changes (ConntrackTable._retime).
    # replied: a packet seen in the reply direction; assured: after that, one more from the
    # original side (not a SYN or RST: for TCP, the handshake's final ACK). Only assured entries
    # get the long timeouts and are safe from early drop.
    # nxt: the direction whose next packet may change that (the reply key while unreplied, then
    # `orig`), so the fast path (Firewall.check_many) tests one key, not `orig` and `replied`.
    # slot: the timer-wheel bucket the entry sits in (-1 once removed); `expires` may be later
    # than the bucket's time (packets only move `expires`; the bucket is fixed when it comes due).
    # seen: `expires` when the entry was (re)queued among the non-assured; if it moved since, the
    # entry saw a packet and gets a second chance before an early drop.
    # tcp: the connection's TcpTrack (window tracking), or None (not TCP, or not tracked).
    __slots__ = ("orig", "expires", "replied", "assured", "closing", "packets", "ttl", "slot", "seen", "nxt", "tcp")

    def __init__(self, orig: FiveTuple, closing: bool, ttl: float, expires: float, slot: int,
                 rev: FiveTuple) -> None:
        self.orig = orig
        self.nxt = rev
        self.expires = expires
        self.replied = False
        self.assured = False
        self.closing = closing
        self.packets = 1
        self.ttl = ttl
        self.slot = slot
        self.seen = expires
        self.tcp: TcpTrack | None = None


#: `ConntrackTable.track` results: no live entry (the rules decide), a packet of a live connection,
#: a TCP segment of a live connection that is out of its window (see functions.tcp_track).
UNKNOWN, KNOWN, INVALID = 0, 1, 2

#: `tcp_window` settings: judge every segment of connections seen from their SYN; track but judge
#: none (Linux's nf_conntrack_tcp_be_liberal); do not track windows (any RST closes).
TCP_WINDOW_MODES = ("strict", "liberal", "off")


class ConntrackTable:
    """5-tuple connection table with per-protocol idle timeouts and a size bound.

    Both directions index the same entry. Expired entries are dropped when next looked up and by
    `reap(now, limit)`, which examines only entries that are due: entries sit in a timer wheel of
    `gc_interval`-wide buckets by expiry time, and a packet of a connection only moves its
    `expires` (no per-packet bookkeeping); when a bucket comes due, each entry in it is removed
    if it expired or moved to the bucket of its new expiry. So reaping costs O(1) amortized per
    packet, and a bounded call (`limit`) bounds one call's work. `expire(now)` is the unbounded,
    rate-limited (once per `gc_interval`) form.

    States, as Linux's: an entry is `replied` once a packet went the reply way, and ASSURED
    (`assured`) once, after that, a packet (not a SYN or RST) came from the original side again:
    for TCP the handshake's final ACK, for UDP a request after a response. Before that a TCP
    entry has the SYN_SENT timeout (`tcp_unreplied`), then the SYN_RECV one (`tcp_half_open`), a
    UDP entry `udp_unreplied`; the long timeouts (`tcp_established`, `udp_replied`) are for
    assured entries only. So a SYN flood that the server answers with SYN-ACKs, or spoofed
    UDP requests that get one answer each, fill the table with short-lived, evictable entries.

    Full table: a new connection first reaps (at most `FULL_REAP` entries), then early-drops a
    non-assured entry, oldest first (one that saw a packet since it was queued goes to the back
    once), as Linux's early_drop does; only when every entry is assured is the new connection
    refused (`full_drops`).

    TCP reuse: a SYN (without ACK) from the original side of a closing entry (FIN or RST seen)
    makes `lookup` answer False but keeps the entry: the packet is a new connection for the rules,
    and `add` replaces the entry (`reopened`) only if they accept it, as Linux reopens a
    connection in TIME_WAIT/CLOSE. If they do not, the old entry stays as it was (so a forged RST
    then a forged SYN that the rules refuse does not cut a live connection).

    TCP (`tcp_window`, when callers pass each segment's `Segment`): a TCP entry is tracked by a
    port of Linux's nf_conntrack TCP state machine and window checks (functions.tcp_track), which
    decides its state, timeouts, ASSURED bit, and which segments are invalid (`track` answers
    INVALID, counted in `tcp_invalid`; they change nothing), ignored (pass, change nothing) or
    close, kill or reopen the entry. `strict`: as Linux with nf_conntrack_tcp_be_liberal=0 (a
    connection picked up mid-stream is liberal, as Linux's). `liberal`: windows are learned,
    nothing is invalid for them. `off`: the simple tracking above (any FIN or RST closes).
    Without segments (callers that pass none) it is off."""

    def __init__(self, max_entries: int = 262_144, timeouts: Timeouts = Timeouts(), gc_interval: float = 1.0,
                 tcp_window: str = "strict") -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        if tcp_window not in TCP_WINDOW_MODES:
            raise ValueError(f"tcp_window must be one of {', '.join(TCP_WINDOW_MODES)}, not {tcp_window!r}")
        self.tcp_window = tcp_window
        self._tcp_timeouts = timeouts.tcp_states()
        self.max_entries = max_entries
        self.timeouts = timeouts
        self.gc_interval = gc_interval
        self._g = gc_interval if gc_interval > 0 else 1.0  # the wheel's bucket width (s)
        self._by_key: dict[FiveTuple, _Entry] = {}
        self._wheel: dict[int, dict[_Entry, None]] = {}  # bucket -> its entries; bucket b is due at b * _g
        self._due: list[int] = []                        # heap of the buckets in _wheel
        # early-drop candidates, oldest first; lazy: entries that were assured or removed since
        # are skipped when met (and trimmed from the front by reap), the rest copied out when it
        # grows past _compact_at (so it holds at most ~2x the table plus a constant)
        self._unreplied: deque[_Entry] = deque()
        self._compact_at = 4096
        self._last_gc: float | None = None
        self._count = 0  # connections (a key equal to its own reverse is indexed once)
        self.created = 0
        self.expired = 0
        self.full_drops = 0
        self.early_drops = 0  # non-assured entries evicted to make room for a new connection
        self.reopened = 0     # closing TCP entries replaced by a new connection (a new SYN)
        self.examined = 0     # entries looked at by reap and early drop (work, for tests and status)
        self.tcp_invalid = 0  # TCP segments out of their connection's window (INVALID)
        self.rst_ignored = 0  # in-window RSTs whose sequence number was not the expected one

    def __len__(self) -> int:
        return self._count

    def _timeout(self, e: _Entry) -> float:
        proto = e.orig[2]
        t = self.timeouts
        if proto == 6:
            if e.closing:
                return t.tcp_closing
            if e.assured:
                return t.tcp_established
            return t.tcp_half_open if e.replied else t.tcp_unreplied
        if proto == 17:
            return t.udp_replied if e.assured else t.udp_unreplied
        if proto in (1, 58):
            return t.icmp
        return t.other

    def _schedule(self, e: _Entry, after: int = -1) -> None:
        """Put `e` in the bucket of its `expires` (at least bucket `after + 1`)."""
        b = max(-int(-e.expires // self._g), after + 1)  # ceil: due at or just after `expires`
        if e.slot >= 0:
            self._wheel[e.slot].pop(e, None)
        bucket = self._wheel.get(b)
        if bucket is None:
            self._wheel[b] = bucket = {}
            heapq.heappush(self._due, b)
        bucket[e] = None
        e.slot = b

    def _retime(self, e: _Entry, now: float) -> None:
        """The entry's state changed: new idle timeout from `now`; an earlier expiry moves it to an
        earlier bucket (a later one waits for its bucket to come due)."""
        e.ttl = self._timeout(e)
        e.expires = now + e.ttl
        if -int(-e.expires // self._g) < e.slot:
            self._schedule(e)

    def _mark_replied(self, e: _Entry, now: float) -> None:
        e.replied = True
        e.nxt = e.orig
        self._retime(e, now)

    def _mark_assured(self, e: _Entry, now: float) -> None:
        e.assured = True
        self._retime(e, now)

    def lookup(self, key: FiveTuple, now: float, tcp_flags: int = 0, seg: Segment | None = None) -> bool:
        """True (and the entry refreshed) if `key` belongs to a live connection, either way, and
        (with `seg`) the segment is in its window. See `track`."""
        return self.track(key, now, tcp_flags, seg) == KNOWN

    def track(self, key: FiveTuple, now: float, tcp_flags: int = 0, seg: Segment | None = None) -> int:
        """KNOWN (and the entry refreshed) if `key` belongs to a live connection, either way;
        UNKNOWN if not; INVALID if `seg` (the TCP segment, when given) is out of the connection's
        window (the entry is left as it was).

        A TCP SYN (without ACK) from the original side of a closing entry (FIN or RST seen)
        is UNKNOWN and leaves the entry as it is: the packet is a new connection that the
        rules decide; `add` (if they accept it) replaces the entry."""
        e = self._by_key.get(key)
        if e is not None and e.expires <= now:
            self._remove(e)
            self.expired += 1
            e = None
        if e is None:
            if seg is not None and key[2] == 6 and self.tcp_window != "off" and not may_start(tcp_flags):
                # not a segment that may open a connection (Linux's tcp_new): invalid, whatever the rules
                self.tcp_invalid += 1
                return INVALID
            return UNKNOWN
        t = e.tcp
        if t is not None and seg is not None:
            return self.tcp_step(e, t, key != e.orig, seg, now)
        if tcp_flags & (_SYN | _ACK) == _SYN and e.closing and key == e.orig:
            return UNKNOWN
        if not e.assured:  # (Firewall.check_many inlines this)
            if key != e.orig:
                if not e.replied:
                    self._mark_replied(e, now)
            elif e.replied and not tcp_flags & (_SYN | _RST):
                self._mark_assured(e, now)
        if tcp_flags & (_FIN | _RST) and not e.closing:
            e.closing = True  # (without window tracking: any FIN or RST)
            self._retime(e, now)
        e.packets += 1
        e.expires = now + e.ttl
        return KNOWN

    def tcp_step(self, e: _Entry, t: TcpTrack, d: int, seg: Segment | tuple, now: float) -> int:
        """`track` for a TCP entry with window tracking: segment `seg` from side `d` (1: the
        reply side) through Linux's state machine (functions.tcp_track)."""
        r = t.packet(d, seg)
        if r == _T_ACCEPT or r == _T_IGNORE:  # (the common case first: this runs per segment)
            e.packets += 1
            if seg[4] & _RST and t.state != _T_CLOSE:
                self.rst_ignored += 1
            if d and not t.seen_reply:  # (after the packet, as Linux's core sets SEEN_REPLY)
                t.seen_reply = True
                e.replied = True
                e.nxt = e.orig
            if r == _T_ACCEPT:
                tmo = t.timeout
                if tmo is not None:
                    e.ttl = tmo
                    e.expires = exp = now + tmo
                    if exp <= (e.slot - 1) * self._g:  # due before its bucket: an earlier one
                        self._schedule(e)
                e.assured = t.assured
                e.closing = t.state in _T_CLOSING
            return KNOWN
        if r == _T_INVALID:
            self.tcp_invalid += 1
            if t.shrink and e.expires > now + self.timeouts.tcp_unack:
                e.expires = now + self.timeouts.tcp_unack
                if -int(-e.expires // self._g) < e.slot:
                    self._schedule(e)
            return INVALID
        self._remove(e)
        if r == _T_REOPEN:  # a new connection on a closed one's 5-tuple: the rules decide
            self.reopened += 1
            return UNKNOWN
        return KNOWN  # KILL: a RST was the only answer: the entry goes, the RST passes

    def add(self, key: FiveTuple, now: float, tcp_flags: int = 0, seg: Segment | None = None) -> bool:
        """Track a new connection; False if the table is full of assured entries (see the class).
        An entry already under `key` is replaced (a closing TCP entry reopened by a new SYN).
        `seg`: the TCP segment, whose windows are then tracked (see the class)."""
        by_key = self._by_key
        old = by_key.get(key)
        if old is not None:  # a reopened TCP 5-tuple, or a caller that did not look it up first
            if old.closing and key == old.orig and old.expires > now:
                self.reopened += 1
            self._remove(old)
        if self._count >= self.max_entries and not self._make_room(now):
            self.full_drops += 1
            return False
        src, dst, proto, sport, dport = key
        closing = bool(tcp_flags & (_FIN | _RST))
        tr = None
        if seg is not None and proto == 6 and self.tcp_window != "off" and may_start(tcp_flags):
            # Linux's tcp_new, then the first packet through the state machine (a connection met
            # mid-stream is tracked liberally, as Linux does)
            tr = TcpTrack(seg, self.tcp_window == "liberal", self._tcp_timeouts)
            tr.packet(0, seg)
            closing = tr.state in tcp_track.CLOSING_STATES
        t = self.timeouts
        if tr is not None and tr.timeout is not None:
            ttl = tr.timeout
        elif proto == 6:
            ttl = t.tcp_closing if closing else t.tcp_unreplied
        else:
            ttl = t.udp_unreplied if proto == 17 else t.icmp if proto == 1 or proto == 58 else t.other
        exp = now + ttl
        b = -int(-exp // self._g)  # _schedule, inlined
        rev = (dst, src, proto, dport, sport)
        e = _Entry(key, closing, ttl, exp, b, rev)
        e.tcp = tr
        bucket = self._wheel.get(b)
        if bucket is None:
            self._wheel[b] = bucket = {}
            heapq.heappush(self._due, b)
        bucket[e] = None
        by_key[key] = e
        by_key[rev] = e
        self._count += 1
        self.created += 1
        q = self._unreplied
        q.append(e)
        if len(q) > self._compact_at:  # O(len), after at least len/2 appends: O(1) amortized
            self._unreplied = q = deque(x for x in q if x.slot >= 0 and not x.assured)
            self._compact_at = 2 * len(q) + 4096
        return True

    def _make_room(self, now: float) -> bool:
        """Free one place in a full table: reap a little, else early-drop a non-assured entry."""
        self.reap(now, FULL_REAP)
        if self._count < self.max_entries:
            return True
        q = self._unreplied
        while q:
            e = q.popleft()
            self.examined += 1
            if e.slot < 0 or e.assured:
                continue
            if e.expires != e.seen and e.expires > now:  # a packet since it was queued: second chance
                e.seen = e.expires
                q.append(e)
                continue
            self._remove(e)
            if e.expires <= now:
                self.expired += 1
            else:
                self.early_drops += 1
            return True
        return False

    def _remove(self, e: _Entry) -> None:
        if e.slot >= 0:
            self._wheel[e.slot].pop(e, None)
            e.slot = -1
        src, dst, proto, sport, dport = e.orig
        if self._by_key.pop(e.orig, None) is not None:
            self._count -= 1
        self._by_key.pop((dst, src, proto, dport, sport), None)

    def reap(self, now: float, limit: int | None = None) -> int:
        """Remove expired entries, examining at most `limit` (None: all that are due); returns how
        many were removed. Only entries in due buckets are looked at."""
        due, wheel, g = self._due, self._wheel, self._g
        removed = work = 0
        while due and due[0] * g <= now:
            b = due[0]
            bucket = wheel[b]
            while bucket:
                if limit is not None and work >= limit:
                    self.examined += work
                    self.expired += removed
                    return removed
                e = bucket.popitem()[0]
                e.slot = -1
                work += 1
                if e.expires <= now:
                    self._remove(e)
                    removed += 1
                else:  # saw packets since it was put here: to the bucket of its new expiry
                    self._schedule(e, b)
            heapq.heappop(due)
            del wheel[b]
        q = self._unreplied  # trim the early-drop queue's front of entries assured or removed since
        while q and (limit is None or work < limit):
            e = q[0]
            if e.slot >= 0 and not e.assured:
                break  # a live non-assured entry: the next early-drop candidate
            q.popleft()
            work += 1
        self.examined += work
        self.expired += removed
        return removed

    def expire(self, now: float, force: bool = False) -> int:
        """Remove expired entries (at most once per `gc_interval` unless `force`); returns how many."""
        if not force and self._last_gc is not None and now - self._last_gc < self.gc_interval:
            return 0
        self._last_gc = now
        return self.reap(now)

    def next_due(self) -> float | None:
        """When `reap` next has something to look at (None: the table is empty)."""
        return self._due[0] * self._g if self._due else None

    def next_deadline(self, now: float) -> float:
        """When the runtime should call `expire` next."""
        return (now if self._last_gc is None else self._last_gc) + self.gc_interval

    def entries(self) -> list[tuple[FiveTuple, float, bool]]:
        """(original-direction key, expiry time, replied) per connection, for status output."""
        seen: dict[int, _Entry] = {id(e): e for e in self._by_key.values()}
        return sorted(((e.orig, e.expires, e.replied) for e in seen.values()), key=lambda x: x[1])


# --- the firewall ------------------------------------------------------------------------------------

# `Firewall._icmp_class` results
_ICMP_ERROR, _ICMP_NEW, _ICMP_REPLY, _ICMP_UNTRACKED, _ICMP_INVALID = (object() for _ in range(5))
# queries that may open a connection and the replies that belong to one, by ICMP version (Linux's
# valid_new and invmap; the 5-tuple keys them by identifier: net.l4.ICMP_IDENTIFIED)
_ICMP_QUERIES = (frozenset((8, 13, 15, 17)), frozenset((128,)))  # echo, timestamp, information, mask
_ICMP_REPLIES = (frozenset((0, 14, 16, 18)), frozenset((129,)))
# ICMPv6 that Linux leaves untracked (noct_valid_new: MLD, router and neighbour discovery but
# redirects, multicast router advertisement and solicitation, Linux 6.9+), and node information
# queries (139), which it tracks by a nonce the 5-tuple does not carry: the rules decide each one
_ICMPV6_UNTRACKED = frozenset((130, 131, 132, 133, 134, 135, 136, 139, 143, 151, 152))

@dataclass
class Firewall:
    """Rules + connection tracking. `check(key, now)` gives a verdict per packet.

    Counters: per rule (`rule.packets`, `rule.bytes`), plus `established`, `related` (ICMP
    errors about a tracked connection, accepted), `icmp_invalid` (ICMP that Linux's conntrack
    calls invalid, dropped: `_icmp_class`), `policy_hits`, `no_key` (frames without a 5-tuple:
    verdict `non_ip` for non-IP, drop for malformed)."""

    ruleset: RuleSet
    conntrack: ConntrackTable = field(default_factory=ConntrackTable)
    non_ip: Verdict = Verdict.ACCEPT  # ARP and friends must pass or nothing on the network resolves
    link: str = "ip"  # what `check_many`'s packets start with ("ip" or "ethernet"), to read TCP segments
    established: int = 0
    related: int = 0
    icmp_invalid: int = 0
    policy_hits: int = 0
    no_key: int = 0

    @classmethod
    def from_text(cls, text: str, source: str = "<rules>", **kw: object) -> "Firewall":
        return cls(RuleSet.parse(text, source), **kw)  # type: ignore[arg-type]

    def check(self, key: FiveTuple | int, now: float, tcp_flags: int = 0, length: int = 0,
              seg: Segment | None = None, packet: Sized | None = None) -> Verdict:
        """The verdict for one packet. `key` is a 5-tuple, or a `Reason` from `classify_batch`
        (non-IP frames get `non_ip`, malformed, fragments and other unclassifiable frames DROP).
        `seg`: a TCP packet's segment, for window tracking (ConntrackTable); a segment out of
        its connection's window is dropped when the table's `tcp_window` is strict. `packet`
        (starting as `link` says): an ICMP or ICMPv6 packet's, read for its type (`_icmp_class`:
        without it, ICMP is tracked by its 5-tuple alone)."""
        if not isinstance(key, tuple):  # a Reason (an int), not a 5-tuple or FlowKey
            self.no_key += 1
            return self.non_ip if key == 1 else Verdict.DROP  # 1 = Reason.NOT_IP
        ct = self.ruleset.conntrack
        reply = False  # an ICMP reply (echo, timestamp...): it belongs to a connection, or it is invalid
        if ct and packet is not None and (key[2] == 1 or key[2] == 58):  # type: ignore[index]
            kind = self._icmp_class(key, packet)  # type: ignore[arg-type]
            if kind is _ICMP_ERROR:
                if self._related(packet, now):
                    self.related += 1
                    return Verdict.ACCEPT
                self.icmp_invalid += 1
                return Verdict.DROP
            if kind is _ICMP_INVALID:
                self.icmp_invalid += 1
                return Verdict.DROP
            # Linux's ICMP tuple holds the type: a query matches only a connection it opened, a
            # reply only the reply direction of one. The 5-tuple here keys both by identifier, so
            # the direction is checked against the entry.
            e = self.conntrack._by_key.get(key)  # type: ignore[arg-type]
            forward = e is not None and key == e.orig
            if kind is _ICMP_REPLY:
                if e is not None and forward:  # a "reply" going the way the query went
                    self.icmp_invalid += 1
                    return Verdict.DROP
                reply = True
            elif kind is _ICMP_UNTRACKED or (e is not None and not forward):
                # (a query against the reply direction of another's: a new one for Linux, which
                # the key here cannot hold apart; the rules decide it, and it opens nothing)
                ct = False  # the rules decide each one, and none opens a connection
        if ct:
            known = self.conntrack.track(key, now, tcp_flags, seg)  # type: ignore[arg-type]
            if known == KNOWN:
                self.established += 1
                return Verdict.ACCEPT
            if known == INVALID or reply:
                self.icmp_invalid += reply
                return Verdict.DROP
        for rule in self.ruleset.candidates(key[2], key[4]):  # type: ignore[index]
            if rule.matches(key, now):  # type: ignore[arg-type]
                rule.packets += 1
                rule.bytes += length
                v = rule.verdict
                if v is Verdict.ACCEPT and ct and not self.conntrack.add(key, now, tcp_flags, seg):  # type: ignore[arg-type]
                    return Verdict.DROP  # table full (of assured entries): refuse, as Linux does
                return v
        self.policy_hits += 1
        policy = self.ruleset.policy
        if policy is Verdict.ACCEPT and ct and not self.conntrack.add(key, now, tcp_flags, seg):  # type: ignore[arg-type]
            # Full of assured connections: drop, as under an accept rule and as Linux does (its
            # conntrack drops before any filter chain). Accepting untracked would let this
            # connection's later packets meet the rules one by one, so a rule written for new
            # connections (`tcp sport 80 drop`) could cut it half-way.
            return Verdict.DROP
        return policy

    def check_many(self, keys: Sequence[FiveTuple | int], now: float, tcp_flags: Sequence[int],
                   packets: Sequence[Sized], segments: Sequence[tuple | None] | None = None) -> list[int]:
        """`check` for a batch; returns the indices of the packets whose verdict is not ACCEPT.

        `len(packets[i])` is packet i's length (asked only for packets that reach the rules), and
        TCP packets are read for their segment (`tcp_track.segment`, window tracking) unless the
        table's `tcp_window` is off, or `segments[i]` gives it (`tcp_track.BatchSegments`, or
        a list; None there: read it from the packet).
        Same verdicts, counters and table state as calling `check` per packet in order: packets
        of live connections (the bulk of traffic) take an inlined `ConntrackTable.track`, which
        saves two calls per packet; everything else, and TCP segments with SYN, FIN or RST (they
        close or reopen a connection), calls `check`."""
        check = self.check
        accept = Verdict.ACCEPT
        rejected: list[int] = []
        if not self.ruleset.conntrack:
            for i, key in enumerate(keys):
                if check(key, now, tcp_flags[i], len(packets[i])) is not accept:
                    rejected.append(i)
            return rejected
        ct = self.conntrack
        get = ct._by_key.get
        replied = ct._mark_replied
        assured = ct._mark_assured
        tcp_step = ct.tcp_step
        link = self.link
        windows = ct.tcp_window != "off"
        established = 0
        for i, key in enumerate(keys):
            if key.__class__ is tuple:
                e = get(key)
                # ConntrackTable.track, inlined: a TCP entry with window tracking takes its
                # state machine (every segment); other entries, for packets without SYN, FIN or
                # RST (those go through `check`: they may close or reopen the entry), the rest
                if e is not None and e.expires > now:
                    t = e.tcp
                    if t is not None:
                        seg = segments[i] if segments is not None else None
                        if seg is None:
                            seg = segment(packets[i], link)
                        if seg is not None:
                            r = tcp_step(e, t, key != e.orig, seg, now)
                            if r == KNOWN:
                                established += 1
                            elif r == INVALID:
                                rejected.append(i)
                            elif check(key, now, tcp_flags[i], len(packets[i]), seg) is not accept:
                                rejected.append(i)  # (reopened: a new connection, for the rules)
                            continue
                    elif not tcp_flags[i] & 7 and (key[2] == 17 or (key[2] != 1 and key[2] != 58)):
                        # (ICMP goes through `check`: its type decides, not only its key)
                        if not e.assured and key == e.nxt:  # (else nothing to change)
                            if not e.replied:
                                if key != e.orig:  # (a key equal to its own reverse is never replied)
                                    replied(e, now)
                            else:
                                assured(e, now)
                        e.packets += 1
                        e.expires = now + e.ttl
                        established += 1
                        continue
                if windows and key[2] == 6:
                    seg = segments[i] if segments is not None else None
                    if seg is None:
                        seg = segment(packets[i], link)
                    if check(key, now, tcp_flags[i], len(packets[i]), seg) is not accept:
                        rejected.append(i)
                    continue
            if check(key, now, tcp_flags[i], len(packets[i]), None, packets[i]) is not accept:
                rejected.append(i)
        self.established += established
        return rejected

    def _icmp_class(self, key: FiveTuple, packet: Sized) -> object:
        """What Linux's conntrack makes of an ICMP or ICMPv6 message (nf_conntrack_proto_icmp.c,
        icmpv6.c), so the firewall treats it the same way:

        - an error (`is_icmp_error`) is *related* to the connection it quotes, or else invalid;
          it never has an entry of its own;
        - a query (echo; for IPv4 also timestamp, information, address mask) may open a
          connection (its identifier is in the 5-tuple); a reply only belongs to one, else it is
          invalid (the direction is checked in `check`: the key holds no type);
        - IPv6 MLD, router and neighbour discovery (but redirects), multicast router discovery
          and node information queries go to the rules every time and open nothing (Linux leaves
          most of them untracked; node information it tracks by a nonce the 5-tuple lacks);
        - anything else (an unknown type, an ICMPv6 redirect) is invalid."""
        t = icmp_type(packet, self.link)  # type: ignore[arg-type]
        if t is None:
            return _ICMP_UNTRACKED  # (no type to read: a later fragment; the rules decide)
        v6 = key[2] == 58
        if is_icmp_error(6 if v6 else 4, t):
            return _ICMP_ERROR
        if t in _ICMP_QUERIES[v6]:
            return _ICMP_NEW
        if t in _ICMP_REPLIES[v6]:
            return _ICMP_REPLY
        if v6 and t in _ICMPV6_UNTRACKED:
            return _ICMP_UNTRACKED
        return _ICMP_INVALID

    def _related(self, packet: Sized, now: float) -> bool:
        """Whether `packet` is an ICMP error about a connection the table tracks: what Linux's
        conntrack calls RELATED (and nft users accept with `ct state established,related
        accept`), so path MTU discovery (fragmentation needed, packet too big), unreachable ports
        and hosts, and time exceeded reach the connection's ends under `policy drop`. As Linux,
        the error must go to the quoted packet's sender (an error sent elsewhere is not
        related); it does not refresh or change the connection."""
        quote = icmp_error_quote(packet, self.link)  # type: ignore[arg-type]
        if quote is None:
            return False
        inner, to, quoted = quote
        if inner[0] != to:
            return False
        e = self.conntrack._by_key.get(inner)
        if e is None or e.expires <= now:
            return False
        if quoted >= 0:  # a quoted query or reply: only in its own direction (Linux's tuple holds the type)
            v6 = inner[2] == 58
            if (inner == e.orig) != (quoted in _ICMP_QUERIES[v6]):
                return False
        return True

    def check_batch(self, keys: Iterable[FiveTuple | int], now: float,
                    tcp_flags: Sequence[int] | None = None, lengths: Sequence[int] | None = None) -> list[Verdict]:
        """`check` over a batch (one `now` for the whole batch)."""
        if tcp_flags is None and lengths is None:
            return [self.check(k, now) for k in keys]
        keys = list(keys)
        fl = tcp_flags if tcp_flags is not None else [0] * len(keys)
        ln = lengths if lengths is not None else [0] * len(keys)
        return [self.check(k, now, f, n) for k, f, n in zip(keys, fl, ln)]

    def counters(self) -> list[dict[str, object]]:
        """Per-rule counters in rule order, for status output and metrics."""
        return [{"line": r.line, "rule": r.text, "verdict": r.verdict.name.lower(), "packets": r.packets,
                 "bytes": r.bytes} for r in self.ruleset.rules]
