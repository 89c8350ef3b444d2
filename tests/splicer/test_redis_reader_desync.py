"""Requests whose elements are not bulk strings: refused exactly as redis-server refuses them.

hiredis returns a simple string ('+x'), a verbatim string ('=N\\r\\ntxt:...') and a big number
('(1') as plain bytes, so the reader used to accept them as arguments and, when an inline
command followed, re-measured them by their canonical encoding: it lost track of where requests
end, and bytes inside an argument ran as commands (FLUSHALL from inside an MGET argument). Each
stream here goes to the splicer and to a plain redis-server, and the reply bytes must be the same.
"""
from __future__ import annotations


import pytest

from shmfabric.splicer.redis_resp import RequestReader

from .redis_fixtures import RedisServer, needs_redis, send_until_closed, splicer, trio  # noqa: F401 (trio: a fixture)

pytestmark = [needs_redis, pytest.mark.timeout(120)]

HEAD = b"*2\r\n$4\r\nECHO\r\n$4\r\nhead\r\n"
BIG_HEAD = b"*2\r\n$4\r\nECHO\r\n$2000\r\n" + b"h" * 2000 + b"\r\n"  # past hiredis's 1 KiB trim
QUIT = b"*1\r\n$4\r\nQUIT\r\n"
# What follows a bad request: inline commands, or multibulk ones.
INLINE_TAIL = b"PING\r\nECHO tail\r\n"
MULTIBULK_TAIL = b"*1\r\n$4\r\nPING\r\n*2\r\n$4\r\nECHO\r\n$4\r\ntail\r\n"

_VERBATIM = b"".join(b"=5\r\ntxt:a\r\n" for _ in range(5))
_LAST = b"txt:AAAAAAAA\r\nFLUSHALL"
# The reviewer's smuggling case: the bytes of the last "argument" end with FLUSHALL.
SMUGGLE = b"*7\r\n$4\r\nMGET\r\n" + _VERBATIM + b"=%d\r\n%s\r\n" % (len(_LAST), _LAST)

BAD = {
    "simple string": b"*1\r\n+PING\r\n",
    "simple string argument": b"*2\r\n$4\r\nECHO\r\n+hello\r\n",
    "verbatim string": b"*2\r\n$4\r\nECHO\r\n=9\r\ntxt:hello\r\n",
    "verbatim smuggling FLUSHALL": SMUGGLE,
    "big number": b"*2\r\n$4\r\nECHO\r\n(12345\r\n",
    "leading zero length": b"*2\r\n$4\r\nECHO\r\n$04\r\nabcd\r\n",
    "plus sign length": b"*2\r\n$4\r\nECHO\r\n$+4\r\nabcd\r\n",
    "null bulk argument": b"*2\r\n$4\r\nECHO\r\n$-1\r\n",
    "RESP3 null argument": b"*2\r\n$4\r\nECHO\r\n_\r\n",
    "error argument": b"*2\r\n$4\r\nECHO\r\n-ERR x\r\n",
    "integer argument": b"*2\r\n$4\r\nECHO\r\n:1\r\n",
    "nested array": b"*2\r\n$4\r\nECHO\r\n*1\r\n$1\r\na\r\n",
    "bad item after an integer": b"*3\r\n$4\r\nECHO\r\n:1\r\n+x\r\n",
    "simple string after a bulk with odd terminator": b"*3\r\n$4\r\nECHO\r\n$1\r\nxAB+PING\r\n",
}


@pytest.fixture(scope="module")
def sp(trio):
    with splicer(trio[:2]) as s:
        yield s


@pytest.fixture(scope="module")
def plain(trio) -> RedisServer:
    return trio[2]


exchange = send_until_closed


@pytest.mark.parametrize("tail", [INLINE_TAIL, MULTIBULK_TAIL], ids=["inline", "multibulk"])
@pytest.mark.parametrize("head", [HEAD, BIG_HEAD], ids=["head", "big-head"])
@pytest.mark.parametrize("bad", list(BAD.values()), ids=list(BAD))
def test_replies_match_redis_server(sp, plain, bad: bytes, head: bytes, tail: bytes) -> None:
    stream = head + bad + tail + QUIT
    want = exchange(plain.port, stream)
    assert exchange(sp.port, stream) == want
    assert want.startswith(b"$4\r\nhead\r\n" if head is HEAD else b"$2000\r\n")


@pytest.mark.parametrize("bad", [BAD["simple string argument"], SMUGGLE, BAD["null bulk argument"],
                                 BAD["leading zero length"]], ids=["simple", "smuggle", "null", "zero"])
def test_replies_match_redis_server_in_small_pieces(sp, plain, bad: bytes) -> None:
    stream = HEAD + bad + INLINE_TAIL + QUIT
    assert exchange(sp.port, stream, piece=3) == exchange(plain.port, stream)


def test_error_wording_matches_redis(sp, plain) -> None:
    # The two findings' exact words, stated, not only compared.
    assert exchange(sp.port, BAD["simple string"] + INLINE_TAIL) == b"-ERR Protocol error: expected '$', got '+'\r\n"
    assert exchange(sp.port, BAD["null bulk argument"] + INLINE_TAIL) == b"-ERR Protocol error: invalid bulk length\r\n"
    assert exchange(plain.port, BAD["null bulk argument"] + INLINE_TAIL) == b"-ERR Protocol error: invalid bulk length\r\n"


def test_flushall_canary_survives(sp, plain) -> None:
    c = sp.client()
    c.set("canary", "alive")
    out = exchange(sp.port, SMUGGLE + b"PING\r\n")
    assert out == b"-ERR Protocol error: expected '$', got '='\r\n"
    assert c.get("canary") == b"alive"
    assert c.ping() is True


def test_valid_streams_still_pass(sp, plain) -> None:
    # Bulk terminators are not checked by Redis (nor by the reader): an odd pair of bytes after a
    # bulk is skipped, and the requests that follow still run, inline ones included.
    stream = (b"*2\r\n$4\r\nECHO\r\n$3\r\nabcXY" + b"ECHO one\r\n" + b"*2\r\n$4\r\nECHO\r\n$3\r\ntwoAB"
              + BIG_HEAD + b"ECHO three\r\n" + b"*-1\r\n*0\r\nPING\r\n" + QUIT)
    want = exchange(plain.port, stream)
    assert want.count(b"\r\n") > 6
    assert exchange(sp.port, stream) == want


def _read(stream: bytes, piece: int) -> tuple[list[list[bytes]], str | None]:
    r = RequestReader()
    out: list[list[bytes]] = []
    for i in range(0, len(stream), piece):
        r.feed(stream[i : i + piece])
        cmds, err = r.drain(10_000)
        out += cmds
        if err is not None:
            return out, str(err)
    return out, None


@pytest.mark.parametrize("bad", list(BAD.values()), ids=list(BAD))
def test_reader_refuses_at_the_bad_element_whatever_the_split(bad: bytes) -> None:
    stream = BIG_HEAD + HEAD + bad + INLINE_TAIL + MULTIBULK_TAIL
    whole = _read(stream, len(stream))
    for piece in (1, 2, 5, 13, 512):
        assert _read(stream, piece) == whole
    cmds, err = whole
    # The two good requests are read, nothing after the bad one is.
    assert [c[0] for c in cmds] == [b"ECHO", b"ECHO"]
    assert err is not None


def test_a_long_top_level_bulk_is_read_inline_not_skipped() -> None:
    # "$2000\r\n<2000 bytes>\r\n" after a request is two inline commands to Redis. When hiredis
    # read it past its 1 KiB trim, the reader used to move its known request end past it and
    # hand back only what followed: both lines were dropped unseen.
    for first in (b"$2000\r\n" + b"x" * 2000 + b"\r\n", b"+" + b"y" * 2000 + b"\r\n"):
        stream = HEAD + first + b"PING\r\n"
        whole = _read(stream, len(stream))
        assert whole == ([[b"ECHO", b"head"]] + [[line] for line in first.split(b"\r\n") if line] + [[b"PING"]], None)
        for piece in (1, 7, 512):
            assert _read(stream, piece) == whole
