"""A small asyncio HTTP/1.1 backend for splicer tests and benchmarks.

Each connection serves one request at a time, in order (the behaviour of a thread-per-request
application server behind a proxy), after a configurable delay. The query string controls a
single request, so a test can script failures per request:

    ?delay=MS       answer after MS milliseconds (overrides the server's default delay)
    ?status=N       answer with status N
    ?size=N         body of N bytes ("x" repeated) instead of the echo text
    ?chunked=1      chunked body (with a trailer `X-Trailer: done`)
    ?close=1        answer, then close the connection
    ?drop=1         close the connection without answering
    ?hang=1         never answer
    ?early=1        send 103 Early Hints before the response

Every response echoes the request's `X-Seq` header (if any) and names the backend in
`X-Backend`, so clients can check order and routing. `HEAD` gets headers only; a request with a
body gets the body's length and a checksum echoed. The backend counts requests and connections
(`stats`) so tests can check what reached it. Parsing uses the splicer's own RequestFramer.
"""
from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from urllib.parse import parse_qs

from shmfabric.splicer.http_framer import (
    NEED_DATA, ConnectionClosed, Data, EndOfMessage, RemoteProtocolError, Request, RequestFramer, encode_chunk,
)

__all__ = ["EchoBackend", "BackendStats"]


@dataclass
class BackendStats:
    requests: int = 0
    connections: int = 0
    open_connections: int = 0
    max_open_connections: int = 0
    concurrent: int = 0
    max_concurrent: int = 0
    paths: list[bytes] = field(default_factory=list)
    log: list[tuple[str, bytes]] = field(default_factory=list)  # ("start"|"end", target) in order


class _Conn(asyncio.Protocol):
    def __init__(self, backend: "EchoBackend") -> None:
        self.backend = backend
        self.framer = RequestFramer()
        self.queue: list[tuple[Request, bytes, tuple]] = []
        self.req: Request | None = None
        self.body = bytearray()
        self.busy = False
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        st = self.backend.stats
        st.connections += 1
        st.open_connections += 1
        st.max_open_connections = max(st.max_open_connections, st.open_connections)
        self.backend.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.backend.stats.open_connections -= 1
        self.backend.conns.discard(self)

    def data_received(self, data: bytes) -> None:
        self.framer.receive_data(data)
        while True:
            try:
                ev = self.framer.next_event()
            except RemoteProtocolError as exc:
                self.transport.write(b"HTTP/1.1 %d Bad\r\nContent-Length: 0\r\nConnection: close\r\n\r\n" % exc.status)
                self.transport.close()
                return
            if ev is NEED_DATA or isinstance(ev, ConnectionClosed):
                break
            if isinstance(ev, Request):
                self.req = ev
                self.body = bytearray()
                if ev.expect_continue:
                    self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            elif isinstance(ev, Data):
                self.body += ev.data
            elif isinstance(ev, EndOfMessage):
                self.queue.append((self.req, bytes(self.body), ev.trailers))
                self.req = None
        self._next()

    def _next(self) -> None:
        if self.busy or not self.queue or self.closed:
            return
        req, body, trailers = self.queue.pop(0)
        self.busy = True
        st = self.backend.stats
        st.requests += 1
        st.concurrent += 1
        st.max_concurrent = max(st.max_concurrent, st.concurrent)
        if self.backend.record:
            st.paths.append(req.target)
            st.log.append(("start", req.target))
        path, _, query = req.target.partition(b"?")
        q = {k: v[-1] for k, v in parse_qs(query.decode("latin-1")).items()}
        delay = float(q["delay"]) / 1000 if "delay" in q else self.backend.delay
        if "hang" in q:
            return
        loop = asyncio.get_running_loop()
        if delay > 0:
            loop.call_later(delay, self._answer, req, body, trailers, q)
        else:
            self._answer(req, body, trailers, q)

    def _answer(self, req: Request, body: bytes, trailers: tuple, q: dict[str, str]) -> None:
        st = self.backend.stats
        st.concurrent -= 1
        if self.backend.record:
            st.log.append(("end", req.target))
        self.busy = False
        if self.closed:
            return
        t = self.transport
        if "drop" in q:
            t.close()
            return
        seq = b""
        for n, v in req.headers:
            if n.lower() == b"x-seq":
                seq = v
        status = int(q.get("status", "200"))
        if "size" in q:
            payload = b"x" * int(q["size"])
        else:
            payload = b"%s %s %s seq=%s body=%d sha=%s trailers=%d\n" % (
                self.backend.name.encode(), req.method, req.target, seq, len(body),
                hashlib.sha1(body).hexdigest()[:12].encode(), len(trailers))
        head = [b"HTTP/1.1 %d X\r\n" % status, b"X-Backend: ", self.backend.name.encode(), b"\r\n"]
        if "early" in q:  # a 103 Early Hints interim response first
            head.insert(0, b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n")
        if seq:
            head += [b"X-Seq: ", seq, b"\r\n"]
        close = "close" in q
        if close:
            head.append(b"Connection: close\r\n")
        no_body = req.method == b"HEAD" or status in (204, 304)
        if "chunked" in q and not no_body:
            head.append(b"Transfer-Encoding: chunked\r\nTrailer: X-Trailer\r\n\r\n")
            mid = len(payload) // 2
            out = b"".join(head) + encode_chunk(payload[:mid]) + encode_chunk(payload[mid:]) + b"0\r\nX-Trailer: done\r\n\r\n"
        else:
            if status != 204:
                head.append(b"Content-Length: %d\r\n" % len(payload))
            head.append(b"\r\n")
            out = b"".join(head) + (b"" if no_body else payload)
        t.write(out)
        if close:
            t.close()
            return
        self._next()


class EchoBackend:
    """An HTTP backend on 127.0.0.1 (`port` after `start()`)."""

    def __init__(self, name: str = "b", delay: float = 0.0, record: bool = True) -> None:
        self.name = name
        self.record = record  # keep paths and the start/end log (tests); off for benchmarks
        self.delay = delay
        self.stats = BackendStats()
        self.conns: set[_Conn] = set()
        self._server: asyncio.base_events.Server | None = None

    async def start(self, port: int = 0, host: str = "127.0.0.1", reuse_port: bool = False) -> "EchoBackend":
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Conn(self), host, port, reuse_port=reuse_port or None,
                                                backlog=1024)
        return self

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for c in list(self.conns):
                if c.transport is not None:
                    c.transport.abort()
            await self._server.wait_closed()
            self._server = None

    def kill_connections(self) -> None:
        """Abort every open connection (a crash as the splicer sees it)."""
        for c in list(self.conns):
            if c.transport is not None:
                c.transport.abort()


def main() -> None:
    """`python -m shmfabric.bench.http_backend PORT [DELAY_MS] [NAME]`: run one backend."""
    import sys

    port = int(sys.argv[1])
    delay = float(sys.argv[2]) / 1000 if len(sys.argv) > 2 else 0.0
    name = sys.argv[3] if len(sys.argv) > 3 else f"b{port}"

    async def amain() -> None:
        b = EchoBackend(name, delay, record=False)
        await b.start(port, reuse_port=True)
        print(f"ready {b.address}", flush=True)
        await asyncio.Event().wait()

    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    try:
        asyncio.run(amain())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
