"""Configuration schema of the splicer (`shmfabric splice http` and `shmfabric splice redis`).

One YAML file may hold an `http:` section, a `redis:` section, or both::

    http:
      listen: 127.0.0.1:8080
      pool: {min: 1, max: 8}
      routes:
        - prefix: /api
          backends: [127.0.0.1:9001, 127.0.0.1:9002]
        - regex: '^/img/.*\\.png$'
          host: static.example.com
          backends: [127.0.0.1:9004]
      default: [127.0.0.1:9003]
      metrics: 127.0.0.1:9100
    redis:
      listen: 127.0.0.1:6400
      servers: [127.0.0.1:6379, "127.0.0.1:6380:2 shard-b"]

`load_config(path)` returns a `SpliceFile`; every problem is raised as one `ConfigError` whose
lines name the file, the field (dotted path, list positions counted from 0) and how to fix it.
Command-line flags build the same models (`HttpSpliceConfig(...)`), so flags and files are
checked by the same rules.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "ConfigError", "split_address", "PoolConfig", "TimeoutConfig", "LimitConfig", "HealthConfig", "RedisPoolConfig",
    "RedisTimeoutConfig", "RedisLimitConfig", "RedisHealthConfig",
    "HttpRoute", "HttpSpliceConfig", "RedisServer", "RedisSpliceConfig", "SpliceFile", "load_config", "read_yaml",
    "format_validation_error", "parse_server_line", "parse_backend",
]


class ConfigError(Exception):
    """A configuration the user has to fix; the message names file, field and fix."""


_ADDR_RE = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9_.-]+)):(?P<port>\d{1,5})$")


def split_address(text: str, allow_zero: bool = False) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[V6]:PORT`` for IPv6) into host and port; ValueError if malformed.

    Port 0 ("any free port") is accepted only with `allow_zero` (listening addresses).
    """
    m = _ADDR_RE.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:9001, [::1]:9001)")
    port = int(m.group("port"))
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise ValueError(f"port {port} in {text!r} is outside 1..65535")
    return (m.group("v6") or m.group("host")), port


def public_dump(model: BaseModel) -> dict[str, Any]:
    """`model` as `model_dump()` gives it, with the value of every secret field (`repr=False`:
    passwords) set, at any depth, shown as "<redacted>": what `--check` prints, which ends up in
    terminals and CI logs."""
    out = model.model_dump()
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        if not info.repr and value is not None:
            out[name] = "<redacted>"
        elif isinstance(value, BaseModel):
            out[name] = public_dump(value)
        elif isinstance(value, list) and value and all(isinstance(v, BaseModel) for v in value):
            out[name] = [public_dump(v) for v in value]
    return out


def _check_address(value: Any, allow_zero: bool = False) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a HOST:PORT string, got {type(value).__name__}")
    split_address(value, allow_zero)
    return value.strip()


#: Largest weight of a backend in a route (HAProxy's limit is 256 too).
MAX_WEIGHT = 256


def parse_backend(text: str) -> tuple[str, int, bool]:
    """`HOST:PORT [weight=N] [backup]` (the words of an nginx `server` line) -> (address, weight,
    backup). ValueError naming the backend, what is wrong and the fix."""
    if not isinstance(text, str):
        raise ValueError(f"expected a 'HOST:PORT [weight=N] [backup]' string, got {type(text).__name__}")
    words = text.split()
    if not words:
        raise ValueError("an empty backend; fix: HOST:PORT [weight=N] [backup]")
    address, weight, backup = words[0], 1, False
    if address == "backup" or address.startswith("weight="):
        raise ValueError(f"{text!r}: {address!r} is a word of the backend before it, not a backend; fix: no comma "
                         "before it (HOST:PORT weight=N backup)")
    split_address(address)
    seen: set[str] = set()
    for word in words[1:]:
        name = word.split("=", 1)[0]
        if name in seen:
            raise ValueError(f"backend {text!r}: {name!r} is given twice; fix: give it once")
        seen.add(name)
        if word == "backup":
            backup = True
        elif word.startswith("weight="):
            value = word[len("weight="):]
            if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= MAX_WEIGHT:
                raise ValueError(f"backend {text!r}: {word!r}: the weight is a whole number from 1 to {MAX_WEIGHT} "
                                 "(e.g. weight=3)")
            weight = int(value)
        else:
            raise ValueError(f"backend {text!r}: unknown word {word!r}; fix: HOST:PORT [weight=N] [backup]")
    return address, weight, backup


def _check_backend(value: Any) -> str:
    parse_backend(value)
    return " ".join(value.split())


def _check_backends(value: Any) -> list[str]:
    """A route's backends, each checked; an address listed twice is refused (its weight says it)."""
    items = [_check_backend(x) for x in (value if isinstance(value, list) else [value])]
    addresses = [parse_backend(x)[0] for x in items]
    for a in addresses:
        if addresses.count(a) > 1:
            raise ValueError(f"backend {a} is listed twice; fix: list it once, with weight=N for a larger share")
    return items


def _check_listen(value: Any) -> Any:
    return value if value is None else _check_address(value, allow_zero=True)


class _Model(BaseModel):
    # Unknown keys are errors: a misspelt limit silently ignored is worse than a refusal.
    model_config = ConfigDict(extra="forbid", frozen=True)


# Each section has the fields both splicers use, and a subclass per splicer with its own: a
# field one splicer ignores would be accepted there and do nothing (the HTTP-only ones used to be
# in the Redis splicer's config too).


class RedisPoolConfig(_Model):
    """Pre-established connections per backend server."""

    min: int = Field(1, strict=True, ge=0, le=1024, description="connections opened at start and kept open")
    max: int = Field(8, strict=True, ge=1, le=4096, description="connections at most (requests queue beyond)")

    @model_validator(mode="after")
    def _min_le_max(self) -> "RedisPoolConfig":
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is larger than max ({self.max}); lower min or raise max")
        return self


class PoolConfig(RedisPoolConfig):
    """Pre-established connections per backend server (HTTP)."""

    pipeline: int = Field(1, strict=True, ge=1, le=64, description="requests outstanding per connection; above 1, "
                          "idempotent bodiless requests are pipelined to the backend (for servers that "
                          "pipeline well, e.g. nginx)")


class RedisTimeoutConfig(_Model):
    """Timeouts in seconds."""

    connect: float = Field(3.0, strict=True, gt=0, allow_inf_nan=False, description="opening a backend connection")
    request: float = Field(30.0, strict=True, gt=0, allow_inf_nan=False,
                           description="from dispatch to the end of the response (then 504 / -ERR)")
    drain: float = Field(30.0, strict=True, ge=0, allow_inf_nan=False,
                         description="graceful stop (SIGTERM, or SIGINT): requests already read may take this "
                                     "long to be answered before the connections still busy are cut; a second "
                                     "signal cuts at once")


class TimeoutConfig(RedisTimeoutConfig):
    """Timeouts in seconds (HTTP)."""

    client_idle: float = Field(120.0, strict=True, gt=0, allow_inf_nan=False, description="an idle client connection is closed after this")
    request_head: float = Field(30.0, strict=True, gt=0, allow_inf_nan=False,
                                description="a request head must arrive whole within this, else 408 and close "
                                            "(a head trickled a byte at a time is never idle)")
    queue: float | None = Field(None, strict=True, gt=0, allow_inf_nan=False,
                                description="a request waiting for a free pooled backend connection gets 503 after "
                                            "this (HAProxy's `timeout queue`); time it is held back by its own "
                                            "client's slow reading does not count; unset: the request timeout")


class _Limits(_Model):
    """Per-client-connection bounds (backpressure) and framing limits."""

    max_pipeline: int = Field(128, strict=True, ge=1, description="requests read ahead and not yet answered")
    max_buffer_bytes: int = Field(4 * 1024 * 1024, strict=True, ge=1024, description="response and request-body bytes held")


class LimitConfig(_Limits):
    """Per-client-connection bounds (backpressure) and framing limits (HTTP)."""

    max_head_bytes: int = Field(64 * 1024, strict=True, ge=1024, description="request line plus headers")
    max_headers: int = Field(100, strict=True, ge=1, description="header fields per message")
    max_url_bytes: int = Field(8 * 1024, strict=True, ge=16, description="request target length")


class RedisLimitConfig(_Limits):
    """Per-client-connection bounds (backpressure) and framing limits (Redis)."""

    max_pipeline: int = Field(1024, strict=True, ge=1, description="requests read ahead and not yet answered")
    max_request_bytes: int = Field(
        512 * 1024 * 1024, strict=True, ge=1024,
        description="the largest request held before it is forwarded (Redis's proto-max-bulk-len is 512 MB)")
    max_unread_bytes: int = Field(
        256 * 1024 * 1024, strict=True, ge=1024 * 1024,
        description="reply bytes a client leaves unread before it is disconnected (like Redis's "
                    "client-output-buffer-limit): replies of requests already sent can pass max_buffer_bytes")
    max_unread_pubsub_bytes: int = Field(
        32 * 1024 * 1024, strict=True, ge=1024 * 1024,
        description="pub/sub message bytes a subscriber leaves unread before it is disconnected (Redis's "
                    "client-output-buffer-limit pubsub default: 32 MB)")
    pubsub_soft_limit_bytes: int = Field(
        8 * 1024 * 1024, strict=True, ge=0,
        description="a subscriber that leaves more than this unread for pubsub_soft_limit_seconds on end is "
                    "disconnected (the soft part of Redis's default `client-output-buffer-limit pubsub 32mb 8mb 60`); "
                    "0: no soft limit")
    pubsub_soft_limit_seconds: float = Field(
        60.0, ge=0, allow_inf_nan=False,
        description="how long a subscriber may stay over pubsub_soft_limit_bytes (0: disconnected at once)")


class _HealthBase(_Model):
    """Active health checks (HAProxy's inter / rise / fall)."""

    interval: float = Field(2.0, strict=True, gt=0)
    timeout: float = Field(1.0, strict=True, gt=0)
    rise: int = Field(2, strict=True, ge=1)
    fall: int = Field(3, strict=True, ge=1)
    enabled: bool = Field(True, strict=True)


class RedisHealthConfig(_HealthBase):
    """Health of the Redis servers: active checks (HAProxy's inter / rise / fall), or twemproxy's
    way (`mode: passive`)."""

    mode: Literal["active", "passive"] = Field(
        "active", description="active: a PING every `interval` s; `fall` failures in a row (failed checks, "
        "connects and lost requests) take a server down, `rise` passing checks bring it back. passive "
        "(twemproxy's server_failure_limit / server_retry_timeout; what --twemproxy sets): no check while a "
        "server is up; with `auto_eject`, `fall` failures in a row on live traffic (a connect refused or "
        "timed out, a connection lost under requests, a request past `timeouts.request`) eject it, any reply "
        "restarts the count, and it is checked `interval` s after its ejection and every `interval` s after "
        "that until `rise` checks pass; without `auto_eject` a server is never marked down")


class HealthConfig(_HealthBase):
    """Active health checks (HAProxy's inter / rise / fall), and the HTTP splicer's passive one
    (HAProxy's `observe layer7` with `error-limit` / `on-error mark-down`)."""

    path: str | None = Field(None, description="GET this path and want 2xx/3xx; unset: TCP connect only")
    eject_after: int = Field(5, strict=True, ge=0, description="a server whose last N "
                             "requests in a row failed on live traffic (connection closed or reset before a "
                             "complete response, a malformed response, the request timeout) leaves rotation "
                             "as a failed check would take it out, and comes back after `rise` passing checks, "
                             "the first one `interval` seconds later at the earliest; any complete response, "
                             "whatever its status, restarts the count; 0: off")

    @field_validator("path")
    @classmethod
    def _path_is_a_target(cls, v: str | None) -> str | None:
        # Sent as the request target as it is: without the slash every check got a 400 and
        # every server stayed down, with nothing said.
        if v is not None and (not v.startswith("/") or any(c in v for c in " \t\r\n")):
            raise ValueError(f"path {v!r} must start with '/' and hold no spaces (e.g. /healthz)")
        return v


class HttpRoute(_Model):
    """One routing rule; the first rule that matches a request wins."""

    prefix: str | None = None
    regex: str | None = None
    host: str | None = Field(None, description="exact host, or *.example.com; port ignored")
    backends: list[str] = Field(min_length=1)

    _addr = field_validator("backends", mode="before")(_check_backends)

    @field_validator("prefix")
    @classmethod
    def _prefix_slash(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("/"):
            raise ValueError(f"prefix {v!r} must start with '/' (e.g. /api)")
        return v

    @field_validator("regex")
    @classmethod
    def _regex_compiles(cls, v: str | None) -> str | None:
        if v is not None:
            # Compiled as the router will (RE2, linear time): what it cannot take is refused at
            # load, by --check and by a reload, not by each worker as it starts.
            from .http_router import compile_route_regex

            compile_route_regex(v)  # ValueError: what RE2 does not support, and the fix
        return v

    @model_validator(mode="after")
    def _one_matcher(self) -> "HttpRoute":
        if self.prefix is not None and self.regex is not None:
            raise ValueError("give either prefix or regex, not both")
        if self.prefix is None and self.regex is None and self.host is None:
            raise ValueError("a route needs prefix, regex or host (use `default` for a catch-all)")
        return self


class TlsConfig(_Model):
    """`tls:` of `splice http`: terminate TLS on the listening port."""

    cert: str = Field(min_length=1, description="PEM file: the certificate, then any intermediates")
    key: str | None = Field(None, min_length=1, description="PEM file with the private key (unset: in `cert`)")
    min_version: Literal["1.2", "1.3"] = Field("1.2", description="oldest TLS version accepted")
    ciphers: str | None = Field(None, min_length=1, description="OpenSSL cipher list for TLS 1.2 (unset: "
                                "OpenSSL's defaults)")

    @model_validator(mode="after")
    def _ciphers_need_tls12(self) -> "TlsConfig":
        if self.ciphers is not None and self.min_version == "1.3":
            raise ValueError("`ciphers` applies to TLS 1.2 only, and `min_version: \"1.3\"` turns TLS 1.2 off: the "
                             "list would change nothing (TLS 1.3 suites are not configurable through Python's ssl); "
                             "fix: remove `ciphers`, or set min_version to \"1.2\"")
        return self


class HttpSpliceConfig(_Model):
    """`splice http`: an HTTP/1.1 splicing load balancer."""

    listen: str = "127.0.0.1:8080"
    workers: int = Field(1, strict=True, ge=1, le=64, description="processes sharing the port (SO_REUSEPORT)")
    routes: list[HttpRoute] = Field(default_factory=list)
    default: list[str] | None = None
    pool: PoolConfig = PoolConfig()
    timeouts: TimeoutConfig = TimeoutConfig()
    limits: LimitConfig = LimitConfig()
    health: HealthConfig = HealthConfig()
    upgrade: Literal["tunnel", "refuse"] = Field("tunnel", description="Upgrade requests (e.g. WebSocket)")
    metrics: str | None = Field(None, description="HOST:PORT of the Prometheus endpoint")
    forwarded_for: bool = Field(False, strict=True, description="add `X-Forwarded-For: <client address>` and "
                                "`X-Forwarded-Proto: http|https` to each request (HAProxy's option forwardfor); "
                                "an X-Forwarded-For the client sent is kept before ours")
    forwarded: bool = Field(False, strict=True, description="add RFC 7239 `Forwarded: for=<client address>;proto=http|https` "
                            "to each request")
    access_log: str | None = Field(None, min_length=1, description="append one line per answered request to this "
                                   "file ('-': standard output)")
    access_log_format: Literal["text", "json"] = Field("text", description="access log lines: text or JSON")
    tls: TlsConfig | None = Field(None, description="terminate TLS on `listen` (HTTPS); unset: plain HTTP")

    _listen = field_validator("listen", "metrics", mode="before")(_check_listen)
    _default = field_validator("default", mode="before")(
        lambda v: v if v is None else _check_backends(v))

    @model_validator(mode="after")
    def _some_backend(self) -> "HttpSpliceConfig":
        if not self.routes and not self.default:
            raise ValueError("no backends: add `routes` or `default` (e.g. default: [127.0.0.1:9001])")
        return self


def parse_server_line(text: str) -> dict[str, Any]:
    """A server as twemproxy writes it, `host:port:weight [name]`, read the way nutcracker reads
    it (nc_conf.c conf_add_server works from the end): the name is what follows the *last* space
    (a trailing space gives an empty name, and twemproxy hashes that empty name), then weight,
    port and host split at the last two colons (so nutcracker's `::1:6379:1` is IPv6 `::1`).
    `host:port` and `[v6]:port` without a weight are accepted too (weight 1). ValueError when
    malformed."""
    name = None
    text = text.lstrip()
    if " " in text:
        text, _, name = text.rpartition(" ")
        if " " in text.strip():
            raise ValueError(f"{text.strip()} {name!r}: a server name cannot contain spaces (twemproxy takes the "
                             "name after the last space and refuses the rest); fix: remove the spaces")
        text = text.strip()
    parts = text.rsplit(":", 2)
    if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
        host = parts[0]
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # nutcracker's bare IPv6 form
        return {"address": f"{host}:{parts[1]}", "weight": int(parts[2]), "name": name}
    return {"address": text, "name": name}


class RedisServer(_Model):
    """One Redis server; twemproxy's `host:port:weight name` is accepted as a string."""

    address: str
    weight: int = Field(1, strict=True, ge=1)
    name: str | None = None

    _addr = field_validator("address", mode="before")(_check_address)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, v: Any) -> Any:
        return parse_server_line(v) if isinstance(v, str) else v


class RedisSpliceConfig(_Model):
    """`splice redis`: a RESP splicing proxy (fields beyond these are the Redis splicer's)."""

    listen: str = "127.0.0.1:6400"
    workers: int = Field(1, strict=True, ge=1, le=64)
    servers: list[RedisServer] = Field(min_length=1)
    distribution: Literal["ketama", "modula"] = "ketama"
    hash: Literal["fnv1a_64", "fnv1_64", "fnv1a_32", "fnv1_32", "md5", "murmur", "crc16", "crc32", "crc32a",
                  "hsieh", "jenkins", "one_at_a_time"] = "fnv1a_64"
    hash_tag: str | None = Field(None, min_length=2, max_length=2, description="e.g. '{}': hash only the part in braces")
    password: str | None = Field(None, repr=False, description="clients must AUTH with this (like requirepass) (shown as <redacted>)")
    backend_username: str | None = Field(None, description="AUTH user the splicer sends to every server")
    backend_password: str | None = Field(None, repr=False, description="AUTH password the splicer sends to every server (shown as <redacted>)")
    db: int = Field(0, strict=True, ge=0, description="database selected on every server connection")
    auto_eject: bool = Field(False, strict=True, description="take a failing server off the continuum (twemproxy auto_eject_hosts)")
    pool: RedisPoolConfig = RedisPoolConfig()
    timeouts: RedisTimeoutConfig = RedisTimeoutConfig()
    limits: RedisLimitConfig = RedisLimitConfig()
    health: RedisHealthConfig = RedisHealthConfig()
    metrics: str | None = None

    @field_validator("hash_tag")
    @classmethod
    def _two_bytes(cls, v: str | None) -> str | None:
        if v is not None and len(v.encode()) != 2:
            raise ValueError(f"hash_tag {v!r} is not two bytes (twemproxy compares bytes); fix: use two ASCII "
                             "characters, e.g. '{}'")
        return v

    @model_validator(mode="after")
    def _placeable(self) -> "RedisSpliceConfig":
        # Refused here rather than when the continuum is built, so --check and the start say so
        # in one line: servers that hash alike, and names too long for twemproxy's point labels.
        from .redis_ketama import KetamaServer, check_ketama_names, server_name

        seen: dict[str, int] = {}
        names = []
        for i, s in enumerate(self.servers):
            host, port = split_address(s.address)
            name = server_name(host, port, s.name)
            if name in seen:
                raise ValueError(f"servers[{seen[name]}] and servers[{i}] have the same name {name!r} on the key "
                                 "continuum (their address, or the name given after it); twemproxy refuses this; "
                                 "fix: give each server a distinct name")
            seen[name] = i
            names.append(KetamaServer(name, s.weight))
        if self.distribution == "ketama":
            check_ketama_names(names)
        return self

    _listen = field_validator("listen", "metrics", mode="before")(_check_listen)


class SpliceFile(_Model):
    """A whole splicer config file."""

    http: HttpSpliceConfig | None = None
    redis: RedisSpliceConfig | None = None


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not str(part).startswith("function-") and part not in ("str", "list[str]"):
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _strict_hint(kind: str, value: Any) -> str | None:
    """The fix for a number or boolean given as another type (the fields are strict: YAML's
    `workers: true` or `workers: "2"` is refused, not read as 1 or 2), or None."""
    if kind in ("int_type", "float_type"):
        what = "a whole number" if kind == "int_type" else "a number"
        if isinstance(value, bool):
            return f"write {what}, not true or false (got {str(value).lower()}, a boolean)"
        if isinstance(value, str):
            return f'write {what} without quotes (got "{value}", a string)'
        if isinstance(value, float):
            return f"write {what} (got {value!r})"
        return f"write {what}"
    if kind == "bool_type":
        if isinstance(value, str):
            return f'write true or false without quotes (got "{value}", a string)'
        return f"write true or false (got {value!r})"
    return None


def _hint(err: dict[str, Any], model: type[BaseModel] | None) -> str:
    kind = err.get("type", "")
    strict = _strict_hint(kind, err.get("input"))
    if strict is not None:
        return strict
    if kind == "extra_forbidden":
        loc = err.get("loc", ())
        doc = "splicer-redis.md" if loc and loc[0] == "redis" else "splicer-http.md"
        return f"remove it or fix its spelling (see docs/{doc} for the fields)"
    if kind == "missing":
        return "add it"
    if kind.startswith(("int_", "float_")) or kind in ("greater_than", "greater_than_equal", "less_than_equal"):
        return "give a number in the allowed range"
    if kind == "literal_error":
        return "use one of the values listed"
    if kind.endswith("_type"):
        return "give a value of the expected type"
    if kind == "value_error":
        return ""  # our own validators' messages already say what to write
    return "correct the value"


def format_validation_error(exc: ValidationError, source: str) -> str:
    """Render pydantic's errors as `source: field: problem; fix: ...` lines."""
    lines = []
    for err in exc.errors():
        msg = err.get("msg", "invalid").removeprefix("Value error, ")
        hint = _hint(err, None)
        loc = _loc(err.get("loc", ()))
        # A check of the whole model (servers against each other) has no one field to name.
        where = "" if loc == "(top level)" else f"field `{loc}`: "
        lines.append(f"{source}: {where}{msg}" + (f"; fix: {hint}" if hint else ""))
    return "\n".join(lines)


def _refuse_duplicate_keys(node: yaml.MappingNode) -> None:
    # PyYAML keeps the last of two equal keys without a word; a config that says one thing
    # twice is a mistake to report, as twemproxy does ("is a duplicate").
    seen: dict[str, int] = {}
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.value != "<<":
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"`{key_node.value}` is given twice (first on line {seen[key_node.value]}); "
                    "fix: keep one", key_node.start_mark)
            seen[key_node.value] = key_node.start_mark.line + 1


class _SafeLoader(yaml.SafeLoader):
    """YAML 1.1 types (the splicer's own files), duplicate keys refused."""


def _safe_map(loader: yaml.SafeLoader, node: yaml.MappingNode) -> Any:
    _refuse_duplicate_keys(node)
    yield from yaml.constructor.SafeConstructor.construct_yaml_map(loader, node)


_SafeLoader.add_constructor("tag:yaml.org,2002:map", _safe_map)


class _StringLoader(yaml.BaseLoader):
    """Every scalar a string, as nutcracker reads its file (no 0123 -> 83, yes -> True, 010 ->
    8); duplicate keys refused."""


def _string_map(loader: yaml.BaseLoader, node: yaml.MappingNode) -> Any:
    _refuse_duplicate_keys(node)
    return loader.construct_mapping(node, deep=True)


_StringLoader.add_constructor("tag:yaml.org,2002:map", _string_map)


def read_yaml(path: str | Path, strings: bool = False) -> Any:
    """Parse a YAML file; ConfigError (file, line, column, fix) when it cannot be read or parsed.

    With `strings`, every scalar stays the string written (for twemproxy's files, whose reader
    has no YAML types). A key given twice in one mapping is an error.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}; fix: check the path") from None
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x}); "
                          "fix: save the file as UTF-8") from None
    try:
        return yaml.load(text, Loader=_StringLoader if strings else _SafeLoader)  # noqa: S506 - both are safe loaders
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        pos = f" line {where.line + 1} column {where.column + 1}" if where else ""
        problem = str(getattr(exc, "problem", exc))
        fix = "" if "fix:" in problem else "; fix: correct the syntax"  # our own checks say their fix
        raise ConfigError(f"{path}:{pos}: not valid YAML: {problem}{fix}") from None


def load_config(path: str | Path) -> SpliceFile:
    """Read and validate a YAML splicer config file; raise ConfigError naming file and field."""
    path = Path(path)
    data = read_yaml(path)
    if data is None:
        raise ConfigError(f"{path}: the file is empty; fix: add an `http:` or `redis:` section")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping with `http:` and/or `redis:`")
    try:
        cfg = SpliceFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path))) from None
    if cfg.http is None and cfg.redis is None:
        raise ConfigError(f"{path}: neither `http:` nor `redis:` is set; fix: add one of them")
    return cfg
