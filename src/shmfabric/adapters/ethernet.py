"""Where an Ethernet frame from a TAP device goes on the fabric (pure: no I/O).

The fabric's unicast MACs are 02:73:66:00:HI:LO with the node id in the last two bytes
(`shmfabric.fabric.control.node_mac`), so a destination MAC names its node without a table.
Group-addressed frames (broadcast, IPv4 and IPv6 multicast: the I/G bit set) are flooded to
every node through the broadcast tape, as a switch without IGMP/MLD snooping floods them.
"""
from __future__ import annotations

import struct
import sys
from enum import IntEnum
from typing import Any

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


# -- virtio-net headers (TAP offloads) -----------------------------------------------------------
#
# A TAP adapter's kernel hands it frames whose checksum is left to the device
# (VIRTIO_NET_HDR_F_NEEDS_CSUM) and, on a network whose slots hold 16 KB or more, TCP segments
# of up to 64 KB still to be cut to the MSS (GSO), each behind a 10-byte virtio_net_hdr; the
# receiving adapter's device takes them back the same way, so neither kernel checksums or cuts
# anything and a 64 KB segment crosses the fabric as one frame. The header travels in the descriptor's 32-bit `meta` (no byte is added to the
# frame): bit 31 set, then the fields below. `csum_start` is kept as an offset past the Ethernet
# header (8 bits: L3 headers up to 255 bytes), `csum_offset` as TCP's 16 or UDP's 6.

VNET_LEN = 10
VNET_ZERO = bytes(VNET_LEN)
F_NEEDS_CSUM = 1
F_DATA_VALID = 2
GSO_NONE, GSO_TCPV4, GSO_UDP, GSO_TCPV6, GSO_UDP_L4 = 0, 1, 3, 4, 5
GSO_ECN = 0x80
META_VNET = 1 << 31
# the bits of a meta that leave work to the device (a checksum to complete, a segment to cut):
# a frame without them is written to a device as it is (`needs_offload`, `csum_of`)
META_DEVICE_WORK = F_NEEDS_CSUM << 29 | 7 << 25
_CSUM_OFFSETS = {16: 0, 6: 1}  # TCP, UDP checksum field offsets
_VNET = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset


def vnet_to_meta(vnet: bytes | bytearray) -> int | None:
    """The `meta` carrying a virtio_net_hdr (0 for an all-zero one); None if it cannot be carried
    (a checksum offset other than TCP's or UDP's, or L3 headers past 255 bytes)."""
    if vnet == VNET_ZERO:
        return 0
    flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset = _VNET.unpack(vnet)
    ecn = 1 if gso_type & GSO_ECN else 0
    gso_type &= ~GSO_ECN
    if gso_type > 7 or flags & ~(F_NEEDS_CSUM | F_DATA_VALID):
        return None
    start = 0
    offset = 0
    if flags & F_NEEDS_CSUM:
        start = csum_start - ETH_HLEN
        offset = _CSUM_OFFSETS.get(csum_offset, -1)
        if not 0 <= start <= 255 or offset < 0:
            return None
    return (META_VNET | (flags & 3) << 29 | ecn << 28 | gso_type << 25 | offset << 24 | start << 16
            | (gso_size & 0xFFFF))


def meta_to_vnet(meta: int) -> bytes:
    """The virtio_net_hdr a `meta` carries (all zero for 0 or a meta without bit 31)."""
    if not meta & META_VNET:
        return VNET_ZERO
    flags = (meta >> 29) & 3
    gso_type = (meta >> 25) & 7 | (GSO_ECN if meta >> 28 & 1 else 0)
    start = offset = 0
    if flags & F_NEEDS_CSUM:
        start = ETH_HLEN + ((meta >> 16) & 0xFF)
        offset = 6 if meta >> 24 & 1 else 16
    return _VNET.pack(flags, gso_type, 0, meta & 0xFFFF, start, offset)


def needs_offload(meta: int) -> bool:
    """True if the frame `meta` describes needs a device that segments (GSO) it."""
    return bool(meta & META_VNET) and (meta >> 25) & 7 != GSO_NONE


def csum_of(meta: int) -> tuple[int, int] | None:
    """(csum_start, csum_offset) of a frame whose checksum is left to the device, else None."""
    if not meta & META_VNET or not (meta >> 29) & F_NEEDS_CSUM:
        return None
    return ETH_HLEN + ((meta >> 16) & 0xFF), (6 if meta >> 24 & 1 else 16)


def complete_checksum(frame: bytearray, start: int, offset: int) -> None:
    """Do what a device does for a frame marked NEEDS_CSUM: the ones'-complement sum of
    frame[start:] (the field already holds the pseudo-header sum) stored at start + offset.
    For a frame flooded through the broadcast tape, which carries no `meta` (rare: multicast)."""
    data = bytes(frame[start:])
    if len(data) % 2:
        data += b"\0"
    total = sum(memoryview(data).cast("H"))  # native-endian words: the fold is byte-order independent
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    csum = ~total & 0xFFFF
    if csum == 0 and offset == 6:  # UDP: a zero checksum is sent as all ones
        csum = 0xFFFF
    frame[start + offset:start + offset + 2] = csum.to_bytes(2, sys.byteorder)


# -- ARP probes (RFC 5227): is an IPv4 address already in use on the fabric? --------------------------
ETH_P_ARP = 0x0806
_ARP = struct.Struct("!HHBBH6s4s6s4s")  # htype, ptype, hlen, plen, op, sha, spa, tha, tpa


def arp_probe(mac: bytes, ip: bytes) -> bytes:
    """An ARP probe for IPv4 address `ip` (4 bytes) from `mac`: a broadcast request whose sender
    address is 0.0.0.0, which an owner of `ip` answers and nobody's cache learns from."""
    return (b"\xff" * 6 + mac + ETH_P_ARP.to_bytes(2, "big")
            + _ARP.pack(1, 0x0800, 6, 4, 1, mac, bytes(4), bytes(6), ip))


def arp_claim(frame: bytes | bytearray | memoryview, ip: bytes, own_mac: bytes) -> bytes | None:
    """The MAC of another host that `frame` shows using or probing for `ip`, else None: an ARP
    packet whose sender address is `ip`, or another host's probe for `ip` (RFC 5227, 2.1.1)."""
    if len(frame) < ETH_HLEN + _ARP.size or frame[12:14] != ETH_P_ARP.to_bytes(2, "big"):
        return None
    _, ptype, hlen, plen, _op, sha, spa, _, tpa = _ARP.unpack(bytes(frame[ETH_HLEN:ETH_HLEN + _ARP.size]))
    if ptype != 0x0800 or hlen != 6 or plen != 4 or sha == own_mac:
        return None
    if spa == ip or (spa == bytes(4) and tpa == ip):
        return sha
    return None


def routed(header: bytes | bytearray, payload: Any) -> bool:
    """Whether a unicast frame goes through the chain of functions (`shmfabric adapter --via`):
    everything but the link's own resolution, ARP and IPv6 neighbour discovery (ICMPv6 types
    133-137 right after the IPv6 header), which go straight to the node their MAC names, as they
    never cross a router. IPv6 to link-local addresses and VLAN-tagged frames go through the
    chain too: nothing reaches a peer unfiltered. `payload` is the frame after its Ethernet header."""
    et = (header[12] << 8) | header[13]
    if et == 0x0806:
        return False
    if et != 0x86DD:
        return True
    with memoryview(payload) as v:  # (any buffer: a pool slot's too)
        return not (len(v) > 40 and v[6] == 58 and 133 <= v[40] <= 137)
