"""The transports `shmfabric bench transport` compares, in the order they are shown.

Each is a small class (see `base.Transport`); adding one means writing the class and listing
it here. A library that is not installed makes its transport report a 'skipped' row.
"""
from __future__ import annotations

from .base import MODES, ROLES, Spec, Transport, TransportUnavailable
from .fabric import ShmfabricBlockingTransport, ShmfabricPerFrameTransport, ShmfabricTransport
from .fifo import FasterFifoTransport
from .iceoryx import Iceoryx2Transport
from .mp_peers import PipeTransport, QueueTransport
from .sockets import SeqpacketSpinTransport, SeqpacketTransport, UdpTransport
from .zmq_peer import ZmqTransport

#: The baseline every ratio is taken against...
BASELINE = SeqpacketTransport.name
#: ...except the latency of busy-polling receivers, taken against seqpacket busy-polling too.
BASELINE_SPIN = SeqpacketSpinTransport.name


def all_transports() -> list[Transport]:
    """Fresh instances of every transport, baseline first, shmfabric last."""
    return [
        SeqpacketTransport(),
        SeqpacketSpinTransport(),
        UdpTransport(),
        PipeTransport(),
        QueueTransport(),
        ZmqTransport(),
        FasterFifoTransport(),
        Iceoryx2Transport(),
        ShmfabricTransport(),
        ShmfabricPerFrameTransport(),
        ShmfabricBlockingTransport(),
    ]


__all__ = ["BASELINE", "BASELINE_SPIN", "MODES", "ROLES", "Spec", "Transport", "TransportUnavailable", "all_transports"]
