"""A request whose first byte is not '*' is an inline line, wherever it falls in the stream.

redis-server (networking.c, processInputBuffer) types a request by its first byte only: '*' is a
multibulk, anything else an inline line (up to '\\n', split by sdssplitargs; an empty one is
skipped). So "~2\\r\\n$3\\r\\nDEL\\r\\n$3\\r\\nkey\\r\\n" is five inline lines to it ('~2', '$3', 'DEL',
'$3', 'key': unknown commands, and a DEL with no key) and nothing is deleted. hiredis reads a
set ('~') or an attribute ('|') as a list like '*' and a push ('>') as a PushNotification, so the
reader used to run that DEL when the set followed a multibulk request in the same run, and to
close the connection on a push. Each stream here has such a start first, after multibulk
requests in the same read, past hiredis's 1 KiB trim, after base64 values (whose reads are
verified), after an inline line; read whole, byte by byte and at every split; and end to end
the splicer's reply bytes must be those of a plain redis-server, with `key` still there.
"""
from __future__ import annotations

import base64
import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shmfabric.splicer import redis_resp
from shmfabric.splicer.redis_resp import RequestReader, encode_command

from .redis_fixtures import RedisServer, needs_redis, send_until_closed, splicer, trio  # noqa: F401 (trio: a fixture)

# Every RESP2/RESP3 type byte but '*', and a letter.
STARTS = b"~|>%$:#_,(=!+-x"
# What follows the type byte: each is a run of inline lines to Redis.
SHAPES = {
    "del": b"2\r\n$3\r\nDEL\r\n$3\r\nkey\r\n",
    "null": b"-1\r\n",
    "empty": b"0\r\n",
    "negative": b"-5\r\n",
    "huge": b"3000000000\r\n",  # over MULTIBULK_MAX and PROTO_MAX_BULK: only a line all the same
    "long": b"1\r\n$2000\r\n" + b"x" * 2000 + b"\r\n",  # past hiredis's 1 KiB trim
}
KEY = encode_command([b"EXISTS", b"key"])
PING = encode_command([b"PING"])
BIG = encode_command([b"ECHO", b"b" * 2000])  # past hiredis's 1 KiB trim
B64 = encode_command([b"SET", b"b64", base64.b64encode(bytes(range(200)))])  # '+', '=': a verified read
BEFORE = {
    "first": b"",
    "after-multibulk": encode_command([b"SET", b"other", b"v"]) + PING,
    "after-big": BIG,
    "after-many": PING * 300,  # past 256 verified requests and several trims
    "after-base64": B64 * 3,
    "after-inline": b"PING\r\n",
    "after-empties": b"*0\r\n*-1\r\n" + PING + b"*-3\r\n",
    "after-odd-terminator": b"*2\r\n$4\r\nECHO\r\n$3\r\nabcXY",  # (two bytes Redis skips unchecked)
}
AFTER = KEY + b"EXISTS key\r\n" + PING


def redis_reads(stream: bytes) -> list[list[bytes]]:
    """The commands redis-server runs for `stream`: multibulk requests of bulk strings (a length
    <= 0 skipped), inline lines without quotes or NUL; the stream ends at a request end."""
    out: list[list[bytes]] = []
    pos, n = 0, len(stream)
    while pos < n:
        if stream[pos] == 0x2A:  # '*'
            nl = stream.index(b"\r\n", pos)
            count = int(stream[pos + 1 : nl])
            pos = nl + 2
            args = []
            for _ in range(count):
                assert stream[pos] == 0x24, stream[pos:]
                nl = stream.index(b"\r\n", pos)
                size = int(stream[pos + 1 : nl])
                args.append(stream[nl + 2 : nl + 2 + size])
                pos = nl + 2 + size + 2
            if args:
                out.append(args)
        else:
            nl = stream.index(b"\n", pos)
            words = stream[pos:nl].removesuffix(b"\r").split()
            if words:
                out.append(words)
            pos = nl + 1
    return out


def read(stream: bytes, cuts, limit: int = 1 << 30, first_chunk: int = 0, lazy: bool = False) -> list[list[bytes]]:
    """What the reader returns for `stream` fed in pieces ending at `cuts` (a protocol error
    fails), drained after each piece, or (`lazy`, as a client whose pipeline is full) after the
    last one only."""
    default = redis_resp.FIRST_CHUNK
    redis_resp.FIRST_CHUNK = first_chunk or default
    try:
        r, out, prev = RequestReader(), [], 0
        ends = [*cuts, len(stream)]
        for end in ends:
            r.feed(stream[prev:end])
            prev = end
            while not lazy or end == ends[-1]:
                cmds, err = r.drain(limit)
                assert err is None, (str(err), out)
                out += cmds
                if len(cmds) < limit:
                    break
        return out
    finally:
        redis_resp.FIRST_CHUNK = default


def pieces(n: int, size: int, lo: int = 0) -> list[int]:
    """Cuts every `size` bytes from `lo` on (one cut at `lo` itself)."""
    return ([lo] if lo else []) + list(range(lo + size, n, size))


# -- the reader alone ---------------------------------------------------------------------------


@pytest.mark.parametrize("before", list(BEFORE), ids=list(BEFORE))
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("start", list(STARTS), ids=[chr(c) for c in STARTS])
def test_a_request_not_starting_with_a_star_is_inline_anywhere(start: int, shape: str, before: str) -> None:
    stream = BEFORE[before] + bytes([start]) + SHAPES[shape] + AFTER
    want = redis_reads(stream)
    assert want[-3:] == [[b"EXISTS", b"key"], [b"EXISTS", b"key"], [b"PING"]]
    assert read(stream, []) == want
    # Byte-sized pieces start just before the request under test: through the 2 KB value of
    # "after-big" they cost ~0.5 s a case and test nothing the 7-byte pieces do not.
    lo = max(0, len(BEFORE[before]) - 16) if before == "after-big" else 0
    for size in (1, 2, 3, 7, 64, 1000):
        assert read(stream, pieces(len(stream), size, lo if size < 7 else 0)) == want, size
    for first_chunk in (1, 5, 64):
        assert read(stream, [], first_chunk=first_chunk) == want, first_chunk
    for limit in (1, 3):
        assert read(stream, pieces(len(stream), 5), limit) == want, limit
    for size in (1, 16):
        assert read(stream, pieces(len(stream), size, lo if size < 7 else 0), lazy=True) == want, size


@pytest.mark.parametrize("before", ["first", "after-multibulk", "after-base64", "after-inline", "after-empties"])
@pytest.mark.parametrize("start", list(b"~|>"), ids=list("~|>"))
def test_the_del_set_is_inline_at_every_split(start: int, before: str) -> None:
    # the reported case: at every place a read can end (and every pair of places, for the
    # shortest stream), with pieces fed to hiredis in 1-byte chunks too
    stream = BEFORE[before] + bytes([start]) + SHAPES["del"] + AFTER
    want = redis_reads(stream)
    assert [b"DEL"] in want and [b"DEL", b"key"] not in want
    for cut in range(1, len(stream)):
        assert read(stream, [cut]) == want, cut
        assert read(stream, [cut], first_chunk=1) == want, cut
        assert read(stream, [cut], lazy=True) == want, cut
    if before == "first":
        for cuts in itertools.combinations(range(1, len(stream)), 2):
            assert read(stream, list(cuts)) == want, cuts


def test_a_long_run_of_sets_after_requests_deletes_nothing() -> None:
    # one read of 100 multibulk requests, each followed by a set: 100 DEL-less lines each time
    stream = (PING + b"~2\r\n$3\r\nDEL\r\n$3\r\nkey\r\n") * 100 + AFTER
    want = redis_reads(stream)
    assert want.count([b"DEL"]) == 100
    for size in (len(stream), 1000, 333, 16):
        assert read(stream, pieces(len(stream), size)) == want, size


_mb_arg = st.one_of(st.binary(max_size=24), st.sampled_from([b"~2", b"\r\n~2\r\n", b"|1\r\n", b">", b"+=", b"a|b", b"~/x", b"x|1", b"x" * 1100]))
_part = st.one_of(
    st.lists(_mb_arg, min_size=1, max_size=4).map(lambda a: encode_command([b"ECHO", *a])),
    st.tuples(st.sampled_from(list(STARTS)), st.sampled_from(list(SHAPES.values()))).map(lambda t: bytes([t[0]]) + t[1]),
    st.sampled_from([PING, KEY, b"PING\r\n", b"EXISTS key\r\n", b"\r\n", b"*0\r\n", b"*-1\r\n", b"*-2\r\n", B64]),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=st.lists(_part, min_size=1, max_size=12), cuts=st.lists(st.integers(0, 4000), max_size=12),
       first_chunk=st.sampled_from([0, 1, 7, 64]), limit=st.sampled_from([1, 2, 1 << 30]), lazy=st.booleans())
def test_random_pipelines_read_as_redis_reads_them(parts, cuts, first_chunk, limit, lazy) -> None:
    stream = b"".join(parts) + PING
    cuts = sorted({c for c in cuts if 0 < c < len(stream)})
    assert read(stream, cuts, limit, first_chunk, lazy) == redis_reads(stream)


# -- end to end: the splicer against a plain redis-server -----------------------------------------

QUIT = encode_command([b"QUIT"])


@pytest.fixture(scope="module")
def sp(trio):
    with splicer(trio[:2]) as s:
        yield s


@pytest.fixture(scope="module")
def plain(trio) -> RedisServer:
    return trio[2]


exchange = send_until_closed


def _key_set(sp, plain) -> None:
    sp.client().set("key", "alive")
    plain.client().set("key", "alive")


def _key_alive(sp, plain) -> None:
    assert sp.client().get("key") == b"alive"
    assert plain.client().get("key") == b"alive"


@needs_redis
@pytest.mark.timeout(300)
@pytest.mark.parametrize("before", ["first", "after-multibulk", "after-big", "after-base64", "after-inline"])
@pytest.mark.parametrize("start", list(STARTS), ids=[chr(c) for c in STARTS])
def test_splicer_answers_as_redis_server(sp, plain, start: int, before: str) -> None:
    _key_set(sp, plain)
    stream = BEFORE[before] + bytes([start]) + SHAPES["del"] + AFTER + QUIT
    want = exchange(plain.port, stream)
    assert b"-ERR wrong number of arguments for 'del' command\r\n" in want and want.endswith(b":1\r\n:1\r\n+PONG\r\n+OK\r\n")
    for piece in (0, 1, 3):
        got = exchange(sp.port, stream, piece)
        _key_alive(sp, plain)
        assert got == want, piece


@needs_redis
@pytest.mark.timeout(300)
@pytest.mark.parametrize("shape", [s for s in SHAPES if s != "del"])
@pytest.mark.parametrize("start", list(b"~|>%$"), ids=list("~|>%$"))
def test_splicer_answers_other_shapes_as_redis_server(sp, plain, start: int, shape: str) -> None:
    _key_set(sp, plain)
    stream = PING + bytes([start]) + SHAPES[shape] + AFTER + QUIT
    want = exchange(plain.port, stream)
    for piece in (0, 2):
        got = exchange(sp.port, stream, piece)
        _key_alive(sp, plain)
        assert got == want, piece


_e2e_part = st.one_of(
    st.lists(st.binary(max_size=16), min_size=1, max_size=3).map(lambda a: encode_command([b"ECHO", *a])),
    st.tuples(st.sampled_from(list(STARTS)), st.sampled_from([SHAPES["del"], SHAPES["null"], SHAPES["empty"],
                                                              SHAPES["huge"]])).map(lambda t: bytes([t[0]]) + t[1]),
    st.sampled_from([PING, KEY, b"PING\r\n", b"EXISTS key\r\n", b"\r\n", b"*0\r\n", b"*-1\r\n", B64,
                     encode_command([b"DEL", b"other"]), encode_command([b"GET", b"key"])]),
)


@needs_redis
@pytest.mark.timeout(600)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(parts=st.lists(_e2e_part, min_size=1, max_size=10), piece=st.sampled_from([0, 1, 5, 64]))
def test_random_pipelines_through_the_splicer_match_redis_server(sp, plain, parts, piece) -> None:
    _key_set(sp, plain)
    stream = b"".join(parts) + KEY + QUIT
    want = exchange(plain.port, stream)
    assert want.endswith(b":1\r\n+OK\r\n")
    got = exchange(sp.port, stream, piece)
    _key_alive(sp, plain)
    assert got == want
