"""Kernel sockets: a UNIX SOCK_SEQPACKET socketpair (the baseline) and UDP over loopback."""
from __future__ import annotations

import functools
import socket
from typing import Any

from .base import (
    Ctl,
    Spec,
    Transport,
    drain_until_end,
    frame_middle,
    frame_ping,
    frame_pong,
    frame_receiver,
    frame_sender,
    make_payload,
)

#: Largest UDP payload over IPv4: 65,535 minus the 8-byte UDP and 20-byte IP headers.
UDP_MAX_PAYLOAD = 65507


def _first_with_timeout(sock: socket.socket, bufsize: int, timeout: float) -> Any:
    def first() -> bytes:
        sock.settimeout(timeout)
        try:
            return sock.recv(bufsize)
        finally:
            sock.settimeout(None)

    return first


class SeqpacketTransport(Transport):
    """`socket.socketpair(AF_UNIX, SOCK_SEQPACKET)`: one send()/recv() per frame.

    Message boundaries are kept and delivery is reliable and ordered, so it is the fair kernel
    baseline for frames. The receiver's buffer is the frame size, as with a known MTU.
    """

    name = "seqpacket"
    description = "UNIX SOCK_SEQPACKET socketpair, send()/recv(size) per frame"
    modes = ("throughput", "latency", "forward")

    def setup(self, spec: Spec) -> Any:
        pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)]
        if spec.mode == "forward":
            pairs.append(socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET))
        return pairs

    def cleanup(self, chan: Any) -> None:
        for a, b in chan:
            a.close()
            b.close()

    def throughput_sender(self, chan: Any, spec: Spec, ctl: Ctl) -> dict[str, Any]:
        return frame_sender(chan[0][0].send, make_payload(spec.size), ctl, end=b"")

    def _recv(self, sock: socket.socket, size: int) -> Any:
        """The receive of a frame: a blocking recv(size) (SeqpacketSpinTransport spins instead)."""
        return _bound_recv(sock, size)

    def throughput_receiver(self, chan: Any, spec: Spec, ctl: Ctl) -> dict[str, Any]:
        s = chan[0][1]
        recv = self._recv(s, spec.size)
        return frame_receiver(recv, spec, ctl, drain_until_end(recv),
                              first=_first_with_timeout(s, spec.size, spec.setup_timeout))

    def latency_ping(self, chan: Any, spec: Spec, ctl: Ctl) -> dict[str, Any]:
        s = chan[0][0]
        return frame_ping(s.send, self._recv(s, spec.size), spec, ctl, end=b"")

    def latency_pong(self, chan: Any, spec: Spec, ctl: Ctl) -> dict[str, Any]:
        s = chan[0][1]
        return frame_pong(self._recv(s, spec.size), s.send, ctl)

    def forward_source(self, chan: Any, spec: Spec, ctl: Ctl) -> dict[str, Any]:
        return frame_sender(chan[0][0].send, make_payload(spec.size), ctl, end=b"")

    def forward_middle(self, chan: Any, spec: Spec, ctl: Ctl) -> dict[str, Any]:
        return frame_middle(_bound_recv(chan[0][1], spec.size), chan[1][0].send, ctl)

    def forward_sink(self, chan: Any, spec: Spec, ctl: Ctl) -> dict[str, Any]:
        s = chan[1][1]
        recv = _bound_recv(s, spec.size)
        return frame_receiver(recv, spec, ctl, drain_until_end(recv),
                              first=_first_with_timeout(s, spec.size, spec.setup_timeout))


def _bound_recv(sock: socket.socket, bufsize: int) -> Any:
    """`sock.recv(bufsize)` as a callable without arguments and without a Python frame per call."""
    return functools.partial(sock.recv, bufsize)


def _spin_recv(sock: socket.socket, bufsize: int) -> Any:
    """`sock.recv(bufsize, MSG_DONTWAIT)` retried until a frame is there: a busy-polling receive
    (the process never sleeps in the kernel waiting for the peer)."""
    recv = sock.recv
    flags = socket.MSG_DONTWAIT

    def spin() -> bytes:
        while True:
            try:
                return recv(bufsize, flags)
            except BlockingIOError:
                pass

    return spin


class SeqpacketSpinTransport(SeqpacketTransport):
    """The seqpacket baseline with a busy-polling receive: `recv(size, MSG_DONTWAIT)` in a spin
    loop. Busy-polling receivers (shmfabric's poll mode, iceoryx2) are compared with this one
    for latency, blocking ones with `seqpacket`: spinning alone takes the kernel's sleep and
    wake-up out of a round trip, whatever the transport."""

    name = "seqpacket-spin"
    description = "UNIX SOCK_SEQPACKET socketpair, send() and recv(size, MSG_DONTWAIT) spun until a frame is there"
    modes = ("latency",)

    def busy_polls(self, spec: Spec) -> bool:
        return True

    def _recv(self, sock: socket.socket, size: int) -> Any:
        return _spin_recv(sock, size)


class UdpTransport(Transport):
    """UDP over 127.0.0.1 with connected sockets: one send()/recv() per datagram.

    UDP drops what the receiver cannot keep up with: the figure is frames delivered and touched.
    """

    name = "udp"
    description = "UDP over loopback, connected sockets, send()/recv(size) per datagram (lossy)"
    modes = ("throughput", "latency")
    max_size = UDP_MAX_PAYLOAD
    max_size_reason = "a UDP datagram over IPv4 carries at most 65,507 bytes"

    def setup(self, spec: Spec) -> Any:
        a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            a.bind(("127.0.0.1", 0))
            b.bind(("127.0.0.1", 0))
            a.connect(b.getsockname())
            b.connect(a.getsockname())
        except OSError:
            a.close()
            b.close()
            raise
        return (a, b)

    def cleanup(self, chan: Any) -> None:
        for s in chan:
            s.close()

    def throughput_sender(self, chan: Any, spec: Spec, ctl: Ctl) -> dict[str, Any]:
        # The parent keeps both sockets open until cleanup, so the receiver's port exists
        # for as long as the sender sends (no ICMP 'port unreachable' errors).
        return frame_sender(chan[0].send, make_payload(spec.size), ctl)

    def throughput_receiver(self, chan: Any, spec: Spec, ctl: Ctl) -> dict[str, Any]:
        b = chan[1]

        def drain() -> None:
            # Datagrams can be lost, end frames too: drain until the sender stopped and
            # nothing arrived for a moment.
            b.settimeout(0.05)
            while True:
                try:
                    b.recv(spec.size)
                except (TimeoutError, socket.timeout):
                    if ctl.done.value:
                        return

        return frame_receiver(_bound_recv(b, spec.size), spec, ctl, drain,
                              first=_first_with_timeout(b, spec.size, spec.setup_timeout))

    def latency_ping(self, chan: Any, spec: Spec, ctl: Ctl) -> dict[str, Any]:
        a = chan[0]
        return frame_ping(a.send, _bound_recv(a, spec.size), spec, ctl, end=b"")

    def latency_pong(self, chan: Any, spec: Spec, ctl: Ctl) -> dict[str, Any]:
        # The end frame is a datagram too and could be lost; the harness ends a pong that
        # outlives its ping, so no timeout is needed on every receive here.
        b = chan[1]
        return frame_pong(_bound_recv(b, spec.size), b.send, ctl)
