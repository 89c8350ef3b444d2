"""Internet checksum, RFC 1624 incremental updates and the pseudo-header, against a word-by-word
reference implementation written the way RFC 1071 describes it."""
import struct

import pytest
from hypothesis import given, settings, strategies as st

from shmfabric.net import checksum as ck


def ref_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = 0
    for (w,) in struct.iter_unpack("!H", data):
        s += w
        s = (s & 0xFFFF) + (s >> 16)
    return s


def ref_checksum(data: bytes) -> int:
    return ~ref_sum(data) & 0xFFFF


def test_rfc1071_example():
    # RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2.
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert ck.ones_sum(data) == 0xDDF2
    assert ck.checksum(data) == 0x220D


def test_known_ipv4_header():
    hdr = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert ck.checksum(hdr) == 0xB861
    with_csum = hdr[:10] + b"\xb8\x61" + hdr[12:]
    assert ck.verify(with_csum)
    assert not ck.verify(hdr[:10] + b"\xb8\x62" + hdr[12:])


def test_negative_zero_and_empty():
    assert ck.ones_sum(b"") == 0
    assert ck.ones_sum(b"\xff\xff") == 0xFFFF
    assert ck.ones_sum(b"\xff\xff\xff\xff") == 0xFFFF  # non-zero data never sums to +0
    assert ck.checksum(b"\x00\x00") == 0xFFFF


@settings(deadline=None)  # wall-clock deadlines flake on a loaded 2-core CI
@given(st.binary(max_size=3000))
def test_matches_reference(data):
    assert ck.ones_sum(data) == ref_sum(data)
    assert ck.checksum(data) == ref_checksum(data)
    assert ck.checksum(memoryview(data)) == ck.checksum(bytearray(data))


@settings(deadline=None)  # wall-clock deadlines flake on a loaded 2-core CI
@given(st.binary(max_size=64), st.integers(0, 0xFFFF))
def test_initial_sum_is_added(data, initial):
    # Equal as one's-complement values (0 and 0xFFFF are both zero there).
    assert ck.ones_sum(data, initial) % 0xFFFF == (initial + ref_sum(data)) % 0xFFFF


@settings(deadline=None)  # wall-clock deadlines flake on a loaded 2-core CI
@given(st.binary(min_size=20, max_size=200).filter(lambda b: len(b) % 2 == 0), st.data())
def test_update16_equals_recompute(data, draw):
    buf = bytearray(data)
    buf[0] |= 0x40  # never all zero (as no real header is): RFC 1624's one caveat
    buf[10:12] = b"\0\0"
    csum = ck.checksum(buf)
    # Word 0 keeps its non-zero bit; word 5 is the checksum field itself.
    i = draw.draw(st.integers(1, len(buf) // 2 - 1).filter(lambda i: i != 5)) * 2
    new = draw.draw(st.integers(0, 0xFFFF))
    old = struct.unpack_from("!H", buf, i)[0]
    struct.pack_into("!H", buf, i, new)
    assert ck.update16(csum, old, new) == ck.checksum(buf)


@settings(deadline=None)  # wall-clock deadlines flake on a loaded 2-core CI
@given(st.binary(min_size=24, max_size=24), st.integers(0, 2**32 - 1))
def test_update32_equals_recompute(data, new):
    buf = bytearray(data)
    buf[0] |= 0x40
    buf[10:12] = b"\0\0"
    csum = ck.checksum(buf)
    old = struct.unpack_from("!I", buf, 12)[0]
    struct.pack_into("!I", buf, 12, new)
    assert ck.update32(csum, old, new) == ck.checksum(buf)


@settings(deadline=None)  # wall-clock deadlines flake on a loaded 2-core CI
@given(st.binary(min_size=16, max_size=16), st.binary(min_size=16, max_size=16), st.binary(min_size=8, max_size=100))
def test_update_bytes_equals_recompute(old, new, tail):
    even = bytearray(b"\x60\x00" + old + tail)
    c0 = ck.checksum(even)
    even[2:18] = new
    assert ck.update_bytes(c0, old, new) == ck.checksum(even)


def test_update_bytes_rejects_odd_or_unequal():
    with pytest.raises(ValueError):
        ck.update_bytes(0, b"abc", b"abd")
    with pytest.raises(ValueError):
        ck.update_bytes(0, b"ab", b"abcd")


@settings(deadline=None)  # wall-clock deadlines flake on a loaded 2-core CI
@given(st.binary(min_size=4, max_size=4), st.binary(min_size=4, max_size=4), st.integers(0, 255), st.integers(0, 0xFFFF))
def test_pseudo_header_ipv4(src, dst, proto, length):
    ref = ref_sum(src + dst + bytes([0, proto]) + struct.pack("!H", length))
    got = ck.pseudo_header_sum(src, dst, proto, length)
    assert got % 0xFFFF == ref % 0xFFFF  # equal as one's-complement values
    assert ck.pseudo_header_sum(int.from_bytes(src, "big"), int.from_bytes(dst, "big"), proto, length) == got


@settings(deadline=None)  # wall-clock deadlines flake on a loaded 2-core CI
@given(st.binary(min_size=16, max_size=16), st.binary(min_size=16, max_size=16), st.integers(0, 2**20))
def test_pseudo_header_ipv6(src, dst, length):
    ref = ref_sum(src + dst + struct.pack("!I", length) + b"\0\0\0\x11")
    assert ck.pseudo_header_sum(src, dst, 17, length) % 0xFFFF == ref % 0xFFFF
