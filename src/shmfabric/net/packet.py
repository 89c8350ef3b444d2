"""`decode()`: parse a whole frame into its header views, never raising for bad input.

This is the convenient, complete path (every view, every field). For the per-packet hot loop of
a function that only needs the 5-tuple, use `shmfabric.net.flow.classify_batch`, which is
several times faster and agrees with `Packet.five_tuple()` on every input (a property test
checks that).
"""
from __future__ import annotations

from struct import Struct
from typing import Union

from .arp import ARP
from .errors import MalformedError, Reason
from .ethernet import ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, Ethernet
from .ip import IPPROTO_ESP, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_NONE, IPPROTO_TCP, IPPROTO_UDP, IPv4, IPv6
from .l4 import ICMP, TCP, UDP, ICMPv6

Buffer = Union[bytes, bytearray, memoryview]

LINK_ETHERNET = "ethernet"  #: the buffer starts with an Ethernet header
LINK_IP = "ip"              #: the buffer starts with an IPv4 or IPv6 header (version nibble decides)

#: Protocols other than TCP/UDP whose first 4 bytes are source and destination port
#: (DCCP, UDP-Lite, SCTP): their ports go into the 5-tuple too.
PORT_PROTOCOLS = frozenset((33, 136, 132))

_PORTS = Struct("!HH")
_L3_ONLY = (IPPROTO_ESP, IPPROTO_NONE)  # IPv6 next headers with nothing classifiable after them


class Packet:
    """The result of `decode()`: views for each layer found, and `reason` if parsing stopped on a
    malformed header (`reason` is None for a well-formed frame, including non-IP ones)."""

    __slots__ = ("buf", "eth", "arp", "ip", "l4", "reason", "error_offset")

    def __init__(self, buf: Buffer) -> None:
        self.buf = buf
        self.eth: Ethernet | None = None
        self.arp: ARP | None = None
        self.ip: IPv4 | IPv6 | None = None
        self.l4: TCP | UDP | ICMP | None = None
        self.reason: Reason | None = None
        self.error_offset: int | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None

    def five_tuple(self) -> tuple | Reason:
        """`(src, dst, proto, sport, dport)`, or the `Reason` it cannot be had.

        Ports are 0 for protocols without them; for ICMP/ICMPv6 queries and their replies (echo;
        for ICMP also timestamp, information, address mask) both are the identifier (so a reply's
        tuple is the request's reversed, as conntrack needs); 0 for other ICMP.
        """
        if self.reason is not None:
            return self.reason
        ip = self.ip
        if ip is None:
            return Reason.NOT_IP
        if not ip.has_l4:
            if ip.version == 6 and ip.proto in _L3_ONLY and not (ip.frag is not None and ip.frag[0]):
                # IPv6 ESP or "no next header" (a whole datagram or its first fragment): an L3
                # flow without ports, as IPv4 ESP is (and as conntrack's generic tracker sees
                # both), not a packet nothing can classify
                return (ip.src, ip.dst, ip.proto, 0, 0)
            return Reason.FRAGMENT if ip.is_fragment else Reason.NO_L4
        l4 = self.l4
        proto = ip.proto
        if l4 is None:
            if proto in PORT_PROTOCOLS:
                sport, dport = _PORTS.unpack_from(self.buf, ip.l4_offset)
                return (ip.src, ip.dst, proto, sport, dport)
            return (ip.src, ip.dst, proto, 0, 0)
        if isinstance(l4, ICMP):
            if l4.has_identifier:
                return (ip.src, ip.dst, proto, l4.identifier, l4.identifier)
            return (ip.src, ip.dst, proto, 0, 0)
        return (ip.src, ip.dst, proto, l4.sport, l4.dport)

    def __repr__(self) -> str:
        layers = [repr(x) for x in (self.eth, self.arp, self.ip, self.l4) if x is not None]
        if self.reason is not None:
            layers.append(f"malformed={self.reason.name}@{self.error_offset}")
        return "<Packet " + " ".join(layers) + ">"


def decode(buf: Buffer, offset: int = 0, link: str = LINK_ETHERNET) -> Packet:
    """Parse `buf` from `offset` as far as it goes. Never raises for malformed input: a bad
    header sets `Packet.reason` (and `error_offset`) and leaves the deeper layers None."""
    pkt = Packet(buf)
    try:
        if link == LINK_ETHERNET:
            eth = pkt.eth = Ethernet(buf, offset)
            etype = eth.ethertype
            off = eth.payload_offset
        elif link == LINK_IP:
            off = offset
            if len(buf) - off < 1:
                raise MalformedError(Reason.TRUNCATED_IPV4, off)
            v = buf[off] >> 4
            etype = ETH_P_IPV6 if v == 6 else ETH_P_IP  # anything else: IPv4 reports BAD_IP_VERSION
        else:
            raise ValueError(f"link must be {LINK_ETHERNET!r} or {LINK_IP!r}, got {link!r}")
        if etype == ETH_P_IP:
            ip: IPv4 | IPv6 = IPv4(buf, off)
        elif etype == ETH_P_IPV6:
            ip = IPv6(buf, off)
        else:
            if etype == ETH_P_ARP:
                pkt.arp = ARP(buf, off)
            return pkt
        pkt.ip = ip
        if not ip.has_l4:
            return pkt
        proto, l4o, end = ip.proto, ip.l4_offset, ip.end
        if proto == IPPROTO_TCP:
            pkt.l4 = TCP(buf, l4o, end)
        elif proto == IPPROTO_UDP:
            pkt.l4 = UDP(buf, l4o, end, ip.first_fragment)
        elif proto == IPPROTO_ICMP and ip.version == 4:
            pkt.l4 = ICMP(buf, l4o, end)
        elif proto == IPPROTO_ICMPV6 and ip.version == 6:
            pkt.l4 = ICMPv6(buf, l4o, end)
        elif proto in PORT_PROTOCOLS and end - l4o < 4:
            raise MalformedError(Reason.TRUNCATED_L4, l4o, f"protocol {proto}")
    except MalformedError as exc:
        pkt.reason = exc.reason
        pkt.error_offset = exc.offset
    return pkt
