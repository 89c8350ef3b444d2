"""Ethernet/VLAN view on frames built by hand with struct (not with our builders)."""
import struct

import pytest

from shmfabric.net.errors import MalformedError, Reason
from shmfabric.net.ethernet import Ethernet, mac_str, parse_mac

DST = bytes.fromhex("ffffffffffff")
SRC = bytes.fromhex("020000000001")


def test_untagged():
    frame = DST + SRC + struct.pack("!H", 0x0800) + b"payload"
    e = Ethernet(frame)
    assert (e.dst, e.src, e.ethertype, e.tags, e.vlan) == (DST, SRC, 0x0800, (), None)
    assert e.header_len == 14 and e.payload_offset == 14
    assert bytes(e.payload) == b"payload"
    assert e.is_broadcast and e.is_multicast


def test_single_and_double_tag():
    one = DST + SRC + struct.pack("!HHH", 0x8100, (5 << 13) | 0x1000 | 42, 0x86DD) + b"x"
    e = Ethernet(one)
    assert e.ethertype == 0x86DD and e.vlan == 42 and e.header_len == 18
    t = e.tags[0]
    assert (t.tpid, t.pcp, t.dei, t.vid) == (0x8100, 5, True, 42)
    assert t.tci == (5 << 13) | 0x1000 | 42
    qinq = DST + SRC + struct.pack("!HHHHH", 0x88A8, 100, 0x8100, 200, 0x0800)
    e = Ethernet(qinq)
    assert [t.vid for t in e.tags] == [100, 200] and e.ethertype == 0x0800 and e.header_len == 22


def test_too_many_tags_and_truncation():
    three = DST + SRC + struct.pack("!HHHHHHH", 0x8100, 1, 0x8100, 2, 0x8100, 3, 0x0800)
    with pytest.raises(MalformedError) as ei:
        Ethernet(three)
    assert ei.value.reason is Reason.TOO_MANY_VLAN_TAGS
    with pytest.raises(MalformedError) as ei:
        Ethernet(DST + SRC + b"\x08")
    assert ei.value.reason is Reason.TRUNCATED_ETHERNET
    with pytest.raises(MalformedError) as ei:
        Ethernet(DST + SRC + struct.pack("!HH", 0x8100, 1))
    assert ei.value.reason is Reason.TRUNCATED_VLAN and ei.value.offset == 14
    assert "VLAN" in str(ei.value) or "802.1Q" in str(ei.value)


def test_offset_and_memoryview_no_copy():
    buf = bytearray(b"\xaa" * 4 + DST + SRC + b"\x08\x06" + b"arp")
    e = Ethernet(memoryview(buf), 4)
    assert e.ethertype == 0x0806
    p = e.payload
    buf[-1] = ord("P")
    assert bytes(p) == b"arP"  # a view, not a copy


def test_rewrite_macs_in_place():
    buf = bytearray(DST + SRC + b"\x08\x00")
    e = Ethernet(buf)
    e.set_dst(bytes.fromhex("020000000009"))
    e.set_src(parse_mac("02-00-00-00-00-0a"))
    assert buf[:12] == bytes.fromhex("020000000009") + bytes.fromhex("02000000000a")
    assert Ethernet(buf).dst == e.dst
    with pytest.raises(TypeError):
        Ethernet(bytes(buf)).set_dst(DST)  # read-only buffer
    with pytest.raises(ValueError):
        e.set_dst(b"short")


def test_mac_text():
    assert mac_str(SRC) == "02:00:00:00:00:01"
    assert parse_mac("02:00:00:00:00:01") == SRC
    for bad in ("02:00:00:00:00", "zz:00:00:00:00:01", "0200.0000.0001", b"12345"):
        with pytest.raises(ValueError):
            parse_mac(bad)
