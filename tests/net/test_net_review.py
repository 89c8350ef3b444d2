"""Fixes from a review of the packet layer against tshark:

1. the frame builders compute the L4 checksum over the final destination of an IPv6 Routing
   header with segments left (RFC 8200 section 8.1), as `IPv6.final_dst` reads it;
2. address rewrites update UDP-Lite (136) and DCCP (33) checksums, which cover the pseudo-header;
3. IPv4 + AH is not walked (proto 51, ports 0) and every parse path says so alike (documented);
4. a Hop-by-Hop header not directly after the IPv6 header, or a Hop-by-Hop/Destination Options
   option running past its header, is BAD_IPV6_OPTIONS (as a bad IPv4 option is BAD_IPV4_OPTIONS);
5. with several Routing headers, the last one with segments left names the final destination
   (ones with Segments Left 0 are skipped), as tshark reads it;
6. builders refuse over-long TCP options and IPv6 extension headers with a clear ValueError.

The tshark cross-checks are skipped when tshark is not installed."""
import ipaddress
import struct
import subprocess

import pytest

from shmfabric import programs
from shmfabric.net import build as b
from shmfabric.net import checksum as ck
from shmfabric.net.errors import MalformedError, Reason
from shmfabric.net.flow import classify_batch, l4_payload_span, parse_5tuple, parse_5tuple_ip, tcp_flags, to_address
from shmfabric.net.ip import IPv4, IPv6
from shmfabric.net.packet import LINK_IP, decode

from .test_routing import CASES, CUR, routing
from .test_tshark import write_pcap

needs_tshark = pytest.mark.skipif(programs.find("tshark") is None, reason=programs.not_found("tshark"))


def A(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


S6, D6, HOP_A, HOP_B = "2001:db8::1", "2001:db8::2", A("2001:db8:aaaa::1"), A("2001:db8:bbbb::1")


def rh0(left: int, *addrs: bytes) -> tuple[int, bytes]:
    return routing(0, left, b"\0" * 4 + b"".join(addrs))


def tshark_fields(path, fields, *prefs):
    cmd = ["tshark", "-r", str(path)]
    for p in prefs:
        cmd += ["-o", p]
    cmd += ["-T", "fields", "-E", "separator=|", "-E", "occurrence=a", "-E", "aggregator=;"]
    for f in fields:
        cmd += ["-e", f]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    return [dict(zip(fields, line.split("|"))) for line in out.splitlines()]


def every_path(frame: bytes):
    """What each parse entry point says about an Ethernet frame (and its IP part, link "ip")."""
    ip = frame[14:]
    fl_e: list[int] = []
    fl_i: list[int] = []
    return {
        "decode": decode(frame).five_tuple(),
        "decode ip": decode(ip, 0, LINK_IP).five_tuple(),
        "parse_5tuple": parse_5tuple(frame),
        "parse_5tuple_ip": parse_5tuple_ip(ip),
        "classify_batch": classify_batch([frame])[0],
        "classify_batch ip": classify_batch([ip], link=LINK_IP)[0],
        "classify_batch flags": classify_batch([frame], flags=fl_e)[0],
        "classify_batch ip flags": classify_batch([ip], link=LINK_IP, flags=fl_i)[0],
        "flags": (fl_e[0], fl_i[0], tcp_flags(frame), tcp_flags(ip, LINK_IP)),
        "span": (l4_payload_span(frame), l4_payload_span(ip, LINK_IP)),
    }


# --- 1. builders: the L4 checksum over the final destination ----------------------------------------

RH_CASES = {name: rh for name, (rh, _) in CASES.items()}


@pytest.mark.parametrize("name", sorted(RH_CASES))
@pytest.mark.parametrize("kind", ["tcp", "udp"])
def test_frame_helpers_checksum_over_final_destination(kind, name):
    rh = RH_CASES[name]
    cur = ipaddress.IPv6Address(CUR)
    make = b.tcp_frame if kind == "tcp" else b.udp_frame
    fr = make("fd00::1", cur, 40001, 40002, b"data", ext=[rh])
    p = decode(fr)
    assert p.reason is None
    assert p.l4.checksum_ok(p.ip), (name, p)


def test_frame_helpers_ext_as_a_generator_and_without_routing_header():
    rh = rh0(1, HOP_A)
    fr = b.udp_frame(S6, D6, 1, 2, b"x", ext=(e for e in [b.ipv6_ext(60), rh]))  # read twice inside
    p = decode(fr)
    assert p.ip.final_dst == HOP_A and p.l4.checksum_ok(p.ip)
    for ext in ([], [b.ipv6_ext(0)], [rh0(0, HOP_A)]):  # no segments left: the Destination Address
        p = decode(b.tcp_frame(S6, D6, 1, 2, b"x", ext=ext))
        assert p.ip.final_dst == A(D6) and p.l4.checksum_ok(p.ip)


def test_final_dst_helper():
    assert b.final_dst(D6) == D6
    assert b.final_dst("10.0.0.1", [rh0(1, HOP_A)]) == "10.0.0.1"  # IPv4: nothing to do
    assert b.final_dst(D6, [rh0(1, HOP_A)]) == HOP_A
    assert b.final_dst(D6, [rh0(1, HOP_A), rh0(1, HOP_B)]) == HOP_B
    bad = (0, b"\x00\x00\x01\x78\x00\x00\x00\x00")  # PadN running past its header
    assert b.final_dst(D6, [bad, rh0(1, HOP_A)]) == D6  # a malformed chain: the field, no exception
    seg = b.icmpv6(128, 0, b"ping", src=S6, dst=b.final_dst(D6, [rh0(1, HOP_A)]), identifier=1)
    p = decode(b.ip_frame(seg, src=S6, dst=D6, proto=58, ext=[rh0(1, HOP_A)]))
    assert p.l4.checksum_ok(p.ip)
    # what the view reads, for every routing case (the ones with several headers are below)
    for rh, final in CASES.values():
        assert to_address(b.final_dst(ipaddress.IPv6Address(CUR), [rh])) == final
    for rhs, final in MULTI_RH.values():
        assert to_address(b.final_dst(D6, rhs)) == final


@needs_tshark
def test_tshark_agrees_on_built_routing_header_checksums(tmp_path):
    frames = []
    for name, rh in RH_CASES.items():
        if name.startswith(("unknown", "type 4, no segment")):
            continue  # a node discards these (RFC 8200 section 4.4)
        frames.append(b.tcp_frame("fd00::1", ipaddress.IPv6Address(CUR), 40001, 40002, b"d", flags="PA", ext=[rh]))
        frames.append(b.udp_frame("fd00::1", ipaddress.IPv6Address(CUR), 40001, 40002, b"d", ext=[rh]))
    write_pcap(tmp_path / "b.pcap", frames)
    rows = tshark_fields(tmp_path / "b.pcap", ["tcp.checksum.status", "udp.checksum.status"],
                         "tcp.check_checksum:TRUE", "udp.check_checksum:TRUE")
    assert len(rows) == len(frames)
    for row in rows:
        assert "1" in (row["tcp.checksum.status"], row["udp.checksum.status"]), row  # 1 = good


# --- 2. rewrites update UDP-Lite and DCCP checksums ---------------------------------------------------

def lite_or_dccp(proto: int, src, dst, payload=b"payload!") -> bytes:
    """A UDP-Lite (coverage 0: the whole datagram) or DCCP (a 20-byte Request, CsCov 0: the whole
    packet) segment with its checksum over the pseudo-header."""
    if proto == 136:
        seg = bytearray(struct.pack("!HHHH", 40000, 40001, 0, 0) + payload)
    else:  # DCCP: ports, data offset 5 words, CCVal/CsCov, checksum, type 0 (Request) with X=1,
        # reserved, 48-bit sequence number, service code
        seg = bytearray(struct.pack("!HHBBHBB6sI", 40000, 40001, 5, 0, 0, 0x01, 0, bytes(6), 0) + payload)
    csum = ck.l4_checksum(src, dst, proto, seg)
    struct.pack_into("!H", seg, 6, (csum or 0xFFFF) if proto == 136 else csum)
    return bytes(seg)


def l4_ok(ip) -> bool:
    return ck.verify(ip.payload, ip.pseudo_sum(len(ip.payload)))


REWRITES = [
    (4, "10.0.0.1", "10.0.0.2", [("set_src", 0x0A000063), ("set_dst", 0xC0A80101)]),
    (6, S6, D6, [("set_src", A("2001:db8:77::1")), ("set_dst", A("2001:db8:77::42"))]),
]


@pytest.mark.parametrize("proto", [136, 33])
@pytest.mark.parametrize("version,src,dst,changes", REWRITES)
def test_address_rewrite_updates_udplite_and_dccp_checksums(proto, version, src, dst, changes):
    s, d = to_address(src), to_address(dst)
    buf = bytearray(b.ip_frame(lite_or_dccp(proto, s, d), src=src, dst=dst, proto=proto))
    p = decode(buf)
    assert p.reason is None and p.ip.proto == proto and l4_ok(p.ip)
    for setter, value in changes:
        getattr(p.ip, setter)(value)
        assert l4_ok(p.ip), setter
        if version == 4:
            assert p.ip.checksum_ok()
    assert decode(bytes(buf)).five_tuple()[3:] == (40000, 40001)


def test_udp_zero_checksum_stays_zero_but_udplite_is_updated():
    # UDP over IPv4 without a checksum keeps none; UDP-Lite's checksum is mandatory, so a zero
    # field is a value like any other and is updated (not left behind as "no checksum")
    udp = bytearray(b.ip_frame(b.udp(1, 2, b"x", checksum=0), src="10.0.0.1", dst="10.0.0.2", proto=17))
    decode(udp).ip.set_src(0x0A000063)
    assert udp[40:42] == b"\0\0"
    lite = bytearray(b.ip_frame(struct.pack("!HHHH", 1, 2, 0, 0) + b"x", src="10.0.0.1", dst="10.0.0.2", proto=136))
    decode(lite).ip.set_src(0x0A000063)
    assert lite[40:42] != b"\0\0"


def test_udplite_computed_zero_is_sent_as_all_ones():
    # a new source address whose rewrite makes the UDP-Lite checksum come out as zero: RFC 1624
    # gives ~fold(~old_csum + ~src_hi + ~src_lo + new_hi + new_lo), zero when the fold is 0xFFFF
    src, dst = 0x0A000001, 0x0A000002
    seg = lite_or_dccp(136, src, dst, b"")
    old = struct.unpack_from("!H", seg, 6)[0]
    k = ck.fold((~old & 0xFFFF) + (~src >> 16 & 0xFFFF) + (~src & 0xFFFF) + 0x0B00)
    new = 0x0B000000 | (0xFFFF - k)
    assert ck.update32(old, src, new) == 0
    buf = bytearray(b.ip_frame(seg, src=src, dst=dst, proto=136))
    p = decode(buf)
    p.ip.set_src(new)
    assert buf[40:42] == b"\xff\xff" and l4_ok(p.ip)


@needs_tshark
def test_tshark_agrees_on_rewritten_udplite_and_dccp(tmp_path):
    frames = []
    for proto in (136, 33):
        for _, src, dst, changes in REWRITES:
            buf = bytearray(b.ip_frame(lite_or_dccp(proto, to_address(src), to_address(dst)), src=src, dst=dst, proto=proto))
            p = decode(buf)
            for setter, value in changes:
                getattr(p.ip, setter)(value)
            frames.append(buf)
    write_pcap(tmp_path / "l.pcap", frames)
    rows = tshark_fields(tmp_path / "l.pcap", ["frame.protocols", "udp.checksum.status", "dccp.checksum.status"],
                         "udplite.check_checksum:TRUE", "dccp.check_checksum:TRUE")
    assert len(rows) == len(frames)
    for row in rows:
        proto = "udplite" if ":udplite" in row["frame.protocols"] else "dccp"
        assert row["udp.checksum.status" if proto == "udplite" else "dccp.checksum.status"] == "1", row


# --- 3. IPv4 + AH: not walked, and every path says so --------------------------------------------------

def ah(nxt: int) -> bytes:
    """An Authentication Header with a 12-byte ICV (payload length (24 / 4) - 2 = 4)."""
    return bytes([nxt, 4, 0, 0]) + struct.pack("!II", 0x100, 1) + bytes.fromhex("5010ffff") + bytes(8)


def test_ipv4_ah_is_not_walked_and_every_path_agrees():
    t = b.tcp(40000, 22, b"x", flags="A", src="10.0.0.1", dst="10.0.0.2")
    fr = b.ip_frame(ah(6) + t, src="10.0.0.1", dst="10.0.0.2", proto=51)
    ip = IPv4(fr, 14)
    assert (ip.proto, ip.l4_offset) == (51, 34)
    want = (0x0A000001, 0x0A000002, 51, 0, 0)
    got = every_path(fr)
    assert got.pop("flags") == (0, 0, 0, 0)
    assert got.pop("span") == (None, None)
    assert set(got.values()) == {want}, got
    # IPv6 walks AH as one of its extension headers: the 5-tuple has the TCP ports
    t6 = b.tcp(40000, 22, b"x", flags="A", src=S6, dst=D6)
    assert decode(b.ip_frame(t6, src=S6, dst=D6, proto=6, ext=[(51, ah(0))])).five_tuple()[2:] == (6, 40000, 22)


# --- 4. IPv6 option headers are validated --------------------------------------------------------------

U6 = b.udp(40000, 40001, b"data", src=S6, dst=D6)
BAD_OPTIONS = {
    "hop-by-hop after destination options": [b.ipv6_ext(60), b.ipv6_ext(0)],
    "hop-by-hop after routing": [rh0(0, HOP_A), b.ipv6_ext(0)],
    "two hop-by-hop": [b.ipv6_ext(0), b.ipv6_ext(0)],
    "padn past header and packet": [b.ipv6_ext(60, b"\x01\x78")],
    "padn past header, within packet": [(60, b"\x00\x00\x01\x05\x00\x00\x00\x00"), b.ipv6_ext(60)],
    "option type without length byte": [(0, b"\x00\x00\x00\x00\x00\x00\x00\xc2")],
    "router alert one byte short": [(0, b"\x00\x00\x00\x00\x05\x03\x00\x00")],
}
GOOD_OPTIONS = {
    "pad1 only": [(0, bytes(8))],
    "padn exact fit": [(60, b"\x00\x00\x01\x04\x00\x00\x00\x00")],
    "router alert + padn": [b.ipv6_ext(0, b"\x05\x02\x00\x00")],
    "hop-by-hop first, then destination options": [b.ipv6_ext(0), b.ipv6_ext(60, b"\x01\x02\x00\x00")],
    "destination options twice": [b.ipv6_ext(60), rh0(0, HOP_A), b.ipv6_ext(60)],
    "16-byte header, long option": [(60, b"\x00\x01" + b"\x1e\x0c" + bytes(12))],
}


@pytest.mark.parametrize("name", sorted(BAD_OPTIONS))
def test_bad_ipv6_options_are_malformed_on_every_path(name):
    fr = b.ip_frame(U6, src=S6, dst=D6, proto=17, ext=BAD_OPTIONS[name])
    with pytest.raises(MalformedError) as e:
        IPv6(fr, 14)
    assert e.value.reason is Reason.BAD_IPV6_OPTIONS
    got = every_path(fr)
    assert got.pop("flags") == (0, 0, 0, 0)
    assert got.pop("span") == (None, None)
    assert set(got.values()) == {Reason.BAD_IPV6_OPTIONS}, got
    assert decode(fr).error_offset >= 54


@pytest.mark.parametrize("name", sorted(GOOD_OPTIONS))
def test_good_ipv6_options_still_give_the_5tuple(name):
    fr = b.ip_frame(U6, src=S6, dst=D6, proto=17, ext=GOOD_OPTIONS[name])
    got = every_path(fr)
    assert got.pop("flags") == (0, 0, 0, 0)
    spans = got.pop("span")
    assert spans[0] is not None and spans[1] is not None
    assert set(got.values()) == {(A(S6), A(D6), 17, 40000, 40001)}, got


def test_bad_ipv6_options_reason():
    assert Reason.BAD_IPV6_OPTIONS.malformed
    assert "Hop-by-Hop" in Reason.BAD_IPV6_OPTIONS.describe()


def test_options_checked_in_a_fragment_too():
    frag = b.ipv6_fragment(offset=8, more=False, ident=5)
    fr = b.ip_frame(b"x" * 16, src=S6, dst=D6, proto=17, ext=[b.ipv6_ext(60), b.ipv6_ext(0), frag])
    assert decode(fr).reason is Reason.BAD_IPV6_OPTIONS
    fr = b.ip_frame(b"x" * 16, src=S6, dst=D6, proto=17, ext=[b.ipv6_ext(0), frag])
    assert decode(fr).five_tuple() is Reason.FRAGMENT


@needs_tshark
def test_tshark_flags_the_bad_options_too(tmp_path):
    # tshark 4.0 reports a Hop-by-Hop header out of place, and an option that runs past the end of
    # the packet; an option that runs past its header but not the packet it reads on into the next
    # header without a word (Linux drops such a packet: ip6_parse_tlv), so that one is not asked.
    names = [n for n in BAD_OPTIONS if n != "padn past header, within packet" and "without length" not in n
             and "one byte short" not in n]
    frames = [b.ip_frame(U6, src=S6, dst=D6, proto=17, ext=BAD_OPTIONS[n]) for n in names]
    write_pcap(tmp_path / "o.pcap", frames)
    rows = tshark_fields(tmp_path / "o.pcap", ["_ws.expert.message", "_ws.malformed"])
    assert len(rows) == len(frames)
    for name, fr, row in zip(names, frames, rows):
        text = row["_ws.expert.message"]
        assert "Hop-by-Hop extension header must appear immediately after" in text or "Malformed" in text, (name, row)
        assert decode(fr).reason is Reason.BAD_IPV6_OPTIONS


# --- 5. several Routing headers -------------------------------------------------------------------------

# name -> (routing headers, the final destination: the last with segments left, else the field)
MULTI_RH = {
    "sl 0, then sl 1": ([rh0(0, HOP_A), rh0(1, HOP_B)], HOP_B),
    "sl 1, then sl 1": ([rh0(1, HOP_A), rh0(1, HOP_B)], HOP_B),
    "sl 1, then sl 0": ([rh0(1, HOP_A), rh0(0, HOP_B)], HOP_A),
    "sl 0, then sl 0": ([rh0(0, HOP_A), rh0(0, HOP_B)], A(D6)),
    "sl 0, dest opts, sl 1": ([rh0(0, HOP_A), b.ipv6_ext(60), rh0(1, HOP_B)], HOP_B),
    "unknown type, then type 0": ([routing(9, 1, b"\0" * 4 + HOP_A), rh0(1, HOP_B)], HOP_B),
    "srh sl 0, then srh sl 1": ([routing(4, 0, bytes([0, 0, 0, 0]) + HOP_A),
                                 routing(4, 1, bytes([1, 0, 0, 0]) + HOP_B + HOP_A)], HOP_B),
}


def multi_rh_frame(rhs, csum_dst: bytes) -> bytes:
    return b.ip_frame(b.udp(40000, 40001, b"two-rh", src=S6, dst=csum_dst), src=S6, dst=D6, proto=17, ext=rhs)


@pytest.mark.parametrize("name", sorted(MULTI_RH))
def test_several_routing_headers(name):
    rhs, final = MULTI_RH[name]
    fr = multi_rh_frame(rhs, final)
    p = decode(fr)
    assert p.ip.final_dst == final
    assert p.l4.checksum_ok(p.ip)
    # a rewrite keeps the checksum right: the destination field matters only when it is final
    buf = bytearray(fr)
    q = decode(buf)
    q.ip.set_dst(A("2001:db8:77::42"))
    q.ip.set_src(A("2001:db8:77::1"))
    q = decode(buf)
    assert q.l4.checksum_ok(q.ip)


@needs_tshark
def test_tshark_agrees_on_several_routing_headers(tmp_path):
    frames, want = [], []
    for rhs, final in MULTI_RH.values():
        for csum_dst in dict.fromkeys([final, A(D6), HOP_A, HOP_B]):
            frames.append(multi_rh_frame(rhs, csum_dst))
            want.append(csum_dst == final)
    write_pcap(tmp_path / "r.pcap", frames)
    rows = tshark_fields(tmp_path / "r.pcap", ["udp.checksum.status"], "udp.check_checksum:TRUE")
    assert len(rows) == len(frames)
    for fr, row, ok in zip(frames, rows, want):
        p = decode(fr)
        assert p.l4.checksum_ok(p.ip) is ok
        assert row["udp.checksum.status"] == ("1" if ok else "0"), (row, p)


# --- 6. builders: clear errors for what cannot be encoded -----------------------------------------------

def test_tcp_options_too_long():
    assert len(b.tcp(1, 2, options=bytes(40))) == 60
    with pytest.raises(ValueError, match="TCP options too long: 44 bytes"):
        b.tcp(1, 2, options=bytes(41))
    with pytest.raises(ValueError, match="data offset is 4 bits"):
        b.tcp(1, 2, data_offset=16)
    # a malformed segment on purpose: the data offset says 15 words, the options are longer
    seg = b.tcp(1, 2, options=bytes(44), data_offset=15)
    assert seg[12] >> 4 == 15 and len(seg) == 64


def test_ipv6_ext_too_long():
    t, hdr = b.ipv6_ext(60, bytes(2046))
    assert len(hdr) == 2048 and hdr[1] == 255
    assert decode(b.ip_frame(U6, src=S6, dst=D6, proto=17, ext=[(t, hdr)])).five_tuple()[2] == 17
    with pytest.raises(ValueError, match="IPv6 extension header too long"):
        b.ipv6_ext(60, bytes(2047))
