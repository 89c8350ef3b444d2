"""What the global address's dispatcher reads and writes (pure: no I/O).

`flow_of` reads, from an IP packet sent to the global address, the connection-table key of its
connection (proto, foreign address, foreign port, local port) and whether it may open one (a TCP
SYN); ICMP errors about a connection are placed with it (by the packet they quote), echo requests
as flows of their own (identifier as the port). The ARP and neighbour-discovery answers that make
the global address resolve to the dispatcher's MAC (and defend it against another host's duplicate
address detection) are built here too, and the refusal of a port nobody listens on.
"""
from __future__ import annotations

import struct
from enum import IntEnum
from typing import Union

from shmfabric.net.checksum import l4_checksum

Buffer = Union[bytes, bytearray, memoryview]
ETH_P_IP, ETH_P_ARP, ETH_P_IPV6 = 0x0800, 0x0806, 0x86DD
TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
_V4 = struct.Struct("!BxHHHxBxxII")  # ver/ihl, total length, id, flags/fragment, proto, src, dst
_PORTS = struct.Struct("!HH")
_ARP = struct.Struct("!HHBBH6s4s6s4s")
ICMP_ERRORS_V4 = (3, 4, 5, 11, 12)  # unreachable, source quench, redirect, time exceeded, parameter problem
ICMP_ERRORS_V6 = (1, 2, 3, 4)  # unreachable, packet too big, time exceeded, parameter problem
ALL_NODES_MAC = b"\x33\x33\x00\x00\x00\x01"
ALL_NODES = bytes.fromhex("ff020000000000000000000000000001")
SOLICITED_NODE_PREFIX = bytes.fromhex("ff0200000000000000000001ff")  # + the address's last 3 bytes
_LOOPBACK_V6 = bytes(15) + b"\x01"


class Drop(IntEnum):
    """Why a packet has no key (counted as drop_<name>)."""

    SHORT = 1  # truncated or malformed headers
    NOT_GLOBAL = 2  # not addressed to the global address
    PROTOCOL = 3  # neither TCP, UDP nor ICMP echo/error
    FRAGMENT = 4  # a fragment after the first (placed by the caller from the first's record)
    EXTENSION = 5  # IPv6 with extension headers before the transport header
    ICMP_OTHER = 6  # an ICMP message that is neither an echo request nor an error about a connection


class Flow:
    """The key of a packet's connection and what the caller needs besides."""

    __slots__ = ("key", "opening", "fragment")

    def __init__(self, key: tuple, opening: bool, fragment: tuple | None = None):
        self.key = key  # (proto, foreign address, foreign port, local port)
        self.opening = opening  # TCP: a SYN without ACK
        self.fragment = fragment  # a first fragment: (src, id, proto), for the fragments after it


def flow_of_v4(p: Buffer, vip: int) -> Flow | Drop | tuple:
    """The flow of an IPv4 packet (`p` starts at the IP header). A fragment after the first gives
    ("fragment", (src, id, proto)): the caller places it where its first fragment went."""
    if len(p) < 20:
        return Drop.SHORT
    vihl, tlen, ident, ff, proto, src, dst = _V4.unpack_from(p, 0)
    ihl = (vihl & 15) * 4
    if vihl >> 4 != 4 or ihl < 20 or len(p) < ihl:
        return Drop.SHORT
    if dst != vip:
        return Drop.NOT_GLOBAL
    if ff & 0x1FFF:
        return ("fragment", (src, ident, proto))
    first = (src, ident, proto) if ff & 0x2000 else None
    return _l4(p, ihl, proto, src, ICMP, first, _inner_v4)


MAX_EXTENSIONS = 8  # IPv6 extension headers followed at most (RFC 8200 allows each once, bar one)


def flow_of_v6(p: Buffer, vip: bytes) -> Flow | Drop | tuple:
    """The flow of an IPv6 packet (`p` starts at the IP header). Hop-by-hop and destination
    options, a routing header with no segments left and a fragment header are stepped over; a
    fragment after the first gives ("fragment", (src, id, 44)), as `flow_of_v4` does. A routing
    header with segments left (the global address is not the final destination), ESP and AH
    (the ports are not readable) are Drop.EXTENSION."""
    if len(p) < 40 or p[0] >> 4 != 6:
        return Drop.SHORT
    if bytes(p[24:40]) != vip:
        return Drop.NOT_GLOBAL
    src = bytes(p[8:24])
    nh, at, first = p[6], 40, None
    for _ in range(MAX_EXTENSIONS):
        if nh in (TCP, UDP, ICMPV6):
            break
        if nh not in (0, 43, 44, 60):
            return Drop.EXTENSION if nh in (50, 51, 135, 139, 140) else Drop.PROTOCOL
        if len(p) < at + 8:
            return Drop.SHORT
        if nh == 44:
            off_m = (p[at + 2] << 8) | p[at + 3]
            key = (src, int.from_bytes(bytes(p[at + 4:at + 8]), "big"), 44)
            if off_m & 0xFFF8:
                return ("fragment", key)
            first = key if off_m & 1 else None  # (offset 0 and no more: an atomic fragment, a whole packet)
            nh, at = p[at], at + 8
        else:
            if nh == 43 and p[at + 3]:  # segments left: on its way elsewhere
                return Drop.EXTENSION
            nh, at = p[at], at + (p[at + 1] + 1) * 8
    else:
        return Drop.EXTENSION
    return _l4(p, at, nh, src, ICMPV6, first, _inner_v6)


def _l4(p: Buffer, at: int, proto: int, src, echo_proto: int, first, inner) -> Flow | Drop:
    if proto in (TCP, UDP):
        if len(p) < at + (14 if proto == TCP else 4):
            return Drop.SHORT
        sport, dport = _PORTS.unpack_from(p, at)
        opening = proto == TCP and p[at + 13] & 0x12 == 0x02  # SYN without ACK
        return Flow((proto, src, sport, dport), opening, first)
    if proto != echo_proto:
        return Drop.PROTOCOL
    if len(p) < at + 8:
        return Drop.SHORT
    kind = p[at]
    if kind == (8 if proto == ICMP else 128):  # echo request: a flow of its own, by identifier
        return Flow((proto, src, (p[at + 4] << 8) | p[at + 5], 0), True, first)
    if kind in (ICMP_ERRORS_V4 if proto == ICMP else ICMP_ERRORS_V6):
        key = inner(p, at + 8, src)
        return Flow(key, False, first) if key is not None else Drop.SHORT
    return Drop.ICMP_OTHER


def _inner_v4(p: Buffer, at: int, src: int) -> tuple | None:
    # The quoted packet went from the global address to the client: its destination is the
    # foreign side of the connection, its source port the local one.
    if len(p) < at + 20:
        return None
    vihl, _, _, _, proto, _, dst = _V4.unpack_from(p, at)
    ihl = (vihl & 15) * 4
    if vihl >> 4 != 4 or ihl < 20 or proto not in (TCP, UDP) or len(p) < at + ihl + 4:
        return None
    sport, dport = _PORTS.unpack_from(p, at + ihl)
    return (proto, dst, dport, sport)


def _inner_v6(p: Buffer, at: int, src: bytes) -> tuple | None:
    if len(p) < at + 44 or p[at] >> 4 != 6 or p[at + 6] not in (TCP, UDP):
        return None
    sport, dport = _PORTS.unpack_from(p, at + 40)
    return (p[at + 6], bytes(p[at + 24:at + 40]), dport, sport)


# -- making the global address resolve to the dispatcher ------------------------------------------
def arp_request_for(frame: Buffer, vip: bytes) -> tuple[bytes, bytes] | None:
    """(sender MAC, sender IPv4) of an ARP request for `vip` (4 bytes) in a whole Ethernet frame,
    else None. A probe (sender 0.0.0.0) is answered too: the address is taken."""
    if len(frame) < 14 + _ARP.size or frame[12:14] != b"\x08\x06":
        return None
    htype, ptype, hlen, plen, op, sha, spa, _, tpa = _ARP.unpack_from(frame, 14)
    if htype != 1 or ptype != ETH_P_IP or hlen != 6 or plen != 4 or op != 1 or tpa != vip:
        return None
    return sha, spa


def arp_reply(own_mac: bytes, vip: bytes, to_mac: bytes, to_ip: bytes) -> bytes:
    """The ARP reply saying `vip` is at `own_mac`, to the host that asked."""
    return to_mac + own_mac + b"\x08\x06" + _ARP.pack(1, ETH_P_IP, 6, 4, 2, own_mac, vip, to_mac, to_ip)


def gratuitous_arp(own_mac: bytes, vip: bytes) -> bytes:
    """A broadcast ARP announcement of `vip` at `own_mac` (RFC 5227 ARP announcement): caches that
    hold the global address at another MAC (an earlier dispatcher's) take the new one."""
    return b"\xff" * 6 + own_mac + b"\x08\x06" + _ARP.pack(1, ETH_P_IP, 6, 4, 1, own_mac, vip, bytes(6), vip)


def solicitation_for(payload: Buffer, vip: bytes) -> bytes | None:
    """The source address of an IPv6 neighbour solicitation for `vip` (`payload` starts at the
    IPv6 header), else None. A solicitation from :: (duplicate address detection) is None: it
    gets no unicast answer."""
    if len(payload) < 64 or payload[0] >> 4 != 6 or payload[6] != ICMPV6 or payload[7] != 255:
        return None
    if payload[40] != 135 or payload[41] != 0 or bytes(payload[48:64]) != vip:
        return None
    src = bytes(payload[8:24])
    return None if src == bytes(16) else src


def neighbour_advert(own_mac: bytes, vip: bytes, to_mac: bytes, to_ip: bytes, solicited: bool = True) -> bytes:
    """A neighbour advertisement of `vip` at `own_mac` (override set), to `to_ip` (unicast, as
    an answer) or, unsolicited, to all nodes."""
    flags = (0x60000000 if solicited else 0x20000000).to_bytes(4, "big")  # S|O, or O
    icmp = bytearray(bytes((136, 0, 0, 0)) + flags + vip + bytes((2, 1)) + own_mac)
    csum = l4_checksum(vip, to_ip, ICMPV6, icmp)
    icmp[2:4] = csum.to_bytes(2, "big")
    ip = struct.pack("!IHBB", 0x60000000, len(icmp), ICMPV6, 255) + vip + to_ip
    return to_mac + own_mac + b"\x86\xdd" + ip + bytes(icmp)


def unsolicited_advert(own_mac: bytes, vip: bytes) -> bytes:
    """An unsolicited neighbour advertisement of `vip` to all nodes (IPv6's gratuitous ARP)."""
    return neighbour_advert(own_mac, vip, ALL_NODES_MAC, ALL_NODES, solicited=False)


def is_dad_for(payload: Buffer, vip: bytes) -> bool:
    """Whether an IPv6 packet (`payload` starts at the IPv6 header) is another host's duplicate
    address detection for `vip`: a neighbour solicitation for it from :: to `vip`'s
    solicited-node group (RFC 4862 5.4.2; RFC 4861 7.1.1 discards one from :: to anywhere else)."""
    if len(payload) < 64 or payload[0] >> 4 != 6 or payload[6] != ICMPV6 or payload[7] != 255:
        return False
    if payload[40] != 135 or payload[41] != 0 or bytes(payload[48:64]) != vip:
        return False
    return bytes(payload[8:24]) == bytes(16) and bytes(payload[24:40]) == SOLICITED_NODE_PREFIX + vip[13:16]


def dad_defence(own_mac: bytes, vip: bytes) -> bytes:
    """The answer to another host's duplicate address detection for `vip` (`is_dad_for`): an
    advertisement to all nodes, solicited flag clear, override set (RFC 4861 7.2.4: the asker
    has no address to be answered at yet), so the asker gives the address up."""
    return unsolicited_advert(own_mac, vip)


def refusal(p: Buffer, own_mac: bytes, to_mac: bytes) -> bytes | None:
    """What a host answers to a packet for a port nobody listens on, as a whole frame from
    `own_mac` to `to_mac`: a TCP reset to a segment other than a reset (RFC 9293 3.10.7.1), an
    ICMP port unreachable to a UDP datagram; None for anything else. `p` starts at the IP header
    (whose source gets the answer, from its destination). Without it a client's connect waits
    for its SYN retries to run out (about two minutes) instead of failing at once.

    Never answered (None): a packet whose source is not one unicast host (unspecified, 0/8,
    broadcast, multicast, loopback, class E, or the packet's own destination) or whose
    destination is multicast or broadcast (RFC 1122 3.2.2, RFC 4443 2.4(e), RFC 9293
    3.10.7.1), a non-initial IPv4 fragment (no transport header; RFC 1122 3.2.2), or `to_mac`
    a group address: an answer there would go to many hosts, or to a host that did not ask
    (a spoofed source makes us a reflector)."""
    from shmfabric.net import build

    if to_mac[0] & 1:  # a multicast/broadcast link-layer source: nobody in particular to answer
        return None
    try:
        if len(p) >= 20 and p[0] >> 4 == 4:  # (a cut packet: no addresses to read, nothing to answer)
            ihl, proto, total = (p[0] & 15) * 4, p[9], (p[2] << 8) | p[3]
            if not _answerable_v4(bytes(p[12:16]), bytes(p[16:20])) or (p[6] & 0x1F) | p[7]:
                return None
            src, dst = ipaddress_of(p[12:16]), ipaddress_of(p[16:20])
        elif len(p) >= 40 and p[0] >> 4 == 6:
            ihl, proto, total = 40, p[6], 40 + ((p[4] << 8) | p[5])
            if not _answerable_v6(bytes(p[8:24]), bytes(p[24:40])):
                return None
            src, dst = ipaddress_of(p[8:24]), ipaddress_of(p[24:40])
        else:
            return None
        if proto == TCP:
            sport, dport, seq = struct.unpack_from("!HHI", p, ihl)
            flags, doff = p[ihl + 13], (p[ihl + 12] >> 4) * 4
            if flags & 0x04:  # never answer a reset
                return None
            if flags & 0x10:  # an ACK: the reset takes its acknowledgment number as sequence
                return build.tcp_frame(dst, src, dport, sport, flags="R", seq=struct.unpack_from("!I", p, ihl + 8)[0],
                                       eth_dst=to_mac, eth_src=own_mac)
            ack = (seq + max(0, total - ihl - doff) + (flags & 0x02 and 1) + (flags & 0x01)) & 0xFFFFFFFF
            return build.tcp_frame(dst, src, dport, sport, flags="RA", seq=0, ack=ack, eth_dst=to_mac, eth_src=own_mac)
        if proto == UDP:
            if p[0] >> 4 == 4:
                return build.ip_frame(build.icmp(3, 3, bytes(p[:ihl + 8])), src=dst, dst=src, proto=ICMP,
                                      eth_dst=to_mac, eth_src=own_mac)
            quote = bytes(p[:1232])  # (the answer fits the IPv6 minimum MTU, RFC 4443 2.4)
            return build.ip_frame(build.icmpv6(1, 4, quote, src=dst, dst=src), src=dst, dst=src, proto=ICMPV6,
                                  eth_dst=to_mac, eth_src=own_mac)
    except (IndexError, struct.error):
        return None
    return None


def _answerable_v4(src: bytes, dst: bytes) -> bool:
    # Source: not 0/8 ("this host", RFC 1122 3.2.1.3: only while it learns its address), not
    # loopback (127/8), not multicast or class E (224/3, with 255.255.255.255 in it), not the
    # destination itself (a forged "land" packet). Destination: not multicast, broadcast or
    # class E either.
    # (A subnet's directed broadcast cannot be told here: the dispatcher only refuses packets
    # to the global address, a unicast one.)
    return src[0] not in (0, 127) and src[0] < 224 and src != dst and dst[0] < 224


def _answerable_v6(src: bytes, dst: bytes) -> bool:
    # Source: not ::, not ::1, not multicast (ff00::/8), not the destination itself.
    # Destination: not multicast (IPv6 has no broadcast).
    return src[0] != 0xFF and src != bytes(16) and src != _LOOPBACK_V6 and src != dst and dst[0] != 0xFF


def ipaddress_of(raw: Buffer) -> str:
    """4 or 16 bytes as an address's text."""
    import ipaddress

    return str(ipaddress.ip_address(bytes(raw)))
