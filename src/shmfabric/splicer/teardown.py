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
import socket
import struct
import termios
from typing import Callable

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
                    seconds: float = LINGER_SECONDS, abortive: bool = False, idle: float | None = None) -> None:
    """Half-close `transport` once its buffered answers are written, and close it when the client
    closes its side (its protocol's `eof_received` must then return False, and its
    `data_received` drop what comes), or `seconds` after the answers have reached the client
    (left both our buffer and the kernel's), or when the client has taken none of them for
    `seconds` (it stopped reading). With `peer_eof` (the client has closed its side already)
    there is nothing to wait for: a plain close. Under TLS (no half-close), the close (TLS's
    close_notify) waits for the answers to reach the client first, giving up on a client that
    takes none of them for `idle` seconds (`seconds` when not given; the HTTP splicer passes
    its timeouts.client_idle, its bound on a client that reads nothing). With
    `abortive` (the last answer broke off, and only the end of the connection delimits it),
    the end is a reset, after the answers have reached the client, so that the client cannot
    take the cut answer for a complete one. Calling it again does nothing."""
    if transport.is_closing() or transport in _lingering:
        return
    if abortive:
        _deliver_then(transport, loop, seconds if idle is None else idle, _reset)
        return
    if peer_eof:
        transport.close()
        return
    if not transport.can_write_eof():
        # TLS: close() is TLS's own staged close (close_notify after what is buffered, then the
        # client's records are read and dropped until its close_notify), but its timer
        # (ssl_shutdown_timeout) runs from close() and covers the writing of what is buffered:
        # when it fires, what the client has not taken yet is dropped. So close() comes once the
        # answers have reached the client, and the timer covers the close_notify exchange only.
        _deliver_then(transport, loop, seconds if idle is None else idle, _close)
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


#: How often a connection waiting for its answers to be taken (`_deliver_then`) is looked at
#: while they are: the close (close_notify, the reset) follows the last byte's delivery by at
#: most this. While the client takes nothing, the looks space out to _POLL_MAX.
_POLL_SECONDS = 0.05
_POLL_MAX = 1.0


def _close(transport: asyncio.Transport) -> None:
    transport.close()


def _reset(transport: asyncio.Transport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:  # SO_LINGER 0: the close is a reset, not a FIN (or TLS's close_notify)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except (OSError, ValueError, AttributeError):
            pass
    transport.abort()


def _deliver_then(transport: asyncio.Transport, loop: asyncio.AbstractEventLoop, idle: float,
                  end: Callable[[asyncio.Transport], None]) -> None:
    """`end(transport)` once the bytes written to it have reached the client (our buffer, TLS's
    own and the kernel's are empty), or once the client has taken none of them for `idle`
    seconds (it stopped reading: what is left is given up). Meanwhile the client's bytes are
    read (its protocol drops them), so that none is left unread to make the kernel reset the
    connection. (A slow reader's bytes can sit still for seconds at a time although it reads:
    a receive window too small to announce is reopened by the sender's zero-window probes,
    whose interval doubles each time. So the bound is the splicer's idle one, not a short one.)"""
    try:
        transport.resume_reading()
    except (OSError, RuntimeError):
        pass
    _lingering.add(transport)
    state = [-1, loop.time(), _POLL_SECONDS]  # bytes pending at the last look, when they last fell, next look

    def check() -> None:
        if transport.is_closing():  # closed meanwhile (the client's close ends a TLS connection)
            _lingering.discard(transport)
            return
        # get_write_buffer_size: under TLS, the application data not yet encrypted and the
        # records not yet handed to the socket's transport; _unsent: the kernel's send queue.
        pending = transport.get_write_buffer_size() + _unsent(transport)
        now = loop.time()
        if pending > 0:
            if state[0] < 0 or pending < state[0]:
                state[0], state[1], state[2] = pending, now, _POLL_SECONDS
            else:
                state[2] = min(state[2] * 2, _POLL_MAX)
            if now - state[1] < idle:
                loop.call_later(state[2], check)
                return
        _lingering.discard(transport)
        end(transport)

    loop.call_soon(check)
