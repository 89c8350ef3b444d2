"""Routing of HTTP requests to backend groups by path prefix, path regex and Host.

Pure: a `Router` maps (host, target) to a group object chosen by the caller (the shell passes
`BackendGroup`s from `http_pool`). Rules are tried in order; the first match wins; `default`
takes the rest; None means "no route" (the shell answers 404).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Generic, Sequence, TypeVar

__all__ = ["Rule", "Router", "request_path", "normalize_host"]

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
    regex: "re.Pattern[bytes] | None" = None
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
                      regex=re.compile(r.encode()) if r else None,
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
