"""Pub/sub through the Redis splicer, end to end: real redis-servers, redis-py's PubSub and raw
RESP; the splicer's answers are compared byte for byte with a redis-server's own, and what the
subscribers receive with what was published."""
from __future__ import annotations

import socket
import threading
import time

import hiredis
import pytest
import redis

from shmfabric.splicer.redis_resp import ReplyScanner, encode_command

from .redis_fixtures import needs_redis, placed_on, redis_servers, splicer, trio  # noqa: F401 (trio: a fixture)

pytestmark = [needs_redis, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def sp(trio):
    with splicer(trio) as s:
        yield s


class Raw:
    """A raw RESP connection that reads whole frames (pushes included)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.scanner = ReplyScanner()

    def send(self, *commands: list[str]) -> None:
        self.sock.sendall(b"".join(encode_command([w.encode() for w in c]) for c in commands))

    def frames(self, n: int) -> list[bytes]:
        """The next `n` frames (those after them stay buffered)."""
        out: list[bytes] = []
        while len(out) < n:
            f = self.scanner.next()
            if f is not None:
                out.append(f)
                continue
            data = self.sock.recv(65536)
            assert data, f"connection closed after {len(out)} of {n} frames: {out}"
            self.scanner.feed(data)
        return out

    def quiet(self, seconds: float = 0.2) -> bool:
        """Nothing more arrives within `seconds`."""
        self.sock.settimeout(seconds)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return True
        finally:
            self.sock.settimeout(10)
        self.scanner.feed(data)
        return False

    def closed(self, timeout: float = 10) -> bool:
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(1 << 20)
                if not data:
                    return True
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        self.sock.close()


def parse(frame: bytes):
    r = hiredis.Reader()
    r.feed(frame)
    return r.gets()


@pytest.mark.parametrize("protocol", [2, 3])
def test_confirmations_match_redis_byte_for_byte(sp, trio, protocol: int) -> None:
    a = placed_on(sp, 0, 1, "ch")[0]
    b = placed_on(sp, 2, 1, "ch")[0]  # another server's channel: the counts span servers
    script = [["SUBSCRIBE", a, b, a], ["PSUBSCRIBE", "p*", "q*"], ["SSUBSCRIBE", "s1"], ["PING"], ["PING", "x"],
              ["GET", "k"], ["UNSUBSCRIBE", "zz"], ["UNSUBSCRIBE", a], ["UNSUBSCRIBE"], ["PUNSUBSCRIBE", "q*"],
              ["PUNSUBSCRIBE"], ["PUNSUBSCRIBE"], ["SUNSUBSCRIBE"], ["PING"], ["ECHO", "hi"]]
    n = 3 + 2 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1
    got = {}
    for name, port in (("splicer", sp.port), ("redis", trio[1].port)):
        c = Raw(port)
        if protocol == 3:
            c.send(["HELLO", "3"])
            c.frames(1)  # differs (version, id): not compared
        c.send(*script)  # one write: pipelined
        got[name] = c.frames(n)
        assert c.quiet(), name
        c.close()
    assert got["splicer"] == got["redis"]


@pytest.mark.parametrize("protocol", [2, 3])
def test_every_message_reaches_every_subscriber_once(sp, trio, protocol: int) -> None:
    channels = [f"news:{i}" for i in range(30)]
    assert len({sp.splicer.router.place(c.encode())[0] for c in channels}) == 3  # all servers in play
    subs = []
    for i in range(3):
        p = sp.client(protocol=protocol).pubsub(ignore_subscribe_messages=True)
        p.subscribe(*channels)
        if i == 2:
            p.psubscribe("news:*")
        subs.append(p)
    for p in subs:  # the confirmations
        while p.get_message(timeout=0.05) is not None or not p.subscribed:
            pass
    pub = sp.client()
    for c in channels:
        assert pub.publish(c, f"m-{c}") == 4  # three subscribers, one of them twice (pattern)
    assert pub.publish("news:nobody", "x") == 1  # the pattern only
    assert pub.publish("other", "x") == 0
    assert pub.pubsub_numsub(*channels[:4]) == [(c.encode(), 3) for c in channels[:4]]
    assert pub.pubsub_numpat() == 1
    assert sorted(pub.pubsub_channels("news:*")) == sorted(c.encode() for c in channels)
    for i, p in enumerate(subs):
        got = []
        deadline = time.monotonic() + 10
        want = len(channels) * (2 if i == 2 else 1) + (1 if i == 2 else 0)
        while len(got) < want and time.monotonic() < deadline:
            m = p.get_message(timeout=0.5)
            if m is not None:
                got.append((m["type"], m["channel"], m["data"]))
        assert p.get_message(timeout=0.2) is None  # nothing twice
        expect = [("message", c.encode(), f"m-{c}".encode()) for c in channels]
        if i == 2:
            expect += [("pmessage", c.encode(), f"m-{c}".encode()) for c in channels]
            expect.append(("pmessage", b"news:nobody", b"x"))
        assert sorted(got) == sorted(expect)
        p.close()
    # Gone from the servers too (each client's subscribed connections closed with it).
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(s.client().pubsub_numpat() for s in trio):
        time.sleep(0.05)
    assert [s.client().pubsub_numpat() for s in trio] == [0, 0, 0]


def test_resp3_commands_and_messages_share_the_connection(sp) -> None:
    c = Raw(sp.port)
    c.send(["HELLO", "3"])
    c.frames(1)
    ch = placed_on(sp, 1, 1, "mix")[0]
    c.send(["SUBSCRIBE", ch], ["SET", "mix:k", "v"], ["GET", "mix:k"])
    assert [parse(f) for f in c.frames(3)] == [[b"subscribe", ch.encode(), 1], b"OK", b"v"]
    assert sp.client().publish(ch, "hello") == 1
    assert c.frames(1) == [b">3\r\n$7\r\nmessage\r\n$%d\r\n%s\r\n$5\r\nhello\r\n" % (len(ch), ch.encode())]
    c.send(["MGET", "mix:k", "mix:none"], ["UNSUBSCRIBE"], ["GET", "mix:k"])
    assert [parse(f) for f in c.frames(3)] == [[b"v", None], [b"unsubscribe", ch.encode(), 0], b"v"]
    c.close()


def test_reset_ends_the_subscriptions(sp) -> None:
    c = Raw(sp.port)
    ch = placed_on(sp, 2, 1, "reset")[0]
    c.send(["SUBSCRIBE", ch], ["PSUBSCRIBE", "reset*"])
    c.frames(2)
    pub = sp.client()
    assert pub.publish(ch, "x") == 2
    c.frames(2)
    c.send(["RESET"], ["GET", "reset:k"])
    assert c.frames(2) == [b"+RESET\r\n", b"$-1\r\n"]  # out of subscribed mode
    deadline = time.monotonic() + 5
    while pub.publish(ch, "y") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pub.publish(ch, "y") == 0
    assert c.quiet()
    c.close()


def test_a_client_that_leaves_leaves_no_subscribed_connection(sp, trio) -> None:
    before = [len(s.client().client_list()) for s in trio]
    clients = []
    for i in range(10):
        c = Raw(sp.port)
        c.send(["SUBSCRIBE", *[f"leave:{i}:{j}" for j in range(6)]], ["PSUBSCRIBE", f"leave:{i}:*"])
        clients.append(c)
    for c in clients[:5]:
        c.frames(7)
    for c in clients:  # half of them before their confirmations even arrived
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # reset
        c.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if [len(s.client().client_list()) for s in trio] == before:
            break
        time.sleep(0.05)
    assert [len(s.client().client_list()) for s in trio] == before
    assert all(s.client().pubsub_numpat() == 0 for s in trio)
    assert sp.wait_idle(clients=0)["clients"] == 0


def test_a_server_killed_under_a_subscriber_closes_that_client_only(tmp_path) -> None:
    with redis_servers(tmp_path, 2) as pair:
        with splicer(pair, timeouts={"connect": 1, "request": 5}) as s:
            on0 = placed_on(s, 0, 1, "k")[0]
            on1 = placed_on(s, 1, 1, "k")[0]
            doomed, fine = Raw(s.port), Raw(s.port)
            doomed.send(["SUBSCRIBE", on1])
            fine.send(["SUBSCRIBE", on0])
            doomed.frames(1)
            fine.frames(1)
            pair[1].kill()
            assert doomed.closed()  # its subscription is gone: the client reconnects and resubscribes
            assert s.client().publish(on0, "still") == 1
            assert parse(fine.frames(1)[0]) == [b"message", on0.encode(), b"still"]
            # The splicer carries on: a new subscription on the dead server fails with its name,
            # and the connection is closed; the live server's keys work.
            again = Raw(s.port)
            again.send(["SUBSCRIBE", on1])
            frame = again.frames(1)[0]
            assert frame.startswith(b"-ERR splicer: backend 127.0.0.1:%d" % pair[1].port), frame
            assert again.closed()
            assert s.client().set(on0, "v") and s.client().get(on0) == b"v"
            for c in (doomed, fine, again):
                c.close()


def test_a_subscriber_that_never_reads_is_disconnected(tmp_path) -> None:
    with redis_servers(tmp_path, 1) as one:
        # The message limit, not the general one (256 MB here): like Redis's pubsub class.
        with splicer(one, limits={"max_unread_bytes": 256 << 20, "max_unread_pubsub_bytes": 1 << 20}) as s:
            lazy = Raw(s.port)
            lazy.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            lazy.send(["SUBSCRIBE", "flood"])
            lazy.frames(1)
            reader = s.client().pubsub(ignore_subscribe_messages=True)
            reader.subscribe("flood")
            reader.get_message(timeout=1)
            pub = s.client()
            big = b"x" * 16384
            sent = 0
            deadline = time.monotonic() + 30
            # Publish 16 MB at most; the lazy subscriber is dropped once 1 MB waits for it.
            while sent < 1024 and time.monotonic() < deadline:
                if pub.publish("flood", big) < 2:
                    break
                sent += 1
                m = reader.get_message(timeout=1)
                assert m is not None and m["data"] == big  # the reading subscriber keeps up
            assert sent < 1024, "the subscriber that never reads was not disconnected"
            assert pub.publish("flood", b"y") == 1
            lazy.close()


def test_no_message_of_a_channel_after_its_unsubscribe(sp, trio) -> None:
    """Messages a server sent before confirming UNSUBSCRIBE go ahead of the confirmation, as
    with Redis: a flood is published straight to the channel's server meanwhile."""
    ch = placed_on(sp, 0, 1, "flood")[0]
    c = Raw(sp.port)
    c.send(["SUBSCRIBE", ch])
    c.frames(1)
    stop = threading.Event()

    def flood() -> None:
        with socket.create_connection(("127.0.0.1", trio[0].port)) as s:
            burst = encode_command([b"PUBLISH", ch.encode(), b"x"]) * 50
            while not stop.is_set():
                s.sendall(burst)
                s.recv(65536)

    t = threading.Thread(target=flood, daemon=True)
    t.start()
    try:
        for _ in range(20):
            assert parse(c.frames(1)[0])[0] == b"message"
            c.send(["UNSUBSCRIBE", ch])
            frames = []
            while not frames or parse(frames[-1])[0] != b"unsubscribe":
                frames += c.frames(1)
            assert c.quiet(0.1)  # nothing after the confirmation
            c.send(["SUBSCRIBE", ch])
            assert parse(c.frames(1)[0]) == [b"subscribe", ch.encode(), 1]
    finally:
        stop.set()
        t.join(5)
        c.close()


def test_resp2_subscribed_mode_errors_match_redis(sp, trio) -> None:
    script = [["SUBSCRIBE", "a"], ["FOO"], ["GET"], ["GET", "k"], ["CONFIG", "GET", "x"], ["CLIENT", "SETNAME", "n"],
              ["BLPOP", "q", "0"], ["WATCH", "k"], ["PING", "a", "b"]]
    got = {}
    for name, port in (("splicer", sp.port), ("redis", trio[1].port)):
        c = Raw(port)
        c.send(*script)
        got[name] = c.frames(len(script))
        c.close()
    assert got["splicer"] == got["redis"]


def test_a_protocol_change_after_unsubscribing_gives_messages_in_the_new_protocol(sp) -> None:
    ch = placed_on(sp, 1, 1, "proto")[0]
    c = Raw(sp.port)
    c.send(["HELLO", "3"], ["SUBSCRIBE", ch], ["UNSUBSCRIBE"], ["HELLO", "2"], ["SUBSCRIBE", ch])
    frames = c.frames(5)
    assert frames[4] == b"*3\r\n$9\r\nsubscribe\r\n$%d\r\n%s\r\n:1\r\n" % (len(ch), ch.encode())
    assert sp.client().publish(ch, "m") == 1
    assert c.frames(1)[0].startswith(b"*3\r\n$7\r\nmessage\r\n")  # RESP2, as the client now speaks
    c.close()


def test_subscribed_connections_close_with_the_last_subscription(tmp_path) -> None:
    """A client that no longer subscribes is not cut when a server it once subscribed on dies."""
    with redis_servers(tmp_path, 2) as pair:
        with splicer(pair, timeouts={"connect": 1, "request": 5}) as s:
            c = Raw(s.port)
            c.send(["SUBSCRIBE", placed_on(s, 1, 1, "gone")[0]], ["PSUBSCRIBE", "x*"], ["UNSUBSCRIBE"], ["PUNSUBSCRIBE"])
            c.frames(4)
            deadline = time.monotonic() + 5
            while s.call(_count(s)) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert s.call(_count(s)) == 0
            pair[1].kill()
            c.send(["PING"])
            assert c.frames(1) == [b"+PONG\r\n"]
            c.close()


def test_a_server_the_client_no_longer_subscribes_on_cannot_cut_it(tmp_path) -> None:
    with redis_servers(tmp_path, 2) as pair:
        with splicer(pair, timeouts={"connect": 1, "request": 5}) as s:
            on0, on1 = placed_on(s, 0, 1, "part")[0], placed_on(s, 1, 1, "part")[0]
            c = Raw(s.port)
            c.send(["SUBSCRIBE", on0, on1], ["UNSUBSCRIBE", on1])
            c.frames(3)
            pair[1].kill()
            assert s.client().publish(on0, "alive") == 1
            assert parse(c.frames(1)[0]) == [b"message", on0.encode(), b"alive"]
            c.close()


def test_a_client_that_closes_while_subscribing_leaves_nothing_subscribed(tmp_path) -> None:
    """Its subscriptions are answered (as redis-server answers what it read before EOF) or, with
    a server stalled, fail at timeouts.request; then the client is closed and every
    subscribed connection with it."""
    import os
    import signal

    with redis_servers(tmp_path, 3) as trio_:
        with splicer(trio_, timeouts={"connect": 1, "request": 1}) as s:
            ch0, ch2 = placed_on(s, 0, 1, "eof")[0], placed_on(s, 2, 1, "eof")[0]
            c = Raw(s.port)
            c.send(["SUBSCRIBE", ch0], ["SUBSCRIBE", ch2])
            c.sock.shutdown(socket.SHUT_WR)
            assert [parse(f) for f in c.frames(2)] == [[b"subscribe", ch0.encode(), 1], [b"subscribe", ch2.encode(), 2]]
            assert c.closed()
            c.close()
            c = Raw(s.port)
            os.kill(trio_[1].proc.pid, signal.SIGSTOP)
            try:
                c.send(["PSUBSCRIBE", "gone*"])
                c.sock.shutdown(socket.SHUT_WR)  # its last byte: the confirmation waits on server 1
                assert c.frames(1)[0].startswith(b"-ERR splicer: backend 127.0.0.1:%d did not confirm" % trio_[1].port)
                assert c.closed()
                deadline = time.monotonic() + 10
                while any(t.client().pubsub_numpat() for t in (trio_[0], trio_[2])) and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert [t.client().pubsub_numpat() for t in (trio_[0], trio_[2])] == [0, 0]
            finally:
                os.kill(trio_[1].proc.pid, signal.SIGCONT)
            c.close()


async def _count(s) -> int:
    return len(s.splicer._subscribers)


def test_a_server_that_does_not_confirm_is_timed_out(tmp_path) -> None:
    import os
    import signal

    with redis_servers(tmp_path, 2) as pair:
        with splicer(pair, timeouts={"connect": 1, "request": 1}) as s:
            ch = placed_on(s, 1, 1, "stop")[0]
            c = Raw(s.port)
            os.kill(pair[1].proc.pid, signal.SIGSTOP)
            try:
                c.send(["SUBSCRIBE", ch])
                frame = c.frames(1)[0]
                assert frame.startswith(b"-ERR splicer: backend 127.0.0.1:%d did not confirm" % pair[1].port), frame
                assert c.closed()
            finally:
                os.kill(pair[1].proc.pid, signal.SIGCONT)
            c.close()


def test_with_auto_eject_channels_stay_on_their_server(tmp_path) -> None:
    """An ejected server's channels are not moved to the others (keys are): a subscription made
    meanwhile would be left behind when the server returns, and messages would stop without a
    word. PUBLISH to them is refused while it is out, and a subscription there fails."""
    with redis_servers(tmp_path, 2) as pair:
        with splicer(pair, auto_eject=True, health={"interval": 0.1, "timeout": 0.5, "rise": 1, "fall": 1},
                     timeouts={"connect": 0.5, "request": 5}) as s:
            ch = placed_on(s, 1, 1, "ej")[0]
            pair[1].kill()
            deadline = time.monotonic() + 10
            while s.stats()["servers"][1]["up"] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert s.splicer.router.pool == [0]
            with pytest.raises(redis.ResponseError, match=r"127\.0\.0\.1:%d is unavailable \(.*ejected" % pair[1].port):
                s.client().publish(ch, "m")
            c = Raw(s.port)
            c.send(["SUBSCRIBE", ch])
            assert c.frames(1)[0].startswith(b"-ERR splicer: backend 127.0.0.1:%d" % pair[1].port)
            assert c.closed()
            c.close()
            pair[1].start()  # the same port
            while s.splicer.router.pool != [0, 1] and time.monotonic() < deadline + 10:
                time.sleep(0.05)
            c = Raw(s.port)
            c.send(["SUBSCRIBE", ch])
            c.frames(1)
            assert s.client().publish(ch, "back") == 1
            assert parse(c.frames(1)[0]) == [b"message", ch.encode(), b"back"]
            c.close()


def test_client_info_describes_the_connection(sp) -> None:
    r = sp.client(protocol=2)
    info = r.client_info()
    local = r.connection_pool.get_connection()
    try:
        me = local._sock.getsockname()
    finally:
        r.connection_pool.release(local)
    assert info["addr"] == f"{me[0]}:{me[1]}" and info["laddr"] == f"127.0.0.1:{sp.port}"
    assert info["flags"] == "N" and int(info["sub"]) == 0 and str(info["resp"]) == "2" and info["lib-name"] == "redis-py"
    c = Raw(sp.port)
    c.send(["HELLO", "3"], ["SUBSCRIBE", "ci1", "ci2"], ["PSUBSCRIBE", "ci*"], ["UNSUBSCRIBE"], ["CLIENT", "INFO"])
    fields = dict(kv.split("=", 1) for kv in parse(c.frames(7)[6]).decode().split())
    assert (fields["flags"], fields["sub"], fields["psub"]) == ("P", "0", "1")
    c.close()


@pytest.mark.parametrize("protocol", [2, 3])
def test_no_message_outside_its_subscription_under_pipelined_changes(sp, protocol: int) -> None:
    """Pipelined batches of (P)(UN)SUBSCRIBE while channels on every server are flooded: in the
    order the client reads, no message comes before its channel's or pattern's "subscribe" or
    after its "unsubscribe", and every count is right. (Messages sent before an UNSUBSCRIBE that
    still waited behind another server's confirmation, or on a connection closed because later
    commands unsubscribed it, came after the confirmation.)"""
    import random

    chans = [f"race{i}" for i in range(9)]
    patterns = ["race1*", "race*", "r?ce3"]
    stop = threading.Event()

    def flood(seed: int) -> None:
        r = sp.client()
        rnd = random.Random(seed)
        while not stop.is_set():
            p = r.pipeline(transaction=False)
            for _ in range(20):
                p.publish(rnd.choice(chans), "m")
            p.execute()
            time.sleep(0.002)  # the splicer runs in this process: leave it the interpreter

    threads = [threading.Thread(target=flood, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    c = Raw(sp.port)
    if protocol == 3:
        c.send(["HELLO", "3"])
        c.frames(1)
    rnd = random.Random(7)
    channels: set[bytes] = set()
    pats: set[bytes] = set()
    bad: list = []
    try:
        for it in range(60):
            batch = []
            for _ in range(rnd.randint(1, 5)):
                op = rnd.choice("SUPQA")
                if op == "S":
                    batch.append(["SUBSCRIBE", *rnd.sample(chans, rnd.randint(1, 3))])
                elif op == "U":
                    batch.append(["UNSUBSCRIBE", *rnd.sample(chans, rnd.randint(1, 3))])
                elif op == "P":
                    batch.append(["PSUBSCRIBE", rnd.choice(patterns)])
                elif op == "Q":
                    batch.append(["PUNSUBSCRIBE"])
                else:
                    batch.append(["UNSUBSCRIBE"])
            c.send(*batch, ["PING", f"mark{it}"])
            while True:
                f = parse(c.frames(1)[0])
                if f in ([b"pong", b"mark%d" % it], b"mark%d" % it):
                    break
                kind = f[0]
                if kind == b"message" and f[1] not in channels:
                    bad.append(f)
                elif kind == b"pmessage" and f[1] not in pats:
                    bad.append(f)
                elif kind in (b"subscribe", b"unsubscribe", b"psubscribe", b"punsubscribe"):
                    target = channels if kind in (b"subscribe", b"unsubscribe") else pats
                    if f[1] is not None:
                        (target.add if kind.endswith(b"subscribe") and not kind.startswith(b"un")
                         and not kind.startswith(b"pun") else target.discard)(f[1])
                    if f[2] != len(channels) + len(pats):
                        bad.append(("count", f))
    finally:
        stop.set()
        for t in threads:
            t.join(5)
        c.close()
    assert not bad, bad[:5]


def test_resp3_messages_keep_their_order_around_a_blocked_command(sp, trio) -> None:
    """Messages queued behind a blocked BLPOP (a SUBSCRIBE was unanswered when they came) must
    not be overtaken by later ones written out of band."""
    ch0 = placed_on(sp, 0, 1, "ord")[0]
    ch1 = placed_on(sp, 1, 1, "ord")[0]
    empty = placed_on(sp, 2, 1, "ord-q")[0]
    stop = threading.Event()

    def publish() -> None:
        r = trio[0].client()
        n = 0
        while not stop.is_set():
            r.publish(ch0, str(n))
            n += 1

    c = Raw(sp.port)
    c.send(["HELLO", "3"], ["SUBSCRIBE", ch0])
    c.frames(2)
    t = threading.Thread(target=publish, daemon=True)
    t.start()
    try:
        time.sleep(0.1)
        trio[1].client().execute_command("CLIENT", "PAUSE", "300", "ALL")  # ch1's confirmation waits
        c.send(["SUBSCRIBE", ch1], ["BLPOP", empty, "1"], ["PING", "end"])
        seen = []
        while True:
            f = parse(c.frames(1)[0])
            if f == b"end":
                break
            if isinstance(f, list) and f[0] == b"message":
                seen.append(int(f[2]))
        time.sleep(0.2)
    finally:
        stop.set()
        t.join(5)
        c.close()
    assert seen and all(a < b for a, b in zip(seen, seen[1:])), [(a, b) for a, b in zip(seen, seen[1:]) if a >= b][:3]


def test_pipelined_publishes_to_channels_of_one_server_arrive_in_order(sp) -> None:
    """A client's pipelined PUBLISHes to two channels of one server reach a subscriber of both in
    the order sent, as from one redis-server: they go over one connection to that server (each
    channel on its own pooled connection ran them on the server in either order)."""
    names = placed_on(sp, 0, 64, "order")
    lanes = {sp.splicer.router.channel_place(c.encode())[1]: c for c in names}
    assert len(lanes) >= 2, "the splicer's pool has one connection per server: nothing to test"
    a, b = list(lanes.values())[:2]  # channels that hash to different pooled connections
    sub = Raw(sp.port)
    sub.send(["SUBSCRIBE", a, b])
    sub.frames(2)
    pub = socket.create_connection(("127.0.0.1", sp.port), timeout=10)
    n, batch = 4000, 200
    got: list[int] = []
    for start in range(0, n, batch):
        pub.sendall(b"".join(encode_command([b"PUBLISH", (a if i % 2 else b).encode(), b"%d" % i])
                             for i in range(start, start + batch)))
        replies = ReplyScanner()
        seen = 0
        while seen < batch:
            data = pub.recv(65536)
            assert data
            replies.feed(data)
            while replies.next() is not None:
                seen += 1
        got += [int(parse(f)[2]) for f in sub.frames(batch)]
    pub.close()
    sub.close()
    out_of_order = [(x, y) for x, y in zip(got, got[1:]) if y < x]
    assert got == sorted(got) and len(got) == n, f"{len(out_of_order)} out of order, e.g. {out_of_order[:3]}"


@pytest.mark.parametrize("protocol", [2, 3])
def test_messages_of_every_size_arrive_as_the_server_sends_them(sp, trio, protocol: int) -> None:
    """Pipelined PUBLISHes (upper and lower case) of payloads from 0 bytes to 200 KB, so that
    pushes are split between reads: a subscriber of the channel and of a pattern through the
    splicer gets the very bytes a subscriber straight to the server gets."""
    a = placed_on(sp, 1, 1, "sizes")[0]
    r = __import__("random").Random(protocol)
    sizes = [r.choice([0, 1, 32, 1000, 5000, 70000, 200_000]) for _ in range(300)]
    got = {}
    for name, port in (("splicer", sp.port), ("redis", trio[1].port)):
        c = Raw(port)
        if protocol == 3:
            c.send(["HELLO", "3"])
            c.frames(1)
        c.send(["SUBSCRIBE", a], ["PSUBSCRIBE", "sizes:*"])
        c.frames(2)
        got[name] = c
    pub = socket.create_connection(("127.0.0.1", sp.port), timeout=10)
    pub.sendall(b"".join(encode_command([b"PUBLISH" if i % 2 else b"publish", a.encode(), bytes([97 + i % 26]) * n])
                         for i, n in enumerate(sizes)))
    replies, seen = ReplyScanner(), 0
    while seen < len(sizes):
        data = pub.recv(1 << 20)
        assert data
        replies.feed(data)
        while (reply := replies.next()) is not None:
            assert reply == b":4\r\n"  # two subscribers, each by channel and by pattern
            seen += 1
    pub.close()
    frames = {name: c.frames(2 * len(sizes)) for name, c in got.items()}
    for c in got.values():
        assert c.quiet()
        c.close()
    assert frames["splicer"] == frames["redis"]


def test_a_subscriber_over_the_soft_limit_for_its_seconds_is_disconnected(tmp_path) -> None:
    """Redis's `client-output-buffer-limit pubsub 32mb 8mb 60` has a soft part: over 8 MB for 60 s
    on end is disconnected too. Here 1 MiB for 1 s, the hard limit far above."""
    with redis_servers(tmp_path, 1) as one:
        limits = {"max_unread_bytes": 256 << 20, "max_unread_pubsub_bytes": 64 << 20,
                  "pubsub_soft_limit_bytes": 1 << 20, "pubsub_soft_limit_seconds": 1.0}
        with splicer(one, limits=limits) as s:
            lazy = Raw(s.port)
            lazy.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            lazy.send(["SUBSCRIBE", "slow"])
            lazy.frames(1)
            pub = s.client()
            big = b"x" * 16384
            for _ in range(1024):  # 16 MiB (the kernel's buffers take a few): over the soft limit, under the hard
                assert pub.publish("slow", big) == 1
            assert pub.publish("slow", b"y") == 1  # over the soft limit, not yet for 1 s: kept
            deadline = time.monotonic() + 30
            while pub.publish("slow", b"y") == 1 and time.monotonic() < deadline:
                time.sleep(0.2)  # each message checks the limit, as with Redis
            assert pub.publish("slow", b"y") == 0, "the subscriber over the soft limit was kept"
            assert time.monotonic() < deadline
            lazy.close()


def test_a_subscriber_that_catches_up_is_kept(tmp_path) -> None:
    """Going over the soft limit and back under it restarts the clock: a subscriber that reads
    is never cut by the soft limit."""
    with redis_servers(tmp_path, 1) as one:
        limits = {"pubsub_soft_limit_bytes": 1 << 20, "pubsub_soft_limit_seconds": 1.0}
        with splicer(one, limits=limits) as s:
            reader = s.client().pubsub(ignore_subscribe_messages=True)
            reader.subscribe("steady")
            reader.get_message(timeout=1)
            pub = s.client()
            big = b"x" * 65536
            end = time.monotonic() + 3
            while time.monotonic() < end:
                assert pub.publish("steady", big) == 1
                m = reader.get_message(timeout=5)
                assert m is not None and m["data"] == big
            reader.close()
