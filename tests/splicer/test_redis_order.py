"""Replies come back in request order whatever the backends' delays (property-based).

The backends here are small fake Redis servers that answer `GET k` with `k` itself after a
random delay (in order per connection, as Redis does), so replies from different servers and
pooled connections complete in random order; the client must still see them in its own order.
"""
from __future__ import annotations

import asyncio
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shmfabric.splicer.config import RedisSpliceConfig
from shmfabric.splicer.redis_proxy import RedisSplicer
from shmfabric.splicer.redis_resp import ReplyScanner, RequestReader, encode_bulk, encode_command

from .redis_fixtures import free_port


async def fake_backend(rng: random.Random, max_delay: float) -> tuple[asyncio.AbstractServer, int]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        framer = RequestReader()
        previous: asyncio.Task | None = None

        async def answer(cmd: list[bytes], after: asyncio.Task | None, delay: float) -> None:
            await asyncio.sleep(delay)
            if after is not None:
                await after  # one connection answers in order, like Redis
            if cmd[0].upper() == b"GET":
                writer.write(encode_bulk(cmd[1]))
            elif cmd[0].upper() == b"MGET":
                writer.write(b"*%d\r\n" % (len(cmd) - 1) + b"".join(encode_bulk(k) for k in cmd[1:]))
            else:
                writer.write(b"+OK\r\n")

        try:
            while data := await reader.read(65536):
                framer.feed(data)
                while (cmd := framer.next()) is not None:
                    previous = asyncio.ensure_future(answer(cmd, previous, rng.random() * max_delay))
            if previous is not None:
                await previous
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    port = free_port()
    server = await asyncio.start_server(serve, "127.0.0.1", port)
    return server, port


async def run_pipeline(keys: list[int], mget_every: int, seed: int, lanes: int) -> None:
    rng = random.Random(seed)
    backends = [await fake_backend(rng, 0.01) for _ in range(3)]
    cfg = RedisSpliceConfig.model_validate(dict(
        listen=f"127.0.0.1:{free_port()}", servers=[f"127.0.0.1:{p}" for _, p in backends], hash="md5",
        pool={"min": lanes, "max": lanes}, health={"enabled": False}, timeouts={"request": 10}))
    splicer = RedisSplicer(cfg)
    host, port = await splicer.start()
    try:
        reader, writer = await asyncio.open_connection(host, port)
        commands, expected = [], []
        for i, k in enumerate(keys):
            key = b"key:%d" % k
            if mget_every and i % mget_every == 0:
                group = [key, b"key:%d" % (k + 1), b"key:%d" % (k * 7)]
                commands.append([b"MGET", *group])
                expected.append(b"*3\r\n" + b"".join(encode_bulk(g) for g in group))
            else:
                commands.append([b"GET", key])
                expected.append(encode_bulk(key))
        writer.write(b"".join(encode_command(c) for c in commands))
        sc, got = ReplyScanner(), []
        while len(got) < len(expected):
            data = await asyncio.wait_for(reader.read(65536), 10)
            assert data
            sc.feed(data)
            got += sc.drain(10**6)
        assert got == expected
        writer.close()
    finally:
        await splicer.stop()
        for server, _ in backends:
            server.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(keys=st.lists(st.integers(0, 10_000), min_size=1, max_size=120), mget_every=st.integers(0, 7),
       seed=st.integers(0, 2**32 - 1), lanes=st.integers(1, 3))
def test_replies_in_request_order_under_random_delays(keys: list[int], mget_every: int, seed: int, lanes: int) -> None:
    asyncio.run(asyncio.wait_for(run_pipeline(keys, mget_every, seed, lanes), 60))
