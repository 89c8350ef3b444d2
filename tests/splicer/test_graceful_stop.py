"""Graceful stop of both splicers, driven by real signals to a real `shmfabric splice` process.

On SIGTERM (or SIGINT) a splicer stops listening, answers every request it has already read,
reads no new one, and closes each client connection after its last answer (a half-close first,
so a client still sending loses none of its answers). `timeouts.drain` bounds the wait; a
second signal cuts it short. No test asserts a duration.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from shmfabric.splicer.redis_resp import encode_command

from .redis_fixtures import free_port, needs_redis, redis_servers, wait_port
from .test_http_proxy import Env, get, read_replies, run

pytestmark = pytest.mark.timeout(120)


def _splice(*argv: str) -> subprocess.Popen:
    # Its own process group, so a test can signal the group as systemd and terminals do.
    return subprocess.Popen([sys.executable, "-m", "shmfabric", "splice", *argv], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _ready(proc: subprocess.Popen, port: int) -> None:
    """Wait until the splicer's workers accept: its master announces them on stdout (the port
    itself accepts earlier, on the master's socket, and a stop before the workers are up would
    stop them before they answer anything)."""
    line = proc.stdout.readline()  # type: ignore[union-attr]
    assert line.startswith("splice ") and "listening on" in line, line
    wait_port(port)


def _stop(proc: subprocess.Popen, how: str) -> None:
    """SIGTERM to the splicer (`pid`) or to its whole process group (`group`: systemd's stop)."""
    if how == "group":
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


class _HttpBackend:
    """`python -m shmfabric.bench.http_backend` in its own process (`?delay=MS` per request)."""

    def __init__(self, name: str = "b") -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "shmfabric.bench.http_backend", str(self.port), "0", name],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout.readline().startswith("ready"), "the test backend did not start"

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def http_backend():
    b = _HttpBackend()
    yield b
    b.close()


def _http_splicer(backend: _HttpBackend, *extra: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = _splice("http", "--listen", f"127.0.0.1:{port}", "--default", f"127.0.0.1:{backend.port}",
                   "--pool", "4", *extra)
    _ready(proc, port)
    return proc, port


@pytest.mark.parametrize("workers,how", [(1, "pid"), (2, "pid"), (2, "group")])
def test_http_sigterm_answers_the_requests_read_then_closes(http_backend, workers: int, how: str) -> None:
    # `group`: each worker gets the SIGTERM directly and through its parent, which must count
    # as one request to stop, not as a second signal that cuts.
    proc, port = _http_splicer(http_backend, "--workers", str(workers))

    async def scenario() -> tuple:
        idle_r, idle_w = await asyncio.open_connection("127.0.0.1", port)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        # Three requests in flight, the first the slowest: all are answered, in order.
        writer.write(get("/?delay=1500", 0) + get("/?delay=100", 1) + get("/?delay=800", 2))
        await writer.drain()
        await asyncio.sleep(0.5)
        _stop(proc, how)
        await asyncio.sleep(0.2)
        writer.write(get("/?late=1", 3))  # sent after the stop began: never read, never answered
        await writer.drain()
        replies, closed = await read_replies(reader, [b"GET"] * 4, timeout=20)
        idle_eof = await asyncio.wait_for(idle_r.read(), 20)
        writer.close()
        idle_w.close()
        return replies, closed, idle_eof

    started = time.monotonic()
    try:
        replies, closed, idle_eof = asyncio.run(scenario())
        took = time.monotonic() - started
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    # What the splicer said and how long the client waited name the cause of a failure (one CI
    # run saw no answer at all, closed or timed out, and nothing else to go on).
    seen = f"replies={replies} closed={closed} after {took:.1f} s; splicer stderr: {err!r}"
    assert [(r.status, r.seq) for r in replies] == [(200, b"0"), (200, b"1"), (200, b"2")], seen
    assert replies[-1].headers.get(b"connection") == b"close"  # the last answer says so
    assert closed, "the connection stays open after its last answer"
    assert idle_eof == b"", "an idle keep-alive connection is closed at once, with nothing written"
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert "cutting" not in err, err  # every connection finished inside timeouts.drain
    assert _refused(port), "the splicer still listens after its graceful stop"


@pytest.mark.parametrize("how", ["drain-timeout", "second-signal"])
def test_http_a_request_that_outlasts_the_drain_is_cut(http_backend, how: str) -> None:
    proc, port = _http_splicer(http_backend, "--drain", "0.5" if how == "drain-timeout" else "600")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(get("/?hang=1", 0))
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        if how == "second-signal":
            time.sleep(0.5)
            assert proc.poll() is None, "the first signal did not wait for the request in flight"
            proc.send_signal(signal.SIGTERM)
        try:
            got = s.recv(65536)
        except ConnectionResetError:
            got = b""
        out, err = proc.communicate(timeout=30)
    assert got == b"", got  # cut: no half-written answer
    assert proc.returncode == 0 and "Traceback" not in err, err
    want = "second signal" if how == "second-signal" else "timeouts.drain 0.5 s"
    assert "cutting 1 client connection(s)" in err and want in err, err


@needs_redis
@pytest.mark.parametrize("workers,how", [(1, "pid"), (2, "pid"), (2, "group")])
def test_redis_sigterm_mid_pipeline_answers_exactly_the_commands_that_ran(tmp_path: Path, workers: int,
                                                                          how: str) -> None:
    # A client streams 400k SETs of distinct keys and reads as it goes; the splicer is told to
    # stop part way. The client must get a run of +OK, then EOF (not a reset), and the servers
    # must hold exactly the keys of the answered SETs: nothing ran unanswered, nothing answered
    # was lost.
    n = 400_000
    payload = b"".join(encode_command([b"SET", b"gs:%d" % i, b"%d" % i]) for i in range(n))
    with redis_servers(tmp_path, 2) as servers:
        port = free_port()
        proc = _splice("redis", "--listen", f"127.0.0.1:{port}", *[x for s in servers for x in ("--server", s.address)],
                       "--workers", str(workers))
        try:
            _ready(proc, port)
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)

            def send() -> None:
                try:
                    sock.sendall(payload)
                except OSError:
                    pass  # the splicer closed for good while this was still sending

            sender = threading.Thread(target=send, daemon=True)
            sender.start()
            got = bytearray()
            signalled = False
            while True:
                data = sock.recv(1 << 16)
                if not data:
                    break
                got += data
                if not signalled and len(got) >= 20_000 * 5:
                    _stop(proc, how)
                    signalled = True
            sock.close()
            sender.join(30)
            out, err = proc.communicate(timeout=30)
        finally:
            proc.kill()
        k = len(got) // 5
        assert bytes(got) == b"+OK\r\n" * k
        assert 20_000 <= k < n, k  # the stop came mid-pipeline
        stored: set[bytes] = set()
        for s in servers:
            stored |= set(s.client().keys("gs:*"))
        assert len(stored) == k and stored == {b"gs:%d" % i for i in range(k)}
        assert proc.returncode == 0 and "Traceback" not in err, err
        assert _refused(port)


def test_a_slow_reader_still_sending_gets_a_large_last_answer_whole(http_backend) -> None:
    # `Connection: close` on a 6 MB answer; the client reads about 1.5 MB/s and keeps sending.
    # Megabytes wait in the kernel's send buffer long after ours is empty: closing then, with
    # the client's bytes unread, would reset the connection and drop them.
    proc, port = _http_splicer(http_backend)
    size = 6_000_000
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            s.sendall(get(f"/?size={size}", 0, headers="Connection: close\r\n"))
            stop = threading.Event()

            def chatter() -> None:
                while not stop.wait(0.05):
                    try:
                        s.sendall(get("/", 1))
                    except OSError:
                        return

            t = threading.Thread(target=chatter, daemon=True)
            t.start()
            got = bytearray()
            try:
                while data := s.recv(100_000):
                    got += data
                    time.sleep(0.06)
            finally:
                stop.set()
                t.join(5)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    head, _, body = bytes(got).partition(b"\r\n\r\n")
    assert b"content-length: %d" % size in head.lower(), head
    assert len(body) == size, f"{len(body)} of {size} body bytes before the close"


def test_an_upgrade_declined_during_a_graceful_stop_ends_the_connection() -> None:
    async def decline(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(0.3)  # still deciding when the stop begins
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nno")
        await writer.drain()
        await reader.read()

    async def main():
        env = Env()
        backend = await asyncio.start_server(decline, "127.0.0.1", 0)
        try:
            sp = await env.splice(default=[f"127.0.0.1:{backend.sockets[0].getsockname()[1]}"])
            r, w = await env.connect()
            w.write(get("/ws", 0, headers="Connection: Upgrade\r\nUpgrade: echo\r\n"))
            await asyncio.sleep(0.1)
            sp.drain()
            replies, closed = await read_replies(r, [b"GET"], timeout=10)
            assert [(x.status, x.body) for x in replies] == [(200, b"no")] and closed, (replies, closed)
        finally:
            await env.close()
            backend.close()
    run(main())


def test_a_connection_lingering_after_its_answers_is_not_closed_again_by_the_idle_sweep(monkeypatch) -> None:
    # Every idle sweep used to close it again, each time starting another linger timer.
    import shmfabric.splicer.http_proxy as http_proxy

    calls = []
    real = http_proxy.close_lingering
    monkeypatch.setattr(http_proxy, "close_lingering", lambda *a, **k: (calls.append(1), real(*a, **k)))

    async def main():
        env = Env()
        try:
            be = await env.backend("a")
            await env.splice(default=[be.address], timeouts={"client_idle": 0.1})
            r, w = await env.connect()
            # a large answer the client never reads, then the close the request asked for
            w.write(get("/?size=3000000", 0, headers="Connection: close\r\n"))
            await asyncio.sleep(1.5)  # about 30 idle sweeps
            assert len(calls) == 1, f"closed {len(calls)} times"
            w.close()
        finally:
            await env.close()
    run(main())


def test_an_answer_held_behind_a_slow_one_says_close_when_the_stop_comes_after_its_head() -> None:
    # The second answer is complete (its head encoded for a connection that stays open) and
    # held behind the first when the stop comes: it is rewritten to say the connection closes.
    async def main():
        env = Env()
        try:
            _, sp, r, w = await env.one_backend()
            w.write(get("/?delay=800", 0) + get("/?delay=50", 1))
            await asyncio.sleep(0.3)
            sp.drain()
            replies, closed = await read_replies(r, [b"GET", b"GET"], timeout=10)
            assert [x.seq for x in replies] == [b"0", b"1"] and closed, (replies, closed)
            assert replies[0].headers.get(b"connection") != b"close"
            assert replies[1].headers.get(b"connection") == b"close", replies[1].headers
        finally:
            await env.close()
    run(main())


def _response(s: socket.socket, buf: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """One response from `s`: (status, lower-cased headers, the bytes read past it); EOF first
    gives status 0."""
    while b"\r\n\r\n" not in buf:
        data = s.recv(65536)
        if not data:
            return 0, {}, b""
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip().lower() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    n = int(headers.get("content-length", "0"))
    while len(rest) < n:
        data = s.recv(65536)
        if not data:
            break
        rest += data
    return int(lines[0].split()[1]), headers, rest[n:]


def _get_line(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode()


@pytest.mark.parametrize("how", ["slow answer", "own 504", "own 404 held"])
def test_a_request_sent_just_after_the_last_answer_of_a_draining_connection_is_answered(http_backend, how: str) -> None:
    # A drain keeps a connection whose last answer went out without `Connection: close` for one
    # more request. Its grace counts from that answer (a 2 s answer is not "idle for 1 s"), and
    # answers the splicer makes itself (504, 404) say close when the connection ends after them.
    extra = ["--timeout", "1"] if how == "own 504" else []
    port = free_port()
    proc = _splice("http", "--listen", f"127.0.0.1:{port}", "--route", f"/a=127.0.0.1:{http_backend.port}",
                   "--pool", "4", *extra)
    try:
        _ready(proc, port)
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            if how == "slow answer":
                s.sendall(_get_line("/a?delay=2000"))
                status, headers, rest = _response(s)
                assert status == 200 and "connection" not in headers
                _stop(proc, "pid")  # the connection is idle now, its last byte in came 2 s ago
                time.sleep(0.1)  # the stop has begun (not a timing assertion)
            elif how == "own 504":
                s.sendall(_get_line("/a?hang=1"))
                time.sleep(0.3)
                _stop(proc, "pid")
                status, headers, rest = _response(s)
                assert status == 504 and headers.get("connection") == "close", headers
            else:
                s.sendall(_get_line("/a?delay=1000") + _get_line("/nope"))
                time.sleep(0.3)
                _stop(proc, "pid")
                status, headers, rest = _response(s)
                assert status == 200
                status, headers, rest = _response(s, rest)
                assert status == 404 and headers.get("connection") == "close", headers
            if headers.get("connection") != "close":
                time.sleep(0.1)  # a client's think time
                s.sendall(_get_line("/a"))
                status, headers, rest = _response(s, rest)
                assert status == 200 and headers.get("connection") == "close", (status, headers)
            assert s.recv(100) == b""  # then the connection ends cleanly
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()



async def _stop_as_a_connection_is_accepted(port: int, payload: bytes, busy, drain, close) -> bytes:
    """Run a graceful stop the way a worker does (GracefulStop.run with `busy`, then `close`)
    whose request lands in the same event-loop turn as a client's connection: the connection is
    in the listen queue with `payload` sent when the stop begins. Returns what the client got."""
    from shmfabric.splicer.workers import GracefulStop

    got: list[bytes] = []
    sent = threading.Event()

    def client() -> None:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(payload)
        sent.set()
        buf = b""
        try:
            while chunk := s.recv(65536):
                buf += chunk
        except OSError as exc:
            buf += repr(exc).encode()
        got.append(buf)
        s.close()

    loop = asyncio.get_running_loop()
    stop = GracefulStop(loop)
    t = threading.Thread(target=client, daemon=True)

    def in_one_turn() -> None:
        t.start()
        sent.wait(5)
        time.sleep(0.05)  # accepted by the kernel, its request in the socket buffer
        stop.requested.set()

    loop.call_soon(in_one_turn)
    try:
        await stop.run(drain, busy, 5.0)
    finally:
        stop.close()  # (pytest's own SIGINT handler back)
    await close()
    await asyncio.sleep(0.3)  # as a worker's asyncio.run gives the loop a few more turns
    await asyncio.to_thread(t.join, 10)
    return got[0] if got else b"(no answer)"


def _with_uvloop(coro):
    # uvloop, as the workers run it: the accept of the queued connection and the stop request
    # then come in the same turn every time.
    uvloop = pytest.importorskip("uvloop")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(asyncio.wait_for(coro, 30))


def test_http_a_connection_accepted_as_the_stop_begins_is_answered_not_503(http_backend) -> None:
    # The stop used to count only connections whose connection_made had run: it found none,
    # closed the pools, and then the queued connection_made ran and its request got
    # "503 no backend server is up for this route" with the backend up (seen in a reload test).
    from shmfabric.splicer.config import HttpSpliceConfig
    from shmfabric.splicer.http_server import HttpSplicer

    async def main() -> bytes:
        sp = HttpSplicer(HttpSpliceConfig(listen="127.0.0.1:0", default=[f"127.0.0.1:{http_backend.port}"],
                                          health={"enabled": False}))
        await sp.start()
        return await _stop_as_a_connection_is_accepted(sp.port, b"GET /late HTTP/1.1\r\nHost: t\r\n\r\n",
                                                       sp.busy, sp.drain, sp.close)

    answer = _with_uvloop(main())
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert b"connection: close" in answer.lower()  # answered, then the draining worker closes it


@needs_redis
def test_redis_a_connection_accepted_as_the_stop_begins_is_answered(tmp_path: Path) -> None:
    # The same race in the Redis splicer, and one more step: a connection accepted just as the
    # stop began was closed unread, so a client connecting during a reload lost its first
    # command (b''). It is now read once and answered, then closed.
    from shmfabric.splicer.config import RedisSpliceConfig
    from shmfabric.splicer.redis_proxy import RedisSplicer

    with redis_servers(tmp_path, 1) as (server,):
        async def main() -> bytes:
            cfg = RedisSpliceConfig.model_validate(dict(listen=f"127.0.0.1:{free_port()}",
                                                        servers=[f"127.0.0.1:{server.port}"]))
            sp = RedisSplicer(cfg)
            _, port = await sp.start()
            return await _stop_as_a_connection_is_accepted(port, encode_command([b"PING", b"late"]),
                                                           lambda: sp.client_count, sp.drain, sp.stop)

        answer = _with_uvloop(main())
    assert answer == b"$4\r\nlate\r\n", answer


def test_a_forward_that_lands_just_after_the_direct_sigterm_counts_once() -> None:
    # `kill -TERM -PGID`: a worker gets SIGTERM directly and, microseconds later, its master's
    # FORWARD_SIGNAL. uvloop ran an add_signal_handler callback twice for a signal landing between
    # its read of the signal pipe and its check of Python's pending signals: one stop counted as
    # two and cut every connection (the rare failure of
    # test_http_sigterm_answers_the_requests_read_then_closes[2-group]). The landing is forced:
    # uvloop calls uvloop._noop.noop() right in that window.
    uvloop = pytest.importorskip("uvloop")
    noop = pytest.importorskip("uvloop._noop")
    if not callable(getattr(noop, "noop", None)):
        pytest.skip(f"uvloop {uvloop.__version__} has no _noop.noop to force the signal's timing with")
    script = textwrap.dedent("""
        import asyncio, os, signal
        import uvloop, uvloop._noop
        from shmfabric.splicer import workers as W

        W._in_worker = True
        real, armed = uvloop._noop.noop, [False]

        def noop():
            if armed[0]:
                armed[0] = False
                os.kill(os.getpid(), W.FORWARD_SIGNAL)
            return real()

        uvloop._noop.noop = noop

        async def main():
            stop = W.GracefulStop(asyncio.get_running_loop())
            armed[0] = True
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(20):
                await asyncio.sleep(0.01)
            print(stop.requested.is_set(), stop.cut.is_set(), armed[0])

        uvloop.run(main())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    # requested, not cut, and the forward was really sent inside the window
    assert out.stdout.split() == ["True", "False", "False"], (out.stdout, out.stderr)


def test_a_real_second_signal_still_cuts() -> None:
    script = textwrap.dedent("""
        import asyncio, os, signal, time
        from shmfabric.splicer import workers as W

        W._in_worker = True

        async def main():
            stop = W.GracefulStop(asyncio.get_running_loop())
            os.kill(os.getpid(), W.FORWARD_SIGNAL)
            await asyncio.sleep(0.05)
            first = (stop.requested.is_set(), stop.cut.is_set())
            os.kill(os.getpid(), W.FORWARD_SIGNAL)
            await asyncio.sleep(0.05)
            print(*first, stop.requested.is_set(), stop.cut.is_set())

        asyncio.run(main())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert out.stdout.split() == ["True", "False", "True", "True"], (out.stdout, out.stderr)
