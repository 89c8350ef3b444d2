"""What the global address's dispatcher reads from packets and the answers it builds, without
sockets: keys of TCP/UDP/ICMP flows, fragments, ICMP errors placed by the packet they quote,
ARP and neighbour-discovery answers checked field by field (and by checksum)."""
from __future__ import annotations

import ipaddress
import struct

import pytest

from shmfabric.adapters.global_packets import (Drop, Flow, arp_reply, arp_request_for, flow_of_v4, flow_of_v6,
                                               gratuitous_arp, neighbour_advert, solicitation_for,
                                               unsolicited_advert)
from shmfabric.net import build
from shmfabric.net.checksum import verify, pseudo_header_sum

VIP4 = "10.77.0.100"
VIP4_INT = int(ipaddress.ip_address(VIP4))
CLIENT4 = "10.77.0.1"
VIP6 = "fd00::64"
VIP6_B = ipaddress.ip_address(VIP6).packed
CLIENT6 = "fd00::1"
MAC_D = bytes.fromhex("027366000005")
MAC_C = bytes.fromhex("027366000001")


def ip_of(frame: bytes) -> bytes:
    return frame[14:]


def test_tcp_syn_opens_and_other_segments_do_not() -> None:
    syn = flow_of_v4(ip_of(build.tcp_frame(CLIENT4, VIP4, 40000, 80, flags="S")), VIP4_INT)
    ack = flow_of_v4(ip_of(build.tcp_frame(CLIENT4, VIP4, 40000, 80, flags="A")), VIP4_INT)
    synack = flow_of_v4(ip_of(build.tcp_frame(CLIENT4, VIP4, 40000, 80, flags="SA")), VIP4_INT)
    assert isinstance(syn, Flow) and syn.opening and syn.key == (6, int(ipaddress.ip_address(CLIENT4)), 40000, 80)
    assert isinstance(ack, Flow) and not ack.opening and ack.key == syn.key
    assert isinstance(synack, Flow) and not synack.opening


def test_udp_key_and_packets_for_other_addresses() -> None:
    f = flow_of_v4(ip_of(build.udp_frame(CLIENT4, VIP4, 5353, 53, b"q")), VIP4_INT)
    assert isinstance(f, Flow) and f.key[0] == 17 and f.key[2:] == (5353, 53)
    assert flow_of_v4(ip_of(build.udp_frame(CLIENT4, "10.77.0.9", 5353, 53, b"q")), VIP4_INT) is Drop.NOT_GLOBAL


def test_fragments_the_first_records_the_rest_follow() -> None:
    payload = ip_of(build.udp_frame(CLIENT4, VIP4, 5353, 53, b"x" * 64))
    first = bytearray(payload)
    first[6:8] = (0x2000).to_bytes(2, "big")  # MF, offset 0
    first[4:6] = (77).to_bytes(2, "big")
    f = flow_of_v4(bytes(first), VIP4_INT)
    assert isinstance(f, Flow) and f.fragment == (int(ipaddress.ip_address(CLIENT4)), 77, 17)
    later = bytearray(first)
    later[6:8] = (0x0003).to_bytes(2, "big")  # offset 24 bytes, last
    assert flow_of_v4(bytes(later), VIP4_INT) == ("fragment", f.fragment)


def test_icmp_echo_is_a_flow_by_identifier_and_errors_follow_the_quoted_connection() -> None:
    echo = flow_of_v4(ip_of(build.icmp_echo_frame(CLIENT4, VIP4, identifier=9)), VIP4_INT)
    assert isinstance(echo, Flow) and echo.key == (1, int(ipaddress.ip_address(CLIENT4)), 9, 0) and echo.opening
    # the client says a packet the member sent it (VIP:80 -> CLIENT:40000) was too big
    quoted = ip_of(build.tcp_frame(VIP4, CLIENT4, 80, 40000, flags="A"))[:28]
    err = build.ip_frame(build.icmp(3, 4, quoted, sequence=1500), src=CLIENT4, dst=VIP4, proto=1)
    f = flow_of_v4(ip_of(err), VIP4_INT)
    assert isinstance(f, Flow) and f.key == (6, int(ipaddress.ip_address(CLIENT4)), 40000, 80) and not f.opening
    reply = build.ip_frame(build.icmp(0, 0, b"\x00\x09\x00\x01"), src=CLIENT4, dst=VIP4, proto=1)
    assert flow_of_v4(ip_of(reply), VIP4_INT) is Drop.ICMP_OTHER


def test_malformed_packets_are_named_not_raised() -> None:
    good = ip_of(build.tcp_frame(CLIENT4, VIP4, 40000, 80, flags="S"))
    assert flow_of_v4(good[:10], VIP4_INT) is Drop.SHORT
    assert flow_of_v4(good[:22], VIP4_INT) is Drop.SHORT  # TCP header cut
    bad_ihl = bytearray(good)
    bad_ihl[0] = 0x4F  # 60-byte header in a 40-byte packet
    assert flow_of_v4(bytes(bad_ihl[:40]), VIP4_INT) is Drop.SHORT
    gre = build.ip_frame(b"\x00" * 8, src=CLIENT4, dst=VIP4, proto=47)
    assert flow_of_v4(ip_of(gre), VIP4_INT) is Drop.PROTOCOL
    for n in range(len(good)):  # every cut: a verdict, never an exception
        flow_of_v4(good[:n], VIP4_INT)


def test_ipv6_flows_and_extension_headers() -> None:
    f = flow_of_v6(ip_of(build.tcp_frame(CLIENT6, VIP6, 40000, 443, flags="S")), VIP6_B)
    assert isinstance(f, Flow) and f.key == (6, ipaddress.ip_address(CLIENT6).packed, 40000, 443) and f.opening
    assert flow_of_v6(ip_of(build.tcp_frame(CLIENT6, "fd00::9", 1, 443)), VIP6_B) is Drop.NOT_GLOBAL
    frag = build.tcp_frame(CLIENT6, VIP6, 1, 443, ext=[build.ipv6_fragment(0, True, 5)])
    assert flow_of_v6(ip_of(frag), VIP6_B) is Drop.EXTENSION
    echo = flow_of_v6(ip_of(build.icmp_echo_frame(CLIENT6, VIP6, identifier=3)), VIP6_B)
    assert isinstance(echo, Flow) and echo.key[0] == 58 and echo.key[2] == 3


def test_arp_for_the_global_address_is_answered_with_the_dispatchers_mac() -> None:
    req = build.arp_frame(1, MAC_C, CLIENT4, tpa=VIP4)
    asked = arp_request_for(req, ipaddress.ip_address(VIP4).packed)
    assert asked == (MAC_C, ipaddress.ip_address(CLIENT4).packed)
    assert arp_request_for(build.arp_frame(1, MAC_C, CLIENT4, tpa="10.77.0.9"), ipaddress.ip_address(VIP4).packed) is None
    reply = arp_reply(MAC_D, ipaddress.ip_address(VIP4).packed, *asked)
    assert reply[:6] == MAC_C and reply[6:12] == MAC_D and reply[12:14] == b"\x08\x06"
    _, _, _, _, op, sha, spa, tha, tpa = struct.unpack("!HHBBH6s4s6s4s", reply[14:42])
    assert (op, sha, spa, tha, tpa) == (2, MAC_D, ipaddress.ip_address(VIP4).packed, MAC_C,
                                        ipaddress.ip_address(CLIENT4).packed)
    g = gratuitous_arp(MAC_D, ipaddress.ip_address(VIP4).packed)
    assert g[:6] == b"\xff" * 6 and g[28:32] == g[38:42] == ipaddress.ip_address(VIP4).packed


def _ns(src: str, target: str) -> bytes:
    t = ipaddress.ip_address(target).packed
    body = bytes((135, 0, 0, 0, 0, 0, 0, 0)) + t + bytes((1, 1)) + MAC_C
    return ip_of(build.ip_frame(build.icmpv6(135, 0, body[8:], src=src, dst="ff02::1:ff00:64"),
                                src=src, dst="ff02::1:ff00:64", proto=58, hop_limit=255))


def test_neighbour_solicitations_for_the_global_address_get_a_valid_advertisement() -> None:
    ns = _ns(CLIENT6, VIP6)
    assert solicitation_for(ns, VIP6_B) == ipaddress.ip_address(CLIENT6).packed
    assert solicitation_for(_ns(CLIENT6, "fd00::9"), VIP6_B) is None
    assert solicitation_for(_ns("::", VIP6), VIP6_B) is None  # duplicate address detection: no unicast answer
    na = neighbour_advert(MAC_D, VIP6_B, MAC_C, ipaddress.ip_address(CLIENT6).packed)
    ip = na[14:]
    assert na[:6] == MAC_C and na[6:12] == MAC_D and na[12:14] == b"\x86\xdd"
    assert ip[6] == 58 and ip[7] == 255 and ip[8:24] == VIP6_B
    icmp = ip[40:]
    assert icmp[0] == 136 and icmp[4] & 0x60 == 0x60 and icmp[8:24] == VIP6_B and icmp[24:32] == bytes((2, 1)) + MAC_D
    assert verify(icmp, pseudo_header_sum(VIP6_B, ip[24:40], 58, len(icmp)))
    u = unsolicited_advert(MAC_D, VIP6_B)
    assert u[:6] == b"\x33\x33\x00\x00\x00\x01" and u[14 + 40 + 4] & 0x40 == 0  # not solicited


@pytest.mark.parametrize("vip", [VIP4_INT])
def test_flow_of_v4_reads_any_buffer(vip: int) -> None:
    p = ip_of(build.tcp_frame(CLIENT4, VIP4, 1, 2, flags="S"))
    assert flow_of_v4(memoryview(p), vip).key == flow_of_v4(bytearray(p), vip).key  # type: ignore[union-attr]
