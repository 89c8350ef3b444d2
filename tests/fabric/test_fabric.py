"""Fabric API tests within one process (several nodes of one fabric): rings, pools, tapes,
forwarding, misuse errors, wake-up handles and counters. Cross-process behaviour is in
test_processes.py."""
from __future__ import annotations

import asyncio
import ctypes
import random
import selectors
import threading

import pytest

from shmfabric.core.region import mcast_group_mac
from shmfabric.fabric import (
    AttachError,
    FabricError,
    FrameTooLargeError,
    ReleasedFrameError,
    UnknownDestinationError,
)
from shmfabric.fabric import control

from ._workers import check_payload, make_payload
from .conftest import alloc_all, assert_conserved

pytestmark = pytest.mark.timeout(20)


def drain(node, max_frames: int = 4096) -> list[bytes]:
    """Every frame waiting for `node`, as copies (control frames are consumed by the Node)."""
    got = []
    while True:
        with node.recv_batch(max_frames, timeout=0) as b:
            # a hello read here may make the node answer: read until not even control is left
            if not len(b) and b.control is None:
                return got
            got.extend(f.tobytes() for f in b)


def address_of(frame) -> int:
    """Address of a frame's payload in this process (to prove two views share the same bytes)."""
    with frame.payload as mv:
        return ctypes.addressof(ctypes.c_char.from_buffer(mv))


# -- rings ------------------------------------------------------------------------------------------

def test_ring_wraparound_keeps_order_and_content(harness):
    fab = harness.create(ring_size=8, networks=[{"mtu": 1500, "slots": 256}], max_nodes=4)
    a, b = fab.attach("a"), fab.attach("b")
    drain(a), drain(b)
    rng = random.Random(1)
    total = 5000  # 625 times round an 8-entry ring
    sent = recvd = 0
    while recvd < total:
        if sent < total:
            k = rng.randint(1, 12)
            batch = [make_payload(a.id, b.id, s, rng.randint(12, 300)) for s in range(sent, min(total, sent + k))]
            n = a.send_batch(b.id, batch)
            assert 0 <= n <= min(len(batch), 8)
            sent += n
        with b.recv_batch(rng.randint(1, 10), timeout=0) as bt:
            for f in bt:
                src, dst, seq = check_payload(f.payload)
                assert (src, dst, seq) == (a.id, b.id, recvd)
                assert f.src == a.id and f.dst == b.mac and f.src_mac == a.mac
                recvd += 1
    st = fab.ring_stats(a.id, b.id)
    assert st["enqueued"] == st["dequeued"] == total and st["depth"] == 0
    assert a.stats()["tx_frames"] == total and b.stats()["rx_frames"] == total
    a.detach(), b.detach()
    a2 = assert_conserved(fab)
    assert a2["free"] == a2["total"]


def test_full_ring_reports_count_and_loses_nothing(harness):
    fab = harness.create(ring_size=16, networks=[{"mtu": 1500, "slots": 256}], max_nodes=4)
    a, b = fab.attach("a"), fab.attach("b")
    payloads = [make_payload(a.id, b.id, s, 100) for s in range(40)]
    assert a.send_batch(b.id, payloads) == 16
    st = a.stats()
    assert st["tx_ring_full"] == 24 and st["tx_frames"] == 16
    assert fab.ring_stats(a.id, b.id)["full_events"] == 1
    assert fab.ring_stats(a.id, b.id)["depth"] == 16
    assert a.send(b.id, payloads[16]) is False
    assert a.stats()["tx_ring_full"] == 25
    buf = a.alloc()
    assert a.send_buffer(b.id, buf, 10) is False  # full: the buffer stays ours
    with memoryview(buf) as mv:
        mv[:3] = b"abc"
    got = drain(b)
    assert got == payloads[:16]
    assert a.send_batch(b.id, payloads[16:32]) == 16
    got += drain(b)
    assert a.send_batch(b.id, payloads[32:]) == 8
    got += drain(b)
    assert got == payloads
    assert a.send_buffer(b.id, buf, 3) is True
    assert drain(b) == [b"abc"]
    assert fab.ring_stats(a.id, b.id)["full_events"] == 3
    assert_conserved(fab)


def test_pool_exhaustion_is_reported_not_hidden(harness):
    fab = harness.create(ring_size=1024, networks=[{"mtu": 1500, "slots": 128}], max_nodes=4)
    a, b = fab.attach("a"), fab.attach("b")
    n = a.send_batch(b.id, [b"x" * 20] * 300)
    assert n == 128
    assert a.stats()["tx_nobuf"] == 300 - 128
    # the ring had room: running out of slots is not a ring-full event
    assert a.stats()["tx_ring_full"] == 0 and fab.ring_stats(a.id, b.id)["full_events"] == 0
    with pytest.raises(MemoryError, match="pool exhausted"):
        a.alloc()
    assert fab.pool_audit()["held"] == {b.id: 128}
    with b.recv_batch(1024, timeout=0) as bt:
        assert len(bt) == 128
    a.alloc()  # slots came back
    assert_conserved(fab)


def test_send_to_self_and_meta_and_ethertype(fab):
    a = fab.attach("a")
    drain(a)
    assert a.send(a.id, b"hello", ethertype=0x0800, meta=0xDEADBEEF)
    with a.recv_batch(timeout=1.0) as bt:
        (f,) = list(bt)
        assert f.tobytes() == b"hello" and f.ethertype == 0x0800 and f.meta == 0xDEADBEEF
        assert f.src == a.id and not f.copied and not f.control
        assert len(f) == 5 and f[0] == ord("h") and f[-1] == ord("o")
        with pytest.raises(IndexError):
            f[5]


def test_raw_frames_carry_their_own_header(fab):
    a, b = fab.attach("a"), fab.attach("b")
    hdr = b.mac + a.mac + (0x86DD).to_bytes(2, "big")
    assert a.send_batch(b.id, [hdr + b"payload"], raw=True) == 1
    with b.recv_batch(timeout=1.0) as bt:
        f = bt[0]
        assert f.ethertype == 0x86DD and f.tobytes() == b"payload" and f.raw == hdr + b"payload"
    with pytest.raises(FrameTooLargeError, match="shorter than the 14-byte header"):
        a.send_batch(b.id, [b"short"], raw=True)


def test_batch_of_other_buffer_types(fab):
    a, b = fab.attach("a"), fab.attach("b")
    items = [b"bytes", bytearray(b"bytearray"), memoryview(b"--memoryview--")[2:-2]]
    assert a.send_batch(b.id, items) == 3
    assert drain(b) == [b"bytes", b"bytearray", b"memoryview"]
    assert a.send_batch(b.id, []) == 0
    assert a.send_batch(b.id, (b"g%d" % i for i in range(3))) == 3  # any iterable
    assert drain(b) == [b"g0", b"g1", b"g2"]
    with pytest.raises(TypeError):
        a.send_batch(b.id, [b"ok", 12345])
    # the frame before the bad item went out; the bad one and after did not
    assert drain(b) == [b"ok"]
    assert_conserved(fab)


# -- zero copy ---------------------------------------------------------------------------------------

def test_zero_copy_send_buffer(fab):
    a, b = fab.attach("a"), fab.attach("b")
    buf = a.alloc()
    assert buf.capacity == 1500
    with memoryview(buf) as mv:
        assert len(mv) == 1500
        mv[:11] = b"zero copies"
        with pytest.raises(BufferError, match="release the buffer's memoryviews"):
            a.send_buffer(b.id, buf, 11)
        src_addr = ctypes.addressof(ctypes.c_char.from_buffer(mv))
    assert a.send_buffer(b.id, buf, 11, ethertype=0x1234, meta=7)
    with b.recv_batch(timeout=1) as bt:
        f = bt[0]
        assert f.tobytes() == b"zero copies" and f.ethertype == 0x1234 and f.meta == 7
        assert address_of(f) == src_addr  # the receiver reads the very slot the sender wrote
    with pytest.raises(ReleasedFrameError, match="already sent"):
        a.send_buffer(b.id, buf, 11)
    with pytest.raises(ReleasedFrameError):
        memoryview(buf)
    with pytest.raises(FrameTooLargeError, match="MTU"):
        a.send_buffer(b.id, a.alloc(), 1501)
    assert_conserved(fab)


def test_forward_a_b_c_is_zero_copy(fab):
    a, b, c = fab.attach("a"), fab.attach("b"), fab.attach("c")
    drain(b), drain(c)
    payloads = [make_payload(a.id, c.id, s, 64 + s) for s in range(20)]
    assert a.send_batch(b.id, payloads, meta=42) == 20
    used_before = fab.pool_audit()
    bt = b.recv_batch(64, timeout=1)
    assert len(bt) == 20
    frames = list(bt)
    addrs = [address_of(f) for f in frames]
    # forward the first one alone, the rest as a batch (already forwarded frames are skipped)
    assert b.forward(c.id, frames[0]) is True
    with pytest.raises(ReleasedFrameError, match="already forwarded"):
        b.forward(c.id, frames[0])
    assert b.forward_batch(c.id, bt) == 19
    for f in frames:
        with pytest.raises(ReleasedFrameError, match="forwarded"):
            f.tobytes()
        with pytest.raises(ReleasedFrameError):
            len(f)
        with pytest.raises(ReleasedFrameError):
            f.payload
    bt.release()
    with c.recv_batch(64, timeout=1) as out:
        assert [f.tobytes() for f in out] == payloads
        assert [address_of(f) for f in out] == addrs  # same slots: nothing was copied
        assert all(f.src == b.id and f.dst == c.mac and f.meta == 42 for f in out)
    # forwarding consumed no extra slot
    after = fab.pool_audit()
    assert after["free"] == used_before["free"]
    assert_conserved(fab)


def test_forward_a_broadcast_frame_copies_it_into_a_slot(fab):
    a, b, c = fab.attach("a"), fab.attach("b"), fab.attach("c")
    drain(b), drain(c)
    a.broadcast(b"to everyone")
    with b.recv_batch(timeout=1) as bt:
        f = bt[0]
        assert f.copied and f.dst == b"\xff" * 6 and f.src == a.id
        assert b.forward(c.id, f)
    with c.recv_batch(16, timeout=1) as bt:
        got = sorted((f.src, f.copied, f.tobytes()) for f in bt)
    # c read the broadcast itself from the tape, and got b's forwarded copy through b's ring
    assert got == sorted([(a.id, True, b"to everyone"), (b.id, False, b"to everyone")])


# -- misuse ------------------------------------------------------------------------------------------

def test_released_frame_raises(fab):
    a, b = fab.attach("a"), fab.attach("b")
    a.send(b.id, b"abc")
    bt = b.recv_batch(timeout=1)
    f = bt[0]
    mv = f.payload
    with pytest.raises(BufferError, match="memoryviews"):
        bt.release()
    mv.release()
    bt.release()
    assert bt.released
    for op in (lambda: len(f), lambda: f[0], lambda: f.payload, lambda: f.tobytes(), lambda: f.src,
               lambda: f.ethertype, lambda: memoryview(f), lambda: bt[0]):
        with pytest.raises(ReleasedFrameError, match="released"):
            op()
    with pytest.raises(ReleasedFrameError):
        b.forward(a.id, f)
    assert "released" in repr(f)
    bt.release()  # twice is harmless
    assert_conserved(fab)


def test_a_send_naming_an_incarnation_refuses_another_node_that_took_its_id(fab):
    # Ids are reused: after "ids" and "sink" restart in the other order, "sink" has the id
    # "ids" had. A send that names the incarnation it resolved must not hand frames meant for
    # "ids" to it (a chain would skip its IDS); a send without one still goes by id, and
    # naming the incarnation is per send, so other sends to that id are not affected.
    a, ids, sink = fab.attach("a"), fab.attach("ids"), fab.attach("sink")
    ref = fab.node_ref("ids")
    assert ref == (ids.id, fab.region.node_entry(ids.id)["gen"])
    assert a.send_batch(ids.id, [b"for ids"], incarnation=ref[1]) == 1
    old_ids, old_sink = ids.id, sink.id
    ids.detach(), sink.detach()
    sink2 = fab.attach("sink")  # takes the lowest free id: the one "ids" had
    ids2 = fab.attach("ids")
    assert sink2.id == old_ids and ids2.id == old_sink
    with pytest.raises(UnknownDestinationError, match="another incarnation"):
        a.send_batch(old_ids, [b"for ids, meant"], incarnation=ref[1])
    drain(a)
    with a.recv_batch(1, timeout=0):
        pass
    assert drain(sink2) == []
    new_ref = fab.node_ref("ids")  # resolved again by name: the new incarnation
    assert a.send_batch(new_ref[0], [b"for ids"], incarnation=new_ref[1]) == 1
    assert [f[-7:] for f in drain(ids2)] == [b"for ids"]
    assert a.send(old_ids, b"x") is True  # by id alone: whoever holds it
    a.detach(), sink2.detach(), ids2.detach()
    assert_conserved(fab)


def test_unknown_destination(fab):
    a, b = fab.attach("a"), fab.attach("b")
    for dst in (99, -1, 5):  # out of range, negative, a free entry
        with pytest.raises(UnknownDestinationError, match="destination|unknown"):
            a.send(dst, b"x")
        with pytest.raises(UnknownDestinationError):
            a.send_batch(dst, [b"x"])
        with pytest.raises(UnknownDestinationError):
            a.send_buffer(dst, a.alloc(), 1)
    bid = b.id
    b.detach()
    with pytest.raises(UnknownDestinationError, match="not attached"):
        a.send(bid, b"x")
    assert a.stats()["tx_drops"] >= 2
    with pytest.raises(UnknownDestinationError, match="multicast group 9"):
        a.multicast(9, b"x")
    with pytest.raises(UnknownDestinationError):
        a.join(-1)


def test_oversized_frame(fab):
    a, b = fab.attach("a"), fab.attach("b")
    with pytest.raises(FrameTooLargeError, match="1501 bytes, larger than the network MTU 1500"):
        a.send(b.id, b"x" * 1501)
    assert issubclass(FrameTooLargeError, ValueError)
    # frames before the oversized one in a batch are sent; it and later ones are not
    with pytest.raises(FrameTooLargeError, match="frame 1"):
        a.send_batch(b.id, [b"ok", b"x" * 2000, b"never"])
    assert drain(b) == [b"ok"]
    assert a.stats()["tx_ring_full"] == 0  # refused for its size, not for lack of ring space
    assert a.send(b.id, b"x" * 1500)  # exactly the MTU fits
    assert drain(b) == [b"x" * 1500]
    with pytest.raises(ValueError, match="tape entry size"):
        a.broadcast(b"x" * 5000)
    assert_conserved(fab)


def test_attach_errors(harness):
    fab = harness.create(max_nodes=3, networks=[{"mtu": 1500, "slots": 64}])
    a = fab.attach("a")
    with pytest.raises(AttachError, match="already attached"):
        fab.attach("a")
    with pytest.raises(AttachError, match="network 3 does not exist"):
        fab.attach("z", network=3)
    with pytest.raises(AttachError, match="1..31 bytes"):
        fab.attach("n" * 40)
    fab.attach("b"), fab.attach("c")
    with pytest.raises(AttachError, match="is full \\(3 nodes\\)"):
        fab.attach("d")
    a.detach()
    d = fab.attach("a")  # the name and the entry are free again
    assert d.id == 0
    assert isinstance(AttachError("x"), FabricError)


def test_detached_node_refuses_work(fab):
    a, b = fab.attach("a"), fab.attach("b")
    a.detach()
    with pytest.raises(FabricError, match="detached"):
        a.send(b.id, b"x")
    with pytest.raises(FabricError, match="detached"):
        a.recv_batch(timeout=0)
    a.detach()  # idempotent
    assert fab.node_id("a") is None and fab.node_id("b") == b.id


# -- broadcast and multicast -----------------------------------------------------------------------

def test_broadcast_reaches_everyone_but_the_sender(fab):
    a, b, c = fab.attach("a"), fab.attach("b"), fab.attach("c")
    for n in (a, b, c):
        drain(n)
    a.broadcast(b"hi all", ethertype=0x0806)
    assert drain(a) == []
    for n in (b, c):
        with n.recv_batch(timeout=1) as bt:
            (f,) = list(bt)
            assert f.tobytes() == b"hi all" and f.ethertype == 0x0806 and f.src == a.id and f.copied
    assert a.stats()["tape_tx"] >= 1 and b.stats()["tape_rx"] == 1


def test_lapped_reader_resumes_at_oldest_valid_entry(harness):
    fab = harness.create(tape_entries=64, tape_entry_size=256, networks=[{"mtu": 1500, "slots": 64}])
    w, r = fab.attach("w"), fab.attach("r")
    drain(w), drain(r)
    n = 1000
    for s in range(n):
        w.broadcast(make_payload(w.id, 0xFFFF, s, 12 + s % 200))
    got = drain(r)
    seqs = [check_payload(p)[2] for p in got]
    # the tape holds the last 64 entries; everything before was overwritten and is counted
    assert seqs == list(range(n - 64, n))
    assert r.stats()["rx_lapped"] == n - 64
    assert r.stats()["tape_rx"] == 64
    # after catching up the reader is not lapped again
    w.broadcast(make_payload(w.id, 0xFFFF, n, 40))
    assert [check_payload(p)[2] for p in drain(r)] == [n]
    assert r.stats()["rx_lapped"] == n - 64


def test_multicast_join_and_leave(fab):
    a, b, c = fab.attach("a"), fab.attach("b"), fab.attach("c")
    for n in (a, b, c):
        drain(n)
    b.join(1)
    c.join(2)
    a.multicast(1, b"g1")
    a.multicast(2, b"g2")
    a.multicast(3, b"g3 nobody")
    with b.recv_batch(timeout=1) as bt:
        assert [(f.tobytes(), f.dst) for f in bt] == [(b"g1", mcast_group_mac(1))]
    with c.recv_batch(timeout=1) as bt:
        assert [(f.tobytes(), f.dst) for f in bt] == [(b"g2", mcast_group_mac(2))]
    assert drain(a) == []
    b.leave(1)
    a.multicast(1, b"after leave")
    assert drain(b) == []
    b.join(1)  # a new member starts at "now": nothing sent while it was away
    assert drain(b) == []
    a.multicast(1, b"rejoined")
    assert drain(b) == [b"rejoined"]
    b.join(2)  # a node can be in several groups
    a.multicast(2, b"both")
    assert drain(b) == [b"both"] and drain(c) == [b"both"]


def test_hello_discovery(fab):
    a = fab.attach("alpha")
    b = fab.attach("beta")
    drain(a), drain(b)  # a sees beta's hello, answers; beta sees the answer
    assert a._peers.get("beta") == b.id
    assert b._peers.get("alpha") == a.id
    assert a.peers() == {"beta": b.id} and a.wait_for_peer("beta", timeout=1) == b.id
    with pytest.raises(TimeoutError, match="gamma"):
        a.wait_for_peer("gamma", timeout=0.1)
    b.detach()
    drain(a)
    assert "beta" not in a._peers and a.peers() == {}


def test_control_frames_encode_decode():
    raw = control.encode(control.HELLO, 5, 3, "node-x")
    h = control.decode(raw)
    assert (h.kind, h.node, h.gen, h.name) == (control.HELLO, 5, 3, "node-x")
    assert control.is_control_address(raw[:6])
    assert not control.is_control_address(b"\xff" * 6)
    assert control.decode(b"\xff" * 6 + raw[6:]) is None  # not to the control address
    assert control.decode(raw[:20]) is None  # truncated
    assert control.decode(raw[:14] + b"XXXX" + raw[18:]) is None  # unknown kind


# -- wake-ups ---------------------------------------------------------------------------------------

def test_fileno_with_selectors(fab):
    a, b = fab.attach("a"), fab.attach("b")
    drain(b)
    sel = selectors.DefaultSelector()
    sel.register(b.fileno(), selectors.EVENT_READ)
    assert b.fileno() == b.fileno()
    try:
        assert sel.select(0.2) == []
        a.send(b.id, b"wake")
        assert len(sel.select(5)) == 1
        assert len(sel.select(0)) == 1  # stays readable until the frames are taken
        assert drain(b) == [b"wake"]
        assert sel.select(0.2) == []  # recv_batch cleared it
        a.broadcast(b"tape wake")
        assert len(sel.select(5)) == 1
        assert drain(b) == [b"tape wake"]
    finally:
        sel.close()


def test_fileno_with_asyncio(fab):
    a, b = fab.attach("a"), fab.attach("b")
    drain(b)

    async def main() -> list[bytes]:
        loop = asyncio.get_running_loop()
        got: list[bytes] = []
        done = asyncio.Event()

        def readable() -> None:
            with b.recv_batch(64, timeout=0) as bt:
                got.extend(f.tobytes() for f in bt)
            if len(got) >= 3:
                done.set()

        loop.add_reader(b.fileno(), readable)
        try:
            for i in range(3):
                loop.call_later(0.02 * (i + 1), a.send, b.id, b"m%d" % i)
            await asyncio.wait_for(done.wait(), 5)
        finally:
            loop.remove_reader(b.fileno())
        return got

    assert asyncio.run(main()) == [b"m0", b"m1", b"m2"]


def test_blocked_receiver_woken_by_thread_send(fab):
    a, b = fab.attach("a"), fab.attach("b")
    drain(b)
    b.set_wait_mode("block")
    threading.Timer(0.1, a.send, (b.id, b"late")).start()
    got = b.recv(timeout=5)
    assert got == (a.id, 0x88B5, b"late")
    assert b.stats()["wakeups"] >= 1
    assert b.wait(0.05) is False
    with pytest.raises(ValueError, match="wait mode 'spin'"):
        b.set_wait_mode("spin")


# -- counters -----------------------------------------------------------------------------------------

def test_stats_counters(fab):
    a, b = fab.attach("a"), fab.attach("b")
    drain(a), drain(b)
    base_a, base_b = a.stats(), b.stats()
    assert a.send_batch(b.id, [b"x" * 100] * 10) == 10
    with b.recv_batch(5, timeout=0) as bt:
        assert len(bt) == 5 and bt.payload_bytes == 500
    sa, sb = a.stats(), b.stats()
    assert sa["tx_frames"] - base_a["tx_frames"] == 10 and sa["tx_bytes"] - base_a["tx_bytes"] == 1000
    assert sb["rx_frames"] - base_b["rx_frames"] == 5
    assert sb["rx_bytes"] - base_b["rx_bytes"] == 500  # payload bytes, like tx_bytes
    rs = fab.ring_stats(a.id, b.id)
    assert (rs["enqueued"], rs["dequeued"], rs["depth"], rs["down"]) == (10, 5, 5, False)
    nodes = {n["name"]: n for n in fab.nodes()}
    assert nodes["a"]["tx_frames"] == sa["tx_frames"] and nodes["a"]["alive"] and nodes["a"]["state"] == "up"
    info = fab.inspect()
    assert info["rings"] == [dict(rs)]
    assert info["networks"][0]["held"] + info["networks"][0]["free"] == info["networks"][0]["slots"]
    assert set(sa) >= {"tx_frames", "tx_bytes", "rx_frames", "rx_bytes", "tx_ring_full", "tx_drops", "tx_nobuf",
                       "rx_lapped", "tape_rx", "tape_tx", "wakeups", "cached_slots"}


# -- lifetimes: detach with frames and buffers still in hand -----------------------------------------

def test_detach_with_unreleased_batch_and_unsent_buffer(fab):
    a, b = fab.attach("a"), fab.attach("b")
    assert a.send_batch(b.id, [b"x" * 100] * 10) == 10
    bt = b.recv_batch(64, timeout=1)
    f = bt[0]
    buf = b.alloc()
    assert fab.pool_audit()["held"][b.id] >= 11
    b.detach()  # every slot b held (batch, buffer, cache) goes back now
    a2 = assert_conserved(fab)
    assert b.id not in a2["held"]
    with pytest.raises(ReleasedFrameError):
        f.tobytes()
    bt.release()  # must not free the slots a second time
    del buf, f, bt
    a3 = assert_conserved(fab)
    assert a3["free"] == a2["free"]
    # the free stack really holds each slot once: allocate everything, all distinct
    c = fab.attach("c")
    bufs = alloc_all(c)
    assert len(bufs) == a3["free"] + a3["held"].get(c.id, 0)
    addrs = set()
    for x in bufs:
        with memoryview(x) as mv:
            addrs.add(ctypes.addressof(ctypes.c_char.from_buffer(mv)))
    assert len(addrs) == len(bufs)


def test_detach_with_fileno_registered(fab):
    b = fab.attach("b")
    fd = b.fileno()
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    sel.unregister(fd)
    sel.close()
    b.detach()  # stops the wake-up thread and closes the eventfd
    import os
    with pytest.raises(OSError):
        os.fstat(fd)


def test_networks_with_different_mtus(harness):
    fab = harness.create(networks=[{"mtu": 1500, "slots": 128}, {"mtu": 9000, "slots": 64}], max_nodes=4)
    small, big = fab.attach("small", network=0), fab.attach("big", network=1)
    assert (small.mtu, big.mtu) == (1500, 9000)
    drain(small), drain(big)
    # a frame uses the sender's network pool, so the sender's MTU decides what fits
    assert big.send(small.id, b"j" * 9000)
    with pytest.raises(FrameTooLargeError, match="MTU 1500"):
        small.send(big.id, b"j" * 9000)
    assert small.send(big.id, b"s" * 1500)
    assert drain(small) == [b"j" * 9000]
    assert drain(big) == [b"s" * 1500]
    # slots go back to the pool they came from
    for net, total in ((0, 128), (1, 64)):
        a = assert_conserved(fab, net)
        assert a["total"] == total
    small.detach(), big.detach()
    assert assert_conserved(fab, 0)["free"] == 128 and assert_conserved(fab, 1)["free"] == 64


def test_forward_batch_into_a_nearly_full_ring_keeps_the_rest(harness):
    fab = harness.create(ring_size=16, networks=[{"mtu": 1500, "slots": 256}], max_nodes=4)
    a, b, c = fab.attach("a"), fab.attach("b"), fab.attach("c")
    drain(b), drain(c)
    payloads = [make_payload(a.id, c.id, s, 50) for s in range(16)]
    assert a.send_batch(b.id, payloads) == 16
    assert b.send_batch(c.id, [b"filler"] * 6) == 6  # c's ring from b has 10 places left
    with b.recv_batch(64, timeout=1) as bt:
        assert b.forward_batch(c.id, bt) == 10
        assert b.stats()["tx_ring_full"] == 6
        rest = [f for f in bt if "forwarded" not in repr(f)]
        assert [f.tobytes() for f in rest] == payloads[10:]  # still b's, still readable
        assert drain(c) == [b"filler"] * 6 + payloads[:10]
        assert b.forward_batch(c.id, bt) == 6  # only the ones not yet forwarded
    assert drain(c) == payloads[10:]
    assert_conserved(fab)


def test_foreign_objects_are_refused(fab):
    a, b = fab.attach("a"), fab.attach("b")
    buf = a.alloc()
    with pytest.raises(ValueError, match="another node"):
        b.send_buffer(a.id, buf, 1)
    a.send(b.id, b"x")
    with b.recv_batch(timeout=1) as bt:
        with pytest.raises(ValueError, match="another node"):
            a.forward(b.id, bt[0])
        with pytest.raises(ValueError, match="another node"):
            a.forward_batch(b.id, bt)
        with pytest.raises(IndexError):
            bt[1]
    with pytest.raises(ValueError, match="max_frames"):
        b.recv_batch(0, timeout=0)
    with pytest.raises(TypeError):
        a.send_batch(b.id, 5)


def test_wait_reports_pending_frames(fab):
    a, b = fab.attach("a"), fab.attach("b")
    drain(b)
    assert b.wait(0) is False
    a.send(b.id, b"x")
    assert b.wait(1) is True
    assert b.wait(0) is True  # wait() does not take the frame
    assert drain(b) == [b"x"]


def test_frames_outliving_their_fabric_raise_instead_of_crashing(harness):
    fab = harness.create(networks=[{"mtu": 1500, "slots": 64}], max_nodes=4)
    a, b = fab.attach("a"), fab.attach("b")
    a.send(b.id, b"x")
    bt = b.recv_batch(timeout=1)
    f = bt[0]
    fab.close()
    with pytest.raises(ReleasedFrameError):
        f.tobytes()
    with pytest.raises(FabricError, match="detached"):
        a.send(b.id, b"y")
    bt.release()


def test_byte_counters_agree_along_a_chain(fab):
    """tx_bytes of a sender, rx_bytes of its receiver and tx_bytes of a forwarder all count the
    same thing (payload bytes), for plain, raw and forwarded frames."""
    a, b, c = fab.attach("a"), fab.attach("b"), fab.attach("c")
    for n in (a, b, c):
        drain(n)
    base = {n.name: n.stats() for n in (a, b, c)}
    assert a.send_batch(b.id, [b"p" * 100] * 10) == 10
    hdr = b.mac + a.mac + (0x0800).to_bytes(2, "big")
    assert a.send_batch(b.id, [hdr + b"r" * 50], raw=True) == 1
    with b.recv_batch(64, timeout=1) as bt:
        assert len(bt) == 11 and bt.payload_bytes == 1050
        assert b.forward_batch(c.id, bt) == 11
    with c.recv_batch(64, timeout=1) as bt:
        assert bt.payload_bytes == 1050
    d = {n.name: {k: v - base[n.name][k] for k, v in n.stats().items()} for n in (a, b, c)}
    assert d["a"]["tx_bytes"] == d["b"]["rx_bytes"] == d["b"]["tx_bytes"] == d["c"]["rx_bytes"] == 1050, d
    assert d["a"]["tx_frames"] == d["b"]["rx_frames"] == d["b"]["tx_frames"] == d["c"]["rx_frames"] == 11


def test_blocked_receiver_woken_by_a_broadcast(fab):
    a, b = fab.attach("a"), fab.attach("b")
    drain(b)
    b.set_wait_mode("block")
    threading.Timer(0.1, a.broadcast, (b"to all",)).start()
    assert b.recv(timeout=5) == (a.id, 0x88B5, b"to all")


def test_no_doorbell_for_a_receiver_whose_fd_is_already_signalled(fab):
    """Once fileno() is readable, nobody sleeps on the doorbell until the receiver drains: senders
    must not ring it (a futex wake system call) for every frame meanwhile."""
    a, b = fab.attach("a"), fab.attach("b")
    drain(b)
    sel = selectors.DefaultSelector()
    sel.register(b.fileno(), selectors.EVENT_READ)
    try:
        assert a.send(b.id, b"first")
        assert len(sel.select(5)) == 1
        before = fab.region.node_entry(b.id)["doorbell"]
        for i in range(50):
            assert a.send(b.id, b"more")
        rung = fab.region.node_entry(b.id)["doorbell"] - before
        assert rung <= 2, f"the doorbell was rung {rung} times for 50 sends to a signalled receiver"
        assert len(drain(b)) == 51
        assert sel.select(0.2) == []
        assert a.send(b.id, b"again")
        assert len(sel.select(5)) == 1  # the notifier sleeps on the doorbell again and is woken
        assert drain(b) == [b"again"]
    finally:
        sel.close()
