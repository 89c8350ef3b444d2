"""Where an Ethernet frame from a TAP device goes on the fabric (pure: no I/O).

The fabric's unicast MACs are 02:73:66:00:HI:LO with the node id in the last two bytes
(`shmfabric.fabric.control.node_mac`), so a destination MAC names its node without a table.
Group-addressed frames (broadcast, IPv4 and IPv6 multicast: the I/G bit set) are flooded to
every node through the broadcast tape, as a switch without IGMP/MLD snooping floods them.
"""
from __future__ import annotations

from enum import IntEnum

ETH_HLEN = 14
FABRIC_OUI = b"\x02\x73\x66\x00"  # the first four bytes of every fabric node MAC
FLOOD = -1  # classify(): send to every node (broadcast tape)


class Verdict(IntEnum):
    """Why classify() dropped a frame (negative, below FLOOD, so a node id is never mistaken)."""

    SHORT = -2  # shorter than an Ethernet header
    FOREIGN = -3  # unicast to a MAC outside the fabric's space: no node has it
    SELF = -4  # unicast to the adapter's own MAC (the kernel loops those back itself)


def fabric_mac_node(mac: bytes) -> int | None:
    """The node id in a fabric unicast MAC, or None if `mac` is not one."""
    if len(mac) != 6 or mac[:4] != FABRIC_OUI:
        return None
    return (mac[4] << 8) | mac[5]


def classify(frame: bytes | bytearray | memoryview, own_mac: bytes) -> int:
    """A frame's destination: a node id (>= 0), FLOOD, or a (negative) Verdict to drop it."""
    if len(frame) < ETH_HLEN:
        return Verdict.SHORT
    if frame[0] & 1:  # I/G bit: broadcast or multicast
        return FLOOD
    dst = bytes(frame[:6])
    if dst == own_mac:
        return Verdict.SELF
    node = fabric_mac_node(dst)
    return Verdict.FOREIGN if node is None else node


def format_mac(mac: bytes) -> str:
    """aa:bb:cc:dd:ee:ff."""
    return ":".join(f"{b:02x}" for b in mac)
