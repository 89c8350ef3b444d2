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

__all__ = ["LINGER_SECONDS", "close_lingering"]

#: How long a half-closed connection is read (and what comes is dropped) once its answers are
#: out, before it is closed anyway. The clock starts when the answers have left the buffer.
LINGER_SECONDS = 2.0


def close_lingering(transport: asyncio.Transport, loop: asyncio.AbstractEventLoop, peer_eof: bool = False,
                    seconds: float = LINGER_SECONDS) -> None:
    """Half-close `transport` once its buffered answers are written, and close it when the client
    closes its side (its protocol's `eof_received` must then return False, and its
    `data_received` drop what comes) or `seconds` after the answers have left. With `peer_eof`
    (the client has closed its side already) there is nothing to wait for: a plain close."""
    if transport.is_closing():
        return
    if peer_eof or not transport.can_write_eof():
        transport.close()
        return
    try:
        transport.write_eof()  # FIN after what is buffered
        transport.resume_reading()  # drain the client's bytes, so the final close has none unread
    except OSError:  # the client is gone already (reset): nothing is left to save
        transport.abort()
        return

    def expire() -> None:
        if transport.is_closing():
            return
        if transport.get_write_buffer_size():
            # The client is still reading its answers (slowly): close() would wait for them
            # too, so the clock starts only once they are out.
            loop.call_later(seconds, expire)
            return
        transport.close()

    loop.call_later(seconds, expire)
