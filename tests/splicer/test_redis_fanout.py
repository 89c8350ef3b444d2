"""Whole-server commands of the Redis splicer, planned and merged (pure: no sockets).

The end-to-end half, against real redis-servers and redis-py's Lock, is
test_redis_fanout_e2e.py."""
from __future__ import annotations

import zlib

import hiredis
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shmfabric.splicer.redis_commands import COMMANDS, REFUSED, Kind
from shmfabric.splicer.redis_fanout import (
    ALL_OR_NONE,
    CURSOR_MAX,
    Merge,
    merge_all_ok,
    merge_concat,
    merge_min,
    merge_random,
    merge_same,
    merge_same_up,
    merge_first_up,
    merge_same_set,
    merge_scan,
    parse_cursor,
    plan,
    scan_tag,
    TAG_BITS,
    Where,
)
from shmfabric.splicer.redis_ketama import Ketama, KetamaServer
from shmfabric.splicer.redis_resp import encode_command
from shmfabric.splicer.redis_session import EXEC, REPLY, SPLIT, RedisSession, Router, merge_parts


def parse(data: bytes):
    r = hiredis.Reader()
    r.feed(data)
    return r.gets()


def cmd(*words: str | bytes) -> list[bytes]:
    return [w.encode() if isinstance(w, str) else w for w in words]


TAG = 0x5A17


def planned(*words: str, n: int = 3, tag: int = TAG, servers: list[int] | None = None):
    args = cmd(*words)
    return plan(args[0].upper(), args, list(range(n)) if servers is None else servers, encode_command(args), tag)


def where(server: int, n: int, name: str, tag: int = TAG) -> Where:
    return Where(server, server, n, name, tag)


# -- planning ----------------------------------------------------------------------------------


def test_whole_server_commands_are_known_and_not_refused() -> None:
    for name in (b"DBSIZE", b"KEYS", b"SCAN", b"RANDOMKEY", b"FLUSHDB", b"FLUSHALL", b"SCRIPT", b"FUNCTION",
                 b"PUBSUB", b"INFO"):
        assert COMMANDS[name].kind == Kind.FANOUT
        assert name not in REFUSED
    for name in (b"CONFIG", b"WAIT", b"TIME"):  # still refused, with a reason
        assert name in REFUSED


def test_every_server_gets_the_command_once() -> None:
    merge, parts = planned("FLUSHALL", "ASYNC")
    assert merge == Merge.ALL_OK
    assert [p[0] for p in parts] == [0, 1, 2]
    assert all(p[2] == encode_command(cmd("FLUSHALL", "ASYNC")) for p in parts)
    assert parts[0][3] == Where(0, 0, 3, "FLUSHALL", TAG)
    assert planned("DBSIZE")[0] == Merge.SUM
    assert planned("KEYS", "user:*")[0] == Merge.CONCAT
    assert planned("RANDOMKEY")[0] == Merge.RANDOM
    assert planned("script", "load", "return 1")[0] == Merge.SAME_UP  # any case, as Redis
    assert planned("SCRIPT", "EXISTS", "a" * 40)[0] == Merge.MIN
    assert planned("FUNCTION", "DELETE", "lib")[0] == Merge.ALL_OK
    assert planned("FUNCTION", "LOAD", "code")[1][2][3] == Where(2, 2, 3, "FUNCTION LOAD", TAG)
    assert planned("FUNCTION", "LIST")[0] == Merge.SAME_SET
    assert planned("FUNCTION", "DUMP")[0] == Merge.FIRST_UP


def test_subcommands_that_cannot_work_say_why() -> None:
    kill = planned("SCRIPT", "KILL")
    assert kill.startswith(b"-ERR 'script kill' is not supported by the splicer: it must reach a server busy")
    assert b"connection of its own" in planned("SCRIPT", "DEBUG", "YES")
    assert b"'function stats' is not supported" in planned("FUNCTION", "STATS")
    assert planned("SCRIPT", "NOPE") == b"-ERR unknown subcommand 'NOPE'. Try SCRIPT HELP.\r\n"  # Redis's words


@pytest.mark.parametrize("cursor", ["abc", "1.5", " 1", "1 ", "+", "-", "18446744073709551616", "\uff11"])
def test_scan_refuses_what_redis_refuses(cursor: str) -> None:
    assert parse_cursor(cursor.encode()) is None
    assert planned("SCAN", cursor) == b"-ERR invalid cursor\r\n"


def test_scan_cursor_reads_as_redis_reads_it() -> None:
    """strtoul, as redis-server 7.0: an empty cursor is 0, a sign is allowed, a minus wraps."""
    assert [parse_cursor(c) for c in (b"", b"0", b"+0", b"00", b"-0", b"123")] == [0, 0, 0, 0, 0, 123]
    assert parse_cursor(b"-1") == CURSOR_MAX and parse_cursor(b"%d" % CURSOR_MAX) == CURSOR_MAX


def test_scan_tag_is_a_stable_16_bits_of_the_server_list() -> None:
    names = ["127.0.0.1:6379", "127.0.0.1:6380"]
    assert scan_tag(names) == scan_tag(list(names)) == 1 + zlib.crc32(b"127.0.0.1:6379\x00127.0.0.1:6380") % 65535
    assert all(1 <= scan_tag([f"s{i}"]) < 2**TAG_BITS for i in range(300))
    assert scan_tag(names) != scan_tag(names[::-1])  # order matters: it places the cursor
    # A reviewer's one-byte tag collided for 1.4% of 2-server pools (the full list against a
    # list with one server ejected), 55% of 20-server ones; with 16 bits, none of these do.
    for n in (2, 5, 10, 20):
        for base in range(20000, 20000 + 50 * n, n):
            full = [f"127.0.0.1:{base + i}" for i in range(n)]
            tags = {scan_tag(full[:i] + full[i + 1:]) for i in range(n)}
            assert scan_tag(full) not in tags


def scan_cursor(k: int, tag: int = TAG) -> str:
    return str(k << TAG_BITS | tag)


def test_scan_cursor_names_a_server_and_its_cursor() -> None:
    merge, parts = planned("SCAN", "0", "MATCH", "k*")
    assert merge == Merge.SCAN and len(parts) == 1
    assert parts[0][0] == 0 and parts[0][2] == encode_command(cmd("SCAN", "0", "MATCH", "k*"))
    _, parts = planned("SCAN", scan_cursor(5 * 3 + 2), "COUNT", "5")  # server 2 at its cursor 5
    assert parts[0][0] == 2 and parts[0][2] == encode_command(cmd("SCAN", "5", "COUNT", "5"))
    assert parts[0][3] == Where(2, 2, 3, "SCAN", TAG)
    _, parts = planned("SCAN", scan_cursor(1))  # server 1 from its start
    assert parts[0][0] == 1 and parts[0][2] == encode_command(cmd("SCAN", "0"))


def test_only_the_servers_in_the_pool_are_asked() -> None:
    """With auto_eject, whole-server commands go to the servers in the continuum: SCAN's cursor
    counts among them (server 2 is the second of [0, 2])."""
    merge, parts = planned("DBSIZE", servers=[0, 2])
    assert [(p[0], p[3].rank, p[3].count) for p in parts] == [(0, 0, 2), (2, 1, 2)]
    _, parts = planned("SCAN", scan_cursor(7 * 2 + 1), servers=[0, 2])
    assert parts[0][0] == 2 and parse(parts[0][2]) == [b"SCAN", b"7"]
    assert parse(merge_scan([(parts[0][3], scan_reply(0, []))])) == [b"0", []]  # the last in the pool
    assert planned("DBSIZE", servers=[]).startswith(b"-ERR splicer: no server is in the pool")
    # Writes go to every configured server all the same: one left out would keep its keys.
    args = cmd("FLUSHALL")
    merge, parts = plan(b"FLUSHALL", args, [0, 2], encode_command(args), TAG, [0, 1, 2])
    assert merge in ALL_OR_NONE and [p[0] for p in parts] == [0, 1, 2]
    args = cmd("SCRIPT", "LOAD", "return 1")  # a script may skip a server: reloaded on NOSCRIPT
    assert [p[0] for p in plan(b"SCRIPT", args, [0, 2], encode_command(args), TAG, [0, 1, 2])[1]] == [0, 2]


def test_a_cursor_of_another_server_list_is_refused() -> None:
    refused = planned("SCAN", scan_cursor(7, tag=TAG + 1))
    assert refused.startswith(b"-ERR splicer: this SCAN cursor was handed out for another list of servers")
    assert b"cursor 0" in refused
    assert planned("SCAN", "0", tag=TAG + 1)[0] == Merge.SCAN  # 0 always starts


def scan_reply(cursor: int, keys: list[bytes]) -> bytes:
    c = b"%d" % cursor
    return b"*2\r\n$%d\r\n%s\r\n*%d\r\n" % (len(c), c, len(keys)) + b"".join(b"$%d\r\n%s\r\n" % (len(k), k) for k in keys)


def test_scan_reply_cursor_moves_on_server_by_server() -> None:
    assert parse(merge_scan([(where(0, 3, "SCAN"), scan_reply(5, [b"a"]))])) == [scan_cursor(15).encode(), [b"a"]]
    assert parse(merge_scan([(where(1, 3, "SCAN"), scan_reply(0, [b"b", b"c"]))])) == [scan_cursor(2).encode(), [b"b", b"c"]]
    assert parse(merge_scan([(where(2, 3, "SCAN"), scan_reply(0, []))])) == [b"0", []]  # the last server: done
    assert parse(merge_scan([(where(0, 1, "SCAN"), scan_reply(7, [b"x"]))])) == [scan_cursor(7).encode(), [b"x"]]
    too_big = merge_scan([(where(1, 3, "SCAN"), scan_reply(2**47, []))])
    assert too_big.startswith(b"-ERR splicer: server 1's SCAN cursor") and b"directly" in too_big
    assert merge_scan([(where(0, 2, "SCAN"), b"-ERR boom\r\n")]) == b"-ERR boom\r\n"
    assert merge_scan([(where(0, 2, "SCAN"), b":1\r\n")]).startswith(b"-ERR splicer: a backend answered SCAN")


@given(st.lists(st.lists(st.integers(0, 2**40), min_size=1, max_size=5), min_size=1, max_size=6),
       st.integers(1, 255))
def test_scan_cursor_round_trip(server_cursors: list[list[int]], tag: int) -> None:
    """Any sequence of server cursors a client is handed back routes to the same server and cursor."""
    n = len(server_cursors)
    for s, cursors in enumerate(server_cursors):
        for c in cursors:
            reply = parse(merge_scan([(where(s, n, "SCAN", tag), scan_reply(c, []))]))
            nxt = int(reply[0])
            if c == 0 and s + 1 == n:
                assert nxt == 0
                continue
            merge, parts = planned("SCAN", str(nxt), n=n, tag=tag)
            assert parts[0][0] == (s + 1 if c == 0 else s)
            assert parse(parts[0][2]) == [b"SCAN", b"%d" % c]


# -- merging -----------------------------------------------------------------------------------


def test_keys_concatenate_server_by_server() -> None:
    parts = [(where(0, 2, "KEYS"), b"*2\r\n$1\r\na\r\n$1\r\nb\r\n"), (where(1, 2, "KEYS"), b"*1\r\n$1\r\nc\r\n")]
    assert parse(merge_concat(parts)) == [b"a", b"b", b"c"]
    assert parse(merge_concat([(where(0, 1, "KEYS"), b"*0\r\n")])) == []
    assert merge_concat([parts[0], (where(1, 2, "KEYS"), b"-ERR x\r\n")]) == b"-ERR x\r\n"
    assert merge_concat([parts[0], (where(1, 2, "KEYS"), b"*-1\r\n")]).startswith(b"-ERR splicer: a backend answered KEYS")


def test_same_answer_or_an_error_naming_the_servers() -> None:
    sha = b"$40\r\n" + b"e" * 40 + b"\r\n"
    w = [where(i, 3, "SCRIPT LOAD") for i in range(3)]
    assert merge_same([(w[0], sha), (w[1], sha), (w[2], sha)]) == sha
    differ = merge_same([(w[0], sha), (w[1], sha), (w[2], b"$3\r\nlib\r\n")])
    assert differ.startswith(b"-ERR splicer: servers 0 and 2 (in config order, from 0) answered SCRIPT LOAD differently")
    assert merge_same([(w[0], sha), (w[1], b"-ERR Library 'x' already exists\r\n")]).startswith(b"-ERR Library")


def test_function_list_compares_the_libraries_not_their_order() -> None:
    """Redis lists libraries and functions in dict order, which differs between servers holding
    the same ones (a per-process hash seed): the bytes differ, the libraries do not."""
    def lib(name: bytes, funcs: list[bytes]) -> list:
        return [b"library_name", name, b"engine", b"LUA",
                b"functions", [[b"name", f, b"description", None, b"flags", []] for f in funcs]]

    def enc(libs: list, proto: int) -> bytes:
        from shmfabric.splicer.redis_resp import encode_value
        if proto == 3:
            libs = [{l[i]: (l[i + 1] if l[i] != b"functions" else [dict(zip(f[::2], f[1::2])) for f in l[i + 1]])
                     for i in range(0, len(l), 2)} for l in libs]
        return encode_value(libs, proto)

    a = [lib(b"lib0", [b"f1", b"f2"]), lib(b"lib1", [b"g"])]
    b = [lib(b"lib1", [b"g"]), lib(b"lib0", [b"f2", b"f1"])]
    w = [where(i, 2, "FUNCTION LIST") for i in range(2)]
    for proto in (2, 3):
        assert enc(a, proto) != enc(b, proto)
        assert merge_same_set([(w[0], enc(a, proto)), (w[1], enc(b, proto))]) == enc(a, proto)
        other = merge_same_set([(w[0], enc(a, proto)), (w[1], enc([lib(b"lib1", [b"g"])], proto))])
        assert other.startswith(b"-ERR splicer: servers 0 and 1 (in config order, from 0) hold different functions")
    assert merge_same_set([(w[0], b"*0\r\n"), (w[1], b"-ERR x\r\n")]) == b"-ERR x\r\n"
    # RESP2 lists a library as [key, value, ...]: the pairs count, not the multiset of words
    # (function x described "y" is not function y described "x").
    x = [[b"library_name", b"lib", b"engine", b"LUA", b"functions",
          [[b"name", b"x", b"description", b"y", b"flags", []]]]]
    y = [[b"library_name", b"lib", b"engine", b"LUA", b"functions",
          [[b"name", b"y", b"description", b"x", b"flags", []]]]]
    assert merge_same_set([(w[0], enc(x, 2)), (w[1], enc(y, 2))]).startswith(b"-ERR splicer: servers 0 and 1")


def test_function_dump_comes_from_the_first_server_up() -> None:
    down = b"-ERR splicer: backend 127.0.0.1:7001 is unavailable (next connection attempt in 40 ms)\r\n"
    w = [where(i, 2, "FUNCTION DUMP") for i in range(2)]
    assert merge_first_up([(w[0], b"$3\r\nabc\r\n"), (w[1], b"$3\r\nxyz\r\n")]) == b"$3\r\nabc\r\n"
    assert merge_first_up([(w[0], down), (w[1], b"$3\r\nxyz\r\n")]) == b"$3\r\nxyz\r\n"
    assert merge_first_up([(w[0], down), (w[1], down)]) == down


def test_script_load_and_exists_leave_out_servers_that_are_down() -> None:
    down = b"-ERR splicer: backend 127.0.0.1:7002 is unavailable (next connection attempt in 40 ms)\r\n"
    sha = b"$40\r\n" + b"e" * 40 + b"\r\n"
    w = [where(i, 3, "SCRIPT LOAD") for i in range(3)]
    assert merge_same_up([(w[0], sha), (w[1], down), (w[2], sha)]) == sha
    assert merge_same_up([(w[0], down), (w[1], down)]) == down  # nobody answered: why
    assert merge_same_up([(w[0], sha), (w[1], b"-ERR other\r\n")]) == b"-ERR other\r\n"  # a server's own error stays
    assert merge_same([(w[0], sha), (w[1], down)]) == down  # FUNCTION LOAD and the rest: strict
    w = [where(i, 2, "SCRIPT EXISTS") for i in range(2)]
    assert parse(merge_min([(w[0], b"*2\r\n:1\r\n:0\r\n"), (w[1], down)])) == [1, 0]


def test_script_exists_only_where_every_server_has_it() -> None:
    w = [where(i, 2, "SCRIPT EXISTS") for i in range(2)]
    assert parse(merge_min([(w[0], b"*3\r\n:1\r\n:1\r\n:0\r\n"), (w[1], b"*3\r\n:1\r\n:0\r\n:0\r\n")])) == [1, 0, 0]
    assert merge_min([(w[0], b"*1\r\n:1\r\n"), (w[1], b"*2\r\n:1\r\n:1\r\n")]).startswith(b"-ERR splicer")
    assert merge_min([(w[0], b"*1\r\n$1\r\n1\r\n"), (w[1], b"*1\r\n:1\r\n")]).startswith(b"-ERR splicer")


def test_randomkey_prefers_a_server_with_keys() -> None:
    w = [where(i, 3, "RANDOMKEY") for i in range(3)]
    for _ in range(20):
        assert merge_random([(w[0], b"$-1\r\n"), (w[1], b"$1\r\nk\r\n"), (w[2], b"$-1\r\n")]) == b"$1\r\nk\r\n"
    assert merge_random([(w[0], b"_\r\n"), (w[1], b"_\r\n")]) == b"_\r\n"  # RESP3 null: all empty
    seen = {merge_random([(w[0], b"$1\r\na\r\n"), (w[1], b"$1\r\nb\r\n")]) for _ in range(200)}
    assert seen == {b"$1\r\na\r\n", b"$1\r\nb\r\n"}
    assert merge_random([(w[0], b"$1\r\na\r\n"), (w[1], b"-ERR down\r\n")]) == b"-ERR down\r\n"


def test_all_ok_names_the_command() -> None:
    w = [where(i, 2, "FLUSHDB") for i in range(2)]
    assert merge_all_ok([(w[0], b"+OK\r\n"), (w[1], b"+OK\r\n")]) == b"+OK\r\n"
    assert merge_all_ok([(w[0], b"+OK\r\n"), (w[1], b":1\r\n")]) == \
        b"-ERR splicer: a backend answered FLUSHDB with an unexpected reply\r\n"
    assert merge_parts(Merge.SUM, 2, [(w[0], b":3\r\n"), (w[1], b":4\r\n")], 2, [None, None]) == b":7\r\n"  # DBSIZE


# -- the session ----------------------------------------------------------------------------------


@pytest.fixture()
def session() -> RedisSession:
    servers = [KetamaServer(f"127.0.0.1:{7001 + i}") for i in range(3)]
    return RedisSession(Router(Ketama(servers), lanes=2))


def test_a_whole_server_command_is_a_barrier_over_every_server(session: RedisSession) -> None:
    action = session.handle(cmd("DBSIZE"))
    tag, barrier, proto, kind, n, parts = action
    assert (tag, barrier, proto, kind, n) == (SPLIT, True, 2, Merge.SUM, 3)
    assert [(p[0], p[1]) for p in parts] == [(0, 0), (1, 0), (2, 0)]
    session.handle(cmd("HELLO", "3"))
    assert session.handle(cmd("KEYS", "*"))[2] == 3  # the lanes of the client's protocol
    assert session.handle(cmd("SCAN", "x")) == (REPLY, b"-ERR invalid cursor\r\n")
    assert session.handle(cmd("DBSIZE", "extra"))[1] == b"-ERR wrong number of arguments for 'dbsize' command\r\n"


def test_inside_multi_it_aborts_the_transaction(session: RedisSession) -> None:
    assert session.handle(cmd("MULTI"))[0] == REPLY
    refused = session.handle(cmd("FLUSHDB"))[1]
    assert refused.startswith(b"-ERR 'flushdb' inside MULTI is not supported by the splicer: it runs on every server")
    assert session.handle(cmd("SET", "a", "1"))[1] == b"+QUEUED\r\n"
    assert session.handle(cmd("EXEC"))[1].startswith(b"-EXECABORT")
    assert session.handle(cmd("MULTI"))[0] == REPLY
    session.handle(cmd("SET", "a", "1"))
    assert session.handle(cmd("EXEC"))[0] == EXEC  # the next transaction is not affected
