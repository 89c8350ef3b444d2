"""Sans-IO HTTP/1.1 framers for the splicer, built on httptools (llhttp).

What this file may know: bytes in, events out, and the framing rules of RFC 9112. What it may
not know: sockets, asyncio, clocks, routing, pools. The asyncio shell (`http_proxy.py`) feeds
bytes with `receive_data()` and drains `next_event()` until it returns `NEED_DATA` (more bytes
wanted) or `PAUSED` (an Upgrade/CONNECT was seen; the bytes after it are held raw, see
`take_raw()` and `resume()`), in the style of h11.

Two framers:

* `RequestFramer` reads a client connection: `Request`, `Data`*, `EndOfMessage`, repeatedly
  (pipelining), then `ConnectionClosed`.
* `ResponseFramer` reads a backend connection. It must be told the method of each request sent
  (`expect(method)`), because a response to HEAD has no body whatever its headers say and
  llhttp cannot be told so: such heads are fed to llhttp only up to their blank line.

Parsing is llhttp's (strict mode: it already rejects Content-Length together with
Transfer-Encoding, duplicate Content-Length, bad chunk sizes, obs-fold, whitespace before the
colon, bare CR/LF line ends, non-final `chunked`). This file adds what llhttp leaves to the
user: limits on the request target, header count and head size (RFC 9112 §2.3, §5; 414/431),
the HTTP version (505), a missing or repeated Host (RFC 9112 §3.2), Transfer-Encoding in an
HTTP/1.0 request (RFC 9112 §6.1), and it turns every rejection into one `RemoteProtocolError`
carrying the status to answer with. Inside, callbacks raise `_Reject`; llhttp stops at once and
the error surfaces at the receive boundary (`receive_data`), after the events of the complete
requests before it (so the good part of a pipeline is still served before the 400).

Events are frozen dataclasses with `__slots__` on the common base `Event`.

Bounds: a head (request line + fields) may grow to `max_head_bytes` (64 KiB by default, as
Apache's 8 KiB-per-line x 100 fields is the most common server bound and HAProxy's default
tune.bufsize is 16 KiB; 64 KiB leaves room for large cookies). The count is exact for completed
fields; a field still being received is bounded by one read of the shell on top.
"""
from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from typing import Final, Iterable

import httptools
from httptools.parser.errors import HttpParserCallbackError, HttpParserError, HttpParserUpgrade

__all__ = [
    "NEED_DATA", "PAUSED", "BODY_NONE", "BODY_LENGTH", "BODY_CHUNKED", "BODY_UNTIL_CLOSE",
    "Event", "Request", "InformationalResponse", "Response", "Data", "EndOfMessage", "ConnectionClosed",
    "RemoteProtocolError", "IncompleteResponse", "RequestFramer", "ResponseFramer",
    "encode_request_head", "encode_response_head", "encode_chunk", "encode_last_chunk", "simple_response",
    "SAFE_METHODS", "IDEMPOTENT_METHODS",
]


class _Sentinel:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA: Final = _Sentinel("NEED_DATA")
PAUSED: Final = _Sentinel("PAUSED")

# How a message's body is delimited.
BODY_NONE: Final = 0         # no body (GET without framing headers, HEAD/204/304 responses)
BODY_LENGTH: Final = 1       # Content-Length
BODY_CHUNKED: Final = 2      # Transfer-Encoding: chunked
BODY_UNTIL_CLOSE: Final = 3  # responses only: body ends when the backend closes

# Safe methods (RFC 9110 section 9.2.1): their requests may run at once over several pooled
# connections (and be pipelined to a backend). Everything else is a barrier (issue 3: POST, PUT,
# PATCH, DELETE wait for earlier requests and hold back later ones).
SAFE_METHODS: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})
# Idempotent methods (RFC 9110 section 9.2.2): the safe ones, PUT and DELETE. Only these are sent
# again after the backend closed a kept-alive connection under them (`Exchange.on_backend_failure`);
# they do not change the scheduling, which SAFE_METHODS decides (PUT and DELETE stay barriers).
IDEMPOTENT_METHODS: Final = SAFE_METHODS | frozenset({b"PUT", b"DELETE"})

Headers = tuple[tuple[bytes, bytes], ...]


# --------------------------------------------------------------------------------- events
@dataclass(frozen=True, slots=True)
class Event:
    """Base of all framer events."""


@dataclass(frozen=True, slots=True)
class Request(Event):
    """A request head. `framing` is one of BODY_NONE, BODY_LENGTH, BODY_CHUNKED."""

    method: bytes
    target: bytes
    headers: Headers
    http_version: bytes = b"1.1"
    keep_alive: bool = True
    framing: int = BODY_NONE
    content_length: int = 0
    upgrade: bool = False          # Upgrade header or CONNECT: bytes after the head are not HTTP
    expect_continue: bool = False  # Expect: 100-continue
    host: bytes = b""
    zero_length: bool = False      # no body, and the client said so with `Content-Length: 0` (forwarded)


@dataclass(frozen=True, slots=True)
class InformationalResponse(Event):
    """A 1xx response (100 Continue, 101 Switching Protocols, 103 Early Hints...)."""

    status: int
    reason: bytes
    headers: Headers


@dataclass(frozen=True, slots=True)
class Response(Event):
    """A final response head; `framing` is one of the BODY_* constants. `keep_alive`: the
    connection may carry another request after this response. `transfer_codings`: the
    transfer codings the backend applied other than a final `chunked` (b"gzip" for
    `Transfer-Encoding: gzip, chunked`; b"" for none), which the body bytes still carry: they
    must be named to the client in front of the `chunked` the splicer writes."""

    status: int
    reason: bytes
    headers: Headers
    http_version: bytes = b"1.1"
    keep_alive: bool = True
    framing: int = BODY_NONE
    content_length: int = 0
    transfer_codings: bytes = b""


@dataclass(frozen=True, slots=True)
class Data(Event):
    """Body bytes (chunked framing already removed)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class EndOfMessage(Event):
    """End of a message; `trailers` holds the trailer fields of a chunked body."""

    trailers: Headers = ()


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """The peer closed its side after a complete message."""


_EOM: Final = EndOfMessage()
_CLOSED: Final = ConnectionClosed()


class RemoteProtocolError(Exception):
    """The peer broke HTTP/1.1; `status` is what to answer a client with (400, 414, 431, 505)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class IncompleteResponse(RemoteProtocolError):
    """A response had begun when it failed (the backend closed in the middle of it, a 101
    without Upgrade, or a head that failed to parse after its status line): the backend acted
    on the request, which is therefore never sent again."""


class _Reject(Exception):
    """Raised inside llhttp callbacks; becomes RemoteProtocolError at the receive boundary
    (IncompleteResponse when `began`: a response had begun, so the backend acted on the request)."""

    def __init__(self, message: str, status: int = 400, began: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.began = began


def _origin_form(url: bytes, headers: list[tuple[bytes, bytes]]) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    """An absolute-form target (`GET http://host/path`) as origin-form, its host as the Host.

    RFC 9112 section 3.2.2: the target's host wins over a Host field; routing and the backend
    both see it.
    """
    rest = url.split(b"://", 1)[1]
    cut = len(rest)
    for sep in (b"/", b"?"):
        i = rest.find(sep)
        if 0 <= i < cut:
            cut = i
    authority = rest[:cut].rsplit(b"@", 1)[-1]
    if not authority:
        raise _Reject("absolute-form request target without a host")
    path = rest[cut:] or b"/"
    if path[:1] == b"?":
        path = b"/" + path
    headers = [(n, v) for n, v in headers if n.lower() != b"host"] + [(b"Host", authority)]
    return path, headers, authority


def _only_chunked(value: bytes) -> bool:
    """True if a Transfer-Encoding field value is just `chunked` (any case, blanks around)."""
    return value.strip().lower() == b"chunked"


_TCHAR: Final = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def _response_codings(value: bytes) -> tuple[bytes, bool]:
    """A response's Transfer-Encoding list (its fields joined by commas) as (the codings
    applied before a final `chunked`, or all of them when there is none; is `chunked` final).

    Framing stays llhttp's: this is strict where llhttp and RFC 9112 could disagree on which
    coding is final (llhttp takes `chunked,` with a trailing empty element, or `chunked;x=1`,
    as not chunked), and the response is refused (502) instead of being relayed under a
    different framing: empty list elements, quoted strings, a coding that is not a token, and
    `chunked` anywhere but last or with parameters (it is applied once, last: section 6.1).
    `identity` (RFC 2616's "no coding", no longer a transfer coding) is left out.
    """
    elements = [e.strip(b" \t") for e in value.split(b",")]
    codings = []
    for i, element in enumerate(elements):
        name = element.split(b";", 1)[0].rstrip(b" \t")
        if not name or b'"' in element or not _TCHAR.issuperset(name):
            raise _Reject(f"backend sent an unparseable Transfer-Encoding {value.decode('latin-1')[:60]!r}", 502)
        lname = name.lower()
        if lname == b"chunked":
            if i != len(elements) - 1 or element != name:
                raise _Reject(f"backend sent Transfer-Encoding {value.decode('latin-1')[:60]!r}: chunked "
                              "must be the last coding, once (RFC 9112 section 6.1)", 502)
            return b", ".join(codings), True
        if lname != b"identity":
            codings.append(element)
    return b", ".join(codings), False


def _boundary_error(exc: HttpParserError) -> RemoteProtocolError:
    """The single place where parser failures become RemoteProtocolError."""
    inner = exc.__context__ if isinstance(exc, HttpParserCallbackError) else None
    if isinstance(inner, _Reject):
        return (IncompleteResponse if inner.began else RemoteProtocolError)(str(inner), inner.status)
    if isinstance(inner, Exception):  # a bug in a callback: report it, but as a protocol error
        return RemoteProtocolError(f"internal framing error: {inner!r}", 400)
    reason = str(exc) or type(exc).__name__
    # llhttp rejects unknown versions itself (e.g. HTTP/1.2); RFC 9110 section 15.6.6 says 505.
    return RemoteProtocolError(reason, 505 if reason == "Invalid HTTP version" else 400)


def _tokens(value: bytes) -> list[bytes]:
    return [t.strip().lower() for t in value.split(b",") if t.strip()]


# --------------------------------------------------------------------------- request side
class _Framer:
    """The event queue both framers share: `next_event()` hands out what parsing produced, then
    raises the held error, or says PAUSED (after an Upgrade/CONNECT head or a 101), closed, or
    NEED_DATA; `take_raw()` gives the bytes held back after a PAUSED head (for a tunnel)."""

    def next_event(self) -> Event | _Sentinel:
        """Next event, or NEED_DATA / PAUSED; raises RemoteProtocolError once the events before it are out
        (status 400-class for requests, 502 for responses)."""
        if self._events:
            return self._events.popleft()
        if self._error is not None:
            raise self._error
        if self._paused:
            return PAUSED
        if self._eof:
            return _CLOSED
        return NEED_DATA

    _quiet = 0  # bytes fed since the head that produced no event (see _bound_quiet)

    def _bound_quiet(self, n: int, events_before: int, status: int) -> None:
        """Bound what llhttp holds back after a head until it is complete: chunk-size lines and
        trailer fields (a 100 MB trailer value would otherwise be buffered whole). Body bytes
        come out as they arrive, so only these can pile up without producing an event."""
        if len(self._events) != events_before or not self._in_message or self._in_head:
            self._quiet = 0
            return
        self._quiet += n
        if self._quiet > self.max_head_bytes:
            self._error = RemoteProtocolError(
                f"more than {self.max_head_bytes} bytes of chunk framing or trailer fields", status)

    def take_raw(self) -> bytes:
        """After PAUSED: the bytes that followed the Upgrade/CONNECT head or the 101 response head."""
        raw = bytes(self._raw)
        self._raw.clear()
        return raw


class RequestFramer(_Framer):
    """Parses the requests of one client connection (pipelined, keep-alive)."""

    def __init__(self, max_head_bytes: int = 64 * 1024, max_headers: int = 100, max_url_bytes: int = 8 * 1024) -> None:
        self.max_head_bytes = max_head_bytes
        self.max_headers = max_headers
        self.max_url_bytes = max_url_bytes
        self._parser = httptools.HttpRequestParser(self)
        self._events: deque[Event] = deque()
        self._error: RemoteProtocolError | None = None
        self._paused = False
        self._raw = bytearray()
        self._eof = False
        self._in_message = False
        self._new_message()

    def _new_message(self) -> None:
        self._in_head = False
        self._head_spans = False  # head began in an earlier receive_data call
        self._partial = 0
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._trailers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._host: bytes | None = None
        self._hosts = 0
        self._te = False
        self._cl = -1
        self._expect = False

    # -- llhttp callbacks (called from feed_data) --------------------------------------
    def on_message_begin(self) -> None:
        self._new_message()
        self._in_head = True
        self._in_message = True

    def on_url(self, part: bytes) -> None:
        url = self._url + part if self._url else part
        if len(url) > self.max_url_bytes:
            raise _Reject(f"request target longer than {self.max_url_bytes} bytes", 414)
        self._url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:  # fields after a chunked body are trailers
            if len(self._trailers) >= self.max_headers:
                raise _Reject(f"more than {self.max_headers} trailer fields", 431)
            self._trailers.append((name, value))
            return
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes + len(self._url) > self.max_head_bytes:
            raise _Reject(f"request head larger than {self.max_head_bytes} bytes", 431)
        headers = self._headers
        if len(headers) >= self.max_headers:
            raise _Reject(f"more than {self.max_headers} header fields", 431)
        headers.append((name, value))
        n = len(name)
        # Only a few names matter for framing; check the length first to skip lower() mostly.
        if n == 4 or n == 6 or n == 14 or n == 17:
            lname = name.lower()
            if lname == b"host":
                self._hosts += 1
                if self._hosts > 1:
                    raise _Reject("more than one Host header field (RFC 9112 section 3.2)")
                self._host = value
            elif lname == b"content-length":
                self._cl = int(value)  # llhttp has checked the digits
            elif lname == b"transfer-encoding":
                if not _only_chunked(value):
                    if value.rsplit(b",", 1)[-1].strip().lower() != b"chunked":
                        raise _Reject("Transfer-Encoding whose last coding is not chunked: the body length "
                                      "cannot be known (RFC 9112 section 6.3)")
                    # The body is re-framed on its way to the backend, so a coding we would have
                    # to pass through (gzip, chunked) is refused instead of silently dropped.
                    # Not forwarded with its list kept either, unlike a response's codings: a
                    # request goes on pooled connections shared by all clients, and a backend
                    # that does not take `gzip, chunked` as chunked (many match the value
                    # `chunked` exactly) would read the chunks as the next requests (request
                    # smuggling). RFC 9112 section 6.1 says a server SHOULD answer 501; nginx does.
                    raise _Reject(f"Transfer-Encoding {value.decode('latin-1')[:60]!r} is not supported "
                                  "(only chunked; RFC 9112 section 6.1)", 501)
                self._te = True
            elif lname == b"expect":
                if value.strip().lower() == b"100-continue":
                    self._expect = True
                else:
                    raise _Reject(f"unsupported Expect: {value.decode('latin-1')!r}", 417)

    def on_headers_complete(self) -> None:
        p = self._parser
        self._in_head = False
        version = p.get_http_version()
        if version == "1.1":
            if self._host is None:
                raise _Reject("HTTP/1.1 request without a Host header field (RFC 9112 section 3.2)")
            hv = b"1.1"
        elif version == "1.0":
            if self._te:
                raise _Reject("Transfer-Encoding in an HTTP/1.0 request (RFC 9112 section 6.1)")
            hv = b"1.0"
        else:
            raise _Reject(f"HTTP version {version} not supported", 505)
        if self._te:
            framing, length = BODY_CHUNKED, 0
        elif self._cl > 0:
            framing, length = BODY_LENGTH, self._cl
        else:
            framing, length = BODY_NONE, 0
        if framing != BODY_NONE and p.should_upgrade():
            # Its body would be read as tunnel bytes or as a next request: refused, and the
            # connection closes, so no byte of it is ever taken for a request.
            raise _Reject("an Upgrade or CONNECT request with a body is not supported")
        url, headers, host = self._url, self._headers, self._host or b""
        scheme = url[:8].lower()
        if url[:1] != b"/" and (scheme.startswith(b"http://") or scheme == b"https://"):
            url, headers, host = _origin_form(url, headers)
        self._events.append(Request(
            p.get_method(), url, tuple(headers), hv, p.should_keep_alive(), framing, length,
            p.should_upgrade(), self._expect, host, self._cl == 0))

    def on_body(self, data: bytes) -> None:
        self._events.append(Data(data))

    def on_message_complete(self) -> None:
        self._in_message = False
        self._events.append(EndOfMessage(tuple(self._trailers)) if self._trailers else _EOM)

    # -- public API --------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the client; b"" means the client closed its sending side."""
        if self._error is not None or self._eof:
            return
        if self._paused:
            self._raw += data
            if not data:
                self._eof = True
            return
        if not data:
            self._eof = True
            if self._in_message:
                self._error = RemoteProtocolError("client closed the connection in the middle of a request")
            return
        before = len(self._events)
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade as up:
            self._paused = True
            self._raw += data[up.args[0]:]
            return
        except HttpParserError as exc:
            self._error = _boundary_error(exc)
            return
        self._bound_quiet(len(data), before, 431)
        if self._in_head:
            if self._head_spans:
                self._partial += len(data)
                if self._partial + self._head_bytes > self.max_head_bytes:
                    self._error = RemoteProtocolError(f"request head larger than {self.max_head_bytes} bytes", 431)
            else:
                self._head_spans = True

    @property
    def in_head(self) -> bool:
        """True while a request head has begun and is not complete."""
        return self._in_head

    def resume(self) -> None:
        """After PAUSED and a declined upgrade: parse the held bytes as HTTP again."""
        if not self._paused:
            return
        self._paused = False
        self._parser = httptools.HttpRequestParser(self)
        self._in_message = False
        raw = self.take_raw()
        eof = self._eof
        self._eof = False
        if raw:
            self.receive_data(raw)
        if eof:
            self.receive_data(b"")

    @property
    def paused(self) -> bool:
        return self._paused


# -------------------------------------------------------------------------- response side
# llhttp's reasons for failing a response within its status line, before its status code is
# complete: bytes failing so are not the start of a response (`ResponseFramer._began`). ("Invalid
# response status" is not one: llhttp 9 raises it after the three digits, e.g. for
# "HTTP/1.1 200\n" or "HTTP/1.1 2000", when the new code is already set, so the response began.)
_START_LINE_ERRORS: Final = frozenset({
    "Expected HTTP/, RTSP/ or ICE/", "Invalid major version", "Expected dot", "Invalid minor version",
    "Expected space after version", "Invalid HTTP version", "Invalid status code",
})
# The start of a status line, for a response to HEAD whose head is cut out by this framer.
_STATUS_START: Final = re.compile(rb"[\r\n]*HTTP/[0-9]\.[0-9] [0-9]{3}[ \r]")


class ResponseFramer(_Framer):
    """Parses the responses of one backend connection, given the methods of the requests sent."""

    def __init__(self, max_head_bytes: int = 64 * 1024, max_headers: int = 100) -> None:
        self.max_head_bytes = max_head_bytes
        self.max_headers = max_headers
        self._parser = httptools.HttpResponseParser(self)
        self._events: deque[Event] = deque()
        self._methods: deque[bytes] = deque()
        self._error: RemoteProtocolError | None = None
        self._eof = False
        self._paused = False
        self._raw = bytearray()
        self._head_buf = bytearray()  # HEAD mode: bytes of a head not yet complete
        self._in_message = False
        self._framing = BODY_NONE
        self._new_message()

    def _new_message(self) -> None:
        self._in_head = False
        self._head_spans = False
        self._partial = 0
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._trailers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._te = False
        self._te_values: list[bytes] = []
        self._cl = -1
        self._informational = False
        self._head_done = False
        self._status_seen = False  # the status line parsed (see `_began`)

    def expect(self, method: bytes) -> None:
        """Announce that a request with `method` was sent; responses are matched in order.

        A HEAD request must be the only one outstanding (the splicer sends one request at a
        time per pooled connection): llhttp cannot be told where a HEAD response ends, so its
        head is cut out by this framer, which works only when it is the first one expected.
        """
        if self._methods and method == b"HEAD":
            raise ValueError("a HEAD request must be the only request outstanding on a connection")
        self._methods.append(method)

    # -- llhttp callbacks --------------------------------------------------------------
    def on_message_begin(self) -> None:
        if not self._methods:
            raise _Reject("response without a request", 502)
        self._new_message()
        self._in_head = True
        self._in_message = True

    def on_status(self, part: bytes) -> None:
        self._status_seen = True
        self._reason += part

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            if len(self._trailers) >= self.max_headers:
                raise _Reject(f"more than {self.max_headers} trailer fields", 502)
            self._trailers.append((name, value))
            return
        self._status_seen = True
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self.max_head_bytes:
            raise _Reject(f"response head larger than {self.max_head_bytes} bytes", 502)
        if len(self._headers) >= self.max_headers:
            raise _Reject(f"more than {self.max_headers} response header fields", 502)
        self._headers.append((name, value))
        n = len(name)
        if n == 14 or n == 17:
            lname = name.lower()
            if lname == b"content-length":
                self._cl = int(value)
            elif lname == b"transfer-encoding":
                # checked as one list once the head is complete (a coding list may span fields)
                self._te_values.append(value)
                self._te = True

    def on_headers_complete(self) -> None:
        p = self._parser
        self._in_head = False
        self._status_seen = True
        status = p.get_status_code()
        headers = tuple(self._headers)
        if status < 200:
            if status == 101 and not p.should_upgrade():
                # RFC 9110 section 7.8: a 101 names the new protocol in Upgrade, with the upgrade
                # option in Connection. Without them llhttp does not hand over the bytes after
                # the head, and they cannot be told from a next response: refused (502) before
                # anything of it reaches the client, never half a tunnel.
                raise _Reject("101 Switching Protocols without `Upgrade` and `Connection: upgrade` "
                              "(RFC 9110 section 7.8)", 502, began=True)
            self._informational = True
            self._events.append(InformationalResponse(status, self._reason, headers))
            return
        method = self._methods[0]
        codings, chunked = b"", False
        if self._te:
            codings, chunked = _response_codings(b",".join(self._te_values))
        if method == b"HEAD" or status == 204 or status == 304:
            framing, length = BODY_NONE, 0
        elif chunked:
            framing, length = BODY_CHUNKED, 0
        elif self._te:
            # Codings without a final chunked (`Transfer-Encoding: gzip`): the body runs to the
            # backend's close (RFC 9112 section 6.3, item 4; llhttp reads it so). Relayed as is,
            # re-framed by the splicer's chunked (`gzip, chunked`) to HTTP/1.1 clients.
            framing, length = BODY_UNTIL_CLOSE, 0
        elif self._cl >= 0:
            framing, length = (BODY_LENGTH, self._cl) if self._cl else (BODY_NONE, 0)
        else:
            framing, length = BODY_UNTIL_CLOSE, 0
        self._framing = framing
        version = p.get_http_version()
        hv = b"1.1" if version == "1.1" else b"1.0"
        keep = p.should_keep_alive() and framing != BODY_UNTIL_CLOSE
        # A response to HEAD that announces a body keeps its connection (as HAProxy and nginx do):
        # closing it cost a reconnect per HEAD against every correct backend (nginx sends the
        # resource's Content-Length on HEAD; HEAD throughput fell from 16k to 5.7k req/s). Bytes a
        # broken backend sends after it anyway are caught when they come with the response or to
        # an idle connection (`broken`); later ones are read as the next response, which fails
        # to parse unless they form a whole response (docs/splicer-http.md, Limits).
        self._events.append(Response(status, self._reason, headers, hv, keep, framing, length, codings))
        if method == b"HEAD":
            self._head_done = True

    def on_body(self, data: bytes) -> None:
        self._events.append(Data(data))

    def on_message_complete(self) -> None:
        if self._informational:
            self._in_message = False
            self._informational = False
            return
        self._in_message = False
        # llhttp completes a response to HEAD itself when it sees no body is coming (204, 304,
        # Content-Length: 0): then `_feed_head_mode` has nothing left to finish.
        self._head_done = False
        self._methods.popleft()
        self._events.append(EndOfMessage(tuple(self._trailers)) if self._trailers else _EOM)

    # -- public API --------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the backend; b"" means the backend closed."""
        if self._error is not None or self._eof:
            return
        if self._paused:
            self._raw += data
            if not data:
                self._eof = True
            return
        if not data:
            self._receive_eof()
            return
        while data and self._error is None and not self._paused:
            if self._methods and self._methods[0] == b"HEAD":
                data = self._feed_head_mode(data)
            else:
                self._feed(data)
                data = b""

    def _feed(self, data: bytes) -> None:
        before = len(self._events)
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade as up:
            self._paused = True
            self._raw += data[up.args[0]:]
            return
        except HttpParserError as exc:
            err = _boundary_error(exc)
            err.status = 502
            if not isinstance(err, IncompleteResponse) and self._began(exc):
                err = IncompleteResponse(str(err), 502)
            self._error = err
            return
        self._bound_quiet(len(data), before, 502)
        if self._in_head:
            if self._head_spans:
                self._partial += len(data)
                if self._partial + self._head_bytes > self.max_head_bytes:
                    self._error = (IncompleteResponse if self._began(None) else RemoteProtocolError)(
                        f"response head larger than {self.max_head_bytes} bytes", 502)
            else:
                self._head_spans = True

    def _feed_head_mode(self, data: bytes) -> bytes:
        """Feed a response to HEAD only up to its blank line; return the bytes after it."""
        buf = self._head_buf
        start = max(0, len(buf) - 3)
        buf += data
        end = buf.find(b"\r\n\r\n", start)
        if end < 0:
            if len(buf) > self.max_head_bytes:
                self._error = (IncompleteResponse if _STATUS_START.match(buf) else RemoteProtocolError)(
                    f"response head larger than {self.max_head_bytes} bytes", 502)
            return b""
        end += 4
        head, rest = bytes(buf[:end]), bytes(buf[end:])
        buf.clear()
        self._feed(head)
        if self._paused:
            # a 101: what came after its head is the tunnel's, taken with `take_raw`
            self._raw += rest
            return b""
        if self._head_done:
            # llhttp now waits for a body the HEAD response does not have: start afresh.
            self._head_done = False
            self._in_message = False
            self._methods.popleft()
            self._events.append(_EOM)
            self._parser = httptools.HttpResponseParser(self)
        return rest

    def _began(self, exc: HttpParserError | None) -> bool:
        """Had the response that failed to parse begun, i.e. did its status line parse? Then
        the backend acted on the request, and the failure is an `IncompleteResponse` (never
        retried). Bytes that fail before that are not a response at all (e.g. bytes a broken
        backend sent after an earlier response, read as this one's: docs/splicer-http.md,
        Limits), and the request may be retried. llhttp says when the reason phrase, a field or
        the end of the head came (`_status_seen`); a status line without a reason phrase shows
        only in the status code, which llhttp keeps from the previous response until the next
        one's code is read: so its reasons for failing before that are told apart by name."""
        if not self._in_message:
            return False
        if self._status_seen:
            return True
        if isinstance(exc, HttpParserCallbackError):
            return False  # one of ours before the status line: a response nobody asked for
        return self._parser.get_status_code() >= 100 and (exc is None or str(exc) not in _START_LINE_ERRORS)

    def _receive_eof(self) -> None:
        self._eof = True
        if self._in_message:
            if not self._in_head and self._framing == BODY_UNTIL_CLOSE and not self._informational:
                self._in_message = False
                self._methods.popleft()
                self._events.append(_EOM)
            else:
                self._error = IncompleteResponse("backend closed the connection in the middle of a response", 502)
        elif self._head_buf:
            self._error = IncompleteResponse("backend closed the connection in the middle of a response", 502)

    @property
    def broken(self) -> bool:
        """True once the backend sent something that is not a valid response to a request sent
        (e.g. bytes after a response to HEAD, RFC 9112 section 6.3), or closed: the connection
        cannot carry another request."""
        return self._error is not None or self._eof

    @property
    def idle(self) -> bool:
        """True between responses (no response started and none expected)."""
        return not self._in_message and not self._methods and not self._head_buf


# ------------------------------------------------------------------------------ send side
# Hop-by-hop fields (RFC 9110 section 7.6.1) are not forwarded; the splicer writes its own
# framing fields, so Content-Length and Transfer-Encoding are dropped and re-added too (a
# response's codings other than chunked are carried in `Response.transfer_codings`).
# Proxy-Authenticate and Proxy-Authorization are not among them (RFC 2616 listed them, RFC 7230
# and RFC 9110 do not): a reverse proxy forwards them, as HAProxy and nginx do.
_HOP: Final = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"transfer-encoding", b"upgrade",
    b"content-length",
})


_HOP_LENS: Final = frozenset(len(n) for n in _HOP)
_CONN_STD: Final = frozenset({b"close", b"keep-alive", b"upgrade"})


def _end_to_end(headers: Iterable[tuple[bytes, bytes]], keep_upgrade: bool = False) -> list[bytes]:
    """Header lines (b"Name: value\r\n") minus hop-by-hop fields and those named in Connection.

    `keep_upgrade` (an upgrade request, a 101): Upgrade and Connection go on as they came, and so
    do the fields Connection names (an h2c upgrade's `Connection: Upgrade, HTTP2-Settings` names
    the HTTP2-Settings the next hop needs to switch), as HAProxy forwards them: the upgrade is
    between the client and the backend, which must see what the client sent for it."""
    out = []
    extra: set[bytes] | None = None
    for name, value in headers:
        if len(name) in _HOP_LENS:  # lower() only names that could be hop-by-hop
            lname = name.lower()
            if lname in _HOP:
                if lname == b"connection" and not keep_upgrade and value.lower() not in _CONN_STD:
                    toks = [t for t in _tokens(value) if t not in _CONN_STD]
                    if toks:
                        extra = (extra or set()).union(toks)
                if keep_upgrade and (lname == b"upgrade" or lname == b"connection"):
                    out.append(name + b": " + value + b"\r\n")
                continue
        out.append(name + b": " + value + b"\r\n")
    if extra:
        # fields the sender declared hop-by-hop by naming them in Connection (RFC 9110 7.6.1);
        # never Host, which an HTTP/1.1 request must carry (nginx and HAProxy keep it too)
        extra.discard(b"host")
        out = [line for line in out if line.split(b":", 1)[0].lower() not in extra]
    return out





def encode_request_head(req: Request, *, keep_upgrade: bool = False, default_host: bytes = b"",
                        extra: bytes = b"") -> bytes:
    """Serialize `req` for a pooled backend connection (HTTP/1.1, keep-alive).

    An HTTP/1.0 request without Host gets `Host: default_host` (the backend's address): it goes
    out as HTTP/1.1, which requires the field (RFC 9112 section 3.2), as nginx's proxy does.
    `extra`: whole header lines added last (X-Forwarded-For, Forwarded). Added after any the
    client sent, so a recipient that combines repeated fields reads the client's value first
    and ours last (RFC 9110 section 5.3), as HAProxy's `option forwardfor` does.
    """
    lines = _end_to_end(req.headers, keep_upgrade)
    add_host = req.host == b"" and default_host
    # What we replace is dropped: an empty Host, and the client's X-Forwarded-Proto when we set
    # ours (one value: a backend reading the first would trust a plain-HTTP client's `https`).
    # X-Forwarded-For and Forwarded are lists: the client's entries stay, ours go last.
    drop = ((b"host:",) if add_host else ()) + ((b"x-forwarded-proto:",) if b"X-Forwarded-Proto:" in extra else ())
    if drop:
        lines = [line for line in lines if not line[:18].lower().startswith(drop)]
    parts = [req.method, b" ", req.target, b" HTTP/1.1\r\n", *lines]
    if req.framing == BODY_CHUNKED:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    elif req.framing == BODY_LENGTH:
        parts.append(b"Content-Length: %d\r\n" % req.content_length)
    elif req.zero_length:
        # The client said "no body" with `Content-Length: 0`: a POST or PUT without one may be
        # refused by a backend wanting a length (411), and RFC 9110 section 8.6 lets a sender
        # say so; HAProxy and nginx forward it too.
        parts.append(b"Content-Length: 0\r\n")
    if add_host:
        parts.append(b"Host: " + default_host + b"\r\n")
    if extra:
        parts.append(extra)
    parts.append(b"\r\n")
    return b"".join(parts)


def encode_response_head(resp: Response | InformationalResponse, *, framing: int, content_length: int = 0,
                         close: bool = False, keep_upgrade: bool = False, head_request: bool = False,
                         keep_alive_10: bool = False) -> bytes:
    """Serialize a response head for the client with the splicer's own framing fields.

    A response to HEAD and a 304 keep their Content-Length (it describes the representation,
    RFC 9110 section 8.6); other bodiless responses get none. A chunked body keeps the
    backend's other transfer codings in front of its chunked (`Transfer-Encoding: gzip,
    chunked`): the body bytes are relayed as they came, still so coded. With any other
    `framing` they cannot be named (HTTP/1.0 has no Transfer-Encoding), so the caller must not
    relay such a body (see `Exchange._on_head`).
    """
    status = resp.status
    parts = [b"HTTP/1.1 %d " % status, resp.reason, b"\r\n"]
    if head_request or status == 304:
        for name, value in resp.headers:
            if len(name) == 14 and name.lower() == b"content-length":
                parts.append(name + b": " + value + b"\r\n")
    parts += _end_to_end(resp.headers, keep_upgrade)
    if status >= 200 and not keep_upgrade:
        if framing == BODY_CHUNKED:
            codings = getattr(resp, "transfer_codings", b"")
            parts.append(b"Transfer-Encoding: " + codings + b", chunked\r\n" if codings
                         else b"Transfer-Encoding: chunked\r\n")
        elif framing == BODY_LENGTH:
            parts.append(b"Content-Length: %d\r\n" % content_length)
        elif framing == BODY_NONE and status != 204 and status != 304 and not head_request:
            parts.append(b"Content-Length: 0\r\n")
        if close:
            parts.append(b"Connection: close\r\n")
        elif keep_alive_10:  # an HTTP/1.0 client asked for keep-alive and gets it
            parts.append(b"Connection: keep-alive\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def encode_chunk(data: bytes) -> bytes:
    """One chunk of a chunked body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def encode_last_chunk(trailers: Headers = ()) -> bytes:
    """The last chunk and the trailer section."""
    if not trailers:
        return b"0\r\n\r\n"
    return b"0\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in trailers) + b"\r\n"


_REASONS: Final = {
    400: b"Bad Request", 405: b"Method Not Allowed", 413: b"Content Too Large", 414: b"URI Too Long",
    417: b"Expectation Failed", 431: b"Request Header Fields Too Large", 501: b"Not Implemented",
    502: b"Bad Gateway", 503: b"Service Unavailable", 504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported", 404: b"Not Found",
}


def simple_response(status: int, message: str, *, close: bool = False, head_request: bool = False,
                    extra: Headers = (), keep_alive_10: bool = False) -> bytes:
    """A small text/plain response made by the splicer itself (errors, refusals); `close` and
    `keep_alive_10` as for `encode_response_head`."""
    body = (message.rstrip("\n") + "\n").encode("utf-8", "replace")
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Error")),
             b"Content-Type: text/plain; charset=utf-8\r\n",
             b"Content-Length: %d\r\n" % len(body)]
    lines += [n + b": " + v + b"\r\n" for n, v in extra]
    if close:
        lines.append(b"Connection: close\r\n")
    elif keep_alive_10:  # an HTTP/1.0 client asked for keep-alive and keeps it
        lines.append(b"Connection: keep-alive\r\n")
    lines.append(b"X-Shmfabric-Splicer: error\r\n\r\n")
    return b"".join(lines) + (b"" if head_request else body)
