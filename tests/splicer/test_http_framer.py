"""Tests of the sans-IO HTTP/1.1 framers: every case whole, one byte at a time and with trailing data."""
from __future__ import annotations

import gzip

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shmfabric.splicer.http_framer import (
    BODY_CHUNKED, BODY_LENGTH, BODY_NONE, BODY_UNTIL_CLOSE, NEED_DATA, PAUSED, ConnectionClosed, Data, EndOfMessage,
    InformationalResponse, RemoteProtocolError, Request, RequestFramer, Response, ResponseFramer, encode_chunk,
    encode_last_chunk, encode_request_head, encode_response_head, simple_response,
)


def drain(framer, *, strict: bool = True):
    """All events until NEED_DATA/PAUSED/ConnectionClosed; Data merged; error appended as ('error', status)."""
    out = []
    while True:
        try:
            ev = framer.next_event()
        except RemoteProtocolError as exc:
            out.append(("error", exc.status))
            return out
        if ev is NEED_DATA or ev is PAUSED:
            return out
        if isinstance(ev, Data) and out and isinstance(out[-1], Data):
            out[-1] = Data(out[-1].data + ev.data)
        else:
            out.append(ev)
        if isinstance(ev, ConnectionClosed):
            return out


def feed_modes(data: bytes):
    """(name, list of pieces): whole, byte at a time, and split in three."""
    third = max(1, len(data) // 3)
    return [("whole", [data]), ("bytewise", [data[i:i + 1] for i in range(len(data))]),
            ("thirds", [data[:third], data[third:2 * third], data[2 * third:]])]


def parse_requests(data: bytes, eof: bool = False, **kw):
    results = {}
    for name, pieces in feed_modes(data):
        f = RequestFramer(**kw)
        evs = []
        for piece in pieces:
            f.receive_data(piece)
            evs += drain(f)
        if eof:
            f.receive_data(b"")
            evs += drain(f)
        # merge Data across feeds so all modes compare equal
        merged = []
        for ev in evs:
            if isinstance(ev, Data) and merged and isinstance(merged[-1], Data):
                merged[-1] = Data(merged[-1].data + ev.data)
            else:
                merged.append(ev)
        results[name] = merged
    assert results["whole"] == results["bytewise"] == results["thirds"], results
    return results["whole"]


GET = b"GET /a?x=1 HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n\r\n"


# ---------------------------------------------------------------------------- good requests
def test_simple_get_whole_bytewise_and_with_trailing_data():
    evs = parse_requests(GET)
    assert evs == [Request(b"GET", b"/a?x=1", ((b"Host", b"example.com"), (b"Accept", b"*/*")), b"1.1", True,
                           BODY_NONE, 0, False, False, b"example.com"), EndOfMessage()]
    # trailing data: the start of the next request stays buffered in the parser
    evs = parse_requests(GET + b"GET /b HTTP/1.1\r\nHo")
    assert len(evs) == 2


def test_pipeline_of_mixed_requests():
    data = (GET + b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
            + b"PUT /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\n"
              b"X-Sum: 5\r\nX-Other: y\r\n\r\n" + b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n")
    evs = parse_requests(data, eof=True)
    kinds = [type(e).__name__ for e in evs]
    assert kinds == ["Request", "EndOfMessage", "Request", "Data", "EndOfMessage", "Request", "Data",
                     "EndOfMessage", "Request", "EndOfMessage", "ConnectionClosed"]
    assert evs[2].framing == BODY_LENGTH and evs[2].content_length == 5 and evs[3].data == b"hello"
    assert evs[5].framing == BODY_CHUNKED and evs[6].data == b"abcde"
    assert evs[7].trailers == ((b"X-Sum", b"5"), (b"X-Other", b"y"))


def test_http10_keep_alive_and_close():
    evs = parse_requests(b"GET / HTTP/1.0\r\n\r\n")
    assert evs[0].http_version == b"1.0" and evs[0].keep_alive is False
    evs = parse_requests(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert evs[0].keep_alive is True
    evs = parse_requests(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert evs[0].keep_alive is False


def test_expect_continue_and_upgrade_flags():
    evs = parse_requests(b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\nx")
    assert evs[0].expect_continue
    f = RequestFramer()
    f.receive_data(b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nRAWBYTES")
    evs = drain(f)
    assert evs[0].upgrade and isinstance(evs[1], EndOfMessage)
    assert f.next_event() is PAUSED
    f.receive_data(b"MORE")
    assert f.take_raw() == b"RAWBYTESMORE"


def test_declined_upgrade_resumes_http():
    f = RequestFramer()
    f.receive_data(b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: x\r\nConnection: Upgrade\r\n\r\n" + GET)
    assert len(drain(f)) == 2 and f.next_event() is PAUSED
    f.resume()
    evs = drain(f)
    assert isinstance(evs[0], Request) and evs[0].target == b"/a?x=1"


def test_good_requests_before_a_bad_one_are_delivered_first():
    f = RequestFramer()
    f.receive_data(GET + GET + b"GET / HTTP/1.1\r\nHost : h\r\n\r\n")
    evs = drain(f)
    assert [type(e).__name__ for e in evs[:4]] == ["Request", "EndOfMessage"] * 2
    assert evs[4] == ("error", 400)


# ------------------------------------------------------------------------------ bad requests
BAD = {
    "cl_and_te": (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "te_and_cl": (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n", 400),
    "differing_duplicate_cl": (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
    "equal_duplicate_cl": (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400),
    "cl_list": (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3, 3\r\n\r\nabc", 400),
    "cl_negative": (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n", 400),
    "cl_plus": (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +1\r\n\r\nx", 400),
    "cl_hex": (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0x1\r\n\r\nx", 400),
    "invalid_chunk_size": (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n", 400),
    "chunk_size_space": (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3 \r\nabc\r\n0\r\n\r\n", 400),
    "chunk_size_overflow": (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n", 400),
    "chunk_negative": (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n-3\r\nabc\r\n0\r\n\r\n", 400),
    "chunk_missing_crlf": (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n", 400),
    "te_not_chunked_last": (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400),
    "te_gzip_only": (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
    "te_duplicate": (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "te_in_http10": (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "obs_fold": (b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\r\n b\r\n\r\n", 400),
    "space_before_colon": (b"GET / HTTP/1.1\r\nHost : h\r\n\r\n", 400),
    "tab_before_colon": (b"GET / HTTP/1.1\r\nHost\t: h\r\n\r\n", 400),
    "space_in_name": (b"GET / HTTP/1.1\r\nHost: h\r\nX Y: a\r\n\r\n", 400),
    "leading_space_first_field": (b"GET / HTTP/1.1\r\n Host: h\r\n\r\n", 400),
    "nul_in_value": (b"GET / HTTP/1.1\r\nHost: a\x00b\r\n\r\n", 400),
    "bare_lf": (b"GET / HTTP/1.1\nHost: h\n\n", 400),
    "bare_cr": (b"GET / HTTP/1.1\rHost: h\r\n\r\n", 400),
    "missing_host_11": (b"GET / HTTP/1.1\r\n\r\n", 400),
    "two_hosts": (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "http_2_0": (b"GET / HTTP/2.0\r\nHost: h\r\n\r\n", 505),
    "http_1_2": (b"GET / HTTP/1.2\r\nHost: h\r\n\r\n", 505),
    "garbage_method": (b"G(T / HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    "no_version": (b"GET /\r\nHost: h\r\n\r\n", 505),  # HTTP/0.9 style
    "expect_other": (b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 200-ok\r\nContent-Length: 0\r\n\r\n", 417),
    "url_too_long": (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: h\r\n\r\n", 414),
    "too_many_headers": (b"GET / HTTP/1.1\r\nHost: h\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(101)) + b"\r\n", 431),
    "head_too_large": (b"GET / HTTP/1.1\r\nHost: h\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 1000) for i in range(70)) + b"\r\n", 431),
    "one_huge_header_line": (b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"v" * 70000 + b"\r\n\r\n", 431),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_request_rejected_in_every_feed_mode(name):
    data, status = BAD[name]
    for mode, pieces in feed_modes(data):
        f = RequestFramer()
        evs = []
        for piece in pieces:
            f.receive_data(piece)
        evs = drain(f)
        assert evs and evs[-1] == ("error", status), (mode, evs)
        assert not any(isinstance(e, Request) and e.target == b"/" and isinstance(evs[-1], EndOfMessage) for e in evs)
        # the error sticks: more bytes change nothing
        f.receive_data(GET)
        with pytest.raises(RemoteProtocolError):
            f.next_event()


def test_unbounded_header_stream_is_cut_off_without_buffering_it_all():
    f = RequestFramer(max_head_bytes=4096)
    f.receive_data(b"GET / HTTP/1.1\r\nHost: h\r\nX-Endless: ")
    for _ in range(100):
        f.receive_data(b"a" * 1024)
    assert drain(f) == [("error", 431)]


def test_truncated_request_at_eof_is_an_error():
    f = RequestFramer()
    f.receive_data(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nabc")
    f.receive_data(b"")
    evs = drain(f)
    assert isinstance(evs[0], Request) and evs[-1] == ("error", 400)


def test_clean_eof_between_requests():
    f = RequestFramer()
    f.receive_data(GET)
    f.receive_data(b"")
    evs = drain(f)
    assert isinstance(evs[-1], ConnectionClosed)


# -------------------------------------------------------------------------------- responses
def parse_responses(data: bytes, methods, eof: bool = False):
    results = {}
    for name, pieces in feed_modes(data):
        f = ResponseFramer()
        for m in methods:
            f.expect(m)
        evs = []
        for piece in pieces:
            f.receive_data(piece)
            evs += drain(f)
        if eof:
            f.receive_data(b"")
            evs += drain(f)
        merged = []
        for ev in evs:
            if isinstance(ev, Data) and merged and isinstance(merged[-1], Data):
                merged[-1] = Data(merged[-1].data + ev.data)
            else:
                merged.append(ev)
        results[name] = merged
    assert results["whole"] == results["bytewise"] == results["thirds"], results
    return results["whole"]


def test_response_kinds_in_one_stream():
    data = (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"                 # HEAD: no body
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"
            b"HTTP/1.1 204 No Content\r\n\r\n"
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n"
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
            b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwxyz\r\n0\r\nX-T: 1\r\n\r\n"
            b"HTTP/1.0 200 OK\r\n\r\nuntil the end")
    evs = parse_responses(data, [b"HEAD", b"GET", b"GET", b"GET", b"POST", b"GET"], eof=True)
    kinds = [type(e).__name__ for e in evs]
    assert kinds == ["Response", "EndOfMessage", "Response", "Data", "EndOfMessage", "Response", "EndOfMessage",
                     "Response", "EndOfMessage", "InformationalResponse", "InformationalResponse", "Response", "Data",
                     "EndOfMessage", "Response", "Data", "EndOfMessage", "ConnectionClosed"]
    assert evs[0].framing == BODY_NONE and evs[5].status == 204 and evs[7].status == 304
    assert evs[9].status == 100 and evs[10].headers == ((b"Link", b"</a>"),)
    assert evs[11].framing == BODY_CHUNKED and evs[12].data == b"wxyz" and evs[13].trailers == ((b"X-T", b"1"),)
    assert evs[14].framing == BODY_UNTIL_CLOSE and not evs[14].keep_alive and evs[15].data == b"until the end"


def test_head_must_be_the_only_outstanding_request():
    f = ResponseFramer()
    f.expect(b"GET")
    with pytest.raises(ValueError):
        f.expect(b"HEAD")


def test_head_response_followed_by_more_responses_with_trailing_data():
    data = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 2"
    evs = parse_responses(data, [b"HEAD", b"GET", b"GET"])
    assert [type(e).__name__ for e in evs] == ["Response", "EndOfMessage", "Response", "Data", "EndOfMessage"]


@pytest.mark.parametrize("head,keep", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", True),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", True),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", True),
    (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n", True),
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\n", False),
])
def test_a_response_to_head_has_no_body_and_keeps_its_connection(head, keep):
    # The announced length is not read as a body (RFC 9112 section 6.3); the connection carries
    # on unless the backend says close (nginx answers HEAD with the resource's Content-Length).
    f = ResponseFramer()
    f.expect(b"HEAD")
    f.receive_data(head)
    evs = drain(f)
    assert evs[0].keep_alive is keep and isinstance(evs[1], EndOfMessage) and not f.broken


@pytest.mark.parametrize("method,data", [
    (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
    (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcde"),
])
def test_bytes_beyond_the_responses_asked_for_break_the_connection(method, data):
    f = ResponseFramer()
    f.expect(method)
    f.receive_data(data)
    assert f.broken
    assert drain(f)[-1] == ("error", 502)  # after the events of the complete response


BAD_RESPONSES = {
    "cl_and_te": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "dup_cl": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    "bad_status": b"HTTP/1.1 2x0 OK\r\n\r\n",
    "bad_chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nq\r\n",
    "unsolicited": None,
    # Transfer-Encoding lists where llhttp and RFC 9112 could disagree on the framing, or that
    # RFC 9112 section 6.1 forbids (chunked applied twice or not last), are not relayed.
    "te_chunked_not_last": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
    "te_chunked_twice": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked, chunked\r\n\r\n0\r\n\r\n",
    "te_chunked_in_two_fields": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
                                b"0\r\n\r\n",
    "te_trailing_comma": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked,\r\n\r\n0\r\n\r\n",
    "te_chunked_params": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked;x=1\r\n\r\n0\r\n\r\n",
    "te_quoted_comma": b'HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip;q="a,chunked"\r\n\r\n0\r\n\r\n',
}


@pytest.mark.parametrize("name", sorted(BAD_RESPONSES))
def test_bad_responses_are_502(name):
    f = ResponseFramer()
    if name == "unsolicited":
        f.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    else:
        f.expect(b"GET")
        f.receive_data(BAD_RESPONSES[name])
    assert drain(f)[-1] == ("error", 502)


# A gzip body holding bytes that look like chunk framing: relayed as they are.
GZ = gzip.compress(b"some text\r\n0\r\n\r\n" * 50)


@pytest.mark.parametrize("te,codings", [
    (b"Transfer-Encoding: gzip, chunked", b"gzip"),
    (b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked", b"gzip"),  # one list over two fields
    (b"transfer-encoding: x-gzip;level=9 ,deflate,\tCHUNKED", b"x-gzip;level=9, deflate"),
    (b"Transfer-Encoding: identity, chunked", b""),  # RFC 2616's "no coding"
])
def test_transfer_codings_before_a_final_chunked_are_kept_and_the_body_framed_by_it(te, codings):
    # RFC 9112 section 6.1: chunked last frames the body; the codings before it stay on it.
    n = len(GZ) // 2
    data = (b"HTTP/1.1 200 OK\r\n" + te + b"\r\n\r\n" + encode_chunk(GZ[:n]) + encode_chunk(GZ[n:])
            + encode_last_chunk() + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    evs = parse_responses(data, [b"GET", b"GET"])
    assert evs[0].framing == BODY_CHUNKED and evs[0].keep_alive and evs[0].transfer_codings == codings
    assert evs[1:3] == [Data(GZ), EndOfMessage()]
    assert evs[3].framing == BODY_LENGTH and evs[3].transfer_codings == b"" and evs[4:] == [Data(b"ok"), EndOfMessage()]


def test_transfer_codings_without_a_final_chunked_run_to_the_close():
    # RFC 9112 section 6.3, item 4: in a response, a Transfer-Encoding whose last coding is not
    # chunked means the body ends where the connection does.
    evs = parse_responses(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n" + GZ, [b"GET"], eof=True)
    assert evs[0].framing == BODY_UNTIL_CLOSE and not evs[0].keep_alive and evs[0].transfer_codings == b"gzip"
    assert evs[1:] == [Data(GZ), EndOfMessage(), ConnectionClosed()]


@pytest.mark.parametrize("te,keep", [
    (b"gzip, chunked", True),
    (b"gzip", False),  # llhttp takes it as framed by the close: the connection is not reused
])
def test_a_response_to_head_announcing_transfer_codings_has_no_body(te, keep):
    f = ResponseFramer()
    f.expect(b"HEAD")
    f.receive_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + te + b"\r\n\r\n")
    evs = drain(f)
    assert evs[0].framing == BODY_NONE and evs[0].keep_alive is keep and evs[1] == EndOfMessage() and not f.broken
    f.expect(b"GET")
    f.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert drain(f)[1:] == [Data(b"ok"), EndOfMessage()]


def test_truncated_response_is_an_error_but_until_close_is_not():
    f = ResponseFramer()
    f.expect(b"GET")
    f.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    f.receive_data(b"")
    assert drain(f)[-1] == ("error", 502)
    f = ResponseFramer()
    f.expect(b"HEAD")
    f.receive_data(b"HTTP/1.1 200 OK\r\nConte")
    f.receive_data(b"")
    assert drain(f)[-1] == ("error", 502)


@pytest.mark.parametrize("method", [b"GET", b"HEAD"])
def test_101_pauses_and_hands_over_raw_bytes(method):
    f = ResponseFramer()
    f.expect(method)
    f.receive_data(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x02hi")
    evs = drain(f)
    assert isinstance(evs[0], InformationalResponse) and evs[0].status == 101
    assert f.next_event() is PAUSED and f.take_raw() == b"\x81\x02hi"


# ----------------------------------------------------------------------------- send side
def test_encode_request_head_drops_hop_by_hop_and_reframes():
    req = Request(b"POST", b"/x", ((b"Host", b"h"), (b"Connection", b"close, X-Secret"), (b"X-Secret", b"1"),
                                   (b"Keep-Alive", b"5"), (b"Transfer-Encoding", b"chunked"), (b"X-Keep", b"y")),
                  framing=BODY_CHUNKED, host=b"h")
    head = encode_request_head(req)
    assert head == b"POST /x HTTP/1.1\r\nHost: h\r\nX-Keep: y\r\nTransfer-Encoding: chunked\r\n\r\n"
    f = RequestFramer()
    f.receive_data(head + encode_chunk(b"abc") + encode_last_chunk(((b"T", b"1"),)))
    evs = drain(f)
    assert evs[1] == Data(b"abc") and evs[2] == EndOfMessage(((b"T", b"1"),))


def test_encode_request_head_replaces_what_the_splicer_sets_and_keeps_host():
    fwd = b"X-Forwarded-For: 10.0.0.9\r\nX-Forwarded-Proto: http\r\n"
    # A plain-HTTP client's own X-Forwarded-Proto would be read first by many backends.
    req = Request(b"GET", b"/", ((b"Host", b"h"), (b"x-forwarded-proto", b"https"), (b"X-Forwarded-For", b"1.2.3.4")), host=b"h")
    assert encode_request_head(req, extra=fwd) == \
        b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 1.2.3.4\r\n" + fwd + b"\r\n"
    assert b"x-forwarded-proto: https" in encode_request_head(req)  # not forwarding: untouched
    # An empty Host is replaced by the backend's address, not sent beside it.
    req = Request(b"GET", b"/", ((b"Host", b""), (b"X", b"1")), host=b"")
    assert encode_request_head(req, default_host=b"10.0.0.1:80") == b"GET / HTTP/1.1\r\nX: 1\r\nHost: 10.0.0.1:80\r\n\r\n"
    # Connection may name fields to drop, but never Host (an HTTP/1.1 request must carry it).
    req = Request(b"GET", b"/", ((b"Host", b"a"), (b"Connection", b"host, X-Drop"), (b"X-Drop", b"1")), host=b"a")
    assert encode_request_head(req) == b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"


def test_encode_response_head_names_the_backends_transfer_codings_before_chunked():
    resp = Response(200, b"OK", ((b"Transfer-Encoding", b"gzip, chunked"), (b"X", b"1")), framing=BODY_CHUNKED,
                    transfer_codings=b"gzip")
    head = encode_response_head(resp, framing=BODY_CHUNKED)
    assert head == b"HTTP/1.1 200 OK\r\nX: 1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
    assert encode_response_head(resp, framing=BODY_NONE, head_request=True) == b"HTTP/1.1 200 OK\r\nX: 1\r\n\r\n"
    f = ResponseFramer()  # what the client reads: the same codings, the same body bytes
    f.expect(b"GET")
    f.receive_data(head + encode_chunk(GZ) + encode_last_chunk())
    evs = drain(f)
    assert evs[0].transfer_codings == b"gzip" and evs[1:] == [Data(GZ), EndOfMessage()]


def test_encode_response_head_variants():
    resp = Response(200, b"OK", ((b"Content-Length", b"7"), (b"Connection", b"keep-alive"), (b"X", b"1")))
    assert encode_response_head(resp, framing=BODY_LENGTH, content_length=7) == \
        b"HTTP/1.1 200 OK\r\nX: 1\r\nContent-Length: 7\r\n\r\n"
    assert encode_response_head(resp, framing=BODY_NONE, head_request=True, close=True) == \
        b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nX: 1\r\nConnection: close\r\n\r\n"
    assert b"Connection: keep-alive" in encode_response_head(resp, framing=BODY_LENGTH, content_length=7,
                                                             keep_alive_10=True)
    r = simple_response(502, "boom", close=True)
    f = ResponseFramer()
    f.expect(b"GET")
    f.receive_data(r)
    evs = drain(f)
    assert evs[0].status == 502 and evs[1].data == b"boom\n" and not evs[0].keep_alive


# ------------------------------------------------------------------------------- fuzzing
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=50))
def test_fuzz_random_bytes_never_crash(data, step):
    f = RequestFramer(max_head_bytes=2048, max_headers=20, max_url_bytes=256)
    for i in range(0, len(data), step):
        f.receive_data(data[i:i + step])
        drain(f)
    f.receive_data(b"")
    drain(f)
    r = ResponseFramer(max_head_bytes=2048, max_headers=20)
    r.expect(b"HEAD")
    r.expect(b"GET")
    for i in range(0, len(data), step):
        r.receive_data(data[i:i + step])
        drain(r)


_tokens = st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"/", b"/a", b" ", b"\r\n", b"\n", b"HTTP/1.1", b"HTTP/1.0",
                           b"Host: h", b"Content-Length: 3", b"Content-Length: 0", b"Transfer-Encoding: chunked",
                           b":", b"\t", b"0", b"3", b"abc", b"\r\n\r\n", b"Connection: close", b"Upgrade: x", b"\x00"])


@settings(max_examples=300, deadline=None)
@given(st.lists(_tokens, max_size=40), st.integers(min_value=1, max_value=7))
def test_fuzz_structured_input_is_split_invariant(tokens, step):
    """Near-HTTP input: never a crash, and the events never depend on how the bytes were split."""
    data = b"".join(tokens)
    whole = RequestFramer()
    if data:  # b"" would mean end of input
        whole.receive_data(data)
    a = drain(whole)
    split = RequestFramer()
    b = []
    for i in range(0, len(data), step):
        split.receive_data(data[i:i + step])
        b += drain(split)
        if b and b[-1] == ("error", 400) or b and isinstance(b[-1], tuple):
            break
    merge = lambda evs: [e for e in evs if not isinstance(e, Data)]  # noqa: E731
    assert merge(a) == merge(b)
    assert b"".join(e.data for e in a if isinstance(e, Data)) == b"".join(e.data for e in b if isinstance(e, Data))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([b"GET", b"POST", b"HEAD", b"DELETE"]),
                          st.binary(min_size=0, max_size=40), st.booleans()), min_size=1, max_size=8),
       st.integers(min_value=1, max_value=13))
def test_round_trip_pipelines(msgs, step):
    """Requests encoded by the send side parse back to the same method, target and body."""
    wire = b""
    for method, body, chunked in msgs:
        framing = BODY_CHUNKED if chunked else (BODY_LENGTH if body else BODY_NONE)
        req = Request(method, b"/p", ((b"Host", b"h"),), framing=framing, content_length=len(body), host=b"h")
        wire += encode_request_head(req)
        if chunked:
            wire += (encode_chunk(body) if body else b"") + encode_last_chunk()
        else:
            wire += body
    f = RequestFramer()
    evs = []
    for i in range(0, len(wire), step):
        f.receive_data(wire[i:i + step])
        evs += drain(f)
    got, body = [], b""
    for ev in evs:
        if isinstance(ev, Request):
            method = ev.method
            body = b""
        elif isinstance(ev, Data):
            body += ev.data
        elif isinstance(ev, EndOfMessage):
            got.append((method, body))
    assert got == [(m, b) for m, b, _ in msgs]


def test_atheris_fuzz_smoke(tmp_path):
    """A short coverage-guided run of fuzz_http_framer.py (atheris comes with the `dev` extra)."""
    from tests.splicer.atheris_smoke import run_atheris_smoke

    run_atheris_smoke("fuzz_http_framer.py", tmp_path, "-runs=4000")
