"""decode(): layers present, reasons recorded, link types."""
import pytest

from shmfabric.net import build as b
from shmfabric.net.errors import Reason
from shmfabric.net.packet import decode


def test_layers():
    p = decode(b.tcp_frame("10.0.0.1", "10.0.0.2", 1, 2, b"x", vlan=3))
    assert p.ok and p.eth.vlan == 3 and p.ip.version == 4 and p.l4.dport == 2 and p.arp is None
    assert "TCP" in repr(p)
    a = decode(b.arp_frame(2, "02:00:00:00:00:01", "10.0.0.1", tpa="10.0.0.1"))
    assert a.ok and a.arp.is_reply and a.ip is None and a.five_tuple() is Reason.NOT_IP
    other = decode(b.ethernet(b"lldp", ethertype=0x88CC))
    assert other.ok and other.ip is None and other.five_tuple() is Reason.NOT_IP


def test_reason_and_offset():
    f = b.tcp_frame("10.0.0.1", "10.0.0.2", 1, 2)
    p = decode(f[:40])
    assert not p.ok and p.reason is Reason.TRUNCATED_IPV4_PAYLOAD and p.error_offset == 14 and p.ip is None
    assert "malformed=TRUNCATED_IPV4_PAYLOAD@14" in repr(p)
    wrong = bytearray(f)
    wrong[14] = 0x65  # IPv6 version under EtherType IPv4
    assert decode(wrong).reason is Reason.BAD_IP_VERSION


def test_link_ip_and_offset():
    f = b.udp_frame("fd00::1", "fd00::2", 1, 2, b"abc")
    p = decode(f[14:], link="ip")
    assert p.eth is None and p.ip.version == 6 and bytes(p.l4.payload) == b"abc"
    assert decode(b"\xaa\xbb" + f, offset=2).l4.sport == 1
    assert decode(b"", link="ip").reason is Reason.TRUNCATED_IPV4
    assert decode(b"\x10" * 30, link="ip").reason is Reason.BAD_IP_VERSION
    with pytest.raises(ValueError, match="link must be"):
        decode(f, link="atm")


@pytest.mark.parametrize("frame", [
    b.tcp_frame("10.0.0.1", "10.0.0.2", 1, 2, b"abc"), b.udp_frame("10.0.0.1", "10.0.0.2", 1, 2, b"abc", vlan=5),
    b.tcp_frame("fd00::1", "fd00::2", 1, 2, b"abc"), b.udp_frame("fd00::1", "fd00::2", 1, 2, b"abc"),
])
def test_rewrites_through_one_decode_compose(frame):
    """NAT-style: addresses through the IP view, then ports through the (older) L4 view, then the
    TTL again; every checksum must still be right (views must not trust cached checksums)."""
    buf = bytearray(frame)
    p = decode(buf)
    if p.ip.version == 4:
        p.ip.set_src(0xC0000201)
        p.ip.set_dst(0xC0000202)
    else:
        p.ip.set_src(bytes(range(16)))
        p.ip.set_dst(bytes(range(16, 32)))
    p.l4.set_sport(4000)
    p.l4.set_dport(5000)
    p.ip.set_ttl(9)
    p.ip.set_src(p.ip.src)  # a no-op rewrite stays correct too
    q = decode(buf)
    assert q.l4.checksum_ok(q.ip) and (q.l4.sport, q.l4.dport, q.ip.ttl) == (4000, 5000, 9)
    assert q.ip.version == 6 or q.ip.checksum_ok()
