"""Blocking commands through the Redis splicer, end to end (real redis-servers, redis-py and raw
RESP): each runs over the client's own connection to its keys' server, so the pooled
connections other clients share are never held by a blocked command."""
from __future__ import annotations

import threading
import time

import pytest
import redis

from .redis_fixtures import needs_redis, pipeline, pipeline_on, placed_on, redis_servers, splicer, trio  # noqa: F401 (trio: a fixture)

pytestmark = [needs_redis, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def sp(trio):
    # One pooled connection per server: a blocked command on it would stop every other client.
    with splicer(trio, pool={"min": 1, "max": 1}) as s:
        yield s


@pytest.fixture()
def clean(sp, trio):
    for srv in trio:
        srv.client().flushall()
    return sp


@pytest.mark.parametrize("protocol", [2, 3])
def test_blpop_waits_for_a_push_and_times_out(clean, protocol: int) -> None:
    r = clean.client(protocol=protocol)
    assert r.blpop(["bq"], timeout=0.2) is None
    threading.Timer(0.3, lambda: clean.client().rpush("bq", "job")).start()
    assert list(r.blpop(["bq"], timeout=10)) == [b"bq", b"job"]


def test_blocked_clients_do_not_hold_the_pool(clean, trio) -> None:
    keys = placed_on(clean, 0, 10, "block")
    done: list = []
    threads = [threading.Thread(target=lambda k=k: done.append(clean.client().blpop([k], timeout=20))) for k in keys]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while trio[0].client().info("clients")["blocked_clients"] < 10 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert trio[0].client().info("clients")["blocked_clients"] == 10
    other = clean.client()
    for k in placed_on(clean, 0, 50, "free"):  # the same server, through its one pooled connection
        other.set(k, "v")
        assert other.get(k) == b"v"
    assert not done  # all still blocked meanwhile
    for k in keys:
        other.rpush(k, "x")
    for t in threads:
        t.join(10)
    assert sorted(done) == sorted((k.encode(), b"x") for k in keys)


def test_a_client_that_leaves_while_blocked_takes_nothing(clean, trio) -> None:
    k = placed_on(clean, 1, 1, "gone")[0]
    payload = b"*3\r\n$5\r\nBLPOP\r\n$%d\r\n%s\r\n$1\r\n0\r\n" % (len(k), k.encode())
    import socket

    s = socket.create_connection(("127.0.0.1", clean.port))
    s.sendall(payload)
    direct = trio[1].client()
    deadline = time.monotonic() + 10
    while direct.info("clients")["blocked_clients"] < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    s.close()
    while direct.info("clients")["blocked_clients"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert direct.info("clients")["blocked_clients"] == 0
    clean.client().rpush(k, "item")
    time.sleep(0.2)
    assert direct.lrange(k, 0, -1) == [b"item"]  # not popped for a client that is gone


def test_blocking_commands_of_every_kind(clean, trio) -> None:
    r = clean.client(protocol=2)
    src, dst, z, st = placed_on(clean, 0, 4, "bk")  # one server's keys
    r.rpush(src, "a", "b")
    assert r.blmove(src, dst, 1, "LEFT", "RIGHT") == b"a"
    assert r.brpoplpush(src, dst, 1) == b"b"
    assert r.lrange(dst, 0, -1) == [b"b", b"a"]  # BRPOPLPUSH pushes on the left
    assert r.execute_command("BLMPOP", 1, 1, dst, "LEFT") == [dst.encode(), [b"b"]]
    r.zadd(z, {"m": 1})
    assert r.bzpopmin([z], timeout=1) == (z.encode(), b"m", 1.0)
    r.xadd(st, {"f": "v"})
    r.xgroup_create(st, "g", id="0")
    got = r.xreadgroup("g", "c", {st: ">"}, block=100)
    assert got[0][0] == st.encode() and got[0][1][0][1] == {b"f": b"v"}
    assert r.xread({st: "$"}, block=100) == []  # timed out
    with pytest.raises(redis.ResponseError, match="CROSSSERVER"):
        r.blpop([placed_on(clean, 0, 1, "x")[0], placed_on(clean, 1, 1, "x")[0]], timeout=1)
    # The same errors as redis-server for the STREAMS list
    bad = [[b"XREAD", b"BLOCK", b"10", b"s"], [b"XREAD", b"BLOCK", b"10", b"STREAMS", b"a", b"b", b"c"]]
    assert pipeline(clean.port, bad) == pipeline(trio[0].port, bad)


def test_commands_after_a_blocked_one_wait_for_it(clean) -> None:
    k = placed_on(clean, 2, 1, "order")[0]
    threading.Timer(0.3, lambda: clean.client().rpush(k, "first")).start()
    replies = pipeline(clean.port, [[b"BLPOP", k.encode(), b"5"], [b"RPUSH", k.encode(), b"second"], [b"LRANGE", k.encode(), b"0", b"-1"]])
    assert replies[0] == b"*2\r\n$%d\r\n%s\r\n$5\r\nfirst\r\n" % (len(k), k.encode())
    assert replies[1] == b":1\r\n" and replies[2] == b"*1\r\n$6\r\nsecond\r\n"


def test_inside_multi_a_blocking_command_does_not_block(clean) -> None:
    r = clean.client()
    p = r.pipeline(transaction=True)
    p.rpush("mq", "x")
    p.blpop(["mq"], timeout=0)
    p.blpop(["mq"], timeout=0)  # empty: nil at once, as in Redis
    assert p.execute() == [1, (b"mq", b"x"), None]


def test_a_server_killed_under_a_blocked_client(tmp_path) -> None:
    with redis_servers(tmp_path, 2) as pair:
        with splicer(pair, timeouts={"connect": 1, "request": 5}) as s:
            k = placed_on(s, 1, 1, "dead")[0]
            out: list = []

            def wait() -> None:
                try:
                    out.append(s.client().blpop([k], timeout=0))
                except redis.ResponseError as exc:
                    out.append(exc)

            t = threading.Thread(target=wait)
            t.start()
            deadline = time.monotonic() + 10
            while pair[1].client().info("clients")["blocked_clients"] < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            pair[1].kill()
            t.join(10)
            assert len(out) == 1 and isinstance(out[0], redis.ResponseError)
            assert "127.0.0.1:%d" % pair[1].port in str(out[0]) and "blocking" in str(out[0])
            pair[1].start()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # after the backoff, a new connection serves it
                try:
                    s.client().rpush(k, "v")
                    break
                except redis.ResponseError:
                    time.sleep(0.1)
            assert s.client().blpop([k], timeout=5) == (k.encode(), b"v")


# -- WATCH: on the client's own connection, where EXEC then runs --------------------------------


@pytest.mark.parametrize("protocol", [2, 3])
def test_optimistic_transactions_with_watch(clean, protocol: int) -> None:
    """redis-py's transaction helper: WATCH, read, MULTI/EXEC, retried when another client
    changed a watched key in between (EXEC answers nil), as against one Redis server."""
    r = clean.client(protocol=protocol)
    key = placed_on(clean, 1, 1, "cas")[0]
    r.set(key, 0)
    interfered = []

    def add_one(pipe) -> None:
        value = int(pipe.get(key))
        if not interfered:  # another client changes the key between WATCH and EXEC, once
            interfered.append(clean.client().set(key, 100))
        pipe.multi()
        pipe.set(key, value + 1)

    r.transaction(add_one, key)
    assert r.get(key) == b"101"  # the first EXEC was refused (nil), the retry saw 100
    assert len(interfered) == 1


def test_exec_answers_nil_when_a_watched_key_changed(clean, trio) -> None:
    key = placed_on(clean, 0, 1, "nil")[0]
    other = placed_on(clean, 0, 1, "nil2")[0]
    import socket

    s = socket.create_connection(("127.0.0.1", clean.port), timeout=10)
    try:
        replies = pipeline_on(s, [[b"WATCH", key.encode()], [b"GET", key.encode()]])
        assert replies == [b"+OK\r\n", b"$-1\r\n"]
        trio[0].client().set(key, "changed")  # straight on the server: the splicer is not involved
        replies = pipeline_on(s, [[b"MULTI"], [b"SET", other.encode(), b"x"], [b"EXEC"], [b"GET", other.encode()]])
        assert replies == [b"+OK\r\n", b"+QUEUED\r\n", b"*-1\r\n", b"$-1\r\n"]  # not run
        replies = pipeline_on(s, [[b"WATCH", key.encode()], [b"UNWATCH"], [b"MULTI"], [b"SET", other.encode(), b"y"],
                                  [b"EXEC"]])
        assert replies[-1] == b"*1\r\n+OK\r\n"  # unwatched: runs
    finally:
        s.close()


def test_watch_across_servers_is_refused(clean) -> None:
    r = clean.client()
    a, b = placed_on(clean, 0, 1, "w")[0], placed_on(clean, 1, 1, "w")[0]
    with pytest.raises(redis.ResponseError, match="CROSSSERVER"):
        r.execute_command("WATCH", a, b)
    p = r.pipeline(transaction=True)
    p.watch(a)
    p.multi()
    p.set(b, "x")
    with pytest.raises(redis.ResponseError, match="CROSSSERVER EXECABORT"):
        p.execute()
    assert r.get(b) is None


def test_a_lost_watch_fails_the_transaction(tmp_path) -> None:
    with redis_servers(tmp_path, 2) as pair:
        with splicer(pair, timeouts={"connect": 1, "request": 5}) as s:
            key = placed_on(s, 1, 1, "lost")[0]
            import socket

            c = socket.create_connection(("127.0.0.1", s.port), timeout=10)
            try:
                assert pipeline_on(c, [[b"WATCH", key.encode()]]) == [b"+OK\r\n"]
                for info in pair[1].client().client_list():  # the connection holding the WATCH
                    if info["cmd"] == "watch":
                        pair[1].client().client_kill_filter(_id=info["id"])
                deadline = time.monotonic() + 5
                while any(b.watching for cl in s.splicer._clients for b in cl.blockers.values()) and time.monotonic() < deadline:
                    time.sleep(0.02)
                replies = pipeline_on(c, [[b"MULTI"], [b"SET", key.encode(), b"v"], [b"EXEC"]])
                assert replies[2].startswith(b"-ERR splicer: the connection holding this client's WATCH was lost"), replies
                assert pair[1].client().get(key) is None
            finally:
                c.close()



def _half_close(port: int, commands: list[list[bytes]]) -> list:
    """Send `commands`, close our side, and read every reply until the splicer closes."""
    import socket

    from shmfabric.splicer.redis_resp import ReplyScanner, encode_command

    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"".join(encode_command(c) for c in commands))
    s.shutdown(socket.SHUT_WR)
    sc = ReplyScanner()
    out = []
    try:
        while data := s.recv(65536):
            sc.feed(data)
            while (r := sc.next()) is not None:
                out.append(r)
    finally:
        s.close()
    return out


def test_a_half_closed_client_gets_what_completes_and_nothing_blocks_for_it(clean, trio) -> None:
    """As redis-server: commands that complete at once are answered; one that would block is
    ended (it answers as timed out) and pops nothing later; a WATCH/EXEC pipeline runs."""
    full, empty1, empty2, w = placed_on(clean, 1, 4, "hc")
    clean.client().rpush(full, "item")
    assert _half_close(clean.port, [[b"BLPOP", full.encode(), b"0"]]) == [b"*2\r\n$%d\r\n%s\r\n$4\r\nitem\r\n" % (len(full), full.encode())]
    replies = _half_close(clean.port, [[b"BLPOP", empty1.encode(), b"0"], [b"BLPOP", empty2.encode(), b"0"]])
    assert replies == [b"*-1\r\n", b"*-1\r\n"]  # both ended, neither left waiting
    clean.client().rpush(empty1, "later")
    clean.client().rpush(empty2, "later")
    time.sleep(0.2)
    assert trio[1].client().llen(empty1) == 1 and trio[1].client().llen(empty2) == 1  # not popped for it
    replies = _half_close(clean.port, [[b"WATCH", w.encode()], [b"MULTI"], [b"SET", w.encode(), b"1"], [b"EXEC"]])
    assert replies == [b"+OK\r\n", b"+OK\r\n", b"+QUEUED\r\n", b"*1\r\n+OK\r\n"]
    assert trio[1].client().get(w) == b"1"
    assert trio[1].client().info("clients")["blocked_clients"] == 0


def test_resp3_messages_are_not_held_behind_a_blocked_command(clean) -> None:
    from .test_redis_pubsub_e2e import Raw, parse

    ch = placed_on(clean, 0, 1, "msgblk")[0]
    empty = placed_on(clean, 2, 1, "msgblk-q")[0]
    c = Raw(clean.port)
    c.send(["HELLO", "3"], ["SUBSCRIBE", ch])
    c.frames(2)
    c.send(["BLPOP", empty, "3"])
    time.sleep(0.3)
    assert clean.client().publish(ch, "now") == 1
    frames = [parse(f) for f in c.frames(2)]
    assert frames == [[b"message", ch.encode(), b"now"], None]  # the message first, then BLPOP's timeout
    c.close()


def test_own_connections_time_out_when_a_server_stalls(tmp_path) -> None:
    import os
    import signal
    import socket

    with redis_servers(tmp_path, 2) as pair:
        with splicer(pair, timeouts={"connect": 1, "request": 1}) as s:
            key = placed_on(s, 1, 1, "stall")[0]
            watcher = socket.create_connection(("127.0.0.1", s.port), timeout=20)
            blocker = socket.create_connection(("127.0.0.1", s.port), timeout=20)
            try:
                os.kill(pair[1].proc.pid, signal.SIGSTOP)
                try:
                    # A WATCH does not block; a BLPOP of 1 s may block 1 s: past that plus the
                    # request timeout, the server is taken for stalled.
                    reply = pipeline_on(watcher, [[b"WATCH", key.encode()]])[0]
                    assert reply.startswith(b"-ERR splicer: backend 127.0.0.1:%d did not answer" % pair[1].port), reply
                    reply = pipeline_on(blocker, [[b"BLPOP", key.encode(), b"1"]])[0]
                    assert reply.startswith(b"-ERR splicer: backend 127.0.0.1:%d did not answer" % pair[1].port), reply
                finally:
                    os.kill(pair[1].proc.pid, signal.SIGCONT)
            finally:
                for c in (watcher, blocker):
                    c.close()


def test_a_graceful_stop_ends_blocked_commands(tmp_path) -> None:
    """A reload or SIGTERM drains the old worker: a command blocked for ever would hold it for
    the whole drain, and a client leaving meanwhile goes unnoticed (reading is paused), so its
    command would pop an item nobody reads. The drain ends blocked commands at once: they
    answer as timed out and the client retries on the new worker."""
    import socket

    with redis_servers(tmp_path, 2) as pair:
        with splicer(pair) as s:
            k = placed_on(s, 1, 1, "drain")[0]
            c = socket.create_connection(("127.0.0.1", s.port), timeout=10)
            c.sendall(b"*3\r\n$5\r\nBLPOP\r\n$%d\r\n%s\r\n$1\r\n0\r\n" % (len(k), k.encode()))
            deadline = time.monotonic() + 10
            while pair[1].client().info("clients")["blocked_clients"] < 1 and time.monotonic() < deadline:
                time.sleep(0.02)

            async def drain() -> None:
                s.splicer.drain()

            s.call(drain())
            data = b""
            while chunk := c.recv(65536):
                data += chunk
            assert data == b"*-1\r\n"  # answered as timed out, then closed
            c.close()
            assert pair[1].client().info("clients")["blocked_clients"] == 0
            pair[1].client().rpush(k, "item")
            time.sleep(0.2)
            assert pair[1].client().llen(k) == 1  # not popped for anyone
