"""Sans-IO RESP framing for the Redis splicer: client requests in, backend replies out.

What this file knows: the RESP2/RESP3 wire format and Redis's limits on requests. What it
does not know: commands, routing, sockets, asyncio or the clock.

* `RequestReader` turns client bytes into commands (lists of bytes arguments). Multibulk
  requests (`*N\\r\\n$L\\r\\n...`, what every client library sends) are parsed by hiredis's
  C `Reader`; inline commands (`PING\\r\\n`, typed by people or scripts over telnet/nc) are split
  here, because hiredis only parses RESP and an inline line is not RESP.
* `ReplyScanner` finds where each backend reply ends so the splicer relays replies
  byte-for-byte. hiredis cannot do this alone: its Reader does not expose its read position,
  and the objects it returns lose distinctions a proxy must keep (``+OK`` and ``$2 OK`` both
  become ``b"OK"``; RESP3 attributes, verbatim strings and big numbers change shape). So small
  replies are measured here with a few `bytes.find` calls, and large aggregates (an MGET of a
  thousand keys, a long LRANGE) are parsed by hiredis, whose consumed length is recovered
  exactly from `Reader.len()` (see `_HiredisMeasure`), so the per-element loop runs in C.
* Encoders build replies the splicer answers itself, in the client's protocol version.

Errors: malformed client input raises `RespProtocolError` with Redis's own wording; the shell
answers it with ``-ERR Protocol error: ...`` and closes the client, as redis-server does. A
malformed backend reply raises `RespProtocolError` too; the shell drops that backend connection.
"""
from __future__ import annotations

import re
from itertools import repeat
from typing import Callable

import hiredis

__all__ = [
    "RespProtocolError",
    "RequestReader",
    "ReplyScanner",
    "encode_command",
    "encode_bulks",
    "join_bulks",
    "encode_bulk",
    "encode_int",
    "encode_error",
    "encode_simple",
    "encode_null",
    "encode_array_header",
    "encode_map",
    "encode_value",
    "OK",
    "PONG",
    "QUEUED",
]

# Redis's own bounds (src/server.h): PROTO_INLINE_MAX_SIZE is 64 KiB; a multibulk may have up
# to 1024*1024 arguments for an unauthenticated-safe default (the server allows more once
# authenticated, we keep the lower bound for everyone). proto-max-bulk-len is 512 MB in Redis,
# the splicer's `limits.max_request_bytes` default too (the reader's own default is lower, for
# callers that do not say).
INLINE_MAX = 64 * 1024
MULTIBULK_MAX = 1024 * 1024
# Redis's proto-max-bulk-len: a longer bulk inside a request is refused on reading its header,
# whatever the splicer's max_request_bytes says (RequestReader._refuse_waiting_bulk).
PROTO_MAX_BULK = 512 * 1024 * 1024
# An incomplete request past this many bytes is walked for its bulk lengths (RequestReader._guard).
BIG_REQUEST = 1024 * 1024
# Held bytes go to hiredis in pieces of this size, doubling while one request spans them: a
# stream that mixes inline and multibulk requests switches between the two paths at every
# change, and each switch costs a pass over what hiredis was given (its guard's search, the
# re-measure in _go_inline). Fed whole, a 256 KiB read cost that much per switch, so
# `redis-cli --pipe` of alternating inline and multibulk SETs took 13.8 s for 200k commands
# (0.2 s straight to redis-server).
FIRST_CHUNK = 512
MAX_CHUNK = 1024 * 1024
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024

OK = b"+OK\r\n"
PONG = b"+PONG\r\n"
QUEUED = b"+QUEUED\r\n"


class RespProtocolError(Exception):
    """Bytes that are not valid RESP (or break a limit); the message follows Redis's wording."""


# --------------------------------------------------------------------------------------------
# Client requests
# --------------------------------------------------------------------------------------------


def _split_inline(line: bytes) -> list[bytes]:
    """Split an inline command line the way Redis's sdssplitargs does.

    Plain words are separated by blanks; "double quoted" arguments understand \\n \\r \\t \\b \\a
    \\\\ \\" and \\xHH escapes; 'single quoted' ones only \\'. A closing quote must be followed by
    a blank or the end of the line.
    """
    # (int membership: a plain byte scan, ~20 ns, where `b'"' in line` costs ~160 ns here)
    if 34 not in line and 39 not in line and 11 not in line and 12 not in line:  # " ' \v \f
        return line.split()  # (bytes.split also splits at \v and \f, which end no word in Redis)
    args: list[bytes] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i] in b" \t\n\r\v\f":
            i += 1
        if i >= n:
            return args
        cur = bytearray()
        inq = insq = False
        while True:
            if inq:
                if i >= n:
                    raise RespProtocolError("unbalanced quotes in request")
                c = line[i]
                if c == 0x5C and i + 3 < n and line[i + 1] == 0x78 and _ishex(line[i + 2 : i + 4]):
                    cur.append(int(line[i + 2 : i + 4], 16))
                    i += 3
                elif c == 0x5C and i + 1 < n:
                    i += 1
                    cur.append(_ESCAPES.get(line[i], line[i]))
                elif c == 0x22:
                    if i + 1 < n and line[i + 1] not in b" \t\n\r\v\f":
                        raise RespProtocolError("unbalanced quotes in request")
                    i += 1
                    break
                else:
                    cur.append(c)
            elif insq:
                if i >= n:
                    raise RespProtocolError("unbalanced quotes in request")
                c = line[i]
                if c == 0x5C and i + 1 < n and line[i + 1] == 0x27:
                    i += 1
                    cur.append(0x27)
                elif c == 0x27:
                    if i + 1 < n and line[i + 1] not in b" \t\n\r\v\f":
                        raise RespProtocolError("unbalanced quotes in request")
                    i += 1
                    break
                else:
                    cur.append(c)
            else:
                if i >= n:
                    break
                c = line[i]
                if c in b" \t\n\r":  # sds.c: only these (and NUL) end an unquoted word; \v and \f
                    break           # are blanks only between words (isspace)
                if c == 0x22:
                    inq = True
                elif c == 0x27:
                    insq = True
                else:
                    cur.append(c)
            i += 1
        args.append(bytes(cur))


_ESCAPES = {ord("n"): 10, ord("r"): 13, ord("t"): 9, ord("b"): 8, ord("a"): 7}


def _ishex(two: bytes) -> bool:
    return all(c in b"0123456789abcdefABCDEF" for c in two)


class RequestReader:
    """Client request framer: `feed(bytes)`, then `next()` until it returns None.

    `next()` returns one command as a non-empty list of bytes arguments, or None when more
    data is needed. It raises `RespProtocolError` on malformed input; the connection must then
    be closed, as Redis does.

    Inline and multibulk requests may follow each other in any mix, as redis-server allows
    (`redis-cli --pipe` ends its stream with an empty inline line before its final ECHO). A
    multibulk run is parsed by hiredis; when hiredis meets a byte that does not start a RESP
    item, or a request that is not an array ('+foo', '$3'...: inline to Redis), the reader works
    out exactly where the last complete request ended and hands the rest to the inline path,
    so a stream reads the same however it is split into reads (fuzz_redis_resp.py checks it). It can, because hiredis trims its buffer once it has consumed
    1 KiB, after which `Reader.len()` is the count of unread bytes: so every KiB or so the
    stream position of a request end is known exactly, and only the few requests since then
    are measured, by their bytes: every element of a request must be a bulk string, as Redis
    requires (elements hiredis returns as bytes although they are not, '+x', '=N', '(1', are
    found by _guard's walk or by _verify, and refused where Redis refuses them), so a request's
    bytes are its canonical encoding but for the two unchecked bytes after each bulk, and
    _go_inline checks that, walking the request where it differs.
    """

    __slots__ = ("_reader", "_pending", "_in_hiredis", "_hiredis_bytes", "max_request_bytes", "failed",
                 "_fed", "_hlen", "_known_end", "_mirror", "_mirror_start", "_tail_unchecked", "_nulls",
                 "_tail", "_poisoned", "_walk", "_ppos", "_chunk", "_from_pending", "_bulk_checked",
                 "_vq", "_vpos", "_pwalk", "_pat", "_pscan", "_inline_cut")

    def __init__(self, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> None:
        if max_request_bytes < 1024:
            raise ValueError("max_request_bytes must be at least 1024")
        # Bytes not handed to hiredis are _pending[_ppos:] (an offset, so that reading a line
        # or a piece does not copy the rest): the inline path's input, or in hiredis mode the
        # bytes still to feed it (see FIRST_CHUNK).
        self._pending = b""
        self._ppos = 0
        self._chunk = FIRST_CHUNK
        self.max_request_bytes = max_request_bytes
        self.failed = False
        self._tail = b""  # the last bytes fed, so a header split over two reads is still seen
        self._poisoned = ""  # why a header was held back (_guard): Redis's words for it
        self._reset_hiredis()

    def _reset_hiredis(self) -> None:
        self._reader = hiredis.Reader()
        self._in_hiredis = False  # hiredis may hold (part of) a request
        self._hiredis_bytes = 0  # bytes fed since the last complete request (bounded)
        self._fed = 0  # bytes fed to this hiredis reader in all
        self._hlen = 0  # what Reader.len() says if hiredis has not trimmed its buffer
        self._known_end = 0  # stream offset (in _fed terms) where a request is known to end
        self._nulls = 0  # null items (None from hiredis) returned since _known_end
        self._walk: _HeaderWalk | None = None  # a _guard walk still inside an item (see _guard)
        self._bulk_checked = -1  # where _refuse_waiting_bulk last walked to a long bulk length
        self._mirror: list[bytes] = []  # bytes fed to hiredis from _mirror_start on
        self._mirror_start = 0
        self._tail_unchecked = False  # is what follows the last request known to be multibulk?
        # _guard held back an inline request: hiredis was given the bytes before it only, and
        # drain leaves hiredis once it has read them all (they end where a request ends).
        self._inline_cut = False
        # Verification (see _verify): while _vq is a list, every item hiredis returns is put in it
        # and checked before drain returns it; _vpos is the stream offset where the first of them
        # starts (a known request boundary). _pwalk walks the incomplete request that starts at
        # _pat (== _vpos), up to _pscan (_check_partial).
        self._vq: list[list[bytes]] | None = None
        self._vpos = -1
        self._pwalk: _HeaderWalk | None = None
        self._pat = -1
        self._pscan = 0
        # How many of the last bytes fed to hiredis are _pending[_ppos - n : _ppos]: then
        # _go_inline hands bytes back by moving _ppos, without copying what is still held.
        self._from_pending = 0

    def feed(self, data: bytes) -> None:
        """Add bytes read from the client."""
        if self._poisoned:
            return  # nothing after a refused header is read (see _guard)
        pending = self._pending
        if self._in_hiredis and self._ppos >= len(pending):  # nothing held: straight to hiredis
            data = self._guard(bytes(data))
            self._reader.feed(data)  # _feed_hiredis, inlined (once per read)
            n = len(data)
            self._hiredis_bytes += n
            self._fed += n
            self._hlen += n
            self._mirror.append(data)
            self._from_pending = 0
        elif self._ppos < len(pending):
            # Keep the bytes _go_inline may hand back (those fed since the last known request
            # end), drop the rest of what was consumed.
            keep = min(self._from_pending, self._fed - self._known_end) if self._in_hiredis else 0
            self._from_pending = keep
            self._pending = pending[self._ppos - keep :] + data
            self._ppos = keep
        else:
            self._pending = bytes(data)
            self._ppos = 0
            self._from_pending = 0

    def _guard(self, data: bytes) -> bytes:
        """`data`, cut before an aggregate header that announces more than MULTIBULK_MAX items,
        or a bulk longer than max_request_bytes.

        hiredis makes an N-slot list as soon as it reads a header "*N", before any item comes,
        and freeing it walks all N slots: the 13 bytes "*2000000000\r\n" and one bad byte cost
        seconds of a worker's time (hiredis issue #1357), stalling every client it serves. So
        such a header never reaches hiredis: `drain` reports it as Redis does. The test is two
        C-speed searches per read; when they hit, a walk over the items (`_HeaderWalk`) starts
        at the last request boundary and follows every later read until it is at a boundary
        again, so each byte is walked at most once however many reads hit.
        """
        # The searches run over the read itself and over the seam with the previous one (a
        # header split between two reads), without copying the read.
        seam = self._tail + data[:16]
        self._tail = data[-16:] if len(data) >= 16 else seam[-16:]
        walk = self._walk
        # Also walked: a request still incomplete past BIG_REQUEST bytes, which may be waiting
        # for a bulk longer than max_request_bytes ("$4000000000"): Redis refuses such a header
        # at once, and without the walk it would be held until that many bytes had come (512 MiB
        # per connection by default). Only such a walk checks bulk lengths: one started by the
        # searches runs at read splits that vary, and the request would be refused all the same
        # (later, at max_request_bytes), so the answer never depends on the split.
        big = self._hiredis_bytes > BIG_REQUEST
        # An element that is not a bulk string but that hiredis returns as bytes all the same (a
        # simple string '+x', a verbatim string '=N', a big number '(1') must be refused where
        # Redis refuses it, and hiredis gives no sign of it: a request holding one is not as
        # long as its canonical encoding, so measuring it (in _go_inline) would go wrong. No such
        # element starts in a read without these bytes, so three memchr calls spare any check to
        # every read of plain requests. (Only these: a line start is not enough, as a bulk
        # string's two terminator bytes, which neither Redis nor hiredis checks, need not be
        # CRLF.) A read with them is checked one of two ways: verified after hiredis has parsed
        # it (_verify: one byte looked at per element, about 0.1 us, so that values holding '+'
        # or '=', like base64, cost little), which needs a known request boundary from which
        # all the requests hiredis returns are checked: here, when all that was fed so far was
        # returned; or at a trim during a walk (see drain); else walked before hiredis reads it
        # (about 0.5 us per element), until such a boundary. Once no request is held
        # unverified, a read without these bytes ends the verification.
        strict = 43 in data or 61 in data or 40 in data  # '+' '=' '(' (int membership: see _split_inline)
        if not strict and (126 in data or 124 in data):
            # or a set '~' or an attribute '|' that hiredis would return as a request (Redis
            # reads an inline line there): see _may_start_set
            strict = _may_start_set(data)
        if self._vq is not None:
            if strict:
                strict = False
            elif self._vpos == self._fed or self._plain_since_vpos():
                self._vq = None
                self._vpos = -1
        elif strict and self._fed == self._known_end and (walk is None or not walk.strict):
            self._vq = []
            self._vpos = self._fed
            strict = False
        if walk is None or (big and walk.max_bulk is None) or (strict and not walk.strict):
            if walk is None and not (strict or big or _may_hold_huge_header(data) or _may_hold_huge_header(seam)):
                return data
            strict = strict or (walk is not None and walk.strict)
            walk = _HeaderWalk(max_bulk=self.max_request_bytes if big else None, strict=strict, top_star=True)
            prefix = b"".join(self._mirror)[self._known_end - self._mirror_start :] if self._in_hiredis else b""
            at = walk.feed(prefix + data)
            at = at if at < 0 else max(0, at - len(prefix))
            cut = walk.inline_at - len(prefix) if walk.inline_at >= 0 else -1
        else:
            at = walk.feed(data)
            cut = walk.inline_at
        if at >= 0:
            self._poisoned = walk.reason
            return data[:at]
        self._walk = None if walk.at_boundary else walk
        if cut >= 0:
            # A request that does not start with '*' (Redis reads it inline): hiredis gets the
            # requests before it only, the rest goes back in front of the held bytes, and drain
            # leaves hiredis once it has read them (`_inline_cut`). (A cut before this piece,
            # in bytes hiredis has already, cannot be: such a read was checked when it came.)
            self._pending = data[cut:] + self._pending[self._ppos :]
            self._ppos = 0
            self._from_pending = 0
            self._inline_cut = True
            return data[:cut]
        return data

    def _plain_since_vpos(self) -> bool:
        """Do the bytes fed since the last verified request, a short incomplete request, hold
        nothing verification looks for? Then a read without such bytes ends the verification,
        although it does not start where a request does (else a read that ended on a '~' or a
        '|' would have every later read of a stream verified)."""
        start = self._vpos
        if self._fed - start > 4096:
            return False
        held = self._mirror_slice(start, self._fed)
        return held[0] == 42 and not (43 in held or 61 in held or 40 in held or _may_start_set(held))

    def _feed_piece(self) -> None:
        """Feed hiredis the next piece of the held bytes (see FIRST_CHUNK)."""
        pending = self._pending
        pos = self._ppos
        end = pos + self._chunk
        if end >= len(pending):
            # The last piece: the held bytes are dropped, so a read is not kept alive while
            # hiredis waits for the rest of a request (_go_inline then copies what it hands
            # back, at most this piece and the bytes since the last known request end).
            data = pending if not pos else pending[pos:]
            self._pending = b""
            self._ppos = self._from_pending = 0
            self._feed_hiredis(data)
            return
        data = pending[pos:end]
        self._ppos = end
        poisoned = self._poisoned
        self._feed_hiredis(data)
        if self._poisoned and not poisoned:  # nothing after a refused header is read
            self._pending = b""
            self._ppos = self._from_pending = 0
        elif not self._inline_cut:  # (after a cut _guard has rebuilt the held bytes)
            self._from_pending += len(data)

    def _feed_hiredis(self, data: bytes) -> None:
        # (Also after a refused header: the held bytes are then only those before it, which
        # _go_inline handed back after a "*-5" skipped; the requests in them are answered.)
        data = self._guard(data)
        self._reader.feed(data)
        n = len(data)
        self._hiredis_bytes += n
        self._fed += n
        self._hlen += n
        self._mirror.append(data)

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet form a complete request (a bound for backpressure)."""
        return len(self._pending) - self._ppos + (self._hiredis_bytes if self._in_hiredis else 0)

    def next(self) -> list[bytes] | None:
        """Return the next complete command, or None if more bytes are needed."""
        cmds, err = self.drain(1)
        if cmds:
            return cmds[0]
        if err is not None:
            raise err
        return None

    def drain(self, limit: int) -> tuple[list[list[bytes]], RespProtocolError | None]:
        """Up to `limit` complete commands, and the protocol error that stopped the reading if any.

        The commands before a malformed one are returned with the error, so the shell answers
        them before it reports the error and closes, as redis-server does.
        """
        out: list[list[bytes]] = []
        append = out.append
        n = 0
        try:
            while True:
                while n < limit:
                    if self._in_hiredis:
                        reader = self._reader
                        gets = reader.gets
                        rlen = reader.len
                        join = b"".join
                        hlen = self._hlen
                        got = False
                        vq = self._vq
                        while n < limit:
                            try:
                                cmd = gets()
                            except (hiredis.ProtocolError, TypeError) as exc:
                                if self._verify(out):  # the requests returned before it come first
                                    n = len(out)
                                    break
                                # TypeError: hiredis could not build a RESP3 map whose key is a
                                # map or an array (unhashable), which no request may hold anyway.
                                # A request that starts "*-5" (hiredis: out of range) is skipped,
                                # as Redis skips any multibulk length <= 0: _go_inline hands back
                                # what follows it.
                                if self._go_inline(skip_negative=True):
                                    break
                                self.failed = True
                                raise RespProtocolError(self._exact_error(_request_error(exc))) from None
                            # hiredis trims its buffer at the end of any gets() that leaves 1 KiB
                            # consumed, also one that stops inside a request; so len() is read
                            # after every call, and only a trim by a call that returned a whole
                            # request marks where a request ends.
                            left = rlen()
                            if cmd is False:
                                # Not a boundary test: hiredis may have consumed part of a request
                                # (its header and some arguments) and hold that state with nothing
                                # left unread.
                                self._hlen = left
                                if self._inline_cut:
                                    # hiredis has read all it was given, which ends where a request
                                    # that does not start with '*' starts (see _guard): that one
                                    # and what follows it are read inline.
                                    if vq and self._verify(out):
                                        n = len(out)
                                        break
                                    self._reset_hiredis()
                                    self._chunk = FIRST_CHUNK
                                    break
                                if self._poisoned and self._ppos >= len(self._pending):
                                    # What preceded the held-back header is answered (all of it: bytes
                                    # _go_inline handed back may still be held), unless a bad element
                                    # before the header comes first.
                                    if vq is not None:
                                        if self._verify(out):
                                            n = len(out)
                                            break
                                        self._check_partial()
                                    self.failed = True
                                    raise RespProtocolError(self._poisoned)
                                if got:
                                    self._hiredis_bytes = 0
                                    self._tail_unchecked = True
                                elif self._hiredis_bytes > self.max_request_bytes and self._ppos >= len(self._pending):
                                    # (With bytes still held, the request may end in them: it is
                                    # refused only when it is incomplete with all that came.)
                                    self.failed = True
                                    raise RespProtocolError("invalid bulk length")
                                # Bytes follow the last complete request. If they do not start
                                # with '*' they are an inline request (as Redis reads them), not a
                                # RESP item for hiredis to wait on. Checked (a re-parse of ~1 KiB)
                                # until the next request is seen to be one; also when the read does
                                # not end a line: an inline line ("$100") may be complete with more
                                # behind it, which hiredis would wait inside for ever.
                                if self._tail_unchecked:
                                    mirror = self._mirror
                                    if mirror:
                                        if self._verify(out) or self._go_inline():  # (_go_inline measures them)
                                            n = len(out)
                                            break
                                if self._ppos < len(self._pending):  # more held: the next piece
                                    if vq and self._verify(out):
                                        # (verified first, so that a walk _guard starts from
                                        # _known_end starts where a request does)
                                        n = len(out)
                                        break
                                    self._chunk = min(self._chunk * 2, MAX_CHUNK)
                                    self._feed_piece()
                                    hlen = self._hlen
                                    got = False
                                    vq = self._vq  # (_guard may have started or ended the verification)
                                    continue
                                if vq is not None:
                                    if self._verify(out):
                                        n = len(out)
                                        break
                                    self._check_partial()  # (a bad element before a long bulk comes first)
                                if self._refuse_waiting_bulk(left):
                                    self.failed = True
                                    raise RespProtocolError(self._poisoned)
                                return out, None
                            got = True
                            if cmd is None:
                                # "*-1\r\n", a null multibulk, Redis skips like "*0\r\n"; but "$-1\r\n"
                                # or "_\r\n" (hiredis's None too) start an inline request, as any
                                # request not starting with '*' does. hiredis returns None for
                                # exactly these 5- and 3-byte items, so where this call trimmed (it
                                # ends `left` bytes before the end) its last 5 bytes tell them
                                # apart; elsewhere _go_inline does (before _known_end moves past
                                # this item), and moves _known_end past it, so a run of nulls
                                # costs each byte one re-parse, not one per null.
                                self._nulls += 1
                                if left < hlen:
                                    end = self._fed - left
                                    head = self._mirror_slice(end - 5, end)
                                    null_multibulk = head[0] == _REQUEST_START and head[1:] == b"-1\r\n"
                                else:
                                    null_multibulk = False
                                if not null_multibulk:
                                    if self._verify(out) or self._go_inline(self._nulls, left):
                                        n = len(out)
                                        break
                                cmd = []
                            elif type(cmd) is not list:
                                # A request that starts with another RESP type byte ('+', '$',
                                # ':'...) is an inline request to Redis, whatever the read split.
                                # (_known_end has not moved past it: _go_inline hands back all of
                                # it, also when it is 1 KiB or more and this call trimmed.)
                                if self._verify(out) or self._go_inline():
                                    n = len(out)
                                    break
                                self.failed = True
                                raise RespProtocolError(self._first_fault_at_vpos("expected '*' as the first byte of a request"))
                            else:
                                try:
                                    # One C call that fails on any element that is not bytes (an
                                    # integer, nil, nested array or error item); the copy is cheap
                                    # next to the re-encoding every forwarded command gets anyway.
                                    # Elements hiredis returns as bytes but that are not bulk strings
                                    # ('+', '=', '(') get past it: _guard cut the bytes before them, or
                                    # _verify refuses the request before it is returned.
                                    join(cmd)
                                except TypeError:
                                    if vq is not None:
                                        # Verified with this request: if it (or one before it)
                                        # does not start with '*', it is inline to Redis; else
                                        # _verify refuses it in Redis's words.
                                        vq.append(cmd)
                                        append(cmd)
                                        if self._verify(out):
                                            n = len(out)
                                            break
                                        out.pop()
                                    self.failed = True
                                    raise RespProtocolError(self._exact_error(f"expected '$', got '{_type_byte(cmd)}'")) from None
                            if len(cmd) > MULTIBULK_MAX:
                                if self._verify(out):
                                    n = len(out)
                                    break
                                self.failed = True
                                raise RespProtocolError("invalid multibulk length")
                            if vq is not None:
                                vq.append(cmd)
                            if cmd:  # "*0\r\n": Redis skips empty multibulks silently
                                # (in `out` before any _verify below: a refusal drops what it verified
                                # from the end of `out`, this request included)
                                append(cmd)
                                n += 1
                            if left < hlen:  # trimmed by this call: exactly `left` bytes follow this request
                                hlen = left
                                self._known_end = self._fed - left
                                self._nulls = 0
                                if vq is None:
                                    walk = self._walk
                                    if walk is not None and walk.strict and walk.max_bulk is None and not self._poisoned:
                                        # A known request boundary, with every request before it
                                        # returned: from here on hiredis's requests are verified
                                        # instead of walked (what was fed is walked already).
                                        self._walk = None
                                        vq = self._vq = []
                                        self._vpos = self._known_end
                                elif len(vq) >= 256 and self._verify(out):  # (so that the mirror can be trimmed)
                                    n = len(out)
                                    break
                                if len(self._mirror) > 4:
                                    self._trim_mirror()
                            if not reader.has_data():
                                # A request just ended and nothing follows: a true boundary, so the
                                # next request may be inline again. The reader is kept (it is clean).
                                if vq and self._verify(out):
                                    n = len(out)
                                    break
                                self._in_hiredis = False
                                self._inline_cut = False
                                self._mirror.clear()
                                self._mirror_start = self._known_end = self._fed
                                self._nulls = 0
                                self._from_pending = 0
                                self._hlen = left
                                self._hiredis_bytes = 0
                                break
                        else:
                            self._hlen = hlen
                            if got:
                                # As when hiredis runs out of bytes: what follows may be inline.
                                self._hiredis_bytes = 0
                                self._tail_unchecked = True
                        continue
                    pending = self._pending
                    pos = self._ppos
                    if pos >= len(pending):
                        if pending:
                            self._pending = b""
                            self._ppos = 0
                        if self._poisoned:  # the requests before the refused header are all out
                            self.failed = True
                            raise RespProtocolError(self._poisoned)
                        break
                    if pending[pos] == 42:  # '*': a multibulk run goes to hiredis (anything else is inline)
                        self._in_hiredis = True
                        self._feed_piece()
                        continue
                    nl = pending.find(b"\n", pos)
                    if nl >= 0 and pending.find(0, pos, nl) >= 0:
                        # Redis finds the line's end with strchr, which stops at a NUL: to it the
                        # line has not ended (it waits, then refuses it as too big), so nothing
                        # after the NUL runs as a command.
                        nl = -1
                    if nl < 0:
                        if len(pending) - pos > INLINE_MAX:
                            self.failed = True
                            raise RespProtocolError("too big inline request")
                        if self._poisoned:
                            # Nothing after a refused header is read, so this line never ends: the
                            # refusal is the answer now, not a wait for ever.
                            self.failed = True
                            raise RespProtocolError(self._poisoned)
                        break
                    line = pending[pos:nl]
                    self._ppos = nl + 1
                    if line.endswith(b"\r"):
                        line = line[:-1]
                    args = _split_inline(line)
                    if args:  # Redis ignores empty inline lines (telnet users pressing Enter)
                        append(args)
                        n += 1
                # The requests read last may not be verified yet: if one of them does not
                # start with '*', what follows it is read again, inline.
                if self._vq and self._verify(out):
                    n = len(out)
                    continue
                break
        except RespProtocolError as exc:
            if self._vq:
                # Stopped by what follows requests not verified yet: one of them may be the
                # first bad request (then its error is the answer, and they are not returned),
                # or not start with '*' (then what follows it is read inline instead).
                try:
                    switched = self._verify(out)
                except RespProtocolError as first:
                    return out, first
                if switched:
                    self.failed = False
                    if len(out) >= limit:
                        return out, None
                    more, err = self.drain(limit - len(out))
                    out += more
                    return out, err
            return out, exc
        return out, None

    def _exact_error(self, fallback: str) -> str:
        """Redis's words for the first malformed request since the last known request end.

        Used when hiredis refused a request or returned one holding an element that is not a
        bulk string: Redis stops at the first bad element ('$-1' is an "invalid bulk length" to
        it, '_' a wrong type byte, hiredis returns None for both), which only a walk of the bytes
        tells. The requests since `_known_end` were all multibulk (the reader goes inline at
        anything else), so the walk from there follows them exactly.
        """
        walk = _HeaderWalk(strict=True)
        walk.feed(self._mirror_slice(self._known_end, self._fed))
        return walk.reason or fallback

    def _verify(self, out: list[list[bytes]]) -> None:
        """Check that the requests hiredis returned since `_vpos` (`_vq`) hold bulk strings only.

        They are at the tail of `out` (but empty ones, which are not returned). hiredis returns
        '+x', '=N' and '(1' elements as bytes too; a request holding one is refused here, in
        Redis's words, and neither it nor any request after it is returned.

        Why looking at one byte per element is enough: `_vpos` is where a request starts, and
        hiredis's parse from there is fixed by the bytes. If the byte there is '*', hiredis read
        a header "*<n>\r\n" with n its element count (its string2ll takes no sign, no leading
        zero, nothing else: the header's bytes are those exactly), so the first element starts
        3 + len(str(n)) bytes on. If the byte there is '$', that element is a bulk string, read
        as "$<m>\r\n", m bytes and two bytes hiredis skips unread, where m, again written one way
        only, is the length of the bytes hiredis returned: the next element starts that many
        bytes on. So, element after element and request after request, each header is where the
        canonical encoding puts it, and each is checked to be a '$'. The bytes between (values,
        and the terminators that need not be CRLF) are never looked at, nor need to be. An
        element that is not a bulk string ('+', '=', '(' and all others) fails at its own
        position; an empty request (hiredis returns "*0" and "*-1" alike) and a length of 4 KiB
        or more (past the size tables) take the exact, slower way (`_verify_exact`), as does a
        request that does not start with '*'.

        A request that does not start with '*' (a set '~' or an attribute '|', which hiredis
        returns as a list) is an inline line to Redis: it and the requests after it are dropped
        from `out`, the bytes from its start on go back to the inline path, and True is returned
        (the caller leaves hiredis: the reader was reset). Else False.
        """
        vq = self._vq
        if not vq:
            return False
        start = self._vpos
        fed = self._fed
        last = self._mirror[-1]
        off = start - (fed - len(last))
        if off >= 0:
            buf = last
        else:
            buf = self._mirror_slice(start, fed)
            off = 0
        try:
            end = _bulk_requests_end(buf, off, vq)
        except (IndexError, TypeError):
            end = self._verify_exact(buf, off, out)
            if end < 0:  # an inline request at buf[-end - 1]
                at = start + (-end - 1) - off
                self._hand_back(self._mirror_slice(at, fed))
                return True
        self._vpos = start + end - off
        vq.clear()
        return False

    def _verify_exact(self, buf: bytes, pos: int, out: list[list[bytes]]) -> int:
        """`_verify`'s exact way: each request measured by its bytes (`_request_end`). Where the
        requests end, or -1 - p when the request at p does not start with '*' (dropped from
        `out` with those after it)."""
        vq = self._vq
        assert vq is not None
        for i, cmd in enumerate(vq):
            if buf[pos] != _REQUEST_START:
                drop = sum(1 for c in vq[i:] if c)
                if drop:
                    del out[-drop:]
                return -1 - pos
            end = _request_end(buf, pos)
            if end < 0:
                walk = _HeaderWalk(strict=True)
                walk.feed(buf[pos:])
                # (A request hiredis returned that is not one of bulk strings, yet no walk
                # finds its fault, cannot be: refused rather than measured from a guess.)
                self._refuse(walk.reason or "invalid multibulk length", out, sum(1 for c in vq[i:] if c))
            pos = end
        return pos

    def _first_fault_at_vpos(self, fallback: str) -> str:
        """Redis's words for the first bad element of the request at `_vpos` if it has one (a
        RESP3 push, which hiredis returns as no list, read while verifying: a walk of _guard would
        have refused that element before hiredis read it), else `fallback`."""
        if self._vq is None or self._vpos < 0:
            return fallback
        buf = self._mirror_slice(self._vpos, self._fed)
        if _request_end(buf, 0) >= 0:
            return fallback
        walk = _HeaderWalk(strict=True)
        walk.feed(buf)
        return walk.reason or fallback

    def _check_partial(self) -> None:
        """Refuse a bad element in the incomplete request hiredis holds, as soon as it has come.

        Redis refuses it on reading it, without waiting for the rest of the request (the client
        may wait for the answer); `_verify` only sees complete requests. So, while verifying,
        the bytes from `_vpos` (all complete requests there were returned and verified) are
        walked as a walk of `_guard` would, once each: the walk is kept from read to read while
        the request is incomplete.
        """
        vpos = self._vpos
        fed = self._fed
        if vpos >= fed:
            return
        if self._pat != vpos or self._pwalk is None:
            self._pat = vpos
            self._pwalk = _HeaderWalk(strict=True)
            self._pscan = vpos
        if self._pscan >= fed:
            return
        walk = self._pwalk
        at = walk.feed(self._mirror_slice(self._pscan, fed))
        self._pscan = fed
        if at >= 0:
            self._refuse(walk.reason, [], 0)

    def _refuse(self, reason: str, out: list[list[bytes]], drop: int) -> None:
        """Refuse the stream in Redis's words: the last `drop` commands of `out` are not returned,
        and nothing after them is read (hiredis may hold more)."""
        if drop:
            del out[-drop:]
        self._reset_hiredis()
        self._pending = b""
        self._ppos = 0
        self._poisoned = reason
        self.failed = True
        raise RespProtocolError(reason)

    def _mirror_slice(self, start: int, end: int) -> bytes:
        """The bytes fed to hiredis from stream offset `start` to `end` (both in _fed terms)."""
        mirror = self._mirror
        i = len(mirror)
        at = self._fed  # stream offset where mirror[i] ends
        parts = []
        while i and at > start:
            i -= 1
            part = mirror[i]
            begin = at - len(part)
            if begin < end:
                parts.append(part[max(0, start - begin) : end - begin])
            at = begin
        parts.reverse()
        return b"".join(parts)

    def _refuse_waiting_bulk(self, left: int) -> bool:
        """Is hiredis waiting for a bulk, inside a request, longer than Redis's proto-max-bulk-len?

        Redis refuses such a header ("$3000000000") on reading it; hiredis would wait for the
        bytes. Found without a pass over every read: hiredis stops at the header of an
        incomplete bulk, and has consumed less than 1 KiB of its buffer (the last `left` bytes
        fed) when it did not trim, so the header is in the first KiB or so of those bytes. A
        length that large there (rare in a value) is checked by a walk of the items from the
        last request end, once per place in the stream.
        """
        start = max(self._fed - left, self._known_end)
        window = self._mirror_slice(start, min(self._fed, self._fed - left + 1024 + 32))
        found = list(_LONG_BULK.finditer(window))
        for t, rx in _LONG_OTHER:
            if t in window:
                found += rx.finditer(window)
        for m in sorted(found, key=lambda m: m.start()) if len(found) > 1 else found:
            if int(m.group(1)) <= PROTO_MAX_BULK or start + m.start() <= self._bulk_checked:
                continue
            self._bulk_checked = start + m.start()
            walk = _HeaderWalk()
            if walk.feed(self._mirror_slice(self._known_end, self._fed)) >= 0:
                self._poisoned = walk.reason
                return True
        return False

    def _trim_mirror(self) -> None:
        keep_from = self._known_end
        if self._vq is not None and self._vpos < keep_from:
            keep_from = self._vpos  # _verify still needs the bytes from there
        mirror = self._mirror
        start = self._mirror_start
        i = 0
        while i < len(mirror) and start + len(mirror[i]) <= keep_from:
            start += len(mirror[i])
            i += 1
        if i:
            del mirror[:i]
            self._mirror_start = start

    def _go_inline(self, null: int = 0, left: int = -1, skip_negative: bool = False) -> bool:
        """Hand the bytes after the last complete request to the inline path if they are one.

        Called (rarely) when hiredis met a byte that starts no RESP item, parsed a RESP item
        that is not an array, or waits inside an item that began right after a request. Redis
        reads any request that does not start with '*' as inline; so does this reader, however
        the bytes were split into reads. True when the reader switched to inline.

        With `null` (hiredis just returned its n-th None since `_known_end`, `left` bytes
        before the end of what it was given, with no trim), only that item is in question:
        False if it is a null aggregate (skipped like "*0"; `_known_end` then moves past it),
        else the switch. It ends in the first KiB of those `left` bytes (see
        _refuse_waiting_bulk), so no more is parsed again.

        With `skip_negative` (hiredis refused what follows the last complete request), a
        request header with a negative length ("*-5", which hiredis refuses) is skipped as Redis
        skips it, and what follows is handed back (True).
        """
        self._trim_mirror()  # only the reads from the last known request end on are joined
        if null and left >= 0:
            data = self._mirror_slice(self._known_end, min(self._fed, self._fed - left + 1024))
        else:
            data = b"".join(self._mirror)[self._known_end - self._mirror_start :]
        # The requests between the last known request end and here were all returned already;
        # parse them again to measure them (see below).
        again = hiredis.Reader()
        again.feed(data)
        pos = 0
        while True:
            try:
                cmd = again.gets()
            except (hiredis.ProtocolError, TypeError):
                break
            if cmd is None:
                if null:
                    null -= 1
                    if not null:  # the null in question
                        if pos < len(data) and data[pos] == _REQUEST_START:
                            if data[pos + 1 : pos + 5] == b"-1\r\n":
                                self._known_end += pos + 5
                                self._nulls = 0
                            return False
                        break
                if data[pos + 1 : pos + 5] == b"-1\r\n" and data[pos] == _REQUEST_START:
                    pos += 5
                    continue
            if cmd is False or type(cmd) is not list or data[pos] != _REQUEST_START:
                break  # (a set '~' or an attribute '|' hiredis returns as a list: inline to Redis)
            # Measured by its bytes, never guessed: every request hiredis returned was walked
            # (_guard), verified (_verify, called first) or holds bulk strings only, so its bytes
            # are its canonical encoding but for the two bytes after each bulk, which neither
            # Redis nor hiredis checks.
            end = pos + _canonical_size(cmd)
            if not data.startswith(encode_command(cmd), pos):
                end = _request_end(data, pos)
                if end < 0:  # cannot be: refused rather than read from a guessed place
                    self.failed = True
                    raise RespProtocolError(self._exact_error("invalid multibulk length"))
            pos = end
        rest = data[pos:]
        window_end = self._known_end + len(data)
        if window_end < self._fed:
            # The re-parse looked at a window only (the KiB after a null): everything hiredis was
            # given past it is handed back too. (Handing back the window alone dropped those
            # bytes, and what followed the gap was framed as Redis never frames it: a command
            # inside an argument ran.)
            rest += self._mirror_slice(window_end, self._fed)
        if not rest:
            return False
        skip = 0
        if rest[0] == _REQUEST_START:
            m = _NEGATIVE_LENGTH.match(rest) if skip_negative else None
            if m is None or int(m.group(1)) < -(2**63):  # (beyond that Redis's string2ll fails)
                self._tail_unchecked = False  # the next request is multibulk: no need to look again
                return False  # inside a multibulk request: waiting for more, or a real protocol error
            skip = m.end()
        self._hand_back(rest, skip)
        return True

    def _hand_back(self, rest: bytes, skip: int = 0) -> None:
        """Leave hiredis: `rest` (the last bytes it was given, from a request start on) goes back
        in front of the held bytes, for the inline path; `skip` of its first bytes are dropped."""
        held = self._from_pending
        self._reset_hiredis()
        if len(rest) <= held:  # the rest is the end of what came from _pending: just step back
            self._ppos -= len(rest)
        else:
            self._pending = rest + self._pending[self._ppos :]
            self._ppos = 0
        self._ppos += skip
        self._chunk = FIRST_CHUNK


# The byte that starts a multibulk request: Redis (processInputBuffer) reads a request whose
# first byte is anything else as an inline line, '~', '|' and '>' included, although hiredis
# reads those as RESP3 aggregates (and returns a set or an attribute as a list, like '*'). So
# this reader does too, wherever the request falls in the stream and however the bytes were
# split into reads: a walk of _guard stops hiredis before such a request (`_HeaderWalk.inline_at`),
# _verify finds it where hiredis read it, and _go_inline where hiredis returned something
# that is no list or waits inside an item.
_REQUEST_START = 0x2A  # '*'
# A request header with a negative length that hiredis refuses ("*-5"; it returns "*-1" as a
# null) and Redis skips, like "*0". string2ll's syntax: no "-0", no leading zeros.
_NEGATIVE_LENGTH = re.compile(rb"\*(-[1-9][0-9]*)\r\n")
# Where a set or attribute header hiredis reads may start: its type byte, then its length's
# first byte (string2ll: a sign or a digit). Literal-prefix searches (see _LONG_BULK).
_SET_START = re.compile(rb"~[-0-9]")
_ATTRIBUTE_START = re.compile(rb"\|[-0-9]")


def _may_start_set(data: bytes) -> bool:
    """Could a set ('~') or attribute ('|') header that hiredis reads start in `data`, a read?

    Such a header is the type byte and a length, which starts with '-' or a digit (string2ll),
    in this read or the next: "a|b" or "~/x" in a value costs no check.
    """
    return ((126 in data and (_SET_START.search(data) is not None or data.endswith(b"~")))
            or (124 in data and (_ATTRIBUTE_START.search(data) is not None or data.endswith(b"|"))))
# A bulk length of 9 digits or more: maybe over PROTO_MAX_BULK (RequestReader._refuse_waiting_bulk).
# One literal-prefix search per type byte present (a character class first is 10x slower).
_LONG_BULK = re.compile(rb"\$([0-9]{9,})\r\n")
_LONG_OTHER = [(bytes([t]), re.compile(re.escape(bytes([t])) + rb"([0-9]{9,})\r\n")) for t in b"=!"]


# An aggregate header of 7 or more digits (1,000,000 items and up): the cheap first test of
# RequestReader._guard, a literal-prefix search, or a translation and a search when other type
# bytes than '*' occur (C speed; false hits, such digits inside a value, only cost a walk).
_HUGE_STAR = re.compile(rb"\*[1-9][0-9]{6}")
_LENGTH_TYPES = b"$=!"  # bulk string, verbatim string, blob error: "<t><len>\r\n<bytes>\r\n"
_AGGREGATE_TYPES = b"*%~>|"
_LINE_TYPES = b"+-:_,#("  # one line each


# With any of "%~>|" in it (binary values hold them all), one translation makes every type byte
# a '*' and every digit a '0', and a search for "*0000000" finds each place worth a look (a
# digit run after a type byte): about 2.5x faster than the five regex searches over binary.
_HUGE_TRANSLATION = bytes.maketrans(b"%~>|123456789", b"****000000000")


def _may_hold_huge_header(data: bytes) -> bool:
    if 37 in data or 126 in data or 62 in data or 124 in data:  # % ~ > |
        marked = data.translate(_HUGE_TRANSLATION)
        find = marked.find
        i = find(b"*0000000")
        while i >= 0:
            if data[i + 1] != 48:  # not a leading '0'
                return True
            i = find(b"*0000000", i + 1)
        return False
    return _HUGE_STAR.search(data) is not None


class _HeaderWalk:
    """Finds an aggregate header, at any depth, that announces more than `limit` items (or a bulk
    longer than `max_bulk`), in a stream fed in pieces from where a request starts; see
    RequestReader._guard.

    It walks every item hiredis could read, top-level items of any type included (unless
    strict), building nothing, and keeps its place
    between pieces: the items still owed by each open aggregate, the bytes of a bulk still to
    skip, an unfinished header line. It stops for good (`dead`) where hiredis stops reading: a
    byte that starts no RESP item, or a malformed length.

    With `top_star` (the walks of RequestReader._guard) it also stops at a top-level item that
    does not start with '*', which Redis reads as an inline line, and says where (`inline_at`,
    an offset in the piece fed), so that hiredis is not given it: hiredis would read a set '~'
    or an attribute '|' as a request. Only while every request walked was made of bulk strings
    (`clean`: then the walk's framing is Redis's and hiredis's alike); after a request that
    is not (Redis refuses it, so does the reader), it walks on as hiredis reads.
    """

    __slots__ = ("limit", "max_bulk", "strict", "reason", "left", "skip", "carry", "in_line", "dead",
                 "top_star", "clean", "inline_at")

    def __init__(self, limit: int = MULTIBULK_MAX, max_bulk: int | None = None, strict: bool = False,
                 top_star: bool = False) -> None:
        self.limit = limit
        self.max_bulk = max_bulk  # a longer bulk (string, verbatim, error) is refused too
        # Strict: every element of a request must be a bulk string with a length string2ll
        # reads, as Redis requires; the first that is not is refused in Redis's words, where it
        # starts. The walk stops (`dead`) at a top-level item that is not an aggregate: the
        # reader goes inline there, and starts a new walk when it comes back to hiredis.
        self.strict = strict
        self.reason = ""  # what `feed` found, in Redis's words
        self.left: list[int] = []  # items still to come in each open aggregate
        self.skip = 0  # bytes of a bulk item (and its CRLF) not yet seen
        self.carry = b""  # an unfinished header line, or a CR that may start a line's CRLF
        self.in_line = False  # inside a one-line item, looking for its CRLF
        self.dead = False
        self.top_star = top_star
        self.clean = True  # every request walked so far holds bulk strings only
        self.inline_at = -1  # where an inline request starts (top_star), in the piece fed

    @property
    def at_boundary(self) -> bool:
        """True between two top-level items (nothing to carry over to the next piece)."""
        return self.dead or not (self.left or self.skip or self.carry or self.in_line)

    def _done(self) -> None:
        left = self.left
        while left:  # an item ended: close the aggregates it completes
            left[-1] -= 1
            if left[-1]:
                break
            left.pop()

    def feed(self, data: bytes) -> int:
        """Offset in `data` of a header over the limit (0 if it began in an earlier piece), or -1."""
        if self.dead:
            return -1
        pos = 0
        if self.skip:
            k = min(self.skip, len(data))
            self.skip -= k
            if self.skip:
                return -1
            pos = k
            self._done()
        base = 0
        if self.carry:
            base = len(self.carry)
            data = self.carry + data[pos:]
            pos = 0
            self.carry = b""
        n = len(data)
        strict = self.strict
        if strict:
            bulk_at = _BULK_HEADER.match
            head_at = _REQUEST_HEADER.match
            left = self.left
            cap = PROTO_MAX_BULK if self.max_bulk is None else min(self.max_bulk, PROTO_MAX_BULK)
            limit = self.limit
        while pos < n:
            if strict and not self.in_line:
                # The common items, one regex match each: a request header, and bulk strings
                # that end in this piece. Anything else (a fault, an item that goes on in the
                # next piece, a null or RESP3 header) takes the general way below.
                k = left.pop() if left else 0  # (at most one level: nesting is a fault)
                while True:
                    if k:
                        m = bulk_at(data, pos)
                        if m is None:
                            break
                        count = int(m[1])
                        end = m.end() + count + 2
                        if end > n or count > cap:
                            break
                        pos = end
                        k -= 1
                    else:
                        m = head_at(data, pos)
                        if m is None:
                            break
                        k = int(m[1])
                        if k > limit:
                            k = 0
                            break
                        pos = m.end()
                if k:
                    left.append(k)
                if pos >= n:
                    break
            if self.in_line:
                nl = data.find(b"\r\n", pos)
                if nl < 0:
                    self.carry = b"\r" if data.endswith(b"\r") else b""
                    return -1
                pos = nl + 2
                self.in_line = False
                self._done()
                continue
            t = data[pos]
            if not self.left:
                if t != 0x2A and (self.strict or (self.top_star and self.clean)):
                    # A request that does not start with '*': the reader goes inline here (a
                    # strict walk's requests are all clean: it refuses any other element).
                    self.dead = True
                    if self.top_star:
                        self.inline_at = max(0, pos - base)
                    return -1
            elif t != 0x24:
                if self.strict:  # inside a request: a bulk string, or Redis refuses it here
                    self.reason = f"expected '$', got '{chr(t)}'"
                    return max(0, pos - base)
                self.clean = False
            if t in _LINE_TYPES:
                self.in_line = True
                pos += 1
                continue
            if t not in _AGGREGATE_TYPES and t not in _LENGTH_TYPES:
                self.dead = True  # hiredis refuses this byte and reads no further
                return -1
            nl = data.find(b"\r\n", pos)
            if nl < 0:
                if n - pos > 32:  # no length is this long: hiredis refuses the line
                    self.dead = True
                else:
                    self.carry = data[pos:]
                return -1
            if self.strict and _CANONICAL_COUNT.fullmatch(data, pos + 1, nl) is None:
                # Not a length to string2ll: Redis's words for it, and hiredis refuses it too.
                if self.left:
                    self.reason = "invalid bulk length"
                    return max(0, pos - base)
                self.dead = True  # hiredis refuses the header (invalid multibulk length)
                return -1
            try:
                count = int(data[pos + 1 : nl])
            except ValueError:
                self.dead = True
                return -1
            if t in _AGGREGATE_TYPES:
                if count > self.limit:
                    self.reason = "invalid multibulk length"
                    return max(0, pos - base)
                pos = nl + 2
                if count > 0:
                    self.left.append(count * 2 if t in b"%|" else count)  # maps, attributes: pairs
                else:
                    self._done()
                continue
            if count < 0:
                self.clean = False
            if (self.max_bulk is not None and count > self.max_bulk) or (
                    self.left and (count > PROTO_MAX_BULK or (self.strict and count < 0))):
                # (Only inside a request: a bulk header that starts one is an inline request.)
                self.reason = "invalid bulk length"
                return max(0, pos - base)
            pos = nl + 2
            if count >= 0:
                need = count + 2
                if need > n - pos:
                    self.skip = need - (n - pos)
                    return -1
                pos += need
            self._done()
        return -1


_CANONICAL_COUNT = re.compile(rb"-?[1-9][0-9]*|0")  # what string2ll (Redis, hiredis) reads
_BULK_HEADER = re.compile(rb"\$([1-9][0-9]{0,17}|0)\r\n")
_REQUEST_HEADER = re.compile(rb"\*([1-9][0-9]{0,17})\r\n")
_CANONICAL_LENGTH = re.compile(rb"[1-9][0-9]*|0")


def _request_end(data: bytes, pos: int) -> int:
    """Where the multibulk request of bulk strings at `pos` ends (its real bytes), or -1."""
    n = len(data)
    nl = data.find(b"\r\n", pos)
    if nl < 0 or data[pos] != _REQUEST_START or _CANONICAL_COUNT.fullmatch(data, pos + 1, nl) is None:
        return -1
    count = int(data[pos + 1 : nl])
    pos = nl + 2
    for _ in range(count):
        if pos >= n or data[pos] != 0x24:
            return -1
        nl = data.find(b"\r\n", pos)
        if nl < 0 or _CANONICAL_LENGTH.fullmatch(data, pos + 1, nl) is None:
            return -1
        pos = nl + 4 + int(data[pos + 1 : nl])
        if pos > n:
            return -1
    return pos


# Sizes in the canonical encoding: of a request header "*<n>\r\n" (None for n = 0: an empty
# request, "*0" or "*-1", is measured the exact way) and of a bulk string "$<m>\r\n...\r\n".
_REQUEST_HEADER_SIZE: list[int | None] = [None] + [3 + len(str(i)) for i in range(1, 4096)]
_BULK_SIZE = [5 + i + len(str(i)) for i in range(4096)]


def _bulk_requests_end(buf: bytes, pos: int, cmds: list[list[bytes]]) -> int:
    """Where the requests `cmds`, which hiredis read from `buf` at `pos`, end, checking that
    each element is a bulk string (see RequestReader._verify); IndexError or TypeError when
    that cannot be told this way (a byte that is not '*' or '$' where a header must be, an
    empty request, a length past the tables), and the caller measures them exactly."""
    head = _REQUEST_HEADER_SIZE
    size = _BULK_SIZE
    for cmd in cmds:
        if buf[pos] != 42:  # '*'
            raise IndexError
        pos += head[len(cmd)]
        for a in cmd:
            if buf[pos] != 36:  # '$'
                raise IndexError
            pos += size[len(a)]
    return pos


def _canonical_size(cmd: list[bytes]) -> int:
    n = 3 + len(str(len(cmd)))
    for a in cmd:
        la = len(a)
        n += la + 5 + len(str(la))
    return n


# hiredis's words for a malformed request, and redis-server's for the same (networking.c), so a
# client sees what the server itself would say. A bad item inside a request is, to Redis, an
# item that is not a bulk string.
_REDIS_WORDS = {
    "Bad bulk string length": "invalid bulk length",
    "Bulk string length out of range": "invalid bulk length",
    "Bad multi-bulk length": "invalid multibulk length",
    "Multi-bulk length out of range": "invalid multibulk length",
    "Bad simple string value": "expected '$', got '+'",
    "Bad integer value": "expected '$', got ':'",
    "Bad double value": "expected '$', got ','",
    "Bad bool value": "expected '$', got '#'",
    "Verbatim string 4 bytes of content type are missing or incorrectly encoded.": "expected '$', got '='",
}
_TYPE_BYTE = re.compile(r'got "(.)" as reply type byte')


def _request_error(exc: Exception) -> str:
    """What redis-server answers to the malformed request hiredis refused with `exc`."""
    text = _hiredis_message(exc)
    words = _REDIS_WORDS.get(text)
    if words is not None:
        return words
    m = _TYPE_BYTE.search(text)
    return f"expected '$', got '{m.group(1)}'" if m else text


def _type_byte(cmd: list) -> str:
    """The RESP type byte of the first item of a parsed request that is not a bulk string."""
    for a in cmd:
        if type(a) is not bytes:
            return {int: ":", float: ",", bool: "#", list: "*", dict: "%", set: "~"}.get(type(a), "_")
    return "$"


def _hiredis_message(exc: Exception) -> str:
    if isinstance(exc, TypeError):
        return "expected '$', got a RESP3 map in a request"
    text = str(exc)
    return text[len("Protocol error, ") :] if text.startswith("Protocol error, ") else text


# --------------------------------------------------------------------------------------------
# Backend replies
# --------------------------------------------------------------------------------------------

_SIMPLE = frozenset(b"+-:,#_(")  # one line: status, error, integer, double, bool, null, bignum
_BLOB = frozenset(b"$=!")  # length-prefixed: bulk, verbatim, blob error
_AGG1 = frozenset(b"*~>")  # n children: array, set, push
# '%' (map) has 2n children; '|' (attribute) has 2n children and does not count as a reply.

# Aggregates with at least this many elements are measured by hiredis (C) instead of the
# Python loop below; smaller ones are cheaper in Python than setting up a Reader.
_HIREDIS_MIN_ELEMENTS = 64


class _HiredisMeasure:
    """Find the length of one complete reply with hiredis, recovering its read position.

    hiredis's Reader discards consumed bytes from its buffer whenever a `gets()` call ends with
    at least 1 KiB consumed (redisReaderGetReply: ``if (r->pos >= 1024) sdsrange(...)``), after
    which `len()` is exactly the number of unread bytes. So if the `gets()` that completes the
    reply also trimmed (len() dropped below what was fed since the last trim), the reply was
    ``fed - len()`` bytes long. Otherwise we do not know, and the caller measures it in Python
    (only replies that end within 1 KiB of the previous trim point). The behaviour is checked
    once at import (`_self_test`); if a future hiredis changes it the fast path switches itself
    off rather than mis-framing.
    """

    __slots__ = ("reader", "fed", "hlen", "value")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.reader = hiredis.Reader()
        self.fed = 0
        self.hlen = 0  # what len() says if hiredis has not trimmed since we last looked
        self.value: object = None  # the parsed reply once complete (the MGET merge reuses it)

    def push(self, data: bytes) -> None:
        self.reader.feed(data)
        self.fed += len(data)
        self.hlen += len(data)

    def poll(self) -> int | None:
        """The reply's length if complete and known, 0 if incomplete, None if complete but unknown.

        -1 when hiredis cannot build the reply's value (a RESP3 map keyed by a map or an array:
        valid RESP, but unhashable in Python); the caller then measures it in Python.
        """
        try:
            value = self.reader.gets()
        except hiredis.ProtocolError as exc:
            raise RespProtocolError(_hiredis_message(exc)) from None
        except TypeError:
            return -1
        left = self.reader.len()
        trimmed = left < self.hlen
        self.hlen = left
        if value is False:
            return 0
        self.value = value
        if trimmed:
            return self.fed - left
        if not self.reader.has_data():  # nothing unread: the reply ends where the bytes fed end
            return self.fed
        return None


def _self_test() -> bool:
    m = _HiredisMeasure()
    body = b"*300\r\n" + b"$5\r\nhello\r\n" * 300
    m.push(body + b"+OK\r\n")
    return m.poll() == len(body)


_HIREDIS_MEASURE_OK = _self_test()


class ReplyScanner:
    """Split a backend's byte stream into complete replies, each returned as its exact bytes.

    `feed(data)` then `next()` (bytes of one whole reply, or None when more data is needed).
    RESP3 attributes are kept with the reply they annotate; push messages are returned like
    replies (the splicer never subscribes, so a backend does not send them unasked).

    A reply that arrives in many reads (a 10 MB GET, a 100k-element LRANGE) is not re-joined
    and re-scanned on every read: once its size is known (bulk strings) reads are only
    collected until it is complete, and a large aggregate is fed to hiredis as it arrives.
    """

    __slots__ = ("_buf", "_pos", "_parts", "_parts_len", "_need", "_measure", "_measuring", "_parsed", "_blind",
                 "_seam")

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0
        self._parts: list[bytes] = []  # reads not yet joined into _buf
        self._parts_len = 0
        self._need = 0  # bytes that must be available before scanning again is worth it
        self._measure = _HiredisMeasure()
        self._measuring = False  # a large aggregate is being fed to hiredis across reads
        self._parsed: tuple[bytes, object] | None = None  # the last reply hiredis measured, parsed
        # The reply being read holds an item hiredis cannot measure (_blind_spot): walk it here.
        self._blind = False
        self._seam = b""  # the last bytes fed to hiredis, to see a "\r\n|" split between reads

    def feed(self, data: bytes) -> None:
        """Add bytes read from the backend."""
        if self._measuring:
            if _blind_spot(self._seam + data[:2]) or _blind_spot(data):
                self._measuring = False  # next() joins the reads and walks the reply in Python
                self._blind = True
            else:
                self._measure.push(data)
                self._seam = (self._seam + data[-2:])[-2:]
            self._parts.append(data)
            self._parts_len += len(data)
            return
        if self._need and len(self._buf) - self._pos + self._parts_len + len(data) < self._need:
            self._parts.append(data)
            self._parts_len += len(data)
            return
        if self._pos >= len(self._buf) and not self._parts:
            self._buf = bytes(data)
            self._pos = 0
        else:
            self._parts.append(data)
            self._join()

    def _join(self) -> None:
        self._buf = self._buf[self._pos :] + b"".join(self._parts)
        self._pos = 0
        self._parts = []
        self._parts_len = 0

    @property
    def buffered(self) -> int:
        """Bytes held that are not yet part of a returned reply."""
        return len(self._buf) - self._pos + self._parts_len

    def drain(self, limit: int) -> list[bytes]:
        """Up to `limit` complete replies (exact bytes), in order."""
        out: list[bytes] = []
        self._parsed = None  # only kept for the caller of this drain
        if self._parts and not self._measuring:
            if self._need and len(self._buf) - self._pos + self._parts_len < self._need:
                # A large reply is still arriving: joining (and scanning) all of it on every
                # read made a 50 MB GET quadratic. feed() collects reads until it is complete.
                return out
            self._join()
        # What was needed is here: a stale _need would hold back the replies after it (the
        # fast path below returns the completed reply without next(), which resets it).
        self._need = 0
        # Inline fast path for runs of one-line and bulk replies (most of a pipelined stream).
        buf = self._buf
        pos = self._pos
        end = len(buf)
        find = buf.find
        append = out.append
        left = limit
        startswith = buf.startswith
        try:
            while left and pos < end:
                t = buf[pos]
                if t == 0x24:  # $
                    nl = find(b"\r\n", pos)
                    if nl < 0:
                        break
                    n = int(buf[pos + 1 : nl])
                    stop = nl + n + 4 if n >= 0 else nl + 2
                    if stop > end:
                        break
                    append(buf[pos:stop])
                elif startswith(OK, pos):  # the commonest reply to writes: no slice needed
                    stop = pos + 5
                    append(OK)
                elif t == 0x2B or t == 0x3A or t == 0x2D:  # + : -
                    nl = find(b"\r\n", pos)
                    if nl < 0:
                        break
                    stop = nl + 2
                    append(buf[pos:stop])
                else:
                    break
                pos = stop
                left -= 1
        except ValueError:
            raise RespProtocolError(f"invalid length {buf[pos + 1 : nl][:32]!r}") from None
        self._pos = pos
        while len(out) < limit:
            r = self.next()
            if r is None:
                break
            out.append(r)
        return out

    def take_run(self, run: Callable[[bytes, int], int]) -> bytes:
        """The whole replies at the read position that `run(buf, pos)` frames (it returns the
        offset just past the last of them, `pos` if none), as one bytes object; b"" if none.

        A cheaper framing for a stream of known shapes (`redis_pubsub.message_run`); `next()`
        and `drain()` frame what it leaves.
        """
        if self._measuring or self._blind:
            return b""
        if self._parts:
            if self._need and len(self._buf) - self._pos + self._parts_len < self._need:
                return b""  # a large reply still arriving (see drain)
            self._join()
        buf = self._buf
        pos = self._pos
        stop = run(buf, pos)
        if stop <= pos:
            return b""
        self._pos = stop
        self._need = 0
        return buf if pos == 0 and stop == len(buf) else buf[pos:stop]

    def parsed(self, reply: bytes) -> object:
        """hiredis's parse of `reply` if it is the last reply measured with hiredis, else None.

        Large aggregates are parsed to be measured; a caller that needs the values too (the
        MGET merge) takes them from here instead of parsing the reply a second time.
        """
        p = self._parsed
        if p is not None and p[0] is reply:
            self._parsed = None
            return p[1]
        return None

    def next(self) -> bytes | None:
        """Return the next complete reply (exact bytes), or None if more data is needed."""
        if self._measuring:
            n = self._measure.poll()
            if n == 0:
                return None
            self._measuring = False
            self._join()
            buf = self._buf
            if n is None or n < 0:
                value = self._measure.value if n is None else None
                n = _scan(buf, 0, len(buf))
                if n < 0:  # hiredis gave up before the end (see poll): wait for the rest
                    return None
            else:
                value = self._measure.value
            self._pos = n
            self._blind = False
            reply = buf if n == len(buf) else buf[:n]
            self._parsed = (reply, value)
            return reply
        if self._parts:
            self._join()
        self._need = 0
        buf = self._buf
        pos = self._pos
        end = len(buf)
        if pos >= end:
            return None
        t = buf[pos]
        # Fast paths for the common one-line and bulk replies.
        if t == 0x2B or t == 0x3A or t == 0x2D:  # + : -
            nl = buf.find(b"\r\n", pos)
            if nl < 0:
                return None
            stop = nl + 2
        elif t == 0x24:  # $
            nl = buf.find(b"\r\n", pos)
            if nl < 0:
                return None
            n = _int(buf, pos + 1, nl)
            stop = nl + 2 if n < 0 else nl + n + 4
            if stop > end:
                self._need = stop - pos
                return None
        elif t == 0x2A and _HIREDIS_MEASURE_OK:
            nl = buf.find(b"\r\n", pos)
            if nl < 0:
                return None
            big = _int(buf, pos + 1, nl) >= _HIREDIS_MIN_ELEMENTS
            # A short array can still hold a long one (SCAN's [cursor, keys], EXEC's replies):
            # the walk gives up after a few items and hiredis measures it instead.
            stop = -2 if big else _scan(buf, pos, end, _HIREDIS_MIN_ELEMENTS)
            if stop == -2 and not self._blind:
                m = self._measure
                m.reset()
                m.push(buf[pos:] if pos else buf)
                try:
                    n = m.poll()
                except RespProtocolError:  # a blob error ('!'), which hiredis refuses: walked below
                    n = -1
                # Whatever hiredis made of them, the bytes it read are searched for an item it
                # mis-measures (_blind_spot); only those, so a pipelined read is not searched
                # again for every reply in it.
                if n == 0:
                    if not _blind_spot(buf, pos):
                        # Incomplete: keep feeding hiredis as reads arrive; the bytes so far
                        # stay in _buf (from pos) and later reads collect in _parts.
                        self._measuring = True
                        self._seam = buf[-2:]
                        return None
                    self._blind = True  # walked from now on, not measured again each read
                elif n is not None and n > 0:
                    if not _blind_spot(buf, pos, pos + n):
                        self._pos = pos + n
                        reply = buf if pos == 0 and n == end else buf[pos : pos + n]
                        self._parsed = (reply, m.value)
                        return reply
                # else None: complete, length unknown; -1: hiredis cannot build the value
            if stop == -2:
                stop = _scan(buf, pos, end)
        else:
            stop = _scan(buf, pos, end)
        if stop < 0:
            if stop <= -3:
                # A long bulk inside an aggregate (HGETALL of a 50 MB field) is still coming:
                # reads are collected until it can be complete, not re-joined and re-walked
                # each time (which made such a reply quadratic).
                self._need = _needs(stop) - pos
            return None
        self._pos = stop
        self._blind = False
        if pos == 0 and stop == end:
            return buf
        return buf[pos:stop]


def _int(buf: bytes, start: int, stop: int) -> int:
    try:
        return int(buf[start:stop])
    except ValueError:
        raise RespProtocolError(f"invalid length {buf[start:stop][:32]!r}") from None


def _blind_spot(buf: bytes, pos: int = 0, end: int | None = None) -> bool:
    """Could `buf` (from `pos`) hold an item hiredis measures wrongly inside an aggregate?

    hiredis returns a RESP3 attribute (`|`) as an element of its own, which shifts the length
    `_HiredisMeasure` recovers, and refuses a blob error (`!`). redis-server sends neither
    inside an array, but a reply that may hold one is walked in Python (slower, exact). A value
    that merely contains the bytes costs the walk, not an error.
    """
    if end is None:
        end = len(buf)
    # A one-byte find is a memchr, about 30x faster than a three-byte one over a reply full of
    # CRLFs (1 us against 34 for an MGET part of 500 values): the exact search runs only when
    # the type byte occurs at all.
    find = buf.find
    return ((find(b"|", pos, end) >= 0 and find(b"\r\n|", pos, end) >= 0)
            or (find(b"!", pos, end) >= 0 and find(b"\r\n!", pos, end) >= 0))


def _needs(offset: int) -> int:
    """_scan's answer for "incomplete, and nothing can end before `offset`" (and its inverse)."""
    return -3 - offset


def _scan(buf: bytes, pos: int, end: int, budget: int = 0) -> int:
    """Return the offset just past the reply starting at `pos`, or a negative value if it is
    incomplete: -1, or `_needs(offset)` when a bulk inside it is known to end at `offset` (no
    use looking again before then).

    With a `budget`, -2 once that many items were walked and the reply goes on (the caller
    measures it faster another way).
    """
    need = 1  # replies still to read: aggregates add their children (pre-order walk)
    find = buf.find
    while need:
        if pos >= end:
            return -1
        if budget:
            budget -= 1
            if not budget:
                return -2
        t = buf[pos]
        nl = find(b"\r\n", pos, end)
        if nl < 0:
            return -1
        if t in _SIMPLE:
            pos = nl + 2
            need -= 1
        elif t in _BLOB:
            n = _int(buf, pos + 1, nl)
            pos = nl + 2 if n < 0 else nl + n + 4
            if pos > end:
                return _needs(pos)
            need -= 1
        elif t in _AGG1:
            n = _int(buf, pos + 1, nl)
            pos = nl + 2
            need += n - 1 if n > 0 else -1
        elif t == 0x25:  # % map
            n = _int(buf, pos + 1, nl)
            pos = nl + 2
            need += 2 * n - 1 if n > 0 else -1
        elif t == 0x7C:  # | attribute: its pairs come first, then the reply it annotates
            n = _int(buf, pos + 1, nl)
            pos = nl + 2
            need += 2 * n
        else:
            raise RespProtocolError(f"unknown reply type byte {bytes([t])!r}")
    return pos


# --------------------------------------------------------------------------------------------
# Encoders (replies the splicer builds itself, and commands it sends)
# --------------------------------------------------------------------------------------------


# "$<len>\r\n" for short lengths, so long argument lists and arrays are encoded by C-level
# map/join without a Python-level format call per element.
_BULK_HDR = [b"$%d\r\n" % i for i in range(4096)]
_BULK_HDR_NOCRLF = [b"$%d" % i for i in range(4096)]
_CRLF = b"\r\n"


def encode_bulks(values: list[bytes]) -> list[bytes]:
    """Each value encoded as a bulk string (values must be bytes; no None)."""
    try:
        return list(map(b"".join, zip(map(_BULK_HDR.__getitem__, map(len, values)), values, repeat(_CRLF))))
    except IndexError:  # a value of 4 KiB or more: the plain way
        return [b"$%d\r\n%s\r\n" % (len(v), v) for v in values]


def _bulk_list(values: list[bytes], extra: int = 1) -> list[bytes]:
    """[hdr0, v0, hdr1, v1, ..., b"" * extra]: joined with CRLF, the values as bulk strings.

    Two extended-slice assignments fill it from C-level maps: no tuple or bytes object per
    element, about half the cost of zipping headers, values and CRLFs. IndexError for a value
    of 4 KiB or more (the header table's size): callers then take the plain way.
    """
    n = len(values)
    parts = [b""] * (2 * n + extra)
    parts[0 : 2 * n : 2] = map(_BULK_HDR_NOCRLF.__getitem__, map(len, values))
    parts[1 : 2 * n : 2] = values
    return parts


def join_bulks(values: list[bytes | None], proto: int = 2) -> bytes:
    """`values` encoded as consecutive bulk strings (None as the protocol's null), one bytes.

    One join over headers and values built by C-level map and slice assignment: no bytes
    object per element (what a 1000-key MGET's merged reply needs).
    """
    try:
        return _CRLF.join(_bulk_list(values))  # type: ignore[arg-type]
    except (TypeError, IndexError):  # a None (len() fails), or a value of 4 KiB or more
        pass
    null = b"_\r\n" if proto == 3 else b"$-1\r\n"
    return b"".join([null if v is None else b"$%d\r\n%s\r\n" % (len(v), v) for v in values])


def encode_command(args: list[bytes]) -> bytes:
    """Encode a command as a RESP multibulk (what clients and backends expect)."""
    n = len(args)
    if n == 2:  # one format call for the commonest shapes (GET k, SET k v): the hot path
        a, b = args
        return b"*2\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(a), a, len(b), b)
    if n == 3:
        a, b, c = args
        return b"*3\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(a), a, len(b), b, len(c), c)
    try:
        parts = _bulk_list(args)
    except IndexError:
        return b"*%d\r\n" % n + b"".join([b"$%d\r\n%s\r\n" % (len(a), a) for a in args])
    if not n:
        return b"*0\r\n"
    parts[0] = b"*%d\r\n" % n + parts[0]
    return _CRLF.join(parts)


def encode_bulk(value: bytes | None, proto: int = 2) -> bytes:
    """A bulk string, or the protocol's null when `value` is None."""
    if value is None:
        return b"_\r\n" if proto == 3 else b"$-1\r\n"
    return b"$%d\r\n%s\r\n" % (len(value), value)


def encode_null(proto: int = 2) -> bytes:
    """The null reply (RESP3 ``_``, RESP2 null bulk)."""
    return b"_\r\n" if proto == 3 else b"$-1\r\n"


def encode_int(value: int) -> bytes:
    """An integer reply."""
    return b":%d\r\n" % value


def encode_simple(text: str | bytes) -> bytes:
    """A status reply (``+text``); CR and LF are not allowed in it."""
    raw = text.encode() if isinstance(text, str) else text
    if b"\r" in raw or b"\n" in raw:
        raise ValueError("a status reply cannot contain CR or LF")
    return b"+" + raw + b"\r\n"


def encode_error(text: str) -> bytes:
    """An error reply. `text` starts with its code (ERR, WRONGTYPE, NOAUTH...); newlines become spaces."""
    return b"-" + text.replace("\r", " ").replace("\n", " ").encode() + b"\r\n"


def encode_array_header(n: int) -> bytes:
    """Header of an array of `n` elements (the elements follow, already encoded)."""
    return b"*%d\r\n" % n


def encode_map(pairs: list[tuple[bytes, bytes]], proto: int) -> bytes:
    """A map of already-encoded keys and values: RESP3 ``%``, or a flat array in RESP2."""
    head = b"%%%d\r\n" % len(pairs) if proto == 3 else b"*%d\r\n" % (2 * len(pairs))
    return head + b"".join(k + v for k, v in pairs)


def encode_value(value: object, proto: int = 2) -> bytes:
    """Encode a plain Python value: bytes/str as bulk, int, None, list, dict (map)."""
    if value is None:
        return encode_null(proto)
    if isinstance(value, bool):
        return (b"#t\r\n" if value else b"#f\r\n") if proto == 3 else b":%d\r\n" % int(value)
    if isinstance(value, int):
        return b":%d\r\n" % value
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, (bytes, bytearray)):
        return b"$%d\r\n%s\r\n" % (len(value), value)
    if isinstance(value, (list, tuple)):
        return b"*%d\r\n" % len(value) + b"".join(encode_value(v, proto) for v in value)
    if isinstance(value, dict):
        return encode_map([(encode_value(k, proto), encode_value(v, proto)) for k, v in value.items()], proto)
    raise TypeError(f"cannot encode {type(value).__name__} as RESP")
