"""End-to-end tests of the HTTP splicer shell with small asyncio backends (loopback only).

No test asserts a duration; slow backends are used only to make requests overlap.
"""
from __future__ import annotations

import asyncio
import re
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shmfabric.bench.http_backend import EchoBackend
from shmfabric.splicer.config import HttpSpliceConfig
from shmfabric.splicer.http_framer import NEED_DATA, ConnectionClosed, Data, EndOfMessage, InformationalResponse, Response, ResponseFramer, RemoteProtocolError
from shmfabric.splicer.http_server import HttpSplicer
from shmfabric.splicer.metrics import serve

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=[1, 4], ids=["one-per-conn", "pipelined-4"])
def pipeline(request):
    """Pool modes: one request per pooled connection, or up to 4 pipelined per connection."""
    return request.param


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 45))


class Reply:
    def __init__(self, resp: Response) -> None:
        self.status = resp.status
        self.headers = {k.lower(): v for k, v in resp.headers}
        self.body = b""
        self.trailers: tuple = ()
        self.informational: list[int] = []

    @property
    def seq(self) -> bytes | None:
        return self.headers.get(b"x-seq")


async def read_replies(reader: asyncio.StreamReader, methods: list[bytes], timeout: float = 10,
                       probe: bool = True) -> tuple[list[Reply], bool]:
    """Read responses for `methods` (HEAD only as the first); returns (replies, closed_by_server)."""
    f = ResponseFramer()
    pending = list(methods)
    f.expect(pending.pop(0))
    for m in pending:
        f.expect(m)
    replies: list[Reply] = []
    cur = None
    info: list[int] = []
    closed = False
    while len(replies) < len(methods):
        try:
            data = await asyncio.wait_for(reader.read(65536), timeout)
        except asyncio.TimeoutError:
            break
        f.receive_data(data)
        if not data:
            closed = True
        while True:
            ev = f.next_event()
            if ev is NEED_DATA or isinstance(ev, ConnectionClosed):
                break
            if isinstance(ev, InformationalResponse):
                info.append(ev.status)
            elif isinstance(ev, Response):
                cur = Reply(ev)
                cur.informational, info = info, []
            elif isinstance(ev, Data):
                cur.body += ev.data
            elif isinstance(ev, EndOfMessage):
                cur.trailers = ev.trailers
                replies.append(cur)
        if closed:
            break
    if probe and not closed and len(replies) == len(methods):
        # was the connection closed right after the last response?
        try:
            closed = (await asyncio.wait_for(reader.read(1), 0.2)) == b""
        except asyncio.TimeoutError:
            closed = False
    return replies, closed


def get(path: str, seq: int | None = None, method: str = "GET", headers: str = "", body: bytes = b"") -> bytes:
    h = f"{method} {path} HTTP/1.1\r\nHost: test\r\n"
    if seq is not None:
        h += f"X-Seq: {seq}\r\n"
    if body:
        h += f"Content-Length: {len(body)}\r\n"
    return (h + headers + "\r\n").encode() + body


class Env:
    """Backends + splicer on loopback, closed at the end; `pipeline` sets pool.pipeline."""

    def __init__(self, pipeline: int = 1) -> None:
        self.pipeline = pipeline
        self.backends: list[EchoBackend] = []
        self.splicer: HttpSplicer | None = None

    async def backend(self, name: str, delay: float = 0.0) -> EchoBackend:
        b = await EchoBackend(name, delay).start()
        self.backends.append(b)
        return b

    async def splice(self, **cfg) -> HttpSplicer:
        # Any exception that reaches the event loop (a bug in a callback) fails the test.
        self.loop_errors: list = getattr(self, "loop_errors", [])
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: self.loop_errors.append(ctx))
        cfg.setdefault("listen", "127.0.0.1:0")
        cfg.setdefault("health", {"enabled": False})
        cfg["pool"] = {**cfg.get("pool", {}), "pipeline": self.pipeline}
        self.splicer = HttpSplicer(HttpSpliceConfig(**cfg))
        await self.splicer.start()
        return self.splicer

    async def connect(self):
        return await asyncio.open_connection("127.0.0.1", self.splicer.port)

    async def one_backend(self, **cfg):
        """An echo backend as the default route, the splicer, and a client connection to it."""
        be = await self.backend("a")
        sp = await self.splice(default=[be.address], **cfg)
        return be, sp, *(await self.connect())

    async def close(self) -> None:
        if self.splicer is not None:
            await self.splicer.close()
        for b in self.backends:
            await b.close()
        await asyncio.sleep(0)
        errors = getattr(self, "loop_errors", [])
        assert not errors, [f"{e.get('message')}: {e.get('exception')!r}" for e in errors]


async def wait_for(pred, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        if loop.time() > end:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


def settled(splicer: HttpSplicer) -> bool:
    return all(v["in_use"] == 0 and v["inflight"] == 0 and v["waiters"] == 0 and v["connecting"] == 0
               for v in splicer.pool_sizes().values())


# ------------------------------------------------------------------------------ ordering
def test_pipeline_to_two_backends_runs_concurrently_and_answers_in_order(pipeline):
    async def main():
        env = Env(pipeline)
        try:
            fast = await env.backend("fast")
            slow = await env.backend("slow", 0.2)
            sp = await env.splice(routes=[{"prefix": "/slow", "backends": [slow.address]}], default=[fast.address],
                                  pool={"min": 1, "max": 16})
            r, w = await env.connect()
            paths = ["/slow/x" if i % 2 else "/fast/x" for i in range(16)]
            w.write(b"".join(get(p, i) for i, p in enumerate(paths)))
            replies, closed = await read_replies(r, [b"GET"] * 16)
            assert [x.seq for x in replies] == [str(i).encode() for i in range(16)]
            assert [x.headers[b"x-backend"] for x in replies] == [b"slow" if i % 2 else b"fast" for i in range(16)]
            assert not closed
            # the 8 slow requests overlapped on several pooled connections
            assert slow.stats.max_concurrent > 1
            assert slow.stats.max_open_connections > 1
            w.close()
            await wait_for(lambda: settled(sp) and not sp.clients)
        finally:
            await env.close()
    run(main())


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 15), st.sampled_from(["GET", "GET", "GET", "POST", "HEAD"]), st.booleans()),
                min_size=1, max_size=24))
def test_property_responses_in_request_order_under_random_delays(pipeline, plan):
    """Random delays, methods and backends: responses always come back in request order,
    with the right body, and barriers (POST) never overlap other requests of the client."""
    async def main():
        env = Env(pipeline)
        try:
            a = await env.backend("a")
            b = await env.backend("b")
            b.stats.log = a.stats.log  # one log for both backends, in event order
            sp = await env.splice(routes=[{"prefix": "/b", "backends": [b.address]}], default=[a.address],
                                  pool={"min": 0, "max": 6})
            r, w = await env.connect()
            wire, methods = b"", []
            first_head = True
            for i, (delay, method, to_b) in enumerate(plan):
                if method == "HEAD" and not (first_head and i == 0):
                    method = "GET"  # the test client parses HEAD only as the first response
                path = f"/{'b' if to_b else 'a'}/{i}?delay={delay}"
                wire += get(path, i, method, body=b"data%d" % i if method == "POST" else b"")
                methods.append(method.encode())
            w.write(wire)
            replies, _ = await read_replies(r, methods)
            assert [x.seq for x in replies] == [str(i).encode() for i in range(len(plan))]
            for i, (x, m) in enumerate(zip(replies, methods)):
                assert x.status == 200
                if m == b"HEAD":
                    assert x.body == b""
                else:
                    assert f"/{i}?".encode() in x.body
            # barrier check from the backends' shared log: a POST starts with nothing else in
            # flight, and nothing else starts while it runs
            active: set[bytes] = set()
            post_running = False
            for kind, target in a.stats.log:
                is_post = plan[int(target.split(b"/")[2].split(b"?")[0])][1] == "POST"
                if kind == "start":
                    assert not post_running, a.stats.log
                    if is_post:
                        assert not active, a.stats.log
                        post_running = True
                    active.add(target)
                else:
                    active.discard(target)
                    if is_post:
                        post_running = False
            w.close()
            await wait_for(lambda: settled(sp))
        finally:
            await env.close()
    run(main())


def test_non_idempotent_request_is_a_barrier(pipeline):
    async def main():
        env = Env(pipeline)
        try:
            be = await env.backend("a")
            await env.splice(default=[be.address], pool={"min": 0, "max": 8})
            r, w = await env.connect()
            w.write(get("/g1?delay=300", 0) + get("/g2?delay=10", 1) + get("/p", 2, "POST", body=b"x")
                    + get("/g3", 3) + get("/g4?delay=5", 4))
            replies, _ = await read_replies(r, [b"GET", b"GET", b"POST", b"GET", b"GET"])
            assert [x.seq for x in replies] == [b"0", b"1", b"2", b"3", b"4"]
            log = be.stats.log
            pos = {(k, t.split(b"?")[0]): i for i, (k, t) in enumerate(log)}
            # the POST starts after both earlier GETs ended, and the later GETs start after it ended
            assert pos[("start", b"/p")] > pos[("end", b"/g1")] and pos[("start", b"/p")] > pos[("end", b"/g2")]
            assert pos[("start", b"/g3")] > pos[("end", b"/p")] and pos[("start", b"/g4")] > pos[("end", b"/p")]
            # the two GETs before the POST overlapped
            assert pos[("start", b"/g2")] < pos[("end", b"/g1")]
        finally:
            await env.close()
    run(main())


# ------------------------------------------------------------------------ failure isolation
def test_timeout_gives_504_in_place_and_the_pipeline_goes_on(pipeline):
    async def main():
        env = Env(pipeline)
        try:
            be = await env.backend("a")
            hanging = await env.backend("h")
            # the hanging request has its own backend: with pool.pipeline > 1, requests pipelined
            # behind it on one backend connection would wait for it (head-of-line at the backend)
            sp = await env.splice(routes=[{"prefix": "/h", "backends": [hanging.address]}], default=[be.address],
                                  pool={"min": 1, "max": 4}, timeouts={"request": 1.0})
            r, w = await env.connect()
            w.write(get("/1", 1) + get("/h/2?hang=1", 2) + get("/3", 3))
            replies, closed = await read_replies(r, [b"GET"] * 3)
            assert [x.status for x in replies] == [200, 504, 200]
            assert replies[1].headers[b"x-shmfabric-splicer"] == b"error"
            assert [replies[0].seq, replies[2].seq] == [b"1", b"3"]
            assert not closed
            await wait_for(lambda: settled(sp))
            assert b'kind="timeout"' in sp.metrics.text()
        finally:
            await env.close()
    run(main())


def test_backend_failure_gives_502_in_place(pipeline):
    async def main():
        env = Env(pipeline)
        try:
            be = await env.backend("a")
            sp = await env.splice(default=[be.address], pool={"min": 1, "max": 4})
            r, w = await env.connect()
            w.write(get("/1", 1) + get("/2?drop=1", 2, "POST", body=b"x") + get("/3", 3) + get("/4?drop=1", 4) + get("/5", 5))
            replies, closed = await read_replies(r, [b"GET", b"POST", b"GET", b"GET", b"GET"])
            assert [x.status for x in replies] == [200, 502, 200, 502, 200]
            assert [replies[i].seq for i in (0, 2, 4)] == [b"1", b"3", b"5"]
            assert not closed
            await wait_for(lambda: settled(sp))
            # each request answered 502 is counted once, whatever the kind of failure
            failed = re.findall(rb'shmfabric_splicer_failed_requests_total\{backend="%s",kind="\w+",proto="http"\} ([0-9.]+)'
                                % be.address.encode(), sp.metrics.text())
            assert sum(float(x) for x in failed) == 2, sp.metrics.text()
        finally:
            await env.close()
    run(main())


def test_backend_killed_mid_pipeline(pipeline):
    async def main():
        env = Env(pipeline)
        try:
            fast = await env.backend("fast")
            dying = await env.backend("dying")
            sp = await env.splice(routes=[{"prefix": "/d", "backends": [dying.address]}], default=[fast.address],
                                  pool={"min": 1, "max": 8}, timeouts={"connect": 0.5})
            r, w = await env.connect()
            w.write(b"".join(get("/d/x?hang=1" if i % 2 else "/f", i) for i in range(8)))
            await wait_for(lambda: dying.stats.requests >= (4 if pipeline == 1 else 1))
            await dying.close()  # the server dies: its connections reset and it refuses new ones
            replies, closed = await read_replies(r, [b"GET"] * 8)
            assert [x.status for x in replies] == [502 if i % 2 else 200 for i in range(8)]
            assert [x.seq for x in replies if x.status == 200] == [b"0", b"2", b"4", b"6"]
            # later requests to the dead server fail fast and in place too
            w.write(get("/f", 100) + get("/d/y", 101) + get("/f", 102))
            replies, closed = await read_replies(r, [b"GET"] * 3)
            # 502 (connect refused) or, once failed connects took it out of rotation, 503
            assert [x.status for x in replies][::2] == [200, 200] and replies[1].status in (502, 503)
            assert not closed
        finally:
            await env.close()
    run(main())


def test_client_closing_mid_pipeline_leaks_nothing(pipeline):
    async def main():
        env = Env(pipeline)
        try:
            slow = await env.backend("slow", 0.1)
            sp = await env.splice(default=[slow.address], pool={"min": 2, "max": 6})
            await wait_for(lambda: sp.pool_sizes()[slow.address]["free"] == 2)
            for _ in range(3):
                r, w = await env.connect()
                w.write(b"".join(get(f"/x{i}", i) for i in range(40))
                        + get("/post", 99, "POST", body=b"abc") + get("/after", 100))
                await wait_for(lambda: slow.stats.concurrent >= 6)
                w.transport.abort()
            await wait_for(lambda: settled(sp) and not sp.clients)
            sizes = sp.pool_sizes()[slow.address]
            assert 2 <= sizes["free"] <= 6 and sizes["in_use"] == 0
            # the pool still works
            r, w = await env.connect()
            w.write(get("/again", 7))
            replies, _ = await read_replies(r, [b"GET"])
            assert replies[0].seq == b"7"
            assert b"/post" not in slow.stats.paths  # the barrier never started
        finally:
            await env.close()
    run(main())


def test_slow_backend_delays_others_only_as_far_as_order_forces():
    async def main():
        env = Env()
        try:
            fast = await env.backend("fast")
            slow = await env.backend("slow")
            await env.splice(routes=[{"prefix": "/slow", "backends": [slow.address]}], default=[fast.address])
            r1, w1 = await env.connect()
            w1.write(get("/slow/x?hang=1", 1) + get("/f", 2))  # this client waits behind its own slow request
            r2, w2 = await env.connect()
            w2.write(b"".join(get("/f", i) for i in range(10)))
            t1 = asyncio.ensure_future(read_replies(r1, [b"GET", b"GET"], timeout=30))
            replies2, _ = await read_replies(r2, [b"GET"] * 10)
            assert len(replies2) == 10 and all(x.status == 200 for x in replies2)  # not held up
            assert not t1.done()  # ... while the first client still waits, as ordering forces
            t1.cancel()
        finally:
            await env.close()
    run(main())


# --------------------------------------------------------------------------- backpressure
def test_deep_pipeline_is_bounded_and_completes(pipeline):
    async def main():
        env = Env(pipeline)
        try:
            be = await env.backend("a")
            sp = await env.splice(default=[be.address], pool={"min": 1, "max": 4}, limits={"max_pipeline": 8})
            r, w = await env.connect()
            n = 3000
            w.write(b"".join(get(f"/{i}", i) for i in range(n)))
            replies, closed = await read_replies(r, [b"GET"] * n, timeout=20)
            assert len(replies) == n and not closed
            assert all(x.seq == str(i).encode() for i, x in enumerate(replies))
            client = next(iter(sp.clients))
            assert client.merge.peak_slots <= 8 + 1  # read pauses at the bound (one read may overshoot by a request)
        finally:
            await env.close()
    run(main())


def test_client_that_does_not_read_is_bounded(pipeline):
    async def main():
        env = Env(pipeline)
        try:
            be = await env.backend("a")
            limit = 256 * 1024
            sp = await env.splice(default=[be.address], pool={"min": 1, "max": 4},
                                  limits={"max_pipeline": 64, "max_buffer_bytes": limit})
            r, w = await env.connect()
            n = 60
            w.write(b"".join(get(f"/{i}?size=100000", i) for i in range(n)))
            await wait_for(lambda: sp.clients and next(iter(sp.clients)).read_paused)
            await asyncio.sleep(0.3)
            client = next(iter(sp.clients))
            # held bytes stay near the bound: one extra response in flight per backend connection at most
            assert client.merge.held_bytes <= limit + 4 * 100_200 + 65536
            replies, _ = await read_replies(r, [b"GET"] * n, timeout=20)
            assert len(replies) == n and all(len(x.body) == 100000 for x in replies)
            assert [x.seq for x in replies] == [str(i).encode() for i in range(n)]
        finally:
            await env.close()
    run(main())


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad,status", [
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost : h\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"a" * 70000 + b"\r\n\r\n", 431),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: h\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/3.0\r\nHost: h\r\n\r\n", 505),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),  # a TLS ClientHello
])
def test_bad_request_gets_status_and_close_after_earlier_answers(bad, status):
    async def main():
        env = Env()
        try:
            be, sp, r, w = await env.one_backend()
            w.write(get("/ok1?delay=30", 1) + get("/ok2", 2) + bad + get("/never", 3))
            replies, closed = await read_replies(r, [b"GET", b"GET", b"GET"])
            assert [x.status for x in replies] == [200, 200, status]
            assert closed
            assert b"/never" not in be.stats.paths
            assert b"bad_request" in sp.metrics.text()
        finally:
            await env.close()
    run(main())


def test_connect_is_refused_and_unknown_route_is_404_and_no_server_is_503():
    async def main():
        env = Env()
        try:
            be = await env.backend("a")
            await env.splice(routes=[{"prefix": "/a", "backends": [be.address]},
                                     {"prefix": "/down", "backends": ["127.0.0.1:1"]}], pool={"min": 0, "max": 2},
                             timeouts={"connect": 0.5})
            r, w = await env.connect()
            w.write(get("/a/1", 1) + get("/zzz", 2) + get("/down/x", 3) + get("/a/2", 4))
            replies, closed = await read_replies(r, [b"GET"] * 4)
            assert [x.status for x in replies] == [200, 404, 502, 200]
            assert not closed
            w.write(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
            replies, closed = await read_replies(r, [b"GET"])
            assert replies[0].status == 405 and closed
        finally:
            await env.close()
    run(main())


def test_unhealthy_server_leaves_rotation_and_returns():
    async def main():
        env = Env()
        try:
            a = await env.backend("a")
            b = await env.backend("b")
            port_b = b.port
            sp = await env.splice(default=[a.address, b.address], pool={"min": 1, "max": 4},
                                  health={"interval": 0.05, "timeout": 0.5, "rise": 2, "fall": 2, "path": "/health"})
            server_b = sp.servers[b.address]
            await b.close()
            await wait_for(lambda: not server_b.up)
            r, w = await env.connect()
            w.write(b"".join(get(f"/{i}", i) for i in range(10)))
            replies, _ = await read_replies(r, [b"GET"] * 10)
            assert {x.headers[b"x-backend"] for x in replies} == {b"a"} and all(x.status == 200 for x in replies)
            b2 = await EchoBackend("b").start(port_b)
            env.backends.append(b2)
            await wait_for(lambda: server_b.up)
            w.write(b"".join(get(f"/{i}?delay=20", i) for i in range(10)))
            replies, _ = await read_replies(r, [b"GET"] * 10)
            assert b"b" in {x.headers[b"x-backend"] for x in replies}
            assert b"/health" in b2.stats.paths
        finally:
            await env.close()
    run(main())


def test_a_server_taken_out_by_its_checks_is_said_with_what_the_last_check_found(capsys):
    # A check that can never pass (a wrong path, a status the backend gives) must not fail in
    # silence: HAProxy logs "Server ... is DOWN, reason: ...". Coming back is said too.
    async def main():
        env = Env()
        try:
            a = await env.backend("a")
            sp = await env.splice(default=[a.address], pool={"min": 1, "max": 2},
                                  health={"interval": 0.05, "timeout": 0.5, "rise": 1, "fall": 2,
                                          "path": "/health?status=503"})
            server = sp.servers[a.address]
            await wait_for(lambda: not server.up)
            sp.servers[a.address].health_cfg = sp.servers[a.address].health_cfg.model_copy(update={"path": "/health"})
            await wait_for(lambda: server.up)
            return a.address
        finally:
            await env.close()

    address = run(main())
    err = capsys.readouterr().err
    down = [x for x in err.splitlines() if "is down" in x]
    assert len(down) == 1 and down[0].startswith(f"splice http: backend {address} is down: 2 health checks in a row failed, "
                                                  "the last: GET /health?status=503 answered 'HTTP/1.1 503"), err
    assert f"splice http: backend {address} is up: 1 health checks in a row passed" in err


def test_a_server_failing_its_http_check_stays_out_although_it_accepts_connections():
    # A server whose `health.path` answers 503 but which accepts TCP: the pool's own connects
    # must not count as passing checks (they would bring it back between two HTTP checks).
    async def main():
        env = Env()
        try:
            a = await env.backend("a")
            sp = await env.splice(default=[a.address], pool={"min": 2, "max": 4},
                                  health={"interval": 0.05, "timeout": 0.5, "rise": 2, "fall": 2,
                                          "path": "/health?status=503"})
            server = sp.servers[a.address]
            await wait_for(lambda: not server.up)
            ups = 0
            for _ in range(40):  # 2 s: 40 HTTP checks, and the pool refilling its connections
                await asyncio.sleep(0.05)
                ups += server.up
            assert ups == 0, f"the failing server came back {ups} times out of 40"
        finally:
            await env.close()
    run(main())


def test_stale_pooled_connection_is_retried_for_idempotent_requests(pipeline):
    async def main():
        env = Env(pipeline)
        try:
            be = await env.backend("a")
            sp = await env.splice(default=[be.address], pool={"min": 1, "max": 2})
            r, w = await env.connect()
            w.write(get("/1", 1))
            await read_replies(r, [b"GET"])
            be.kill_connections()  # e.g. the backend's keep-alive timeout fired
            w.write(get("/2", 2))
            replies, _ = await read_replies(r, [b"GET"])
            assert replies[0].status == 200 and replies[0].seq == b"2"
        finally:
            await env.close()
    run(main())


# ------------------------------------------------------------------------- HTTP features
def test_bodies_chunked_trailers_head_204_304_http10():
    async def main():
        env = Env()
        try:
            be = await env.backend("a")
            await env.splice(default=[be.address])
            r, w = await env.connect()
            w.write(get("/h", 0, "HEAD"))
            (head,), _ = await read_replies(r, [b"HEAD"])
            assert head.status == 200 and head.body == b"" and int(head.headers[b"content-length"]) > 0
            w.write(b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n"
                    b"X-Check: 1\r\n\r\n" + get("/ch?chunked=1", 1) + get("/n?status=204", 2) + get("/n?status=304", 3)
                    + get("/p", 4, "PUT", body=b"x" * 100000))
            replies, closed = await read_replies(r, [b"POST", b"GET", b"GET", b"GET", b"PUT"])
            assert b"body=11 " in replies[0].body and b"trailers=1" in replies[0].body
            assert replies[1].headers[b"transfer-encoding"] == b"chunked" and replies[1].trailers == ((b"X-Trailer", b"done"),)
            assert replies[2].status == 204 and replies[2].body == b"" and b"content-length" not in replies[2].headers
            assert replies[3].status == 304 and replies[3].body == b""
            assert b"body=100000 " in replies[4].body
            assert not closed
            # 1xx interim responses are passed on before the final one
            w.write(get("/early?early=1", 5))
            replies, _ = await read_replies(r, [b"GET"])
            assert replies[0].informational == [103] and replies[0].status == 200
            # HTTP/1.0: closed after the response unless keep-alive was asked for
            r2, w2 = await env.connect()
            w2.write(b"GET /ka HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            replies, closed = await read_replies(r2, [b"GET"])
            assert replies[0].headers[b"connection"] == b"keep-alive" and not closed
            w2.write(b"GET /ch?chunked=1 HTTP/1.0\r\n\r\n")
            replies, closed = await read_replies(r2, [b"GET"])
            assert b"fast" not in replies[0].body and closed and b"transfer-encoding" not in replies[0].headers
            # Connection: close from the client
            r3, w3 = await env.connect()
            w3.write(get("/1", 1, headers="Connection: close\r\n") + get("/2", 2))
            replies, closed = await read_replies(r3, [b"GET", b"GET"])
            assert len(replies) == 1 and closed and replies[0].headers[b"connection"] == b"close"
        finally:
            await env.close()
    run(main())


def test_expect_100_continue():
    async def main():
        env = Env()
        try:
            be = await env.backend("a")
            await env.splice(default=[be.address])
            r, w = await env.connect()
            w.write(b"POST /e HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
            line = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
            assert line.startswith(b"HTTP/1.1 100 Continue")
            w.write(b"body")
            replies, _ = await read_replies(r, [b"POST"])
            assert b"body=4 " in replies[0].body
        finally:
            await env.close()
    run(main())


async def _upgrade_backend() -> asyncio.base_events.Server:
    async def handle(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        if b"upgrade: echo" not in head.lower():
            writer.write(b"HTTP/1.1 400 X\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            writer.close()
            return
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\nhello:")
        while data := await reader.read(1024):
            writer.write(data.upper())
        writer.close()
    return await asyncio.start_server(handle, "127.0.0.1", 0)


def test_upgrade_is_tunnelled_or_refused():
    async def main():
        env = Env()
        srv = await _upgrade_backend()
        try:
            be = await env.backend("a")
            port = srv.sockets[0].getsockname()[1]
            sp = await env.splice(routes=[{"prefix": "/ws", "backends": [f"127.0.0.1:{port}"]}], default=[be.address],
                                  pool={"min": 0, "max": 2})
            r, w = await env.connect()
            w.write(get("/plain", 1))
            (plain,), _ = await read_replies(r, [b"GET"], probe=False)
            assert plain.seq == b"1"
            w.write(b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\nabc")
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 101") and b"Upgrade: echo" in head
            got = b""
            while len(got) < len(b"hello:ABC"):
                got += await asyncio.wait_for(r.read(100), 5)
            assert got == b"hello:ABC"
            w.write(b"more")
            assert await asyncio.wait_for(r.read(100), 5) == b"MORE"
            w.close()
            # an Upgrade the backend declines: its answer, then HTTP carries on
            r, w = await env.connect()
            w.write(b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: other\r\nConnection: Upgrade\r\n\r\n" + get("/after", 3))
            replies, closed = await read_replies(r, [b"GET", b"GET"])
            assert [x.status for x in replies] == [400, 200] and replies[1].seq == b"3" and not closed
            w.close()
            await sp.close()
            env.splicer = None
            # refuse mode: 501 and the connection carries on with HTTP
            await env.splice(default=[be.address], upgrade="refuse")
            r, w = await env.connect()
            w.write(b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n" + get("/next", 2))
            replies, closed = await read_replies(r, [b"GET", b"GET"])
            assert [x.status for x in replies] == [501, 200] and replies[1].seq == b"2"
        finally:
            srv.close()
            await env.close()
    run(main())


def test_routing_by_prefix_regex_and_host():
    async def main():
        env = Env()
        try:
            a, b, c, d = [await env.backend(n) for n in "abcd"]
            await env.splice(routes=[{"prefix": "/api", "backends": [a.address]},
                                     {"regex": r"\.png$", "backends": [b.address]},
                                     {"host": "*.example.com", "backends": [c.address]}], default=[d.address])
            r, w = await env.connect()
            w.write(get("/api/x", 1) + get("/apix", 2) + get("/img/cat.png?x=1", 3)
                    + b"GET /q HTTP/1.1\r\nHost: www.Example.com:8080\r\n\r\n" + get("/", 5))
            replies, _ = await read_replies(r, [b"GET"] * 5)
            assert [x.headers[b"x-backend"] for x in replies] == [b"a", b"d", b"b", b"c", b"d"]
        finally:
            await env.close()
    run(main())


def test_metrics_text_and_endpoint():
    async def main():
        env = Env()
        try:
            be = await env.backend("a")
            sp = await env.splice(default=[be.address], pool={"min": 2, "max": 4})
            r, w = await env.connect()
            w.write(b"".join(get(f"/{i}", i) for i in range(5)))
            await read_replies(r, [b"GET"] * 5)
            server = serve(sp.metrics.registry, "127.0.0.1:0")
            port = server.server_port
            text = await asyncio.get_running_loop().run_in_executor(
                None, lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())
            server.shutdown()
            b = be.address
            assert f'shmfabric_splicer_requests_total{{backend="{b}",proto="http"}} 5.0' in text
            assert re.search(rf'shmfabric_splicer_pool_connections{{backend="{b}",proto="http",state="free"}} [1-9]', text)
            assert f'shmfabric_splicer_request_duration_seconds_count{{backend="{b}",proto="http"}} 5.0' in text
            assert f'shmfabric_splicer_inflight{{backend="{b}",proto="http"}}' in text
            assert 'shmfabric_splicer_client_connections{proto="http"} 1.0' in text
        finally:
            await env.close()
    run(main())


def test_pool_reconnects_with_backoff_when_the_backend_comes_up_late():
    async def main():
        env = Env()
        try:
            import socket
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            sp = await env.splice(default=[f"127.0.0.1:{port}"], pool={"min": 2, "max": 4}, timeouts={"connect": 0.5})
            server = sp.servers[f"127.0.0.1:{port}"]
            await wait_for(lambda: not server.up)  # refused connects took it out of rotation
            r, w = await env.connect()
            w.write(get("/early", 1))
            replies, _ = await read_replies(r, [b"GET"])
            assert replies[0].status == 503
            be = await EchoBackend("late").start(port)
            env.backends.append(be)
            await wait_for(lambda: server.up and sp.pool_sizes()[server.name]["free"] == 2)
            w.write(get("/late", 2))
            replies, _ = await read_replies(r, [b"GET"])
            assert replies[0].status == 200 and replies[0].seq == b"2"
        finally:
            await env.close()
    run(main())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.binary(max_size=60), st.sampled_from([
    b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc",
    b"\r\n", b"Transfer-Encoding: chunked\r\n", b"0\r\n\r\n", b"GET /?delay=5 HTTP/1.1\r\nHost: h\r\n"])), max_size=8))
def test_fuzz_random_input_through_the_splicer_never_breaks_it(chunks):
    """Whatever a client sends, the splicer answers with HTTP or closes, leaks no pooled
    connection, raises nothing into the event loop, and keeps serving other clients."""
    async def main():
        env = Env()
        try:
            be = await env.backend("a")
            sp = await env.splice(default=[be.address], pool={"min": 1, "max": 4})
            r, w = await env.connect()
            for c in chunks:
                w.write(c)
            await asyncio.sleep(0.02)
            w.write_eof()
            data = await asyncio.wait_for(r.read(), 10)
            assert data == b"" or data.startswith(b"HTTP/1.1 ")
            w.close()
            await wait_for(lambda: settled(sp) and not sp.clients)
            r2, w2 = await env.connect()
            w2.write(get("/ok", 1))
            replies, _ = await read_replies(r2, [b"GET"])
            assert replies[0].status == 200
        finally:
            await env.close()
    run(main())


def test_idle_client_connection_is_closed_but_a_busy_one_is_not():
    async def main():
        env = Env()
        try:
            be = await env.backend("a")
            sp = await env.splice(default=[be.address], timeouts={"client_idle": 0.3, "request": 5})
            r, w = await env.connect()
            w.write(get("/slow?delay=700", 1))  # busy longer than the idle timeout: kept
            replies, _ = await read_replies(r, [b"GET"], probe=False)
            assert replies[0].status == 200
            data = await asyncio.wait_for(r.read(), 5)  # then idle: closed by the splicer
            assert data == b""
            await wait_for(lambda: not sp.clients)
        finally:
            await env.close()
    run(main())
