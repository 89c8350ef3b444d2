"""IPv4 and IPv6 views: fields against headers packed by hand, validation reasons, extension-header
walking, and in-place rewrites that keep every checksum right."""
import ipaddress
import struct

import pytest

from shmfabric.net import build as b
from shmfabric.net import checksum as ck
from shmfabric.net.errors import MalformedError, Reason
from shmfabric.net.ip import IPv4, IPv6, ip_view
from shmfabric.net.l4 import TCP, UDP, ICMPv6

A = int(ipaddress.IPv4Address("192.0.2.1"))
B = int(ipaddress.IPv4Address("198.51.100.7"))
A6 = ipaddress.IPv6Address("2001:db8::1").packed
B6 = ipaddress.IPv6Address("2001:db8::2").packed


def v4(payload=b"", ihl=5, tlen=None, ff=0, proto=17, options=b"", version=4):
    tlen = ihl * 4 + len(payload) if tlen is None else tlen
    hdr = bytearray(struct.pack("!BBHHHBBHII", version << 4 | ihl, 0xB8, tlen, 0x1234, ff, 63, proto, 0, A, B) + options)
    struct.pack_into("!H", hdr, 10, ck.checksum(hdr))
    return bytes(hdr) + payload


def reason(fn, *args):
    with pytest.raises(MalformedError) as ei:
        fn(*args)
    return ei.value.reason


def test_ipv4_fields():
    ip = IPv4(v4(b"data", ff=0x4000))
    assert (ip.version, ip.header_len, ip.total_length, ip.ident, ip.ttl, ip.proto) == (4, 20, 24, 0x1234, 63, 17)
    assert (ip.src, ip.dst, ip.dscp, ip.ecn) == (A, B, 46, 0)
    assert ip.df and not ip.mf and not ip.is_fragment and ip.has_l4
    assert ip.checksum_ok() and bytes(ip.payload) == b"data" and ip.l4_offset == 20 and ip.end == 24


def test_ipv4_padding_excluded_and_offset():
    pkt = b"\0" * 14 + v4(b"abc") + b"\0" * 20  # Ethernet padding after the datagram
    ip = IPv4(pkt, 14)
    assert bytes(ip.payload) == b"abc" and ip.end == 14 + 23


def test_ipv4_fragments_flagged():
    first = IPv4(v4(b"x" * 8, ff=0x2000))
    assert first.is_fragment and first.mf and first.has_l4 and first.frag_offset == 0
    middle = IPv4(v4(b"x" * 8, ff=0x2000 | 185))
    assert middle.is_fragment and not middle.has_l4 and middle.frag_offset == 1480
    last = IPv4(v4(b"x" * 8, ff=3))
    assert last.is_fragment and not last.mf and not last.has_l4


def test_ipv4_options():
    opts = bytes([1, 7, 7, 4, 0, 0, 0, 0, 0, 1, 0, 0])  # NOP, record route (len 7), EOL padding
    ip = IPv4(v4(b"", ihl=8, options=opts))
    assert ip.header_len == 32 and ip.checksum_ok()
    assert [(k, bytes(d)) for k, d in ip.iter_options()] == [(7, bytes([4, 0, 0, 0, 0]))]
    assert reason(IPv4, v4(b"", ihl=6, options=bytes([7, 9, 0, 0]))) is Reason.BAD_IPV4_OPTIONS
    assert reason(IPv4, v4(b"", ihl=6, options=bytes([1, 1, 1, 7]))) is Reason.BAD_IPV4_OPTIONS
    assert reason(IPv4, v4(b"", ihl=6, options=bytes([7, 1, 0, 0]))) is Reason.BAD_IPV4_OPTIONS


def test_ipv4_malformed():
    assert reason(IPv4, v4()[:19]) is Reason.TRUNCATED_IPV4
    assert reason(IPv4, v4(version=6)) is Reason.BAD_IP_VERSION
    assert reason(IPv4, v4(ihl=4)) is Reason.BAD_IPV4_IHL
    assert reason(IPv4, v4(ihl=6, options=b"\1\1")) is Reason.TRUNCATED_IPV4  # IHL 6 but 22 bytes
    assert reason(IPv4, v4(b"abc", tlen=19)) is Reason.BAD_IPV4_LENGTH
    assert reason(IPv4, v4(b"abc", tlen=24)) is Reason.TRUNCATED_IPV4_PAYLOAD


def test_ipv4_rewrites_keep_checksums():
    frame = bytearray(b.tcp_frame("10.0.0.1", "10.0.0.2", 1234, 80, b"hello"))
    ip = IPv4(frame, 14)
    ip.set_src(int(ipaddress.IPv4Address("172.16.0.9")))
    ip.set_dst(int(ipaddress.IPv4Address("172.16.0.10")))
    ip.set_ttl(ip.ttl - 1)
    again = IPv4(frame, 14)
    assert str(ipaddress.IPv4Address(again.src)) == "172.16.0.9" and again.ttl == 63
    assert again.checksum_ok() and ck.checksum(frame[14:34]) == 0
    assert TCP(frame, 34, again.end).checksum_ok(again)
    # UDP without checksum (0) over IPv4 stays without one.
    u = bytearray(b.ip_frame(b.udp(1, 2, b"x", checksum=0), src="10.0.0.1", dst="10.0.0.2", proto=17))
    uip = IPv4(u, 14)
    uip.set_src(5)
    assert UDP(u, 34).checksum == 0 and IPv4(u, 14).checksum_ok()
    with pytest.raises(TypeError):
        IPv4(bytes(frame), 14).set_ttl(1)


def v6(payload, nh, plen=None, hlim=64):
    plen = len(payload) if plen is None else plen
    return struct.pack("!IHBB16s16s", 6 << 28 | 0x12 << 20 | 0xABCDE, plen, nh, hlim, A6, B6) + payload


def test_ipv6_fields():
    ip = IPv6(v6(b"\0" * 8, 59) + b"pad")
    assert (ip.version, ip.traffic_class, ip.flow_label, ip.payload_length, ip.hop_limit) == (6, 0x12, 0xABCDE, 8, 64)
    assert (ip.src, ip.dst, ip.proto, ip.ext_headers, ip.ttl) == (A6, B6, 59, (), 64)
    assert not ip.has_l4 and ip.end == 48 and len(ip.payload) == 8


def test_ipv6_extension_walk():
    hbh = bytes([43, 0]) + b"\1\4\0\0\0\0"               # hop-by-hop -> routing, 8 bytes (PadN)
    rt = bytes([44, 1]) + b"\0" * 14                      # routing -> fragment, 16 bytes
    frag = bytes([51, 0]) + struct.pack("!HI", 0 << 3 | 1, 99)  # first fragment, M=1 -> AH
    ah = bytes([60, 2]) + b"\0" * 14                      # AH -> dest opts, (2+2)*4 = 16 bytes
    dst = bytes([6, 0]) + b"\0" * 6                        # dest opts -> TCP
    tcp = struct.pack("!HHIIHHHH", 1, 2, 0, 0, 5 << 12, 0, 0, 0)
    ip = IPv6(v6(hbh + rt + frag + ah + dst + tcp, 0))
    assert [(t, l) for t, _, l in ip.ext_headers] == [(0, 8), (43, 16), (44, 8), (51, 16), (60, 8)]
    assert ip.proto == 6 and ip.l4_offset == 40 + 56 and ip.has_l4
    assert ip.is_fragment and ip.frag == (0, True, 99)
    assert TCP(ip.buf, ip.l4_offset, ip.end).dport == 2


def test_ipv6_non_first_fragment_stops_walk():
    frag = bytes([6, 0]) + struct.pack("!HI", 185 << 3, 7)
    ip = IPv6(v6(frag + b"not a tcp header", 44))
    assert ip.frag == (1480, False, 7) and ip.proto == 6 and not ip.has_l4


def test_ipv6_malformed():
    assert reason(IPv6, v6(b"", 59)[:39]) is Reason.TRUNCATED_IPV6
    assert reason(IPv6, v4(b"x" * 30)) is Reason.BAD_IP_VERSION
    assert reason(IPv6, v6(b"abc", 59, plen=4)) is Reason.TRUNCATED_IPV6_PAYLOAD
    assert reason(IPv6, v6(b"\x06\x00\0\0", 0)) is Reason.TRUNCATED_IPV6_EXT      # < 8 bytes
    assert reason(IPv6, v6(b"\x06\x01" + b"\0" * 6, 0)) is Reason.TRUNCATED_IPV6_EXT  # says 16
    chain = b"".join(bytes([60, 0]) + b"\0" * 6 for _ in range(9)) + b"\x06\x00" + b"\0" * 6
    assert reason(IPv6, v6(chain, 60)) is Reason.TOO_MANY_IPV6_EXT


def test_ipv6_rewrite_updates_l4_checksums():
    for frame in (b.udp_frame("2001:db8::1", "2001:db8::2", 5, 6, b"q"),
                  b.tcp_frame("2001:db8::1", "2001:db8::2", 5, 6, b"q"),
                  b.icmp_echo_frame("2001:db8::1", "2001:db8::2", 3, 4, b"ping")):
        buf = bytearray(frame)
        ip = IPv6(buf, 14)
        ip.set_src(ipaddress.IPv6Address("2001:db8::99").packed)
        ip.set_dst(ipaddress.IPv6Address("fd00::7").packed)
        ip.set_hop_limit(3)
        again = IPv6(buf, 14)
        view = {6: TCP, 17: UDP, 58: ICMPv6}[again.proto](buf, again.l4_offset, again.end)
        assert view.checksum_ok(again) and again.hop_limit == 3
    with pytest.raises(ValueError):
        IPv6(bytearray(frame), 14).set_src(b"\0" * 4)


def test_ip_view_by_version():
    assert isinstance(ip_view(v4()), IPv4) and isinstance(ip_view(v6(b"", 59)), IPv6)
    assert reason(ip_view, b"\x50" + b"\0" * 40) is Reason.BAD_IP_VERSION
    assert reason(ip_view, b"") is Reason.TRUNCATED_IPV4
