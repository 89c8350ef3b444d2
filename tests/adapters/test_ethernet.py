"""Where a frame from a TAP device goes (pure: no device, no fabric)."""
from __future__ import annotations

import pytest

from shmfabric.adapters.ethernet import FLOOD, Verdict, classify, fabric_mac_node, format_mac
from shmfabric.fabric.control import node_mac

OWN = node_mac(3)


def frame(dst: bytes, payload: bytes = b"x" * 46) -> bytes:
    return dst + OWN + b"\x08\x00" + payload


@pytest.mark.parametrize("node", [0, 1, 255, 256, 1023, 0xFFFF])
def test_a_fabric_mac_names_its_node(node: int) -> None:
    assert fabric_mac_node(node_mac(node)) == node
    assert classify(frame(node_mac(node)), node_mac(0xFFFE if node != 0xFFFE else 1)) == node


@pytest.mark.parametrize("dst", [
    b"\xff" * 6,                          # broadcast (ARP requests)
    bytes.fromhex("01005e000001"),        # IPv4 multicast
    bytes.fromhex("3333ff000001"),        # IPv6 solicited-node multicast (neighbour discovery)
    bytes.fromhex("037366000000"),        # the fabric's own multicast tape address
])
def test_group_addressed_frames_are_flooded(dst: bytes) -> None:
    assert classify(frame(dst), OWN) == FLOOD


def test_frames_to_nowhere_are_dropped_with_the_reason() -> None:
    assert classify(frame(bytes.fromhex("0242ac110002")), OWN) == Verdict.FOREIGN  # a docker MAC
    assert classify(frame(bytes.fromhex("027366010001")), OWN) == Verdict.FOREIGN  # 4th byte not 0
    assert classify(frame(OWN), OWN) == Verdict.SELF
    assert classify(b"\xff" * 13, OWN) == Verdict.SHORT
    assert classify(b"", OWN) == Verdict.SHORT
    # the drop codes never collide with a node id or with FLOOD
    assert all(v < FLOOD < 0 for v in Verdict)


def test_classify_takes_memoryviews_and_bytearrays() -> None:
    f = frame(node_mac(7))
    assert classify(memoryview(f), OWN) == 7
    assert classify(bytearray(f), OWN) == 7


def test_format_mac() -> None:
    assert format_mac(node_mac(0x1234)) == "02:73:66:00:12:34"
    assert fabric_mac_node(b"\x02\x73\x66\x00\x00") is None  # 5 bytes


# -- virtio_net_hdr in the descriptor's meta ------------------------------------------------------
import struct  # noqa: E402

from shmfabric.adapters.ethernet import (  # noqa: E402
    F_DATA_VALID, F_NEEDS_CSUM, GSO_ECN, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, META_VNET, VNET_ZERO, complete_checksum,
    csum_of, meta_to_vnet, needs_offload, vnet_to_meta)

VNET = struct.Struct("<BBHHHH")


@pytest.mark.parametrize("flags, gso_type, gso_size, csum_start, csum_offset", [
    (F_NEEDS_CSUM, GSO_TCPV4, 1448, 34, 16),            # a TCP/IPv4 segment to cut at 1448
    (F_NEEDS_CSUM, GSO_TCPV6 | GSO_ECN, 8948, 54, 16),  # TCP/IPv6 with ECN, jumbo MSS
    (F_NEEDS_CSUM, 0, 0, 34, 6),                        # a UDP datagram, checksum left to the device
    (F_NEEDS_CSUM, GSO_UDP_L4, 1472, 14 + 255, 6),      # the longest L3 header meta can say
    (F_DATA_VALID, 0, 0, 0, 0),                         # checksum already verified
])
def test_a_virtio_net_header_rides_in_meta_and_comes_back_the_same(flags, gso_type, gso_size, csum_start,
                                                                   csum_offset) -> None:
    hdr_len = 66  # a hint the kernel recomputes: not carried
    vnet = VNET.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)
    meta = vnet_to_meta(vnet)
    assert meta is not None and meta & META_VNET
    assert meta_to_vnet(meta) == VNET.pack(flags, gso_type, 0, gso_size, csum_start, csum_offset)
    assert needs_offload(meta) == bool(gso_type & 0x7F)
    assert csum_of(meta) == ((csum_start, csum_offset) if flags & F_NEEDS_CSUM else None)


def test_a_plain_frame_has_meta_zero_and_headers_meta_cannot_carry_are_refused() -> None:
    assert vnet_to_meta(VNET_ZERO) == 0 and meta_to_vnet(0) == VNET_ZERO
    assert meta_to_vnet(12345) == VNET_ZERO  # another user's meta (bit 31 clear): a plain frame
    assert vnet_to_meta(VNET.pack(F_NEEDS_CSUM, 0, 0, 0, 34, 8)) is None  # SCTP-like offset
    assert vnet_to_meta(VNET.pack(F_NEEDS_CSUM, 0, 0, 0, 14 + 256, 16)) is None  # L3 headers too long
    assert vnet_to_meta(VNET.pack(F_NEEDS_CSUM, 0, 0, 0, 10, 16)) is None  # start inside the Ethernet header
    assert vnet_to_meta(VNET.pack(4, 0, 0, 0, 0, 0)) is None  # an unknown flag


def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


@pytest.mark.parametrize("payload", [b"", b"x", b"hello world", bytes(range(256)) * 5 + b"odd"])
def test_completing_a_udp_checksum_left_to_the_device_gives_the_real_one(payload: bytes) -> None:
    src, dst = bytes([10, 77, 0, 1]), bytes([10, 77, 0, 255])
    udp_len = 8 + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 1, 0, 64, 17, 0, src, dst)
    pseudo = src + dst + struct.pack("!BBH", 0, 17, udp_len)
    # what the kernel leaves for the device: the pseudo-header sum (not complemented) in the field
    partial = _sum16(pseudo)
    frame = bytearray(b"\xff" * 6 + bytes(6) + b"\x08\x00" + ip
                      + struct.pack("!HHHH", 5000, 5999, udp_len, partial) + payload)
    complete_checksum(frame, 34, 6)
    # the real checksum: complement of the sum over pseudo-header + UDP header (field 0) + payload
    want = ~_sum16(pseudo + struct.pack("!HHHH", 5000, 5999, udp_len, 0) + payload) & 0xFFFF or 0xFFFF
    assert struct.unpack("!H", frame[40:42])[0] == want
    # and a receiver's verification (sum over everything, field included) gives all ones
    assert _sum16(pseudo + bytes(frame[34:])) == 0xFFFF


def test_only_arp_and_neighbour_discovery_go_around_the_chain() -> None:
    from shmfabric.adapters.ethernet import routed

    def hdr(et: int) -> bytes:
        return node_mac(1) + OWN + et.to_bytes(2, "big")

    def ip6(dst: str, nxt: int = 6, icmp_type: int = 0) -> bytes:
        return bytes(6) + bytes([nxt, 255]) + bytes(16) + bytes.fromhex(dst) + bytes([icmp_type]) + bytes(7)

    ll, glob = "fe800000000000000000000000000001", "fd000000000000000000000000000001"
    assert routed(hdr(0x0800), b"\x45" + bytes(19))
    assert not routed(hdr(0x0806), bytes(28))  # ARP: straight
    for t in (133, 134, 135, 136, 137):  # RS, RA, NS, NA, redirect: straight, to any address
        assert not routed(hdr(0x86DD), ip6(glob, 58, t)) and not routed(hdr(0x86DD), ip6(ll, 58, t))
    assert routed(hdr(0x86DD), ip6(glob, 58, 128))  # an echo request: through the chain
    assert routed(hdr(0x86DD), ip6(ll, 6))  # TCP to a link-local address: through the chain too
    assert routed(hdr(0x86DD), ip6(glob, 6))
    assert routed(hdr(0x8100), bytes(46))  # VLAN-tagged: through the chain (nothing goes unfiltered)
    assert routed(hdr(0x86DD), bytes(30))  # too short to be neighbour discovery
