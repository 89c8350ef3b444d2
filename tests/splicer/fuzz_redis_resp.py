"""Coverage-guided fuzzing of the RESP framers with atheris.

    python tests/splicer/fuzz_redis_resp.py -runs=200000        # or -max_total_time=60

The input's first byte chooses how the rest is split into feed() calls. The request reader
and the reply scanner must only ever return commands/replies or raise RespProtocolError (never
another exception), and must give the same result whatever the split: a split changes when
bytes arrive, never what they mean (requests are checked once a newline ends the stream, as an
inline request is complete only then). test_redis_resp.py runs a short smoke of this harness.
"""
from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from shmfabric.splicer import redis_resp
    from shmfabric.splicer.redis_resp import ReplyScanner, RequestReader, RespProtocolError, _may_hold_huge_header


def _requests(data: bytes, step: int, piece: int = 0) -> tuple[list[list[bytes]], bool]:
    # `piece`: the size of the pieces held bytes go to hiredis in (FIRST_CHUNK), small here so
    # that short inputs cross piece ends too.
    default = redis_resp.FIRST_CHUNK
    redis_resp.FIRST_CHUNK = piece or default
    try:
        return _read_requests(data, step)
    finally:
        redis_resp.FIRST_CHUNK = default


def _read_requests(data: bytes, step: int) -> tuple[list[list[bytes]], bool]:
    reader = RequestReader(max_request_bytes=4096)
    out: list[list[bytes]] = []
    for i in range(0, len(data), step):
        reader.feed(data[i:i + step])
        cmds, err = reader.drain(1 << 30)
        out.extend(cmds)
        if err is not None:
            assert isinstance(err, RespProtocolError)
            return out, True
    return out, False


def _replies(data: bytes, step: int) -> tuple[list[bytes], bool]:
    scanner = ReplyScanner()
    out: list[bytes] = []
    for i in range(0, len(data), step):
        scanner.feed(data[i:i + step])
        try:
            out.extend(scanner.drain(1 << 30))
        except RespProtocolError:
            return out, True
    return out, False


def _odd_elements(data: bytes) -> bool:
    """True if a multibulk request in `data` has an element that is not a bulk string.

    hiredis hands such elements ('+a', '(12', '=txt:a') back as bytes, so the reader accepts the
    request (leniently: it is re-encoded, so the client can only confuse its own stream) but
    cannot measure its length; where the following request starts may then depend on the read
    split. Streams without them must read identically however they are split.
    """
    pos, n = 0, len(data)
    while pos < n:
        nl = data.find(b"\n", pos)
        if nl < 0:
            return False
        if data[pos] != 0x2A:  # inline request: one line (PATCHED)
            pos = nl + 1
            continue
        try:
            count = int(data[pos + 1 : nl - 1] if data[nl - 1 : nl] == b"\r" else b"x")
        except ValueError:
            return False  # a protocol error ends the stream either way
        pos = nl + 1
        for _ in range(max(count, 0)):
            if pos >= n:
                return False
            if data[pos] != 0x24:  # '$'
                return True
            nl = data.find(b"\r\n", pos)
            if nl < 0:
                return False
            try:
                size = int(data[pos + 1 : nl])
            except ValueError:
                return False
            pos = nl + 2 + max(size, 0) + 2
    return False


def test_one_input(buf: bytes) -> None:
    if len(buf) < 2:
        return
    step, data = buf[0] % 23 + 1, buf[1:]
    # Requests end with a newline (inline requests are complete only there; the reader looks
    # for one after a multibulk request only when a read ends a line).
    whole = _requests(data + b"\n", len(data) + 1)
    split = _requests(data + b"\n", step, buf[0] // 23 % 9 + 1)
    # An over-long request may be refused one read earlier when whole; otherwise identical.
    if _odd_elements(data):
        pass
    elif not (whole[1] and split[1]):
        assert whole == split, (whole, split)
    else:
        assert split[0] == whole[0][: len(split[0])] or whole[0] == split[0][: len(whole[0])], (whole, split)
    if _may_hold_huge_header(data):
        # Replies come from the configured servers, whose huge aggregates are real (and carry
        # their items); hiredis sizes a list by the header, so a header alone costs seconds here.
        return
    r_whole = _replies(data, len(data))
    r_split = _replies(data, step)
    if not (r_whole[1] or r_split[1]):
        assert r_whole == r_split, (r_whole, r_split)
    # every reply returned is a prefix slice of the stream, in order, with nothing skipped
    assert b"".join(r_whole[0]) == data[: sum(map(len, r_whole[0]))]


def main() -> None:
    atheris.instrument_all()
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
