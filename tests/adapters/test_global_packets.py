"""What the global address's dispatcher reads from packets and the answers it builds, without
sockets: keys of TCP/UDP/ICMP flows, fragments, ICMP errors placed by the packet they quote,
ARP and neighbour-discovery answers checked field by field (and by checksum), the defence of the
address against another host's duplicate address detection, and the refusals of a port nobody
listens on (never to a source that is not one unicast host, nor for a multicast destination)."""
from __future__ import annotations

import ipaddress
import struct

import pytest

from shmfabric.adapters.global_packets import (Drop, Flow, arp_reply, arp_request_for, dad_defence, flow_of_v4,
                                               flow_of_v6, gratuitous_arp, is_dad_for, neighbour_advert, refusal,
                                               solicitation_for, unsolicited_advert)
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
    client6 = ipaddress.ip_address(CLIENT6).packed
    # options and a routing header with no segments left are stepped over
    opts = build.udp_frame(CLIENT6, VIP6, 5353, 53, b"q", ext=[build.ipv6_ext(0, b"\x01\x00"),
                                                                 build.ipv6_ext(60, b"\x01\x00")])
    f = flow_of_v6(ip_of(opts), VIP6_B)
    assert isinstance(f, Flow) and f.key == (17, client6, 5353, 53)
    routed = bytearray(ip_of(build.udp_frame(CLIENT6, VIP6, 5353, 53, b"q", ext=[build.ipv6_ext(43, bytes(6))])))
    assert isinstance(flow_of_v6(bytes(routed), VIP6_B), Flow)
    routed[40 + 3] = 1  # segments left: the global address is not where it ends
    assert flow_of_v6(bytes(routed), VIP6_B) is Drop.EXTENSION
    # a first fragment records itself; the ones after it follow it; an atomic fragment is a packet
    first = flow_of_v6(ip_of(build.udp_frame(CLIENT6, VIP6, 5353, 53, b"x" * 16,
                                             ext=[build.ipv6_fragment(0, True, 5)])), VIP6_B)
    assert isinstance(first, Flow) and first.key == (17, client6, 5353, 53) and first.fragment == (client6, 5, 44)
    later = build.ip_frame(b"y" * 16, src=CLIENT6, dst=VIP6, proto=17, ext=[build.ipv6_fragment(24, False, 5)])
    assert flow_of_v6(ip_of(later), VIP6_B) == ("fragment", (client6, 5, 44))
    atomic = flow_of_v6(ip_of(build.tcp_frame(CLIENT6, VIP6, 1, 443, ext=[build.ipv6_fragment(0, False, 6)])),
                        VIP6_B)
    assert isinstance(atomic, Flow) and atomic.fragment is None
    esp = build.ip_frame(bytes(16), src=CLIENT6, dst=VIP6, proto=50)
    assert flow_of_v6(ip_of(esp), VIP6_B) is Drop.EXTENSION
    chained = ip_of(build.udp_frame(CLIENT6, VIP6, 1, 53, b"q", ext=[build.ipv6_ext(60)] * 9))
    assert flow_of_v6(chained, VIP6_B) is Drop.EXTENSION  # more headers than any packet needs
    for n in range(len(opts) - 14):  # every cut: a verdict, never an exception
        flow_of_v6(ip_of(opts)[:n], VIP6_B)
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


def _ns(src: str, target: str, dst: str = "ff02::1:ff00:64", hop_limit: int = 255, option: bool = True) -> bytes:
    t = ipaddress.ip_address(target).packed
    body = bytes((135, 0, 0, 0, 0, 0, 0, 0)) + t + (bytes((1, 1)) + MAC_C if option else b"")
    return ip_of(build.ip_frame(build.icmpv6(135, 0, body[8:], src=src, dst=dst),
                                src=src, dst=dst, proto=58, hop_limit=hop_limit))


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


def test_duplicate_address_detection_for_the_global_address_is_told_apart_and_defended() -> None:
    # A host probing fd00::64: from ::, to fd00::64's solicited-node group, no source link-layer option.
    dad = _ns("::", VIP6, option=False)
    assert is_dad_for(dad, VIP6_B) and is_dad_for(memoryview(dad), VIP6_B)
    assert solicitation_for(dad, VIP6_B) is None  # (unchanged: no unicast answer to it)
    assert not is_dad_for(_ns(CLIENT6, VIP6), VIP6_B)  # an ordinary resolution: solicitation_for's
    assert not is_dad_for(_ns("::", "fd00::9", dst="ff02::1:ff00:9", option=False), VIP6_B)  # another address
    assert not is_dad_for(_ns("::", VIP6, dst="ff02::1", option=False), VIP6_B)  # not its group: invalid
    assert not is_dad_for(_ns("::", VIP6, hop_limit=64, option=False), VIP6_B)  # routed: invalid
    assert not is_dad_for(ip_of(build.udp_frame("::", "ff02::1:ff00:64", 1, 2, b"x" * 40)), VIP6_B)
    for n in range(len(dad)):  # every cut: a verdict, never an exception
        assert not is_dad_for(dad[:n], VIP6_B)
    na = dad_defence(MAC_D, VIP6_B)
    ip, icmp = na[14:54], na[54:]
    assert na[:6] == b"\x33\x33\x00\x00\x00\x01" and na[6:12] == MAC_D and na[12:14] == b"\x86\xdd"
    assert ip[7] == 255 and ip[8:24] == VIP6_B and ip[24:40] == ipaddress.ip_address("ff02::1").packed
    assert icmp[0] == 136 and icmp[4] & 0xE0 == 0x20  # override, not solicited, not a router
    assert icmp[8:24] == VIP6_B and icmp[24:32] == bytes((2, 1)) + MAC_D  # target link-layer address: ours
    assert verify(icmp, pseudo_header_sum(VIP6_B, ip[24:40], 58, len(icmp)))


def _refuse(frame: bytes, to_mac: bytes = MAC_C) -> bytes | None:
    return refusal(ip_of(frame), MAC_D, to_mac)


def test_a_port_nobody_listens_on_is_refused_to_a_unicast_client() -> None:
    rst = _refuse(build.tcp_frame(CLIENT4, VIP4, 40000, 81, flags="S", seq=1000))
    assert rst is not None and rst[:6] == MAC_C and rst[6:12] == MAC_D
    assert rst[26:30] == ipaddress.ip_address(VIP4).packed and rst[30:34] == ipaddress.ip_address(CLIENT4).packed
    assert rst[47] & 0x14 == 0x14 and struct.unpack("!I", rst[42:46])[0] == 1001  # RST|ACK of the SYN
    unreach = _refuse(build.udp_frame(CLIENT4, VIP4, 5353, 54, b"q"))
    assert unreach is not None and unreach[23] == 1 and unreach[34:36] == b"\x03\x03"  # port unreachable
    unreach6 = _refuse(build.udp_frame(CLIENT6, VIP6, 5353, 54, b"q"))
    assert unreach6 is not None and unreach6[20] == 58 and unreach6[54:56] == b"\x01\x04"
    assert unreach6[22:38] == VIP6_B and unreach6[38:54] == ipaddress.ip_address(CLIENT6).packed
    assert _refuse(build.tcp_frame(CLIENT6, VIP6, 40000, 81, flags="S")) is not None
    assert _refuse(build.tcp_frame(CLIENT4, VIP4, 40000, 81, flags="R")) is None  # never a reset to a reset


@pytest.mark.parametrize("src,dst", [
    ("0.0.0.0", VIP4), ("0.1.2.3", VIP4), ("255.255.255.255", VIP4), ("224.0.0.5", VIP4),
    ("239.255.255.250", VIP4), ("127.0.0.1", VIP4), ("240.0.0.1", VIP4), (VIP4, VIP4),
    (CLIENT4, "224.0.0.1"), (CLIENT4, "255.255.255.255"),
    ("::", VIP6), ("ff02::1", VIP6), ("ff05::2", VIP6), ("::1", VIP6), (VIP6, VIP6), (CLIENT6, "ff02::1"),
])
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_no_refusal_to_a_source_that_is_not_one_unicast_host_nor_for_a_group_destination(src: str, dst: str,
                                                                                          proto: str) -> None:
    frame = (build.tcp_frame(src, dst, 40000, 81, flags="S") if proto == "tcp"
             else build.udp_frame(src, dst, 5353, 54, b"q"))
    assert _refuse(frame) is None


def test_no_refusal_to_a_group_link_layer_source_nor_for_a_later_fragment() -> None:
    syn = build.tcp_frame(CLIENT4, VIP4, 40000, 81, flags="S")
    assert _refuse(syn, to_mac=b"\xff" * 6) is None
    assert _refuse(syn, to_mac=b"\x01\x00\x5e\x00\x00\x05") is None
    later = bytearray(ip_of(build.udp_frame(CLIENT4, VIP4, 5353, 54, b"x" * 64)))
    later[6:8] = (0x0003).to_bytes(2, "big")  # offset 24 bytes: data, no UDP header
    assert refusal(bytes(later), MAC_D, MAC_C) is None
    first = bytearray(ip_of(build.udp_frame(CLIENT4, VIP4, 5353, 54, b"x" * 64)))
    first[6:8] = (0x2000).to_bytes(2, "big")  # MF, offset 0: its header is there
    assert refusal(bytes(first), MAC_D, MAC_C) is not None
    good = ip_of(build.udp_frame(CLIENT4, VIP4, 5353, 54, b"q"))
    for n in range(len(good)):  # every cut: an answer or None, never an exception
        refusal(good[:n], MAC_D, MAC_C)
