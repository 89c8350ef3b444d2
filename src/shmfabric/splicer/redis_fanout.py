"""Whole-server commands through the Redis splicer: sent to every server, replies merged (sans-IO).

twemproxy refuses every command that works on a whole server, and with SCRIPT LOAD go
redis-py's `Lock` and `Script` helpers: they run EVALSHA and, on NOSCRIPT, load the script
with SCRIPT LOAD and try again, so `lock.release()` fails through twemproxy. The splicer sends
these commands to every configured server and merges the replies into the one a single server
holding all the keys would give:

| command | reply |
|---|---|
| DBSIZE | the servers' counts added up |
| KEYS pattern | every server's keys, server by server |
| SCAN cursor [MATCH] [COUNT] [TYPE] | one server at a time; the cursor names the server (below) |
| RANDOMKEY | a key of a server picked at random among those that have one |
| FLUSHDB, FLUSHALL [ASYNC\\|SYNC] | `+OK` once every server said OK |
| SCRIPT LOAD | the SHA-1, once every server that is up loaded it |
| FUNCTION LOAD | the library name, once every server gave it |
| SCRIPT EXISTS sha... | 1 for a script every server that is up holds (EVALSHA goes to its key's server) |
| SCRIPT FLUSH, FUNCTION DELETE/FLUSH/RESTORE | `+OK` once every server said OK |
| FUNCTION LIST | the first server's list, when every server holds the same libraries (in any order) |
| FUNCTION DUMP | the first reachable server's dump |
| SCRIPT/FUNCTION HELP | the answer, when every server gave the same one |

Any server's error is the reply: a server that is down makes the command fail, with its name,
rather than answer for part of the keys. A write (FLUSHDB, FLUSHALL, SCRIPT FLUSH, FUNCTION
LOAD/DELETE/FLUSH/RESTORE: `ALL_OR_NONE`) is refused at once while a server is known to be
down, and otherwise sent only after every server has answered a PING, so it does not run on
the others and then report a failure; a server lost between its PING and the write leaves the
others done, and the error says which. Except for SCRIPT LOAD and SCRIPT EXISTS, which leave
out a server that cannot be reached (when another answered), so that scripts keep working on
the keys of the servers that are up, as EVALSHA does: a server that comes back without the
script answers EVALSHA with NOSCRIPT, and clients load it again.

SCAN: a splicer cursor is `(k << 16) | tag` with `k = c * n + i` for the i-th of the n servers
in the pool at that server's cursor c, and `tag` 16 bits naming those servers (`scan_tag`). The
server's next cursor s becomes `((s * n + i) << 16) | tag`, and the end of server i's keys
becomes server i + 1's start, or 0 after the last server. Cursor 0 starts at the first server,
so a client iterates every server in turn with SCAN's usual loop and its usual guarantees,
server by server. A cursor handed out for another list of servers (a reload changed it, or
`auto_eject` took a server out or put it back) would point into the wrong server: its tag does
not match (65,534 times in 65,535 for two lists) and it is refused, so the client starts again
instead of silently skipping keys. Redis's cursors are below its table sizes (2**33 for eight
billion keys), far from the 2**40 that 256 servers leave them; one that would overflow when
scaled is reported, not wrapped.

The servers are all the configured ones; with `auto_eject`, reads go to those in the
continuum, which then hold every key a client can reach (an ejected server's keys are placed
on the others), and writes still go to every configured server, so they are refused while one
is ejected (a FLUSHALL that left it out would see its keys come back with it).

Every whole-server command is a *barrier* (see `redis_session`): it starts once the client's
earlier commands are answered and later ones wait for it, so FLUSHALL, DBSIZE or SCAN see the
writes sent before them on every server, whichever pooled connection carried those.

Pure: planning and merging only; the I/O shell sends the parts (`RedisSession` makes the
action).
"""
from __future__ import annotations

import random
import zlib
from typing import Any, NamedTuple, Sequence

import hiredis

from .redis_info import info_reply
from .redis_resp import OK, encode_command, encode_error

__all__ = ["Merge", "Where", "ALL_OR_NONE", "TAG_BITS", "plan", "scan_tag", "parse_cursor", "MERGES", "merge_concat", "merge_same", "merge_same_up",
           "merge_same_set", "merge_first_up", "merge_union", "merge_numsub", "merge_max", "merge_min", "merge_random", "merge_scan", "merge_all_ok", "CURSOR_MAX"]

CURSOR_MAX = 2**64 - 1  # Redis cursors are unsigned 64-bit
_TAG_MASK = 2**16 - 1


class Merge:
    """How the replies of a whole-server command become one (the `kind` of its SPLIT action).

    SUM is `redis_commands.Kind.SUM`, the merge DEL and EXISTS already use; the others are
    distinct from every `Kind`.
    """

    SUM = 4
    CONCAT = 10
    SAME = 11
    MIN = 12
    RANDOM = 13
    SCAN = 14
    ALL_OK = 15
    SAME_UP = 16  # SAME over the servers that could be reached
    SAME_SET = 17  # the same items in any order (FUNCTION LIST: Redis lists in dict order)
    FIRST_UP = 18  # the first reachable server's answer (FUNCTION DUMP)
    UNION = 19  # every name any server listed, once (PUBSUB CHANNELS)
    NUMSUB = 20  # [name, count, ...] with the counts added up per name (PUBSUB NUMSUB)
    MAX = 21  # the largest integer (PUBSUB NUMPAT: a pattern is subscribed on every server)
    INFO = 22  # the servers' INFO merged, with the splicer's own process fields (redis_info)


#: Writes sent only when every server can be reached: a FLUSHALL must not run on the servers
#: that are up and then be reported failed because one was down.
ALL_OR_NONE = frozenset({Merge.ALL_OK, Merge.SAME})


class Where(NamedTuple):
    """What a part's merge knows of it: which server, and of what command."""

    server: int  # index in config order
    rank: int  # its place among the servers the command went to
    count: int  # how many servers the command went to
    name: str  # the command, for messages ("SCRIPT LOAD")
    tag: int  # the servers' scan_tag
    extra: Any = None  # INFO: a function giving the splicer's own fields (redis_info.merge_info)


_WHOLE: dict[bytes, int] = {
    b"DBSIZE": Merge.SUM,
    b"KEYS": Merge.CONCAT,
    b"FLUSHDB": Merge.ALL_OK,
    b"FLUSHALL": Merge.ALL_OK,
    b"RANDOMKEY": Merge.RANDOM,
    b"INFO": Merge.INFO,
}

_KILL = ("it must reach a server busy with a script, and the splicer's connections to that server wait "
         "behind that script: send it to the server directly")
_SUBCOMMANDS: dict[bytes, dict[bytes, int | str]] = {
    b"SCRIPT": {
        b"LOAD": Merge.SAME_UP, b"EXISTS": Merge.MIN, b"FLUSH": Merge.ALL_OK, b"HELP": Merge.SAME,
        b"KILL": _KILL, b"DEBUG": "the Lua debugger needs a server connection of its own",
    },
    b"FUNCTION": {
        b"LOAD": Merge.SAME, b"DELETE": Merge.ALL_OK, b"FLUSH": Merge.ALL_OK, b"RESTORE": Merge.ALL_OK,
        b"LIST": Merge.SAME_SET, b"DUMP": Merge.FIRST_UP, b"HELP": Merge.SAME,
        b"KILL": _KILL, b"STATS": "it describes the script one server is running; ask that server directly",
    },
    b"PUBSUB": {
        b"CHANNELS": Merge.UNION, b"SHARDCHANNELS": Merge.UNION, b"NUMSUB": Merge.NUMSUB,
        b"SHARDNUMSUB": Merge.NUMSUB, b"NUMPAT": Merge.MAX, b"HELP": Merge.SAME,
    },
}


TAG_BITS = 16  # a stale cursor passes for a fresh one once in 65,535 server-list pairs


def scan_tag(names: Sequence[str]) -> int:
    """The tag (1 to 2**16 - 1) that SCAN cursors carry for this list of server names, in order.

    CRC-32, not hash(): every worker process, and every run, must give the same tag.
    """
    return zlib.crc32("\0".join(names).encode()) % (2**TAG_BITS - 1) + 1


def parse_cursor(text: bytes) -> int | None:
    """A SCAN cursor as redis-server reads it (strtoul: optional sign, digits, an empty string is
    0, a minus wraps modulo 2**64), or None where it answers "invalid cursor"."""
    if text[:1].isspace():
        return None
    digits = text[1:] if text[:1] in (b"+", b"-") else text
    if not text:
        return 0
    if not digits.isdigit() or not digits.isascii():
        return None
    value = int(digits)
    if value > CURSOR_MAX:  # ERANGE
        return None
    return (-value) % 2**64 if text[:1] == b"-" else value


def plan(name: bytes, args: list[bytes], servers: Sequence[int], payload: bytes,
         tag: int = 1, everyone: Sequence[int] | None = None,
         extra: Any = None) -> tuple[int, list[tuple[int, int, bytes, Where]]] | bytes:
    """(merge, parts) for a whole-server command, or the error reply to answer in its place.

    `name` is the command's upper-case name, `args` the whole command, `payload` its RESP
    encoding, `servers` the indexes of the servers in the pool (all of them, or those in the
    continuum when servers are ejected), `tag` their `scan_tag`, `everyone` all the configured
    servers (default: `servers`), which the writes in ALL_OR_NONE go to: a FLUSHALL that left
    out an ejected server would see its keys come back with it; `extra` goes in every part's
    Where (INFO: the splicer's own fields). Parts are (server, lane,
    payload, Where) as `RedisSession` makes them: one per server (one for SCAN), on lane 0 (a
    barrier has the client's connections to itself).
    """
    n = len(servers)
    if not n:
        return encode_error("ERR splicer: no server is in the pool (all ejected)")
    if name == b"SCAN":
        c = parse_cursor(args[1])
        if c is None:
            return encode_error("ERR invalid cursor")
        if c and c & _TAG_MASK != tag:
            return encode_error("ERR splicer: this SCAN cursor was handed out for another list of servers (the "
                                "configuration changed, or a server left or rejoined the pool, since); start the "
                                "SCAN again from cursor 0")
        rank, inner = ((c >> TAG_BITS) % n, (c >> TAG_BITS) // n) if c else (0, 0)
        server = servers[rank]
        return Merge.SCAN, [(server, 0, _with_cursor(args, b"%d" % inner), Where(server, rank, n, "SCAN", tag))]
    merge = _WHOLE.get(name)
    label = name.decode()
    if merge is None:
        sub_name = args[1].upper()
        choice = _SUBCOMMANDS[name].get(sub_name)
        if choice is None:
            return encode_error(f"ERR unknown subcommand '{_text(args[1])}'. Try {name.decode()} HELP.")
        if isinstance(choice, str):
            return encode_error(f"ERR '{name.decode().lower()} {_text(sub_name).lower()}' is not supported by the "
                                f"splicer: {choice}")
        merge = choice
        label += " " + sub_name.decode()
    if merge in ALL_OR_NONE and everyone is not None:
        servers = everyone
    return merge, [(s, 0, payload, Where(s, i, len(servers), label, tag, extra)) for i, s in enumerate(servers)]


def _text(b: bytes) -> str:
    return b[:128].decode(errors="replace")  # Redis quotes up to 128 bytes


def _with_cursor(args: list[bytes], cursor: bytes) -> bytes:
    return encode_command([args[0], cursor, *args[2:]])


_UNEXPECTED = "ERR splicer: a backend answered {} with an unexpected reply"


def _first_error(parts: list[tuple[Any, bytes]]) -> bytes | None:
    for _, reply in parts:
        if reply[:1] == b"-":
            return reply
    return None


def merge_all_ok(parts: list[tuple[Any, bytes]], name: str | None = None) -> bytes:
    """`+OK` when every part said OK, else the first error (`name` for messages: else the parts')."""
    for _, reply in parts:
        if reply != OK:
            return reply if reply[:1] == b"-" else encode_error(_UNEXPECTED.format(name or parts[0][0].name))
    return OK


def merge_concat(parts: list[tuple[Any, bytes]]) -> bytes:
    """One array holding every part's elements, part by part (KEYS)."""
    err = _first_error(parts)
    if err is not None:
        return err
    total = 0
    bodies = []
    for _, reply in parts:
        nl = reply.find(b"\r\n")
        try:
            n = int(reply[1:nl]) if reply[:1] == b"*" else -1
        except ValueError:
            n = -1
        if n < 0:
            return encode_error(_UNEXPECTED.format(parts[0][0].name))
        total += n
        bodies.append(reply[nl + 2 :])
    return b"*%d\r\n" % total + b"".join(bodies)


_UNREACHABLE = b"-ERR splicer: backend "  # how every error the splicer makes for a lost server starts


def _reached(parts: list[tuple[Any, bytes]]) -> list[tuple[Any, bytes]]:
    """The parts of servers that answered; all of them if none did (the errors say why)."""
    up = [p for p in parts if not p[1].startswith(_UNREACHABLE)]
    return up or parts


def merge_same_up(parts: list[tuple[Any, bytes]]) -> bytes:
    """`merge_same` over the servers that could be reached (SCRIPT LOAD)."""
    return merge_same(_reached(parts))


def merge_same(parts: list[tuple[Any, bytes]]) -> bytes:
    """The reply every part gave; an error naming the servers when two differ."""
    err = _first_error(parts)
    if err is not None:
        return err
    first_where, first = parts[0]
    for where, reply in parts[1:]:
        if reply != first:
            return encode_error(f"ERR splicer: servers {first_where.server} and {where.server} (in config order, from 0) "
                                f"answered {first_where.name} differently; make them hold the same scripts and functions")
    return first


def merge_min(parts: list[tuple[Any, bytes]]) -> bytes:
    """Element-wise minimum of integer arrays: SCRIPT EXISTS says 1 only where every server that
    could be reached does."""
    parts = _reached(parts)
    values = _values(parts)
    if type(values) is bytes:
        return values
    if not all(type(v) is list and len(v) == len(values[0]) and all(type(x) is int for x in v) for v in values):
        return encode_error(_UNEXPECTED.format(parts[0][0].name))
    mins = list(map(min, zip(*values)))
    return b"*%d\r\n" % len(mins) + b"".join(b":%d\r\n" % v for v in mins)


_NULLS = (b"$-1\r\n", b"_\r\n")


def merge_random(parts: list[tuple[Any, bytes]]) -> bytes:
    """A random key from a server that has one (RANDOMKEY); null when none has a key."""
    err = _first_error(parts)
    if err is not None:
        return err
    keys = [reply for _, reply in parts if reply not in _NULLS]
    if any(reply[:1] != b"$" for reply in keys):
        return encode_error(_UNEXPECTED.format(parts[0][0].name))
    # Uniform over servers that have keys, not over keys: a server's key count would cost a
    # DBSIZE round per call. Redis's own RANDOMKEY is not uniform over keys either.
    return random.choice(keys) if keys else parts[0][1]


def merge_scan(parts: list[tuple[Any, bytes]]) -> bytes:
    """One server's SCAN reply with its cursor turned into the splicer's (module docstring)."""
    where, reply = parts[0]
    name, rank, count, tag = where.name, where.rank, where.count, where.tag
    if reply[:1] == b"-":
        return reply
    # *2\r\n$L\r\n<cursor>\r\n<array of keys>: the same in RESP2 and RESP3.
    if reply[:5] != b"*2\r\n$":
        return encode_error(_UNEXPECTED.format(name))
    nl = reply.find(b"\r\n", 5)
    try:
        length = int(reply[5:nl])
        cursor = int(reply[nl + 2 : nl + 2 + length])
    except ValueError:
        return encode_error(_UNEXPECTED.format(name))
    rest = reply[nl + 4 + length :]
    if cursor == 0:
        nxt = (rank + 1) << TAG_BITS | tag if rank + 1 < count else 0
    else:
        nxt = (cursor * count + rank) << TAG_BITS | tag
        if nxt > CURSOR_MAX:
            return encode_error(f"ERR splicer: server {where.server}'s SCAN cursor {cursor} is too large to carry the "
                                f"server's index ({count} servers); SCAN that server directly")
    text = b"%d" % nxt
    return b"*2\r\n$%d\r\n%s\r\n" % (len(text), text) + rest


def _as_map(value: Any) -> dict:
    """A RESP3 map as is, or a RESP2 flat [key, value, ...] list as a map."""
    if isinstance(value, dict):
        return value
    if isinstance(value, list) and len(value) % 2 == 0:
        return dict(zip(value[::2], value[1::2]))
    raise TypeError("not a map")


def _libraries(value: Any) -> list:
    """FUNCTION LIST's libraries in a fixed order, each with its functions in a fixed order, so
    that two servers holding the same ones compare equal however they list them."""
    if not isinstance(value, list):
        raise TypeError("not a list")
    out = []
    for lib in value:
        lib = dict(_as_map(lib))
        funcs = lib.get(b"functions")
        if funcs is not None:
            lib[b"functions"] = sorted((sorted(_as_map(f).items(), key=repr) for f in funcs), key=repr)
        out.append(sorted(lib.items(), key=repr))
    return sorted(out, key=repr)


def merge_same_set(parts: list[tuple[Any, bytes]]) -> bytes:
    """The first reply, when every part lists the same libraries in any order (FUNCTION LIST)."""
    err = _first_error(parts)
    if err is not None:
        return err
    first_where, first = parts[0]
    name = first_where.name
    seen = None
    for where, reply in parts:
        r = hiredis.Reader()
        r.feed(reply)
        try:
            canon = _libraries(r.gets())
        except (hiredis.ProtocolError, TypeError):
            return encode_error(_UNEXPECTED.format(name))
        if seen is None:
            seen = canon
        elif canon != seen:
            return encode_error(f"ERR splicer: servers {first_where.server} and {where.server} (in config order, from 0) hold "
                                f"different functions ({name}); load them through the splicer, or with "
                                "FUNCTION LOAD REPLACE, so that every server holds the same")
    return first


def _values(parts: list[tuple[Any, bytes]]) -> list[Any] | bytes:
    """Every part's reply parsed, or the reply to give instead (the first error, or one saying
    a server answered something unexpected)."""
    err = _first_error(parts)
    if err is not None:
        return err
    out = []
    for _, reply in parts:
        r = hiredis.Reader()
        r.feed(reply)
        try:
            out.append(r.gets())
        except hiredis.ProtocolError:
            return encode_error(_UNEXPECTED.format(parts[0][0].name))
    return out


def merge_union(parts: list[tuple[Any, bytes]]) -> bytes:
    """The names every server listed, each once, in the order first seen (PUBSUB CHANNELS)."""
    values = _values(parts)
    if type(values) is bytes:
        return values
    names: dict[bytes, None] = {}
    for v in values:
        if type(v) is not list or not all(type(x) is bytes for x in v):
            return encode_error(_UNEXPECTED.format(parts[0][0].name))
        names.update(dict.fromkeys(v))
    return b"*%d\r\n" % len(names) + b"".join(b"$%d\r\n%s\r\n" % (len(n), n) for n in names)


def merge_numsub(parts: list[tuple[Any, bytes]]) -> bytes:
    """PUBSUB NUMSUB's [channel, count, ...] with each channel's counts added up: a channel's
    subscribers through the splicer are on its server, others may be anywhere."""
    values = _values(parts)
    if type(values) is bytes:
        return values
    totals: dict[bytes, int] = {}
    order: list[bytes] = []
    for v in values:
        if type(v) is not list or len(v) % 2:
            return encode_error(_UNEXPECTED.format(parts[0][0].name))
        pairs = list(zip(v[::2], v[1::2]))
        if not all(type(name) is bytes and type(count) is int for name, count in pairs):
            return encode_error(_UNEXPECTED.format(parts[0][0].name))
        if not order:
            order = [name for name, _ in pairs]
        for name, count in dict(pairs).items():  # a name asked twice counts once per server
            totals[name] = totals.get(name, 0) + count
    # The order the client asked in (a name asked twice is listed twice, as Redis does).
    return b"*%d\r\n" % (2 * len(order)) + b"".join(
        b"$%d\r\n%s\r\n:%d\r\n" % (len(n), n, totals[n]) for n in order)


def merge_max(parts: list[tuple[Any, bytes]]) -> bytes:
    """The largest integer reply (PUBSUB NUMPAT: a pattern through the splicer is subscribed on
    every server, so each counts it; adding them up would count it once per server)."""
    values = _values(parts)
    if type(values) is bytes:
        return values
    if not all(type(v) is int for v in values):
        return encode_error(_UNEXPECTED.format(parts[0][0].name))
    return b":%d\r\n" % max(values)


def merge_info_parts(parts: list[tuple[Any, bytes]]) -> bytes:
    """INFO: every server's merged into one, with the splicer's own fields (redis_info)."""
    err = _first_error(parts)
    if err is not None:
        return err
    return info_reply([reply for _, reply in parts], parts[0][0].extra,
                      lambda: encode_error(_UNEXPECTED.format(parts[0][0].name)))


def merge_first_up(parts: list[tuple[Any, bytes]]) -> bytes:
    """The answer of the first server that could be reached (FUNCTION DUMP)."""
    return _reached(parts)[0][1]


#: The merge of each fan-out kind but SUM (`redis_session.merge_parts` holds them all).
MERGES = {
    Merge.CONCAT: merge_concat,
    Merge.SAME: merge_same,
    Merge.SAME_UP: merge_same_up,
    Merge.SAME_SET: merge_same_set,
    Merge.FIRST_UP: merge_first_up,
    Merge.MIN: merge_min,
    Merge.RANDOM: merge_random,
    Merge.SCAN: merge_scan,
    Merge.ALL_OK: merge_all_ok,
    Merge.UNION: merge_union,
    Merge.NUMSUB: merge_numsub,
    Merge.MAX: merge_max,
    Merge.INFO: merge_info_parts,
}
