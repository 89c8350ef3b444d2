"""TCP, UDP, ICMP and ICMPv6 views against segments packed by hand."""
import struct

import pytest

from shmfabric.net import build as b
from shmfabric.net.errors import MalformedError, Reason
from shmfabric.net.ip import IPv4, IPv6
from shmfabric.net.l4 import ICMP, TCP, UDP, ICMPv6, flags_str, parse_flags


def reason(fn, *args):
    with pytest.raises(MalformedError) as ei:
        fn(*args)
    return ei.value.reason


def test_tcp_fields_and_options():
    opts = bytes([2, 4, 0x05, 0xB4, 1, 3, 3, 7])  # MSS 1460, NOP, window scale 7
    seg = struct.pack("!HHIIHHHH", 40000, 443, 1, 2, (7 << 12) | 0x12, 512, 0, 9) + opts + b"body"
    t = TCP(seg)
    assert (t.sport, t.dport, t.seq, t.ack, t.header_len, t.window, t.urgent) == (40000, 443, 1, 2, 28, 512, 9)
    assert t.syn and t.is_ack and not t.fin and not t.rst and flags_str(t.flags) == "SA"
    assert [(k, bytes(d)) for k, d in t.iter_options()] == [(2, b"\x05\xb4"), (3, b"\x07")]
    assert bytes(t.payload) == b"body"
    assert bytes(TCP(seg, 0, len(seg) - 2).payload) == b"bo"  # end bounds the payload


def test_tcp_malformed():
    seg = struct.pack("!HHIIHHHH", 1, 2, 0, 0, 5 << 12, 0, 0, 0)
    assert reason(TCP, seg[:19]) is Reason.TRUNCATED_TCP
    assert reason(TCP, seg[:12] + struct.pack("!H", 4 << 12) + seg[14:]) is Reason.BAD_TCP_OFFSET
    assert reason(TCP, seg[:12] + struct.pack("!H", 6 << 12) + seg[14:]) is Reason.TRUNCATED_TCP


def test_flags_text():
    assert parse_flags("SA") == 0x12 and parse_flags("fpu") == 0x29 and parse_flags("N") == 0x100
    assert flags_str(0x1FF) == "FSRPAUECN"
    with pytest.raises(ValueError, match="unknown TCP flag"):
        parse_flags("SX")


def test_udp():
    u = UDP(struct.pack("!HHHH", 53, 5353, 11, 0) + b"abc" + b"pad")
    assert (u.sport, u.dport, u.length) == (53, 5353, 11) and bytes(u.payload) == b"abc"
    assert reason(UDP, b"\0" * 7) is Reason.TRUNCATED_UDP
    assert reason(UDP, struct.pack("!HHHH", 1, 2, 7, 0)) is Reason.BAD_UDP_LENGTH
    assert reason(UDP, struct.pack("!HHHH", 1, 2, 9, 0)) is Reason.TRUNCATED_UDP


def test_checksums_against_ip_views():
    f = b.udp_frame("10.0.0.1", "10.0.0.2", 1, 2, b"hello")
    ip = IPv4(f, 14)
    assert UDP(f, 34, ip.end).checksum_ok(ip)
    bad = bytearray(f)
    bad[-1] ^= 1
    assert not UDP(bad, 34, ip.end).checksum_ok(IPv4(bad, 14))
    nock = b.ip_frame(b.udp(1, 2, b"x", checksum=0), src="10.0.0.1", dst="10.0.0.2", proto=17)
    assert UDP(nock, 34).checksum_ok(IPv4(nock, 14))  # optional over IPv4
    t = b.tcp_frame("10.0.0.1", "10.0.0.2", 1, 2, b"x" * 101)  # odd length
    assert TCP(t, 34).checksum_ok(IPv4(t, 14))
    e = b.icmp_echo_frame("10.0.0.1", "10.0.0.2", 77, 3, b"abc")
    i = ICMP(e, 34)
    assert i.is_echo and (i.type, i.identifier, i.sequence) == (8, 77, 3) and i.checksum_ok()
    e6 = b.icmp_echo_frame("fd00::1", "fd00::2", 5, 6, b"abc", reply=True)
    i6 = ICMPv6(e6, 54)
    assert i6.is_echo and i6.type == 129 and i6.checksum_ok(IPv6(e6, 14))
    assert reason(ICMP, b"\x08\0\0\0\0\0\0") is Reason.TRUNCATED_ICMP


def test_port_rewrites_keep_checksums():
    for frame in (b.tcp_frame("10.0.0.1", "10.0.0.2", 1, 2, b"abc"), b.udp_frame("10.0.0.1", "10.0.0.2", 1, 2, b"abc")):
        buf = bytearray(frame)
        ip = IPv4(buf, 14)
        view = (TCP if ip.proto == 6 else UDP)(buf, 34, ip.end)
        view.set_sport(65535)
        view.set_dport(8080)
        again = (TCP if ip.proto == 6 else UDP)(buf, 34, ip.end)
        assert (again.sport, again.dport) == (65535, 8080) and again.checksum_ok(ip)


def test_port_rewrites_through_two_views_of_one_buffer():
    # The second view was built before the first one's rewrite: the checksum update must start
    # from the port in the buffer, not the one the view cached (as the IP setters do).
    for frame in (b.tcp_frame("10.0.0.1", "10.0.0.2", 1000, 80, b"abc", flags="PA"),
                  b.udp_frame("10.0.0.1", "10.0.0.2", 1000, 80, b"abc"),
                  b.tcp_frame("fd00::1", "fd00::2", 1000, 80, b"abc", flags="PA"),
                  b.udp_frame("fd00::1", "fd00::2", 1000, 80, b"abc")):
        buf = bytearray(frame)
        ip = (IPv4 if buf[14] >> 4 == 4 else IPv6)(buf, 14)
        cls = TCP if ip.proto == 6 else UDP
        first, second = cls(buf, ip.l4_offset, ip.end), cls(buf, ip.l4_offset, ip.end)
        first.set_sport(2000)
        first.set_dport(8080)
        second.set_sport(3000)  # before: the checksum was updated from 1000, not 2000
        second.set_dport(9090)
        again = cls(buf, ip.l4_offset, ip.end)
        assert (again.sport, again.dport) == (3000, 9090) and again.checksum_ok(ip), cls
