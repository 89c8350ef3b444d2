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
