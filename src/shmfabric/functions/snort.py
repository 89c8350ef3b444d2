"""IDS logic: a subset of Snort 2 rule syntax and multi-pattern payload matching.
Pure (sans-IO): the `ids` function passes payloads, 5-tuples and `now`; nothing here reads the clock.

Supported, one rule per line (a line ending in backslash continues):

    alert tcp $EXTERNAL_NET any -> $HOME_NET [80,8080] (msg:"GET root"; flow:to_server,established;
        content:"GET /"; nocase; offset:0; depth:5; content:"|0d 0a|"; sid:1000001; rev:2;)

* actions `alert`, `log` (both only report), `drop` and `reject` (drop the packet in drop mode,
  report in alert mode), `pass` (suppresses every alert for the packet);
* protocols `tcp`, `udp`, `icmp` (ICMP and ICMPv6), `ip` (any: TCP, UDP and ICMP on their L4
  payload, every other protocol on the IP payload);
* addresses `any`, `1.2.3.4`, `10.0.0.0/8`, `fd00::/64`, `[a,b,!c]`, `!a`, `$VAR`;
  ports `any`, `80`, `1:1024`, `:1024`, `1024:`, `[80,443]`, `!80`, `$VAR`; direction `->` or `<>`;
  `!any` (also through a variable, e.g. `!$HOME_NET` with HOME_NET any) is an error: it matches nothing;
* options `msg`, `sid`, `gid`, `rev`, `content` (text with `|hex|` blocks, `!` to negate; `\\;`,
  `\\\\`, `\\"` and `\\|` are the escapes), `nocase`, `offset`, `depth`, `fast_pattern`, `flow`
  (`to_server`, `to_client`, `from_client`, `from_server`, `established`, `not_established`,
  `stateless`); `classtype`, `priority`, `reference`, `metadata` are accepted and kept or ignored.
  Rules are told apart by (gid, sid).

Anything else (`pcre`, `distance`, `within`, `http_*`, `byte_test`, ...) is a parse error naming the
line, so a rule set never silently means less than it says.

Matching, as Snort does it: each rule has one *fast pattern*, the content marked `fast_pattern`
or else its longest positive content, and only fast patterns go into the multi-pattern matcher
(one expression per distinct bytes and nocase). One scan over a payload (or the joined payloads
of a batch) tells which fast patterns occur in which payload; each (payload, fast pattern) is
then handled once, however often it occurs: its rules are grouped by the pattern's offset/depth
window, and a group's window is checked with one `bytes.find`. Only the rules whose fast pattern
was found get their other contents checked (each a `bytes.find` within its window, negated ones
must not be found), then the header and flow options. Rules without a positive content are
checked on every packet (header, flow, negated contents). So the cost of a packet does not grow
with the number of rules that share a content which is not their fast pattern, nor with how often
a pattern occurs in it. Two engines, same results:

* `hyperscan` (used when the `hyperscan` package imports): Intel's Hyperscan, the matcher Snort 3
  and Suricata use, caseless for nocase fast patterns and exact otherwise. A batch is one scan
  reporting every occurrence; one with more occurrences than 4 a payload plus 16 is scanned again
  payload by payload with a second database that reports each pattern once (HS_FLAG_SINGLEMATCH,
  also used by `match`).
* `pyahocorasick`: one Aho-Corasick automaton over lower-cased fast patterns, run over the
  lower-cased payload; it yields every occurrence, each a few hundred nanoseconds of Python.
"""
from __future__ import annotations

import ipaddress
from bisect import bisect_right
from collections import OrderedDict
from itertools import accumulate
import json
import re
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Iterable, Mapping, Sequence, Union

import ahocorasick

try:
    import hyperscan
except ImportError:  # optional at run time: pyahocorasick is the fallback engine
    hyperscan = None

from shmfabric.functions import lru
from shmfabric.net.flow import FiveTuple, PROTO_NAMES, canonical

Buffer = Union[bytes, bytearray, memoryview]

__all__ = ["ENGINES", "default_engine", "parse_rules", "SnortSyntaxError", "SnortRule", "Content", "SignatureSet", "FlowTracker", "Ids", "Alert", "IdsVerdict"]


class SnortSyntaxError(ValueError):
    """A rule text error: `SOURCE:LINE: problem (fix)`."""

    def __init__(self, source: str, line: int, message: str, hint: str = "") -> None:
        self.source, self.line, self.message, self.hint = source, line, message, hint
        super().__init__(f"{source}:{line}: {message}" + (f" ({hint})" if hint else ""))


class IdsVerdict(IntEnum):
    PASS = 0
    DROP = 1


ACTIONS = ("alert", "log", "pass", "drop", "reject")
PROTOS = {"tcp": frozenset((6,)), "udp": frozenset((17,)), "icmp": frozenset((1, 58)), "ip": None}
_IGNORED = {"classtype", "priority", "reference", "metadata"}
_UNSUPPORTED_HINT = ("supported options: msg, sid, gid, rev, content, nocase, offset, depth, fast_pattern, flow, "
                     "classtype, priority, reference, metadata")
#: whitespace in rule text: ASCII only (str.isspace() and str.strip() take \x1c-\x1f, U+0085, U+2028, ...)
_WS = " \t\r\n\f\v"


@dataclass
class Content:
    pattern: bytes
    nocase: bool = False
    offset: int = 0
    depth: int | None = None
    negated: bool = False
    fast_pattern: bool = False  # marked `fast_pattern` (or `fast_pattern:only`) in the rule

    @property
    def needle(self) -> bytes:
        """The bytes searched for: lower-cased for nocase (searched in the lower-cased payload)."""
        return self.pattern.lower() if self.nocase else self.pattern

    @property
    def stop(self) -> int | None:
        """End of the window a match must lie in (None: the end of the payload)."""
        return None if self.depth is None else self.offset + self.depth

    def window_ok(self, start: int, end: int) -> bool:
        """Does a match at payload[start:end] lie in this content's offset/depth window?"""
        return start >= self.offset and (self.depth is None or end <= self.offset + self.depth)

    def search(self, payload: bytes, lowered: bytes | None) -> bool:
        """Is this content (its bytes, regardless of negation) in its window of the payload?"""
        hay = lowered if self.nocase else payload
        assert hay is not None
        return hay.find(self.needle, self.offset, self.stop) >= 0


@dataclass
class _Addr:
    items: list[tuple[int, int, int, bool]] = field(default_factory=list)  # (version, net, mask, negated)
    negate: bool = False

    def match(self, addr: int | bytes) -> bool:
        if not self.items:
            return not self.negate  # any
        v = 4 if addr.__class__ is int else 6
        a = addr if v == 4 else int.from_bytes(addr, "big")  # type: ignore[arg-type]
        pos = [i for i in self.items if not i[3]]
        ok = not pos or any(iv == v and a & m == n for iv, n, m, _ in pos)
        if ok and any(iv == v and a & m == n for iv, n, m, neg in self.items if neg):
            ok = False
        return ok != self.negate


@dataclass
class _Ports:
    items: list[tuple[int, int, bool]] = field(default_factory=list)  # (lo, hi, negated)
    negate: bool = False

    def match(self, port: int) -> bool:
        if not self.items:
            return not self.negate
        pos = [i for i in self.items if not i[2]]
        ok = not pos or any(lo <= port <= hi for lo, hi, _ in pos)
        if ok and any(lo <= port <= hi for lo, hi, neg in self.items if neg):
            ok = False
        return ok != self.negate


@dataclass
class SnortRule:
    line: int
    action: str
    proto: str
    src: _Addr
    sport: _Ports
    dst: _Addr
    dport: _Ports
    bidirectional: bool
    sid: int
    rev: int = 1
    msg: str = ""
    contents: list[Content] = field(default_factory=list)
    to_server: bool | None = None
    established: bool | None = None
    classtype: str = ""
    priority: int | None = None
    hits: int = 0
    gid: int = 1
    source: str = "<rules>"

    @property
    def fast_pattern(self) -> int | None:
        """Index of the content that goes into the matcher: the one marked `fast_pattern`, else
        the longest positive content (the first of equal ones); None without a positive content."""
        best = None
        for ci, c in enumerate(self.contents):
            if c.negated:
                continue
            if c.fast_pattern:
                return ci
            if best is None or len(c.pattern) > len(self.contents[best].pattern):
                best = ci
        return best

    def header_match(self, key: FiveTuple) -> bool:
        src, dst, proto, sport, dport = key
        protos = PROTOS[self.proto]
        if protos is not None and proto not in protos:
            return False
        if self.src.match(src) and self.sport.match(sport) and self.dst.match(dst) and self.dport.match(dport):
            return True
        return self.bidirectional and self.src.match(dst) and self.sport.match(dport) \
            and self.dst.match(src) and self.dport.match(sport)

    def flow_match(self, to_server: bool | None, established: bool | None) -> bool:
        if self.to_server is not None and to_server != self.to_server:
            return False
        if self.established is not None and established != self.established:
            return False
        return True


# --- parser ------------------------------------------------------------------------------------------

#: deepest nesting of [lists] accepted in addresses and ports (Snort's own rule sets use 2)
_MAX_NEST = 16


def _split_rule(p: "_Ctx", text: str) -> tuple[list[str], str]:
    """The seven header words (a [list] is one word, spaces inside it dropped) and the options."""
    text = text.strip(_WS)
    i = text.find("(")
    if i < 0 or not text.endswith(")"):
        raise p.err("not a rule", "write: ACTION PROTO SRC SPORT -> DST DPORT (OPTIONS;)")
    words: list[str] = []
    buf: list[str] = []
    depth = 0
    for ch in text[:i]:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise p.err("']' without '[' in the rule header", "every ] closes an earlier [")
        if ch in _WS:
            if depth == 0 and buf:
                words.append("".join(buf))
                buf = []
            continue
        buf.append(ch)
    if depth:
        raise p.err("'[' not closed in the rule header", "close every address or port list with ], e.g. [10.0.0.1,10.0.0.2]")
    if buf:
        words.append("".join(buf))
    if len(words) != 7 or words[4] not in ("->", "<>"):
        raise p.err("not a rule", "write: ACTION PROTO SRC SPORT -> DST DPORT (OPTIONS;)")
    return words, text[i + 1:-1]


def _is_number(val: str | None) -> bool:
    """A whole number as rules write them: ASCII digits, at most 10 (str.isdigit() takes '²')."""
    return val is not None and re.fullmatch(r"[0-9]{1,10}", val) is not None


#: what ends or changes an option: a backslash escape (any character after it), a quote, a semicolon
_OPTION_MARKS = re.compile(r'\\.|[";]', re.S)


def _split_options(p: "_Ctx", body: str) -> list[tuple[str, str | None]]:
    """`key:value; key;` with quotes and backslash escapes respected. Finds the marks with a regex
    and slices between them: linear in the text (a string built a character at a time was
    quadratic, 14 s for a 1 MB content)."""
    out: list[tuple[str, str | None]] = []
    start, quoted = 0, False
    for m in _OPTION_MARKS.finditer(body):
        c = m.group()
        if c == '"':
            quoted = not quoted
        elif c == ";" and not quoted:
            opt = body[start:m.start()].strip(_WS)
            if opt:
                out.append(_kv(opt))
            start = m.end()
    if quoted:
        raise p.err("unterminated quoted string in the options", 'close it with " before ;')
    rest = body[start:].strip(_WS)
    if rest:
        raise p.err(f"option '{rest[:60]}' is not ended by ';'", "every option ends with ;, e.g. sid:1000001;")
    return out


def _kv(text: str) -> tuple[str, str | None]:
    if ":" in text:
        k, v = text.split(":", 1)
        return k.strip(_WS).lower(), v.strip(_WS)
    return text.strip(_WS).lower(), None


def _quoted(p: "_Ctx", v: str | None, what: str) -> str:
    """The text between the quotes of an option value."""
    if v is None or len(v) < 2 or not (v.startswith('"') and v.endswith('"')):
        raise p.err(f"{what} needs a quoted value", f'write {what}:"..."')
    return v[1:-1]


def _unquote(p: "_Ctx", v: str | None, what: str) -> str:
    """A quoted text value (msg) with its backslash escapes undone."""
    return re.sub(r"\\(.)", r"\1", _quoted(p, v, what), flags=re.S)


#: a content's backslash escapes (Snort 2: `;`, `\`, `"` and `|` must be escaped in content)
_CONTENT_ESCAPES = frozenset(';\\"|')
_CONTENT_MARKS = re.compile(r"[\\|]")


def _content_bytes(p: "_Ctx", text: str) -> bytes:
    """Snort content text (between the quotes), in one left-to-right pass: plain characters,
    `|41 42|` hex blocks and the escapes `\\;` `\\\\` `\\"` `\\|` (so `\\|` is a literal pipe, not
    the start of a hex block). Any other escape is an error naming it."""
    out = bytearray()
    i, n = 0, len(text)
    while i < n:
        m = _CONTENT_MARKS.search(text, i)
        j = n if m is None else m.start()
        if j > i:
            out += text[i:j].encode("utf-8")
        if m is None:
            break
        if text[j] == "\\":
            if j + 1 >= n:
                raise p.err("content ends with a lone backslash", 'escape it as \\\\, or write it as |5c|')
            c = text[j + 1]
            if c not in _CONTENT_ESCAPES:
                raise p.err(f"unknown escape '\\{c}' in content",
                            'only \\; \\\\ \\" and \\| are escapes in content; write other bytes in hex, e.g. |41| for A')
            out += c.encode()
            i = j + 2
            continue
        k = text.find("|", j + 1)
        if k < 0:
            raise p.err("unbalanced | in content", "hex bytes go between two pipes: |0d 0a|; a literal pipe is \\|")
        part = text[j + 1:k]
        hexes = part.replace(" ", "")
        if len(hexes) % 2 or not re.fullmatch(r"[0-9A-Fa-f]*", hexes):
            raise p.err(f"bad hex in content: |{part[:40]}|", "write hex byte pairs like |0d 0a|")
        out += bytes.fromhex(hexes)
        i = k + 1
    if not out:
        raise p.err("empty content", "a content needs at least one byte")
    return bytes(out)


@dataclass
class _Ctx:
    source: str
    line: int
    variables: Mapping[str, str]

    def err(self, message: str, hint: str = "") -> SnortSyntaxError:
        return SnortSyntaxError(self.source, self.line, message, hint)

    def var(self, text: str) -> tuple[str, str]:
        """(name, value) of the variable `$NAME`, one level deep."""
        name = text[1:]
        if name not in self.variables:
            raise self.err(f"undefined variable ${name}", f"define it in the variables, e.g. {name}: 10.0.0.0/8")
        return name, str(self.variables[name]).strip(_WS)


def _via(p: _Ctx, names: Sequence[str]) -> str:
    """How a value came about through variables: '$A is !$B, $B is any'."""
    return ", ".join(f"${n} is {p.variables[n]}" for n in dict.fromkeys(names))


def _matches_nothing(p: _Ctx, what: str, shown: str, names: Sequence[str]) -> SnortSyntaxError:
    """The error for an address or port that is !any: it matches no packet."""
    if names:
        return p.err(f"{what} '{shown}' is !any and matches nothing ({_via(p, names)})",
                     "set the variable to your networks or ports (e.g. HOME_NET: 10.0.0.0/8), or remove the negation")
    return p.err(f"'!any' matches nothing ({what} '{shown}')", "remove the rule or the negation")


def _top(p: _Ctx, text: str, what: str) -> tuple[bool, str, tuple[str, ...]]:
    """An address or port with its leading `!`s and `$VARIABLE`s resolved: (negated, the rest,
    the variables passed through)."""
    neg, names = False, []
    text = text.strip(_WS)
    for _ in range(_MAX_NEST):
        while text.startswith("!"):
            neg, text = not neg, text[1:].lstrip(_WS)
        if not text.startswith("$"):
            break
        name, text = p.var(text)
        names.append(name)
    else:
        raise p.err(f"variable in {what} '{text}' refers to itself or nests too deep")
    return neg, text, tuple(names)


def _split_list(p: _Ctx, text: str, what: str) -> list[str]:
    """The items of `[a,b,[c,d]]` at its top level; the brackets must pair up. Slices between
    the brackets and commas (one regex pass), not a string built a character at a time."""
    items: list[str] = []
    start, depth = 1, 0
    for m in re.finditer(r"[\[\],]", text):
        ch, k = m.group(), m.start()
        if ch == "[":
            if depth == 0 and text[:k].strip(_WS):
                raise p.err(f"text before the '[' in {what} '{text}'", "a list is [a,b]; negate it with a leading !")
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise p.err(f"']' without '[' in {what} '{text}'", "every ] closes an earlier [")
            if depth == 0:
                items.append(text[start:k].strip(_WS))
                rest = text[k + 1:].strip(_WS)
                if rest.startswith("]"):
                    raise p.err(f"']' without '[' in {what} '{text}'", "every ] closes an earlier [")
                if rest:
                    raise p.err(f"text after the closing ']' in {what} '{text}'",
                                "join lists with a comma inside one [...]")
                break
        elif depth == 1:
            items.append(text[start:k].strip(_WS))
            start = k + 1
    else:
        raise p.err(f"'[' not closed in {what} '{text}'", "close the list with ]")
    if any(not it for it in items):
        raise p.err(f"empty item in {what} '{text}'", "remove the extra comma; an empty list [] means nothing")
    return items


def _flatten(p: _Ctx, text: str, what: str, neg: bool = False, depth: int = 0,
             names: tuple[str, ...] = ()) -> list[tuple[str, bool, tuple[str, ...]]]:
    """The leaves of an address or port expression as (text, negated, variables passed through),
    variables resolved and nested lists flattened. A `!` before a nested list negates each of its
    items, as Snort 2 does: `[10.0.0.0/8,![10.0.0.1,10.0.0.2]]` is 10.0.0.0/8 without the two."""
    if depth > _MAX_NEST:
        raise p.err(f"{what} lists nested deeper than {_MAX_NEST} levels", "flatten the list")
    flip, text, more = _top(p, text, what)
    neg, names = neg != flip, names + more
    if text.startswith("["):
        out: list[tuple[str, bool, tuple[str, ...]]] = []
        for item in _split_list(p, text, what):
            out += _flatten(p, item, what, neg, depth + 1, names)
        return out
    if "[" in text or "]" in text:
        raise p.err(f"unbalanced brackets in {what} '{text}'", "a list is [a,b], and may hold lists: [a,[b,c]]")
    if not text:
        raise p.err(f"empty {what}", "write any, or an item after the !")
    return [(text, neg, names)]


def _parse_addr(p: _Ctx, text: str, what: str = "address") -> _Addr:
    neg, body, names = _top(p, text, what)
    if body == "any":
        if neg:
            raise _matches_nothing(p, what, text, names)
        return _Addr()
    out = _Addr(negate=neg)
    leaves = _flatten(p, body, what, names=names)
    for leaf, ineg, via in leaves:
        if leaf == "any":
            # [a,!any] matches nothing; so does ![any,a] (but ![any,!a] is a)
            if ineg or (neg and not any(n for _, n, _ in leaves)):
                raise _matches_nothing(p, what, text, via)
            out.items += [(4, 0, 0, False), (6, 0, 0, False)]  # any address of either version
            continue
        try:
            net = ipaddress.ip_network(leaf, strict=False)
        except ValueError:
            raise p.err(f"not an address: '{leaf}'", "write any, 1.2.3.4, 10.0.0.0/8, [a,b] or $VAR") from None
        bits = 32 if net.version == 4 else 128
        mask = ((1 << bits) - 1) ^ ((1 << (bits - net.prefixlen)) - 1)
        out.items.append((net.version, int(net.network_address), mask, ineg))
    return out


def _parse_ports(p: _Ctx, text: str, what: str = "port") -> _Ports:
    neg, body, names = _top(p, text, what)
    if body == "any":
        if neg:
            raise _matches_nothing(p, what, text, names)
        return _Ports()
    out = _Ports(negate=neg)
    for leaf, ineg, via in _flatten(p, body, what, names=names):
        if leaf == "any":
            if ineg:
                raise _matches_nothing(p, what, text, via)
            raise p.err("'any' inside a port list", "use any alone")
        m = re.fullmatch(r"([0-9]{0,9}):([0-9]{0,9})|([0-9]{1,9})", leaf)
        if not m or leaf == ":":
            raise p.err(f"not a port: '{leaf[:40]}'", "write any, 80, 1:1024, 1024:, [80,443] or $VAR")
        if m.group(3):
            lo = hi = int(m.group(3))
        else:
            lo = int(m.group(1) or 0)
            hi = int(m.group(2) or 65535)
        if not 0 <= lo <= hi <= 65535:
            raise p.err(f"port range out of order or above 65535: '{leaf}'")
        out.items.append((lo, hi, ineg))
    return out


_FLOW_WORDS = {"to_server": ("to_server", True), "from_client": ("to_server", True),
               "to_client": ("to_server", False), "from_server": ("to_server", False),
               "established": ("established", True), "not_established": ("established", False),
               "stateless": (None, None)}


def parse_rule(text: str, line: int = 1, source: str = "<rules>", variables: Mapping[str, str] | None = None) -> SnortRule:
    """Parse one Snort rule; raises `SnortSyntaxError`."""
    p = _Ctx(source, line, {"HOME_NET": "any", "EXTERNAL_NET": "any", **(variables or {})})
    (action, proto, src, sport, direction, dst, dport), body = _split_rule(p, text)
    if action not in ACTIONS:
        raise p.err(f"unknown action '{action}'", "use one of " + ", ".join(ACTIONS))
    if proto not in PROTOS:
        raise p.err(f"unknown protocol '{proto}'", "use tcp, udp, icmp or ip")
    rule = SnortRule(line, action, proto, _parse_addr(p, src, "source address"), _parse_ports(p, sport, "source port"),
                     _parse_addr(p, dst, "destination address"), _parse_ports(p, dport, "destination port"),
                     direction == "<>", sid=0, source=source)
    if proto in ("icmp", "ip") and (rule.sport.items or rule.dport.items):
        raise p.err(f"ports given for protocol '{proto}'", "use any for the ports")
    last: Content | None = None
    fast: Content | None = None
    only: list[Content] = []
    for key, val in _split_options(p, body):
        if key == "msg":
            rule.msg = _unquote(p, val, "msg")
        elif key in ("sid", "rev", "gid"):
            if not _is_number(val):
                raise p.err(f"{key} needs a number", f"write {key}:{ {'sid': 1000001, 'rev': 2, 'gid': 1}[key]};")
            setattr(rule, key, int(val))  # type: ignore[arg-type]
        elif key == "content":
            neg = bool(val) and val.startswith("!")  # type: ignore[union-attr]
            last = Content(_content_bytes(p, _quoted(p, val[1:].strip(_WS) if neg else val, "content")), negated=neg)  # type: ignore[index]
            rule.contents.append(last)
        elif key in ("nocase", "offset", "depth"):
            if last is None:
                raise p.err(f"'{key}' before any content", f"put {key} after the content it modifies")
            if key == "nocase":
                last.nocase = True
            else:
                if not _is_number(val):
                    raise p.err(f"{key} needs a non-negative number", f"write {key}:4;")
                setattr(last, key, int(val))  # type: ignore[arg-type]
                if key == "depth" and int(val) < len(last.pattern):  # type: ignore[arg-type]
                    raise p.err(f"depth {val} is shorter than its content ({len(last.pattern)} bytes)",
                                "depth counts from offset and must cover the whole content")
        elif key == "fast_pattern":
            if last is None:
                raise p.err("'fast_pattern' before any content", "put fast_pattern after the content it marks")
            if val not in (None, "only"):
                raise p.err(f"fast_pattern:{val} is not supported", "write fast_pattern; or fast_pattern:only;")
            if last.negated:
                raise p.err("fast_pattern on a negated content", "mark a content that must be present")
            if fast is not None:
                raise p.err("more than one fast_pattern in the rule", "mark one content only")
            fast = last
            last.fast_pattern = True
            if val == "only":
                only.append(last)
        elif key == "flow":
            seen: dict[str, tuple[str, bool]] = {}
            for word in (val or "").replace(" ", "").split(","):
                if word not in _FLOW_WORDS:
                    raise p.err(f"unsupported flow option '{word}'",
                                "use to_server, to_client, from_client, from_server, established, not_established, stateless")
                attr, value = _FLOW_WORDS[word]
                if attr is None:
                    continue
                if attr in seen and seen[attr][1] != value:
                    raise p.err(f"flow options '{seen[attr][0]}' and '{word}' contradict each other",
                                "a rule matches one direction and one state: keep one of them")
                seen[attr] = (word, value)  # type: ignore[assignment]
                setattr(rule, attr, value)
        elif key == "classtype":
            rule.classtype = val or ""
        elif key == "priority":
            if not _is_number(val):
                raise p.err("priority needs a number", "write priority:2;")
            rule.priority = int(val)  # type: ignore[arg-type]
        elif key in _IGNORED:
            pass
        else:
            raise p.err(f"unsupported option '{key}'", _UNSUPPORTED_HINT)
    for c in only:
        if c.offset or c.depth is not None:
            raise p.err("fast_pattern:only with offset or depth", "Snort refuses it too: use fast_pattern; instead")
    if rule.sid <= 0:
        raise p.err("rule has no sid", "add sid:N; with a number unique in the rule set (local rules use 1000000+)")
    if rule.gid <= 0:
        raise p.err("gid must be 1 or more", "leave gid out (it is 1) or write gid:1;")
    return rule


# --- matching ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Alert:
    """One rule that fired on one packet."""

    sid: int
    rev: int
    msg: str
    action: str
    key: FiveTuple
    classtype: str = ""
    priority: int | None = None
    gid: int = 1

    def line(self) -> str:
        """Snort's "fast" alert format: `[**] [GID:SID:REV] MSG [**] ... {PROTO} SRC:PORT -> DST:PORT`."""
        src, dst, proto, sport, dport = self.key
        s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
        pr = PROTO_NAMES.get(proto, str(proto)).upper()
        extra = f" [Classification: {self.classtype}]" if self.classtype else ""
        extra += f" [Priority: {self.priority}]" if self.priority is not None else ""
        return f"[**] [{self.gid}:{self.sid}:{self.rev}] {self.msg} [**]{extra} {{{pr}}} {s}:{sport} -> {d}:{dport}"

    def as_dict(self) -> dict[str, object]:
        """Structured form for JSON logs."""
        src, dst, proto, sport, dport = self.key
        return {"gid": self.gid, "sid": self.sid, "rev": self.rev, "msg": self.msg, "action": self.action,
                "src": str(ipaddress.ip_address(src)), "dst": str(ipaddress.ip_address(dst)), "proto": proto,
                "sport": sport, "dport": dport, "classtype": self.classtype, "priority": self.priority}

    def json(self) -> str:
        return json.dumps(self.as_dict(), sort_keys=True)


#: Pattern engines a SignatureSet can use; "auto" is hyperscan when it imports, else pyahocorasick.
ENGINES = ("auto", "hyperscan", "pyahocorasick")


def default_engine() -> str:
    """The engine "auto" resolves to here."""
    return "hyperscan" if hyperscan is not None else "pyahocorasick"


#: A batch whose scan reports more occurrences than this many per payload (plus _HITS_EXTRA) is
#: scanned again payload by payload with the single-match database (~1 us a payload, against
#: ~0.3 us of Python per occurrence reported).
_HITS_PER_PAYLOAD = 4
_HITS_EXTRA = 16


class SignatureSet:
    """Compiled rules: one multi-pattern matcher over the rules' fast patterns, plus the rules
    without a positive content. `engine` is one of `ENGINES` (see the module docstring); `engine`
    the attribute is the one in use. A set scans one payload at a time (Hyperscan's scratch space
    is per database): use one set per thread, as each function process has its own.

    `patterns` counts the positive contents of all rules, `fast_patterns` the distinct
    expressions in the matcher."""

    def __init__(self, rules: list[SnortRule], engine: str = "auto") -> None:
        if engine not in ENGINES:
            raise ValueError(f"unknown pattern engine {engine!r}: use one of {', '.join(ENGINES)}")
        if engine == "hyperscan" and hyperscan is None:
            raise ValueError("pattern engine 'hyperscan' needs the hyperscan package "
                             "(pip install hyperscan), or use engine: pyahocorasick")
        _check_sids(rules)
        self.rules = rules
        self.requested_engine = engine
        self.engine = default_engine() if engine == "auto" else engine
        self._no_content: list[int] = []
        # per rule: the contents other than its fast pattern, as (needle, nocase, offset, stop, negated)
        self._checks: list[tuple[tuple[bytes, bool, int, int | None, bool], ...]] = []
        # fast pattern id -> (length, needle, nocase, [(offset, stop, (rule indices))]): the rules
        # whose fast pattern it is, grouped by the pattern's window
        exprs: dict[tuple[bytes, bool], int] = {}
        where: list[tuple[int, bytes, bool, dict[tuple[int, int | None], list[int]]]] = []
        self.patterns = 0
        for ri, r in enumerate(rules):
            fp = r.fast_pattern
            self.patterns += sum(not c.negated for c in r.contents)
            self._checks.append(tuple((c.needle, c.nocase, c.offset, c.stop, c.negated)
                                      for ci, c in enumerate(r.contents) if ci != fp))
            if fp is None:
                self._no_content.append(ri)
                continue
            c = r.contents[fp]
            k = (c.needle, c.nocase)
            eid = exprs.get(k)
            if eid is None:
                eid = exprs[k] = len(where)
                where.append((len(c.pattern), c.needle, c.nocase, {}))
            where[eid][3].setdefault((c.offset, c.stop), []).append(ri)
        self._where = [(length, needle, nocase, [(off, stop, tuple(ris)) for (off, stop), ris in groups.items()])
                       for length, needle, nocase, groups in where]
        self.fast_patterns = len(where)
        self._automaton = None
        self._lids: list[list[int]] = []  # pyahocorasick: lower-cased pattern id -> fast pattern ids
        self._hs: "hyperscan.Database | None" = None
        self._hs1: "hyperscan.Database | None" = None  # single-match
        self._first_bytes = self._first_any = None
        if self.engine == "hyperscan":
            # both compiled now (each ~0.1 s for 1,000 patterns, ~1-2 s for 30,000), not the
            # single-match one at its first use: that would stall the first batch that needs it
            self._hs = self._compile_hyperscan(0)
            self._hs1 = self._compile_hyperscan(hyperscan.HS_FLAG_SINGLEMATCH)
        else:
            self._compile_automaton()

    def __reduce__(self) -> tuple:
        # A Hyperscan database does not pickle: rebuild it from the rules instead.
        return (self.__class__, (self.rules, self.requested_engine))

    def _compile_hyperscan(self, flag: int) -> "hyperscan.Database | None":
        # One expression per fast pattern: caseless for nocase ones (Hyperscan folds ASCII only, as
        # Snort's nocase does), exact otherwise, so a hit needs no byte re-check.
        if not self._where:
            return None
        db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        # Every byte escaped as \xHH rather than compile(literal=True): python-hyperscan 0.9.1 cuts a
        # literal at its first NUL byte (b"a\x00b" matches as b"a"); escaped it is exact and scans
        # as fast (Hyperscan extracts the literals either way).
        db.compile(expressions=[b"".join(b"\\x%02x" % x for x in needle) for _, needle, _, _ in self._where],
                   ids=list(range(len(self._where))),
                   flags=[flag | (hyperscan.HS_FLAG_CASELESS if nocase else 0) for _, _, nocase, _ in self._where])
        return db

    def _compile_automaton(self) -> None:
        # One automaton over lower-cased fast patterns, run once over the lower-cased payload; a
        # case-sensitive pattern's hit is confirmed against the original bytes (or searched for in
        # its window). One pass instead of two (exact + nocase) halves the scan cost.
        table: dict[str, int] = {}
        for eid, (_, needle, _, _) in enumerate(self._where):
            # latin-1 maps each byte to one code point, so str offsets are byte offsets.
            pat = needle.lower().decode("latin-1")
            lid = table.get(pat)
            if lid is None:
                lid = table[pat] = len(self._lids)
                self._lids.append([])
            self._lids[lid].append(eid)
        if table:
            a = ahocorasick.Automaton()
            for pat, lid in table.items():
                a.add_word(pat, (lid, len(pat)))
            a.make_automaton()
            self._automaton = a
        # Bytes that begin some (lower-cased) pattern: a batch of payloads with none of them has
        # no hit, which bytes.translate tells at ~1 ns a byte, against ~16 ns a byte for the
        # automaton's scan. Pays off on binary or zero payloads; text nearly always has one.
        # (Not used with Hyperscan, whose own scan costs < 1 ns a byte.)
        self._first_bytes = bytes(sorted({ord(p[0]) for p in table})) if table else None
        # the same in either ASCII case, to test payloads that were not lower-cased
        self._first_any = None if self._first_bytes is None else \
            bytes(sorted(set(self._first_bytes) | set(self._first_bytes.upper())))

    @property
    def _has_patterns(self) -> bool:
        return self._automaton is not None or self._hs is not None

    def _hs_scan(self, data: bytes) -> list[tuple[int, int]]:
        """(fast pattern id, end offset) of each pattern's first occurrence in one payload."""
        hits: list[tuple[int, int]] = []
        self._hs1.scan(data, match_event_handler=_on_hs_match, context=hits)  # type: ignore[union-attr]
        return hits

    @classmethod
    def parse(cls, text: str, source: str = "<rules>", variables: Mapping[str, str] | None = None,
              engine: str = "auto") -> "SignatureSet":
        """Parse a rules file: one rule per line, `#` comments, trailing backslash continues a line."""
        return cls(parse_rules(text, source, variables), engine)

    def _fired(self, data: bytes, low: bytes | None, found: dict[int, int], key: FiveTuple,
               to_server: bool | None, established: bool | None) -> list[SnortRule]:
        """The rules that fire on one payload, given where its fast patterns were found:
        {fast pattern id: start of a real occurrence, or -1 if one is not known (search the window)}."""
        where, checks, rules = self._where, self._checks, self.rules
        cands: list[int] = []
        for eid, start in found.items():
            length, needle, nocase, groups = where[eid]
            for off, stop, ris in groups:
                if start >= off and (stop is None or start + length <= stop):
                    cands += ris  # the occurrence seen lies in this window
                    continue
                if nocase:
                    if low is None:
                        low = data.lower()
                    hay = low
                else:
                    hay = data
                if hay.find(needle, off, stop) >= 0:
                    cands += ris
        if self._no_content:
            cands += self._no_content
        if not cands:
            return []
        if len(cands) > 1:
            cands.sort()
        out = []
        for ri in cands:
            for needle, nocase, off, stop, neg in checks[ri]:
                if nocase:
                    if low is None:
                        low = data.lower()
                    hay = low
                else:
                    hay = data
                if (hay.find(needle, off, stop) >= 0) is neg:
                    break
            else:
                r = rules[ri]
                if r.header_match(key) and r.flow_match(to_server, established):
                    out.append(r)
        return out

    def match(self, payload: Buffer, key: FiveTuple, to_server: bool | None = None,
              established: bool | None = None) -> list[SnortRule]:
        """Rules that fire on this packet, in rule order. `to_server`/`established` come from a
        `FlowTracker`; a rule with `flow:` options does not fire when they are None (unknown)."""
        data = bytes(payload)
        found: dict[int, int] = {}
        low = None
        if self._hs is not None:
            where = self._where
            for eid, stop in self._hs_scan(data):
                found[eid] = stop - where[eid][0]
        elif self._automaton is not None:
            # bytes.lower() folds ASCII only, as Snort's nocase does (str.lower() would fold latin-1 too).
            low = data.lower()
            by_pkt: dict[int, dict[int, int]] = {}
            self._ac_collect(low.decode("latin-1"), data, [0, len(data)], by_pkt)
            found = by_pkt.get(0, found)
        if not found and not self._no_content:
            return []  # the common case: no fast pattern anywhere in the payload
        return self._fired(data, low, found, key, to_server, established)

    def _ac_collect(self, text: str, joined: bytes, starts: list[int], found_by_pkt: dict[int, dict[int, int]]) -> None:
        """pyahocorasick: {payload: {fast pattern id: start or -1}} from the lower-cased joined
        payloads, each (payload, lower-cased pattern) handled once, at its first occurrence.
        The automaton yields hits in the order of their end, so the payload of a hit's last
        byte only moves forward (no bisect)."""
        lids, where = self._lids, self._where
        p, base, nxt = 0, 0, starts[1]
        seen: set[int] = set()
        found: dict[int, int] | None = None
        for end, (lid, length) in self._automaton.iter(text):  # type: ignore[union-attr]
            if end >= nxt:
                while end >= nxt:
                    p += 1
                    nxt = starts[p + 1]
                base = starts[p]
                seen = set()
                found = None
            if lid in seen:
                continue
            start = end + 1 - length
            if start < base:
                continue  # spans two payloads: not a match in either
            seen.add(lid)
            if found is None:
                found = found_by_pkt[p] = {}
            for eid in lids[lid]:
                _, needle, nocase, _ = where[eid]
                # a nocase pattern's lower-cased hit is real; an exact one's if the bytes agree,
                # else the pattern may still occur elsewhere in the payload: -1 (search its window)
                found[eid] = start - base if nocase or joined[start:end + 1] == needle else -1

    @property
    def uses_flow(self) -> bool:
        """True if some rule has `flow:` options (then packets must go through a FlowTracker)."""
        v = self.__dict__.get("_uses_flow")
        if v is None:
            v = self.__dict__["_uses_flow"] = any(r.to_server is not None or r.established is not None
                                                  for r in self.rules)
        return v

    def match_batch(self, payloads: Sequence[bytes], keys: Sequence[FiveTuple],
                    flow: Sequence[tuple[bool | None, bool | None]] | None = None) -> list[tuple[int, list[SnortRule]]]:
        """`match` for a whole batch with one scan over the joined payloads.

        Why: a Python-level call per packet into the matcher costs more than the scan itself
        for short payloads; joining the batch makes the scan one C loop. A hit that spans two
        payloads is discarded, so the result is exactly `match` per packet. Returns
        (packet index, fired rules) for the packets where something fired, in packet order."""
        n = len(payloads)
        if n == 0 or (not self._has_patterns and not self._no_content):
            return []
        first = self._first_any
        if first is not None and not self._no_content and self._automaton is not None and \
                sum(map(len, payloads)) > _PREFILTER_MIN * n:
            # long payloads: scan only those where some pattern can begin (a translate is ~1 ns a
            # byte, the scan ~20); a payload without any such byte has no hit
            sel = [i for i, pl in enumerate(payloads) if len(pl.translate(None, first)) != len(pl)]
            if len(sel) < n:
                if not sel:
                    return []
                sub = self.match_batch([payloads[i] for i in sel], _Subset(keys, sel),
                                       None if flow is None else [flow[i] for i in sel])
                return [(sel[p], fired) for p, fired in sub]
        found_by_pkt: dict[int, dict[int, int]] = {}
        lowered = None
        if self._has_patterns:
            joined = b"".join(payloads)
            if self._hs is not None:
                self._hs_batch(joined, payloads, found_by_pkt)
                if not found_by_pkt and not self._no_content:
                    return []  # the common case: no fast pattern anywhere in the batch
            else:
                starts = [0, *accumulate(map(len, payloads))]
                lowered = joined.lower()
                first = self._first_bytes
                if first is not None and not self._no_content and len(lowered.translate(None, first)) == len(lowered):
                    return []  # no pattern can begin anywhere in the batch
                self._ac_collect(lowered.decode("latin-1"), joined, starts, found_by_pkt)
        out = []
        pkts = range(n) if self._no_content else sorted(found_by_pkt)
        empty: dict[int, int] = {}
        for p in pkts:
            data = payloads[p]
            if data.__class__ is not bytes:
                data = bytes(data)
            low = None if lowered is None else lowered[starts[p]:starts[p + 1]]
            to_server, established = flow[p] if flow is not None else (None, None)
            fired = self._fired(data, low, found_by_pkt.get(p, empty), keys[p], to_server, established)
            if fired:
                out.append((p, fired))
        return out

    def _hs_batch(self, joined: bytes, payloads: Sequence[bytes], found_by_pkt: dict[int, dict[int, int]]) -> None:
        """Hyperscan over a batch: one scan of the joined payloads reporting every occurrence (a
        hit discarded for spanning two payloads must not hide a later real one, as SINGLEMATCH
        would), each (payload, pattern) kept once; past a bound on the occurrences, the scan stops
        and each payload is scanned alone with the single-match database."""
        n = len(payloads)
        hits: list[tuple[int, int]] = []
        limit = _HITS_PER_PAYLOAD * n + _HITS_EXTRA
        append = hits.append

        def on_match(eid: int, start: int, end: int, flags: int, ctx: object) -> bool:
            append((eid, end))
            return len(hits) > limit  # True stops the scan

        where = self._where
        try:
            self._hs.scan(joined, match_event_handler=on_match)  # type: ignore[union-attr]
        except hyperscan.ScanTerminated:
            scan1 = self._hs1.scan  # type: ignore[union-attr]
            for p in range(n):
                one: list[tuple[int, int]] = []
                scan1(payloads[p], match_event_handler=_on_hs_match, context=one)
                if one:
                    found_by_pkt[p] = {eid: stop - where[eid][0] for eid, stop in one}
            return
        if not hits:
            return
        if n == 1:
            found = {}
            for eid, stop in hits:
                if eid not in found:
                    found[eid] = stop - where[eid][0]
            if found:
                found_by_pkt[0] = found
            return
        starts = [0, *accumulate(map(len, payloads))]
        for eid, stop in hits:
            start = stop - where[eid][0]
            p = bisect_right(starts, start) - 1
            if stop > starts[p + 1]:
                continue  # spans two packets' payloads: not a match in either
            found = found_by_pkt.get(p)
            if found is None:
                found_by_pkt[p] = {eid: start - starts[p]}
            elif eid not in found:
                found[eid] = start - starts[p]

    @property
    def needs_every_key(self) -> bool:
        """True if matching must see every packet's 5-tuple: some rule has `flow:` options (the
        flow tracker observes every packet) or no positive content (it is checked on every
        packet). Otherwise `match_batch` asks `keys[p]` only for packets where a pattern hit, so
        a caller may pass a sequence that computes keys on demand."""
        return self.uses_flow or bool(self._no_content)


def _on_hs_match(eid: int, start: int, end: int, flags: int, hits: list) -> None:
    # Hyperscan's callback, once per hit: kept to one append (returning None continues the scan).
    hits.append((eid, end))


#: Average payload length above which match_batch tests each payload for a pattern's first byte
#: before the scan (below it one test of the joined batch is cheaper than a call per payload).
_PREFILTER_MIN = 128


class _Subset:
    """keys[sel[p]] as keys[p], without building the list (keys may be computed on demand)."""

    __slots__ = ("keys", "sel")

    def __init__(self, keys: Sequence[FiveTuple], sel: list[int]) -> None:
        self.keys, self.sel = keys, sel

    def __getitem__(self, p: int) -> FiveTuple:
        return self.keys[self.sel[p]]

    def __len__(self) -> int:
        return len(self.sel)


# --- flow state ------------------------------------------------------------------------------------------

_FIN, _SYN, _RST, _ACK = 0x01, 0x02, 0x04, 0x10
# state bits: non-SYN, non-RST packets seen from the client / from the server; FIN from each;
# closed (a RST, or FINs both ways): the next SYN or SYN-ACK starts the flow over
_FROM_CLIENT, _FROM_SERVER, _FIN_CLIENT, _FIN_SERVER, _CLOSED = 1, 2, 4, 8, 16
# handshake stages: none seen (picked up midstream; not TCP), SYN seen, SYN-ACK seen, completed
_MIDSTREAM, _SYN_SEEN, _SYNACK_SEEN, _HANDSHAKE = 0, 1, 2, 3
#: protocols whose ports tell a server (< 1024) from a client (>= 1024)
_PORT_PROTOS = frozenset((6, 17, 132))


def _state_expired(st: list, now: float) -> bool:
    return st[2] <= now  # [client-side key, established, expires, placed, stage, bits]


def _state_requeue(st: list) -> bool:
    """Used since it was placed (its expiry moved): placed anew, to the new end."""
    if st[2] != st[3]:
        st[3] = st[2]
        return True
    return False


def _reverse(key: FiveTuple) -> FiveTuple:
    src, dst, proto, sport, dport = key
    return (dst, src, proto, dport, sport)


def _guess_client(key: FiveTuple) -> FiveTuple:
    """The client side of a flow not seen from its SYN: for TCP, UDP and SCTP the side whose port
    is >= 1024 when the other is below 1024; otherwise the sender of this (the first seen) packet."""
    src, dst, proto, sport, dport = key
    if proto in _PORT_PROTOS and sport < 1024 <= dport:
        return (dst, src, proto, dport, sport)
    return key


class FlowTracker:
    """Tells, per packet, whether it goes to the server and whether its flow is established, as
    Snort's `flow:` option needs. Bounded, with idle expiry driven by `now`.

    TCP (with the packet's flags): the sender of a SYN (without ACK) is the client and the SYN
    starts the flow over, unless the flow completed its handshake (then a SYN, from either side,
    changes nothing: a forged one must not turn a connection around); the receiver of a SYN-ACK
    is the client likewise. The flow is established once the client ACKs the server's SYN-ACK
    (SYN, SYN-ACK, ACK). A RST, or a FIN from each side, closes the flow: its state stays for
    the packets still in flight, and the next SYN or SYN-ACK starts it over even after a
    handshake. A flow picked up midstream (no SYN seen: the tracker started late, or the flow was
    evicted or expired) takes its client from the ports (the side >= 1024 when the other is
    below 1024) or else as the first packet's sender, and is established once non-SYN, non-RST
    packets went both ways; a RST alone starts no flow. Other protocols (UDP, ICMP, ...) work
    as midstream TCP: client from the ports or the first packet, established after traffic both
    ways. Sequence numbers are not checked: a forger who can inject a whole handshake the wrong
    way before a connection can still mislead it (as every tracker without sequence checks).

    The table is kept in last-use order, lazily: a packet of a known flow only moves its expiry,
    and `_sweep` re-queues such a flow when it reaches the old end. Expiry and eviction work
    from the old end, O(1) amortized per packet. A new flow that finds the table full (`max_flows`
    flows, none expired) evicts the least recently used flow (`evicted` counts them); if that
    flow sends again it starts over, as a flow picked up midstream."""

    def __init__(self, max_flows: int = 262_144, idle_timeout: float = 300.0) -> None:
        if max_flows < 1:
            raise ValueError(f"max_flows must be at least 1, got {max_flows}")
        self.max_flows = max_flows
        self.idle_timeout = idle_timeout
        # canonical key -> [client-side key, established, expires, placed, stage, bits]; `placed`
        # is the expiry the flow had when put at its place in the order. OrderedDict: popping a
        # plain dict's first entry again and again costs O(n) each (deleted slots at the front
        # are skipped each time).
        self._flows: OrderedDict[FiveTuple, list] = OrderedDict()
        self.expired = self.evicted = 0
        self.swept = 0  # entries looked at by _sweep (a work count for tests)

    def __len__(self) -> int:
        return len(self._flows)

    def observe(self, key: FiveTuple, now: float, tcp_flags: int = 0) -> tuple[bool, bool]:
        """(to_server, established) for this packet, updating the flow's state."""
        c = canonical(key)
        flows = self._flows
        st = flows.get(c)
        if st is not None and st[2] > now:
            st[2] = now + self.idle_timeout
            if not tcp_flags & 0x07 or key[2] != 6:  # no SYN, RST or FIN
                # the common case: a packet that changes nothing (an established flow, or one
                # more packet the same way; not the ACK that completes a handshake)
                if st[1]:
                    return key == st[0], True
                to_server = key == st[0]
                if st[5] & (_FROM_CLIENT if to_server else _FROM_SERVER) and st[4] != _SYNACK_SEEN:
                    return to_server, False
        else:
            if st is not None:
                del flows[c]  # expired: re-inserted at the new end below
            if tcp_flags & _RST and key[2] == 6:
                return key == _guess_client(key), False  # a RST alone starts no flow
            self._sweep(now, 2)
            if len(flows) >= self.max_flows:
                self._sweep(now, None, len(flows) - self.max_flows + 1)
            exp = now + self.idle_timeout
            st = flows[c] = [_guess_client(key), False, exp, exp, _MIDSTREAM, 0]
        if key[2] == 6:
            self._tcp(st, key, tcp_flags)
        else:
            st[5] |= _FROM_CLIENT if key == st[0] else _FROM_SERVER
            st[1] = st[5] & 3 == 3
        return key == st[0], st[1]

    @staticmethod
    def _tcp(st: list, key: FiveTuple, flags: int) -> None:
        if flags & _RST:
            st[5] |= _CLOSED
            return
        syn = flags & (_SYN | _ACK)
        if flags & _SYN:
            if st[4] != _HANDSHAKE or st[5] & _CLOSED:
                if syn == _SYN:  # its sender is the client: the flow starts over
                    st[0], st[1], st[4], st[5] = key, False, _SYN_SEEN, 0
                else:  # SYN-ACK: its receiver is the client
                    st[0], st[1], st[4], st[5] = _reverse(key), False, _SYNACK_SEEN, 0
            return
        to_server = key == st[0]
        if st[4] == _SYNACK_SEEN and to_server and flags & _ACK:
            st[4], st[1] = _HANDSHAKE, True
        st[5] |= _FROM_CLIENT if to_server else _FROM_SERVER
        if flags & _FIN:
            st[5] |= _FIN_CLIENT if to_server else _FIN_SERVER
            if st[5] & (_FIN_CLIENT | _FIN_SERVER) == _FIN_CLIENT | _FIN_SERVER:
                st[5] |= _CLOSED
        if st[5] & 3 == 3:
            st[1] = True  # both ways: established (a handshake may have gone unseen)

    def _sweep(self, now: float, limit: int | None, evict: int = 0) -> int:
        """From the old end: forget expired flows, re-queue flows used since they were placed,
        stop at the first live one that was not (all behind it were placed later); with `evict`,
        forget that many such least recently used flows first. `limit` bounds the entries looked
        at. Returns how many expired."""
        expired, evicted, n = lru.sweep(self._flows, now, limit, _state_expired, _state_requeue, evict)
        self.evicted += evicted
        self.swept += n
        self.expired += expired
        return expired

    def expire(self, now: float, limit: int | None = None) -> int:
        """Forget idle flows (looking at no more than `limit` entries if given); returns how many."""
        return self._sweep(now, limit)

    def expire_pending(self, now: float) -> bool:
        """True if the oldest entry needs a look (it expired, or was used since it was placed)."""
        if not self._flows:
            return False
        st = next(iter(self._flows.values()))
        return st[2] <= now or st[2] != st[3]


@dataclass
class Ids:
    """Signatures + flow tracking + the alert/drop policy. `mode="alert"` (IDS: drop rules only
    alert) or `mode="drop"` (inline IPS: drop/reject rules drop the packet)."""

    signatures: SignatureSet
    mode: str = "alert"
    flows: FlowTracker = field(default_factory=FlowTracker)
    alerts: int = 0
    dropped: int = 0
    passed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("alert", "drop"):
            raise ValueError(f"mode must be 'alert' or 'drop', got {self.mode!r}")

    def _verdict(self, fired: list[SnortRule], key: FiveTuple) -> tuple[IdsVerdict, list[Alert]] | None:
        """The verdict and alerts for rules that fired on a packet; None if a pass rule did."""
        if any(r.action == "pass" for r in fired):
            self.passed += 1
            return None
        alerts = []
        verdict = IdsVerdict.PASS
        for r in fired:
            r.hits += 1
            alerts.append(Alert(r.sid, r.rev, r.msg, r.action, tuple(key), r.classtype, r.priority, r.gid))
            if self.mode == "drop" and r.action in ("drop", "reject"):
                verdict = IdsVerdict.DROP
        self.alerts += len(alerts)
        if verdict is IdsVerdict.DROP:
            self.dropped += 1
        return verdict, alerts

    def inspect(self, payload: Buffer, key: FiveTuple, now: float, tcp_flags: int = 0) -> tuple[IdsVerdict, list[Alert]]:
        """The verdict and alerts for one packet's payload (L4 payload for TCP, UDP and ICMP, the
        IP payload for other protocols)."""
        to_server, established = self.flows.observe(key, now, tcp_flags)
        fired = self.signatures.match(payload, key, to_server, established)
        if not fired:
            return IdsVerdict.PASS, []
        return self._verdict(fired, key) or (IdsVerdict.PASS, [])

    def inspect_batch(self, payloads: Sequence[bytes], keys: Sequence[FiveTuple], now: float,
                      tcp_flags: Sequence[int] | None = None) -> list[tuple[int, IdsVerdict, list[Alert]]]:
        """`inspect` for a batch: (packet index, verdict, alerts) for each packet that fired.

        The flow tracker is fed only when some rule has `flow:` options; otherwise its state
        would never be read."""
        flow = None
        if self.signatures.uses_flow:
            observe = self.flows.observe
            fl = tcp_flags if tcp_flags is not None else [0] * len(keys)
            flow = [observe(k, now, f) for k, f in zip(keys, fl)]
        out = []
        for p, fired in self.signatures.match_batch(payloads, keys, flow):
            v = self._verdict(fired, keys[p])
            if v is not None:
                out.append((p, v[0], v[1]))
        return out

    def counters(self) -> dict[int | tuple[int, int], int]:
        """Hits per sid; per (gid, sid) for rules whose gid is not 1."""
        return {(r.sid if r.gid == 1 else (r.gid, r.sid)): r.hits for r in self.signatures.rules}


def parse_rules(text: str, source: str = "<rules>", variables: Mapping[str, str] | None = None) -> list[SnortRule]:
    """The rules of one rules file (one rule per line, `#` comments, trailing backslash continues
    a line), checked for duplicate (gid, sid) but not compiled. Lines end at "\\n" only (a "\\r"
    before it is dropped): form feeds, U+0085 or U+2028 are not line breaks, as in Snort."""
    rules: list[SnortRule] = []
    pending, start = "", 0
    for n, raw in enumerate(text.split("\n"), 1):
        s = raw.strip(_WS)
        if not pending and (not s or s.startswith("#")):
            continue
        if not pending:
            start = n
        if s.endswith("\\"):
            pending += s[:-1] + " "
            continue
        rules.append(parse_rule(pending + s, start, source, variables))
        pending = ""
    if pending:
        raise SnortSyntaxError(source, start, "rule continues past the end of the file", "remove the last backslash")
    _check_sids(rules)
    return rules


def _check_sids(rules: list[SnortRule]) -> None:
    """Every (gid, sid) once; an error names the line of the second use and where the first is."""
    seen: dict[tuple[int, int], SnortRule] = {}
    for r in rules:
        k = (r.gid, r.sid)
        prev = seen.get(k)
        if prev is not None:
            what = f"sid {r.sid}" if r.gid == 1 else f"gid:sid {r.gid}:{r.sid}"
            at = f"line {prev.line}" if prev.source == r.source else f"{prev.source}:{prev.line}"
            raise SnortSyntaxError(r.source, r.line, f"{what} is also used on {at}", "give every rule its own sid")
        seen[k] = r


def load(texts: Iterable[tuple[str, str]], variables: Mapping[str, str] | None = None,
         engine: str = "auto") -> SignatureSet:
    """Parse several (source name, text) rule files into one set, matched with `engine`
    (one of `ENGINES`). A (gid, sid) used in two files is an error naming both."""
    rules: list[SnortRule] = []
    for source, text in texts:
        rules += parse_rules(text, source, variables)
    return SignatureSet(rules, engine)
