"""Shared helpers for the Redis splicer tests: real redis-server processes and a splicer thread.

Servers listen on free loopback ports, keep nothing on disk (--save '' --appendonly no, in a
temporary directory) and are killed in teardown. The splicer runs on its own event loop in a
background thread so blocking clients (redis-py, redis-cli subprocesses) can talk to it.
"""
from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shmfabric import programs
from shmfabric.splicer.config import RedisSpliceConfig
from shmfabric.splicer.redis_proxy import RedisSplicer
from shmfabric.splicer.redis_resp import ReplyScanner, encode_command

REDIS_SERVER = programs.find("redis-server")
REDIS_CLI = programs.find("redis-cli")
REDIS_BENCHMARK = programs.find("redis-benchmark")
NUTCRACKER = programs.find("nutcracker")

needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason=programs.not_found("redis-server"))
needs_cli = pytest.mark.skipif(REDIS_CLI is None, reason=programs.not_found("redis-cli"))
needs_nutcracker = pytest.mark.skipif(NUTCRACKER is None, reason=programs.not_found("nutcracker"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports_in_a_row(n: int) -> int:
    """The first of `n` consecutive TCP ports on 127.0.0.1 that were free a moment ago, below the
    kernel's ephemeral range, so a port picked by `free_port` later cannot land among them (the
    metrics ports of `--workers N`: port + i)."""
    import random

    low, _ = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    while True:
        first = random.randrange(10_000, max(10_001, low - n))
        socks = []
        try:
            for p in range(first, first + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s") from None
            time.sleep(0.02)


class RedisServer:
    """One redis-server child process on a free loopback port."""

    def __init__(self, tmp: Path, extra: list[str] | None = None) -> None:
        self.port = free_port()
        self.dir = tmp / f"redis-{self.port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.extra = extra or []
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        assert REDIS_SERVER is not None
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir), "--daemonize", "no", "--protected-mode", "no",
             "--enable-debug-command", "local", *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def client(self, **kw):
        import redis

        kw.setdefault("socket_timeout", 10)
        return redis.Redis(host="127.0.0.1", port=self.port, **kw)


@contextlib.contextmanager
def redis_servers(tmp: Path, n: int = 2, extra: list[str] | None = None) -> Iterator[list[RedisServer]]:
    servers: list[RedisServer] = []
    try:
        for _ in range(n):
            servers.append(RedisServer(tmp, extra))
        yield servers
    finally:
        for s in servers:
            s.kill()


class SplicerThread:
    """A RedisSplicer running on its own event loop in a daemon thread."""

    def __init__(self, config: RedisSpliceConfig, metrics=None) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.splicer = RedisSplicer(config, metrics)
        host, port = self.call(self.splicer.start())
        self.port = port
        self.address = f"{host}:{port}"

    def call(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stats(self) -> dict:
        async def get():
            return self.splicer.stats()

        return self.call(get())

    def stop(self) -> None:
        try:
            self.call(self.splicer.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            self.loop.close()

    def client(self, **kw):
        import redis

        kw.setdefault("socket_timeout", 20)
        return redis.Redis(host="127.0.0.1", port=self.port, **kw)

    def wait_idle(self, timeout: float = 10.0, clients: int | None = None) -> dict:
        """Wait until no request is in flight and no connection is being opened (and, if given,
        until exactly `clients` client connections remain)."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.stats()
            if all(s["inflight"] == 0 and s["connecting"] == 0 for s in st["servers"]) and (
                    clients is None or st["clients"] == clients):
                return st
            if time.monotonic() > deadline:
                return st
            time.sleep(0.02)


@contextlib.contextmanager
def splicer(servers: list[RedisServer], **overrides) -> Iterator[SplicerThread]:
    """A splicer in front of `servers` (ketama, md5 unless overridden), on a free port."""
    cfg = dict(listen=f"127.0.0.1:{free_port()}", servers=[s.address for s in servers], hash="md5",
               pool={"min": 2, "max": 2}, health={"enabled": False})
    cfg.update(overrides)
    sp = SplicerThread(RedisSpliceConfig.model_validate(cfg))
    try:
        yield sp
    finally:
        sp.stop()


def pipeline(port: int, commands: list[list[bytes]]) -> list[bytes]:
    """Send `commands` in one write to 127.0.0.1:`port` and read one whole reply each."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        return pipeline_on(s, commands)


def pipeline_on(sock: socket.socket, commands: list[list[bytes]]) -> list[bytes]:
    """Send `commands` in one write on `sock` and read one whole reply each."""
    sock.sendall(b"".join(encode_command(c) for c in commands))
    sc = ReplyScanner()
    out: list[bytes] = []
    while len(out) < len(commands):
        data = sock.recv(65536)
        assert data, "connection closed early"
        sc.feed(data)
        while len(out) < len(commands) and (r := sc.next()) is not None:
            out.append(r)
    return out


def send_until_closed(port: int, data: bytes, piece: int = 0) -> bytes:
    """Send `data` (ending in QUIT, or cut by a protocol error) to 127.0.0.1:`port` in pieces of
    `piece` bytes (0: at once), and read everything until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        step = piece or len(data)
        for i in range(0, len(data), step):
            try:
                s.sendall(data[i : i + step])
            except OSError:  # closed after a protocol error
                break
        out = b""
        while True:
            try:
                d = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not d:
                break
            out += d
        return out


def placed_on(sp: SplicerThread, server: int, n: int, prefix: str) -> list[str]:
    """`n` names (`prefix:i`) that the splicer `sp` places on server index `server`."""
    out, i = [], 0
    while len(out) < n:
        k = f"{prefix}:{i}"
        if sp.splicer.router.place(k.encode())[0] == server:
            out.append(k)
        i += 1
    return out


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    """Three redis-servers for a test module."""
    with redis_servers(tmp_path_factory.mktemp("redis"), 3) as servers:
        yield servers


def start_nutcracker(conf: Path, ports, log: Path) -> "subprocess.Popen | None":
    """nutcracker on config file `conf` whose pools listen on `ports`, once every port answers;
    None (and nothing left running) if one of them was taken before nutcracker bound it (ports
    picked free can be taken by any outgoing connection meanwhile): pick new ports and try again."""
    nc = subprocess.Popen([NUTCRACKER, "-c", str(conf), "-s", str(free_port()), "-o", str(log)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for p in ports:
            wait_port(p, timeout=5)
    except TimeoutError:
        nc.kill()
        nc.wait(timeout=10)
        return None
    return nc
