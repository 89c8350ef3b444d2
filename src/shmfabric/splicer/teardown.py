"""Closing a client connection without losing the last answers written to it.

A socket closed while the client's bytes are still unread in it makes the kernel answer with a
RST, and a client that receives a RST may throw away answers it has received but not yet read:
exactly the last responses of a pipelining client, which is still sending when the splicer ends
its connection (`Connection: close`, a protocol error, QUIT, a graceful stop). RFC 9112 §9.6
asks for a staged close instead, as nginx's `lingering_close` and HAProxy do: half-close (FIN
after the answers), read and drop what the client still sends until it closes its side, and
close for good after a bound.
"""
from __future__ import annotations

import asyncio
import fcntl
import struct
import termios

__all__ = ["LINGER_SECONDS", "close_lingering"]

#: How long a half-closed connection is read (and what comes is dropped) once its answers are
#: out, before it is closed anyway. The clock starts when the answers have left the buffer.
LINGER_SECONDS = 2.0

_lingering: set[asyncio.Transport] = set()  # half-closed and being read (a second call is a no-op)


def _unsent(transport: asyncio.Transport) -> int:
    """Bytes the kernel still holds to send on this socket (Linux SIOCOUTQ), 0 if unknown."""
    sock = transport.get_extra_info("socket")
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except (AttributeError, OSError, ValueError):
        return 0


def close_lingering(transport: asyncio.Transport, loop: asyncio.AbstractEventLoop, peer_eof: bool = False,
                    seconds: float = LINGER_SECONDS) -> None:
    """Half-close `transport` once its buffered answers are written, and close it when the client
    closes its side (its protocol's `eof_received` must then return False, and its
    `data_received` drop what comes), or `seconds` after the answers have reached the client
    (left both our buffer and the kernel's), or when the client has taken none of them for
    `seconds` (it stopped reading). With `peer_eof` (the client has closed its side already)
    there is nothing to wait for: a plain close. Calling it again does nothing."""
    if transport.is_closing() or transport in _lingering:
        return
    if peer_eof or not transport.can_write_eof():
        # Under TLS, close() is TLS's own staged close: close_notify after what is buffered, then
        # records are read (and dropped) until the client's close_notify or asyncio's shutdown
        # timeout, so the client's unread bytes do not make the kernel reset the connection.
        transport.close()
        return
    try:
        transport.write_eof()  # FIN after what is buffered
        transport.resume_reading()  # drain the client's bytes, so the final close has none unread
    except OSError:  # the client is gone already (reset): nothing is left to save
        transport.abort()
        return
    _lingering.add(transport)

    def check(last: int | None, delivered: bool) -> None:
        if transport.is_closing():
            _lingering.discard(transport)
            return
        # A close with bytes still queued (here or in the kernel) and the client's unread
        # would reset the connection and drop them: wait while the client takes them.
        pending = transport.get_write_buffer_size() + _unsent(transport)
        if pending > 1 and (last is None or pending < last):  # 1: our FIN, until acknowledged
            loop.call_later(seconds, check, pending, False)
        elif pending <= 1 and not delivered:
            loop.call_later(seconds, check, None, True)  # the client's turn to close
        else:
            _lingering.discard(transport)
            transport.close()

    loop.call_soon(check, None, False)
