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

import json
import os
import re
import select
import stat
import time
from typing import Any, Callable

__all__ = ["AccessLog", "AccessLogError", "check_log", "format_text", "format_json", "open_log"]

FORMATS = ("text", "json")

# Bytes that would break a log line or its quoting, escaped as \xHH in the text format. The
# request framer already refuses control characters in targets; the Host value and error
# messages are escaped all the same, since a log is read by tools that split on them.
_ESCAPE = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}
_ESCAPE[ord('"')] = '\\"'
_ESCAPE[ord("\\")] = "\\\\"


class AccessLogError(Exception):
    """The access log cannot be opened (the message says which path and why)."""


_NEEDS_ESCAPE = re.compile(r'[\x00-\x1f\x7f"\\]').search


def _quote(text: str) -> str:
    # Most values need nothing escaped: one regex scan (C) instead of a dict lookup per character.
    return text.translate(_ESCAPE) if _NEEDS_ESCAPE(text) else text


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
                host: str, backend: str, wait: float, total: float, tries: int, seq: int, error: str) -> str:
    """One text line: the usual positional head (time, client, "request", status, bytes), then
    key=value fields. Times are seconds, to the millisecond (the event loop's clock)."""
    line = (f'{stamp} {client} "{method} {_quote(target)} HTTP/{version}" {status} {sent} '
            f'host="{_quote(host)}" backend={backend} wait={wait:.3f} total={total:.3f} tries={tries} seq={seq}')
    if error:
        line += f' error="{_quote(error)}"'
    return line + "\n"


def format_json(stamp: str, client: str, method: str, target: str, version: str, status: int, sent: int,
                host: str, backend: str, wait: float, total: float, tries: int, seq: int, error: str) -> str:
    """One JSON object per line, the same fields as `format_text` (error only when there is one)."""
    record: dict[str, Any] = {
        "time": stamp, "client": client, "method": method, "target": target, "version": version,
        "status": status, "bytes": sent, "host": host, "backend": backend,
        "wait": round(wait, 3), "total": round(total, 3), "tries": tries, "seq": seq,
    }
    if error:
        record["error"] = error
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"


def open_log(path: str) -> tuple[int, bool]:
    """(fd, is_pipe) for `path`: "-" is standard output; anything else is opened for appending and
    created (mode 0644) if missing. AccessLogError with the reason and a fix if it cannot be."""
    if path == "-":
        fd = 1
    else:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
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


def check_log(path: str) -> None:
    """AccessLogError if `open_log(path)` would fail; creates nothing (a `--check` run stays dry)."""
    if path == "-" or os.path.exists(path):
        fd, _ = open_log(path)
        if fd != 1:
            os.close(fd)
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
    of one pass share its timestamp. A failed
    write (disk full, a closed pipe) drops those lines, counts them in `dropped`, and says so once
    on stderr through `warn`: traffic is never held up by the log.
    """

    def __init__(self, path: str, fmt: str = "text", *, loop: Any = None,
                 warn: Callable[[str], None] | None = None) -> None:
        if fmt not in FORMATS:
            raise AccessLogError(f"access_log_format: {fmt!r} is not one of {', '.join(FORMATS)}")
        self.path = path
        self.fd, self._pipe = open_log(path)
        self._format = format_text if fmt == "text" else format_json
        self._clock = _Clock()
        self._lines: list[str] = []
        self._stamp: str | None = None  # this loop pass's timestamp; set while a flush is scheduled
        self.loop = loop
        self.written = 0
        self.dropped = 0
        self._warn = warn
        self._warned = False

    def record(self, client: str, method: str, target: str, version: str, status: int, sent: int, host: str,
               backend: str, wait: float, total: float, tries: int, seq: int, error: str = "") -> None:
        """Log one answered request (times in seconds; `error` says why the splicer answered itself)."""
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
                                        total, tries, seq, error))

    def flush(self) -> None:
        """Write the buffered lines now."""
        self._stamp = None
        lines = self._lines
        if not lines:
            return
        self._lines = []
        data = "".join(lines).encode("utf-8", "surrogateescape")
        pieces = _pieces(data, select.PIPE_BUF) if self._pipe else [data]
        for i, piece in enumerate(pieces):
            try:
                view = memoryview(piece)
                while view:
                    view = view[os.write(self.fd, view):]
            except OSError as exc:
                lost = sum(p.count(b"\n") for p in pieces[i:])
                self.dropped += lost
                if not self._warned and self._warn is not None:
                    self._warned = True
                    self._warn(f"access log {self.path!r}: write failed ({exc.strerror or exc}); {lost} line(s) "
                               "dropped, and later failures are counted without a message")
                return
        self.written += len(lines)

    def close(self) -> None:
        """Flush and close (standard output is left open)."""
        self.flush()
        if self.fd != 1:
            os.close(self.fd)
            self.fd = -1
