"""Passive health of the HTTP splicer (`health.eject_after`): a backend that accepts TCP
connections (so it passes TCP checks) but fails every request leaves rotation after
`eject_after` failures in a row, and comes back the way a server downed by checks does.

Real sockets on loopback: the splicer, an echo backend and `FlakyBackend` (a TCP server whose
answer to each request is switched by the test). No test asserts a duration: waits are
bounded loops with a deadline.
"""
from __future__ import annotations

import asyncio
import socket
import struct

import pytest
from pydantic import ValidationError
from prometheus_client import generate_latest

from shmfabric.cli.main import main as cli_main
from shmfabric.splicer.config import ConfigError, HttpSpliceConfig, RedisSpliceConfig, load_config

from ._asyncio_backend import AsyncBackend
from .test_http_proxy import Env, get, read_replies, run, wait_for

pytestmark = pytest.mark.timeout(60)


class FlakyBackend(AsyncBackend):
    """Accepts every connection; each request gets what `mode` says:

    * "close": the request is read, then the connection closed without a byte of answer;
    * "reset": the same with a TCP reset (SO_LINGER 0);
    * "garbage": a line that is not HTTP;
    * "500": a complete `500` response; "ok": a complete `200`;
    * "alternate": "close" and "ok" in turn (every other request fails).

    Responses name the backend in `X-Backend`, as `EchoBackend`'s do.
    """

    def __init__(self, name: str, mode: str = "close") -> None:
        self.name = name
        self.mode = mode
        self.requests = 0
        self.connections = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                self.requests += 1
                mode = self.mode
                if mode == "alternate":
                    mode = "close" if self.requests % 2 else "ok"
                if mode == "reset":
                    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                                struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
                if mode == "close":
                    return
                if mode == "garbage":
                    writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
                else:
                    status = 500 if mode == "500" else 200
                    writer.write(b"HTTP/1.1 %d X\r\nX-Backend: %s\r\nContent-Length: 2\r\n\r\nok"
                                 % (status, self.name.encode()))
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()


async def good_and_flaky(env: Env, mode: str = "close", **cfg):
    """An echo backend "good" and a FlakyBackend "bad" in one route (the default), the splicer
    and a client connection; returns (bad, splicer, bad's BackendServer, reader, writer)."""
    good = await env.backend("good")
    bad = await FlakyBackend("bad", mode).start()
    env.backends.append(bad)  # type: ignore[arg-type]  # Env.close() closes it
    sp = await env.splice(default=[good.address, bad.address], **cfg)
    r, w = await env.connect()
    return bad, sp, sp.servers[bad.address], r, w


async def one_by_one(r, w, count: int, start: int = 0) -> list[tuple[int, bytes]]:
    """`count` GETs one after the other on one client connection: (status, X-Backend) each."""
    out = []
    for i in range(start, start + count):
        w.write(get(f"/{i}", i))
        replies, closed = await read_replies(r, [b"GET"], probe=False)
        assert len(replies) == 1 and not closed, (i, closed)
        out.append((replies[0].status, replies[0].headers.get(b"x-backend", b"")))
    return out


def up_gauge(sp, address: str) -> str:
    text = generate_latest(sp.metrics.registry).decode()
    for line in text.splitlines():
        if line.startswith("shmfabric_splicer_server_up{") and f'backend="{address}"' in line:
            return line.rsplit(" ", 1)[1]
    raise AssertionError(f"no up gauge for {address}")


# Active TCP checks (which the bad backend passes) or none, pool `min` 0 (requests to the bad
# backend go on new connections: 502) or 1 (on pooled ones: retried once, on the good backend).
# `rise` 1 and a long `interval`: one connect counted as a passing check would bring the bad
# server back, and no check or probe comes during the test.
@pytest.mark.parametrize("mode,pool_min,checks", [
    ("close", 1, True), ("reset", 0, True), ("close", 0, False), ("reset", 1, False), ("garbage", 0, True),
])
def test_a_server_failing_every_request_is_ejected_and_stays_out(capsys, mode, pool_min, checks):
    async def main():
        env = Env()
        try:
            bad, sp, server, r, w = await good_and_flaky(
                env, mode, pool={"min": pool_min, "max": 4},
                health={"enabled": checks, "interval": 30, "rise": 1})  # eject_after: the default, 5
            address = bad.address
            eject_after = sp.cfg.health.eject_after
            assert eject_after == 5
            results = await one_by_one(r, w, 200)
            failed = [i for i, (status, _) in enumerate(results) if status != 200]
            assert len(failed) <= eject_after, results
            assert all(s in (502,) for s, _ in results if s != 200), results
            assert bad.requests == eject_after  # each failed on a connection of its own
            assert not server.up and server.ejected and up_gauge(sp, bad.address) == "0.0"
            # after the ejection, the good backend answers everything (the failures came first)
            assert all(b == b"good" for _, b in results[2 * eject_after:]), results
            # Neither the pool's own connects to the bad backend (which succeed: with checks on,
            # the pool keeps `min` open) nor, with checks off, probe connects before
            # `interval` has passed brought it back (either would, with `rise` 1).
            if checks and pool_min:
                await wait_for(lambda: sp.pool_sizes()[address]["free"] >= 1)
            ups = 0
            for _ in range(20):
                await asyncio.sleep(0.05)
                ups += server.up
            assert ups == 0, f"the ejected server came back {ups} times out of 20"
            assert (await one_by_one(r, w, 5, 200)) == [(200, b"good")] * 5
        finally:
            await env.close()
        err = capsys.readouterr().err
        lines = [x for x in err.splitlines() if "is down" in x]
        assert len(lines) == 1 and lines[0].startswith(f"splice http: backend {address} is down"), err
    run(main())


def test_eject_after_0_keeps_the_old_behaviour():
    async def main():
        env = Env()
        try:
            bad, sp, server, r, w = await good_and_flaky(env, "close", pool={"min": 0, "max": 4},
                                                         health={"interval": 30, "eject_after": 0})
            results = await one_by_one(r, w, 60)
            assert server.up and not server.ejected and up_gauge(sp, bad.address) == "1.0"
            assert bad.requests >= 20  # about every other request
            assert sum(s == 502 for s, _ in results) == bad.requests  # each one a 502
        finally:
            await env.close()
    run(main())


@pytest.mark.parametrize("mode", ["500", "alternate"])
def test_complete_responses_of_any_status_are_not_failures(mode):
    # A backend's own 500 is an answer (it is alive and speaks HTTP); a failure between two
    # complete answers restarts the count.
    async def main():
        env = Env()
        try:
            bad, sp, server, r, w = await good_and_flaky(env, mode, pool={"min": 0, "max": 4},
                                                         health={"interval": 30, "eject_after": 2})
            results = await one_by_one(r, w, 60)
            assert server.up and not server.ejected
            assert bad.requests >= 20
            statuses = {s for s, b in results if b == b"bad"}
            assert statuses == ({500} if mode == "500" else {200}), results
        finally:
            await env.close()
    run(main())


def test_a_client_going_away_is_not_a_backend_failure():
    async def main():
        env = Env()
        try:
            be = await env.backend("a")
            sp = await env.splice(default=[be.address], pool={"min": 1, "max": 4},
                                  health={"interval": 30, "eject_after": 1})
            server = sp.servers[be.address]
            for i in range(5):
                r, w = await env.connect()
                # a body that never comes whole: the backend connection is given up
                w.write(get(f"/post{i}", i, method="POST", headers="Content-Length: 100\r\n") + b"x" * 10)
                await wait_for(lambda: be.stats.connections and server.inflight == 1)
                w.transport.abort()
                await wait_for(lambda: server.inflight == 0)
                r, w = await env.connect()  # and one whose answer it never reads
                w.write(get(f"/slow{i}?delay=50", i))
                await wait_for(lambda: server.inflight == 1)
                w.transport.abort()
                await wait_for(lambda: server.inflight == 0)
            assert server.up and not server.ejected and server.fail_streak == 0
        finally:
            await env.close()
    run(main())


@pytest.mark.parametrize("checks", [True, False], ids=["tcp-checks", "no-health"])
def test_an_ejected_server_comes_back_once_it_answers(checks):
    async def main():
        env = Env()
        try:
            bad, sp, server, r, w = await good_and_flaky(
                env, "close", pool={"min": 1, "max": 4},
                health={"enabled": checks, "interval": 0.2, "timeout": 0.5, "rise": 2, "eject_after": 2})
            i = 0
            loop = asyncio.get_running_loop()
            end = loop.time() + 10
            while server.up:
                assert loop.time() < end, "not ejected"
                i += 1
                await one_by_one(r, w, 1, i)
            bad.mode = "ok"
            end = loop.time() + 15
            while True:  # back through rise checks (or probe connects), then picked again
                assert loop.time() < end, "not back in rotation"
                i += 1
                (status, backend), = await one_by_one(r, w, 1, i)
                assert status == 200
                if backend == b"bad":
                    break
                await asyncio.sleep(0.02)
            assert server.up and not server.ejected and up_gauge(sp, bad.address) == "1.0"
        finally:
            await env.close()
    run(main())


def test_eject_after_below_0_is_refused_with_a_clear_message(tmp_path, capsys):
    f = tmp_path / "s.yaml"
    f.write_text("http:\n  default: [127.0.0.1:1]\n  health: {eject_after: -1}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(f)
    assert (f"{f}: field `http.health.eject_after`: Input should be greater than or equal to 0; "
            "fix: give a number in the allowed range") in str(exc.value)
    code = cli_main(["splice", "http", "--config", str(f), "--check"])
    err = capsys.readouterr().err
    assert code == 2 and "http.health.eject_after" in err and "Traceback" not in err
    assert HttpSpliceConfig(default=["127.0.0.1:1"]).health.eject_after == 5
    assert HttpSpliceConfig(default=["127.0.0.1:1"], health={"eject_after": 0}).health.eject_after == 0
    # an HTTP setting: the Redis splicer's health section refuses it rather than ignore it
    with pytest.raises(ValidationError, match="eject_after"):
        RedisSpliceConfig(servers=["127.0.0.1:6379"], health={"eject_after": 3})
