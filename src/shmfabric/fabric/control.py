"""Control frames of the fabric itself (hello, bye), pure encode/decode.

A control frame goes to the fabric's control address: a group address whose byte 3 has the
control bit (0x80) set, so no user frame can be mistaken for one. Payload: a 4-byte kind, the
sender's node id (u16), its generation (u32) and its name.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

CONTROL_BIT = 0x80
CONTROL_MAC = bytes([0x03, 0x73, 0x66, CONTROL_BIT, 0x00, 0x01])
ETHERTYPE = 0x88B5  # IEEE local experimental
CONTROL_ETHERTYPE = 0x88B6  # IEEE local experimental 2: unicast control messages (manager <-> nodes)
BROADCAST_MAC = b"\xff" * 6
HELLO, HELLO_REPLY, BYE = b"HELO", b"HREP", b"BYE_"
_FMT = struct.Struct("!4sHI")


def is_control_address(mac: bytes) -> bool:
    """True for an address that carries the fabric's control bit."""
    return len(mac) == 6 and mac[0] & 1 == 1 and mac[:3] == CONTROL_MAC[:3] and mac[3] & CONTROL_BIT != 0


def node_mac(node_id: int) -> bytes:
    """The fabric MAC of a node: locally administered, node id in the last two bytes."""
    return bytes([0x02, 0x73, 0x66, 0x00, (node_id >> 8) & 0xFF, node_id & 0xFF])


@dataclass(frozen=True, slots=True)
class Hello:
    kind: bytes
    node: int
    gen: int
    name: str


def encode(kind: bytes, node: int, gen: int, name: str) -> bytes:
    """A whole control frame (header included)."""
    return CONTROL_MAC + node_mac(node) + ETHERTYPE.to_bytes(2, "big") + _FMT.pack(kind, node, gen) + name.encode()[:31]


def decode(frame: bytes) -> Hello | None:
    """Parse a control frame; None for anything that is not one of ours (never raises)."""
    if len(frame) < 14 + _FMT.size or not is_control_address(frame[:6]):
        return None
    kind, node, gen = _FMT.unpack_from(frame, 14)
    if kind not in (HELLO, HELLO_REPLY, BYE):
        return None
    return Hello(kind, node, gen, frame[14 + _FMT.size:].decode(errors="replace"))
