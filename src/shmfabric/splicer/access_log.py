"""The HTTP splicer's access log: one line per answered request, in text or JSON lines.

The formatting is pure (`format_text`, `format_json`: fields in, one line out); `AccessLog` is the
thin shell that buffers lines and writes them once per event-loop pass, so a pipelined burst of
requests costs one write. Lines are written whole: a regular file is opened O_APPEND (each write
lands at the end, so several workers can share one file without splitting a line), and a pipe
gets writes of at most PIPE_BUF bytes ending at a line end (POSIX makes those atomic).

Reopening after rotation: a reload (SIGHUP) starts new workers, which open the path afresh;
logrotate's `copytruncate` works too, since writes are O_APPEND.
"""

from __future__ import annotations

import errno
import json
import os
import re
import select
import stat
import time
from collections import deque
from typing import Any, Callable

__all__ = ["AccessLog", "AccessLogError", "check_log", "format_text", "format_json", "open_log"]

FORMATS = ("text", "json")

# Escaped as \xHH in the text format: control bytes (C0, DEL and C1, which line-splitting tools
# and terminals act on) and every byte from 0x80 up. Values are request bytes decoded as
# latin-1, so a character from 0x80 up *is* one byte of the request: written as UTF-8 it could
# not be told from a real UTF-8 character. The framer already refuses such bytes in targets;
# the Host value and error messages are escaped all the same.
_ESCAPE = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0x100))}
_ESCAPE[ord('"')] = '\\"'
_ESCAPE[ord("\\")] = "\\\\"
#: Longest target or Host written (longer ones end in "..."): a line stays below PIPE_BUF, so
#: workers sharing a pipe cannot interleave it, and a 64 KiB header does not bloat the log.
FIELD_MAX = 1024


class AccessLogError(Exception):
    """The access log cannot be opened (the message says which path and why)."""


_NEEDS_ESCAPE = re.compile(r'[\x00-\x1f\x7f-\xff"\\]').search


def _quote(text: str) -> str:
    # Most values need nothing escaped: one regex scan (C) instead of a dict lookup per character.
    return text.translate(_ESCAPE) if _NEEDS_ESCAPE(text) else text


def _clip(text: str) -> str:
    return text if len(text) <= FIELD_MAX else text[:FIELD_MAX] + "..."


class _Clock:
    """ISO 8601 UTC timestamps with milliseconds; the seconds part is formatted once per second."""

    __slots__ = ("_sec", "_prefix")

    def __init__(self) -> None:
        self._sec = -1
        self._prefix = ""

    def stamp(self, now: float) -> str:
        sec = int(now)
        if sec != self._sec:
            self._sec = sec
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return f"{self._prefix}.{int((now - sec) * 1000):03d}Z"


def format_text(stamp: str, client: str, method: str, target: str, version: str, status: int, sent: int,
                host: str, backend: str, wait: float, total: float, tries: int, seq: int, error: str,
                held: float = 0.0) -> str:
    """One text line: the usual positional head (time, client, "request", status, bytes), then
    key=value fields. Times are seconds, to the millisecond (the event loop's clock)."""
    line = (f'{stamp} {client} "{method} {_quote(_clip(target))} HTTP/{version}" {status} {sent} '
            f'host="{_quote(_clip(host))}" backend={backend} wait={wait:.3f} total={total:.3f} held={held:.3f} '
            f'tries={tries} seq={seq}')
    if error:
        line += f' error="{_quote(error)}"'
    return line + "\n"


def format_json(stamp: str, client: str, method: str, target: str, version: str, status: int, sent: int,
                host: str, backend: str, wait: float, total: float, tries: int, seq: int, error: str,
                held: float = 0.0) -> str:
    """One JSON object per line, the same fields as `format_text` (error only when there is one).
    ASCII only: a request byte from 0x80 up is the code point of the same value (\\u0080-\\u00ff)."""
    record: dict[str, Any] = {
        "time": stamp, "client": client, "method": method, "target": _clip(target), "version": version,
        "status": status, "bytes": sent, "host": _clip(host), "backend": backend,
        "wait": round(wait, 3), "total": round(total, 3), "held": round(held, 3), "tries": tries, "seq": seq,
    }
    if error:
        record["error"] = error
    return json.dumps(record, separators=(",", ":")) + "\n"


def open_log(path: str) -> tuple[int, bool]:
    """(fd, is_stream) for `path`: "-" is standard output; an existing FIFO is opened without
    blocking (there must be a reader); anything else is opened for appending and created (mode
    0644) if missing. is_stream: not a regular file (its writes are polled, see AccessLog).
    AccessLogError with the reason and a fix if it cannot be opened."""
    if path == "-":
        try:
            if stat.S_ISFIFO(os.fstat(1).st_mode):
                # A file description of our own on the same pipe, non-blocking: a write that
                # races another worker's for the last room fails (and waits) instead of blocking
                # the event loop; fd 1's own flags, shared with the master, stay as they are.
                return os.open("/proc/self/fd/1", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC), True
        except OSError:
            pass
        return 1, _is_stream(1)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
    try:
        fifo = stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        fifo = False
    if fifo:
        # A blocking open waits for a reader for ever; this one fails at once instead (ENXIO).
        flags = os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if fifo and exc.errno == errno.ENXIO:
            raise AccessLogError(f"access_log: no process reads the FIFO {path!r}; fix: start its reader "
                                 "first") from None
        raise AccessLogError(f"access_log: cannot open {path!r} for appending: {exc.strerror}; fix: "
                             "point it at a writable file (its directory must exist), or '-' for "
                             "standard output") from None
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return fd, True
    if stat.S_ISDIR(mode):
        os.close(fd)
        raise AccessLogError(f"access_log: {path!r} is a directory; fix: name a file in it")
    return fd, not stat.S_ISREG(mode)


def _is_stream(fd: int) -> bool:
    try:
        return not stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        return True


def check_log(path: str) -> None:
    """AccessLogError if `open_log(path)` would fail for a file; creates nothing and opens no FIFO
    or device (a `--check` run stays dry, and a FIFO's reader does not see an open and close)."""
    if path == "-":
        return
    if os.path.isdir(path):
        raise AccessLogError(f"access_log: {path!r} is a directory; fix: name a file in it")
    if os.path.exists(path):
        if not os.access(path, os.W_OK):
            raise AccessLogError(f"access_log: {path!r} is not writable by this user; fix: its permissions, or "
                                 "another path")
        return
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise AccessLogError(f"access_log: cannot create {path!r}: no directory {folder!r}; fix: create it, or "
                             "point access_log at a file in an existing directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise AccessLogError(f"access_log: cannot create {path!r}: directory {folder!r} is not writable; fix: "
                             "make it writable for this user, or choose another path")


def _pieces(data: bytes, size: int) -> list[bytes]:
    """`data` cut into pieces of at most `size` bytes at line ends (a longer line stays whole)."""
    out = []
    start = 0
    n = len(data)
    while n - start > size:
        cut = data.rfind(b"\n", start, start + size)
        if cut < 0:  # one line longer than size: whole, as one write
            cut = data.find(b"\n", start + size)
            if cut < 0:
                break
        out.append(data[start : cut + 1])
        start = cut + 1
    if start < n:
        out.append(data[start:])
    return out


class AccessLog:
    """Buffered writer of access-log lines for one event loop.

    `record(...)` formats a line and schedules one flush for the end of the loop pass; the lines
    of one pass share its timestamp. Traffic is never held up by the log:

    * a regular file is written at once (the page cache takes it);
    * a pipe, FIFO, socket or terminal (standard output under systemd or a container runtime) is
      written only as far as it takes bytes without blocking (a poll before each write of at
      most PIPE_BUF bytes ending at a line end). The rest waits, up to `MAX_PENDING` bytes, for
      the reader to catch up; past that, lines are dropped.

    A failed write (disk full, no reader left) or an overflow drops lines, counts them in
    `dropped`, and says so once on stderr through `warn`.
    """

    MAX_PENDING = 1 << 20  # bytes held for a slow reader of a pipe before lines are dropped
    RETRY = 0.02  # seconds between tries to write to a pipe that was full

    def __init__(self, path: str, fmt: str = "text", *, loop: Any = None,
                 warn: Callable[[str], None] | None = None) -> None:
        if fmt not in FORMATS:
            raise AccessLogError(f"access_log_format: {fmt!r} is not one of {', '.join(FORMATS)}")
        self.path = path
        self.fd, self._stream = open_log(path)
        self._format = format_text if fmt == "text" else format_json
        self._clock = _Clock()
        self._lines: list[str] = []
        self._stamp: str | None = None  # this loop pass's timestamp; set while a flush is scheduled
        self._pending: deque[bytes] = deque()  # stream only: pieces waiting for the reader
        self._pending_bytes = 0
        self._retry: Any = None
        self._poll: Any = None
        if self._stream:
            self._poll = select.poll()
            self._poll.register(self.fd, select.POLLOUT)
        self.loop = loop
        self.written = 0
        self.dropped = 0
        self._warn = warn
        self._warned = False

    def record(self, client: str, method: str, target: str, version: str, status: int, sent: int, host: str,
               backend: str, wait: float, total: float, tries: int, seq: int, error: str = "",
               held: float = 0.0) -> None:
        """Log one answered request (times in seconds; `error` says why the splicer answered itself;
        `held`: how long the complete answer waited for earlier ones)."""
        if self.fd < 0:
            return  # closed: connections cut at shutdown report after the log is gone
        stamp = self._stamp
        if stamp is None:
            # One timestamp per pass of the event loop (the lines of a pass are written together,
            # within the same millisecond or so): a clock read and a format less per line.
            stamp = self._stamp = self._clock.stamp(time.time())
            if self.loop is not None:
                self.loop.call_soon(self.flush)
        self._lines.append(self._format(stamp, client, method, target, version, status, sent, host, backend, wait,
                                        total, tries, seq, error, held))

    def _drop(self, lines: int, why: str) -> None:
        self.dropped += lines
        if not self._warned and self._warn is not None:
            self._warned = True
            self._warn(f"access log {self.path!r}: {why}; {lines} line(s) dropped, and later drops are counted "
                       "(shmfabric_splicer_access_log_lines_total) without a message")

    def flush(self) -> None:
        """Write the buffered lines now (to a stream: as far as it takes them without blocking)."""
        self._stamp = None
        lines = self._lines
        if lines:
            self._lines = []
            data = "".join(lines).encode("utf-8", "surrogateescape")
            if not self._stream:
                self._write_file(data, len(lines))
                return
            if self._pending_bytes + len(data) > self.MAX_PENDING:
                self._drop(len(lines), f"the reader is {self._pending_bytes} bytes behind")
            else:
                self._pending.extend(_pieces(data, select.PIPE_BUF))
                self._pending_bytes += len(data)
        if self._pending:
            self._write_stream()

    def _write_file(self, data: bytes, nlines: int) -> None:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as exc:
            self._drop(data[len(data) - len(view):].count(b"\n"), f"write failed ({exc.strerror or exc})")
            self.written += data[: len(data) - len(view)].count(b"\n")
            return
        self.written += nlines

    def _write_stream(self, wait_ms: int = 0) -> None:
        pending = self._pending
        while pending:
            piece = pending[0]
            try:
                if not self._poll.poll(wait_ms):
                    raise BlockingIOError
                n = os.write(self.fd, piece)
            except BlockingIOError:  # full (another writer may have filled it since the poll)
                if self._retry is None and self.loop is not None and wait_ms == 0:
                    self._retry = self.loop.call_later(self.RETRY, self._retried)
                return
            except OSError as exc:
                lost = sum(p.count(b"\n") for p in pending)
                pending.clear()
                self._pending_bytes = 0
                self._drop(lost, f"write failed ({exc.strerror or exc})")
                return
            self._pending_bytes -= n
            if n < len(piece):  # a socket took part of it: the rest goes first next time
                pending[0] = piece[n:]
                continue
            pending.popleft()
            self.written += piece.count(b"\n")

    def _retried(self) -> None:
        self._retry = None
        if self.fd >= 0:
            self.flush()

    def close(self, wait: float = 1.0) -> None:
        """Flush and close (standard output is left open). Lines still waiting for a slow reader
        get up to `wait` seconds, then are dropped."""
        self.flush()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._pending:
            deadline = time.monotonic() + wait
            while self._pending and time.monotonic() < deadline:
                self._write_stream(wait_ms=max(1, int((deadline - time.monotonic()) * 1000)))
            if self._pending:
                self._drop(sum(p.count(b"\n") for p in self._pending), "the reader did not take the last lines")
                self._pending.clear()
                self._pending_bytes = 0
        if self.fd != 1:
            os.close(self.fd)
        self.fd = -1
