"""Builders: parse(build(x)) == x, every truncation is reported as malformed, FrameTemplate."""
import ipaddress
import struct

import pytest
from hypothesis import given, settings, strategies as st

from shmfabric.net import build as b
from shmfabric.net.errors import Reason
from shmfabric.net.flow import to_address
from shmfabric.net.ip import IPv4
from shmfabric.net.l4 import TCP, UDP
from shmfabric.net.packet import decode

from .strategies import build_flow, flows


@settings(deadline=None)  # wall-clock deadlines flake on a loaded 2-core CI
@given(flows())
def test_parse_build_roundtrip(f):
    frame = build_flow(f)
    p = decode(frame)
    assert p.reason is None
    assert p.eth.vlan == f["vlan"]
    assert p.ip.version == (6 if f["v6"] else 4)
    assert (p.ip.src, p.ip.dst) == (to_address(f["src"]), to_address(f["dst"]))
    if f["kind"] == "icmp":
        assert (p.l4.identifier, p.l4.sequence) == (f["sport"], f["dport"]) and p.l4.is_echo
        assert p.l4.checksum_ok(p.ip)
    else:
        assert (p.l4.sport, p.l4.dport) == (f["sport"], f["dport"])
        assert p.l4.checksum_ok(p.ip)
        if f["kind"] == "tcp":
            assert (p.l4.flags, p.l4.seq) == (f["flags"], f["seq"])
    assert bytes(p.l4.payload) == f["payload"]
    if p.ip.version == 4:
        assert p.ip.checksum_ok()


@settings(max_examples=60, deadline=None)
@given(flows())
def test_every_truncation_is_malformed(f):
    frame = build_flow(f)
    for n in range(len(frame)):
        p = decode(frame[:n])  # must not raise
        assert p.reason is not None and p.reason.malformed, (n, p)
        assert p.five_tuple() == p.reason


@settings(deadline=None)  # wall-clock deadlines flake on a loaded 2-core CI
@given(st.binary(max_size=120), st.sampled_from(["ethernet", "ip"]))
def test_random_bytes_never_raise(data, link):
    p = decode(data, link=link)
    assert p.reason is None or isinstance(p.reason, Reason)
    p.five_tuple()


def test_hand_packed_ipv4_udp_equals_builder():
    payload = b"hello"
    udp = struct.pack("!HHHH", 1000, 2000, 13, 0) + payload
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 33, 0, 0, 64, 17, 0,
                                ipaddress.IPv4Address("10.0.0.1").packed, ipaddress.IPv4Address("10.0.0.2").packed))
    s = sum(struct.unpack("!10H", hdr))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    struct.pack_into("!H", hdr, 10, ~s & 0xFFFF)
    built = b.ipv4(b.udp(1000, 2000, payload, checksum=0), src="10.0.0.1", dst="10.0.0.2", proto=17)
    assert built == bytes(hdr) + udp


def test_ipv6_ext_chain_is_linked():
    pkt = b.ipv6(b"\0" * 8, src="fd00::1", dst="fd00::2", next_header=17,
                 ext=[b.ipv6_ext(0), b.ipv6_ext(60, b"\x01\x00"), b.ipv6_fragment(8, True, 5)])
    assert pkt[6] == 0                     # fixed header -> hop-by-hop
    assert pkt[40] == 60 and pkt[48] == 44 and pkt[56] == 17
    with pytest.raises(ValueError):
        b.ipv6_fragment(3)


def test_builder_errors():
    with pytest.raises(ValueError):
        b.ipv4(b"", src="10.0.0.1", dst="10.0.0.2", proto=6, options=b"\1" * 41)
    with pytest.raises(ValueError):
        b.ipv4(b"", src="10.0.0.1", dst="10.0.0.2", proto=6, frag_offset=4)
    with pytest.raises(ValueError):
        b.tcp_frame("10.0.0.1", "10.0.0.2", 1, 2, flags="SQ")
    with pytest.raises(ValueError):
        b.ethernet(b"", dst="not a mac")
    assert len(b.arp_frame(1, "02:00:00:00:00:01", "10.0.0.1", tpa="10.0.0.2")) == 60


@settings(deadline=None)  # wall-clock deadlines flake on a loaded 2-core CI
@given(st.sampled_from(["tcp", "udp"]), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
       st.integers(0, 65535), st.integers(0, 65535), st.binary(max_size=40))
def test_frame_template_matches_fresh_build(kind, src, dst, sport, dport, payload):
    make = b.tcp_frame if kind == "tcp" else b.udp_frame
    t = b.FrameTemplate(make("10.0.0.1", "10.0.0.2", 1000, 2000, payload))
    assert bytes(t.make(src=src, dst=dst, sport=sport, dport=dport)) == make(src, dst, sport, dport, payload)


def test_frame_template_refuses_other_frames():
    with pytest.raises(ValueError):
        b.FrameTemplate(b.udp_frame("fd00::1", "fd00::2", 1, 2))
    with pytest.raises(ValueError):
        b.FrameTemplate(b.icmp_echo_frame("10.0.0.1", "10.0.0.2"))
    with pytest.raises(ValueError):
        b.FrameTemplate(b"\0" * 10)
