"""Functions by name, through the entry-point group `shmfabric.functions`.

A third party adds a function with a pip install: its package declares
    [project.entry-points."shmfabric.functions"]
    myfunc = "mypkg.module:MyFunction"
"""
from __future__ import annotations

import difflib
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


def available() -> dict[str, str]:
    """name -> 'module:Class' of every installed function."""
    found = dict(_BUILTIN)
    for ep in entry_points(group=GROUP):
        found[ep.name] = ep.value
    return dict(sorted(found.items()))


def load(name: str) -> type:
    """The class of function `name`; UnknownFunctionError names the installed ones."""
    spec = available().get(name)
    if spec is None:
        close = difflib.get_close_matches(name, available(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownFunctionError(f"no network function named {name!r}{hint}; installed: {', '.join(available())}")
    mod_name, _, attr = spec.partition(":")
    import importlib

    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise UnknownFunctionError(f"function {name!r} is registered as {spec} but cannot be imported: {e}") from None
    return getattr(mod, attr)
