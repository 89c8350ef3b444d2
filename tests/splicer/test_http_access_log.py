"""The HTTP splicer's client-address headers (`forwarded_for`, `forwarded`) and access log.

Pure formatting first, then the splicer in-process on loopback with a backend that records the
raw request heads it gets, then the CLI with real nginx, curl and wrk. No test asserts a duration.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shmfabric.bench.splice_http import _popen, _py_env, _stop, free_port, run_wrk, start_nginx, wait_port
from shmfabric.splicer.access_log import AccessLog, AccessLogError, _pieces, check_log, format_json, format_text
from shmfabric.splicer.config import HttpSpliceConfig
from shmfabric.splicer.http_server import HttpSplicer

from .test_http_peers import need
from .test_http_proxy import Env, get, read_replies, run, wait_for

pytestmark = pytest.mark.timeout(90)

# time client "METHOD TARGET HTTP/V" status bytes host="..." backend=... wait=S total=S tries=N seq=N [error="..."]
TEXT_LINE = re.compile(
    r'^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (\S+) "(\S+) (\S+) HTTP/(\S+)" (\d{3}) (\d+) host="((?:[^"\\]|\\.)*)" '
    r'backend=(\S+) wait=(\d+\.\d{3}) total=(\d+\.\d{3}) held=(\d+\.\d{3}) tries=(\d+) seq=(\d+)'
    r'(?: error="((?:[^"\\]|\\.)*)")?\n$')


def parse_text(line: str) -> dict:
    m = TEXT_LINE.match(line)
    assert m, f"not a well-formed access log line: {line!r}"
    keys = ("time", "client", "method", "target", "version", "status", "bytes", "host", "backend", "wait", "total",
            "held", "tries", "seq", "error")
    rec = dict(zip(keys, m.groups()))
    for k in ("status", "bytes", "tries", "seq"):
        rec[k] = int(rec[k])
    return rec


# -- pure formatting -------------------------------------------------------------------------------
ARGS = ("2026-12-06T04:00:00.123Z", "127.0.0.1:5000", "GET", "/a?b=1", "1.1", 200, 123, "example.com",
        "127.0.0.1:9001", 0.0014, 0.0123, 1, 7)


def test_text_line_has_the_fields_in_order_and_escapes_what_would_break_it():
    line = format_text(*ARGS, "")
    assert line == ('2026-12-06T04:00:00.123Z 127.0.0.1:5000 "GET /a?b=1 HTTP/1.1" 200 123 host="example.com" '
                    'backend=127.0.0.1:9001 wait=0.001 total=0.012 held=0.000 tries=1 seq=7\n')
    tricky = format_text(*ARGS[:7], 'ex"am\\ple\n\x01', *ARGS[8:], 'backend said "no"\r\n')
    assert tricky.count("\n") == 1  # one line whatever the values hold
    rec = parse_text(tricky)
    assert rec["host"] == 'ex\\"am\\\\ple\\x0a\\x01' and rec["error"] == 'backend said \\"no\\"\\x0d\\x0a'


def test_json_line_round_trips():
    rec = json.loads(format_json(*ARGS[:7], 'h"\n', *ARGS[8:], "cut off"))
    assert rec == {"time": ARGS[0], "client": "127.0.0.1:5000", "method": "GET", "target": "/a?b=1", "version": "1.1",
                   "status": 200, "bytes": 123, "host": 'h"\n', "backend": "127.0.0.1:9001", "wait": 0.001,
                   "total": 0.012, "held": 0.0, "tries": 1, "seq": 7, "error": "cut off"}
    assert "error" not in json.loads(format_json(*ARGS, ""))


@settings(max_examples=300, deadline=None)
@given(host=st.text(st.characters(max_codepoint=0xFF)), error=st.text(st.characters(max_codepoint=0xFF)),
       target=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1))
def test_property_any_request_bytes_make_one_ascii_line_that_parses_back(host, error, target):
    # Values are request bytes decoded as latin-1: every code point up to 0xFF can occur.
    line = format_text(*ARGS[:3], target, ARGS[4], ARGS[5], ARGS[6], host, *ARGS[8:], error)
    assert line.isascii() and line.count("\n") == 1 and line.endswith("\n")
    rec = parse_text(line)  # the pattern of every field holds
    assert rec["status"] == 200 and rec["seq"] == 7
    back = json.loads(format_json(*ARGS[:3], target, ARGS[4], ARGS[5], ARGS[6], host, *ARGS[8:], error))
    assert back["host"] == host[:1024] + ("..." if len(host) > 1024 else "")
    assert back.get("error", "") == error


def test_pipe_writes_are_cut_at_line_ends():
    lines = [b"x" * n + b"\n" for n in (10, 3000, 2000, 5000, 1, 4095)]
    data = b"".join(lines)
    pieces = _pieces(data, 4096)
    assert b"".join(pieces) == data
    for p in pieces:
        assert p.endswith(b"\n")
        assert len(p) <= 4096 or p.count(b"\n") == 1  # only a single over-long line may pass the size


def test_paths_that_cannot_be_written_are_refused_with_the_reason(tmp_path):
    with pytest.raises(AccessLogError, match="no directory"):
        check_log(str(tmp_path / "missing" / "a.log"))
    with pytest.raises(AccessLogError, match="is a directory"):
        check_log(str(tmp_path))
    check_log(str(tmp_path / "new.log"))
    assert not (tmp_path / "new.log").exists()  # checking creates nothing
    with pytest.raises(AccessLogError, match="cannot open"):
        AccessLog(str(tmp_path / "missing" / "a.log"))


def test_high_and_control_bytes_are_escaped_and_long_values_clipped():
    line = format_text(*ARGS[:7], "a\x85b\xffc\x9b", *ARGS[8:], "")
    assert 'host="a\\x85b\\xffc\\x9b"' in line and line.isascii() and len(line.splitlines()) == 1
    rec = json.loads(format_json(*ARGS[:7], "a\x85\xff", *ARGS[8:], ""))
    assert rec["host"] == "a\x85\xff"
    assert format_json(*ARGS[:7], "a\x85\xff", *ARGS[8:], "").isascii()
    long = format_text(ARGS[0], ARGS[1], "GET", "/" + "t" * 70000, "1.1", 200, 1, "h" * 70000, *ARGS[8:], "")
    assert len(long.encode()) < 4096 and '... HTTP/1.1" 200' in long and 'hhh..."' in long


def test_a_pipe_nobody_reads_never_blocks_and_drops_past_its_bound():
    r, w = os.pipe()
    warnings: list[str] = []
    try:
        log = AccessLog("-", warn=warnings.append)
        log.fd, log._stream = w, True  # as if standard output were this pipe
        log._poll = __import__("select").poll()
        log._poll.register(w, __import__("select").POLLOUT)
        log.MAX_PENDING = 200_000
        sent = 0
        while log.dropped == 0:  # the pipe fills (64 KiB), then the pending bound: no call blocks
            for _ in range(100):
                log.record(*ARGS[1:12], sent)
                sent += 1
            log.flush()
        assert log._pending_bytes <= log.MAX_PENDING and len(warnings) == 1 and "behind" in warnings[0]
        got = b""
        os.set_blocking(r, False)
        while True:
            try:
                got += os.read(r, 1 << 20)
            except BlockingIOError:
                if not log._pending:
                    break
            log.flush()
        log.fd = -1
        seqs = [parse_text(x)["seq"] for x in got.decode().splitlines(keepends=True)]
        assert seqs == list(range(len(seqs))) and len(seqs) == log.written == sent - log.dropped
    finally:
        os.close(r)
        os.close(w)


def test_a_fifo_is_checked_without_opening_and_refused_without_a_reader(tmp_path):
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    check_log(str(fifo))  # returns at once: no open, so no reader would see an EOF either
    with pytest.raises(AccessLogError, match="no process reads the FIFO"):
        AccessLog(str(fifo))
    rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        log = AccessLog(str(fifo))
        log.record(*ARGS[1:12], 5)
        log.flush()
        assert parse_text(os.read(rfd, 65536).decode())["seq"] == 5
        log.close()
    finally:
        os.close(rfd)


def test_a_failing_log_drops_lines_with_one_warning_and_never_raises():
    warnings: list[str] = []
    log = AccessLog("/dev/full", warn=warnings.append)
    for i in range(3):
        log.record(*ARGS[1:12], i)
        log.flush()
    assert log.dropped == 3 and log.written == 0
    assert len(warnings) == 1 and "No space left" in warnings[0]
    log.close()


# -- in-process: headers to backends ---------------------------------------------------------------
class HeadRecorder:
    """A backend that answers every request `ok` and keeps each raw request head."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []

    async def start(self) -> "HeadRecorder":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()

    async def close(self) -> None:
        self.server.close()


def _fields(head: bytes, name: bytes) -> list[bytes]:
    return [line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")[1:]
            if line.split(b":", 1)[0].strip().lower() == name.lower()]


@pytest.mark.parametrize("flags", [{}, {"forwarded_for": True}, {"forwarded": True},
                                   {"forwarded_for": True, "forwarded": True}])
def test_client_address_headers_are_added_after_the_clients_own(flags):
    async def main():
        env = Env()
        be = await HeadRecorder().start()
        try:
            await env.splice(default=[be.address], **flags)
            r, w = await env.connect()
            w.write(get("/a", 1, headers="X-Forwarded-For: 10.0.0.9\r\n") + get("/b", 2))
            replies, _ = await read_replies(r, [b"GET", b"GET"])
            assert [x.status for x in replies] == [200, 200]
            first, second = be.heads
            ours = [b"127.0.0.1"] if flags.get("forwarded_for") else []
            assert _fields(first, b"X-Forwarded-For") == [b"10.0.0.9", *ours]  # the client's first, ours last
            assert _fields(second, b"X-Forwarded-For") == ours
            assert _fields(first, b"X-Forwarded-Proto") == ([b"http"] if flags.get("forwarded_for") else [])
            fwd = [b"for=127.0.0.1;proto=http"] if flags.get("forwarded") else []
            assert _fields(first, b"Forwarded") == fwd and _fields(second, b"Forwarded") == fwd
            w.close()
        finally:
            await be.close()
            await env.close()
    run(main())


def test_address_forms_in_the_headers():
    sp = HttpSplicer(HttpSpliceConfig(default=["127.0.0.1:1"], forwarded_for=True, forwarded=True))
    assert sp.forward_lines("::1") == (b'X-Forwarded-For: ::1\r\nX-Forwarded-Proto: http\r\n'
                                       b'Forwarded: for="[::1]";proto=http\r\n')
    # an IPv4 client of a dual-stack listener is named as IPv4
    assert sp.forward_lines("::ffff:10.1.2.3") == (b"X-Forwarded-For: 10.1.2.3\r\nX-Forwarded-Proto: http\r\n"
                                                   b"Forwarded: for=10.1.2.3;proto=http\r\n")
    assert HttpSplicer(HttpSpliceConfig(default=["127.0.0.1:1"])).forward_lines("10.0.0.1") == b""


# -- in-process: the access log --------------------------------------------------------------------
def _read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True) if path.exists() else []


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_every_answer_gets_one_line_and_bytes_add_up_to_what_the_client_read(tmp_path, fmt):
    log = tmp_path / "access.log"

    async def main():
        env = Env()
        try:
            be = await env.backend("a")
            sp = await env.splice(routes=[{"prefix": "/a", "backends": [be.address]},
                                          {"prefix": "/down", "backends": ["127.0.0.1:1"]}],
                                  pool={"min": 0, "max": 2}, timeouts={"connect": 0.5},
                                  access_log=str(log), access_log_format=fmt)
            r, w = await env.connect()
            # answered by a backend (one slow, so later ones finish first), 404, 502, a chunked answer
            w.write(get("/a/slow?delay=50", 0) + get("/a/1", 1) + get("/zzz", 2) + get("/down/x", 3)
                    + get("/a/c?chunked=1", 4))
            replies, closed = await read_replies(r, [b"GET"] * 5)
            assert [x.status for x in replies] == [200, 200, 404, 502, 200]
            await wait_for(lambda: len(_read_lines(log)) >= 5)
            # a bad request: 400, and the connection closes
            w.write(b"GET /a/2 HTTP/1.1\r\nHost: t\r\nBad Header: x\r\n\r\n")
            replies, closed = await read_replies(r, [b"GET"])
            assert replies[0].status == 400 and closed
            await wait_for(lambda: len(_read_lines(log)) >= 6)
            assert sp.access_log is not None and sp.access_log.dropped == 0
            text = sp.metrics.text().decode()
            assert 'shmfabric_splicer_access_log_lines_total{outcome="written",proto="http"} 6.0' in text
        finally:
            await env.close()
    run(main())
    lines = _read_lines(log)
    recs = [json.loads(x) for x in lines] if fmt == "json" else [parse_text(x) for x in lines]
    assert len(recs) == 6
    by_seq = {rec["seq"]: rec for rec in recs}
    assert [by_seq[i]["status"] for i in range(6)] == [200, 200, 404, 502, 200, 400]
    assert by_seq[0]["target"] == "/a/slow?delay=50" and by_seq[0]["method"] == "GET"
    assert by_seq[1]["backend"] == by_seq[0]["backend"] != "-" and by_seq[0]["tries"] == 1
    assert by_seq[2]["backend"] == "-" and by_seq[2]["tries"] == 0 and "no route" in by_seq[2]["error"]
    assert by_seq[3]["backend"] == "127.0.0.1:1" and "127.0.0.1:1" in by_seq[3]["error"]
    assert by_seq[5]["method"] == "-" and by_seq[5]["error"]
    assert [rec["seq"] for rec in recs] == list(range(6))  # written as released: in request order
    # /a/1 was complete first and held for /a/slow (a 50 ms backend delay) ahead of it
    assert float(by_seq[1]["held"]) > float(by_seq[0]["held"])
    assert all(rec["client"].startswith("127.0.0.1:") and rec["host"] in ("test", "t", "") for rec in recs)


def test_logged_bytes_are_the_bytes_the_client_received(tmp_path):
    log = tmp_path / "access.log"

    async def main():
        env = Env()
        try:
            be, _, r, w = await env.one_backend(access_log=str(log))
            reqs = [get(f"/p{i}?chunked=1" if i % 3 == 0 else f"/p{i}?early=1" if i % 3 == 1 else f"/p{i}", i)
                    for i in range(30)]  # 1xx interim answers count too
            w.write(b"".join(reqs) + b"GET /last HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            received = b""
            while True:
                data = await asyncio.wait_for(r.read(65536), 10)
                if not data:
                    break
                received += data
            await wait_for(lambda: len(_read_lines(log)) >= 31)
            return received
        finally:
            await env.close()
    received = run(main())
    recs = [parse_text(x) for x in _read_lines(log)]
    assert sorted(r["seq"] for r in recs) == list(range(31))
    assert sum(r["bytes"] for r in recs) == len(received)


def test_answers_never_sent_are_logged_as_such_not_as_answered(tmp_path):
    """A complete answer waiting behind a slower one when the client resets is not logged as
    sent (499, 0 bytes); answers cut by the splicer's own stop are 444."""
    log = tmp_path / "access.log"

    async def main():
        env = Env()
        try:
            be = await env.backend("a")
            sp = await env.splice(default=[be.address], access_log=str(log))
            r, w = await env.connect()
            w.write(get("/slow?delay=2000", 0) + get("/fast", 1))
            await wait_for(lambda: b"/fast" in be.stats.paths and 1 in next(iter(sp.clients)).log_wait)
            w.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                              struct.pack("ii", 1, 0))
            w.transport.abort()
            await wait_for(lambda: len(_read_lines(log)) >= 2)
            # the splicer's own cut: a request in flight when the splicer closes
            r, w = await env.connect()
            w.write(get("/slow2?delay=3000", 0))
            await wait_for(lambda: any(p.startswith(b"/slow2") for p in be.stats.paths))
        finally:
            await env.close()
    run(main())
    recs = [parse_text(x) for x in _read_lines(log)]
    assert [(r["target"], r["status"], r["bytes"]) for r in recs] == [
        ("/slow?delay=2000", 499, 0), ("/fast", 499, 0), ("/slow2?delay=3000", 444, 0)]
    assert "client closed" in recs[0]["error"] and "not sent" in recs[1]["error"]
    assert "splicer stopped" in recs[2]["error"]


def test_a_bad_body_after_the_answer_is_one_more_line_not_a_second_line_for_the_request(tmp_path):
    log = tmp_path / "access.log"

    async def main():
        env = Env()
        rec = await HeadRecorder().start()  # answers as soon as the head is in
        try:
            await env.splice(default=[rec.address], access_log=str(log))
            r, w = await env.connect()
            w.write(b"POST /early HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            replies, _ = await read_replies(r, [b"POST"], probe=False)
            assert replies[0].status == 200
            w.write(b"ZZ\r\n")  # not a chunk size
            got = await asyncio.wait_for(r.read(), 10)
            await wait_for(lambda: len(_read_lines(log)) >= 2)
            return got
        finally:
            await rec.close()
            await env.close()
    got = run(main())
    recs = [parse_text(x) for x in _read_lines(log)]
    assert [(r["seq"], r["status"]) for r in recs] == [(0, 200), (1, 400)]
    assert recs[1]["method"] == "-" and got.startswith(b"HTTP/1.1 400")


def test_a_client_leaving_before_its_answer_is_logged_499(tmp_path):
    log = tmp_path / "access.log"

    async def main():
        env = Env()
        try:
            be, _, r, w = await env.one_backend(access_log=str(log))
            w.write(get("/slow?delay=2000", 0))
            await wait_for(lambda: be.stats.paths)
            # A reset (a plain close is a half-close, after which the answer is still sent)
            w.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                              struct.pack("ii", 1, 0))
            w.transport.abort()
            await wait_for(lambda: len(_read_lines(log)) >= 1)
        finally:
            await env.close()
    run(main())
    (rec,) = [parse_text(x) for x in _read_lines(log)]
    assert rec["status"] == 499 and rec["bytes"] == 0 and "client closed" in rec["error"]


# -- the CLI with real peers -----------------------------------------------------------------------
class _Splicer:
    """`shmfabric splice http ARGS` as a user runs it, on a free port; stopped with SIGTERM."""

    def __init__(self, args: list[str]) -> None:
        self.port = free_port()
        code = "import sys; from shmfabric.cli.main import main; sys.exit(main(sys.argv[1:]))"
        self.proc = _popen([sys.executable, "-c", code, "splice", "http", "--listen", f"127.0.0.1:{self.port}", *args],
                           env=_py_env())

    def __enter__(self) -> "_Splicer":
        wait_port(self.port, timeout=20, proc=self.proc)
        return self

    def __exit__(self, *exc) -> None:
        _stop(self.proc)


@pytest.fixture
def echo_nginx(tmp_path: Path):
    need("nginx")
    with start_nginx(tmp_path, "echo", xff_echo=True) as port:
        yield port


def test_nginx_sees_the_client_chain_and_wrk_through_two_workers_logs_whole_lines(tmp_path, echo_nginx):
    need("curl", "wrk")
    log = tmp_path / "access.log"
    with _Splicer(["--default", f"127.0.0.1:{echo_nginx}", "--forwarded-for", "--forwarded", "--workers", "2",
                   "--access-log", str(log), "--pool", "8"]) as sp:
        r = subprocess.run(["curl", "-sS", "--max-time", "10", "--noproxy", "*", "-H", "X-Forwarded-For: 10.0.0.9",
                            f"http://127.0.0.1:{sp.port}/xff", f"http://127.0.0.1:{sp.port}/fwd"],
                           capture_output=True, timeout=20)
        assert r.returncode == 0, r.stderr
        # nginx joins repeated X-Forwarded-For fields: the client's value, then the splicer's
        assert r.stdout == b"10.0.0.9, 127.0.0.1for=127.0.0.1;proto=http"
        res = run_wrk(sp.port, ["/w1", "/w2"], connections=8, depth=8, duration=1)
        assert res.requests > 0 and res.socket_errors == 0
    lines = _read_lines(log)  # the splicer has stopped: every worker flushed
    recs = [parse_text(x) for x in lines]  # each line whole although two workers append to the file
    assert len(recs) >= res.requests + 1
    assert sum(1 for rec in recs if rec["target"] in ("/w1", "/w2") and rec["status"] == 200) >= res.requests
    assert {rec["client"].rsplit(":", 1)[0] for rec in recs} == {"127.0.0.1"}


def test_cli_refuses_an_unwritable_log_with_the_reason(tmp_path, echo_nginx):
    missing = tmp_path / "nodir" / "a.log"
    r = subprocess.run([sys.executable, "-m", "shmfabric", "splice", "http", "--default", f"127.0.0.1:{echo_nginx}",
                        "--access-log", str(missing)], capture_output=True, text=True, timeout=30, env=_py_env())
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"access_log: cannot create '{missing}': no directory" in r.stderr and "fix:" in r.stderr
    # (a reload to such a path is refused and the running configuration stays: test_master.py)
