"""First fragments: a TCP or UDP first fragment (IPv4 MF set / IPv6 Fragment header M=1, offset 0)
has its L4 header, so it gives a 5-tuple and a payload span (its own part of the data) in the
reference decoder and in every fast path alike. A UDP length covers the whole datagram, so it
exceeds a first fragment; for anything else (unfragmented, atomic fragment) it still may not."""
import struct

from hypothesis import given, settings, strategies as st

from shmfabric.net import build as b
from shmfabric.net.errors import Reason
from shmfabric.net.flow import (
    classify_batch, l4_payload_span, parse_5tuple, parse_5tuple_ip, tcp_flags,
)
from shmfabric.net.ip import IPv4, IPv6
from shmfabric.net.l4 import UDP
from shmfabric.net.packet import decode

from .strategies import flows

S4, D4, S6, D6 = "10.0.0.1", "10.0.0.2", "fd00::1", "fd00::2"


class GatheredBatch(list):
    """A list of IP packets with the fabric FrameBatch's `gather` (each record: the length as 4
    bytes, then the first `width` bytes, zero-padded), so classify_batch takes its gathered path."""

    def gather(self, width=None):
        w = max(map(len, self), default=0) if width is None else width
        return b"".join(struct.pack("!I", len(f)) + (bytes(f[:w]) + bytes(w))[:w] for f in self)


def fragments(seg: bytes, proto: int, v6: bool, mtu_data: int = 1480, vlan=None) -> list[bytes]:
    """`seg` (an L4 segment) cut into Ethernet frames of IP fragments, `mtu_data` bytes each."""
    out = []
    for off in range(0, len(seg), mtu_data):
        more = off + mtu_data < len(seg)
        chunk = seg[off:off + mtu_data]
        if v6:
            out.append(b.ip_frame(chunk, src=S6, dst=D6, proto=proto, vlan=vlan,
                                  ext=[b.ipv6_fragment(off, more, 99)]))
        else:
            out.append(b.ip_frame(chunk, src=S4, dst=D4, proto=proto, vlan=vlan, ident=77, mf=more, frag_offset=off))
    return out


def every_path(frame: bytes, ip_start: int) -> dict:
    """The 5-tuple and payload span of `frame` from each entry point, Ethernet and IP."""
    ip = frame[ip_start:]
    fl_e: list[int] = []
    fl_i: list[int] = []
    fl_g: list[int] = []
    spans = {"eth": l4_payload_span(frame), "ip": l4_payload_span(ip, "ip")}
    return {
        "parse_5tuple": parse_5tuple(frame),
        "classify_batch": classify_batch([frame])[0],
        "classify_batch bytearray": classify_batch([bytearray(frame)])[0],
        "classify_batch flags": (classify_batch([frame], flags=fl_e)[0], fl_e[0]),
        "parse_5tuple_ip": parse_5tuple_ip(ip),
        "classify_batch ip": classify_batch([ip], link="ip")[0],
        "classify_batch ip flags": (classify_batch([ip], link="ip", flags=fl_i)[0], fl_i[0]),
        "gathered": classify_batch(GatheredBatch([ip]), link="ip")[0],
        "gathered flags": (classify_batch(GatheredBatch([ip]), link="ip", flags=fl_g)[0], fl_g[0]),
        "span eth": None if spans["eth"] is None else bytes(frame[slice(*spans["eth"])]),
        "span ip": None if spans["ip"] is None else bytes(ip[slice(*spans["ip"])]),
        "tcp_flags": (tcp_flags(frame), tcp_flags(ip, "ip")),
    }


def reference(frame: bytes, ip_start: int) -> dict:
    p, q = decode(frame), decode(frame[ip_start:], link="ip")
    key, key_ip = p.five_tuple(), q.five_tuple()
    fl = p.l4.flags if p.reason is None and type(p.l4).__name__ == "TCP" else 0
    fl_ip = q.l4.flags if q.reason is None and type(q.l4).__name__ == "TCP" else 0
    payload = None if p.reason is not None or p.l4 is None else bytes(p.l4.payload)
    payload_ip = None if q.reason is not None or q.l4 is None else bytes(q.l4.payload)
    return {
        "parse_5tuple": key, "classify_batch": key, "classify_batch bytearray": key,
        "classify_batch flags": (key, fl), "parse_5tuple_ip": key_ip, "classify_batch ip": key_ip,
        "classify_batch ip flags": (key_ip, fl_ip), "gathered": key_ip, "gathered flags": (key_ip, fl_ip),
        "span eth": payload, "span ip": payload_ip, "tcp_flags": (fl, fl_ip),
    }


def test_udp_first_fragment_has_a_5tuple_everywhere():
    data = bytes(range(256)) * 12
    for v6 in (False, True):
        src, dst = (S6, D6) if v6 else (S4, D4)
        seg = b.udp(4500, 53, data, src=src, dst=dst)  # 3080 bytes: three fragments
        frames = fragments(seg, 17, v6, 1448 if v6 else 1480)
        first = decode(frames[0])
        assert first.reason is None, first  # before: TRUNCATED_UDP
        assert first.ip.first_fragment
        assert isinstance(first.l4, UDP) and first.l4.first_fragment and first.l4.length == len(seg)
        assert bytes(first.l4.payload) == seg[8:1448 if v6 else 1480]  # its own part of the data
        assert not first.l4.checksum_ok(first.ip)  # covers data this packet does not hold
        key = (first.ip.src, first.ip.dst, 17, 4500, 53)
        got = every_path(frames[0], 14)
        assert got == reference(frames[0], 14)
        assert got["parse_5tuple"] == got["gathered"] == key
        assert got["span eth"] == got["span ip"] == seg[8:1448 if v6 else 1480]
        for later in frames[1:]:
            assert parse_5tuple(later) is Reason.FRAGMENT and classify_batch([later]) == [Reason.FRAGMENT]
            assert every_path(later, 14) == reference(later, 14)


def test_udp_first_fragment_fast_path_and_vlan():
    # 8 bytes of data after the header: the IPv4 fixed-offset fast path itself takes it
    seg = b.udp(1, 2, b"x" * 40, src=S4, dst=D4)
    for vlan in (None, 7):
        fr = b.ip_frame(seg[:24], src=S4, dst=D4, proto=17, vlan=vlan, mf=True)
        base = 18 if vlan else 14
        got = every_path(fr, base)
        assert got == reference(fr, base)
        assert got["classify_batch"] == (IPv4(fr, base).src, IPv4(fr, base).dst, 17, 1, 2)
        assert got["span eth"] == b"x" * 16


def test_tcp_first_fragment_unchanged():
    seg = b.tcp(1, 80, b"y" * 2000, flags="PA", src=S4, dst=D4)
    fr = fragments(seg, 6, False)[0]
    got = every_path(fr, 14)
    assert got == reference(fr, 14)
    assert got["classify_batch flags"] == ((IPv4(fr, 14).src, IPv4(fr, 14).dst, 6, 1, 80), 0x18)
    assert got["span eth"] == seg[20:1480]


def test_udp_length_check_not_loosened():
    seg = b.udp(1, 2, b"z" * 40, src=S4, dst=D4)
    short = seg[:30]  # UDP length 48, 30 bytes present
    cases = [
        b.ip_frame(short, src=S4, dst=D4, proto=17),                                   # unfragmented
        b.ip_frame(short, src=S4, dst=D4, proto=17, df=True),                          # DF only
        b.ip_frame(short, src=S6, dst=D6, proto=17),                                   # IPv6
        b.ip_frame(short, src=S6, dst=D6, proto=17, ext=[b.ipv6_fragment(0, False, 5)]),  # atomic fragment
    ]
    for fr in cases:
        assert decode(fr).reason is Reason.TRUNCATED_UDP
        got = every_path(fr, 14)
        assert got == reference(fr, 14) and got["parse_5tuple"] is Reason.TRUNCATED_UDP
    ip = IPv6(cases[3], 14)
    assert ip.is_fragment and not ip.first_fragment
    # a first fragment still needs the 8-byte header and a length of at least 8
    tiny = b.ip_frame(seg[:6], src=S4, dst=D4, proto=17, mf=True) + b"\xff" * 30  # padding is not a length
    got = every_path(tiny, 14)
    assert got == reference(tiny, 14) and got["classify_batch"] is Reason.TRUNCATED_UDP
    bad = b.ip_frame(b.udp(1, 2, b"", length=7) + b"q" * 20, src=S4, dst=D4, proto=17, mf=True)
    got = every_path(bad, 14)
    assert got == reference(bad, 14) and got["classify_batch"] is Reason.BAD_UDP_LENGTH
    # a first fragment whose UDP length is within the bytes present: bounded by the length
    small = b.ip_frame(b.udp(1, 2, b"abc", src=S4, dst=D4) + b"trailing", src=S4, dst=D4, proto=17, mf=True)
    got = every_path(small, 14)
    assert got == reference(small, 14) and got["span eth"] == b"abc"


@st.composite
def fragment_frames(draw):
    """A TCP/UDP/ICMP frame cut as an IP fragment: first (offset 0, more), atomic (IPv6, offset 0,
    no more), middle or last; sometimes with bytes flipped or the buffer cut short."""
    f = draw(flows())
    src, dst = (S6, D6) if f["v6"] else (S4, D4)
    data = f["payload"] + draw(st.binary(max_size=40))
    if f["kind"] == "tcp":
        seg, proto = b.tcp(f["sport"], f["dport"], data, flags=f["flags"], seq=f["seq"], src=src, dst=dst), 6
    elif f["kind"] == "udp":
        seg, proto = b.udp(f["sport"], f["dport"], data, src=src, dst=dst), 17
    elif f["v6"]:
        seg, proto = b.icmpv6(128, 0, data, src=src, dst=dst, identifier=f["sport"]), 58
    else:
        seg, proto = b.icmp(8, 0, data, identifier=f["sport"]), 1
    cut = draw(st.integers(0, min(len(seg), 24)) | st.integers(0, len(seg)))  # often inside the L4 header
    offset = draw(st.sampled_from([0, 0, 0, 8, 1480]))
    more = draw(st.booleans()) if offset else draw(st.sampled_from([True, True, False]))
    chunk = seg[:cut] if offset == 0 else seg[cut:]
    if f["v6"]:
        fr = b.ip_frame(chunk, src=src, dst=dst, proto=proto, vlan=f["vlan"], ext=[b.ipv6_fragment(offset, more, 3)])
    else:
        fr = b.ip_frame(chunk, src=src, dst=dst, proto=proto, vlan=f["vlan"], mf=more, frag_offset=offset,
                        df=draw(st.booleans()))
    fr = bytearray(fr)
    for pos, val in draw(st.lists(st.tuples(st.integers(0, 80), st.integers(0, 255)), max_size=2)):
        if 12 <= pos < len(fr):  # not the MACs: nothing reads them
            fr[pos] = val
    if draw(st.booleans()):
        fr = fr[:draw(st.integers(0, len(fr)))]
    pad = draw(st.sampled_from([b"", b"\0" * 20, b"\xff" * 20]))  # link-layer padding is never data
    return bytes(fr) + pad, 18 if f["vlan"] is not None else 14


@settings(max_examples=400, deadline=None)
@given(fragment_frames())
def test_fast_paths_agree_with_decode_on_fragments(item):
    """Every fast path (fixed offsets, VLAN/IPv6 tier, flags loops, gathered records, payload
    spans) gives what the full decoder gives, for fragments of every kind, mutated and cut."""
    frame, ip_start = item
    assert every_path(frame, ip_start) == reference(frame, ip_start)
