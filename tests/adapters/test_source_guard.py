"""SourceGuard (`shmfabric adapter --source-check`), frame by frame, without devices."""
from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shmfabric.adapters.ethernet import vnet_to_meta
from shmfabric.adapters.source_guard import (BAD_OFFLOAD, DHCP_SERVER, MALFORMED, ROUTER, SPOOFED_CLAIM, SPOOFED_IP,
                                             SPOOFED_MAC, UNCHECKED, SourceGuard, allowed_prefix, link_local)

MAC = bytes.fromhex("027366000001")
OTHER = bytes.fromhex("027366000002")
OWN4, OWN6 = "10.77.0.1", "fd00::1"
VIP4, VIP6 = "10.77.0.100", "fd00::100"  # global addresses it is a member of: sources, never claims
GUARD = SourceGuard(MAC, [ipaddress.ip_address(OWN4), ipaddress.ip_address(OWN6)],
                    [ipaddress.ip_network("10.9.0.0/16"), ipaddress.ip_network("fd00:9::/64")],
                    shared=[ipaddress.ip_address(VIP4), ipaddress.ip_address(VIP6)])
LL = link_local(MAC)


def eth(ethertype: int, src: bytes = MAC, dst: bytes = OTHER) -> bytes:
    return dst + src + ethertype.to_bytes(2, "big")


def verdict(header: bytes, payload: bytes, tail: bytes = b"", meta: int = 0) -> str | None:
    """The guard's verdict on a payload stored in a larger buffer (`tail` after it, as in a slot)."""
    return GUARD.verdict(bytearray(header), bytearray(payload + tail), len(payload), meta)


def ipv4(src: str) -> bytes:
    return (b"\x45\x00\x00\x1c\x00\x00\x40\x00\x40\x01\x00\x00" + ipaddress.ip_address(src).packed
            + ipaddress.ip_address("10.77.0.2").packed + bytes(8))


def arp(sha: bytes, spa: str, op: int = 2, hw: bytes = b"\x00\x01\x08\x00\x06\x04", tpa: str = "0.0.0.0") -> bytes:
    return hw + op.to_bytes(2, "big") + sha + ipaddress.ip_address(spa).packed + OTHER + ipaddress.ip_address(tpa).packed


def ipv6(src: str, nh: int, body: bytes) -> bytes:
    return (b"\x60\x00\x00\x00" + len(body).to_bytes(2, "big") + bytes((nh, 255))
            + ipaddress.ip_address(src).packed + ipaddress.ip_address("fd00::2").packed + body)


def lla(kind: int, mac: bytes) -> bytes:
    return bytes((kind, 1)) + mac


def ns(target: str, *options: bytes) -> bytes:
    return b"\x87\x00\x00\x00" + bytes(4) + ipaddress.ip_address(target).packed + b"".join(options)


def na(target: str, *options: bytes) -> bytes:
    return b"\x88\x00\x00\x00\x60\x00\x00\x00" + ipaddress.ip_address(target).packed + b"".join(options)


def ext(nh: int, length8: int = 0) -> bytes:
    """An extension header (hop-by-hop, routing, destination options) of (length8 + 1) * 8 bytes."""
    return bytes((nh, length8)) + bytes(6 + length8 * 8)


def frag(nh: int, offset: int) -> bytes:
    return bytes((nh, 0)) + struct.pack("!H", offset << 3) + bytes(4)


def test_link_local_is_the_kernels_eui64_address() -> None:
    assert str(LL) == "fe80::73:66ff:fe00:1"


@pytest.mark.parametrize("src, want", [
    (OWN4, None), ("0.0.0.0", None), ("10.9.200.1", None), (VIP4, None),  # own, DHCP, allowed prefix, global
    ("10.77.0.2", SPOOFED_IP), ("10.10.0.1", SPOOFED_IP), ("255.255.255.255", SPOOFED_IP),
])
def test_ipv4_sources(src: str, want: str | None) -> None:
    assert verdict(eth(0x0800), ipv4(src)) == want


def test_another_source_mac_is_dropped_whatever_the_frame() -> None:
    assert verdict(eth(0x0800, src=OTHER), ipv4(OWN4)) == SPOOFED_MAC
    assert verdict(eth(0x0806, src=OTHER), arp(MAC, OWN4)) == SPOOFED_MAC


def test_a_short_ipv4_header_is_malformed_even_when_the_buffer_is_longer() -> None:
    assert verdict(eth(0x0800), ipv4(OWN4)[:19], tail=bytes(64)) == MALFORMED


@pytest.mark.parametrize("frame, want", [
    (arp(MAC, OWN4), None),                       # a reply (or a request) from its own address
    (arp(MAC, OWN4, op=1), None),
    (arp(MAC, "0.0.0.0", op=1, tpa=OWN4), None),  # a probe (RFC 5227) for its own address
    (arp(MAC, "0.0.0.0", op=1, tpa="10.77.0.2"), SPOOFED_CLAIM),  # for another's: its owner would give it up
    (arp(MAC, "10.9.1.1"), SPOOFED_CLAIM),        # an allowed prefix is a source, not a claim
    (arp(MAC, VIP4), SPOOFED_CLAIM),              # a global address is the dispatcher's to answer for
    (arp(MAC, "10.77.0.2"), SPOOFED_CLAIM),       # another host's address
    (arp(OTHER, OWN4), SPOOFED_MAC),              # its address, another MAC
    (arp(MAC, OWN4, hw=b"\x00\x06\x08\x00\x06\x04"), MALFORMED),  # not Ethernet/IPv4 ARP
    (arp(MAC, OWN4)[:27], MALFORMED),
])
def test_arp(frame: bytes, want: str | None) -> None:
    assert verdict(eth(0x0806), frame) == want


UDP = b"\x12\x34\x00\x35\x00\x08\x00\x00"


@pytest.mark.parametrize("name, frame, want", [
    ("own address", ipv6(OWN6, 17, UDP), None),
    ("own link-local", ipv6(str(LL), 17, UDP), None),
    ("allowed prefix", ipv6("fd00:9::7", 17, UDP), None),
    ("another host's", ipv6("fd00::2", 17, UDP), SPOOFED_IP),
    ("another link-local", ipv6("fe80::73:66ff:fe00:2", 17, UDP), SPOOFED_IP),
    ("UDP from ::", ipv6("::", 17, UDP), SPOOFED_IP),
    ("DAD solicitation from ::", ipv6("::", 58, ns(OWN6)), None),
    ("DAD solicitation of its link-local", ipv6("::", 58, ns(str(LL))), None),
    ("DAD solicitation of another's address", ipv6("::", 58, ns("fd00::2")), SPOOFED_CLAIM),
    ("echo from ::", ipv6("::", 58, b"\x80\x00\x00\x00" + bytes(8)), SPOOFED_IP),
    ("global address as a source", ipv6(VIP6, 17, UDP), None),
    ("advertisement of its global address", ipv6(OWN6, 58, na(VIP6, lla(2, MAC))), SPOOFED_CLAIM),
    ("solicitation from its global address with its MAC", ipv6(VIP6, 58, ns("fd00::2", lla(1, MAC))), SPOOFED_CLAIM),
    ("solicitation from an allowed prefix with its MAC", ipv6("fd00:9::7", 58, ns("fd00::2", lla(1, MAC))),
     SPOOFED_CLAIM),
    ("router solicitation from its global address", ipv6(VIP6, 58, b"\x85\x00\x00\x00" + bytes(4) + lla(1, MAC)),
     SPOOFED_CLAIM),
    ("solicitation from its global address without a MAC", ipv6(VIP6, 58, ns("fd00::2")), None),
    ("router advertisement", ipv6(str(LL), 58, b"\x86\x00\x00\x00" + bytes(12) + lla(1, MAC)), ROUTER),
    ("redirect", ipv6(str(LL), 58, b"\x89\x00\x00\x00" + bytes(36) + lla(2, MAC)), ROUTER),
    ("router solicitation from ::", ipv6("::", 58, b"\x85\x00\x00\x00" + bytes(4)), None),
    ("MLD report from ::", ipv6("::", 0, ext(58) + b"\x8f\x00\x00\x00" + bytes(4)), None),
    ("advertisement from ::", ipv6("::", 58, na(OWN6)), SPOOFED_IP),
    ("solicitation with its MAC", ipv6(str(LL), 58, ns("fd00::2", lla(1, MAC))), None),
    ("solicitation with another MAC", ipv6(str(LL), 58, ns("fd00::2", lla(1, OTHER))), SPOOFED_MAC),
    ("advertisement of its address", ipv6(str(LL), 58, na(OWN6, lla(2, MAC))), None),
    ("advertisement of another's address", ipv6(OWN6, 58, na("fd00::2", lla(2, MAC))), SPOOFED_CLAIM),
    ("advertisement with another MAC", ipv6(OWN6, 58, na(OWN6, lla(2, OTHER))), SPOOFED_MAC),
    ("advertisement behind destination options", ipv6(OWN6, 60, ext(58, 1) + na("fd00::2")), SPOOFED_CLAIM),
    ("behind hop-by-hop then routing", ipv6(OWN6, 0, ext(43) + ext(58) + na("fd00::2")), SPOOFED_CLAIM),
    ("in a first fragment", ipv6(OWN6, 44, frag(58, 0) + na("fd00::2")), SPOOFED_CLAIM),
    ("a later fragment", ipv6(OWN6, 44, frag(58, 100) + bytes(24)), None),
    ("nine extension headers", ipv6(OWN6, 60, ext(60) * 8 + ext(58) + UDP), MALFORMED),
    ("an option of length 0", ipv6(str(LL), 58, ns("fd00::2", b"\x01\x00" + MAC)), MALFORMED),
    ("an option past the end", ipv6(str(LL), 58, ns("fd00::2", b"\x01\x02" + MAC)), MALFORMED),
    ("a truncated solicitation", ipv6(str(LL), 58, ns("fd00::2")[:20]), MALFORMED),
    ("a truncated extension header", ipv6(OWN6, 60, b"\x3a\x00\x00"), MALFORMED),
    ("an echo request", ipv6(OWN6, 58, b"\x80\x00\x00\x00" + bytes(8)), None),
    ("short header", ipv6(OWN6, 17, UDP)[:39], MALFORMED),
])
def test_ipv6(name: str, frame: bytes, want: str | None) -> None:
    assert verdict(eth(0x86DD), frame) == want, name


def test_bytes_past_the_frames_size_are_never_read() -> None:
    # a solicitation ending at `size`, then (in the rest of the slot) an option naming another MAC
    frame = ipv6(str(LL), 58, ns("fd00::2", lla(1, MAC)))
    assert verdict(eth(0x86DD), frame, tail=lla(1, OTHER)) is None
    assert verdict(eth(0x0806), arp(MAC, OWN4), tail=b"\xff" * 40) is None


@pytest.mark.parametrize("ethertype", [0x8100, 0x88A8, 0x88CC, 0x0842, 0x9000])
def test_other_ethertypes_are_unchecked_and_dropped(ethertype: int) -> None:
    assert verdict(eth(ethertype), ipv4(OWN4)) == UNCHECKED


def test_allowed_reports_what_the_guard_lets_through() -> None:
    assert GUARD.allowed(ipaddress.ip_address(OWN4)) and GUARD.allowed(LL)
    assert GUARD.allowed(ipaddress.ip_address("fd00:9::ffff"))
    assert not GUARD.allowed(ipaddress.ip_address("fd00::2"))
    assert GUARD.allowed(ipaddress.ip_address(VIP4))
    assert GUARD.owns(ipaddress.ip_address(OWN4)) and GUARD.owns(LL)
    assert not GUARD.owns(ipaddress.ip_address(VIP4)) and not GUARD.owns(ipaddress.ip_address("10.9.0.1"))


@pytest.mark.parametrize("text, want", [("10.9.0.0/16", "10.9.0.0/16"), ("10.9.0.1", "10.9.0.1/32"),
                                        ("fd00:9::/64", "fd00:9::/64"), (" 10.0.0.0/8 ", "10.0.0.0/8")])
def test_allowed_prefix(text: str, want: str) -> None:
    assert str(allowed_prefix(text)) == want


@pytest.mark.parametrize("text, says", [("10.9.0.1/16", "give the network, 10.9.0.0/16"),
                                        ("nope", "not an IPv4 or IPv6 prefix"), ("10.0.0.0/33", "not an IPv4")])
def test_a_bad_allowed_prefix_says_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        allowed_prefix(text)


KNOWN = {None, SPOOFED_MAC, SPOOFED_IP, SPOOFED_CLAIM, ROUTER, BAD_OFFLOAD, UNCHECKED, MALFORMED}


@settings(max_examples=600, deadline=None)
@given(st.sampled_from([0x0800, 0x0806, 0x86DD, 0x8100]), st.binary(max_size=200), st.binary(max_size=40),
       st.sampled_from([b"", b"\x3a", b"\x00", b"\x3c", b"\x2c"]),
       st.one_of(st.just(0), st.integers(0, 2**32 - 1)))
def test_any_frame_gets_a_verdict_and_bytes_past_its_end_do_not_change_it(
        ethertype: int, payload: bytes, tail: bytes, nh: bytes, meta: int) -> None:
    if ethertype == 0x86DD and len(payload) > 7 and nh:
        payload = payload[:6] + nh + payload[7:]  # reach the extension-header and ICMPv6 walks often
    got = verdict(eth(ethertype), payload, meta=meta)
    assert got in KNOWN
    assert verdict(eth(ethertype), payload, tail=tail, meta=meta) == got


def test_bad_allow_source_is_a_one_line_error() -> None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "shmfabric", "adapter", "nofabric", "n", "--allow-source",
                        "10.9.0.1/16"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert "--allow-source" in r.stderr and "10.9.0.0/16" in r.stderr and "Traceback" not in r.stderr


def vnet(flags: int = 0, gso: int = 0, start: int = 0, offset: int = 0, gso_size: int = 0) -> int:
    """A frame's `meta` for a virtio-net header (what the adapter reads with each frame)."""
    meta = vnet_to_meta(struct.pack("<BBHHHH", flags, gso, 0, gso_size, start, offset))
    assert meta is not None
    return meta


TCP4 = b"\x45\x00\x00\x28" + bytes(5) + b"\x06" + bytes(2) + ipaddress.ip_address(OWN4).packed + bytes(4) + bytes(20)
UDP6 = ipv6(OWN6, 17, UDP)


@pytest.mark.parametrize("name, header, frame, meta, want", [
    ("TCP checksum at the TCP header", eth(0x0800), TCP4, vnet(1, 0, 34, 16), None),
    ("TCPv4 segmentation", eth(0x0800), TCP4, vnet(1, 1, 34, 16, 1448), None),
    ("UDP checksum at the UDP header", eth(0x86DD), UDP6, vnet(1, 0, 54, 6), None),
    ("UDP checksum behind an extension header", eth(0x86DD), ipv6(OWN6, 60, ext(17) + UDP), vnet(1, 0, 62, 6), None),
    ("checksum inside the IPv4 header", eth(0x0800), TCP4, vnet(1, 0, 14, 16), BAD_OFFLOAD),
    ("UDP's offset on TCP", eth(0x0800), TCP4, vnet(1, 0, 34, 6), BAD_OFFLOAD),
    ("checksum in an ARP packet", eth(0x0806), arp(MAC, OWN4), vnet(1, 0, 24, 6), BAD_OFFLOAD),
    ("TCPv6 segmentation of IPv4", eth(0x0800), TCP4, vnet(1, 4, 34, 16, 1448), BAD_OFFLOAD),
    ("TCP segmentation of UDP", eth(0x86DD), UDP6, vnet(1, 4, 54, 6, 1232), BAD_OFFLOAD),
    ("checksum into the IPv6 source", eth(0x86DD), UDP6, vnet(1, 0, 14, 6), BAD_OFFLOAD),
    ("data-valid only", eth(0x0800), TCP4, vnet(2), None),
    ("IPv4 header length 2: a 'UDP checksum' on the source address", eth(0x0800),
     b"\x42" + TCP4[1:9] + b"\x11" + TCP4[10:], vnet(1, 0, 22, 6), MALFORMED),
    ("a checksum field past the frame's end", eth(0x86DD), ipv6(OWN6, 17, b"\x12\x34"), vnet(1, 0, 54, 6), BAD_OFFLOAD),
])
def test_offload_requests_must_fit_the_packet(name: str, header: bytes, frame: bytes, meta: int, want) -> None:
    assert verdict(header, frame, meta=meta) == want, name


def udp4(src: str, sport: int, dport: int, frag_word: int = 0x4000, ihl: int = 5) -> bytes:
    opts = bytes((ihl - 5) * 4)
    return (bytes((0x40 | ihl, 0)) + b"\x01\x48\x00\x00" + frag_word.to_bytes(2, "big") + b"\x40\x11\x00\x00"
            + ipaddress.ip_address(src).packed + ipaddress.ip_address("255.255.255.255").packed + opts
            + struct.pack("!HHHH", sport, dport, 308, 0) + bytes(300))


def udp6(sport: int, dport: int) -> bytes:
    return struct.pack("!HHHH", sport, dport, 100, 0) + bytes(92)


DHCP_SERVING = SourceGuard(MAC, [ipaddress.ip_address(OWN4), ipaddress.ip_address(OWN6)], dhcp_server=True)


@pytest.mark.parametrize("name, header, frame, want", [
    ("offer", eth(0x0800), udp4(OWN4, 67, 68), DHCP_SERVER),
    ("offer-from-another-port", eth(0x0800), udp4(OWN4, 4067, 68), DHCP_SERVER),  # clients filter on 68 only
    ("offer-behind-ip-options", eth(0x0800), udp4(OWN4, 67, 68, ihl=7), DHCP_SERVER),
    ("offer-first-fragment", eth(0x0800), udp4(OWN4, 67, 68, frag_word=0x2000), DHCP_SERVER),
    ("later-fragment", eth(0x0800), udp4(OWN4, 67, 68, frag_word=0x2010), None),  # (no UDP header in it)
    ("client-discover", eth(0x0800), udp4("0.0.0.0", 68, 67), None),
    ("relay-to-server", eth(0x0800), udp4(OWN4, 67, 67), None),
    ("dns", eth(0x0800), udp4(OWN4, 40000, 53), None),
    ("dhcpv6-reply", eth(0x86DD), ipv6(OWN6, 17, udp6(547, 546)), DHCP_SERVER),
    ("dhcpv6-reply-behind-options", eth(0x86DD), ipv6(OWN6, 0, ext(17) + udp6(547, 546)), DHCP_SERVER),
    ("dhcpv6-solicit", eth(0x86DD), ipv6(str(LL), 17, udp6(546, 547)), None),
    ("dhcpv6-later-fragment", eth(0x86DD), ipv6(OWN6, 44, frag(17, 1) + udp6(547, 546)), None),
    ("udp6-cut-before-the-port", eth(0x86DD), ipv6(OWN6, 17, b"\x02\x23\x02"), MALFORMED),
    ("tiny-first-fragment", eth(0x0800), udp4(OWN4, 67, 68, frag_word=0x2000)[:22], MALFORMED),
])
def test_dhcp_server_messages_are_dropped_unless_the_adapter_serves_dhcp(name, header, frame, want) -> None:
    assert GUARD.verdict(bytearray(header), bytearray(frame), len(frame)) == want
    assert DHCP_SERVING.verdict(bytearray(header), bytearray(frame), len(frame)) is None


def _frag6_bypass() -> bytes:
    """The first fragment of a DHCPv6 reply whose header chain ends, by its payload length, before
    the UDP header, followed by bytes past that length shaped like one more header with next
    header 59 (none): the kernel cuts them off and reassembles the chain with the next fragment."""
    frag = bytes((60, 0)) + struct.pack("!H", 0 | 1) + bytes(4)  # offset 0, more fragments
    dest_opts = bytes((60, 0)) + bytes(6)  # next: another destination options header (in fragment 2)
    junk = bytes((59, 0)) + bytes(6)  # past the payload length
    body = frag + dest_opts
    return (b"\x60\x00\x00\x00" + len(body).to_bytes(2, "big") + bytes((44, 255))
            + ipaddress.ip_address(OWN6).packed + ipaddress.ip_address("fd00::2").packed + body + junk)


@pytest.mark.parametrize("name, frame", [
    ("ipv6-chain-ended-by-bytes-past-its-payload-length", _frag6_bypass()),
    ("ipv6-payload-length-past-the-frame", ipv6(OWN6, 17, udp6(40000, 53))[:-10]),
    ("ipv4-tiny-fragment-padded-past-its-total-length",
     bytes((0x45, 0)) + (22).to_bytes(2, "big") + b"\x00\x00\x20\x00\x40\x11\x00\x00" + ipaddress.ip_address(OWN4).packed
     + ipaddress.ip_address("255.255.255.255").packed + b"\x00\x43" + b"\x00\x44" + bytes(20)),
])
def test_bytes_past_the_ip_length_fields_are_not_read_as_headers(name, frame) -> None:
    # (the kernel reads a packet to its length field only)
    assert GUARD.verdict(bytearray(eth(0x86DD if frame[0] >> 4 == 6 else 0x0800)), bytearray(frame), len(frame)) \
        == MALFORMED
