"""Functions by name, through the entry-point group `shmfabric.functions`.

A third party adds a function with a pip install: its package declares
    [project.entry-points."shmfabric.functions"]
    myfunc = "mypkg.module:MyFunction"
"""
from __future__ import annotations

import difflib
import importlib
import sys
from importlib.metadata import entry_points

GROUP = "shmfabric.functions"

# Built-ins are also found without package metadata (a source checkout run in place).
_BUILTIN = {
    "generator": "shmfabric.functions.builtin.generator:Generator",
    "sink": "shmfabric.functions.builtin.sink:Sink",
    "firewall": "shmfabric.functions.builtin.firewall:FirewallFunction",
    "ids": "shmfabric.functions.builtin.ids:IdsFunction",
    "l4lb": "shmfabric.functions.builtin.l4lb:L4LoadBalancer",
    "ratelimit": "shmfabric.functions.builtin.ratelimit:RateLimiter",
    "monitor": "shmfabric.functions.builtin.monitor:Monitor",
    "compress": "shmfabric.functions.builtin.tunnel:Compress",
    "encrypt": "shmfabric.functions.builtin.tunnel:Encrypt",
}


class UnknownFunctionError(LookupError):
    """No function of that name is installed."""


# The entry-point scan reads every installed distribution's metadata (milliseconds each call: a
# config of 800 nodes spent most of its load time here). It is cached, keyed by `sys.path`: a
# changed path (a plugin directory added) rescans; `invalidate()` forces a rescan (after a pip
# install in a running process). A name not found rescans once before it is reported unknown.
_cache: tuple[tuple[str, ...], dict[str, str]] | None = None


def invalidate() -> None:
    """Forget the cached entry-point scan: the next lookup reads the installed packages again."""
    global _cache
    _cache = None
    importlib.invalidate_caches()


def available() -> dict[str, str]:
    """name -> 'module:Class' of every installed function."""
    global _cache
    key = tuple(sys.path)
    if _cache is None or _cache[0] != key:
        found = dict(_BUILTIN)
        for ep in entry_points(group=GROUP):
            found[ep.name] = ep.value
        _cache = (key, dict(sorted(found.items())))
    return dict(_cache[1])


def load(name: str) -> type:
    """The class of function `name`; UnknownFunctionError names the installed ones."""
    funcs = available()
    spec = funcs.get(name)
    if spec is None:
        invalidate()  # installed since the scan was cached?
        funcs = available()
        spec = funcs.get(name)
    if spec is None:
        close = difflib.get_close_matches(name, funcs, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownFunctionError(f"no network function named {name!r}{hint}; installed: {', '.join(funcs)}")
    mod_name, _, attr = spec.partition(":")

    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise UnknownFunctionError(f"function {name!r} is registered as {spec} but cannot be imported: {e}") from None
    return getattr(mod, attr)
