"""IPv6 Routing headers and the L4 pseudo-header (RFC 8200 section 8.1): with Segments Left > 0 the
pseudo-header holds the final destination the Routing header lists, not the Destination Address
field, for checksum checks and for the incremental update after an address rewrite. Types 0
(RFC 5095), 2 (RFC 6275), 3 (RPL, RFC 6554, compressed) and 4 (SRH, RFC 8754). tshark agrees
(tests/net/test_tshark.py)."""
import ipaddress

import pytest

from shmfabric.net import build as b
from shmfabric.net.ip import IPv6
from shmfabric.net.packet import decode


def A(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


SRC, CUR, FINAL, MID = A("fd00::1"), A("fd00:0:0:1::2"), A("fd00:0:0:9::99"), A("fd00::5")


def routing(rtype: int, left: int, body: bytes) -> tuple[int, bytes]:
    """A Routing header (43): type, segments left, then `body` (a multiple of 8 bytes with the 4
    type-specific bytes); the next-header byte is chained by build.ipv6."""
    data = bytes([0, 0, rtype, left]) + body
    assert len(data) % 8 == 0
    return 43, bytes([0, len(data) // 8 - 1]) + data[2:]


def rpl(cmpr_i: int, cmpr_e: int, addrs: list[bytes], last: bytes) -> bytes:
    """Type 3 body: CmprI/CmprE/Pad, then addresses 1..n-1 without their first CmprI bytes and
    address n without its first CmprE bytes, padded to 8-byte units."""
    data = b"".join(a[cmpr_i:] for a in addrs) + last[cmpr_e:]
    pad = -(len(data) + 8) % 8
    return bytes([cmpr_i << 4 | cmpr_e, pad << 4, 0, 0]) + data + b"\0" * pad


# name -> (routing header, the final destination it gives); CUR is the Destination Address field
CASES = {
    "type 0": (routing(0, 2, b"\0" * 4 + MID + FINAL), FINAL),
    "type 2": (routing(2, 1, b"\0" * 4 + FINAL), FINAL),
    "type 3, 8/8": (routing(3, 1, rpl(8, 8, [MID], FINAL)), CUR[:8] + FINAL[8:]),
    "type 3, 0/12, pad": (routing(3, 2, rpl(0, 12, [MID], FINAL)), CUR[:12] + FINAL[12:]),
    "type 4 (SRH)": (routing(4, 1, bytes([1, 0, 0, 0]) + FINAL + CUR), FINAL),
    "type 4, segments left 0": (routing(4, 0, bytes([1, 0, 0, 0]) + FINAL + CUR), CUR),
    "unknown type 253": (routing(253, 1, b"\0" * 4 + FINAL), CUR),
    "type 4, no segment": (routing(4, 1, bytes([0, 0, 0, 0])), CUR),
}


def frame(kind: str, rh: tuple[int, bytes], csum_dst: bytes) -> bytes:
    """An Ethernet/IPv6/routing/L4 frame whose L4 checksum is computed over `csum_dst`."""
    if kind == "udp":
        seg, proto = b.udp(40001, 40002, b"payload!", src=SRC, dst=csum_dst), 17
    elif kind == "tcp":
        seg, proto = b.tcp(40001, 40002, b"data", flags="PA", src=SRC, dst=csum_dst), 6
    else:
        seg, proto = b.icmpv6(128, 0, b"ping", src=SRC, dst=csum_dst, identifier=7, sequence=1), 58
    return b.ethernet(b.ipv6(seg, src=SRC, dst=CUR, next_header=proto, ext=[rh]), ethertype=0x86DD)


def l4_ok(buf) -> bool:
    p = decode(buf)
    assert p.reason is None and p.l4 is not None
    return p.l4.checksum_ok(p.ip)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("kind", ["udp", "tcp", "icmpv6"])
def test_pseudo_header_uses_the_final_destination(name, kind):
    rh, final = CASES[name]
    good = frame(kind, rh, final)
    ip = IPv6(good, 14)
    assert ip.final_dst == final and ip.dst == CUR
    assert l4_ok(good)  # before: False for every case with segments left > 0
    if final != CUR:
        assert not l4_ok(frame(kind, rh, CUR))  # the Destination Address field is the wrong one


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("kind", ["udp", "tcp", "icmpv6"])
def test_address_rewrites_with_a_routing_header(name, kind):
    rh, final = CASES[name]
    buf = bytearray(frame(kind, rh, final))
    p = decode(buf)
    l4_csum_at = {"udp": 6, "tcp": 16, "icmpv6": 2}[kind]
    at = p.ip.l4_offset + l4_csum_at
    before = bytes(buf[at:at + 2])
    new_dst = A("2001:db8:77::42")
    p.ip.set_dst(new_dst)  # an SRv6 endpoint or NAT moving the current destination
    assert l4_ok(buf)  # before: the checksum was "updated" for an address it does not cover
    if name in ("type 0", "type 2", "type 4 (SRH)"):
        assert bytes(buf[at:at + 2]) == before  # the pseudo-header's address did not change
    else:
        assert bytes(buf[at:at + 2]) != before
    if name.startswith("type 3"):  # the final destination borrows its prefix from the field
        assert IPv6(buf, 14).final_dst != final
    p.ip.set_src(A("2001:db8:77::1"))  # the source is always in the pseudo-header
    assert l4_ok(buf)
    # two views of one buffer: the second rewrite starts from the bytes the first one wrote
    q = decode(buf)
    p.ip.set_dst(A("2001:db8:78::1"))
    q.ip.set_dst(A("2001:db8:79::1"))
    assert l4_ok(buf) and IPv6(buf, 14).dst == A("2001:db8:79::1")

