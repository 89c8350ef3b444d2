"""Functions by name, through the entry-point group `shmfabric.functions`.

A third party adds a function with a pip install: its package declares
    [project.entry-points."shmfabric.functions"]
    myfunc = "mypkg.module:MyFunction"

A plugin never replaces a built-in: an entry point named like one (`firewall`) that points
elsewhere is ignored, with a warning naming its distribution. Two distributions declaring one name
for different classes are both refused when that name is loaded (the error names both), rather
than one winning by the order the packages happen to be scanned in. A plugin that cannot be
imported, names a class its module does not have, or is not a function class, is one
`PluginError` line naming the distribution and the entry point (exit status 2 from `run`).
"""
from __future__ import annotations

import difflib
import importlib
import sys
import warnings
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
    "router": "shmfabric.functions.builtin.router:Router",
}
BUILTIN_OWNER = "shmfabric (built-in)"


class UnknownFunctionError(LookupError):
    """No function of that name is installed."""


class PluginError(UnknownFunctionError):
    """A function is installed under that name but cannot be used: its module does not import, it
    names a class the module does not have, it is not a function class, or two distributions
    declare the name. One line naming the distribution(s) and the entry point."""


# The entry-point scan reads every installed distribution's metadata (milliseconds each call: a
# config of 800 nodes spent most of its load time here). It is cached, keyed by `sys.path`: a
# changed path (a plugin directory added) rescans; `invalidate()` forces a rescan (after a pip
# install in a running process). A name not found rescans once before it is reported unknown.
# The cache: (sys.path, name -> 'module:Class', name -> owner text, name -> conflict text,
# warnings about plugins ignored for shadowing a built-in).
_cache: tuple[tuple[str, ...], dict[str, str], dict[str, str], dict[str, str], list[str]] | None = None
_warned: set[str] = set()
_origins: dict[int, str] = {}  # id(class) -> "entry point NAME = VALUE of distribution D V"


def invalidate() -> None:
    """Forget the cached entry-point scan: the next lookup reads the installed packages again."""
    global _cache
    _cache = None
    importlib.invalidate_caches()


def _owner(ep: object) -> str:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "an unknown distribution"
    try:
        name, version = dist.name, dist.version
    except Exception:  # broken metadata
        return "an unknown distribution"
    return f"{name} {version}" if version else str(name)


def _scan() -> tuple[tuple[str, ...], dict[str, str], dict[str, str], dict[str, str], list[str]]:
    global _cache
    key = tuple(sys.path)
    if _cache is not None and _cache[0] == key:
        return _cache
    found = dict(_BUILTIN)
    owners = {name: BUILTIN_OWNER for name in _BUILTIN}
    declared: dict[str, dict[str, str]] = {}  # plugin name -> {value: owner}
    shadows: list[str] = []
    for ep in entry_points(group=GROUP):
        name, value, owner = ep.name, ep.value, _owner(ep)
        if name in _BUILTIN:
            if value != _BUILTIN[name]:  # shmfabric's own metadata names the built-ins themselves
                shadows.append(f"entry point {name} = {value} of distribution {owner} is ignored: {name!r} is a "
                               f"built-in function and a plugin cannot replace it; rename the plugin's entry point")
            continue
        declared.setdefault(name, {}).setdefault(value, owner)
    conflicts: dict[str, str] = {}
    for name, values in declared.items():
        if len(values) > 1:  # whichever was scanned last would win: neither does
            conflicts[name] = ", ".join(sorted(f"{name} = {v} of distribution {o}" for v, o in values.items()))
            continue
        (value, owner), = values.items()
        found[name], owners[name] = value, owner
    _cache = (key, dict(sorted(found.items())), owners, conflicts, sorted(shadows))
    return _cache


def available() -> dict[str, str]:
    """name -> 'module:Class' of every installed function."""
    return dict(_scan()[1])


def problems() -> list[str]:
    """What is wrong with the installed plugins: entry points ignored because they name a
    built-in, and names two distributions declare. Empty when all is well."""
    _, _, _, conflicts, shadows = _scan()
    return list(shadows) + [f"function name declared by more than one distribution: {c}" for c in conflicts.values()]


def origin(cls: type) -> str | None:
    """Where a class `load` returned comes from ("entry point NAME = VALUE of distribution D V"),
    for error messages; None for a class `load` did not return."""
    return _origins.get(id(cls))


def load(name: str) -> type:
    """The class of function `name`; UnknownFunctionError names the installed ones, PluginError
    (a subclass) says what is wrong with an installed one, naming its distribution."""
    _, funcs, owners, conflicts, shadows = _scan()
    spec = funcs.get(name)
    if spec is None and name not in conflicts:
        invalidate()  # installed since the scan was cached?
        _, funcs, owners, conflicts, shadows = _scan()
        spec = funcs.get(name)
    for text in shadows:  # once per process: the built-in runs, the operator hears why not the plugin
        if text.startswith(f"entry point {name} = ") and text not in _warned:
            _warned.add(text)
            warnings.warn(f"shmfabric: {text}", RuntimeWarning, stacklevel=2)
    if name in conflicts:
        raise PluginError(f"function {name!r} is declared by more than one distribution ({conflicts[name]}); "
                          f"uninstall one of them or rename its entry point")
    if spec is None:
        close = difflib.get_close_matches(name, funcs, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownFunctionError(f"no network function named {name!r}{hint}; installed: {', '.join(funcs)}")
    where = f"entry point {name} = {spec} of distribution {owners.get(name, 'an unknown distribution')}"
    mod_name, _, attr = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:  # ImportError, or whatever the module raises while it runs
        raise PluginError(f"function {name!r} ({where}) cannot be imported: {type(e).__name__}: {e}") from None
    cls: object = mod
    try:
        for part in attr.split(".") if attr else []:
            cls = getattr(cls, part)
    except AttributeError:
        raise PluginError(f"function {name!r} ({where}): module {mod_name!r} has no {attr!r}") from None
    except Exception as e:  # a module __getattr__ that raises
        raise PluginError(f"function {name!r} ({where}): {attr!r} cannot be read: {type(e).__name__}: {e}") from None
    if not attr or not isinstance(cls, type):
        raise PluginError(f"function {name!r} ({where}) is not a class: it names a {type(cls).__name__}")
    config = getattr(cls, "Config", None)
    if not (isinstance(config, type) and callable(getattr(config, "model_validate", None))):
        raise PluginError(f"function {name!r} ({where}): the class has no pydantic `Config` model "
                          f"(a BaseModel subclass, as the built-ins have)")
    if not callable(getattr(cls, "process", None)) and not callable(getattr(cls, "produce", None)):
        raise PluginError(f"function {name!r} ({where}): the class has neither process() nor produce()")
    if cls.__module__ != "shmfabric.functions.builtin" and not cls.__module__.startswith("shmfabric.functions.builtin."):
        _origins[id(cls)] = where
    return cls
