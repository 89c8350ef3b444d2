"""The core's two memif passes (`native.memif_take`, `native.memif_put`) against Python
references, on rings and regions built in plain memory: no peer, no socket, no root.

`memif_take` must take what the Python loop it replaced took (the same descriptors, chains
gathered the same way, the same drops), and sort each frame exactly as `ethernet.classify` and
`ethernet.routed` do; `memif_put` must write frames where the peer's descriptors (server) or
the client's fixed buffers say, and stop at the first frame it leaves to the caller.
"""
from __future__ import annotations

import struct
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shmfabric.adapters import memif_wire as w
from shmfabric.adapters.ethernet import ETH_HLEN, FABRIC_OUI, FLOOD, Verdict, classify, routed
from shmfabric.core import native
from shmfabric.fabric import Fabric

pytestmark = pytest.mark.timeout(120)

OWN = FABRIC_OUI + b"\x00\x09"
MAX_LEN = 1514
DESC = w.DESC


def ring_with(descs: list[tuple[int, int, int, int]], size: int, start: int = 0) -> bytearray:
    """A ring's descriptor area (at offset 0) holding `descs` (flags, region, length, offset) from
    index `start` on, wrapping."""
    ring = bytearray(size * 16)
    for k, (flags, region, length, offset) in enumerate(descs):
        DESC.pack_into(ring, ((start + k) % size) * 16, flags, region, length, offset, 0)
    return ring


def reference_take(ring: bytes, mask: int, cursor: int, avail: int, limit: int, regions: list[bytes], max_len: int,
                   via: bool):
    """What the Python loop took before the core did (pump_device + _gather + deliver_many's
    classification), in memif_take's shape."""
    size = mask + 1
    groups: dict[int, list[bytes]] = {}
    vias: list[bytes] = []
    floods: list[bytes] = []
    drops = dict.fromkeys(("bad", "big", "short", "self", "foreign"), 0)
    taken = n = 0
    frames: list[bytes] = []
    while taken < limit:
        flags, region, length, offset, _ = DESC.unpack_from(ring, ((cursor + taken) & mask) * 16)
        if flags & w.DESC_NEXT:
            parts, total, why, left = [], 0, "", avail - taken
            for k in range(left):
                f2, r2, l2, o2, _ = DESC.unpack_from(ring, ((cursor + taken + k) & mask) * 16)
                if not why:
                    total += l2
                    if r2 >= len(regions) or o2 + l2 > len(regions[r2]):
                        why = "bad"
                    elif total > max_len:
                        why = "big"
                    else:
                        parts.append(regions[r2][o2:o2 + l2])
                if not f2 & w.DESC_NEXT:
                    got = (k + 1, why or b"".join(parts))
                    break
            else:
                if left < size:
                    break
                got = (left, "bad")
            segs, data = got
            taken += segs
            n += 1
            if data in ("bad", "big"):
                drops[data] += 1
            else:
                frames.append(data)
            continue
        taken += 1
        n += 1
        if region >= len(regions) or offset + length > len(regions[region]):
            drops["bad"] += 1
        elif length > max_len:
            drops["big"] += 1
        else:
            frames.append(regions[region][offset:offset + length])
    for f in frames:
        if len(f) < ETH_HLEN:
            drops["short"] += 1
            continue
        dst = classify(f, OWN)
        if dst >= 0 and via and routed(f[:ETH_HLEN], f[ETH_HLEN:]):
            vias.append(f)
        elif dst >= 0:
            groups.setdefault(dst, []).append(f)
        elif dst == FLOOD:
            floods.append(f)
        else:
            drops[{Verdict.SELF: "self", Verdict.FOREIGN: "foreign", Verdict.SHORT: "short"}[Verdict(dst)]] += 1
    return (taken, n, groups, vias, floods, *drops.values())


def take(ring, mask, cursor, avail, limit, regions, max_len=MAX_LEN, via=False):
    return native.memif_take(ring, 0, mask, cursor, avail, limit, regions, max_len, OWN, FABRIC_OUI, via)


# -- frames that exercise every branch of the classification -----------------------------------

macs = st.sampled_from([OWN, FABRIC_OUI + b"\x00\x01", FABRIC_OUI + b"\x01\x02", b"\xff" * 6,
                        b"\x01\x00\x5e\x00\x00\x01", b"\x33\x33\x00\x00\x00\x01", b"\x02\x00\x00\x00\x00\x01",
                        FABRIC_OUI[:3] + b"\x01\x00\x01"])
ethertypes = st.sampled_from([b"\x08\x06", b"\x86\xdd", b"\x08\x00", b"\x81\x00", b"\x00\x00"])


@st.composite
def frames(draw) -> bytes:
    """A frame: a chosen MAC and ethertype, often an IPv6 header whose next header and first byte
    after it decide whether it is neighbour discovery; sometimes cut short anywhere."""
    f = draw(macs) + draw(st.binary(min_size=6, max_size=6)) + draw(ethertypes)
    if draw(st.booleans()):
        ip6 = bytearray(draw(st.binary(min_size=40, max_size=40)))
        ip6[6] = draw(st.sampled_from([58, 6, 17, 0]))
        f += bytes(ip6) + bytes([draw(st.sampled_from([133, 134, 135, 136, 137, 128, 132, 138]))])
    f += draw(st.binary(max_size=40))
    if draw(st.integers(0, 9)) == 0:
        f = f[:draw(st.integers(0, len(f)))]
    return f


@settings(max_examples=300, deadline=None)
@given(st.lists(frames(), min_size=1, max_size=40), st.booleans())
def test_every_frame_goes_where_classify_and_routed_send_it(fs: list[bytes], via: bool):
    region = b"".join(fs)
    descs, at = [], 0
    for f in fs:
        descs.append((0, 0, len(f), at))
        at += len(f)
    ring = ring_with(descs, 64)
    got = take(ring, 63, 0, len(fs), len(fs), [region], via=via)
    assert got == reference_take(ring, 63, 0, len(fs), len(fs), [region], MAX_LEN, via)
    assert got[0] == got[1] == len(fs)


@pytest.mark.parametrize("next_header", [58, 6])
@pytest.mark.parametrize("icmp_type", range(128, 141))
@pytest.mark.parametrize("ip6_bytes", [40, 41, 60])
def test_only_neighbour_discovery_goes_around_the_chain(next_header, icmp_type, ip6_bytes):
    """ICMPv6 133-137 right after the IPv6 header go straight to their node; the rest of IPv6,
    and a header too short to hold the type, go through the chain, as `routed` says."""
    ip6 = bytearray(ip6_bytes)
    ip6[6] = next_header
    if ip6_bytes > 40:
        ip6[40] = icmp_type
    frame = FABRIC_OUI + b"\x00\x01" + OWN + b"\x86\xdd" + bytes(ip6)
    ring = ring_with([(0, 0, len(frame), 0)], 4)
    taken, n, groups, vias, floods, *drops = take(ring, 3, 0, 1, 1, [frame], via=True)
    straight = not routed(frame[:ETH_HLEN], frame[ETH_HLEN:])
    assert straight == (next_header == 58 and 133 <= icmp_type <= 137 and ip6_bytes > 40)
    assert (groups, vias) == (({1: [frame]}, []) if straight else ({}, [frame]))


def test_arp_goes_straight_and_every_other_ethertype_through_the_chain():
    for et, straight in ((b"\x08\x06", True), (b"\x08\x00", False), (b"\x81\x00", False), (b"\x88\xb5", False)):
        frame = FABRIC_OUI + b"\x00\x04" + OWN + et + bytes(46)
        ring = ring_with([(0, 0, len(frame), 0)], 4)
        _, _, groups, vias, _, *_ = take(ring, 3, 0, 1, 1, [frame], via=True)
        assert (groups, vias) == (({4: [frame]}, []) if straight else ({}, [frame]))
        _, _, groups, vias, _, *_ = take(ring, 3, 0, 1, 1, [frame], via=False)
        assert (groups, vias) == ({4: [frame]}, [])


# -- descriptors, chains, bounds, wrap-around -------------------------------------------------

@st.composite
def rings(draw):
    """A ring of 16 descriptors published from a cursor near the 16-bit wrap, pointing into two
    regions (sometimes outside them, by a little or past 2^32), some chained."""
    regions = [draw(st.binary(min_size=64, max_size=400)), draw(st.binary(min_size=0, max_size=64))]
    size = 16
    cursor = draw(st.sampled_from([0, 5, 0xFFF8, 0xFFFF]))
    avail = draw(st.integers(0, size))
    descs = []
    for _ in range(avail):
        region = draw(st.sampled_from([0, 0, 0, 1, 2, 0xFFFF]))
        rlen = len(regions[region]) if region < 2 else 64
        offset = draw(st.one_of(st.integers(0, rlen), st.just(0xFFFFFFFF), st.integers(0, 400)))
        length = draw(st.one_of(st.integers(0, max(0, rlen - min(offset, rlen))), st.integers(0, 600),
                                st.just(0xFFFFFFFF)))
        flags = w.DESC_NEXT if draw(st.integers(0, 3)) == 0 else 0
        descs.append((flags, region, length, offset))
    limit = draw(st.integers(0, avail))
    max_len = draw(st.sampled_from([14, 60, 200, MAX_LEN]))
    return ring_with(descs, size, cursor & 15), cursor, avail, limit, regions, max_len


@settings(max_examples=500, deadline=None)
@given(rings(), st.booleans())
def test_descriptors_are_taken_as_the_python_loop_took_them(case, via: bool):
    ring, cursor, avail, limit, regions, max_len = case
    assert take(ring, 15, cursor, avail, limit, regions, max_len, via) == reference_take(
        ring, 15, cursor, avail, limit, regions, max_len, via)


def test_a_chain_is_gathered_into_one_frame_across_the_ring_end():
    frame = (FABRIC_OUI + b"\x00\x03") + OWN + b"\x08\x00" + bytes(range(100))
    region = frame[:30] + b"-" * 10 + frame[30:80] + frame[80:]
    descs = [(w.DESC_NEXT, 0, 30, 0), (w.DESC_NEXT, 0, 50, 40), (0, 0, len(frame) - 80, 90)]
    ring = ring_with(descs, 8, start=6)  # indices 6, 7, 0
    taken, n, groups, vias, floods, *drops = take(ring, 7, 6, 3, 3, [region])
    assert (taken, n, groups, drops) == (3, 1, {3: [frame]}, [0, 0, 0, 0, 0])


def test_a_chain_whose_end_is_not_published_waits_and_the_frames_before_it_go():
    one = FABRIC_OUI + b"\x00\x02" + OWN + b"\x08\x00" + b"x" * 50
    region = one + b"y" * 100
    descs = [(0, 0, len(one), 0), (w.DESC_NEXT, 0, 20, len(one)), (w.DESC_NEXT, 0, 20, len(one) + 20)]
    ring = ring_with(descs, 8)
    taken, n, groups, *_ = take(ring, 7, 0, 3, 3, [region])
    assert (taken, n, groups) == (1, 1, {2: [one]})  # the chain stays for the next call


def test_a_chain_as_long_as_the_ring_is_dropped_as_bad():
    ring = ring_with([(w.DESC_NEXT, 0, 10, 0)] * 4, 4)
    taken, n, groups, vias, floods, bad, *rest = take(ring, 3, 0, 4, 4, [bytes(100)])
    assert (taken, n, groups, bad) == (4, 1, {}, 1)


def test_a_chain_longer_than_the_mtu_is_counted_and_its_parts_never_joined():
    ring = ring_with([(w.DESC_NEXT, 0, 1000, 0), (0, 0, 1000, 0)], 4)
    taken, n, groups, vias, floods, bad, big, *rest = take(ring, 3, 0, 2, 2, [bytes(1000)])
    assert (taken, n, bad, big, groups) == (2, 1, 0, 1, {})


def test_an_offset_past_four_gigabytes_is_outside_the_region_not_wrapped_into_it():
    ring = ring_with([(0, 0, 0x20, 0xFFFFFFF0)], 4)
    taken, n, groups, vias, floods, bad, *rest = take(ring, 3, 0, 1, 1, [bytes(64)])
    assert (taken, bad, groups) == (1, 1, {})


def test_a_ring_that_does_not_fit_its_buffer_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        native.memif_take(bytes(100), 0, 15, 0, 1, 1, [b""], MAX_LEN, OWN, FABRIC_OUI, False)
    with pytest.raises(ValueError, match="power of two"):
        native.memif_take(bytes(16 * 6), 0, 5, 0, 1, 1, [b""], MAX_LEN, OWN, FABRIC_OUI, False)


# -- memif_put: frames of a real batch written into a ring -------------------------------------

@pytest.fixture
def batch_of():
    """A function sending frames (payload, meta) to a node and giving the batch it receives."""
    fab = Fabric.create(f"memifcore{uuid.uuid4().hex[:8]}", ephemeral=True, networks=[{"mtu": 1500, "slots": 256}])
    a, b = fab.attach("a"), fab.attach("b")
    batches = []

    def make(frames: list[tuple[bytes, int]]):
        for payload, meta in frames:
            assert a.send_batch(b.id, [payload], meta=meta) == 1
        batch = b.recv_batch(64, 1.0)
        assert len(batch) == len(frames)
        batches.append(batch)
        return batch

    try:
        yield make
    finally:
        for batch in batches:
            batch.release()
        a.detach()
        b.detach()
        fab.close()


def whole(f) -> bytes:
    return f.dst + f.src_mac + f.ethertype.to_bytes(2, "big") + f.tobytes()


def test_a_client_writes_each_frame_into_its_fixed_buffer(batch_of):
    b = batch_of([(bytes([k]) * (20 + k), 0) for k in range(5)])
    region = bytearray(4096)
    ring = bytearray(8 * 16)
    nxt, written, cursor = native.memif_put(b, 0, ring, 0, 7, 0xFFFE, 8, [region], False, 256, 1024)
    assert (nxt, written, cursor) == (5, 5, 3)
    for k, f in enumerate(b):
        slot = (0xFFFE + k) & 7
        flags, reg, length, offset, meta = DESC.unpack_from(ring, slot * 16)
        assert (flags, reg, length, offset, meta) == (0, 0, ETH_HLEN + 20 + k, 1024 + slot * 256, 0)
        assert region[offset:offset + length] == whole(f)


def test_a_server_fills_the_buffers_the_client_gave_and_stops_where_one_is_too_small(batch_of):
    b = batch_of([(b"a" * 50, 0), (b"b" * 50, 0), (b"c" * 50, 0)])
    regions = [bytearray(256), bytearray(512)]
    ring = ring_with([(0, 1, 100, 0), (0, 0, 100, 128), (0, 1, 20, 300)], 4)
    nxt, written, cursor = native.memif_put(b, 0, ring, 0, 3, 0, 3, regions, True, 0, 0)
    assert (nxt, written, cursor) == (2, 2, 2)  # the third buffer holds 20 bytes: left to the caller
    assert regions[1][:64] == whole(b[0]) and regions[0][128:192] == whole(b[1])
    assert DESC.unpack_from(ring, 0) == (0, 1, 64, 0, 0) and DESC.unpack_from(ring, 32) == (0, 1, 20, 300, 0)


@pytest.mark.parametrize("desc", [(0, 2, 100, 0), (0, 0, 100, 200), (0, 0, 0, 0), (0, 0, 0x100, 0xFFFFFF80)],
                         ids=["no-such-region", "past-the-region", "empty", "offset-wraps"])
def test_a_server_never_writes_a_buffer_outside_the_clients_memory(batch_of, desc):
    b = batch_of([(b"z" * 40, 0)])
    regions = [bytearray(256)]
    ring = ring_with([desc], 4)
    assert native.memif_put(b, 0, ring, 0, 3, 0, 1, regions, True, 0, 0) == (0, 0, 0)
    assert regions[0] == bytearray(256)


def test_frames_with_metadata_and_past_the_room_are_left_to_the_caller(batch_of):
    b = batch_of([(b"1" * 30, 0), (b"2" * 30, 1 << 31), (b"3" * 30, 0), (b"4" * 30, 0)])
    region = bytearray(4096)
    ring = bytearray(8 * 16)
    assert native.memif_put(b, 0, ring, 0, 7, 0, 8, [region], False, 256, 0) == (1, 1, 1)
    assert native.memif_put(b, 2, ring, 0, 7, 1, 1, [region], False, 256, 0) == (3, 1, 2)
    b.release()
    with pytest.raises(native.ReleasedError):
        native.memif_put(b, 3, ring, 0, 7, 2, 1, [region], False, 256, 0)


def test_a_client_frame_larger_than_its_buffer_is_left_to_the_caller(batch_of):
    b = batch_of([(b"L" * 300, 0)])
    ring = bytearray(4 * 16)
    assert native.memif_put(b, 0, ring, 0, 3, 0, 4, [bytearray(4096)], False, 256, 0) == (0, 0, 0)


def test_the_descriptor_layout_is_the_wire_modules():
    # the core reads descriptors as flags u16, region u16, length u32, offset u32 (host order)
    assert DESC.format in ("<HHIII",) and DESC.size == 16 and struct.calcsize("=HHIII") == 16
