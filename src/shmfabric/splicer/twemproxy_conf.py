"""Read a twemproxy (nutcracker) YAML config as a Redis splicer config: drop-in migration.

    shmfabric splice redis --twemproxy /etc/nutcracker.yml [--twemproxy-pool NAME]

A nutcracker.yml maps pool names to pools. One pool becomes one splicer: its `listen`,
`servers` (``host:port:weight [name]``), `hash`, `hash_tag` and `distribution` are taken as
they are, so every key stays on the server twemproxy put it on (`redis_ketama` reproduces
twemproxy's placement). The other directives map to their nearest splicer field:

==========================  ====================================================================
twemproxy                   splicer
==========================  ====================================================================
timeout (ms)                timeouts.request (s); unset in twemproxy means "wait forever", so
                            the splicer's default (30 s) stays
server_connections          pool.max (connections per server; twemproxy's default is 1)
preconnect                  pool.min = pool.max when true, else 0 (open on first use)
auto_eject_hosts            auto_eject
server_failure_limit        health.fall (consecutive failed checks before a server is down)
server_retry_timeout (ms)   health.interval (s): how soon a down server is tried again
redis_auth                  password (clients AUTH) and backend_password (sent to servers),
                            which is what twemproxy does with it
redis_db                    db
backlog, client_connections,
tcpkeepalive                accepted and not applied (listed in `notes`)
==========================  ====================================================================

What cannot carry over is refused with the reason: memcached pools (`redis: false`, which is
twemproxy's default), UNIX socket addresses, the hashes the splicer lacks (crc16, hsieh,
jenkins) and `distribution: random` (it scatters one key's commands over servers).

Pure: `from_twemproxy` takes the parsed YAML and returns a dict for `RedisSpliceConfig`;
`load_twemproxy` reads the file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import ConfigError, parse_server_line, read_yaml

__all__ = ["from_twemproxy", "load_twemproxy"]

# Every directive twemproxy 0.5 knows (nc_conf.c conf_commands); others are errors there too.
_KNOWN = {
    "listen", "hash", "hash_tag", "distribution", "timeout", "backlog", "client_connections", "redis",
    "tcpkeepalive", "redis_auth", "redis_db", "preconnect", "auto_eject_hosts", "server_connections",
    "server_retry_timeout", "server_failure_limit", "servers",
}
_NOT_APPLIED = ("backlog", "client_connections", "tcpkeepalive")
_MISSING_HASHES = ("crc16", "hsieh", "jenkins")


def from_twemproxy(doc: Any, pool: str | None = None, source: str = "twemproxy config") -> tuple[dict[str, Any], list[str]]:
    """(splicer `redis:` fields, notes) for one pool of a parsed nutcracker.yml.

    `pool` names the pool; it may be left out when the file holds exactly one. Raises
    `ConfigError` naming the file, the pool and the directive, with a fix.
    """
    if not isinstance(doc, dict) or not doc:
        raise ConfigError(f"{source}: expected pools at the top level (`name: {{listen: ..., servers: [...]}}`)")
    names = [str(n) for n in doc]
    if pool is None:
        if len(doc) > 1:
            raise ConfigError(f"{source}: the file has {len(doc)} pools ({', '.join(names)}); "
                              "fix: choose one with --twemproxy-pool NAME (one splicer serves one pool)")
        pool = names[0]
    if pool not in names:
        raise ConfigError(f"{source}: no pool {pool!r}; the file has {', '.join(names)}")
    cp = doc[next(k for k in doc if str(k) == pool)]
    where = f"{source}: pool {pool}"
    if not isinstance(cp, dict):
        raise ConfigError(f"{where}: expected directives (`listen:`, `servers:` ...), got {type(cp).__name__}")
    unknown = sorted(str(k) for k in cp if k not in _KNOWN)
    if unknown:
        raise ConfigError(f"{where}: unknown directive {', '.join(unknown)}; fix: remove it (twemproxy refuses it too)")

    def need(key: str, kind: type, what: str) -> Any:
        # `load_twemproxy` reads every scalar as the string written, as nutcracker does (its
        # nc_atoi takes decimal digits, its booleans are `true` and `false`); a document parsed
        # with YAML types (tests, library callers) is taken too.
        value = cp[key]
        if kind is int:
            if isinstance(value, str) and value.isascii() and value.isdigit():
                return int(value, 10)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif kind is bool:
            if value in ("true", "false"):
                return value == "true"
            if isinstance(value, bool):
                return value
        elif isinstance(value, kind):
            return value
        raise ConfigError(f"{where}: `{key}` must be {what}, got {value!r}")

    if not (need("redis", bool, "true or false") if "redis" in cp else False):
        raise ConfigError(f"{where}: it is a memcached pool (`redis: true` is not set; twemproxy's default is "
                          "memcached); the splicer speaks Redis only; fix: add `redis: true` if the servers are Redis")
    if "listen" not in cp:
        raise ConfigError(f"{where}: `listen` is missing; fix: add `listen: HOST:PORT`")
    listen = str(cp["listen"])
    if listen.startswith("/"):
        raise ConfigError(f"{where}: `listen: {listen}` is a UNIX socket; the splicer listens on TCP; "
                          "fix: give HOST:PORT")
    servers = cp.get("servers")
    if not isinstance(servers, list) or not servers:
        raise ConfigError(f"{where}: `servers` must be a non-empty list of `host:port:weight [name]`")
    for i, line in enumerate(servers):
        if not isinstance(line, str) or line.startswith("/"):
            raise ConfigError(f"{where}: servers[{i}] {line!r}: only `host:port:weight [name]` TCP servers are "
                              "supported (UNIX sockets are not)")
    out: dict[str, Any] = {"listen": listen, "servers": list(servers)}
    notes: list[str] = []
    for i, line in enumerate(servers):
        try:
            if parse_server_line(line).get("weight") is None:
                raise ValueError("twemproxy needs a weight")
        except ValueError as exc:
            raise ConfigError(f"{where}: servers[{i}] {line!r}: {exc}; fix: write `host:port:weight [name]` "
                              "(twemproxy refuses this line too)") from None
    if "hash" in cp:
        h = need("hash", str, "a hash name")
        if h in _MISSING_HASHES:
            raise ConfigError(f"{where}: `hash: {h}` is not offered by the splicer (keys would move); "
                              "it offers fnv1a_64, fnv1_64, fnv1a_32, fnv1_32, md5, murmur, crc32, crc32a, one_at_a_time")
        out["hash"] = h
    if "hash_tag" in cp:
        out["hash_tag"] = need("hash_tag", str, "two characters, e.g. \"{}\"")
    if "distribution" in cp:
        d = need("distribution", str, "ketama, modula or random")
        if d == "random":
            raise ConfigError(f"{where}: `distribution: random` sends each command of one key to any server, "
                              "so reads miss what writes stored and one key's commands lose their order; "
                              "fix: use ketama or modula")
        out["distribution"] = d
    if "timeout" in cp:
        ms = need("timeout", int, "milliseconds (an integer)")
        if ms:
            out["timeouts"] = {"request": ms / 1000}
        else:
            notes.append(f"{where}: `timeout: 0` is twemproxy's \"wait forever\"; the splicer keeps its own "
                         "request timeout (30 s; set `timeouts.request` in a splicer config to change it)")
    conns = need("server_connections", int, "a positive integer") if "server_connections" in cp else 1
    if not 1 <= conns <= 4096:
        raise ConfigError(f"{where}: `server_connections: {conns}`: the splicer keeps 1 to 4096 connections per "
                          "server; fix: use a number in that range")
    preconnect = need("preconnect", bool, "true or false") if "preconnect" in cp else False
    out["pool"] = {"max": conns, "min": conns if preconnect else 0}
    if "auto_eject_hosts" in cp:
        out["auto_eject"] = need("auto_eject_hosts", bool, "true or false")
    health: dict[str, Any] = {}
    if "server_failure_limit" in cp:
        # twemproxy ejects when failures reach the limit, so 0 acts as 1.
        health["fall"] = max(1, need("server_failure_limit", int, "a positive integer"))
    elif out.get("auto_eject"):
        health["fall"] = 2  # twemproxy's default server_failure_limit
    if "server_retry_timeout" in cp:
        health["interval"] = max(1, need("server_retry_timeout", int, "milliseconds (an integer)")) / 1000
    if health:
        out["health"] = health
    if "redis_auth" in cp:
        password = need("redis_auth", str, "a password")
        if not password:
            raise ConfigError(f"{where}: `redis_auth` is empty; fix: give the password, or remove the line")
        out["password"] = out["backend_password"] = password
    if "redis_db" in cp:
        out["db"] = need("redis_db", int, "a database number")
        if out["db"] and "redis_auth" in cp:
            # Seen with nutcracker 0.5: it sends SELECT before AUTH, the server refuses the
            # SELECT (NOAUTH), and its keys land in db 0. The splicer authenticates first.
            notes.append(f"{where}: with both `redis_auth` and `redis_db`, twemproxy 0.5 sends SELECT before "
                         f"AUTH and its SELECT fails, so what it wrote may be in db 0, not db {out['db']}; "
                         "check (`redis-cli -a ... info keyspace`) before moving clients over")
    for key in _NOT_APPLIED:
        if key in cp:
            notes.append(f"{where}: `{key}` is accepted and not applied (the splicer has no equivalent)")
    return out, notes


def load_twemproxy(path: str | Path, pool: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """Read a nutcracker.yml and convert one pool (see `from_twemproxy`)."""
    return from_twemproxy(read_yaml(path, strings=True), pool, str(path))
