"""Per-connection decisions of the Redis splicer (pure: no sockets)."""
from __future__ import annotations

import hiredis
import pytest

from shmfabric.splicer.redis_commands import COMMANDS, Kind, command_keys, lookup
from shmfabric.splicer.redis_ketama import Ketama, KetamaServer
from shmfabric.splicer.redis_session import (
    CLOSE,
    EXEC,
    FORWARD,
    REPLY,
    SPLIT,
    RedisSession,
    Router,
    SessionConfig,
    merge_mget,
    merge_mset,
    merge_sum,
)


def parse(data: bytes):
    r = hiredis.Reader()
    r.feed(data)
    return r.gets()


@pytest.fixture()
def router() -> Router:
    return Router(Ketama([KetamaServer("127.0.0.1:7001"), KetamaServer("127.0.0.1:7002")]), lanes=3)


def cmd(*words: str | bytes) -> list[bytes]:
    return [w.encode() if isinstance(w, str) else w for w in words]


def test_hello_negotiates_protocol(router: Router) -> None:
    s = RedisSession(router, SessionConfig(server_version="7.0.15"))
    tag, reply, changed = s.handle(cmd("HELLO", "3"))
    assert tag == REPLY and changed and s.proto == 3
    assert reply.startswith(b"%7\r\n")
    info = parse(reply)
    assert info[b"proto"] == 3 and info[b"version"] == b"7.0.15" and info[b"server"] == b"redis"
    tag, reply, changed = s.handle(cmd("HELLO", "2"))
    assert reply.startswith(b"*14\r\n") and changed and s.proto == 2
    assert s.handle(cmd("HELLO", "4"))[1].startswith(b"-NOPROTO")
    assert s.handle(cmd("HELLO", "x"))[1].startswith(b"-ERR Protocol version")
    assert s.handle(cmd("HELLO"))[2] is False  # no version: report, do not switch


def test_auth_with_and_without_password(router: Router) -> None:
    open_s = RedisSession(router)
    assert b"without any password configured" in open_s.handle(cmd("AUTH", "x"))[1]
    assert open_s.handle(cmd("AUTH", "default", "x"))[1] == b"+OK\r\n"  # what redis-py sends
    s = RedisSession(router, SessionConfig(password="sekret"))
    assert s.handle(cmd("GET", "k"))[1].startswith(b"-NOAUTH")
    assert s.handle(cmd("HELLO", "3"))[1].startswith(b"-NOAUTH")
    assert s.handle(cmd("AUTH", "nope"))[1].startswith(b"-WRONGPASS")
    assert s.handle(cmd("HELLO", "3", "AUTH", "default", "sekret"))[0] == REPLY and s.authed and s.proto == 3
    assert s.handle(cmd("GET", "k"))[0] == FORWARD


def test_client_and_connection_commands(router: Router) -> None:
    s = RedisSession(router)
    assert s.handle(cmd("CLIENT", "SETINFO", "LIB-NAME", "redis-py"))[1] == b"+OK\r\n"
    assert s.handle(cmd("CLIENT", "SETINFO", "LIB-VER", "8.0"))[1] == b"+OK\r\n"
    assert s.handle(cmd("CLIENT", "SETINFO", "LIB-NAME", "has space"))[1].startswith(b"-ERR")
    assert s.handle(cmd("CLIENT", "SETNAME", "me"))[1] == b"+OK\r\n"
    assert s.handle(cmd("CLIENT", "GETNAME"))[1] == b"$2\r\nme\r\n"
    assert s.handle(cmd("CLIENT", "ID"))[1] == b":%d\r\n" % s.client_id
    assert b"lib-name=redis-py" in s.handle(cmd("CLIENT", "INFO"))[1]
    assert b"not supported" in s.handle(cmd("CLIENT", "KILL", "x"))[1]
    assert s.handle(cmd("PING"))[1] == b"+PONG\r\n"
    assert s.handle(cmd("ping", "hi"))[1] == b"$2\r\nhi\r\n"
    assert s.handle(cmd("ECHO", "x"))[1] == b"$1\r\nx\r\n"
    assert s.handle(cmd("SELECT", "0"))[1] == b"+OK\r\n"
    assert b"not supported" in s.handle(cmd("SELECT", "3"))[1]
    assert s.handle(cmd("QUIT")) == (CLOSE, b"+OK\r\n")


def test_command_introspection(router: Router) -> None:
    s = RedisSession(router)
    assert s.handle(cmd("COMMAND", "COUNT"))[1] == b":%d\r\n" % len(COMMANDS)
    info = parse(s.handle(cmd("COMMAND", "INFO", "get", "nosuch"))[1])
    assert info[0][:6] == [b"get", 2, [b"readonly"], 1, 1, 1] and info[1] is None
    assert parse(s.handle(cmd("COMMAND", "DOCS"))[1]) == []
    assert parse(s.handle(cmd("COMMAND", "GETKEYS", "MSET", "a", "1", "b", "2"))[1]) == [b"a", b"b"]
    assert len(parse(s.handle(cmd("COMMAND"))[1])) == len(COMMANDS)


def test_arity_unknown_and_refused(router: Router) -> None:
    s = RedisSession(router)
    assert s.handle(cmd("GET"))[1] == b"-ERR wrong number of arguments for 'get' command\r\n"
    assert s.handle(cmd("MSET", "a"))[1].startswith(b"-ERR wrong number")
    assert s.handle(cmd("MSET", "a", "1", "b"))[1].startswith(b"-ERR wrong number")
    assert s.handle(cmd("FOO", "bar"))[1] == b"-ERR unknown command 'FOO', with args beginning with: 'bar' \r\n"
    for name in ("WAIT", "MONITOR", "TIME", "CONFIG"):
        assert b"not supported by the splicer" in s.handle(cmd(name, "x", "0"))[1]
    assert b"names none" in s.handle(cmd("EVAL", "return 1", "0"))[1]
    assert b"greater than" in s.handle(cmd("EVAL", "return 1", "3", "a"))[1]


def keys_at(router: Router, code_filter, n: int) -> list[bytes]:
    out, i = [], 0
    while len(out) < n:
        k = b"key:%d" % i
        if code_filter(router.place(k)):
            out.append(k)
        i += 1
    return out


def test_single_key_forward_and_barriers(router: Router) -> None:
    s = RedisSession(router)
    tag, barrier, proto, server, lane, payload = s.handle(cmd("SET", "k", "v"))
    assert (tag, barrier, proto) == (FORWARD, False, 2) and (server, lane) == router.place(b"k")
    assert payload == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n"
    a0 = keys_at(router, lambda p: p == (0, 0), 1)[0]
    a1 = keys_at(router, lambda p: p == (0, 1), 1)[0]
    b0 = keys_at(router, lambda p: p[0] == 1, 1)[0]
    # Two keys of one server on different lanes: allowed, but as a barrier (per-key order).
    act = s.handle([b"RENAME", a0, a1])
    assert act[0] == FORWARD and act[1] is True and act[3] == 0
    assert s.handle([b"RENAME", a0, b0])[1].startswith(b"-CROSSSERVER")
    assert s.handle([b"EVAL", b"return 1", b"2", a0, a1])[0] == FORWARD


def test_mget_split_covers_every_key_once(router: Router) -> None:
    s = RedisSession(router)
    keys = [b"k%d" % i for i in range(200)]
    tag, barrier, proto, kind, n, parts = s.handle([b"MGET", *keys])
    assert tag == SPLIT and kind == Kind.MGET and n == 200
    seen = []
    for server, lane, payload, positions in parts:
        sub = parse(payload)
        assert sub[0] == b"MGET" and sub[1:] == [keys[i] for i in positions]
        assert all(router.place(keys[i]) == (server, lane) for i in positions)
        seen += positions
    assert sorted(seen) == list(range(200))
    # All keys on one lane: forwarded whole, no merge.
    same = keys_at(router, lambda p: p == (1, 2), 5)
    assert s.handle([b"MGET", *same])[0] == FORWARD


def test_mset_split_keeps_pairs(router: Router) -> None:
    s = RedisSession(router)
    args = [b"MSET"] + [x for i in range(50) for x in (b"k%d" % i, b"v%d" % i)]
    tag, _, _, kind, n, parts = s.handle(args)
    assert tag == SPLIT and kind == Kind.MSET and n == 50
    for _, _, payload, positions in parts:
        sub = parse(payload)
        assert sub[1:] == [x for i in positions for x in (b"k%d" % i, b"v%d" % i)]


def test_merges() -> None:
    assert merge_mget(3, [([0, 2], b"*2\r\n$1\r\na\r\n$-1\r\n"), ([1], b"*1\r\n$1\r\nb\r\n")], 2) == \
        b"*3\r\n$1\r\na\r\n$1\r\nb\r\n$-1\r\n"
    assert merge_mget(2, [([0], b"*1\r\n_\r\n"), ([1], b"*1\r\n$1\r\nb\r\n")], 3) == b"*2\r\n_\r\n$1\r\nb\r\n"
    assert merge_mget(2, [([0], b"-ERR splicer: backend x down\r\n"), ([1], b"*1\r\n$1\r\nb\r\n")], 2).startswith(b"-ERR")
    # A few keys: values cut out of the parts' replies as they are (bulks, nulls, RESP3 nulls)...
    assert merge_mget(4, [([3, 0], b"*2\r\n$0\r\n\r\n_\r\n"), ([1], b"*1\r\n$2\r\nbb\r\n"),
                          ([2], b"*1\r\n$-1\r\n")], 3) == b"*4\r\n_\r\n$2\r\nbb\r\n$-1\r\n$0\r\n\r\n"
    # ...and anything else goes the parsing way: an error in a part, a short or odd part.
    assert merge_mget(2, [([0, 1], b"*2\r\n$1\r\na\r\n:1\r\n")], 2).startswith(b"-ERR splicer: a backend answered MGET")
    assert merge_mget(3, [([0, 2], b"*1\r\n$1\r\na\r\n"), ([1], b"*1\r\n$1\r\nb\r\n")], 2).startswith(b"-ERR splicer")
    assert merge_mget(2, [([1], b"*1\r\n$1\r\nb\r\n"), ([0], b"-ERR x\r\n")], 2) == b"-ERR x\r\n"
    assert merge_sum([([0], b":2\r\n"), ([1], b":3\r\n")]) == b":5\r\n"
    assert merge_sum([([0], b":2\r\n"), ([1], b"-ERR x\r\n")]) == b"-ERR x\r\n"
    assert merge_mset([([0], b"+OK\r\n"), ([1], b"+OK\r\n")]) == b"+OK\r\n"
    assert merge_mset([([0], b"+OK\r\n"), ([1], b"-ERR y\r\n")]) == b"-ERR y\r\n"


def test_multi_exec(router: Router) -> None:
    s = RedisSession(router)
    assert s.handle(cmd("EXEC"))[1] == b"-ERR EXEC without MULTI\r\n"
    assert s.handle(cmd("MULTI"))[1] == b"+OK\r\n"
    assert s.handle(cmd("MULTI"))[1].startswith(b"-ERR MULTI calls can not be nested")
    assert s.handle(cmd("SET", "{t}a", "1"))[1] == b"+QUEUED\r\n"
    assert s.handle(cmd("INCR", "{t}a"))[1] == b"+QUEUED\r\n"
    tag, barrier, proto, server, lane, payload, nreplies = s.handle(cmd("EXEC"))
    assert tag == EXEC and barrier and nreplies == 4
    assert payload.startswith(b"*1\r\n$5\r\nMULTI\r\n") and payload.endswith(b"*1\r\n$4\r\nEXEC\r\n")
    # An error while queueing aborts the transaction, as in Redis.
    s.handle(cmd("MULTI"))
    assert s.handle(cmd("GET"))[1].startswith(b"-ERR wrong number")
    assert s.handle(cmd("EXEC"))[1].startswith(b"-EXECABORT")
    s.handle(cmd("MULTI"))
    assert s.handle(cmd("DISCARD"))[1] == b"+OK\r\n" and s.multi is None


def test_command_table_key_positions() -> None:
    assert command_keys(lookup(b"get"), cmd("GET", "k")) == [b"k"]
    assert command_keys(lookup(b"MSET"), cmd("MSET", "a", "1", "b", "2")) == [b"a", b"b"]
    assert command_keys(lookup(b"EVALSHA"), cmd("EVALSHA", "abc", "2", "x", "y", "argv")) == [b"x", b"y"]
    assert command_keys(lookup(b"XINFO"), cmd("XINFO", "STREAM", "s")) == [b"s"]
    assert all(spec.name == name for name, spec in COMMANDS.items())


def test_reply_order_releases_in_request_order_with_bounds() -> None:
    from shmfabric.splicer.redis_session import ReplyOrder

    order = ReplyOrder(max_slots=4, max_bytes=100)
    seqs = [order.open() for _ in range(4)]
    assert seqs == [0, 1, 2, 3] and order.full and order.pending == 4
    order.finish(2, b":2\r\n")
    order.finish(1, b":1\r\n")
    assert order.pop_ready() == b"" and order.held_bytes == 8  # held behind the head
    order.finish(0, b":0\r\n")
    assert order.pop_ready() == b":0\r\n:1\r\n:2\r\n" and order.pending == 1 and order.drained
    with pytest.raises(ValueError):
        order.finish(2, b":2\r\n")  # already answered and released
    assert order.open() == 4
    order.finish(4, b"+late\r\n")
    assert not order.idle and order.pop_ready() == b""
    order.finish(3, b"$" + b"x" * 120 + b"\r\n")
    assert order.held_bytes >= 100 and order.full
    assert order.pop_ready().endswith(b"+late\r\n") and order.idle and order.held_bytes == 0


@pytest.mark.parametrize("lanes", [2, 8])  # 2x2: grouped by KeyGroup masks; 3x8: the dict path
@pytest.mark.parametrize("proto", [2, 3])
def test_mget_split_then_merge_puts_values_back_in_key_order(lanes: int, proto: int) -> None:
    from shmfabric.splicer.redis_session import KeyGroup

    nservers = 2 if lanes == 2 else 3
    r = Router(Ketama([KetamaServer(f"s{i}", 1) for i in range(nservers)], hash_name="md5"), lanes)
    s = RedisSession(r)
    keys = [b"key:%d" % i for i in range(300)]
    tag, _, _, kind, n, parts = s.handle([b"MGET", *keys])
    assert tag == SPLIT and n == 300 and len(parts) > 1
    assert all(isinstance(w, KeyGroup) == (lanes == 2) for *_, w in parts)
    replies = []
    for _, _, payload, where in parts:
        sub = parse(payload)[1:]
        assert len(sub) == len(where) and sub == [keys[i] for i in where]
        # every third key is missing on its server
        vals = [b"$-1\r\n" if int(k[4:]) % 3 == 0 else b"$%d\r\n%s\r\n" % (len(k) + 1, k + b"!") for k in sub]
        replies.append((where, b"*%d\r\n" % len(sub) + b"".join(vals)))
    null = b"_\r\n" if proto == 3 else b"$-1\r\n"
    want = b"*300\r\n" + b"".join(null if i % 3 == 0 else b"$%d\r\n%s!\r\n" % (len(k) + 1, k) for i, k in enumerate(keys))
    assert merge_mget(300, replies, proto) == want
    short = [(replies[0][0], b"*1\r\n$1\r\nx\r\n")] + replies[1:]
    assert merge_mget(300, short, proto).startswith(b"-ERR splicer")


def test_idle_mget_reads_each_server_over_one_connection(router: Router) -> None:
    keys = [b"key:%d" % i for i in range(300)]
    busy = RedisSession(router)
    per_lane = busy.handle([b"MGET", *keys])
    assert per_lane[0] == SPLIT and per_lane[1] is False and len(per_lane[5]) > 2  # 2 servers x 3 lanes
    s = RedisSession(router)
    s.idle = True  # nothing of this client in flight: one part per server, as a barrier
    tag, barrier, _, kind, n, parts = s.handle([b"MGET", *keys])
    assert tag == SPLIT and barrier is True and kind == Kind.MGET and n == 300
    assert sorted(server for server, *_ in parts) == [0, 1]
    replies, seen = [], []
    for server, lane, payload, where in parts:
        sub = parse(payload)[1:]
        assert sub == [keys[i] for i in where]
        assert all(router.place(k)[0] == server for k in sub)
        seen += list(where)
        replies.append((where, b"*%d\r\n" % len(sub) + b"".join(b"$%d\r\n%s\r\n" % (len(k), k) for k in sub)))
    assert sorted(seen) == list(range(300))
    assert parse(merge_mget(300, replies, 2)) == keys
    # One server, two of its lanes: forwarded whole over one of them, still a barrier.
    two_lanes = keys_at(router, lambda p: p == (1, 0), 2) + keys_at(router, lambda p: p == (1, 2), 2)
    assert s.handle([b"MGET", *two_lanes])[:2] == (FORWARD, True)
    assert busy.handle([b"MGET", *two_lanes])[:2] == (SPLIT, False)
    # Writes are never re-laned.
    mset = s.handle([b"MSET", *[x for k in keys for x in (k, b"v")]])
    assert mset[1] is False and len(mset[5]) == len(per_lane[5])


def test_blocking_commands_go_whole_to_their_server(router: Router) -> None:
    from shmfabric.splicer.redis_session import BLOCK

    s = RedisSession(router)
    k = keys_at(router, lambda c: True, 1)[0]
    tag, barrier, proto, server, payload, nreplies, override, watch, wait = s.handle([b"BLPOP", k, b"0"])
    assert tag == BLOCK and barrier and server == router.place(k)[0] and (nreplies, override, watch) == (1, None, None)
    assert wait is None  # 0: for ever
    assert s.handle([b"BLPOP", k, b"1.5"])[8] == 1.5 and s.handle([b"BLPOP", k, b"x"])[8] == 0.0
    assert s.handle([b"XREAD", b"BLOCK", b"250", b"STREAMS", k, b"$"])[8] == 0.25
    assert s.handle([b"BLMPOP", b"2", b"1", k, b"LEFT"])[8] == 2.0
    assert s.handle([b"XREAD", b"BLOCK", b"0", b"STREAMS", k, b"$"])[0] == BLOCK
    assert s.handle([b"XREAD", b"COUNT", b"1", b"STREAMS", k, b"0"])[0] == FORWARD  # does not block
    assert command_keys(COMMANDS[b"XREADGROUP"], cmd("XREADGROUP", "GROUP", "g", "c", "STREAMS", "a", "b", ">", ">")) == [b"a", b"b"]
    assert s.handle(cmd("XREAD", "BLOCK", "0", "a"))[1] == b"-ERR syntax error\r\n"
    assert s.handle(cmd("XREAD", "COUNT", "1", "STREAMS"))[1] == b"-ERR syntax error\r\n"
    assert s.handle(cmd("XREAD", "STREAMS", "a", "b", "c"))[1].startswith(b"-ERR Unbalanced XREAD list")
    assert s.handle(cmd("BLMPOP", "0", "0", "a", "LEFT"))[1] == b"-ERR numkeys should be greater than 0\r\n"
    assert s.handle(cmd("BLMPOP", "0", "x", "a", "LEFT"))[1] == b"-ERR numkeys should be greater than 0\r\n"
    assert s.handle(cmd("LMPOP", "5", "a", "LEFT"))[1] == b"-ERR syntax error\r\n"
    # Option arguments are skipped as Redis does: a group or consumer named "streams" or "block"
    assert command_keys(COMMANDS[b"XREADGROUP"], cmd("XREADGROUP", "GROUP", "streams", "block", "STREAMS", "s1", ">")) \
        == [b"s1"]
    assert s.handle(cmd("XREADGROUP", "GROUP", "g", "block", "STREAMS", "s1", ">"))[0] == FORWARD  # does not block
    on0 = keys_at(router, lambda p: p[0] == 0, 1)[0]
    on1 = keys_at(router, lambda p: p[0] == 1, 1)[0]
    assert s.handle([b"BRPOP", on0, on1, b"1"])[1].startswith(b"-CROSSSERVER")


def test_watch_pins_the_transaction_to_the_watched_server(router: Router) -> None:
    from shmfabric.splicer.redis_session import BLOCK, WATCH_SET, WATCH_USE

    s = RedisSession(router)
    on0 = keys_at(router, lambda p: p[0] == 0, 2)
    on1 = keys_at(router, lambda p: p[0] == 1, 1)[0]
    action = s.handle([b"WATCH", *on0])
    assert action[0] == BLOCK and action[3] == 0 and action[7] == WATCH_SET and s.watching == 0
    assert s.handle([b"WATCH", on1])[1].startswith(b"-CROSSSERVER")  # another server than the first WATCH
    assert s.handle(cmd("MULTI"))[1] == b"+OK\r\n"
    assert s.handle([b"WATCH", on1])[1] == b"-ERR WATCH inside MULTI is not allowed\r\n"
    s.handle([b"INCR", on0[0]])
    tag, _, _, server, payload, nreplies, override, watch, _ = s.handle(cmd("EXEC"))
    assert (tag, server, nreplies, override, watch) == (BLOCK, 0, 3, None, WATCH_USE)
    assert payload.startswith(b"*1\r\n$5\r\nMULTI\r\n") and payload.endswith(b"*1\r\n$4\r\nEXEC\r\n")
    assert s.watching is None
    # keys of another server in the transaction: refused, and the WATCH undone first
    s.handle([b"WATCH", on0[0]])
    s.handle(cmd("MULTI"))
    s.handle([b"SET", on1, b"v"])
    tag, _, _, server, payload, _, override, watch, _ = s.handle(cmd("EXEC"))
    assert (tag, server, payload, watch) == (BLOCK, 0, b"*1\r\n$7\r\nUNWATCH\r\n", WATCH_USE)
    assert override.startswith(b"-CROSSSERVER EXECABORT")
    s.handle([b"WATCH", on0[0]])
    assert s.handle(cmd("UNWATCH"))[4] == b"*1\r\n$7\r\nUNWATCH\r\n" and s.watching is None
    assert s.handle(cmd("UNWATCH")) == (REPLY, b"+OK\r\n")  # nothing watched: answered here
    s.handle([b"WATCH", on0[0]])
    assert b"cannot change the protocol" in s.handle(cmd("HELLO", "3"))[1]
    assert s.handle(cmd("RESET"))[0] != REPLY and s.watching is None  # drops the connection that held it
