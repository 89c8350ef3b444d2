"""Fabric behaviour across real processes: all-to-all traffic, kill -9 and reclaim, concurrent
pool use, tape readers racing a writer, ephemeral fabrics, blocking wake-ups and idle CPU.

Workers are tests/fabric/_workers.py run with subprocess; the `harness` fixture kills every one
of them and destroys every fabric in teardown. Nothing here asserts a speed: time limits only
bound how long a broken build can hang, and the liveness deadlines (reclaim within ~2 s) are
behaviour the issue specifies."""
from __future__ import annotations

import ctypes
import os
import signal
import time

import pytest

from shmfabric.fabric import Fabric, UnknownDestinationError

from ._workers import check_payload
from .conftest import (alloc_all, assert_all_free, assert_conserved, assert_every_slot_once, shm_leftover, unique_name,
                       wait_until)


def _drain_control(node) -> None:
    """Consume pending hellos; a hello may make the node answer on the tape, so read on until
    a read finds nothing at all (not even a control frame)."""
    while True:
        with node.recv_batch(1024, timeout=0) as b:
            if not len(b) and b.control is None:
                return


@pytest.mark.timeout(60)
def test_sixteen_nodes_all_to_all_no_loss_no_duplicate(harness):
    n, per_peer = 16, 150
    # a pool big enough for every node's cache share plus every ring full
    fab = harness.create("a2a", max_nodes=n, ring_size=32, networks=[{"mtu": 1500, "slots": 16384}])
    workers = [harness.worker("all_to_all", fab.name, k, n, per_peer, 200, 40.0) for k in range(n)]
    results = [w.read(timeout=45) for w in workers]
    for r in results:
        assert r["n_errors"] == 0, r["errors"]
        assert r["sent"] == per_peer * (n - 1), r
        assert all(v == per_peer for v in r["received"].values()), r
        assert r["stats"]["rx_frames"] == per_peer * (n - 1)
        assert r["stats"]["tx_frames"] == per_peer * (n - 1)
    # while all are still attached: every slot is free or held by a live node
    # (the free stack count is not compared here: caches and stack move while nodes run)
    a = fab.pool_audit()
    assert a["orphaned"] == 0 and a["free"] + sum(a["held"].values()) == a["total"]
    for w in workers:
        w.finish()
    final = assert_conserved(fab)
    assert final["free"] == final["total"] and final["held"] == {}


@pytest.mark.timeout(30)
def test_kill9_node_is_reclaimed_and_others_keep_going(harness):
    fab = harness.create("kill", max_nodes=8, ring_size=64, networks=[{"mtu": 1500, "slots": 4096}])
    watcher = fab.attach("watcher")  # this process's watchdog reclaims too, like any survivor's
    a = harness.worker("stream", fab.name, "a", "b,victim", 300, 20.0)
    b = harness.worker("stream", fab.name, "b", "a,victim", 300, 20.0)
    v = harness.worker("victim", fab.name, "victim", "a", 300)
    ra, _, rv = a.read(), b.read(), v.read()
    vid = rv["id"]
    # let traffic flow until the victim holds slots (its cache, buffers, an unreleased batch)
    assert wait_until(lambda: fab.pool_audit()["held"].get(vid, 0) > 8, 5)
    v.kill9()
    t0 = time.monotonic()
    assert wait_until(lambda: fab.node_id("victim") is None, 2.0), "dead node not noticed within 2 s"
    assert wait_until(lambda: vid not in fab.pool_audit()["held"], 2.0)
    noticed = time.monotonic() - t0
    audit = fab.pool_audit()
    assert audit["orphaned"] == 0, audit
    assert audit["free"] + sum(audit["held"].values()) == audit["total"]
    assert not any(e["id"] == vid for e in fab.nodes())
    # sending to it is refused with a clear error, and the rings into it are down
    with pytest.raises(UnknownDestinationError):
        watcher.send(vid, b"are you there")
    assert fab.ring_stats(ra["id"], vid)["down"]
    # the others keep going: they receive more after the reclaim, and their sends to the dead
    # node are refused (tx_drops counts UnknownDestinationError raised in their processes)
    before = {e["name"]: e["rx_frames"] for e in fab.nodes()}
    assert wait_until(lambda: all(e["rx_frames"] > before[e["name"]] + 100 and e["tx_drops"] >= 1
                                  for e in fab.nodes() if e["name"] in ("a", "b")), 5)
    a.write("stop"), b.write("stop")
    resa, resb = a.read(), b.read()
    a.finish(), b.finish()
    for r in (resa, resb):
        assert r["gone"] == ["victim"], r
        assert r["bad"] == 0 and r["received"] > 0
    _drain_control(watcher)
    watcher.detach()
    final = assert_conserved(fab)
    assert final["free"] == final["total"], (final, noticed)


@pytest.mark.timeout(60)
def test_four_processes_alloc_and_free_concurrently(harness):
    # a small pool, so the processes run it dry and race on the shared free stack
    fab = harness.create("alloc", max_nodes=8, ring_size=256, networks=[{"mtu": 1500, "slots": 256}])
    ws = [harness.worker("alloc_free", fab.name, f"p{k}", 2000, k) for k in range(4)]
    for w in ws:
        w.read()
    for w in ws:
        w.write("go")
    results = [w.read(timeout=50) for w in ws]
    for w in ws:
        w.finish()
    for r in results:
        assert r["allocs"] == r["frees"], r
    assert sum(r["allocs"] for r in results) > 0
    assert sum(r["nobuf"] for r in results) > 0, "the pool never ran dry: the test did not race"
    final = assert_conserved(fab)
    assert final["free"] == final["total"] == 256
    # the free stack holds every slot exactly once: allocate them all and check they are distinct
    node = fab.attach("counter")
    bufs = alloc_all(node)
    addrs = set()
    for buf in bufs:
        with memoryview(buf) as mv:
            addrs.add(ctypes.addressof(ctypes.c_char.from_buffer(mv)))
    assert len(bufs) == len(addrs) == 256
    del bufs
    node.detach()
    assert assert_conserved(fab)["free"] == 256


@pytest.mark.timeout(30)
def test_slow_reader_lapped_by_another_process_never_sees_a_torn_frame(harness):
    fab = harness.create("tape", tape_entries=64, tape_entry_size=1100, max_nodes=4,
                         networks=[{"mtu": 1500, "slots": 64}])
    reader = fab.attach("reader")
    total = 20000
    w = harness.worker("broadcaster", fab.name, "w", total, 7)
    wid = w.read()["id"]
    _drain_control(reader)
    w.write("go")
    got = []
    done = None
    deadline = time.monotonic() + 25
    while time.monotonic() < deadline:
        with reader.recv_batch(8, timeout=0.05) as b:
            for f in b:
                src, dst, seq = check_payload(f.payload)  # raises on a torn frame
                assert f.src == wid and src == wid and f.copied
                got.append(seq)
        time.sleep(0.0005)  # slow reader: the writer laps it
        if done is None:
            try:
                done = w.read(timeout=0)
            except AssertionError:
                pass
        elif got and got[-1] == total - 1:
            break
    assert done == {"name": "w", "sent": total}
    assert got == sorted(set(got)), "duplicates or reordering"
    assert got[-1] == total - 1, "the reader must catch up to the newest entry"
    lapped = reader.stats()["rx_lapped"]
    assert lapped > 0, "the reader was never lapped: the test proves nothing"
    # every entry is either delivered or counted as missed
    assert len(got) + lapped == total, (len(got), lapped)
    w.finish()


def reapers_of(name: str) -> list[int]:
    """Pids of reaper processes watching fabric `name` (they must exit once the file is gone)."""
    from shmfabric.core.region import region_path

    want = str(region_path(name)).encode()
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read().split(b"\0")
            except OSError:
                continue
            if b"shmfabric.core.reaper" in cmd and want in cmd:
                pids.append(int(d))
    return pids


def test_ephemeral_fabric_removed_after_last_node_exits(harness):
    name = unique_name("eph")
    harness.names.append(name)
    c = harness.worker("eph_create", name)
    path = c.read()["path"]
    other = harness.worker("attach_hold", name, "other")
    other.read()
    c.finish()  # the creator leaves normally; another node is still attached
    time.sleep(0.6)
    assert shm_leftover(name), "removed while a node was still attached"
    assert len(reapers_of(name)) == 1
    other.finish()
    assert wait_until(lambda: not shm_leftover(name), 3.0), f"{path} left behind"
    assert wait_until(lambda: not reapers_of(name), 3.0), "the reaper did not exit"


def test_ephemeral_fabric_removed_when_every_node_is_killed(harness):
    name = unique_name("eph9")
    harness.names.append(name)
    c = harness.worker("eph_create", name)
    c.read()
    others = [harness.worker("attach_hold", name, f"o{k}") for k in range(2)]
    for o in others:
        o.read()
    for w in [c, *others]:
        w.kill9()
    assert wait_until(lambda: not shm_leftover(name), 3.0), "the reaper did not remove the file"
    assert wait_until(lambda: not reapers_of(name), 3.0), "the reaper did not exit"


def test_blocked_receiver_in_another_process_is_woken_by_a_send(harness, fab):
    me = fab.attach("sender")
    w = harness.worker("block_recv", fab.name, "sleeper", 10.0)
    wid = w.read()["id"]
    time.sleep(0.3)  # let it go to sleep
    assert me.send(wid, b"wake up")
    res = w.read(timeout=5)
    assert bytes.fromhex(res["got"]) == b"wake up"
    assert res["wakeups"] >= 1
    assert me.recv(timeout=5) == (wid, 0x88B5, b"pu ekaw")
    w.finish()


@pytest.mark.parametrize("mode", ["block", "adaptive", "selector"])
def test_idle_blocked_node_uses_no_cpu(harness, fab, mode):
    w = harness.worker("idle_block", fab.name, "idle", 1.0, mode)
    w.read()
    res = w.read(timeout=10)
    assert res["frames"] == 0
    # behaviour, not speed: a sleeping node must not spin (a spinning one burns ~1 s per second)
    assert res["cpu_s"] < 0.1, res
    w.finish()


def test_open_nonexistent_and_destroy(harness):
    from shmfabric.fabric import RegionNotFoundError

    name = unique_name("gone")
    with pytest.raises(RegionNotFoundError, match="does not exist"):
        Fabric.open(name)
    assert Fabric.destroy(name) is False


@pytest.mark.timeout(60)
def test_receiver_detaching_under_load_leaves_no_orphaned_slot(harness):
    """Senders that passed the 'is the destination up' check while the receiver detaches must not
    leave slots tagged for the departed node: either the reclaim sees them or the sender takes
    them back. Checked right after each detach, before the node entry is used again (a new
    attach at the same index would drain them and hide the leak)."""
    fab = harness.create("det", max_nodes=8, ring_size=1024, networks=[{"mtu": 1500, "slots": 16384}])
    blasters = [harness.worker("blaster", fab.name, f"s{k}", "sink", 50.0) for k in range(4)]
    for b in blasters:
        b.read()
    leaks = []
    for _ in range(20):
        sink = harness.worker("sink", fab.name, "sink", 0.03)
        sid = sink.read()["id"]
        res = sink.read(timeout=10)
        assert res["frames"] > 0, "the sink received nothing: the test did not load it"
        sink.proc.wait(timeout=10)
        assert wait_until(lambda: fab.node_id("sink") is None, 2.0)
        time.sleep(0.02)  # let in-flight sends finish
        a = fab.pool_audit()
        leaks.append(a["orphaned"])
        assert sid not in a["held"]
    for b in blasters:
        b.write("stop")
    refused = 0
    for b in blasters:
        refused += b.read()["refused"]
        b.finish()
    assert refused > 0, "no send was ever refused: the senders never raced a detach"
    assert leaks == [0] * len(leaks), f"slots orphaned after each detach: {leaks}"
    final = assert_conserved(fab)
    assert final["free"] == final["total"]


@pytest.mark.timeout(60)
def test_broadcaster_killed_while_writing_does_not_wedge_the_tape(harness):
    """The tape's writer lock is a robust mutex: a writer killed while holding it (likely here,
    with 60 KB frames) hands it over; its half-written entry is skipped, never read torn."""
    import threading

    fab = harness.create("tlock", tape_entries=16, tape_entry_size=65550, max_nodes=4,
                         networks=[{"mtu": 1500, "slots": 64}])
    writer, reader = fab.attach("writer"), fab.attach("reader")
    for round_ in range(6):  # a kill lands inside tape_send (lock held) ~40% of the time
        h = harness.worker("tape_hammer", fab.name, f"h{round_}", 60000)
        hid = h.read()["id"]
        # let it write for a while, reading along (never a torn frame)
        deadline = time.monotonic() + 0.15
        while time.monotonic() < deadline:
            with reader.recv_batch(64, timeout=0.01) as b:
                for f in b:
                    check_payload(f.payload)
        h.kill9()
        assert wait_until(lambda: fab.node_id(f"h{round_}") is None, 2.0)
        # the lock must be free (or recoverable) for the next writer
        done = threading.Event()

        def write() -> None:
            writer.broadcast(b"after kill %d" % round_)
            done.set()

        t = threading.Thread(target=write, daemon=True)
        t.start()
        assert done.wait(5), "broadcast blocked: the dead writer's lock was never handed over"
        got = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and b"after kill %d" % round_ not in got:
            with reader.recv_batch(64, timeout=0.05) as b:
                for f in b:
                    if f.src == hid:
                        check_payload(f.payload)  # the dead writer's complete entries are intact
                    else:
                        got.append(f.tobytes())
        assert got[-1:] == [b"after kill %d" % round_], got


@pytest.mark.timeout(30)
def test_frames_from_a_dead_sender_are_still_delivered(harness, fab):
    rx = fab.attach("rx")
    w = harness.worker("send_then_hold", fab.name, "tx", "rx", 60)  # fits the 64-entry ring
    info = w.read()
    assert info["sent"] == 60
    w.kill9()
    assert wait_until(lambda: fab.node_id("tx") is None, 2.0)
    seqs = []
    with rx.recv_batch(256, timeout=1) as b:
        for f in b:
            src, dst, seq = check_payload(f.payload)
            assert (src, dst, f.src) == (info["id"], rx.id, info["id"])
            seqs.append(seq)
    assert seqs == list(range(60))
    a = assert_conserved(fab)
    assert info["id"] not in a["held"]


@pytest.mark.timeout(60)
def test_concurrent_attach_with_one_name_admits_exactly_one(harness, fab):
    for trial in range(6):
        at = time.time() + 0.5
        ws = [harness.worker("attach_at", fab.name, f"same{trial}", at) for _ in range(3)]
        res = [w.read(timeout=10) for w in ws]
        winners = [r for r in res if r["ok"]]
        assert len(winners) == 1, res
        assert all("already attached" in r["error"] for r in res if not r["ok"]), res
        assert sum(1 for e in fab.nodes() if e["name"] == f"same{trial}") == 1
        for w in ws:
            w.finish()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("child_exit", ["normal", "os_exit"])
def test_forked_child_cannot_use_or_tear_down_the_parents_nodes(harness, fab, child_exit):
    """A node belongs to the process that attached it. A child forked afterwards gets a clear
    error if it uses the node, and when it exits, its interpreter shutdown must not detach the
    parent's nodes or push the parent's cached slots into the shared pool."""
    w = harness.worker("fork_child", fab.name, child_exit)
    res = w.read(timeout=20)
    assert res["child_status"] == 0
    assert "forked" in res["child"], res["child"]
    assert res["a_up"] and res["b_up"], res
    assert "error_after" not in res, res
    assert res["held"] == ["held"] * 4
    assert res["sent_after"] and res["got_after"] == ["after"]
    a = res["audit"]
    assert a["orphaned"] == 0 and a["free"] + sum(int(v) for v in a["held"].values()) == a["total"]
    assert a["stack_count"] == a["free"], a  # no slot pushed twice
    w.finish()
    assert_conserved(fab)


@pytest.mark.timeout(120)
def test_sender_stalled_across_reclaim_and_reattach_never_publishes_freed_slots(harness):
    """A sender stopped (SIGSTOP) inside send_batch while its destination is killed, reclaimed and
    replaced by a new node in the same slot must not publish its frames into the new node's ring:
    the reclaim freed their slots. Each round checks the new node sees no torn frame, and at the
    end every slot is accounted for."""
    import random

    fab = harness.create("stall", max_nodes=4, ring_size=256, networks=[{"mtu": 1500, "slots": 4096}])
    watcher = fab.attach("watcher")  # this process's watchdog reclaims the killed sinks
    sender = harness.worker("checked_blaster", fab.name, "src", "dst", 100.0)
    sink = harness.worker("checking_sink", fab.name, "dst")
    sid = sink.read()["id"]
    sender.read()
    rng = random.Random(7)
    totals = {"received": 0, "bad": 0}
    same_slot = 0
    for _ in range(25):
        time.sleep(rng.uniform(0.002, 0.02))
        os.kill(sender.pid, signal.SIGSTOP)
        try:
            sink.write("report")
            got = sink.read()
            totals = {k: totals[k] + got[k] for k in totals}
            sink.kill9()
            assert wait_until(lambda: fab.node_id("dst") is None, 5.0), "killed sink not reclaimed"
            sink = harness.worker("checking_sink", fab.name, "dst")
            new_id = sink.read()["id"]
            same_slot += new_id == sid
            sid = new_id
        finally:
            os.kill(sender.pid, signal.SIGCONT)
        time.sleep(0.01)
    sink.write("report")
    got = sink.read()
    totals = {k: totals[k] + got[k] for k in totals}
    sender.write("stop")
    sender.read()
    sender.finish()
    sink.finish()
    assert same_slot >= 20  # the new node took the dead one's slot (the case that matters)
    assert totals["received"] > 0
    assert totals["bad"] == 0, totals
    _drain_control(watcher)
    watcher.detach()
    assert_all_free(fab)


@pytest.mark.timeout(60)
def test_senders_killed_inside_send_batch_leave_no_slot_to_a_live_receiver(harness):
    # A sender tags each slot for the receiver before it publishes the ring head. Killed in
    # between, those slots used to belong to the live receiver while sitting in no ring: the
    # dead node's reclaim did not find them (their tag is the receiver's), so a long-lived sink
    # lost slots with every sender crash (75 after 10 kills of a blaster, found by a review).
    fab = harness.create("killtx", max_nodes=8, ring_size=1024, networks=[{"mtu": 1500, "slots": 4096}])
    rx = fab.attach("rx")
    cache_bound = 4096 // (2 * 8)  # most slots a node's free cache keeps (its share of the pool)

    def drain(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            rx.recv_batch(256, timeout=0.01).release()

    for r in range(10):
        w = harness.worker("blaster", fab.name, f"tx{r}", "rx", 30.0)
        tx = w.read()["id"]
        drain(0.15 + 0.02 * r)  # it spends most of its time inside send_batch, copying
        w.kill9()
        assert wait_until(lambda: fab.node_id(f"tx{r}") is None and tx not in fab.pool_audit()["held"], 3.0)
        drain(0.2)
        audit = _settled_audit(fab)
        assert audit["orphaned"] == 0, audit
        assert audit["free"] + audit["held"].get(rx.id, 0) == audit["total"], (r, audit)
        assert audit["held"].get(rx.id, 0) <= cache_bound, (r, audit)  # nothing stuck beyond its cache
        # The free stack agrees too, after every kill: one that landed inside a pop from it or a
        # push to it was swept up by that sender's reclaim (or by the retry of its sweep).
        assert audit["stack_count"] == audit["free"] == audit["on_stack"], (r, audit)
    rx.detach()
    final = _settled_audit(fab)
    assert final["stack_count"] == final["free"] == final["on_stack"] == final["total"], final
    assert final["held"] == {} and final["orphaned"] == 0, final


def _settled_audit(fab) -> dict:
    """pool_audit once no sweep is pending, with the sweep counters. A reclaim's sweep gives up
    while another node stays inside a pool operation for its whole wait (a loaded machine
    deschedules it there); the watchdog then retries it at growing intervals, up to 5 s apart.
    The free stack's own count is exact only after that sweep. (CI once failed this test with a
    count one too high: not that, but a double free, on_stack -1, from a sender killed inside
    desc_put; test_desc_order.py reproduces it deterministically.)"""
    assert wait_until(lambda: fab.sweep() >= 0, 15.0), "a pending sweep could not run for 15 s"
    audit = fab.pool_audit()
    sb = fab.region.superblock()
    audit.update(sweep_pending=sb["sweep_pending"], sweeps=sb["sweeps"], swept_slots=sb["swept_slots"])
    return audit


def _unpublish(fab, src: int, dst: int, k: int) -> None:
    """Move ring src->dst's head back by k: its last k frames become what a sender killed before
    publishing leaves (written and tagged for dst, past the head). The sender must be idle."""
    import struct

    from shmfabric.core.region import L

    lay = fab.region.layout
    off = lay.off_rings + (src * lay.max_nodes + dst) * lay.ring_stride + L["sf_ring.head"]
    head = struct.unpack_from("<I", fab.region.mm, off)[0]
    struct.pack_into("<I", fab.region.mm, off, head - k)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("restart", [False, True])
def test_unpublished_frames_of_a_dead_sender_are_freed_once_and_only_for_their_incarnation(harness, restart):
    # A sender killed after tagging 40 slots for sink and before publishing them: its reclaim
    # must free them (else the sink's pool leaks). If sink restarted meanwhile, its own reclaim
    # freed them already and the new sink may hold them under its new tag: the sender's reclaim
    # must leave them alone (it freed them while the new sink read its frames, found by a review).
    from ._workers import make_payload

    fab = harness.create("unpub", max_nodes=8, ring_size=256, networks=[{"mtu": 1500, "slots": 2048}])
    sink, x = fab.attach("sink"), fab.attach("x")
    w = harness.worker("send_then_hold", fab.name, "s", "sink", 40)
    sid = w.read()["id"]
    _unpublish(fab, sid, sink.id, 40)
    if restart:
        sink.detach()
        sink = fab.attach("sink")
    held, seq = [], 0
    while sum(len(b) for b in held) < 600:  # the new frames reuse freed slots first (a stack)
        seq += x.send_batch(sink.id, [make_payload(x.id, sink.id, seq + i, 1400) for i in range(64)])
        b = sink.recv_batch(1024, timeout=0.1)
        held.append(b) if len(b) else b.release()
    w.kill9()
    assert wait_until(lambda: fab.node_id("s") is None and sid not in fab.pool_audit()["held"], 3.0)
    for _ in range(20):  # what the reclaim freed is reused now: a frame still held would be torn
        seq += x.send_batch(sink.id, [make_payload(x.id, sink.id, seq + i, 1400) for i in range(64)])
        sink.recv_batch(1024, timeout=0.01).release()
    torn = 0
    for b in held:
        for f in b:
            try:
                check_payload(f.payload)
            except ValueError:
                torn += 1
        b.release()
    assert torn == 0, f"{torn} held frames were overwritten: their slots were freed while held"
    sink.detach(), x.detach()
    assert_all_free(fab)


@pytest.mark.timeout(120)
def test_stale_unpublished_entries_are_not_freed_when_the_destination_epoch_wraps(harness):
    # A sender killed before publishing while its destination was down leaves stamped entries
    # past its ring's head (the destination's reclaim freed their slots). The stamp keeps 12 bits
    # of the destination's epoch, which moves by 2 per restart: after 2,048 restarts the stale
    # entries' stamps are current again. A new node that took the dead sender's index and never
    # sent to that destination must not have them freed by its own reclaim: the destination holds
    # those slots now (a double free). Its claim clears what an earlier incarnation left.
    fab = harness.create("wrap", max_nodes=8, ring_size=256, networks=[{"mtu": 1500, "slots": 2048}])
    sink = fab.attach("sink")
    sink_id = sink.id
    w = harness.worker("send_then_hold", fab.name, "s", "sink", 40)
    sid = w.read()["id"]
    assert sid > sink_id  # so the restarting sink keeps its index (a claim takes the lowest free)
    _unpublish(fab, sid, sink_id, 40)
    sink.detach()  # its reclaim frees the 40; the ring into it is down
    w.kill9()  # the sender's reclaim skips the down ring: the stamped entries stay
    assert wait_until(lambda: fab.node_id("s") is None, 5.0)
    for k in range(2048):  # each restart moves the ring's epoch by 2: 4,096, its 12 bits wrap
        if k:
            sink.detach()
        sink = fab.attach("sink")
        assert sink.id == sink_id
    s2 = harness.worker("attach_hold", fab.name, "s2")  # takes the dead sender's index
    assert s2.read()["id"] == sid
    bufs = alloc_all(sink)  # the sink holds every free slot, the 40 among them
    assert fab.pool_audit()["held"][sink_id] == len(bufs)
    s2.kill9()
    assert wait_until(lambda: fab.node_id("s2") is None and sid not in fab.pool_audit()["held"], 5.0)
    audit = fab.pool_audit()
    assert audit["held"].get(sink_id, 0) == len(bufs), audit  # nothing of the sink's was freed
    assert audit["free"] == audit["total"] - len(bufs), audit
    del bufs
    sink.detach()
    assert_all_free(fab)


@pytest.mark.timeout(60)
def test_a_claim_and_a_reclaim_read_no_further_into_a_ring_than_was_written(harness):
    # The region is a sparse tmpfs file: a ring's pages are committed when first touched, reading
    # included. A claim (clearing what earlier incarnations left) and a reclaim (freeing what a
    # dead sender left unpublished) scan past their rings' heads only as far as entries were
    # written; a scan to the end of every outbound ring would commit the whole ring area of a
    # fabric sized for many nodes and long rings, most of which no pair ever uses.
    fab = harness.create("sparse", max_nodes=4, ring_size=1 << 17, networks=[{"mtu": 1500, "slots": 256}])
    ring_bytes = (1 << 17) * 16  # 2 MiB of descriptors per ring
    a = fab.attach("a")

    def committed() -> int:
        return os.stat(fab.path).st_blocks * 512

    before = committed()
    for _ in range(2):  # the second claim of the index finds what the first incarnation left
        w = harness.worker("send_then_hold", fab.name, "s", "a", 40)
        w.read()
        w.kill9()
        assert wait_until(lambda: fab.node_id("s") is None, 5.0)
    grown = committed() - before
    assert grown < ring_bytes // 4, f"{grown} bytes committed by two claims and reclaims"
    a.detach()
    assert_all_free(fab)


class _Pool:
    """Direct access to network 0's free stack and owner table of a fabric, to put a pool in
    the state a node killed inside a free-stack operation leaves (tests only; every node that
    could move slots meanwhile must be idle)."""

    def __init__(self, fab):
        import struct

        from shmfabric.core.region import L

        self.s, self.L, self.mm, lay = struct, L, fab.region.mm, fab.region.layout
        self.base = lay.off_networks
        self.node_base = lambda i: lay.off_nodes + i * lay.node_size
        get = lambda k: struct.unpack_from("<Q", self.mm, self.base + L[f"sf_network.{k}"])[0]
        self.n_slots = struct.unpack_from("<I", self.mm, self.base + L["sf_network.n_slots"])[0]
        self.off_next, self.off_chain, self.off_owner = get("off_next"), get("off_chain"), get("off_owner")

    def _u32(self, off: int, i: int, v: int | None = None) -> int:
        if v is not None:
            self.s.pack_into("<I", self.mm, off + 4 * i, v)
        return self.s.unpack_from("<I", self.mm, off + 4 * i)[0]

    def pop_chain(self) -> list[int]:
        """Take the top chain off the free stack as cache_refill's CAS does, and no more."""
        off = self.base + self.L["sf_network.free_head"]
        head = self.s.unpack_from("<Q", self.mm, off)[0]
        top1 = head & 0xFFFFFFFF
        assert top1, "free stack empty"
        below = self._u32(self.off_chain, top1 - 1)
        self.s.pack_into("<Q", self.mm, off, (((head >> 32) + 1) << 32) | below)
        chain, s1 = [], top1
        while s1:
            chain.append(s1 - 1)
            s1 = self._u32(self.off_next, s1 - 1)
        return chain

    def owned_by(self, tag: int) -> list[int]:
        return [s for s in range(self.n_slots) if self._u32(self.off_owner, s) == tag]

    def untag(self, slots: list[int]) -> None:
        """What cache_flush does before its push: the slots are nobody's, on no stack yet."""
        for s in slots:
            self._u32(self.off_owner, s, 0)

    def set_inside_op(self, node: int, inside: bool) -> None:
        off = self.node_base(node) + self.L["sf_node.pool_ops"]
        ops = self.s.unpack_from("<I", self.mm, off)[0]
        if bool(ops & 1) != inside:
            self.s.pack_into("<I", self.mm, off, ops + 1)


@pytest.mark.timeout(60)
def test_a_reclaim_resumed_after_its_reclaimer_died_frees_the_rest_of_the_unpublished_frames_once(harness):
    # A reclaimer killed inside its give-back of a dead sender's unpublished frames leaves the
    # entry in RECLAIM; the next reclaim resumes it. Killed after it cleared the first entry and
    # untagged its slot, before the push (the order it uses: a slot already pushed behind a still
    # stamped entry could be the live receiver's again by the rerun, and freed twice): the rerun
    # skips the cleared entry and frees the other 39 (it stopped at the first cleared entry
    # before, leaking them: slots tagged for the live receiver, in no ring), and a sweep gives
    # back the untagged slot.
    import struct

    from shmfabric.core.region import L

    fab = harness.create("rerun", max_nodes=8, ring_size=256, networks=[{"mtu": 1500, "slots": 2048}])
    sink = fab.attach("sink")
    w = harness.worker("send_then_hold", fab.name, "s", "sink", 40)
    sid = w.read()["id"]
    _unpublish(fab, sid, sink.id, 40)
    lay, mm, pool = fab.region.layout, fab.region.mm, _Pool(fab)
    ring = lay.off_rings + (sid * lay.max_nodes + sink.id) * lay.ring_stride
    head = struct.unpack_from("<I", mm, ring + L["sf_ring.head"])[0]
    first = ring + L["sf_ring.desc"] + (head & 255) * L["sizeof.desc"]
    lost = struct.unpack_from("<I", mm, first)[0]
    pool._u32(pool.off_owner, lost, 0)  # the first run's untag of that slot...
    struct.pack_into("<II", mm, first, 0xFFFFFFFF, 0)  # ...and its give-back of the entry (slot, len); killed before the push
    w.kill9()
    assert wait_until(lambda: fab.node_id("s") is None and sid not in fab.pool_audit()["held"], 5.0)
    audit = fab.pool_audit()
    assert audit["held"].get(sink.id, 0) == 0, audit  # the other 39 were freed (sink never received)
    assert audit["on_stack"] == audit["free"] - 1, audit  # only the untagged one is nowhere
    assert fab.sweep(force=True) == 1
    assert_every_slot_once(sink, 2048)  # nothing was freed twice
    sink.detach()
    assert_all_free(fab)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("window", ["pop", "flush"])
def test_slots_of_a_node_killed_inside_a_free_stack_operation_are_given_back(harness, window):
    # cache_refill takes a chain off the shared stack with one CAS and then tags its slots;
    # cache_flush untags slots and then pushes them. A node killed between the two left slots
    # that nobody owned and no stack reached: lost for good (a 1-in-3 chance per kill in the
    # blaster test above). The dead node's reclaim now sees it died inside a pool operation and
    # sweeps: every slot owned by nobody and out of the stack's reach goes back.
    fab = harness.create("sweep", max_nodes=8, ring_size=64, networks=[{"mtu": 1500, "slots": 2048}])
    w = harness.worker("attach_hold", fab.name, "victim")
    vid = w.read()["id"]
    pool = _Pool(fab)
    tag = ((fab.region.node_entry(vid)["gen"] & 0xFFFF) << 16) | (vid + 1)
    if window == "pop":
        lost = pool.pop_chain()
    else:
        lost = pool.owned_by(tag)[:40]
        pool.untag(lost)
    pool.set_inside_op(vid, True)
    before = fab.pool_audit()
    assert before["on_stack"] == before["free"] - len(lost) > 0, before  # the state a kill leaves
    swept = fab.region.superblock()["swept_slots"]
    w.kill9()
    assert wait_until(lambda: fab.node_id("victim") is None and vid not in fab.pool_audit()["held"], 3.0)
    assert fab.region.superblock()["swept_slots"] - swept == len(lost)
    assert_all_free(fab)
    # the slots given back are usable, each once
    node = fab.attach("user")
    bufs = alloc_all(node)
    assert len(bufs) == 2048
    del bufs
    node.detach()


@pytest.mark.timeout(60)
def test_sweep_waits_for_a_node_inside_a_pool_operation_and_runs_once_it_is_out(harness):
    fab = harness.create("sweepwait", max_nodes=8, ring_size=64, networks=[{"mtu": 1500, "slots": 1024}])
    busy = fab.attach("busy")
    pool = _Pool(fab)
    lost = pool.pop_chain()
    pool.set_inside_op(busy.id, True)  # as if descheduled between its pop and its tagging
    assert fab.sweep(force=True) == -1  # gives up rather than count its slots as lost
    pool.set_inside_op(busy.id, False)
    assert fab.sweep(force=True) == len(lost)
    assert fab.sweep(force=True) == 0  # nothing is lost any more
    busy.detach()
    assert_all_free(fab)


@pytest.mark.timeout(90)
def test_sweeps_under_full_traffic_give_back_nothing_and_tear_no_frame(harness):
    # A sweep counts as lost every slot that nobody owns and the stack does not reach; while
    # slots move that is also true, for an instant, of every chain a node just popped or is
    # about to push. The sweep must hold pool operations off and wait for the ones under way,
    # so under full traffic forced sweeps find nothing, and no frame is torn by a slot given
    # out twice.
    fab = harness.create("sweepload", max_nodes=8, ring_size=256, networks=[{"mtu": 1500, "slots": 2048}])
    sink = harness.worker("checking_sink", fab.name, "dst")
    sink.read()
    senders = [harness.worker("checked_blaster", fab.name, f"src{k}", "dst", 60.0) for k in range(3)]
    for s in senders:
        s.read()
    results = []
    end = time.monotonic() + 4.0
    while time.monotonic() < end:
        results.append(fab.sweep(force=True))
        time.sleep(0.005)
    sink.write("report")
    got = sink.read()
    for s in senders:
        s.write("stop")
    sent = sum(s.read()["sent"] for s in senders)
    for s in senders:
        s.finish()
    sink.finish()
    ran = [r for r in results if r >= 0]
    assert sent > 0 and got["received"] > 0
    assert len(ran) >= 10, results  # the sweeps ran (not all gave up waiting)
    assert set(ran) == {0}, results
    assert got["bad"] == 0, got
    assert_all_free(fab)


def _set_sweeping(fab, value: int) -> None:
    import struct

    from shmfabric.core.region import L

    struct.pack_into("<I", fab.region.mm, L["sf_superblock.sweeping"], value)


def _sweeping(fab) -> int:
    import struct

    from shmfabric.core.region import L

    return struct.unpack_from("<I", fab.region.mm, L["sf_superblock.sweeping"])[0]


@pytest.mark.timeout(30)
def test_a_sweep_stopped_in_the_middle_of_its_look_does_not_stop_traffic(harness):
    # A sweeper holds pool operations off while it looks for lost slots. Stopped there (SIGSTOP,
    # a debugger), it used to stop every node at its next alloc or refill, and with them their
    # watchdogs' heartbeats (a review: nodes in other pid namespaces were then reclaimed alive).
    # A node held off for 2 ms now cancels the sweep and goes on.
    fab = harness.create("sweepstop", max_nodes=8, ring_size=256, networks=[{"mtu": 1500, "slots": 1024}])
    a, b = fab.attach("a"), fab.attach("b")
    _set_sweeping(fab, 77)  # the sweep of a stopped sweeper, mid-look
    sent = 0
    for _ in range(20):  # far more frames than a cache holds: refills from the shared stack
        sent += a.send_batch(b.id, [b"x" * 100] * 64)
        b.recv_batch(1024, timeout=0.1).release()
    assert sent == 20 * 64
    assert _sweeping(fab) == 0  # cancelled: the stopped sweeper will not trust its look
    a.detach(), b.detach()
    assert_conserved(fab)


@pytest.mark.timeout(60)
def test_a_process_holding_the_pool_lock_stops_no_traffic_and_reclaims_resume_after_it(harness):
    # The pool lock is taken by reclaims, attaches and sweeps, never by a node's pool
    # operation: a process stopped or killed while holding it neither stops traffic nor hangs
    # a watchdog (a reclaim waits 50 ms, then tries again at the next beat).
    fab = harness.create("lockheld", max_nodes=8, ring_size=256, networks=[{"mtu": 1500, "slots": 1024}])
    a, b = fab.attach("a"), fab.attach("b")
    victim = harness.worker("attach_hold", fab.name, "victim")
    vid = victim.read()["id"]
    holder = harness.worker("hold_pool_lock", fab.name)
    assert holder.read()["locked"] == 0
    victim.kill9()
    for _ in range(20):  # traffic goes on
        assert a.send_batch(b.id, [b"y" * 100] * 64) == 64
        b.recv_batch(1024, timeout=0.1).release()
    time.sleep(0.6)  # several watchdog beats: each reclaim of the victim found the lock busy
    assert fab.node_id("victim") == vid and vid in fab.pool_audit()["held"]
    assert fab.sweep(force=True) == -1  # busy, not blocked
    holder.kill9()  # the lock is left EOWNERDEAD: the next taker recovers it (and sweeps)
    assert wait_until(lambda: fab.node_id("victim") is None and vid not in fab.pool_audit()["held"], 5.0)
    a.detach(), b.detach()
    assert_all_free(fab)
    assert fab.attach("again").id >= 0  # attaching takes the lock too


@pytest.mark.timeout(30)
def test_a_corrupt_free_stack_is_reported_and_the_watchdog_keeps_running(harness, capfd):
    # A pending sweep that found a corrupt stack raised out of the watchdog's loop, which took
    # it for "the mapping went away" and returned: no more heartbeats or reclaims, in every
    # process that opened the fabric, and attach failed for good (a review).
    import struct
    import threading

    from shmfabric.core.region import L

    fab = harness.create("corrupt", max_nodes=8, ring_size=64, networks=[{"mtu": 1500, "slots": 1024}])
    pool = _Pool(fab)
    head = struct.unpack_from("<Q", pool.mm, pool.base + L["sf_network.free_head"])[0]
    top1 = head & 0xFFFFFFFF
    below = pool._u32(pool.off_chain, top1 - 1)
    s1 = top1
    while pool._u32(pool.off_next, s1 - 1):
        s1 = pool._u32(pool.off_next, s1 - 1)
    pool._u32(pool.off_next, s1 - 1, below)  # the top chain runs on into the next: slots reached twice
    assert fab.pool_audit()["on_stack"] == -1
    struct.pack_into("<I", fab.region.mm, L["sf_superblock.sweep_pending"], 1)
    with pytest.raises(Exception, match="free stack is corrupt"):
        fab.sweep()
    time.sleep(0.6)  # a few watchdog beats, each retrying the pending sweep
    assert any(t.name == "shmfabric-watchdog" for t in threading.enumerate())
    node = fab.attach("still")
    beat = fab.region.node_entry(node.id)["heartbeat_ns"]
    assert wait_until(lambda: fab.region.node_entry(node.id)["heartbeat_ns"] > beat, 2.0)
    assert capfd.readouterr().err.count("free stack is corrupt") == 1  # said once, not every beat
    node._port.close()  # its slots came from a corrupt stack: leave them


@pytest.mark.timeout(60)
def test_lost_slots_are_found_once_a_dead_lock_holder_is_noticed(harness):
    # A sweeper killed among its pushes leaves found slots on no stack and nothing pending; if
    # it had no node, no reclaim notices. The watchdogs' plain sweep() now takes the lock
    # whenever it is free, so the dead holder's EOWNERDEAD makes the sweep pending and run.
    fab = harness.create("deadholder", max_nodes=8, ring_size=64, networks=[{"mtu": 1500, "slots": 1024}])
    pool = _Pool(fab)
    holder = harness.worker("hold_pool_lock", fab.name)
    assert holder.read()["locked"] == 0
    lost = pool.pop_chain()  # what the dead sweeper had not pushed yet
    holder.kill9()
    assert wait_until(lambda: fab.pool_audit()["on_stack"] == fab.pool_audit()["free"], 5.0), fab.pool_audit()
    assert fab.region.superblock()["swept_slots"] == len(lost)
    assert_all_free(fab)


@pytest.mark.timeout(60)
def test_a_detach_that_finds_the_pool_lock_busy_is_finished_by_the_watchdog(harness, monkeypatch):
    # detach gave up after 5 s of a busy lock and left the entry up for the life of the
    # process: the name stayed taken and peers saw a node whose port was closed.
    from shmfabric.fabric import fabric as fabric_mod

    monkeypatch.setattr(fabric_mod, "DETACH_LOCK_WAIT", 0.3)
    fab = harness.create("detachbusy", max_nodes=8, ring_size=64, networks=[{"mtu": 1500, "slots": 1024}])
    x = fab.attach("x")
    holder = harness.worker("hold_pool_lock", fab.name)
    assert holder.read()["locked"] == 0
    x.detach()
    assert fab.node_id("x") is not None  # still up: the lock is held
    holder.kill9()
    assert wait_until(lambda: fab.node_id("x") is None, 5.0)
    assert fab.attach("x").id >= 0  # the name is free again
    assert_conserved(fab)


def test_a_busy_pool_lock_costs_a_watchdog_one_wait_per_beat_not_one_per_dead_node():
    # Each reclaim waits up to 50 ms for a busy pool lock; with dozens of dead entries a
    # watchdog's beat grew past the 2 s after which nodes in other pid namespaces are judged
    # dead (a review saw a live node reclaimed and the stack corrupted).
    from types import SimpleNamespace

    from shmfabric.core import liveness, native

    calls = []
    core = SimpleNamespace(node_state=lambda i: native.NODE_UP, reclaim=lambda i, s, g: calls.append(i) or -2,
                           wake_all=lambda: None, sweep=lambda: 0)
    region = SimpleNamespace(core=core, node_hwm=lambda: 60, sweep_next=0.0, sweep_gap=0.0, sweep_warned=False,
                             node_entry=lambda i: {"pid": 2**22 + 12345, "start_time": 1, "pidns": 0, "gen": 1,
                                                   "heartbeat_ns": 0, "name": f"n{i}"})
    assert liveness.sweep(region) == []
    assert calls == [0]  # one try, the others at the next beat


@pytest.mark.timeout(60)
@pytest.mark.parametrize("order", ["sender-reclaimed-first", "destination-back-first"])
def test_a_slot_tagged_for_a_destination_after_its_reclaim_is_freed(harness, order):
    # A sender tags a slot for its destination after the destination's reclaim scanned the owner
    # table (the ring was up when the sender looked, down by the time it tagged), and dies before
    # its publish. Its reclaim skipped rings that were down, and nothing else frees a slot whose
    # tag names an incarnation that is gone: it leaked for good. Now the sender's reclaim frees it
    # (entries stamped in the epoch before the ring went down), or, if the destination's id is
    # claimed first, the claim does (every slot still carrying the old incarnation's tag).
    import struct

    from shmfabric.core.region import L

    fab = harness.create("late", max_nodes=8, ring_size=64, networks=[{"mtu": 1500, "slots": 512}])
    sink = fab.attach("sink")
    sink_id, sink_tag = sink.id, sink._port.tag
    w = harness.worker("attach_hold", fab.name, "s")
    sid = w.read()["id"]
    pool = _Pool(fab)
    s_tag = ((fab.region.node_entry(sid)["gen"] & 0xFFFF) << 16) | (sid + 1)
    slot = pool.owned_by(s_tag)[0]
    lay, mm = fab.region.layout, fab.region.mm
    ring = lay.off_rings + (sid * lay.max_nodes + sink_id) * lay.ring_stride
    up_epoch = struct.unpack_from("<I", mm, ring + L["sf_ring.down"])[0]
    sink.detach()  # its reclaim's owner scan: the slot is still the sender's
    head = struct.unpack_from("<I", mm, ring + L["sf_ring.head"])[0]
    stamp = (((head >> 6) & 7) << 1) | ((up_epoch & 0xFFF) << 4)  # desc_stamp, ring of 64
    desc = ring + L["sf_ring.desc"] + (head & 63) * L["sizeof.desc"]
    struct.pack_into("<IIHHI", mm, desc, slot, 114, 0, stamp, 0)  # written past the head...
    pool._u32(pool.off_owner, slot, sink_tag)  # ...and tagged for the sink, which is gone: killed here
    if order == "destination-back-first":
        sink = fab.attach("sink")
        assert sink.id == sink_id
    w.kill9()
    assert wait_until(lambda: fab.node_id("s") is None and sid not in fab.pool_audit()["held"], 5.0)
    if order == "destination-back-first":
        sink.detach()
    a = assert_all_free(fab)  # nothing left under a gone incarnation's tag
    assert not a["orphaned"], a
