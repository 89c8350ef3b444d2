"""Read a twemproxy (nutcracker) YAML config as a Redis splicer config: drop-in migration.

    shmfabric splice redis --twemproxy /etc/nutcracker.yml [--twemproxy-pool NAME]

A nutcracker.yml maps pool names to pools. One pool becomes one splicer: its `listen`,
`servers` (``host:port:weight [name]``), `hash`, `hash_tag` and `distribution` are taken as
they are, so every key stays on the server twemproxy put it on (`redis_ketama` reproduces
twemproxy's placement). The other directives map to their nearest splicer field:

==========================  ====================================================================
twemproxy                   splicer
==========================  ====================================================================
timeout (ms)                timeouts.request (s) and health.timeout; unset in twemproxy means
                            "wait forever", so the splicer's default (30 s) stays
server_connections          pool.max (connections per server; twemproxy's default is 1)
preconnect                  pool.min = pool.max when true, else 0 (open on first use)
auto_eject_hosts            auto_eject, with health.mode passive: as in twemproxy, no health
                            check while a server is up; it is ejected by failures of live
                            requests (connects refused or timed out, connections lost, requests
                            past the timeout), never by a check that a busy server is slow to
                            answer
server_failure_limit        health.fall (failures in a row that eject; twemproxy's default 2)
server_retry_timeout (ms)   health.interval (s): an ejected server is checked this long after
                            its ejection, and rejoins on one passing check (health.rise 1);
                            twemproxy's default 30 s
redis_auth                  password (clients AUTH) and backend_password (sent to servers),
                            which is what twemproxy does with it
redis_db                    db; with redis_auth too, refused unless the caller says which db
                            (`db=`): nutcracker 0.5 sends SELECT before AUTH, so its keys are in
                            db 0 when the servers require the password and in redis_db when not
backlog, client_connections,
tcpkeepalive                accepted and not applied (listed in `notes`)
==========================  ====================================================================

What cannot carry over is refused with the reason: memcached pools (`redis: false`, which is
twemproxy's default), UNIX socket addresses and `distribution: random` (it scatters one key's
commands over servers). Every twemproxy hash is offered.

Pure: `from_twemproxy` takes the parsed YAML and returns a dict for `RedisSpliceConfig`;
`load_twemproxy` reads the file.
"""
from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

from .config import ConfigError, parse_server_line, read_yaml, split_address

__all__ = ["from_twemproxy", "load_twemproxy"]

# Every directive twemproxy 0.5 knows (nc_conf.c conf_commands); others are errors there too.
_KNOWN = {
    "listen", "hash", "hash_tag", "distribution", "timeout", "backlog", "client_connections", "redis",
    "tcpkeepalive", "redis_auth", "redis_db", "preconnect", "auto_eject_hosts", "server_connections",
    "server_retry_timeout", "server_failure_limit", "servers",
}
_NOT_APPLIED = ("backlog", "client_connections", "tcpkeepalive")
_HASHES = ("one_at_a_time", "md5", "crc16", "crc32", "crc32a", "fnv1_64", "fnv1a_64", "fnv1_32", "fnv1a_32",
           "hsieh", "murmur", "jenkins")  # nc_hashkit.h's HASH_CODEC
_DEFAULT_RETRY_MS = 30000  # twemproxy's server_retry_timeout when unset
_DEFAULT_FAILURE_LIMIT = 2  # twemproxy's server_failure_limit when unset
_DEFAULT_REQUEST_S = 30.0  # the splicer's own request timeout (twemproxy's unset `timeout` waits forever)


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def from_twemproxy(doc: Any, pool: str | None = None, source: str = "twemproxy config",
                   db: int | None = None) -> tuple[dict[str, Any], list[str]]:
    """(splicer `redis:` fields, notes) for one pool of a parsed nutcracker.yml.

    `pool` names the pool; it may be left out when the file holds exactly one. `db`, when given,
    is the database used instead of the pool's `redis_db` (needed for a pool with both
    `redis_auth` and a non-zero `redis_db`, which is refused without it: see the module
    docstring). Raises `ConfigError` naming the file, the pool and the directive, with a fix.
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
    listen = str(cp["listen"]).strip()
    if listen.startswith("/"):
        raise ConfigError(f"{where}: `listen: {listen}` is a UNIX socket; the splicer listens on TCP; "
                          "fix: give HOST:PORT")
    # nutcracker splits at the last colon, so a bare IPv6 address (`::1:22121`) is its form.
    host, sep, port = listen.rpartition(":")
    if sep and ":" in host and not host.startswith("["):
        listen = f"[{host}]:{port}"
    try:
        bound, _ = split_address(listen, allow_zero=True)
        if listen.startswith("[") and not _is_ipv6(bound):
            raise ValueError(f"{bound!r} is not an IPv6 address")
    except ValueError as exc:
        raise ConfigError(f"{where}: `listen: {cp['listen']}`: {exc}; fix: write HOST:PORT "
                          "(e.g. 127.0.0.1:22121, or ::1:22121 for IPv6)") from None
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
        if h not in _HASHES:
            raise ConfigError(f"{where}: `hash: {h}` is not a twemproxy hash; fix: use one of {', '.join(_HASHES)} "
                              "(twemproxy refuses it too)")
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
    request = _DEFAULT_REQUEST_S
    if "timeout" in cp:
        ms = need("timeout", int, "milliseconds (an integer)")
        if ms:
            request = ms / 1000
            out["timeouts"] = {"request": request}
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
    # twemproxy checks nothing: a server leaves the pool when live requests to it fail
    # server_failure_limit times in a row (a reply restarts the count) and comes back
    # server_retry_timeout after that. Active checks ejected a server that was only busy (a
    # BGSAVE fork, a slow script) and kept it out a second interval (rise 2): its keys were
    # written elsewhere and read back stale when it returned. The one check here is the one that
    # brings an ejected server back, with as much patience as a request.
    fall = _DEFAULT_FAILURE_LIMIT
    if "server_failure_limit" in cp:
        # twemproxy ejects when failures reach the limit, so 0 acts as 1.
        fall = max(1, need("server_failure_limit", int, "a positive integer"))
    retry_ms = _DEFAULT_RETRY_MS
    if "server_retry_timeout" in cp:
        retry_ms = max(1, need("server_retry_timeout", int, "milliseconds (an integer)"))
    out["health"] = {"mode": "passive", "fall": fall, "rise": 1, "interval": retry_ms / 1000, "timeout": request}
    if "redis_auth" in cp:
        password = need("redis_auth", str, "a password")
        if not password:
            raise ConfigError(f"{where}: `redis_auth` is empty; fix: give the password, or remove the line")
        out["password"] = out["backend_password"] = password
    if "redis_db" in cp:
        out["db"] = need("redis_db", int, "a database number")
        if out["db"] and "redis_auth" in cp and db is None:
            # Seen with nutcracker 0.5: it sends SELECT when it connects and AUTH before the first
            # request, so a server that requires the password refuses the SELECT (NOAUTH) and
            # every key lands in db 0; a server without a password takes the SELECT (and refuses
            # the AUTH). Where the keys are depends on the servers, which a config cannot tell,
            # and the splicer authenticates first: refused rather than started on an empty db.
            n = out["db"]
            raise ConfigError(
                f"{where}: `redis_auth` with `redis_db: {n}`: nutcracker sends SELECT {n} before AUTH on each "
                f"server connection, so if the servers require the password its SELECT failed (NOAUTH) and "
                f"every key it stored is in db 0, not db {n}; if they do not, the keys are in db {n}. The "
                f"splicer authenticates first and would use db {n}. Check a server with `redis-cli -a PASSWORD "
                f"info keyspace`; fix: keys in db 0 (servers with requirepass): `--twemproxy-db 0`, or remove "
                f"`redis_db` from the pool (nothing changes for nutcracker: its SELECT failed anyway); keys in "
                f"db {n}: `--twemproxy-db {n}`")
    if db is not None:
        out["db"] = db
    for key in _NOT_APPLIED:
        if key in cp:
            notes.append(f"{where}: `{key}` is accepted and not applied (the splicer has no equivalent)")
    return out, notes


def load_twemproxy(path: str | Path, pool: str | None = None, db: int | None = None) -> tuple[dict[str, Any], list[str]]:
    """Read a nutcracker.yml and convert one pool (see `from_twemproxy`)."""
    return from_twemproxy(read_yaml(path, strings=True), pool, str(path), db)
