"""Reads holding '+', '=' or '(' are verified after hiredis parses them, not walked before.

RequestReader._verify checks, at the canonical header positions of the requests hiredis returned,
that each element is a bulk string. These tests try to get a request with a simple string ('+'),
a verbatim string ('=', which hiredis returns 4 bytes shorter), or a big number ('(') past it:
elements mixed so that the request is as long as its canonical encoding, odd bulk terminators
before them, empty requests before them, reads split at every byte, inline commands after them.
Each must be refused exactly where, and in the words with which, redis-server refuses it; the
end-to-end cases compare the splicer's reply bytes with a plain redis-server's.
"""
from __future__ import annotations

import base64
import random
import re

import pytest

from shmfabric.splicer import redis_resp
from shmfabric.splicer.redis_resp import RequestReader, RespProtocolError, _may_hold_huge_header, _split_inline, encode_command

from .redis_fixtures import needs_redis
# the splicer (over two servers) and a plain redis-server (the third), as the desync tests use them
from .redis_fixtures import trio  # noqa: F401 (a fixture)
from .test_redis_reader_desync import exchange, plain, sp  # noqa: F401 (fixtures)

B64 = [encode_command([b"SET", b"k%d" % i, base64.b64encode(bytes([i, 250, 251]) * 7) + b"+="]) for i in range(16)]
B64_CMDS = [[b"SET", b"k%d" % i, base64.b64encode(bytes([i, 250, 251]) * 7) + b"+="] for i in range(16)]
# '+ab' is 3 bytes shorter than its canonical '$2\r\nab\r\n'; '=8\r\ntxt:abcd' (hiredis: b"abcd") 4 longer
# than '$4\r\nabcd\r\n'; '(1' 3 shorter than '$1\r\n1\r\n'. Each request below is exactly as long as
# the canonical encoding of what hiredis returns for it.
BALANCED = {
    "plus-first": b"*8\r\n$4\r\nMGET\r\n" + b"+ab\r\n" * 4 + b"=8\r\ntxt:abcd\r\n" * 3,
    "verbatim-first": b"*8\r\n$4\r\nMGET\r\n" + b"=8\r\ntxt:abcd\r\n" * 3 + b"+ab\r\n" * 4,
    "bignum-mix": b"*8\r\n$4\r\nMGET\r\n" + b"(1\r\n+ab\r\n=8\r\ntxt:abcd\r\n(2\r\n+cd\r\n=8\r\ntxt:efgh\r\n=8\r\ntxt:ijkl\r\n",
    # after a bulk whose two terminator bytes are not CRLF (neither Redis nor hiredis checks them)
    "odd-terminator": b"*9\r\n$4\r\nMGET\r\n$1\r\nxAB" + b"+ab\r\n" * 4 + b"=8\r\ntxt:abcd\r\n" * 3,
    # the reviewer's smuggling shape: the last element's bytes end with an inline FLUSHALL
    "smuggle": b"*3\r\n$4\r\nMGET\r\n+ab\r\n=%d\r\ntxt:xxxx\r\nFLUSHALL\r\n" % len(b"txt:xxxx\r\nFLUSHALL"),
    # a '+' element whose text has a '$' where the canonical encoding would put the next header
    "dollar-inside": b"*3\r\n$3\r\nSET\r\n+$1\r\n$1\r\nv\r\n$1\r\nv\r\n",
    "after-empties": b"*0\r\n*-1\r\n*2\r\n$4\r\nECHO\r\n(12345\r\n",
}
BALANCED_ERRORS = {"plus-first": "+", "verbatim-first": "=", "bignum-mix": "(", "odd-terminator": "+", "smuggle": "+",
                   "dollar-inside": "+", "after-empties": "("}
TAIL = b"FLUSHALL\r\n*1\r\n$4\r\nPING\r\n"


def read(stream: bytes, piece: int, limit: int = 1 << 30, first_chunk: int = 0) -> tuple[list[list[bytes]], str | None]:
    default = redis_resp.FIRST_CHUNK
    redis_resp.FIRST_CHUNK = first_chunk or default
    try:
        r, out = RequestReader(), []
        for i in range(0, len(stream), piece):
            r.feed(stream[i : i + piece])
            while True:
                cmds, err = r.drain(limit)
                out += cmds
                if err is not None:
                    return out, str(err)
                if len(cmds) < limit:
                    break
        return out, None
    finally:
        redis_resp.FIRST_CHUNK = default


def test_the_balanced_requests_are_as_long_as_canonical() -> None:
    import hiredis

    for name, bad in BALANCED.items():
        if name in ("smuggle", "dollar-inside", "after-empties"):
            continue
        r = hiredis.Reader()
        r.feed(bad)
        cmd = r.gets()
        assert all(type(a) is bytes for a in cmd) and len(encode_command(cmd)) == len(bad), name


@pytest.mark.parametrize("name", list(BALANCED))
def test_balanced_bad_elements_are_refused_at_every_split(name: str) -> None:
    stream = b"".join(B64) + BALANCED[name] + TAIL
    want = (B64_CMDS, f"expected '$', got '{BALANCED_ERRORS[name]}'")
    for piece in range(1, len(stream) + 1):
        assert read(stream, piece) == want, piece
    for piece in (1, 7, 64, len(stream)):
        assert read(stream, piece, limit=1) == want, piece
        assert read(stream, piece, limit=5, first_chunk=3) == want, piece


@pytest.mark.parametrize("name", list(BALANCED))
def test_a_bad_element_of_an_incomplete_request_is_refused_without_the_rest(name: str) -> None:
    # Redis refuses the element on reading it: the client may be waiting for that answer.
    bad = BALANCED[name]
    cut = re.search(rb"\r\n[+=(]", bad).start() + 3  # just past the bad element's type byte
    for piece in (1, 5, 1 << 20):
        out, err = read(b"".join(B64) + bad[:cut], piece)
        assert out == B64_CMDS and err == f"expected '$', got '{BALANCED_ERRORS[name]}'", (piece, out, err)


def test_a_long_incomplete_value_is_walked_once_and_a_bad_element_after_it_refused(monkeypatch) -> None:
    walked: list[int] = []
    real = redis_resp._HeaderWalk.feed
    monkeypatch.setattr(redis_resp._HeaderWalk, "feed", lambda self, data: (walked.append(len(data)), real(self, data))[1])
    value = base64.b64encode(bytes(range(256)) * 3000)  # ~1 MB of '+' and '='
    stream = b"".join(B64) + b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$%d\r\n%s\r\n" % (len(value), value)
    r, out = RequestReader(), []
    for i in range(0, len(stream), 65536):
        r.feed(stream[i : i + 65536])
        cmds, err = r.drain(1 << 30)
        assert err is None
        out += cmds
    assert out == B64_CMDS
    assert sum(walked) < 3 * len(stream) // 2  # each byte walked at most once or so, not once per read
    r.feed(b"+x\r\n")
    cmds, err = r.drain(1 << 30)
    assert cmds == [] and str(err) == "expected '$', got '+'"


def test_values_full_of_plus_and_equals_are_not_walked(monkeypatch) -> None:
    walked: list[int] = []
    real = redis_resp._HeaderWalk.feed
    monkeypatch.setattr(redis_resp._HeaderWalk, "feed", lambda self, data: (walked.append(len(data)), real(self, data))[1])
    r = RequestReader()
    for _ in range(50):  # reads ending at request ends, as pipelining clients send them
        r.feed(b"".join(B64))
        cmds, err = r.drain(1 << 30)
        assert err is None and cmds == B64_CMDS
    assert walked == []
    # reads split anywhere: a walk for the first read(s), then the verification
    stream = b"".join(B64) * 50
    r, out = RequestReader(), []
    for i in range(0, len(stream), 1000):
        r.feed(stream[i : i + 1000])
        cmds, err = r.drain(1 << 30)
        assert err is None
        out += cmds
    assert out == B64_CMDS * 50
    assert sum(walked) < len(stream) // 4


def test_valid_odd_terminators_and_inline_commands_after_verified_requests() -> None:
    stream = (b"".join(B64) + b"*2\r\n$4\r\nECHO\r\n$3\r\na+bXY" + b"ECHO one\r\n"
              + b"*2\r\n$4\r\nECHO\r\n$5\r\n=+(=+AB" + b"*-1\r\n*0\r\nPING\r\n" + b"*2\r\n$4\r\nECHO\r\n$2\r\n(=\r\n")
    want = (B64_CMDS + [[b"ECHO", b"a+b"], [b"ECHO", b"one"], [b"ECHO", b"=+(=+"], [b"PING"], [b"ECHO", b"(="]], None)
    for piece in range(1, len(stream) + 1):
        assert read(stream, piece) == want, piece


def test_requests_between_a_negative_multibulk_and_a_bad_element_are_answered() -> None:
    # Redis skips "*-3" like "*0"; the request after it runs before the bad one is refused. (The
    # walk used to drop it: hiredis refuses "*-3", and the bytes handed back after it were not
    # fed again once the walk had held a header back.)
    stream = b"*-3\r\n*2\r\n$4\r\nECHO\r\n$2\r\na+\r\n" + BALANCED["plus-first"] + TAIL
    for piece in range(1, len(stream) + 1):
        assert read(stream, piece) == ([[b"ECHO", b"a+"]], "expected '$', got '+'"), piece


@pytest.mark.parametrize("after", [b"*2000000000\r\n", b"$4000000000\r\n", b"%2000000000\r\n"], ids=["huge-array", "long-bulk", "huge-map"])
def test_a_bad_element_before_a_header_held_back_is_refused_first(after: bytes) -> None:
    # The huge header is held back from hiredis (hiredis issue #1357); the bad element before it,
    # which hiredis did read, is what Redis refuses.
    stream = b"".join(B64) + b"*3\r\n$3\r\nSET\r\n+x\r\n" + after
    for piece in range(1, len(stream) + 1):
        assert read(stream, piece) == (B64_CMDS, "expected '$', got '+'"), piece


def test_the_huge_header_search_is_the_regex_it_replaced() -> None:
    huge = re.compile(rb"[*%~>|][1-9][0-9]{6}")
    rnd = random.Random(7)
    for _ in range(20000):
        data = bytes(rnd.choice(b"*%~>|0123456789a") for _ in range(rnd.randint(0, 24)))
        assert _may_hold_huge_header(data) == (huge.search(data) is not None), data
    data = bytes(rnd.randrange(256) for _ in range(8192))
    assert _may_hold_huge_header(data + b"|20000000") and not _may_hold_huge_header(data.replace(b"*", b"") + b"*0200000")


# A plain model of how redis-server reads requests (processMultibulkBuffer, processInlineBuffer),
# with the reader's documented conventions: '~' and '|' start a request like '*' ('|': 2n items),
# and a bad element is refused at its type byte. Random streams, split and drained every way,
# must read as the model reads them whole.

_CANONICAL = re.compile(rb"-?[1-9][0-9]*|0")


def _s2ll(b: bytes) -> int | None:
    return int(b) if _CANONICAL.fullmatch(b) and -(2**63) <= int(b) < 2**63 else None


def model(data: bytes) -> tuple[list[list[bytes]], str | None, bool]:
    """(requests, error, sure): not sure when the stream ends inside a request after an element
    that is neither a bulk string nor '+', '=', '(' (an integer, a null, a nested aggregate...):
    Redis has refused it; the reader may wait for the request to end (hiredis reads it)."""
    out, pos, n = [], 0, len(data)
    fault = None
    while pos < n:
        t = data[pos]
        if t == 0x2A:  # PATCHED: only '*' starts a multibulk (Redis)
            nl = data.find(b"\r\n", pos)
            if nl < 0:
                return out, None
            count = _s2ll(data[pos + 1 : nl])
            if count is None or count > 1024 * 1024:
                return out, "invalid multibulk length", True
            p = nl + 2
            args = []
            for _ in range(max(count, 0)):
                if p >= n:
                    return out, fault, fault is None
                if data[p] != 0x24:
                    if data[p] in b"+=(":
                        return out, fault or f"expected '$', got '{chr(data[p])}'", True
                    fault = fault or f"expected '$', got '{chr(data[p])}'"
                    p = _item_end(data, p)  # (as hiredis reads it, to see whether the request ends)
                    if p < 0:
                        return out, fault, False
                    continue
                nl = data.find(b"\r\n", p)
                if nl < 0:
                    return out, fault, fault is None
                size = _s2ll(data[p + 1 : nl])
                if size is None or size < -1:
                    return out, fault or "invalid bulk length", True
                if size == -1:
                    fault = fault or "invalid bulk length"
                    p = nl + 2
                    continue
                if nl + size + 4 > n:
                    return out, fault, fault is None
                args.append(data[nl + 2 : nl + 2 + size])
                p = nl + size + 4
            if fault:
                return out, fault, True
            if args:
                out.append(args)
            pos = p
        else:
            nl = data.find(b"\n", pos)
            if nl >= 0 and data.find(0, pos, nl) >= 0:  # PATCHED: strchr stops at a NUL
                nl = -1
            if nl < 0:
                return out, None, True
            try:
                args = _split_inline(data[pos:nl].removesuffix(b"\r"))
            except RespProtocolError as exc:
                return out, str(exc), True
            if args:
                out.append(args)
            pos = nl + 1
    return out, None, True


def _item_end(data: bytes, p: int) -> int:
    """Where the RESP item at `p` ends, or -1 (incomplete, or hiredis refuses it: either way the
    reader may not have refused the request by the end of the stream)."""
    import hiredis

    r = hiredis.Reader()
    r.feed(data[p:])
    try:
        if r.gets() is False:
            return -1
    except Exception:
        return -1
    return len(data) - r.len() if r.len() < len(data) - p else _scan_end(data, p)


def _scan_end(data: bytes, p: int) -> int:
    end = redis_resp._scan(data, p, len(data))
    return end if end >= 0 else -1


def _random_stream(r: random.Random) -> bytes:
    def value() -> bytes:
        k = r.random()
        if k < 0.3:
            return base64.b64encode(r.randbytes(r.randint(0, 40)))
        if k < 0.5:
            return r.randbytes(r.randint(0, 30))
        return bytes(r.choice(b"+=($*\r\n:_-~|%0123456789abc") for _ in range(r.randint(0, 20)))

    def line() -> bytes:
        return bytes(r.choice(b"abc$+=(*0123 ") for _ in range(r.randint(0, 12)))

    def bad() -> bytes:
        return r.choice([b"+" + line() + b"\r\n", b"=%d\r\ntxt:%s\r\n" % (4 + len(x := line()), x), b"(%d\r\n" % r.randint(0, 10**20),
                         b":1\r\n", b"$-1\r\n", b"_\r\n", b"$04\r\n", b"*1\r\n$1\r\na\r\n", b"=2\r\n"])

    parts = []
    for _ in range(r.randint(1, 12)):
        k = r.random()
        if k < 0.7:
            n = r.randint(1, 5)
            parts.append(r.choice(b"***~").to_bytes(1, "big") + b"%d\r\n" % n)
            for _ in range(n):
                if r.random() < 0.08:
                    parts.append(bad())
                else:
                    v = value()
                    term = b"\r\n" if r.random() < 0.85 else bytes(r.choice(b"+=($*\r\nAB") for _ in range(2))
                    parts.append(b"$%d\r\n%s%s" % (len(v), v, term))
        elif k < 0.75:
            parts.append(r.choice(list(BALANCED.values())))
        elif k < 0.82:
            parts.append(r.choice([b"*0\r\n", b"*-1\r\n", b"*-3\r\n"]))
        elif k < 0.92:
            parts.append(r.choice([b"PING\r\n", b"ECHO a+b=c\r\n", b"\r\n", b"SET k +v\r\n", b"FLUSHALL\r\n"]))
        else:
            v = base64.b64encode(r.randbytes(r.randint(700, 3000)))
            parts.append(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$%d\r\n%s\r\n" % (len(v), v))
    s = b"".join(parts)
    if r.random() < 0.3:
        s = s[: r.randint(0, len(s))]
    return s + b"PING\r\n"


@pytest.mark.parametrize("seed", range(0, 300, 50))
def test_random_streams_read_as_redis_reads_them(seed: int) -> None:
    for s in range(seed, seed + 50):
        r = random.Random(s)
        data = _random_stream(r)
        out, err, sure = model(data)
        ways = [(piece, 1 << 30) for piece in (len(data), 1, 3, r.randint(1, 64), r.randint(64, 2048))]
        ways += [(piece, limit) for piece in (len(data), r.randint(1, 64)) for limit in (1, 3)]
        for piece, limit in ways:
            got = read(data, piece, limit, r.choice([0, 1, 5, 64]))
            assert got == (out, err) or (not sure and got == (out, None)), (s, piece, limit, data, out, err)


# End to end: the splicer's reply bytes against a plain redis-server's.

HEAD = b"".join(B64[:4])
QUIT = b"*1\r\n$4\r\nQUIT\r\n"




@needs_redis
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(BALANCED))
def test_balanced_bad_elements_get_redis_server_replies(sp, plain, name: str) -> None:
    c = sp.client()
    c.set("canary", "alive")
    stream = HEAD + BALANCED[name] + TAIL + QUIT
    want = exchange(plain.port, stream)
    assert want.startswith(b"+OK\r\n" * 4) and want.endswith(f"-ERR Protocol error: expected '$', got '{BALANCED_ERRORS[name]}'\r\n".encode())
    for piece in (0, 1, 3, 7):
        assert exchange(sp.port, stream, piece) == want, piece
    assert c.get("canary") == b"alive"


@needs_redis
@pytest.mark.timeout(300)
def test_other_streams_get_redis_server_replies(sp, plain) -> None:
    streams = [
        # incomplete: the client waits for the refusal
        HEAD + b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n+v\r\n",
        HEAD + b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n=5\r\ntxt:v\r\n",
        # valid: '+', '=', '(' in values, odd terminators, inline commands and empty requests after them
        HEAD + b"*2\r\n$4\r\nECHO\r\n$3\r\na+bXY" + b"ECHO one\r\n*2\r\n$4\r\nECHO\r\n$5\r\n=+(=+AB*-1\r\n*0\r\nPING\r\n" + QUIT,
        # a negative multibulk length (skipped), then a request, then a bad element
        b"*-3\r\n*2\r\n$4\r\nECHO\r\n$2\r\na+\r\n" + BALANCED["plus-first"] + TAIL,
        # a bad element, then a header the reader holds back from hiredis
        HEAD + b"*3\r\n$3\r\nSET\r\n+x\r\n*2000000000\r\n",
        HEAD + b"*3\r\n$3\r\nSET\r\n(1\r\n$4000000000\r\n",
    ]
    for stream in streams:
        want = exchange(plain.port, stream)
        for piece in (0, 1, 5):
            assert exchange(sp.port, stream, piece) == want, (stream, piece)


# -- second review ------------------------------------------------------------------------------------

def _smuggle_after_a_null(hidden: bytes) -> list[bytes]:
    """Three reads: an incomplete ECHO; its end, a null item ('_', an inline request to Redis)
    and a SET whose value runs past the first KiB of the stream; then the value's end and an
    ECHO whose argument holds `hidden` exactly where the SET's value would end had the bytes
    past that KiB been lost."""
    read1 = b"*2\r\n$4\r\nECHO\r\n$3\r\nab"
    head = b"c\r\n_\r\n*3\r\n$3\r\nSET\r\n$5\r\nsmugk\r\n"
    rem = 1200 - len(head)
    n = rem - len(b"$%d\r\n" % rem)
    while len(b"$%d\r\n" % n) + n != rem:
        n += 1 if len(b"$%d\r\n" % n) + n < rem else -1
    read2 = head + b"$%d\r\n" % n + b"v" * n
    lost = len(read2) - (1024 - len(read1))
    echo = b"*2\r\n$4\r\nECHO\r\n"
    for size in range(1, 10000):
        hdr = b"$%d\r\n" % size
        arg = b"p" * (lost + 2 - (2 + len(echo) + len(hdr))) + hidden
        if len(arg) == size:
            break
    read3 = b"\r\n" + echo + hdr + arg + b"\r\n" + b"*1\r\n$4\r\nPING\r\n"
    assert read3.index(hidden) == lost + 2
    return [read1, read2, read3]


def test_no_byte_is_lost_after_a_null_item_past_the_first_kib():
    # was: the re-parse after a null item looked at a 1 KiB window and handed back only that
    # window, so the rest of the read was dropped and a FLUSHALL inside the ECHO's argument ran
    hidden = encode_command([b"FLUSHALL"])
    rd, out = RequestReader(), []
    for data in _smuggle_after_a_null(hidden):
        rd.feed(data)
        cmds, err = rd.drain(1 << 30)
        assert err is None
        out += cmds
    assert [c[0] for c in out] == [b"ECHO", b"_", b"SET", b"ECHO", b"PING"]
    assert out[0] == [b"ECHO", b"abc"] and out[2][1] == b"smugk" and set(out[2][2]) == {ord("v")}
    assert out[3][1].endswith(hidden)  # an argument, as Redis reads it


def test_a_refused_request_after_a_verified_run_drops_no_valid_request(monkeypatch):
    # was: a verification run when 256 requests waited (at a trim of hiredis's buffer) counted
    # the request just read as returned already, and a refusal dropped the valid one before it
    monkeypatch.setattr(redis_resp, "FIRST_CHUNK", 512)
    ping = encode_command([b"PING"])
    stream = (encode_command([b"GET", b"a+b"]) + ping * 10 + encode_command([b"DEL", b"canary"])
              + b"*2\r\n$4\r\nECHO\r\n+x\r\n" + ping * 400)
    rd = RequestReader()
    rd.feed(stream)
    out = []
    while True:
        cmds, err = rd.drain(1 << 30)
        out += cmds
        if err is not None or not cmds:
            break
    assert err is not None and "expected '$', got '+'" in str(err)
    assert out == [[b"GET", b"a+b"]] + [[b"PING"]] * 10 + [[b"DEL", b"canary"]]


def test_an_inline_line_holding_a_nul_never_ends_as_in_redis():
    # Redis finds an inline line's end with strchr, which stops at a NUL: "GET a\0b\r\nFLUSHALL"
    # is one unfinished line to it (refused once past 64 KiB); the reader ran both commands
    rd = RequestReader()
    rd.feed(b"GET a\0b\r\nFLUSHALL\r\n")
    assert rd.drain(1 << 30) == ([], None)
    rd.feed(b"x" * (redis_resp.INLINE_MAX + 10))
    cmds, err = rd.drain(1 << 30)
    assert cmds == [] and err is not None and "too big inline request" in str(err)
    rd = RequestReader()
    rd.feed(b"GET a\r\nPING\r\n")  # without a NUL, as before
    assert rd.drain(1 << 30) == ([[b"GET", b"a"], [b"PING"]], None)


# -- third review ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("line,args", [
    (b"DEL\vcanary", [b"DEL\vcanary"]),  # one word to Redis: an unknown command, no DEL
    (b"FLUSHALL\fASYNC", [b"FLUSHALL\fASYNC"]),
    (b"DEL canary\vx", [b"DEL", b"canary\vx"]),
    (b"ECHO a\fb", [b"ECHO", b"a\fb"]),
    (b"\v\fECHO \v a", [b"ECHO", b"a"]),  # between words they are blanks (isspace)
    (b"ECHO \"a\" \vb", [b"ECHO", b"a", b"b"]),
])
def test_inline_words_end_only_where_redis_ends_them(line, args):
    # was: \v and \f ended a word (bytes.split), so "DEL\vcanary", an unknown command to Redis,
    # ran DEL canary through the splicer
    assert _split_inline(line) == args


def test_an_inline_line_that_looks_like_a_resp_header_is_not_waited_inside():
    # was: after a complete request, the "is what follows inline?" check ran only when the read
    # ended a line; "$100" then left hiredis waiting inside a bulk of 100 bytes, holding back the
    # requests behind it that Redis runs at once
    rd = RequestReader()
    rd.feed(b"*1\r\n$4\r\nPING\r\n$100\r\n*2\r\n$3\r\nDEL\r\n$6\r\ncanaryxx")
    assert rd.drain(1 << 30) == ([[b"PING"], [b"$100"], [b"DEL", b"canary"]], None)
