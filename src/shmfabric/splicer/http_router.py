"""Routing of HTTP requests to backend groups by path prefix, path regex and Host.

Pure: a `Router` maps (host, target) to a group object chosen by the caller (the shell passes
`BackendGroup`s from `http_pool`). Rules are tried in order; the first match wins; `default`
takes the rest; None means "no route" (the shell answers 404).

Path regexes run on RE2 (`google-re2`), not Python's `re`: a route is matched on the event loop,
for every client of the worker, and a backtracking engine takes exponential time on patterns such
as `^/(a|a)+$` (27 characters of path stalled a worker 14 s). RE2 takes time linear in the path
and refuses what needs backtracking (backreferences, lookaround, atomic groups, possessive
quantifiers): `compile_route_regex` says which, when the configuration is loaded.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Generic, Sequence, TypeVar

import re2

__all__ = ["Rule", "Router", "compile_route_regex", "request_path", "normalize_host"]

# What Python's re accepts and RE2 refuses, from RE2's error text, in words.
_GROUPS = {"(?=": "lookahead (?=...)", "(?!": "negative lookahead (?!...)", "(?<=": "lookbehind (?<=...)",
           "(?<!": "negative lookbehind (?<!...)", "(?P": "a named backreference (?P=name)",
           "(?>": "an atomic group (?>...)", "(?(": "a conditional group (?(...)...)", "(?#": "a comment (?#...)"}


def _unsupported(why: str) -> str:
    """RE2's error `why` for a pattern Python's re compiles, as what the pattern uses."""
    head, _, what = why.partition(": ")
    if head == "invalid perl operator":
        return _GROUPS.get(what, f"the group or flag {what}")
    if head == "bad repetition operator":
        return f"a possessive quantifier ({what})"
    if head == "invalid escape sequence":
        if what[1:].isdigit():
            return f"a backreference ({what})"
        if what == "\\Z":
            return "\\Z (write \\z for the end of the path)"
        return f"the escape {what}"
    if head == "invalid repetition size":
        return f"a repeat count above 1000 ({what})"
    return why


# Python reads `x{,3}` as x{0,3}; RE2 reads it as the literal text "x{,3}", with no error: the
# route would quietly stop matching, so it is refused.
_OPEN_MIN = re.compile(r"(?<!\\)\{,\d*\}")


def _options() -> Any:
    opts = re2.Options()
    opts.encoding = re2.Options.Encoding.LATIN1  # bytes are characters, as with a bytes `re` pattern
    opts.log_errors = False  # the error goes into our one-line message, not onto stderr
    return opts


def compile_route_regex(pattern: str) -> Any:
    """The compiled RE2 pattern of a route's `regex` (searched in the path, as `re.search` would:
    unanchored unless it says ^ or $). ValueError with a one-line reason (what RE2 does not
    support, and the fix) when RE2 cannot take it."""
    if _OPEN_MIN.search(pattern):
        raise ValueError(f"regex {pattern!r} uses {{,N}}, which RE2 (the route matcher) reads as literal text; "
                         "fix: write {0,N}")
    try:
        return re2.compile(pattern.encode("utf-8"), options=_options())
    except re2.error as exc:
        why = exc.args[0] if exc.args else str(exc)
        why = why.decode("utf-8", "replace") if isinstance(why, bytes) else str(why)
    try:
        re.compile(pattern.encode("utf-8"))
    except re.error as exc:
        raise ValueError(f"regex {pattern!r} does not compile: {exc}; fix the pattern (RE2 syntax)") from None
    raise ValueError(f"regex {pattern!r} uses {_unsupported(why)}, which route regexes do not support (they run on RE2, "
                     "in time linear in the path: no backreferences or lookaround); fix: rewrite the pattern "
                     "without it, or split it into several routes") from None

G = TypeVar("G")


def request_path(target: bytes) -> bytes:
    """The path of a request target (origin-form or absolute-form), without the query."""
    if not target.startswith(b"/"):
        if target == b"*":
            return b"*"
        # absolute-form http://host/path?q (RFC 9112 section 3.2.2)
        scheme_end = target.find(b"://")
        if scheme_end >= 0:
            slash = target.find(b"/", scheme_end + 3)
            target = target[slash:] if slash >= 0 else b"/"
    q = target.find(b"?")
    return target[:q] if q >= 0 else target


def normalize_host(host: bytes) -> bytes:
    """Lower-case host without the port and without one trailing dot (IPv6 literals keep their
    brackets): `EXAMPLE.com.:80`, `example.com.` and `example.com` all give `example.com`.

    Names are case-insensitive (RFC 4343) and a trailing dot only roots the name in DNS (RFC 1034
    section 3.1), so a client writing it must not reach another route. Only one dot goes:
    `example.com..` is no name and matches no host rule.
    """
    host = host.strip().lower()
    if host.startswith(b"["):
        end = host.find(b"]")
        return host[: end + 1] if end >= 0 else host
    colon = host.rfind(b":")
    if colon >= 0:
        host = host[:colon]
    return host[:-1] if host.endswith(b".") else host


@dataclass(frozen=True, slots=True)
class Rule(Generic[G]):
    """One routing rule: optional prefix or regex on the path, optional host pattern."""

    group: G
    prefix: bytes | None = None
    regex: Any = None  # a compiled RE2 pattern (`compile_route_regex`), searched in the path
    host: bytes | None = None  # exact, or b"*.example.com" for any sub-domain

    def matches(self, host: bytes, path: bytes) -> bool:
        if self.host is not None:
            h = self.host
            if h.startswith(b"*."):
                if not (host.endswith(h[1:]) and len(host) > len(h) - 1):
                    return False
            elif host != h:
                return False
        if self.prefix is not None:
            p = self.prefix
            if not path.startswith(p):
                return False
            # "/api" matches "/api" and "/api/x" but not "/apix"
            if len(path) > len(p) and not p.endswith(b"/") and path[len(p)] != 0x2F:
                return False
        if self.regex is not None and self.regex.search(path) is None:
            return False
        return True


class Router(Generic[G]):
    """First-match routing table."""

    def __init__(self, rules: Sequence[Rule[G]], default: G | None = None) -> None:
        self.rules = list(rules)
        self.default = default
        self._any_host = any(r.host is not None for r in self.rules)
        # A route decision depends only on (host, path); pipelines repeat a few paths, so a
        # small cache skips the rule walk. Bounded so hostile paths cannot grow it.
        self._cache: dict[tuple[bytes, bytes], G | None] = {}

    @staticmethod
    def from_config(routes: Sequence[tuple[str | None, str | None, str | None, G]], default: G | None) -> "Router[G]":
        """Build from (prefix, regex, host, group) tuples as given in the config."""
        rules = [Rule(group=g, prefix=p.encode() if p else None,
                      regex=compile_route_regex(r) if r else None,
                      host=normalize_host(h.encode()) if h else None) for p, r, h, g in routes]
        return Router(rules, default)

    def match(self, host: bytes, target: bytes) -> G | None:
        """The group for a request, or None when no rule and no default match."""
        path = request_path(target)
        h = normalize_host(host) if self._any_host and host else b""
        key = (h, path)
        cache = self._cache
        try:
            return cache[key]
        except KeyError:
            pass
        found = self.default
        for rule in self.rules:
            if rule.matches(h, path):
                found = rule.group
                break
        if len(cache) >= 4096:
            cache.clear()
        cache[key] = found
        return found
