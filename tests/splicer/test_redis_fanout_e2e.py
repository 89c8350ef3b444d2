"""Whole-server commands through the Redis splicer, end to end: three real redis-servers, real
clients (redis-py 8's Lock and Script helpers, scan_iter, redis-cli --scan). Each result is
checked against what the servers hold, read from them directly."""
from __future__ import annotations

import os
import random
import subprocess
import time

import pytest
import redis

from shmfabric.splicer.redis_fanout import TAG_BITS
from shmfabric.splicer.redis_info import human_bytes

from .redis_fixtures import REDIS_CLI, needs_cli, needs_redis, pipeline, placed_on, redis_servers, splicer, trio  # noqa: F401 (trio: a fixture)

pytestmark = [needs_redis, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def sp(trio):
    with splicer(trio) as s:
        yield s


@pytest.fixture()
def clean(sp, trio):
    for srv in trio:
        c = srv.client()
        c.flushall()
        c.script_flush()
        c.function_flush()
    return sp


@pytest.mark.parametrize("protocol", [2, 3])
def test_redis_py_lock_and_script_helpers_work(clean, trio, protocol: int) -> None:
    """redis-py's Lock releases with a Lua script loaded by SCRIPT LOAD on NOSCRIPT: it failed
    through the splicer (and fails through twemproxy), which refused SCRIPT."""
    r = clean.client(protocol=protocol)
    lock = r.lock("resource", timeout=10)
    assert lock.acquire(blocking=False)
    assert not r.lock("resource", timeout=10).acquire(blocking=False)  # held
    assert lock.extend(5)
    lock.release()
    assert r.exists("resource") == 0
    assert r.lock("resource", timeout=10).acquire(blocking=False)
    # SCRIPT LOAD went to every server, so EVALSHA finds the script wherever its key lives.
    script = r.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    keys = [placed_on(clean, s, 1, "inc")[0] for s in range(3)]
    assert [script(keys=[k], args=[5]) for k in keys] == [5, 5, 5]
    trio[1].client().script_flush()  # one server forgets it: NOSCRIPT there, redis-py loads it again
    assert [script(keys=[k], args=[1]) for k in keys] == [6, 6, 6]


def test_dbsize_keys_and_scan_see_every_server(clean, trio) -> None:
    r = clean.client()
    names = [f"user:{i}" for i in range(700)] + [f"other:{i}" for i in range(300)]
    r.mset({k: "v" for k in names})
    r.rpush("a-list", "x")
    direct = [srv.client().dbsize() for srv in trio]
    assert all(d > 0 for d in direct)  # the keys are spread: each server holds some
    assert r.dbsize() == sum(direct) == 1001
    assert sorted(r.keys("user:*")) == sorted(k.encode() for k in names[:700])
    assert len(r.keys("*")) == 1001
    for count in (1, 10, 1000):
        seen = list(r.scan_iter(count=count))
        assert sorted(seen) == sorted([k.encode() for k in names] + [b"a-list"]), count
    assert sorted(r.scan_iter(match="other:2*", count=50)) == sorted(k.encode() for k in names if k.startswith("other:2"))
    assert list(r.scan_iter(_type="list")) == [b"a-list"]


def test_scan_cursors_visit_the_servers_in_turn(clean, trio) -> None:
    r = clean.client()
    for s in range(3):
        r.mset({k: "v" for k in placed_on(clean, s, 3, f"s{s}")})
    cursor, batches = 0, []
    while True:
        cursor, keys = r.scan(cursor, count=1000)
        batches.append(sorted(k.decode()[:2] for k in keys))
        if cursor == 0:
            break
    # each reply holds one server's keys: server 0's, then 1's, then 2's
    assert batches == [["s0"] * 3, ["s1"] * 3, ["s2"] * 3]


@needs_cli
def test_redis_cli_scan(clean) -> None:
    r = clean.client()
    r.mset({f"cli:{i}": "v" for i in range(250)})
    out = subprocess.run([REDIS_CLI, "-p", str(clean.port), "--scan", "--pattern", "cli:*"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert sorted(out.stdout.split()) == sorted(f"cli:{i}" for i in range(250))


def test_flush_is_a_barrier_in_a_pipeline(clean, trio) -> None:
    """Writes before FLUSHDB are flushed on every server whichever pooled connection carried
    them, writes after it are kept, and DBSIZE counts exactly what was written before it."""
    keys = [k.encode() for s in range(3) for k in placed_on(clean, s, 4, f"fl{s}")]
    random.Random(7).shuffle(keys)
    before = [[b"SET", k, b"1"] for k in keys]
    after = [[b"SET", k, b"2"] for k in keys[:5]]
    replies = pipeline(clean.port, before + [[b"DBSIZE"], [b"FLUSHDB"], [b"DBSIZE"]] + after
                       + [[b"DBSIZE"], [b"MGET", *keys]])
    n = len(keys)
    assert replies[:n] == [b"+OK\r\n"] * n
    assert replies[n : n + 3] == [b":%d\r\n" % n, b"+OK\r\n", b":0\r\n"]
    assert replies[n + 3 : n + 8] == [b"+OK\r\n"] * 5
    assert replies[n + 8] == b":5\r\n"
    assert sum(srv.client().dbsize() for srv in trio) == 5


def test_randomkey(clean, trio) -> None:
    r = clean.client()
    assert r.randomkey() is None
    k = placed_on(clean, 2, 1, "rk")[0]
    trio[2].client().set(k, "v")  # only the last server has a key
    assert {r.randomkey() for _ in range(10)} == {k.encode()}


def test_functions_are_loaded_everywhere(clean, trio) -> None:
    r = clean.client(protocol=3)
    code = "#!lua name=counters\nredis.register_function('bump', function(keys, args) return redis.call('INCR', keys[1]) end)"
    assert r.function_load(code) == b"counters"
    assert all(srv.client().function_list() for srv in trio)
    keys = [placed_on(clean, s, 1, "fc")[0] for s in range(3)]
    assert [r.fcall("bump", 1, k) for k in keys] == [1, 1, 1]
    assert [lib[b"library_name"] for lib in r.function_list()] == [b"counters"]  # the same on every server
    # Loading it again is refused by every server: the first error is the reply.
    with pytest.raises(Exception, match="already exists"):
        r.function_load(code)
    assert r.function_delete("counters")
    assert not any(srv.client().function_list() for srv in trio)


def test_function_list_and_dump_restore_with_several_libraries(clean, trio) -> None:
    """Each server lists libraries and functions in its own dict order (a per-process hash
    seed): FUNCTION LIST compared the bytes and failed whenever a server held two functions."""
    r = clean.client(protocol=3)
    for lib in range(3):
        body = "".join(f"redis.register_function('l{lib}f{f}', function(keys, args) return {f} end)\n" for f in range(4))
        assert r.function_load(f"#!lua name=lib{lib}\n{body}") == b"lib%d" % lib
    listed = r.function_list()
    assert sorted(lib[b"library_name"] for lib in listed) == [b"lib0", b"lib1", b"lib2"]
    assert sorted(f[b"name"] for lib in listed for f in lib[b"functions"]) == sorted(
        b"l%df%d" % (lib, f) for lib in range(3) for f in range(4))
    for proto in (2, 3):
        assert clean.client(protocol=proto).function_list()  # RESP2 lists of pairs too
    dump = r.function_dump()
    assert r.function_flush() and not any(srv.client().function_list() for srv in trio)
    assert r.function_restore(dump)  # back on every server
    assert all(len(srv.client().function_list()) == 3 for srv in trio)
    keys = [placed_on(clean, s, 1, "fl")[0] for s in range(3)]
    assert [r.fcall("l2f3", 1, k) for k in keys] == [3, 3, 3]


def test_a_scan_cursor_of_another_server_list_is_refused(clean, trio) -> None:
    """A cursor names a server by its index among n: after a change of servers it would point
    elsewhere and skip keys silently; it is refused instead, and the client starts again."""
    clean.client().mset({f"cur:{i}": "v" for i in range(3000)})
    cursor, _ = clean.client().scan(0, count=100)
    assert cursor != 0
    with splicer(trio[:2]) as other:  # the same first two servers, one fewer
        with pytest.raises(Exception, match="handed out for another list of servers"):
            other.client().scan(cursor, count=100)
        assert other.client().scan(0, count=10)[0] != 0  # a fresh iteration works
    with splicer(trio) as same:  # the same servers (another process, a worker, a restart)
        assert len(same.client().scan(cursor, count=100)[1]) > 0


def test_servers_that_disagree_are_reported(clean, trio) -> None:
    r = clean.client()
    trio[1].client().function_load("#!lua name=only_here\nredis.register_function('f', function() return 1 end)")
    with pytest.raises(Exception, match="servers 0 and 1 .* hold different functions"):
        r.function_list()
    sha = trio[0].client().script_load("return 7")
    assert r.script_exists(sha) == [False]  # not on every server: the client loads it again
    assert r.script_load("return 7") == sha
    assert r.script_exists(sha) == [True]


def test_a_down_server_fails_the_command_not_the_connection(tmp_path) -> None:
    with redis_servers(tmp_path, 2) as pair:
        with splicer(pair, timeouts={"connect": 1, "request": 5}) as s:
            r = s.client()
            r.set("k", "v")
            pair[1].kill()
            k0 = next(f"s:{i}" for i in range(100) if s.splicer.router.place(b"s:%d" % i)[0] == 0)
            server1 = b"%d" % (1 << TAG_BITS | s.splicer.router.scan_tag)  # the cursor of server 1's start
            replies = pipeline(s.port, [[b"DBSIZE"], [b"SCAN", server1], [b"PING"], [b"SCRIPT", b"LOAD", b"return 3"],
                                        [b"FUNCTION", b"FLUSH"]])
            assert replies[0].startswith(b"-ERR splicer: backend 127.0.0.1:%d" % pair[1].port), replies[0]
            assert replies[1].startswith(b"-ERR splicer: backend"), replies[1]
            assert replies[2] == b"+PONG\r\n"
            # Scripts keep working on the server that is up; the rest stays strict.
            assert replies[3] == b"$40\r\n" + pair[0].client().script_load("return 3").encode() + b"\r\n"
            assert replies[4].startswith(b"-ERR splicer: backend"), replies[4]
            lock = r.lock(k0, timeout=5)
            assert lock.acquire(blocking=False)
            lock.release()
            assert pipeline(s.port, [[b"SCAN", b"0", b"COUNT", b"100"]])[0].startswith(b"*2\r\n")  # server 0 is fine


@pytest.mark.parametrize("first_use", ["dbsize", "none"])
def test_a_write_to_every_server_is_not_sent_while_one_is_down(tmp_path, first_use: str) -> None:
    """FLUSHDB with a server down answered an error after flushing the servers that were up.
    Now it is refused at once when the server is known to be down, and otherwise sent only
    after every server answered a PING: "none" kills the server right before the FLUSHALL,
    while the splicer's connections to it still look ready."""
    with redis_servers(tmp_path, 2) as pair:
        with splicer(pair, timeouts={"connect": 1, "request": 5}) as s:
            r = s.client(protocol=3)
            r.mset({f"keep:{i}": "v" for i in range(200)})
            kept = pair[0].client().dbsize()
            assert kept > 0
            pair[1].kill()
            if first_use == "dbsize":
                with pytest.raises(redis.ResponseError) as lost:
                    r.dbsize()  # the first use finds the server gone
                # One lost server is one failure, said once: not nested in a handshake refusal.
                assert "handshake" not in str(lost.value)
            replies = pipeline(s.port, [[b"FLUSHALL"], [b"FLUSHDB", b"ASYNC"],
                                        [b"FUNCTION", b"LOAD", b"#!lua name=nowhere\nredis.register_function('f', function() return 1 end)"],
                                        [b"PING"]])
            for reply in replies[:3]:
                assert reply.startswith(b"-ERR splicer: backend 127.0.0.1:%d " % pair[1].port), reply
                assert b"handshake" not in reply
            assert replies[3] == b"+PONG\r\n"
            assert pair[0].client().dbsize() == kept  # nothing ran on the server that is up
            assert pair[0].client().function_list() == []


def test_with_auto_eject_the_pool_is_the_servers_up(tmp_path) -> None:
    """With auto_eject, an ejected server's keys live on the others: DBSIZE, KEYS and a SCAN loop
    answer from the servers in the continuum instead of failing, and a cursor from before the
    ejection is refused (it counted servers that are no longer in the pool)."""
    with redis_servers(tmp_path, 3) as trio:
        with splicer(trio, auto_eject=True, health={"interval": 0.1, "timeout": 0.5, "rise": 1, "fall": 1},
                     timeouts={"connect": 0.5, "request": 5}) as s:
            r = s.client()
            r.mset({f"ae:{i}": "v" for i in range(600)})
            old_cursor, _ = r.scan(0, count=50)
            assert old_cursor != 0
            trio[2].kill()
            for _ in range(200):
                if not s.stats()["servers"][2]["up"] and s.splicer.router.pool == [0, 1]:
                    break
                time.sleep(0.05)
            assert s.splicer.router.pool == [0, 1]
            live = trio[0].client().dbsize() + trio[1].client().dbsize()
            assert r.dbsize() == live and len(r.keys("ae:*")) == live
            assert sorted(r.scan_iter(count=100)) == sorted(r.keys("*"))
            with pytest.raises(redis.ResponseError, match="another list of servers"):
                r.scan(old_cursor)
            # Writes still go to every configured server: refused while one is ejected (a
            # FLUSHALL without it would see its keys come back when it returns).
            with pytest.raises(redis.ResponseError, match=r"127\.0\.0\.1:%d is unavailable \(.*ejected" % trio[2].port):
                r.flushall()
            assert r.dbsize() == live


def test_an_ejected_server_is_named_as_ejected() -> None:
    """With auto_eject, a server out of the pool gets no connection attempt until its health
    checks pass: the error said "next connection attempt in N ms" all the same."""
    from shmfabric.splicer.config import RedisSpliceConfig
    from shmfabric.splicer.redis_proxy import RedisSplicer

    cfg = RedisSpliceConfig.model_validate(dict(listen="127.0.0.1:0", servers=["127.0.0.1:1", "127.0.0.1:2"],
                                                auto_eject=True, health={"interval": 0.5, "rise": 3}))
    sp = RedisSplicer(cfg)
    sp._servers[1].up = False
    err = sp._down_error(1)
    assert err.startswith(b"-ERR splicer: backend 127.0.0.1:2 is unavailable (ejected by health checks: back after 3 "
                          b"passing checks, one every 0.5 s)")
    assert b"next connection attempt" in sp._down_error(0)  # up: the usual retry wait


def test_a_large_reply_then_a_small_one(sp) -> None:
    """The reply after a large one came only at the request timeout (a stale byte count in the
    reply scanner, older than whole-server commands)."""
    r = sp.client()
    r.set("big", "x" * 1_000_000)
    for _ in range(3):
        assert len(r.get("big")) == 1_000_000
        assert r.strlen("big") == 1_000_000  # was: "did not answer within 30 s"


def test_without_health_checks_a_returning_server_takes_writes_again(tmp_path) -> None:
    """Failed connects mark a server down, and only health checks mark it up again: with them
    off (--no-health), FLUSHALL was refused for good once a server had failed three times."""
    with redis_servers(tmp_path, 2) as pair:
        with splicer(pair, timeouts={"connect": 0.5, "request": 5}) as s:
            r = s.client()
            k1 = next(f"h:{i}" for i in range(100) if s.splicer.router.place(b"h:%d" % i)[0] == 1)
            port = pair[1].port
            pair[1].kill()
            for _ in range(40):  # several failed connects, past health.fall
                try:
                    r.get(k1)
                except redis.ResponseError:
                    pass
                if not s.stats()["servers"][1]["up"]:
                    break
                time.sleep(0.1)
            assert not s.stats()["servers"][1]["up"]
            pair[1].port = port
            pair[1].start()
            for _ in range(100):
                try:
                    if r.flushall():
                        break
                except redis.ResponseError:
                    time.sleep(0.1)
            else:
                raise AssertionError("FLUSHALL still refused after the server came back")


@pytest.mark.parametrize("protocol", [2, 3])
def test_info_answers_for_the_servers_as_one(clean, trio, protocol: int) -> None:
    """RQ and Sidekiq read redis_version from INFO before they start, redis-cli --stat and
    exporters read its counters; twemproxy refuses INFO."""
    r = clean.client(protocol=protocol)
    r.mset({f"info:{i}": "v" for i in range(300)})
    r.set("info:ttl", "v", ex=1000)
    info = r.info()
    direct = [s.client().info() for s in trio]
    assert info["redis_version"] == min((d["redis_version"] for d in direct), key=lambda v: tuple(map(int, v.split("."))))
    assert info["db0"]["keys"] == sum(d["db0"]["keys"] for d in direct) == 301
    assert info["db0"]["expires"] == 1
    assert info["process_id"] == os.getpid() and info["tcp_port"] == clean.port  # the splicer runs in this process
    assert info["connected_clients"] == clean.stats()["clients"]
    assert info["splicer_servers"] == 3
    for d in direct:  # the *_human figures are printed as redis-server prints them
        assert human_bytes(d["used_memory"]) == d["used_memory_human"]
    assert info["used_memory_human"] == human_bytes(info["used_memory"])
    assert list(r.info("keyspace")) == ["db0"]
    assert set(r.info("server")) >= {"redis_version", "splicer_version", "uptime_in_seconds"}
    assert "db0" not in r.info("server") and "used_memory" in r.info("memory")


@needs_cli
def test_redis_cli_stat_through_the_splicer(clean) -> None:
    clean.client().mset({f"stat:{i}": "v" for i in range(50)})
    import pty

    # A terminal: redis-cli buffers --stat's rows when writing to a pipe.
    master, slave = pty.openpty()
    proc = subprocess.Popen([REDIS_CLI, "-p", str(clean.port), "--stat", "-i", "0.2"], stdout=slave,
                            stderr=slave)
    os.close(slave)
    time.sleep(1.5)
    proc.terminate()
    proc.wait(timeout=10)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the terminal's other end is closed and drained
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    out = b"".join(chunks).decode(errors="replace")
    rows = [line.split() for line in out.splitlines() if line.strip() and line.split()[0].isdigit()]
    assert rows and all(row[0] == "50" for row in rows), out  # keys, summed over the servers
