"""shmfabric.net: zero-copy header views, 5-tuples, checksums and packet builders.

    from shmfabric.net import decode, classify_batch
    pkt = decode(frame)                 # Packet: .eth .arp .ip .l4 .reason (never raises)
    keys = classify_batch(frames, counter)  # 5-tuple or Reason per frame, fast path

Modules: ethernet, arp, ip (IPv4/IPv6), l4 (TCP/UDP/ICMP/ICMPv6), checksum, flow, packet, build,
errors. See docs/net.md.
"""
from .arp import ARP
from .errors import MalformedError, Reason, ReasonCounter
from .ethernet import Ethernet, VlanTag
from .flow import (
    FlowKey, canonical, classify_batch, flow_hash, icmp_error_quote, icmp_type, ip_payload_span, is_icmp_error,
    l4_payload_span, parse_5tuple, parse_5tuple_ip, symmetric_hash, tcp_flags,
)
from .ip import IPv4, IPv6, ip_view
from .l4 import ICMP, TCP, UDP, ICMPv6
from .packet import LINK_ETHERNET, LINK_IP, Packet, decode

__all__ = [
    "ARP", "Ethernet", "VlanTag", "IPv4", "IPv6", "ip_view", "TCP", "UDP", "ICMP", "ICMPv6",
    "Packet", "decode", "LINK_ETHERNET", "LINK_IP",
    "FlowKey", "parse_5tuple", "parse_5tuple_ip", "classify_batch", "tcp_flags", "l4_payload_span", "ip_payload_span", "icmp_error_quote", "icmp_type", "is_icmp_error", "flow_hash", "symmetric_hash", "canonical",
    "MalformedError", "Reason", "ReasonCounter",
]
