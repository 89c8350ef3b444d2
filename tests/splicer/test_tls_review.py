"""Review findings on the HTTP splicer's TLS side (and a backend reset mid-body), each with the
behaviour its name says: slow TLS readers get whole answers when the splicer closes, failed
handshakes cost O(1) each, a reset backend's close-delimited body is not passed on as complete,
and the TLS configuration errors say what is wrong.

Clients are Python's ssl on real sockets against a real `shmfabric splice http` (uvloop, under
its master) or an in-process splicer. No test asserts a duration: waits are bounded.
"""
from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
import ssl
import struct
import subprocess
import time
from pathlib import Path

import pytest

from shmfabric.splicer import workers
from shmfabric.splicer.workers import Accepting

from .test_graceful_stop import _HttpBackend, _ready
from .test_http_proxy import Env, get, run, wait_for
from .test_http_tls import client_context, make_cert

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def http_backend():
    b = _HttpBackend()
    yield b
    b.close()


# The splicer under its master (uvloop workers, SIGHUP reloads), as `splice http` runs it, except
# that the listening socket's kernel send buffer is fixed at a small size (accepted connections
# inherit it): the kernel then holds a known small part of an answer, and the rest waits in the
# splicer's own buffers, where a close that does not wait for the client loses it. (With the
# kernel's autotuning, loopback swallows megabytes, and a loss shows only on larger answers.)
_MASTER = """
import json, socket, sys
from shmfabric.splicer.config import HttpSpliceConfig
from shmfabric.splicer.http_server import run
from shmfabric.splicer.workers import Listeners
cfg = HttpSpliceConfig(**json.loads(sys.argv[1]))
listeners = Listeners(cfg.listen, cfg.workers)
for s in listeners.data:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
sys.exit(run(cfg, listeners, reload=lambda: cfg, announce=lambda: print("splice ready, listening on", flush=True)))
"""


def _tls_splicer(backend: _HttpBackend, cert: Path, key: Path, **cfg):
    import json
    import sys

    from .redis_fixtures import free_port

    port = free_port()
    cfg = {"listen": f"127.0.0.1:{port}", "default": [f"127.0.0.1:{backend.port}"], "health": {"enabled": False},
           "tls": {"cert": str(cert), "key": str(key)}, **cfg}
    proc = subprocess.Popen([sys.executable, "-c", _MASTER, json.dumps(cfg)], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _ready(proc, port)
    return proc, port


def _slow_tls_client(port: int, cert: Path, request: bytes, rate: float, on_bytes=None) -> tuple[bytes, str]:
    """Send `request` over TLS, read the answer at about `rate` bytes/s (a small receive buffer,
    so the splicer's side holds the rest), until the server ends the connection. Returns (what
    came, how it ended: "close_notify", "no close_notify", "reset")."""
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    raw.settimeout(30)
    raw.connect(("127.0.0.1", port))
    s = client_context(cert).wrap_socket(raw, server_hostname="localhost", suppress_ragged_eofs=False)
    got = bytearray()
    step = 16 * 1024
    try:
        s.sendall(request)
        while True:
            data = s.recv(step)
            if not data:
                return bytes(got), "close_notify"
            got += data
            if on_bytes is not None:
                on_bytes(len(got))
            time.sleep(len(data) / rate)
    except ssl.SSLEOFError:
        return bytes(got), "no close_notify"
    except (ConnectionResetError, BrokenPipeError):
        return bytes(got), "reset"
    finally:
        s.close()


def _body_of(answer: bytes) -> tuple[bytes, bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, body


# -- HIGH 1: a slow TLS reader gets its whole answer when the splicer closes ---------------------
@pytest.mark.timeout(40)
def test_a_slow_tls_reader_of_a_connection_close_answer_gets_the_whole_body(tmp_path, http_backend):
    # 400 kB at about 60 kB/s: the splicer has the whole answer in its buffers (and the
    # kernel's) seconds before the client has read it. The close must wait for the client to
    # take it, then send close_notify; it used to start TLS's 2 s shutdown timer at once and
    # drop what was still unsent when it fired.
    cert, key = make_cert(tmp_path)
    proc, port = _tls_splicer(http_backend, cert, key)
    size = 400_000
    try:
        got, how = _slow_tls_client(port, cert, get(f"/?size={size}", 1, headers="Connection: close\r\n"),
                                    60_000)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    head, body = _body_of(got)
    assert b"content-length: %d" % size in head.lower(), head
    assert len(body) == size, f"{len(body)} of {size} body bytes, then {how}"
    assert how == "close_notify", how


@pytest.mark.timeout(40)
@pytest.mark.parametrize("sig", ["HUP", "TERM"])
def test_a_reload_or_stop_during_a_slow_tls_keep_alive_download_does_not_cut_it(tmp_path, http_backend, sig):
    # The download (kept alive, Content-Length) is under way when the master is told to reload
    # (or stop): the old worker finishes it, then closes the connection. That close must wait
    # for the client to take the answer too.
    cert, key = make_cert(tmp_path)
    proc, port = _tls_splicer(http_backend, cert, key)
    size = 500_000
    signalled = []

    def on_bytes(n: int) -> None:
        if not signalled and n > 10_000:
            signalled.append(n)
            os.kill(proc.pid, getattr(signal, f"SIG{sig}"))

    try:
        got, how = _slow_tls_client(port, cert, get(f"/?size={size}", 1), 60_000, on_bytes)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    head, body = _body_of(got)
    assert signalled and b"content-length: %d" % size in head.lower(), head
    assert len(body) == size, f"{len(body)} of {size} body bytes, then {how}; splicer stderr: {err}"
    assert how == "close_notify", how


# -- HIGH 2: failed handshakes cost O(1) per accept, and hold no connection ---------------------
class _Stamp(float):
    """A clock reading that counts the comparisons and sums it takes part in: each is one look
    at an entry's age."""

    looks = 0

    def _count(name):  # noqa: N805 - builds the counting operators below
        def op(self, other):
            _Stamp.looks += 1
            return getattr(float(self), name)(float(other))
        return op

    for _name in ("__lt__", "__le__", "__gt__", "__ge__", "__sub__", "__rsub__"):
        locals()[_name] = _count(_name)
    del _name


class _Conn:
    """Stands for a ClientConnection."""


def _clock(monkeypatch, start: float = 1000.0) -> list[float]:
    now = [start]
    monkeypatch.setattr(workers.time, "monotonic", lambda: _Stamp(now[0]))
    return now


def test_adding_n_pending_connections_looks_at_about_n_entries_not_n_squared(monkeypatch):
    now = _clock(monkeypatch)
    acc = Accepting(limit=1e6)
    keep = [_Conn() for _ in range(3000)]  # handshakes under way: none is forgotten
    _Stamp.looks = 0
    for c in keep:
        acc.add(c)
        now[0] += 0.001
    assert acc.count() == len(keep)
    assert _Stamp.looks <= 5 * len(keep), f"{_Stamp.looks} looks at entries for {len(keep)} adds"


def test_entries_past_the_limit_are_forgotten_and_recent_ones_kept(monkeypatch):
    now = _clock(monkeypatch)
    acc = Accepting(limit=10.0)
    old = [_Conn() for _ in range(300)]
    for c in old:
        acc.add(c)
    now[0] += 5
    recent = [_Conn() for _ in range(300)]
    for c in recent:
        acc.add(c)
    assert acc.count() == 600
    now[0] += 6  # the first 300 are 11 s old, the others 6 s
    newest = _Conn()
    acc.add(newest)
    assert acc.count() == 301
    acc.made(recent[0])
    assert acc.count() == 300
    now[0] += 20
    assert acc.count() == 0


def test_a_connection_dropped_before_connection_made_is_not_held_and_is_reported_once(monkeypatch):
    now = _clock(monkeypatch)
    lost: list[float] = []
    acc = Accepting(limit=100.0, on_lost=lost.append)
    gone, made = _Conn(), _Conn()
    acc.add(gone)
    acc.add(made)
    acc.made(made)
    now[0] += 3
    del gone  # asyncio drops the protocol of a failed handshake
    gc.collect()
    assert acc.count() == 0 and lost == [3.0]
    del made
    gc.collect()
    assert acc.count() == 0 and lost == [3.0]  # one that got connection_made is no failure


# -- MEDIUM 3: a backend reset in a close-delimited body is no complete answer -------------------
class _ResetMidBody:
    """A backend that answers with a head without length (the body runs to the close), some
    body bytes, then a TCP reset (SO_LINGER 0)."""

    async def start(self) -> "_ResetMidBody":
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    @property
    def address(self) -> str:
        return "127.0.0.1:%d" % self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"x" * 1000)
        await writer.drain()
        await asyncio.sleep(0.3)
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()


def _read_to_end(port: int, request: bytes, cert: Path | None) -> tuple[bytes, str]:
    """(what came, how it ended: "clean" (FIN, or TLS close_notify), "no close_notify", "reset")."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=20)
    s = raw if cert is None else client_context(cert).wrap_socket(raw, server_hostname="localhost",
                                                                    suppress_ragged_eofs=False)
    got = bytearray()
    try:
        s.sendall(request)
        while True:
            data = s.recv(65536)
            if not data:
                return bytes(got), "clean"
            got += data
    except ssl.SSLEOFError:
        return bytes(got), "no close_notify"
    except ConnectionResetError:
        return bytes(got), "reset"
    finally:
        s.close()


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
@pytest.mark.parametrize("version", ["1.1", "1.0"])
def test_a_backend_reset_in_a_close_delimited_body_is_not_relayed_as_a_complete_answer(tmp_path, tls, version):
    cert, key = make_cert(tmp_path)

    async def main() -> tuple[bytes, str]:
        env = Env()
        be = await _ResetMidBody().start()
        try:
            extra = {"tls": {"cert": str(cert), "key": str(key)}} if tls else {}
            sp = await env.splice(default=[be.address], **extra)
            request = f"GET /cut HTTP/{version}\r\nHost: t\r\n\r\n".encode()
            return await asyncio.to_thread(_read_to_end, sp.port, request, cert if tls else None)
        finally:
            await be.close()
            await env.close()

    got, how = run(main())
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), got[:200]
    if version == "1.1":
        assert b"transfer-encoding: chunked" in head.lower(), head
        assert b"x" * 500 in body and not body.endswith(b"0\r\n\r\n"), body[-40:]  # no last chunk
    else:
        assert body == b"x" * 1000, len(body)  # what came, then an end that is not a clean one
        assert how != "clean", how


# -- LOW: TLS configuration messages, handshake failures counted, a stop not held by them --------
def test_a_half_written_certificate_and_a_chain_in_the_wrong_order_say_so(tmp_path):
    from shmfabric.splicer.config import TlsConfig
    from shmfabric.splicer.tls import TlsError, server_context

    cert, key = make_cert(tmp_path)
    other, _ = make_cert(tmp_path, "other")
    half = tmp_path / "half.pem"
    half.write_bytes(cert.read_bytes()[:200])
    wrong = tmp_path / "wrong.pem"
    wrong.write_bytes(other.read_bytes() + cert.read_bytes())
    for path, fragment in ((half, "is cut short"), (wrong, "the server certificate must come first in the chain file")):
        with pytest.raises(TlsError) as info:
            server_context(TlsConfig(cert=str(path), key=str(key)))
        msg = str(info.value)
        assert fragment in msg and "fix:" in msg and "\n" not in msg and "PEM lib" not in msg, msg


def test_ciphers_with_min_version_1_3_is_refused_at_config_load():
    from pydantic import ValidationError

    from shmfabric.splicer.config import TlsConfig

    with pytest.raises(ValidationError) as info:
        TlsConfig(cert="c.pem", min_version="1.3", ciphers="ECDHE+AESGCM")
    assert "TLS 1.2 only" in str(info.value) and "fix:" in str(info.value)
    TlsConfig(cert="c.pem", min_version="1.2", ciphers="ECDHE+AESGCM")  # fine
    TlsConfig(cert="c.pem", min_version="1.3")  # fine


def test_failed_tls_handshakes_are_counted_and_said_once(tmp_path, capsys):
    cert, key = make_cert(tmp_path)

    async def main() -> str:
        env = Env()
        try:
            be = await env.backend("a")
            sp = await env.splice(default=[be.address], tls={"cert": str(cert), "key": str(key)},
                                  timeouts={"request_head": 0.5})
            assert 'tls_handshake_failures_total{proto="http"} 0.0' in sp.metrics.text().decode()
            for _ in range(3):  # not TLS: the handshake fails at once
                r, w = await asyncio.open_connection("127.0.0.1", sp.port)
                w.write(get("/plain", 1))
                await asyncio.wait_for(r.read(), 10)
                w.close()
            r, w = await asyncio.open_connection("127.0.0.1", sp.port)  # says nothing: times out
            await asyncio.wait_for(r.read(), 10)
            w.close()

            def counted() -> bool:
                gc.collect()
                text = sp.metrics.text().decode()
                return 'tls_handshake_failures_total{proto="http"} 4.0' in text
            await wait_for(counted)
            await asyncio.sleep(1.2)  # a sweep or two: the log line
            return sp.metrics.text().decode()
        finally:
            await env.close()

    run(main())
    lines = [x for x in capsys.readouterr().err.splitlines() if "TLS handshake(s) failed" in x]
    assert len(lines) == 1, lines  # at most one line per TLS_LOG_SECONDS


def test_a_stop_does_not_wait_out_request_head_for_a_client_that_never_sends_a_client_hello(tmp_path, http_backend):
    # request_head 300 s: the stop used to wait for the silent connection that long (its
    # handshake pending), and then the drain timeout.
    cert, key = make_cert(tmp_path)
    proc, port = _tls_splicer(http_backend, cert, key, timeouts={"request_head": 300.0, "drain": 300.0})
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=20)
        finally:
            proc.kill()
    assert proc.returncode == 0 and "Traceback" not in err, err
