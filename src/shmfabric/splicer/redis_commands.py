"""The Redis splicer's command table: what each command is, where its keys are, how it is routed.

What this file knows: command names, arities, key positions (Redis's first/last/step), which
commands split over servers and how their replies merge, which the splicer answers itself, and
which it refuses (with the reason given to the client). What it does not know: sockets, pools,
client state (see `redis_session`).

Arity follows Redis: N means exactly N arguments including the name, -N at least N.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

__all__ = [
    "stream_options",
    "Kind",
    "CommandSpec",
    "COMMANDS",
    "REFUSED",
    "lookup",
    "command_keys",
    "check_arity",
]


class Kind:
    """How a command is handled (plain ints: compared in the hot path)."""

    KEYED = 1  # all keys must live on one server; goes whole to it
    MGET = 2  # split per server, reply is an array merged back into key order
    MSET = 3  # split per server (key value pairs), reply +OK once all parts said OK
    SUM = 4  # DEL, UNLINK, EXISTS, TOUCH: split per server, integer replies added up
    SCRIPT = 5  # EVAL-like: numkeys at argument 2, keys follow; all on one server
    LOCAL = 6  # answered by the splicer (connection-level)
    FANOUT = 7  # works on a whole server: sent to every server, replies merged (redis_fanout)
    PUBSUB = 8  # (P|S)(UN)SUBSCRIBE: a connection of the client's own per server (redis_pubsub)
    BLOCKING = 9  # BLPOP, BLMOVE, XREAD BLOCK...: all keys on one server, over the client's own connection
    WATCH = 10  # WATCH, UNWATCH: on the client's own connection, where EXEC then runs


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """One command: Redis's arity and key positions, plus how the splicer handles it."""

    name: bytes
    arity: int
    first: int
    last: int
    step: int
    kind: int
    flags: tuple[str, ...] = field(default=())
    single: bool = False  # one key, at argument 1: the fast path
    numkeys: int = 0  # position of a numkeys argument whose keys follow it (ZINTERCARD, LMPOP...)
    store: tuple[bytes, ...] = ()  # options followed by a key (SORT ... STORE dst)
    no_keys: bool = False  # routed by argument 1, which Redis does not count as a key (PUBLISH)
    streams: bool = False  # keys are the first half of the arguments after STREAMS (XREAD, XREADGROUP)


def _mk(kind: int, flags: tuple[str, ...], entries: str) -> dict[bytes, CommandSpec]:
    out: dict[bytes, CommandSpec] = {}
    for item in entries.split():
        name, arity, first, last, step = item.split(":")
        single = kind == Kind.KEYED and first == "1" and last == "1"
        out[name.encode()] = CommandSpec(name.encode(), int(arity), int(first), int(last), int(step), kind, flags, single)
    return out


_R = ("readonly",)
_W = ("write",)

# name:arity:first:last:step
COMMANDS: dict[bytes, CommandSpec] = {}
COMMANDS.update(_mk(Kind.KEYED, _R, """
    GET:2:1:1:1 STRLEN:2:1:1:1 GETRANGE:4:1:1:1 SUBSTR:4:1:1:1 GETBIT:3:1:1:1 BITCOUNT:-2:1:1:1
    BITPOS:-3:1:1:1 BITFIELD_RO:-2:1:1:1 LCS:-3:1:2:1 TTL:2:1:1:1 PTTL:2:1:1:1
    EXPIRETIME:2:1:1:1 PEXPIRETIME:2:1:1:1 TYPE:2:1:1:1 DUMP:2:1:1:1 SORT_RO:-2:1:1:1
    LLEN:2:1:1:1 LRANGE:4:1:1:1 LINDEX:3:1:1:1 LPOS:-3:1:1:1
    HGET:3:1:1:1 HMGET:-3:1:1:1 HLEN:2:1:1:1 HSTRLEN:3:1:1:1 HEXISTS:3:1:1:1 HKEYS:2:1:1:1
    HVALS:2:1:1:1 HGETALL:2:1:1:1 HRANDFIELD:-2:1:1:1 HSCAN:-3:1:1:1
    SCARD:2:1:1:1 SISMEMBER:3:1:1:1 SMISMEMBER:-3:1:1:1 SMEMBERS:2:1:1:1 SRANDMEMBER:-2:1:1:1
    SSCAN:-3:1:1:1 SINTER:-2:1:-1:1 SUNION:-2:1:-1:1 SDIFF:-2:1:-1:1
    ZCARD:2:1:1:1 ZCOUNT:4:1:1:1 ZLEXCOUNT:4:1:1:1 ZSCORE:3:1:1:1 ZMSCORE:-3:1:1:1
    ZRANK:-3:1:1:1 ZREVRANK:-3:1:1:1 ZRANGE:-4:1:1:1 ZRANGEBYSCORE:-4:1:1:1
    ZREVRANGEBYSCORE:-4:1:1:1 ZRANGEBYLEX:-4:1:1:1 ZREVRANGEBYLEX:-4:1:1:1 ZREVRANGE:-4:1:1:1
    ZRANDMEMBER:-2:1:1:1 ZSCAN:-3:1:1:1 PFCOUNT:-2:1:-1:1
    GEODIST:-4:1:1:1 GEOHASH:-2:1:1:1 GEOPOS:-2:1:1:1 GEOSEARCH:-7:1:1:1
    GEORADIUS_RO:-6:1:1:1 GEORADIUSBYMEMBER_RO:-5:1:1:1
    XLEN:2:1:1:1 XRANGE:-4:1:1:1 XREVRANGE:-4:1:1:1 XPENDING:-3:1:1:1
    OBJECT:-2:2:2:1 XINFO:-2:2:2:1
"""))
COMMANDS.update(_mk(Kind.KEYED, _W, """
    SET:-3:1:1:1 SETNX:3:1:1:1 SETEX:4:1:1:1 PSETEX:4:1:1:1 GETSET:3:1:1:1 GETDEL:2:1:1:1
    GETEX:-2:1:1:1 APPEND:3:1:1:1 INCR:2:1:1:1 DECR:2:1:1:1 INCRBY:3:1:1:1 DECRBY:3:1:1:1
    INCRBYFLOAT:3:1:1:1 SETRANGE:4:1:1:1 SETBIT:4:1:1:1 BITFIELD:-2:1:1:1 MSETNX:-3:1:-1:2
    EXPIRE:-3:1:1:1 PEXPIRE:-3:1:1:1 EXPIREAT:-3:1:1:1 PEXPIREAT:-3:1:1:1 PERSIST:2:1:1:1
    RESTORE:-4:1:1:1 SORT:-2:1:1:1 RENAME:3:1:2:1 RENAMENX:3:1:2:1 COPY:-3:1:2:1
    LPUSH:-3:1:1:1 RPUSH:-3:1:1:1 LPUSHX:-3:1:1:1 RPUSHX:-3:1:1:1 LPOP:-2:1:1:1 RPOP:-2:1:1:1
    LSET:4:1:1:1 LREM:4:1:1:1 LTRIM:4:1:1:1 LINSERT:5:1:1:1 RPOPLPUSH:3:1:2:1 LMOVE:5:1:2:1
    HSET:-4:1:1:1 HSETNX:4:1:1:1 HMSET:-4:1:1:1 HDEL:-3:1:1:1 HINCRBY:4:1:1:1
    HINCRBYFLOAT:4:1:1:1
    SADD:-3:1:1:1 SREM:-3:1:1:1 SPOP:-2:1:1:1 SMOVE:4:1:2:1 SINTERSTORE:-3:1:-1:1
    SUNIONSTORE:-3:1:-1:1 SDIFFSTORE:-3:1:-1:1
    ZADD:-4:1:1:1 ZINCRBY:4:1:1:1 ZREM:-3:1:1:1 ZREMRANGEBYRANK:4:1:1:1
    ZREMRANGEBYSCORE:4:1:1:1 ZREMRANGEBYLEX:4:1:1:1 ZPOPMIN:-2:1:1:1 ZPOPMAX:-2:1:1:1
    ZRANGESTORE:-5:1:2:1
    PFADD:-2:1:1:1 PFMERGE:-2:1:-1:1 GEOADD:-5:1:1:1
    XADD:-5:1:1:1 XDEL:-3:1:1:1 XTRIM:-4:1:1:1 XACK:-4:1:1:1 XCLAIM:-6:1:1:1
    XAUTOCLAIM:-6:1:1:1 XGROUP:-2:2:2:1 XSETID:-3:1:1:1
"""))
COMMANDS.update(_mk(Kind.KEYED, _W, "BITOP:-4:2:-1:1 GEOSEARCHSTORE:-8:1:2:1"))



# Keys after a numkeys argument: all of them (and a destination before it) on one server.
for _line, _flags in (("ZINTERCARD:-3:1 SINTERCARD:-3:1 ZINTER:-3:1 ZUNION:-3:1 ZDIFF:-3:1", _R),
                      ("LMPOP:-4:1 ZMPOP:-4:1 ZINTERSTORE:-4:2 ZUNIONSTORE:-4:2 ZDIFFSTORE:-4:2", _W)):
    for _item in _line.split():
        _name, _arity, _nk = _item.split(":")
        _first = 1 if _nk == "2" else 0  # the *STORE commands' destination key
        COMMANDS[_name.encode()] = CommandSpec(_name.encode(), int(_arity), _first, _first, 1, Kind.KEYED, _flags,
                                               False, int(_nk))
# A key after an option: SORT ... STORE dst, GEORADIUS ... STORE k / STOREDIST k.
COMMANDS[b"SORT"] = replace(COMMANDS[b"SORT"], single=False, store=(b"STORE",))  # not the one-key fast path
COMMANDS[b"GEORADIUS"] = CommandSpec(b"GEORADIUS", -6, 1, 1, 1, Kind.KEYED, _W, False, 0, (b"STORE", b"STOREDIST"))
COMMANDS[b"GEORADIUSBYMEMBER"] = CommandSpec(b"GEORADIUSBYMEMBER", -5, 1, 1, 1, Kind.KEYED, _W, False, 0,
                                             (b"STORE", b"STOREDIST"))
# Blocking commands: a connection of the client's own to the keys' server (redis_proxy._Blocker).
COMMANDS.update(_mk(Kind.BLOCKING, ("write", "blocking"), """
    BLPOP:-3:1:-2:1 BRPOP:-3:1:-2:1 BRPOPLPUSH:4:1:2:1 BLMOVE:6:1:2:1 BZPOPMIN:-3:1:-2:1 BZPOPMAX:-3:1:-2:1
"""))
for _name, _flags in (("BLMPOP", ("write", "blocking")), ("BZMPOP", ("write", "blocking"))):
    COMMANDS[_name.encode()] = CommandSpec(_name.encode(), -5, 0, 0, 1, Kind.BLOCKING, _flags, False, 2)
COMMANDS[b"XREAD"] = CommandSpec(b"XREAD", -4, 0, 0, 1, Kind.BLOCKING, ("readonly", "blocking"), streams=True)
COMMANDS[b"XREADGROUP"] = CommandSpec(b"XREADGROUP", -7, 0, 0, 1, Kind.BLOCKING, ("write", "blocking"), streams=True)
COMMANDS.update(_mk(Kind.WATCH, ("noscript", "loading", "stale", "fast", "allow_busy"), "WATCH:-2:1:-1:1 UNWATCH:1:0:0:0"))
COMMANDS.update(_mk(Kind.MGET, _R, "MGET:-2:1:-1:1"))
COMMANDS.update(_mk(Kind.MSET, _W, "MSET:-3:1:-1:2"))
COMMANDS.update(_mk(Kind.SUM, _W, "DEL:-2:1:-1:1 UNLINK:-2:1:-1:1 TOUCH:-2:1:-1:1"))
COMMANDS.update(_mk(Kind.SUM, _R, "EXISTS:-2:1:-1:1"))
COMMANDS.update(_mk(Kind.SCRIPT, ("noscript",), """
    EVAL:-3:0:0:0 EVALSHA:-3:0:0:0 EVAL_RO:-3:0:0:0 EVALSHA_RO:-3:0:0:0
    FCALL:-3:0:0:0 FCALL_RO:-3:0:0:0
"""))
COMMANDS.update(_mk(Kind.LOCAL, ("fast", "loading", "stale"), """
    PING:-1:0:0:0 ECHO:2:0:0:0 QUIT:-1:0:0:0 HELLO:-1:0:0:0 AUTH:-2:0:0:0 SELECT:2:0:0:0
    CLIENT:-2:0:0:0 COMMAND:-1:0:0:0 MULTI:1:0:0:0 EXEC:1:0:0:0 DISCARD:1:0:0:0 RESET:1:0:0:0
"""))

COMMANDS.update(_mk(Kind.FANOUT, _R, "KEYS:2:0:0:0 SCAN:-2:0:0:0 RANDOMKEY:1:0:0:0"))
COMMANDS.update(_mk(Kind.FANOUT, ("readonly", "fast"), "DBSIZE:1:0:0:0"))
COMMANDS.update(_mk(Kind.FANOUT, _W, "FLUSHDB:-1:0:0:0 FLUSHALL:-1:0:0:0"))
COMMANDS.update(_mk(Kind.FANOUT, ("noscript",), "SCRIPT:-2:0:0:0 FUNCTION:-2:0:0:0"))
COMMANDS.update(_mk(Kind.FANOUT, ("pubsub", "loading", "stale"), "PUBSUB:-2:0:0:0"))
COMMANDS.update(_mk(Kind.FANOUT, ("loading", "stale"), "INFO:-1:0:0:0"))
_PUBSUB_FLAGS = ("pubsub", "noscript", "loading", "stale")
COMMANDS.update(_mk(Kind.PUBSUB, _PUBSUB_FLAGS, """
    SUBSCRIBE:-2:0:0:0 UNSUBSCRIBE:-1:0:0:0 PSUBSCRIBE:-2:0:0:0 PUNSUBSCRIBE:-1:0:0:0
    SSUBSCRIBE:-2:1:-1:1 SUNSUBSCRIBE:-1:1:-1:1
"""))
# A channel is placed like a key, over every configured server (redis_pubsub). Redis gives
# PUBLISH no key positions (COMMAND INFO reports them as 0: `no_keys`); SPUBLISH's shard
# channel is a key position, as in Redis.
COMMANDS.update(_mk(Kind.KEYED, ("pubsub", "loading", "stale", "fast"), "PUBLISH:3:1:1:1 SPUBLISH:3:1:1:1"))
COMMANDS[b"PUBLISH"] = replace(COMMANDS[b"PUBLISH"], no_keys=True, single=False)
COMMANDS[b"SPUBLISH"] = replace(COMMANDS[b"SPUBLISH"], single=False)  # not the keys' fast path: placed by channel

_SERVER = "it works on a whole server, and the keys are spread over several servers"

#: Commands refused with a clear reason (the connection carries on).
REFUSED: dict[bytes, str] = {}
for _n in "WAIT WAITAOF".split():
    REFUSED[_n.encode()] = "it waits for one server's replicas; send it to that server directly"
REFUSED[b"MONITOR"] = "it streams one server's commands; MONITOR each server directly"
for _n in (
    "CONFIG DEBUG SHUTDOWN SAVE BGSAVE BGREWRITEAOF LASTSAVE SLAVEOF REPLICAOF SYNC PSYNC "
    "CLUSTER READONLY READWRITE MIGRATE MOVE SWAPDB TIME LATENCY MEMORY SLOWLOG ACL FAILOVER ROLE "
    "MODULE LOLWUT"
).split():
    REFUSED[_n.encode()] = _SERVER
for _n in "ASKING REPLCONF PFDEBUG PFSELFTEST".split():
    REFUSED[_n.encode()] = "it is a cluster, replication or debugging command, not one for a proxy"


def lookup(name: bytes) -> CommandSpec | None:
    """The spec of a command by name (any case), or None."""
    spec = COMMANDS.get(name)
    if spec is None:
        spec = COMMANDS.get(name.upper())
    return spec


def check_arity(spec: CommandSpec, argc: int) -> bool:
    """True when `argc` arguments (name included) fit the command's arity."""
    a = spec.arity
    return argc == a if a > 0 else argc >= -a


def stream_options(args: list[bytes]) -> tuple[int, bytes | None]:
    """XREAD/XREADGROUP's options as Redis reads them (xreadGetKeys): the position of STREAMS
    (-1 if it is missing or an option is not understood) and BLOCK's argument (None if absent).
    Option arguments are skipped, so a group or consumer named "streams" is not taken for the
    keyword."""
    block = None
    i = 1
    n = len(args)
    while i < n:
        a = args[i].upper()
        if a == b"STREAMS":
            return i, block
        if a in (b"COUNT", b"BLOCK") and i + 1 < n:
            if a == b"BLOCK":
                block = args[i + 1]
            i += 2
        elif a == b"GROUP" and i + 2 < n:
            i += 3
        elif a == b"NOACK":
            i += 1
        else:
            break
    return -1, block


def command_keys(spec: CommandSpec, args: list[bytes]) -> list[bytes]:
    """The keys a command names, by Redis's first/last/step (or numkeys for scripts)."""
    if spec.kind == Kind.SCRIPT:
        n = int(args[2])
        return args[3 : 3 + n]
    if spec.streams:
        streams, _ = stream_options(args)
        if streams < 0:
            raise ValueError("streams")
        rest = args[streams + 1 :]
        if not rest or len(rest) % 2:
            raise ValueError("streams")
        return rest[: len(rest) // 2]
    keys: list[bytes] = []
    if spec.first:
        last = spec.last if spec.last >= 0 else len(args) + spec.last
        keys = args[spec.first : last + 1 : spec.step]
    if spec.numkeys:
        n = int(args[spec.numkeys])  # ValueError: not a number (the caller answers -ERR)
        if n < 1 or spec.numkeys + 1 + n > len(args):
            raise ValueError("numkeys")
        keys = keys + args[spec.numkeys + 1 : spec.numkeys + 1 + n]
    if spec.store:
        for i in range(spec.first + 1, len(args) - 1):
            if args[i].upper() in spec.store:
                keys = keys + [args[i + 1]]
    return keys
