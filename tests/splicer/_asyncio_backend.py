"""The scaffolding of the small asyncio HTTP backends the splicer tests write: a listening
server on a free loopback port, its address, and a clean close. Each test's backend subclasses
it and writes its own `_handle` (how it answers is what the test is about)."""
from __future__ import annotations

import asyncio


class AsyncBackend:
    """Subclasses define `async def _handle(reader, writer)`."""

    server: asyncio.base_events.Server | None = None

    async def start(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    @property
    def address(self) -> str:
        return "127.0.0.1:%d" % self.server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        self.server.close()  # type: ignore[union-attr]
        await self.server.wait_closed()  # type: ignore[union-attr]


async def run_with_splicer(backend: AsyncBackend, test, **cfg) -> None:
    """Start `backend` and an HTTP splicer in front of it (health checks off unless `cfg` says),
    run `await test(backend, splicer)` within 45 s, and close both."""
    from shmfabric.splicer.config import HttpSpliceConfig
    from shmfabric.splicer.http_server import HttpSplicer

    be = await backend.start()
    cfg.setdefault("health", {"enabled": False})
    cfg.setdefault("default", [be.address])
    sp = HttpSplicer(HttpSpliceConfig(listen="127.0.0.1:0", **cfg))
    await sp.start()
    try:
        await asyncio.wait_for(test(be, sp), 45)
    finally:
        await sp.close()
        await be.close()


async def exchange(port: int, data: bytes, timeout: float = 8.0) -> tuple[bytes, bool]:
    """Send `data`, read until the splicer closes (True) or `timeout` passes with nothing (False)."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(data)
    got = b""
    closed = False
    try:
        while True:
            chunk = await asyncio.wait_for(r.read(65536), timeout)
            if not chunk:
                closed = True
                break
            got += chunk
    except asyncio.TimeoutError:
        pass
    except ConnectionResetError:
        closed = True
    w.close()
    return got, closed


async def read_answers(r: asyncio.StreamReader, count: int, timeout: float = 8.0, head: bool = False) -> bytes:
    """Read until `count` whole answers with Content-Length came (`head`: answers to HEAD, no body)."""
    got = b""
    while True:
        pos, n = 0, 0
        while n < count:
            end = got.find(b"\r\n\r\n", pos)
            if end < 0:
                break
            fields = got[pos:end].lower()
            assert b"content-length: " in fields, f"not an answer this test expects: {got!r}"
            length = 0 if head else int(fields.split(b"content-length: ")[1].split(b"\r\n")[0])
            if len(got) < end + 4 + length:
                break
            pos, n = end + 4 + length, n + 1
        if n == count:
            return got
        chunk = await asyncio.wait_for(r.read(65536), timeout)
        assert chunk, f"the connection closed after {got!r}"
        got += chunk
