"""HTTP splicer cases from the seventh review: each one failed before its fix.

* a backend's 101 without `Upgrade` / `Connection: upgrade` left the client hanging forever;
* a chunked request body held behind a slow request cost ~10x the bytes counted against
  `limits.max_buffer_bytes` when the client sent tiny chunks;
* the splicer's own answers to an HTTP/1.0 keep-alive client lacked `Connection: keep-alive`.
"""
from __future__ import annotations

import asyncio
import gc
import tracemalloc

import pytest


from ._asyncio_backend import AsyncBackend, read_answers, run_with_splicer

pytestmark = pytest.mark.timeout(60)


class Backend(AsyncBackend):
    """/s101...: a 101 lacking the fields of an upgrade, with bytes after it, then a close after
    a while; /slow: answers after 1 s; anything else: a short answer (a body is read by
    Content-Length or as chunked). Keeps the request heads."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                target = head.split(b" ", 2)[1]
                low = head.lower()
                if b"transfer-encoding: chunked" in low:
                    while True:
                        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                        if size == 0:
                            while await reader.readuntil(b"\r\n") != b"\r\n":
                                pass
                            break
                        await reader.readexactly(size + 2)
                elif b"content-length:" in low:
                    await reader.readexactly(int(low.split(b"content-length:")[1].split(b"\r\n")[0]))
                if target.startswith(b"/s101"):
                    fields = b"Upgrade: foo\r\n" if target == b"/s101-upgrade-only" else b""
                    writer.write(b"HTTP/1.1 101 Switching Protocols\r\n%s\r\nRAWBYTES" % fields)
                    await writer.drain()
                    await asyncio.sleep(0.5)
                    return
                if target == b"/slow":
                    await asyncio.sleep(1.0)
                body = b"echo " + target
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def with_splicer(test, **cfg) -> None:
    await run_with_splicer(Backend(), test, **cfg)



# -- F2: a 101 that is not an upgrade -----------------------------------------------------------
@pytest.mark.parametrize("path", ["/s101", "/s101-upgrade-only"])
def test_a_101_without_the_upgrade_fields_is_refused_with_502_not_a_hanging_tunnel(path):
    # Before: the exchange switched to a tunnel on the 101, the bytes after it failed to parse
    # as a response and took the exchange off the connection, and the backend's close then found
    # no tunnel to end: the client waited forever. Now: 502 in place, sent once (the backend
    # acted on it), and the connection goes on as HTTP.
    async def test(be, sp):
        r, w = await asyncio.open_connection("127.0.0.1", sp.port)
        w.write(b"GET /warm HTTP/1.1\r\nHost: x\r\n\r\n")  # the upgrade then goes on a reused connection
        await read_answers(r, 1)
        w.write(b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: foo\r\n\r\n" % path.encode())
        got = await read_answers(r, 1)
        assert got.startswith(b"HTTP/1.1 502 "), got
        assert b"101 Switching Protocols without `Upgrade` and `Connection: upgrade`" in got, got
        assert b"RAWBYTES" not in got
        w.write(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
        got = await read_answers(r, 1)
        assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"echo /after"), got
        w.close()
        assert sum(h.startswith(b"GET /s101") for h in be.heads) == 1, be.heads  # not retried
    asyncio.run(with_splicer(test, pool={"min": 1, "max": 1}))


# -- F3: a chunked body in tiny chunks, held behind a slow request ----------------------------
def test_a_held_request_body_in_tiny_chunks_costs_about_the_bytes_it_counts():
    # 100,000 chunks of 1 byte (600,000 bytes of chunked framing, under max_buffer_bytes) held
    # behind a slow GET: one Python bytes object per chunk cost ~10x that.
    chunks = 100_000
    body = b"1\r\na\r\n" * chunks + b"0\r\n\r\n"

    async def test(be, sp):
        r, w = await asyncio.open_connection("127.0.0.1", sp.port)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            w.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"
                    b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
            client = None
            end = asyncio.get_running_loop().time() + 20
            while client is None or client.body_held < len(body) - 5:
                assert asyncio.get_running_loop().time() < end, "the body was not taken in"
                await asyncio.sleep(0.02)
                client = next(iter(sp.clients), None)
                assert not be.heads[1:], "the POST must wait behind the slow GET"
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert client.body_held >= 6 * chunks
        assert held < 3 * client.body_held, (held, client.body_held)
        got = await read_answers(r, 2, timeout=10)
        assert got.count(b"HTTP/1.1 200 ") == 2 and got.endswith(b"echo /b"), got[-200:]
        w.close()
    asyncio.run(with_splicer(test))


# -- F4: the splicer's own answers to an HTTP/1.0 keep-alive client -----------------------------
def test_the_splicers_own_answer_to_an_http10_keep_alive_client_says_keep_alive():
    async def test(be, sp):
        r, w = await asyncio.open_connection("127.0.0.1", sp.port)
        w.write(b"GET /nowhere HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        got = await read_answers(r, 1)
        head = got.split(b"\r\n\r\n")[0].lower()
        assert head.startswith(b"http/1.1 404 ") and b"\r\nconnection: keep-alive" in head, got
        w.write(b"GET /api/x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")  # the connection stayed open
        got = await read_answers(r, 1)
        assert got.startswith(b"HTTP/1.1 200 ") and b"Connection: keep-alive" in got, got
        # without keep-alive: no such field, and the connection closes after the answer
        w.write(b"GET /nowhere HTTP/1.0\r\n\r\n")
        got = await asyncio.wait_for(r.read(), 5)
        assert got.startswith(b"HTTP/1.1 404 ") and b"keep-alive" not in got.lower(), got
        w.close()

    async def routed() -> None:
        be = await Backend().start()
        try:
            await with_splicer(lambda _be, sp: test(be, sp), default=[], routes=[{"prefix": "/api", "backends": [be.address]}])
        finally:
            await be.close()
    asyncio.run(routed())
