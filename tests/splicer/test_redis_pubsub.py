"""Pub/sub decisions of the Redis splicer (pure: no sockets): who subscribes where, and the
confirmations the client gets (byte-exact against redis-server in test_redis_pubsub_e2e)."""
from __future__ import annotations

import hiredis
import pytest

from shmfabric.splicer.redis_fanout import Where, merge_max, merge_numsub, merge_union
from shmfabric.splicer.redis_ketama import Ketama, KetamaServer
import random

from shmfabric.splicer.redis_pubsub import Subscriptions, message_run, push_kind
from shmfabric.splicer.redis_resp import ReplyScanner, RespProtocolError
from shmfabric.splicer.redis_session import FORWARD, PUBSUB, REPLY, RedisSession, Router, command_info
from shmfabric.splicer.redis_commands import COMMANDS


def parse(data: bytes):
    r = hiredis.Reader()
    r.feed(data)
    out = []
    while (v := r.gets()) is not False:
        out.append(v)
    return out


def cmd(*words: str) -> list[bytes]:
    return [w.encode() for w in words]


@pytest.fixture()
def router() -> Router:
    return Router(Ketama([KetamaServer("127.0.0.1:7001"), KetamaServer("127.0.0.1:7002"),
                          KetamaServer("127.0.0.1:7003")]), lanes=2)


def channels_on(router: Router, server: int, n: int) -> list[bytes]:
    out, i = [], 0
    while len(out) < n:
        c = b"ch:%d" % i
        if router.place(c)[0] == server:
            out.append(c)
        i += 1
    return out


def test_confirmations_count_the_clients_subscriptions_and_sends_go_to_each_channels_server(router) -> None:
    s = Subscriptions(lambda c: router.place(c)[0], lambda: router.pool)
    a, b = channels_on(router, 0, 1)[0], channels_on(router, 2, 1)[0]
    reply, sends = s.change(b"SUBSCRIBE", [a, b, a], 2)
    assert parse(reply) == [[b"subscribe", a, 1], [b"subscribe", b, 2], [b"subscribe", a, 2]]
    # Only what changes goes to a server, once: each server confirms exactly what it was sent.
    assert sorted(sends) == [(0, b"*2\r\n$9\r\nSUBSCRIBE\r\n$%d\r\n%s\r\n" % (len(a), a), 1),
                             (2, b"*2\r\n$9\r\nSUBSCRIBE\r\n$%d\r\n%s\r\n" % (len(b), b), 1)]
    reply, sends = s.change(b"PSUBSCRIBE", [b"p*"], 2)
    assert parse(reply) == [[b"psubscribe", b"p*", 3]]
    assert sorted(srv for srv, _, _ in sends) == [0, 1, 2]  # a pattern matches channels anywhere
    reply, sends = s.change(b"SSUBSCRIBE", [b"shard"], 2)
    assert parse(reply) == [[b"ssubscribe", b"shard", 1]]  # shard channels are counted apart
    assert s.servers() == {0, 1, 2} and s.active
    reply, sends = s.change(b"UNSUBSCRIBE", [b"never"], 2)
    assert parse(reply) == [[b"unsubscribe", b"never", 3]] and sends == []  # nothing to ask a server
    reply, sends = s.change(b"UNSUBSCRIBE", [], 2)  # every channel
    assert parse(reply) == [[b"unsubscribe", a, 2], [b"unsubscribe", b, 1]]
    assert sorted((srv, n) for srv, _, n in sends) == [(0, 1), (2, 1)]
    reply, sends = s.change(b"UNSUBSCRIBE", [], 2)
    assert parse(reply) == [[b"unsubscribe", None, 1]] and sends == []
    reply, _ = s.change(b"PUNSUBSCRIBE", [], 3)
    assert reply == b">3\r\n$12\r\npunsubscribe\r\n$2\r\np*\r\n:0\r\n"  # RESP3: a push
    assert s.active  # the shard channel
    s.change(b"SUNSUBSCRIBE", [], 2)
    assert not s.active


def test_a_pattern_stays_on_the_servers_it_was_subscribed_on(router) -> None:
    pool = [0, 1, 2]
    s = Subscriptions(lambda c: 0, lambda: pool)
    s.change(b"PSUBSCRIBE", [b"x*"], 2)
    pool[:] = [0, 2]  # a server left the pool since: it still holds the subscription
    _, sends = s.change(b"PUNSUBSCRIBE", [b"x*"], 2)
    assert sorted(srv for srv, _, _ in sends) == [0, 1, 2]


def test_push_kind() -> None:
    assert push_kind(b"*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$1\r\nb\r\n") == b"message"
    assert push_kind(b">4\r\n$8\r\npmessage\r\n$2\r\na*\r\n$1\r\na\r\n$1\r\nb\r\n") == b"pmessage"
    assert push_kind(b"-ERR no\r\n") is None
    assert push_kind(b"*1\r\n:1\r\n") is None
    assert push_kind(b"*1\r\n$x\r\n") is None


def _bulk(b: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(b), b)


def _frames(r: random.Random, n: int) -> list[tuple[bytes, bool]]:
    """`n` frames a subscribed connection may carry, each with whether it is a message push."""
    def word() -> bytes:
        return bytes(r.choice(b"ab$*>\r\n:-019") for _ in range(r.randrange(0, 12)))
    out = []
    for _ in range(n):
        k, h = r.randrange(9), r.choice(b"*>")
        if k <= 3:
            out.append((b"%c3\r\n" % h + _bulk(b"message") + _bulk(r.choice([b"ch", b"c2", word()])) + _bulk(word()), True))
        elif k == 4:
            out.append((b"%c4\r\n" % h + _bulk(b"pmessage") + _bulk(b"c*") + _bulk(r.choice([b"ch", word()]))
                        + _bulk(word() * r.choice([1, 3000])), True))
        elif k == 5:
            out.append((b"%c3\r\n" % h + _bulk(b"smessage") + _bulk(b"ch") + _bulk(word()), True))
        elif k == 6:
            out.append((b"*3\r\n" + _bulk(b"subscribe") + _bulk(b"ch") + b":1\r\n", False))
        elif k == 7:
            out.append((b"-ERR no\r\n", False))
        else:  # a message push of an unusual shape (a null element): framed the general way
            out.append((b"*3\r\n" + _bulk(b"message") + b"$-1\r\n" + _bulk(b"x"), False))
    return out


def test_message_run_frames_whole_message_pushes_only() -> None:
    r = random.Random(7)
    for _ in range(3000):
        frames = _frames(r, r.randrange(1, 8))
        buf = b"".join(f for f, _ in frames)
        bounds = [0]
        for f, _ in frames:
            bounds.append(bounds[-1] + len(f))
        cut = r.randrange(len(buf) + 1)
        for i, start in enumerate(bounds):
            if start > cut:
                break
            want = start
            while i < len(frames) and frames[i][1] and bounds[i + 1] <= cut:
                i += 1
                want = bounds[i]
            assert message_run(buf[:cut], start) == want, (buf[:cut], start)


def test_scanner_take_run_then_next_give_back_every_frame_in_order() -> None:
    r = random.Random(11)
    for _ in range(500):
        frames = [f for f, _ in _frames(r, r.randrange(1, 40))]
        stream = b"".join(frames)
        sc, got, i = ReplyScanner(), [], 0
        while i < len(stream):
            step = r.choice([1, 7, 64, 1500, 70000])
            sc.feed(stream[i : i + step])
            i += step
            while True:
                run = sc.take_run(message_run)
                if run:
                    got.append(run)
                got1 = sc.drain(1)
                if not got1:
                    break
                frame = got1[0]
                assert frame in frames
                got.append(frame)
        assert b"".join(got) == stream and not sc.buffered


def test_session_publish_goes_to_the_channels_server(router) -> None:
    s = RedisSession(router)
    for c in channels_on(router, 1, 3):
        action = s.handle([b"PUBLISH", c, b"hi"])
        assert action[0] == FORWARD and action[3] == 1
    assert s.handle(cmd("PUBLISH", "c"))[1].startswith(b"-ERR wrong number of arguments")


def test_session_resp2_subscribed_mode(router) -> None:
    s = RedisSession(router)
    action = s.handle(cmd("SUBSCRIBE", "a"))
    assert action[0] == PUBSUB and action[1] is True  # a barrier
    assert s.subscribed
    assert s.handle(cmd("GET", "k")) == (REPLY, b"-ERR Can't execute 'get': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE "
                                                b"/ PING / QUIT / RESET are allowed in this context\r\n")
    assert s.handle(cmd("PING")) == (REPLY, b"*2\r\n$4\r\npong\r\n$0\r\n\r\n")
    assert s.handle(cmd("PING", "x")) == (REPLY, b"*2\r\n$4\r\npong\r\n$1\r\nx\r\n")
    assert s.handle(cmd("UNSUBSCRIBE"))[0] == PUBSUB
    assert not s.subscribed
    assert s.handle(cmd("PING")) == (REPLY, b"+PONG\r\n")


def test_session_resp3_keeps_every_command_while_subscribed(router) -> None:
    s = RedisSession(router)
    s.handle(cmd("HELLO", "3"))
    s.handle(cmd("SUBSCRIBE", "a"))
    assert not s.subscribed and s.handle(cmd("GET", "k"))[0] == FORWARD
    # Its subscribed connections speak RESP3: the protocol cannot change under them.
    assert b"cannot change the protocol" in s.handle(cmd("HELLO", "2"))[1]
    assert s.proto == 3


def test_session_reset_drops_subscriptions(router) -> None:
    s = RedisSession(router)
    s.handle(cmd("PSUBSCRIBE", "x*"))
    assert s.handle(cmd("RESET")) == (PUBSUB, True, 2, b"+RESET\r\n", [], True, False)
    assert not s.subscribed and not s.subs.active
    assert s.handle(cmd("RESET"))[0] == REPLY  # nothing to drop


def test_session_subscribe_inside_multi_aborts(router) -> None:
    s = RedisSession(router)
    s.handle(cmd("MULTI"))
    assert b"inside MULTI is not supported" in s.handle(cmd("SUBSCRIBE", "a"))[1]
    assert s.handle(cmd("EXEC"))[1].startswith(b"-EXECABORT")


def test_command_info_gives_publish_no_keys(router) -> None:
    s = RedisSession(router)
    info = parse(command_info(COMMANDS[b"PUBLISH"], 2))[0]
    assert info[0] == b"publish" and info[3:6] == [0, 0, 0] and b"pubsub" in info[2]
    assert s.handle(cmd("COMMAND", "GETKEYS", "PUBLISH", "c", "m"))[1] == b"-ERR The command has no key arguments\r\n"


def where(i: int) -> Where:
    return Where(i, i, 2, "PUBSUB NUMSUB", 1)


def test_pubsub_merges() -> None:
    assert parse(merge_union([(where(0), b"*2\r\n$1\r\na\r\n$1\r\nb\r\n"), (where(1), b"*2\r\n$1\r\nb\r\n$1\r\nc\r\n")])) \
        == [[b"a", b"b", b"c"]]
    two = b"*4\r\n$1\r\na\r\n:1\r\n$1\r\nb\r\n:0\r\n"
    assert parse(merge_numsub([(where(0), two), (where(1), b"*4\r\n$1\r\na\r\n:2\r\n$1\r\nb\r\n:5\r\n")])) \
        == [[b"a", 3, b"b", 5]]
    # A channel asked twice is listed twice (as Redis does) and counted once per server.
    twice = b"*4\r\n$1\r\na\r\n:1\r\n$1\r\na\r\n:1\r\n"
    assert parse(merge_numsub([(where(0), twice), (where(1), twice)])) == [[b"a", 2, b"a", 2]]
    assert merge_max([(where(0), b":1\r\n"), (where(1), b":3\r\n")]) == b":3\r\n"
    assert merge_max([(where(0), b":1\r\n"), (where(1), b"-ERR x\r\n")]) == b"-ERR x\r\n"
    assert merge_union([(where(0), b":1\r\n"), (where(1), b"*0\r\n")]).startswith(b"-ERR splicer: a backend answered")


def test_channels_keep_their_server_when_one_is_ejected(router) -> None:
    servers = router.ketama.servers
    on2 = channels_on(router, 2, 20)
    router.set_ketama(Ketama(servers, live=[True, True, False]))  # server 2 ejected
    assert {router.place(c)[0] for c in on2} <= {0, 1}  # keys move to the others...
    assert {router.channel_place(c)[0] for c in on2} == {2}  # ...channels stay where subscribers are
    s = RedisSession(router)
    assert s.handle([b"PUBLISH", on2[0], b"m"])[3] == 2  # refused there by the shell, not sent elsewhere
    assert sorted(srv for srv, _, _ in s.handle(cmd("PSUBSCRIBE", "y*"))[4]) == [0, 1, 2]
    router.set_ketama(Ketama(servers))  # back
    assert router.channels is router.ketama and {router.channel_place(c)[0] for c in on2} == {2}


@pytest.mark.parametrize("where", ["channel", "payload"])
def test_message_run_leaves_a_length_of_thousands_of_digits_to_the_general_path(where: str) -> None:
    # int() refuses more than 4,300 digits (ValueError, which the subscribed connection does not
    # catch): the run stops before such a length and the general framing reports it as a protocol error.
    huge = b"1" * 5000
    good = b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$1\r\nx\r\n"
    bad = (b"*3\r\n$7\r\nmessage\r\n$" + huge + b"\r\nch\r\n$1\r\nx\r\n" if where == "channel"
           else b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$" + huge + b"\r\nx\r\n")
    assert message_run(good + bad) == len(good)
    assert message_run(bad) == 0
    sc = ReplyScanner()
    sc.feed(bad)
    with pytest.raises(RespProtocolError, match="invalid length"):
        sc.drain(1)
