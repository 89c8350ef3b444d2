"""Slow clients and the shared pool, second review.

* `timeouts.client_idle` cuts a client that takes nothing for that long, not one that reads
  steadily but slowly (its clock restarted only when writing paused, so a 50 kB/s reader of a
  large answer was cut short); and the cut is a reset, not a clean-looking end of a truncated
  answer.
* With `pool.pipeline` > 1, a reading client's request is never pipelined behind a response a
  slow client does not take (it waited for client_idle).
* The queue timeout counts exactly the time a request was not held back by its own client (a
  brief hold just before the deadline forgave the whole earlier wait).

No test asserts a duration: waits are bounded, and the assertions are on what the clients get.
"""
from __future__ import annotations

import asyncio
import re
import socket

import pytest

from shmfabric.splicer.config import HttpSpliceConfig
from shmfabric.splicer.http_server import HttpSplicer

from ._asyncio_backend import AsyncBackend
from .test_http_pool_fairness import get, wait_until
from .test_http_pool_fairness import with_splicer as _with_splicer

pytestmark = pytest.mark.timeout(90)


class SizedBackend(AsyncBackend):
    """/n/SIZE: SIZE bytes (written in 64 kB pieces, with backpressure); anything else: short."""

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                target = head.split(b" ", 2)[1]
                m = re.match(rb"/n/(\d+)", target)
                if m:
                    size = int(m.group(1))
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
                    piece = b"x" * 65536
                    while size:
                        n = min(size, len(piece))
                        writer.write(piece[:n])
                        size -= n
                        await writer.drain()
                else:
                    body = b"small " + target
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def with_splicer(test, **cfg) -> None:
    await _with_splicer(test, SizedBackend, 75, **cfg)


def small_rcvbuf_socket(port: int, rcvbuf: int = 8192) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


def test_a_client_reading_steadily_but_slowly_is_not_cut_by_client_idle():
    # client_idle 1 s; the client takes about 50 kB/s for 4 s (so writing stays paused for
    # longer than client_idle: the kernel's send buffer takes from ours only when a third of it
    # is free), then reads at full speed: the whole answer must come.
    size = 16 * 1024 * 1024

    async def test(be, sp):
        loop = asyncio.get_running_loop()
        sock = small_rcvbuf_socket(sp.port)
        await loop.sock_sendall(sock, b"GET /n/%d HTTP/1.1\r\nHost: x\r\n\r\n" % size)
        got = 0
        end = loop.time() + 4.0
        try:
            while loop.time() < end:
                data = await asyncio.wait_for(loop.sock_recv(sock, 5000), 10)
                assert data, f"connection closed after {got} bytes, while the client was reading"
                got += len(data)
                await asyncio.sleep(0.1)
            assert sp.clients, "the client was cut while reading"
            while True:
                data = await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 10)
                assert data, f"connection closed after {got} bytes"
                got += len(data)
                if got >= size + 38:  # the head: HTTP/1.1 200 OK + Content-Length
                    break
        except ConnectionResetError:
            raise AssertionError(f"connection reset after {got} bytes, while the client was reading") from None
        finally:
            sock.close()
    asyncio.run(with_splicer(test, pool={"min": 1, "max": 2}, timeouts={"request": 30, "client_idle": 1}))


def test_a_client_cut_for_client_idle_gets_a_reset_not_an_end_of_answer():
    # It took nothing for client_idle: what it finds in its socket is followed by a reset, so
    # the truncated answer cannot pass for a complete one ended by the server's close.
    async def test(be, sp):
        loop = asyncio.get_running_loop()
        sock = small_rcvbuf_socket(sp.port, 4096)
        await loop.sock_sendall(sock, b"GET /n/%d HTTP/1.1\r\nHost: x\r\n\r\n" % (8 * 1024 * 1024))
        await wait_until(lambda: sp.clients and all(c.write_paused for c in sp.clients))
        await wait_until(lambda: not sp.clients, timeout=15)  # cut after client_idle (1 s)
        got = 0
        outcome = None
        try:
            while True:
                data = await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), 10)
                if not data:
                    outcome = "eof"
                    break
                got += len(data)
        except ConnectionResetError:
            outcome = "reset"
        finally:
            sock.close()
        assert outcome == "reset", f"{outcome} after {got} bytes of the 8 MB answer"
        got = await get(sp.port, b"/after")
        assert got.startswith(b"HTTP/1.1 200 "), got[:200]
    asyncio.run(with_splicer(test, pool={"min": 1, "max": 2}, timeouts={"request": 30, "client_idle": 1}))


def test_a_reading_clients_request_is_not_pipelined_behind_a_slow_clients_response():
    # pool.max 2, pipeline 4: a client pipelines 8 GETs of 2 MB and reads nothing, so its
    # connections are paused, some with room for more pipelined requests. Requests of clients
    # that read must not join them (they waited for client_idle, 30 s): each is answered
    # within a bound far below it.
    async def test(be, sp):
        writers = []
        _, w = await stalled_client_sized(sp.port, 8, 2_000_000)
        writers.append(w)
        await wait_until(lambda: sp.pool_sizes()[be.address]["paused"] >= 1)
        await asyncio.sleep(1.0)  # let the slow client's connections settle (all paused)
        answers = await asyncio.gather(*(get(sp.port, b"/reader%d" % i, timeout=10) for i in range(8)),
                                       return_exceptions=True)
        for i, got in enumerate(answers):
            assert not isinstance(got, BaseException), f"reader {i}: {got!r} (no answer within 10 s)"
            assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"small /reader%d" % i), got[:300]
        p = sp.pool_sizes()[be.address]
        assert p["free"] + p["in_use"] + p["connecting"] <= 4, p
        for w in writers:
            w.close()
    asyncio.run(with_splicer(test, pool={"min": 1, "max": 2, "pipeline": 4},
                             timeouts={"request": 5, "client_idle": 30, "queue": 5}))


async def stalled_client_sized(port: int, count: int, size: int):
    sock = small_rcvbuf_socket(port, 4096)
    r, w = await asyncio.open_connection(sock=sock, limit=1 << 16)
    w.write(b"".join(b"GET /n/%d?i=%d HTTP/1.1\r\nHost: x\r\n\r\n" % (size, i) for i in range(count)))
    return r, w


class FakeClient:
    def __init__(self) -> None:
        self.held = False


class FakeExchange:
    """What the queue sweep reads of an exchange waiting for a pooled connection."""

    def __init__(self, client: FakeClient, qclock: float) -> None:
        self.client = client
        self.queued = True
        self.finished = False
        self.qclock = qclock
        self.qheld = 0.0
        self.timed_out_at: float | None = None
        self.now = 0.0

    @property
    def held_back(self) -> bool:
        return self.client.held

    def on_queue_timeout(self, seconds: float) -> None:
        self.queued = False
        self.finished = True
        self.timed_out_at = self.now


def run_queue_sweep(sp: HttpSplicer, exchanges: list[FakeExchange], start: float, until: float, held,
                    step: float = 0.125) -> None:
    """Sweep passes every `step` s of a simulated clock from `start` to `until` (binary
    fractions: exact); `held(t)` says which clients hold their requests back during the step
    that ends at t."""
    t = start
    while t < until:
        t += step
        for c, on in held(t).items():
            c.held = on
        for ex in exchanges:
            ex.now = t
        sp._sweep_queue(t, step, 1.0)


def test_the_queue_deadline_subtracts_time_held_back_and_forgives_nothing_else():
    # timeouts.queue 1 s, a sweep pass every 1/8 s. A waits from 0 and is held back only from
    # 0.875 to 1 s: it is due at 1.125 s (1 s unheld + 0.125 s held), not 1 s after the hold
    # ended (that forgave the whole earlier wait: about 2 s). B, queued later (0.25 s) and never
    # held, is due at 1.25 s, after A, whatever order their entries are in. C, held from 0 to
    # 0.5 s, is due at 1.5 s.
    sp = HttpSplicer(HttpSpliceConfig(listen="127.0.0.1:0", default=["127.0.0.1:9"], health={"enabled": False}))
    ca, cb, cc = FakeClient(), FakeClient(), FakeClient()
    a, b, c = FakeExchange(ca, 0.0), FakeExchange(cb, 0.25), FakeExchange(cc, 0.0)
    sp.queue_deadlines.extend([(0.0, c), (0.0, a)])

    def held(t: float) -> dict:
        return {ca: 0.875 < t <= 1.0, cb: False, cc: t <= 0.5}

    run_queue_sweep(sp, [a, c], 0.0, 0.25, held)
    sp.queue_deadlines.append((0.25, b))
    run_queue_sweep(sp, [a, b, c], 0.25, 1.0, held)
    assert (a.timed_out_at, b.timed_out_at, c.timed_out_at) == (None, None, None)
    run_queue_sweep(sp, [a, b, c], 1.0, 3.0, held)
    assert (a.timed_out_at, b.timed_out_at, c.timed_out_at) == (1.125, 1.25, 1.5)
    assert not sp.queue_deadlines  # nothing left behind


def test_a_request_held_back_all_along_never_times_out_in_the_queue():
    sp = HttpSplicer(HttpSpliceConfig(listen="127.0.0.1:0", default=["127.0.0.1:9"], health={"enabled": False}))
    cl = FakeClient()
    ex = FakeExchange(cl, 0.0)
    sp.queue_deadlines.append((0.0, ex))
    run_queue_sweep(sp, [ex], 0.0, 5.0, lambda t: {cl: True})
    assert ex.timed_out_at is None and len(sp.queue_deadlines) == 1
    # Once its client reads again, the queue's full second runs from there.
    run_queue_sweep(sp, [ex], 5.0, 7.0, lambda t: {cl: False})
    assert ex.timed_out_at == 6.0
