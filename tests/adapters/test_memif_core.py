"""The core's two memif passes (`native.memif_take`, `native.memif_put`) against Python
references, on rings and regions built in plain memory: no peer, no socket, no root.

`memif_take` must take what the Python loop it replaced took (the same descriptors, chains
gathered the same way, the same drops), and sort each frame exactly as `ethernet.classify` and
`ethernet.routed` do; `memif_put` must write frames where the peer's descriptors (server) or
the client's fixed buffers say, and stop at the first frame it leaves to the caller.
"""
from __future__ import annotations

import mmap
import os
import random
import signal
import struct
import time
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shmfabric.adapters import memif
from shmfabric.adapters import memif_wire as w
from shmfabric.adapters.ethernet import (ETH_HLEN, FABRIC_OUI, FLOOD, META_DEVICE_WORK, Verdict, classify,
                                         routed, vnet_to_meta)
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
            groups.setdefault(native.MEMIF_VIA, []).append(f)
        elif dst >= 0:
            groups.setdefault(dst, []).append(f)
        elif dst == FLOOD:
            floods.append(f)
        else:
            drops[{Verdict.SELF: "self", Verdict.FOREIGN: "foreign", Verdict.SHORT: "short"}[Verdict(dst)]] += 1
    return (taken, n, list(groups.items()), floods, *drops.values())


def take(ring, mask, cursor, avail, limit, regions, max_len=MAX_LEN, via=False):
    return native.memif_take(ring, 0, mask, cursor, avail, limit, regions, max_len, OWN, FABRIC_OUI, via)


def take_in_order(*args, **kw):
    """memif_take's answer with its groups as a list: the order destinations first appear in
    counts (it is the order they are sent in)."""
    taken, n, groups, *rest = take(*args, **kw)
    return (taken, n, list(groups.items()), *rest)


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
    got = take_in_order(ring, 63, 0, len(fs), len(fs), [region], via=via)
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
    taken, n, groups, floods, *drops = take(ring, 3, 0, 1, 1, [frame], via=True)
    straight = not routed(frame[:ETH_HLEN], frame[ETH_HLEN:])
    assert straight == (next_header == 58 and 133 <= icmp_type <= 137 and ip6_bytes > 40)
    assert groups == ({1: [frame]} if straight else {native.MEMIF_VIA: [frame]})


def test_arp_goes_straight_and_every_other_ethertype_through_the_chain():
    for et, straight in ((b"\x08\x06", True), (b"\x08\x00", False), (b"\x81\x00", False), (b"\x88\xb5", False)):
        frame = FABRIC_OUI + b"\x00\x04" + OWN + et + bytes(46)
        ring = ring_with([(0, 0, len(frame), 0)], 4)
        groups = take(ring, 3, 0, 1, 1, [frame], via=True)[2]
        assert groups == ({4: [frame]} if straight else {native.MEMIF_VIA: [frame]})
        assert take(ring, 3, 0, 1, 1, [frame], via=False)[2] == {4: [frame]}


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
    assert take_in_order(ring, 15, cursor, avail, limit, regions, max_len, via) == reference_take(
        ring, 15, cursor, avail, limit, regions, max_len, via)


def test_a_chain_is_gathered_into_one_frame_across_the_ring_end():
    frame = (FABRIC_OUI + b"\x00\x03") + OWN + b"\x08\x00" + bytes(range(100))
    region = frame[:30] + b"-" * 10 + frame[30:80] + frame[80:]
    descs = [(w.DESC_NEXT, 0, 30, 0), (w.DESC_NEXT, 0, 50, 40), (0, 0, len(frame) - 80, 90)]
    ring = ring_with(descs, 8, start=6)  # indices 6, 7, 0
    taken, n, groups, floods, *drops = take(ring, 7, 6, 3, 3, [region])
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
    taken, n, groups, floods, bad, *rest = take(ring, 3, 0, 4, 4, [bytes(100)])
    assert (taken, n, groups, bad) == (4, 1, {}, 1)


def test_a_chain_longer_than_the_mtu_is_counted_and_its_parts_never_joined():
    ring = ring_with([(w.DESC_NEXT, 0, 1000, 0), (0, 0, 1000, 0)], 4)
    taken, n, groups, floods, bad, big, *rest = take(ring, 3, 0, 2, 2, [bytes(1000)])
    assert (taken, n, bad, big, groups) == (2, 1, 0, 1, {})


def test_an_offset_past_four_gigabytes_is_outside_the_region_not_wrapped_into_it():
    ring = ring_with([(0, 0, 0x20, 0xFFFFFFF0)], 4)
    taken, n, groups, floods, bad, *rest = take(ring, 3, 0, 1, 1, [bytes(64)])
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
    first = fab.attach("first")  # (id 0: a's flooded frames carry a's index, 1, in their meta)
    a, b = fab.attach("a"), fab.attach("b")
    batches = []

    def make(frames: list[tuple[bytes, int | None]]):
        """Each (payload, meta) sent by a to b; (frame, None) flooded by a."""
        for payload, meta in frames:
            if meta is None:
                a.flood(payload)
            else:
                assert a.send_batch(b.id, [payload], meta=meta) == 1
        batch = b.recv_batch(64, 1.0)
        assert len(batch) == len(frames)
        batches.append(batch)
        return batch

    make.nodes = (a, b)  # type: ignore[attr-defined]
    try:
        yield make
    finally:
        for batch in batches:
            batch.release()
        for n in (a, b, first):
            n.detach()
        fab.close()


def put(*args):
    """memif_put leaving frames with device work in their meta to the caller, as the port does."""
    return native.memif_put(*args, META_DEVICE_WORK)


# a TAP's frame whose UDP checksum is left to the device; and one that is only marked valid
CSUM_META = vnet_to_meta(struct.pack("<BBHHHH", 1, 0, 0, 0, ETH_HLEN + 20, 6))
VALID_META = vnet_to_meta(struct.pack("<BBHHHH", 2, 0, 0, 0, 0, 0))


def whole(f) -> bytes:
    return f.dst + f.src_mac + f.ethertype.to_bytes(2, "big") + f.tobytes()


def test_a_client_writes_each_frame_into_its_fixed_buffer(batch_of):
    b = batch_of([(bytes([k]) * (20 + k), 0) for k in range(5)])
    region = bytearray(4096)
    ring = bytearray(8 * 16)
    nxt, written, cursor = put(b, 0, ring, 0, 7, 0xFFFE, 8, [region], False, 256, 1024)
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
    nxt, written, cursor = put(b, 0, ring, 0, 3, 0, 3, regions, True, 0, 0)
    assert (nxt, written, cursor) == (2, 2, 2)  # the third buffer holds 20 bytes: left to the caller
    assert regions[1][:64] == whole(b[0]) and regions[0][128:192] == whole(b[1])
    assert DESC.unpack_from(ring, 0) == (0, 1, 64, 0, 0) and DESC.unpack_from(ring, 32) == (0, 1, 20, 300, 0)


@pytest.mark.parametrize("desc", [(0, 2, 100, 0), (0, 0, 100, 200), (0, 0, 0, 0), (0, 0, 0x100, 0xFFFFFF80)],
                         ids=["no-such-region", "past-the-region", "empty", "offset-wraps"])
def test_a_server_never_writes_a_buffer_outside_the_clients_memory(batch_of, desc):
    b = batch_of([(b"z" * 40, 0)])
    regions = [bytearray(256)]
    ring = ring_with([desc], 4)
    assert put(b, 0, ring, 0, 3, 0, 1, regions, True, 0, 0) == (0, 0, 0)
    assert regions[0] == bytearray(256)


def test_frames_with_offloads_to_do_and_past_the_room_are_left_to_the_caller(batch_of):
    b = batch_of([(b"1" * 30, 0), (b"2" * 30, CSUM_META), (b"3" * 30, VALID_META), (b"4" * 30, 0)])
    region = bytearray(4096)
    ring = bytearray(8 * 16)
    assert put(b, 0, ring, 0, 7, 0, 8, [region], False, 256, 0) == (1, 1, 1)
    assert put(b, 2, ring, 0, 7, 1, 1, [region], False, 256, 0) == (3, 1, 2)
    b.release()
    with pytest.raises(native.ReleasedError):
        put(b, 3, ring, 0, 7, 2, 1, [region], False, 256, 0)


def test_a_client_frame_larger_than_its_buffer_is_left_to_the_caller(batch_of):
    b = batch_of([(b"L" * 300, 0)])
    ring = bytearray(4 * 16)
    assert put(b, 0, ring, 0, 3, 0, 4, [bytearray(4096)], False, 256, 0) == (0, 0, 0)


def test_the_descriptor_layout_is_the_wire_modules():
    # the core reads descriptors as flags u16, region u16, length u32, offset u32 (host order)
    assert DESC.format in ("<HHIII",) and DESC.size == 16 and struct.calcsize("=HHIII") == 16


def test_a_flooded_frame_is_written_by_the_core_and_a_forwarded_frame_is_left(batch_of):
    """A flooded frame's meta holds its sender's index (no virtio-net header): written as it is.
    A frame forwarded elsewhere is not this batch's any more: left to the caller, which says so."""
    sender, receiver = batch_of.nodes
    flood = b"\xff" * 6 + sender.mac + b"\x08\x06" + b"F" * 28
    b = batch_of([(b"1" * 30, 0), (b"2" * 30, 0), (flood, None)])  # (the rings are read before the tape)
    assert [f.meta for f in b] == [0, 0, sender.id] and sender.id != 0
    assert receiver.forward(sender.id, b[1])
    region = bytearray(4096)
    ring = bytearray(8 * 16)
    assert put(b, 0, ring, 0, 7, 0, 8, [region], False, 256, 0) == (1, 1, 1)
    assert region[:44] == whole(b[0])
    with pytest.raises(native.ReleasedError, match="forwarded"):
        b[1].meta  # (what the caller's path meets)
    assert put(b, 2, ring, 0, 7, 1, 8, [region], False, 256, 0) == (3, 1, 2)
    assert region[256:256 + len(flood)] == flood == whole(b[2])
    with sender.recv_batch(8, 1.0) as back:
        assert len(back) == 1


def test_a_server_ring_wraps_at_its_end_and_at_the_sixteen_bit_index(batch_of):
    b = batch_of([(bytes([k]) * 40, 0) for k in range(3)])
    regions = [bytearray(1024)]
    ring = ring_with([(0, 0, 128, 0), (0, 0, 128, 128), (0, 0, 128, 256), (0, 0, 128, 384)], 4)
    assert put(b, 0, ring, 0, 3, 0xFFFE, 3, regions, True, 0, 0) == (3, 3, 1)
    # 0xFFFE -> slot 2, 0xFFFF -> slot 3, 0 -> slot 0
    assert [DESC.unpack_from(ring, s * 16)[2:4] for s in (2, 3, 0)] == [(54, 256), (54, 384), (54, 0)]
    assert regions[0][256:310] == whole(b[0]) and regions[0][:54] == whole(b[2])


@pytest.mark.parametrize("region_size, buffers", [(800, 0), (4096, 1 << 32)], ids=["region-too-small", "past-4-GiB"])
def test_a_client_never_writes_past_its_own_region(batch_of, region_size, buffers):
    b = batch_of([(b"c" * 100, 0)] * 6)
    memory = bytearray(region_size + 256)  # the region, then bytes past it that must stay as they are
    ring = bytearray(8 * 16)
    with memoryview(memory) as v, v[:region_size] as region:
        nxt, written, cursor = put(b, 0, ring, 0, 7, 0, 8, [region], False, 256, buffers)
    assert nxt == written == cursor == (3 if buffers == 0 else 0)  # buffers 0-2 end by 626; 3 (768 + 114) not
    assert memory[region_size:] == bytes(256)


@pytest.mark.parametrize("bad, match", [
    (dict(own=b"12345"), "own_mac"),
    (dict(regions=[bytearray(16)] * 257), "at most 256"),
    (dict(regions=[object()]), "bytes-like"),
    (dict(cursor=0x10000), "between 0 and 65535"),
    (dict(cursor=-1), "between 0 and 65535"),
    (dict(mask=2**32 + 3), "between 0 and 65535"),
    (dict(regions=5), "sequence of buffers"),
])
def test_bad_arguments_to_memif_take_are_refused_clearly(bad, match):
    args = dict(ring=bytes(64), mask=3, cursor=0, regions=[bytes(64)], own=OWN)
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        native.memif_take(args["ring"], 0, args["mask"], args["cursor"], 1, 1, args["regions"], MAX_LEN, args["own"],
                          FABRIC_OUI, False)


def test_memif_put_needs_writable_memory(batch_of):
    b = batch_of([(b"x" * 20, 0)])
    with pytest.raises(BufferError, match="not writable"):
        put(b, 0, bytearray(64), 0, 3, 0, 1, [bytes(4096)], False, 256, 0)
    with pytest.raises(TypeError, match="read-write"):
        put(b, 0, bytes(64), 0, 3, 0, 1, [bytearray(4096)], False, 256, 0)


def test_a_peer_rewriting_its_memory_while_frames_are_taken_never_misroutes_or_crashes():
    """A forked 'peer' rewrites descriptors (offsets and lengths up to 2^32) and frame headers as
    fast as it can while memif_take runs for a second: every frame taken is in the group its own
    bytes say, and nothing is read outside the regions (a wrong read would crash the test)."""
    size = 256
    writes_at = size * 16 + 65536  # (where the peer counts its rounds of writes)
    mm = mmap.mmap(-1, writes_at + 8)  # shared and anonymous: the child writes, we read
    region = memoryview(mm)[size * 16:writes_at]
    pid = os.fork()
    if pid == 0:  # the peer
        try:
            rng = random.Random(1)
            macs = [OWN, FABRIC_OUI + b"\0\1", b"\xff" * 6, b"\2\0\0\0\0\1", FABRIC_OUI + b"\1\2"]
            ets = [b"\x08\x06", b"\x08\x00", b"\x86\xdd"]
            end = time.monotonic() + 1.2
            while time.monotonic() < end:
                for _ in range(200):
                    DESC.pack_into(mm, rng.randrange(size) * 16, rng.choice([0, 0, w.DESC_NEXT]),
                                   rng.choice([0, 0, 0, 1]), rng.choice([14, 60, 100, 1500, 0xFFFFFFFF, 70000]),
                                   rng.choice([0, 4096, 65536 - 50, 0xFFFFFFF0, 60000]), 0)
                    o = size * 16 + rng.choice([0, 4096, 65536 - 50, 60000])
                    mm[o:o + 14] = rng.choice(macs) + OWN + rng.choice(ets)
                struct.pack_into("<Q", mm, writes_at, struct.unpack_from("<Q", mm, writes_at)[0] + 1)
        finally:
            os._exit(0)
    try:
        calls = frames = 0
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            taken, n, groups, floods, *drops = native.memif_take(mm, 0, size - 1, calls & 0xFFFF, size, size, [region],
                                                                 MAX_LEN, OWN, FABRIC_OUI, True)
            for key, fs in groups.items():
                for f in fs:
                    assert len(f) <= MAX_LEN
                    if key == native.MEMIF_VIA:
                        assert classify(f, OWN) >= 0 and routed(f[:ETH_HLEN], f[ETH_HLEN:]), f[:ETH_HLEN]
                    else:
                        assert classify(f, OWN) == key and not routed(f[:ETH_HLEN], f[ETH_HLEN:]), f[:ETH_HLEN]
            assert all(f[0] & 1 for f in floods)
            frames += n
            calls += 1
        assert frames > 0
        assert struct.unpack_from("<Q", mm, writes_at)[0] > 0, "the peer never wrote while frames were taken"
    finally:
        try:
            os.kill(pid, signal.SIGKILL)  # (it ends by itself; this bounds a child that hangs)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
        region.release()
        mm.close()


# -- the port around the core: pump_device and pump_fabric on connections built in memory -------

def fake_connection(server: bool, log2: int, mem: bytearray, buffer_size: int = 256) -> memif._Connection:
    """A connected peer's memory without a peer: one region, the same ring both ways (rx and tx),
    at offset 0 (server) or where a client's plan puts its first ring."""
    mm = mmap.mmap(-1, len(mem))
    mm[:] = mem
    region = object.__new__(memif._Region)
    region.mm, region.view, region.size = mm, memoryview(mm), len(mem)
    plan = None if server else w.ClientPlan(log2, buffer_size)
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    ring = memif._Ring(region, 0 if server else plan.s2m_offset, log2, efd)
    w.RING_START.pack_into(mm, ring.flags - 4, w.COOKIE, w.RING_MASK_INT)  # (the peer polls: no signal)
    conn = object.__new__(memif._Connection)
    conn.tx = conn.rx = ring
    conn.server, conn.plan, conn.views, conn.sizes = server, plan, [region.view], [len(mem)]
    conn.regions, conn.fds = [region], [efd]
    if plan is not None:
        conn._tx_offsets = [plan.buffer_offset(True, s) for s in range(ring.size)]
    return conn


@pytest.fixture
def port_rig():
    """A fabric with nodes mem (the port), a, c and fw, and a function making a MemifBridge on mem
    whose connection is `conn` (no socket: pump_device / pump_fabric are called directly)."""
    fab = Fabric.create(f"memifpump{uuid.uuid4().hex[:8]}", ephemeral=True, networks=[{"mtu": 1500, "slots": 512}])
    nodes = {n: fab.attach(n) for n in ("mem", "a", "c", "fw")}
    made: list[memif.MemifBridge] = []

    def make(conn, **kw) -> memif.MemifBridge:
        br = memif.MemifBridge(nodes["mem"], memif.MemifConfig(socket_path="/nonexistent/m.sock"), **kw)
        br._conn = conn
        made.append(br)
        return br

    make.nodes, make.fab = nodes, fab  # type: ignore[attr-defined]
    try:
        yield make
    finally:
        for br in made:
            if br._conn is not None:
                br._conn.regions[0].close()
                os.close(br._conn.fds[0])
        for n in nodes.values():
            n.detach()
        fab.close()


def received(node) -> list[bytes]:
    with node.recv_batch(64, 0) as b:
        return [whole(f) for f in b]


@pytest.mark.parametrize("in_flight", [64, 1])
@pytest.mark.parametrize("arp_first", [True, False], ids=["arp-first", "ipv4-first"])
def test_frames_for_the_via_node_keep_the_peers_order_and_its_share(port_rig, in_flight, arp_first):
    """ARP to the chain's first function and IPv4 to another node (through that function): the
    function's ring gets them in the peer's order, and with room for one frame the first is kept."""
    nodes = port_rig.nodes
    fw, c = nodes["fw"], nodes["c"]
    arp = fw.mac + OWN + b"\x08\x06" + b"A" * 28
    ip4 = c.mac + OWN + b"\x08\x00" + b"I" * 40
    sent = [arp, ip4] if arp_first else [ip4, arp]
    mem = bytearray(128 + 8 * 16 + 512)
    at = 128 + 8 * 16
    for k, f in enumerate(sent):
        mem[at:at + len(f)] = f
        DESC.pack_into(mem, 128 + k * 16, 0, 0, len(f), at, 0)
        at += len(f)
    conn = fake_connection(True, 3, mem)
    native.store_u16_release(conn.rx.mm, conn.rx.head, 2)
    br = port_rig(conn, in_flight=in_flight, via=lambda: port_rig.fab.node_ref("fw"))
    assert br.pump_device() == 2
    assert received(fw) == (sent if in_flight > 1 else sent[:1])
    assert received(c) == []
    assert br.from_device.get("drop_ring_full", 0) == (0 if in_flight > 1 else 1)


def test_the_core_and_the_python_path_take_turns_in_one_batch_in_order(port_rig):
    """Frames the core writes, one whose checksum the port completes (a TAP's frame), a frame
    larger than a buffer (chained by Python): all reach the client's ring in order."""
    nodes = port_rig.nodes
    a, mem_node = nodes["a"], nodes["mem"]
    plan = w.ClientPlan(3, 256)
    conn = fake_connection(False, 3, bytearray(plan.region_size))
    br = port_rig(conn)
    udp = bytearray(20 + 8 + 12)  # IPv4 + UDP, checksum left to the device
    udp[0], udp[9] = 0x45, 17
    cs_meta = vnet_to_meta(struct.pack("<BBHHHH", 1, 0, 0, 0, ETH_HLEN + 20, 6))
    payloads = [(b"1" * 40, 0), (bytes(udp), cs_meta), (b"3" * 400, 0), (b"4" * 40, 0)]
    for p, meta in payloads:
        assert a.send_batch(mem_node.id, [p], meta=meta) == 1
    assert br.pump_fabric(1.0) == 4
    assert +br.from_fabric == {"to_device": 4}
    out, cursor = [], 0
    while cursor < conn.tx.cursor:
        parts = b""
        while True:
            flags, region, length, offset, _ = DESC.unpack_from(conn.tx.mm, conn.tx.desc + (cursor & 7) * 16)
            parts += conn.tx.mm[offset:offset + length]
            cursor += 1
            if not flags & w.DESC_NEXT:
                break
        out.append(parts)
    assert [f[ETH_HLEN:] for f in out[:1] + out[2:]] == [b"1" * 40, b"3" * 400, b"4" * 40]
    assert out[1][ETH_HLEN:ETH_HLEN + 26] == bytes(udp)[:26] and out[1][ETH_HLEN + 26:ETH_HLEN + 28] != b"\0\0"
    assert native.load_u16_acquire(conn.tx.mm, conn.tx.head) == cursor == 5  # published, 400 bytes in two


def test_a_bad_buffer_after_frames_the_core_wrote_drops_the_whole_batch_unpublished(port_rig):
    """A server fills the client's buffers: two good ones, then one outside the client's memory.
    The peer is dropped (a fault), nothing is published, and every frame of the batch is counted
    as dropped with the link (the two written included)."""
    nodes = port_rig.nodes
    a, mem_node = nodes["a"], nodes["mem"]
    mem = bytearray(128 + 8 * 16 + 1024)
    for s, off in enumerate((256, 512, 1 << 20, 768)):
        DESC.pack_into(mem, 128 + s * 16, 0, 0, 200, off, 0)
    conn = fake_connection(True, 3, mem)
    native.store_u16_release(conn.tx.mm, conn.tx.head, 4)  # the client gave 4 buffers
    br = port_rig(conn)
    assert a.send_batch(mem_node.id, [b"f" * 60] * 4) == 4
    assert br.pump_fabric(1.0) == 4
    assert br._fault is not None and "outside region" in br._fault
    assert +br.from_fabric == {"drop_link_down": 4}
    assert native.load_u16_acquire(conn.tx.mm, conn.tx.tail) == 0
