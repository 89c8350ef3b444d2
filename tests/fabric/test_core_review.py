"""Misuse and recovery of the compiled core found by a review: out-of-range arguments, corrupt
shared fields, timeouts, a detach racing a blocked thread, views outliving a detach, a reclaimer
or a tape writer that dies or stops half-way, fork, and a node reclaimed while it still ran."""
from __future__ import annotations

import math
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import warnings

import pytest

from shmfabric.core import liveness, native
from shmfabric.core.region import L
from shmfabric.fabric import (
    FabricError,
    FrameTooLargeError,
    NodeReclaimedError,
    ReleasedFrameError,
    TapeBusyError,
    UnknownDestinationError,
)

from .conftest import assert_all_free, assert_conserved, wait_until

pytestmark = pytest.mark.timeout(30)


def drain(node) -> list[bytes]:
    got = []
    while True:
        with node.recv_batch(1024, timeout=0) as b:
            if not len(b) and b.control is None:
                return got
            got.extend(f.tobytes() for f in b)


# -- argument ranges ------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [2**32, -(2**32), 2**63, 2**64, -(2**70)])
def test_destination_ids_beyond_32_bits_are_unknown_not_wrapped(fab, bad):
    # (uint32_t)dst sent id 2^32 + k to node k
    a, b = fab.attach("a"), fab.attach("b")
    dst = bad + b.id
    with pytest.raises(UnknownDestinationError):
        a.send(dst, b"x")
    with pytest.raises(UnknownDestinationError):
        a.send_batch(dst, [b"x"])
    buf = a.alloc()
    with pytest.raises(UnknownDestinationError):
        a.send_buffer(dst, buf, 1)
    del buf
    assert a.send_batch(b.id, [b"f"] * 3) == 3
    with b.recv_batch(16, timeout=1) as bt:
        assert len(bt) == 3
        with pytest.raises(UnknownDestinationError):
            b.forward(bad + a.id, bt[0])
        with pytest.raises(UnknownDestinationError):
            b.forward_batch(bad + a.id, bt)
        with pytest.raises(UnknownDestinationError):
            b.forward_where(bad + a.id, bt, b"\0\0\0", 0)
    assert drain(a) == [] and drain(b) == []
    assert_conserved(fab)


def test_integer_arguments_are_range_checked_not_truncated(fab):
    a, b = fab.attach("a"), fab.attach("b")
    for kw in ({"ethertype": 0x12345}, {"ethertype": -1}, {"meta": -1}, {"meta": 2**32}):
        with pytest.raises(ValueError):
            a.send(b.id, b"x", **kw)
        with pytest.raises(ValueError):
            a.send_batch(b.id, [b"x"], **kw)
    with pytest.raises(ValueError):
        a.send_batch(b.id, [b"x"], incarnation=2**32)
    buf = a.alloc()
    with pytest.raises(FrameTooLargeError):
        a.send_buffer(b.id, buf, 2**32 + 5)  # was sent as 5 bytes
    with pytest.raises(ValueError):
        a.send_buffer(b.id, buf, -1)
    with pytest.raises(ValueError):
        a.send_buffer(b.id, buf, 5, ethertype=0x10000)
    with pytest.raises(ValueError):
        b.recv_batch(2**32 + 5, timeout=0)
    assert drain(b) == []
    # the limits themselves are fine and arrive as given
    assert a.send(b.id, b"x", ethertype=0xFFFF, meta=2**32 - 1)
    assert a.send_buffer(b.id, buf, 5, ethertype=0, meta=7)
    with b.recv_batch(16, timeout=1) as bt:
        assert [(f.ethertype, f.meta, len(f)) for f in bt] == [(0xFFFF, 2**32 - 1, 1), (0, 7, 5)]
    a.send(b.id, b"y")
    with b.recv_batch(16, timeout=1) as bt:
        with pytest.raises(ValueError):
            b.forward_where(a.id, bt, b"\0", 256)  # was compared as code 0
        assert len(bt) == 1 and not bt[0].copied
    assert drain(a) == []
    assert_conserved(fab)


def test_set_mcast_refuses_groups_that_do_not_exist(harness):
    fab = harness.create("mcast", max_nodes=4, n_mcast=2, networks=[{"mtu": 1500, "slots": 256}])
    a = fab.attach("a")
    for mask in ((1 << 64) - 1, 1 << 2, 1 << 63):
        with pytest.raises(ValueError, match="do not exist"):
            a._port.set_mcast(mask)
    a._port.set_mcast(0b11)
    a.recv_batch(16, timeout=0).release()


_CORRUPT_MASK = r"""
import struct, sys
from shmfabric.fabric import Fabric
from shmfabric.core.region import L
fab = Fabric.open(sys.argv[1])
a, b = fab.attach("a"), fab.attach("b")
off = fab.region.layout.off_nodes + a.id * fab.region.layout.node_size + L["sf_node.mcast_mask"]
struct.pack_into("<Q", fab.region.mm, off, (1 << 64) - 1)  # any process can write the region
for _ in range(3):
    a.recv_batch(16, timeout=0.01).release()
b.broadcast(b"still works")
with a.recv_batch(16, timeout=1) as bt:
    print([f.tobytes() for f in bt])
"""


def test_a_corrupt_multicast_mask_in_the_region_is_ignored_not_followed(harness):
    # bits past n_mcast made fill_batch read tapes beyond the tape area and write tape_cursor
    # past its array (SIGSEGV); run in a child so a crash fails the test, not the run
    fab = harness.create("mcastc", max_nodes=4, n_mcast=0, networks=[{"mtu": 1500, "slots": 256}])
    r = subprocess.run([sys.executable, "-c", _CORRUPT_MASK, fab.name], capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[b'still works']"


# -- timeouts ------------------------------------------------------------------------------------

@pytest.mark.parametrize("timeout", [math.inf, 1e10, 1e300])
def test_an_infinite_or_huge_timeout_waits_for_frames(fab, timeout):
    # t * 1e9 overflowed int64: the wait ended after one 0.2 s slice, empty
    a, b = fab.attach("a"), fab.attach("b")
    a.set_wait_mode("block")
    go = threading.Event()

    def later() -> None:
        go.wait(5)
        # well past one 0.2 s slice: a receive that gave up after one slice has returned by now
        time.sleep(0.6)
        b.send(a.id, b"late")

    t = threading.Thread(target=later)
    t.start()
    go.set()
    with a.recv_batch(16, timeout=timeout) as bt:
        assert [f.tobytes() for f in bt] == [b"late"]
    t.join()
    t = threading.Thread(target=later)
    t.start()
    assert a.wait(timeout) is True
    t.join()


def test_a_nan_timeout_is_refused(fab):
    a = fab.attach("a")
    with pytest.raises(ValueError, match="NaN"):
        a.recv_batch(timeout=math.nan)
    with pytest.raises(ValueError, match="NaN"):
        a.wait(math.nan)


# -- detach racing other threads -------------------------------------------------------------------

@pytest.mark.parametrize("how", ["recv_batch", "wait"])
def test_detach_wakes_a_thread_blocked_on_the_node_and_leaves_the_entry_alone(fab, how):
    # the blocked thread kept waiting on the id, then took the next incarnation's frames and
    # left its `waiting` count at 2^32 - 1
    a, b = fab.attach("a"), fab.attach("b")
    a.set_wait_mode("block")
    drain(a)  # b's hello
    res = {}
    started = threading.Event()

    def rx() -> None:
        started.set()
        try:
            if how == "recv_batch":
                res["got"] = len(a._port.recv_batch(64, 10.0))
            else:
                # a's own BYE (written just before the close) may make a wait return True: the
                # next one must then be refused
                while a._port.wait(10.0):
                    pass
                res["got"] = False
        except FabricError as e:
            res["error"] = str(e)

    th = threading.Thread(target=rx)
    th.start()
    started.wait(5)
    wait_until(lambda: fab.region.node_entry(a.id)["waiting"] == 1, 5)
    old = a.id
    a.detach()
    th.join(timeout=5)  # 10 s timeout: still blocked here without the fix
    assert not th.is_alive()
    assert "detached" in res.get("error", ""), res
    new = fab.attach("new")
    assert new.id == old
    assert fab.region.node_entry(new.id)["waiting"] == 0
    assert b.send(new.id, b"for the new node")
    assert new.recv(timeout=2)[2] == b"for the new node"
    new.detach(), b.detach()
    assert_all_free(fab)


def test_detach_wakes_a_thread_waiting_for_a_tape_lock(harness):
    fab = harness.create("tapewait", max_nodes=4, networks=[{"mtu": 1500, "slots": 256}])
    a = fab.attach("a")
    h = harness.worker("hold_tape_lock", fab.name)
    assert h.read()["locked"] == 0
    res = {}

    def tx() -> None:
        try:
            a._port.tape_send(0, b"\xff" * 6 + a.mac + b"\x88\xb5" + b"x", 0, 20.0)
        except FabricError as e:
            res["error"] = str(e)

    th = threading.Thread(target=tx)
    th.start()
    time.sleep(0.1)  # (the test holds either way: blocked in the lock, or refused at once)
    with pytest.warns(RuntimeWarning, match="did not announce"):
        a.detach()  # its BYE cannot be written either
    th.join(timeout=5)  # the 20 s tape timeout would still run without the wake-up
    assert not th.is_alive()
    assert "detached" in res["error"], res
    h.kill9()
    assert_all_free(fab)


# -- views after detach --------------------------------------------------------------------------

def test_buffers_and_frame_views_cannot_write_slots_after_detach(harness):
    fab = harness.create("views", max_nodes=4, networks=[{"mtu": 1500, "slots": 64}])
    a, b, c = fab.attach("a"), fab.attach("b"), fab.attach("c")
    buf = b.alloc()
    b.detach()
    with pytest.raises(ReleasedFrameError):
        memoryview(buf)  # the slot went back to the pool with the detach
    # a view taken before: the detach is refused while it exists
    buf = c.alloc()
    mv = memoryview(buf)
    with pytest.raises(BufferError, match="memoryview"):
        c.detach()
    assert fab.node_id("c") == c.id
    mv[:3] = b"abc"
    mv.release()
    assert a.send(c.id, b"B" * 32)
    bt = c.recv_batch(8, timeout=1)
    pv = bt[0].payload
    with pytest.raises(BufferError, match="memoryview"):
        c.detach()
    assert bytes(pv[:4]) == b"BBBB"
    pv.release()
    c.detach()
    with pytest.raises(ReleasedFrameError):
        bt[0].payload
    with pytest.raises(ReleasedFrameError):
        memoryview(buf)
    bt.release()
    del buf
    a.detach()
    assert_all_free(fab)


# -- a reclaimer or a tape writer that dies or stops half-way ---------------------------------------

def test_an_entry_left_in_reclaim_by_a_killed_reclaimer_is_reclaimed_again(harness):
    fab = harness.create("reclaim2", max_nodes=4, networks=[{"mtu": 1500, "slots": 256}])
    victim = harness.worker("attach_hold", fab.name, "victim")
    vid = victim.read()["id"]
    assert vid in fab.pool_audit()["held"]
    reclaimer = harness.worker("reclaim_and_die", fab.name, "victim")
    assert reclaimer.read()["locked"] == 0  # our watchdog's reclaims of the victim find it busy
    victim.kill9()
    reclaimer.write("go")
    got = reclaimer.read()
    assert got["id"] == vid and got["cas"] and got["state"] == native.NODE_RECLAIM
    reclaimer.kill9()  # killed inside its reclaim: the entry stays RECLAIM, the slots tagged
    # this process's watchdog (every beat) finishes the reclaim; so does any liveness.sweep
    assert wait_until(lambda: fab.region.core.node_state(vid) == native.NODE_FREE, 5), fab.nodes()
    liveness.sweep(fab.region)
    assert vid not in fab.pool_audit()["held"]
    assert_all_free(fab)
    assert fab.attach("victim").id >= 0  # the name and the entry are usable again


def test_a_stopped_tape_writer_makes_broadcasts_fail_not_attach_and_detach_hang(harness):
    fab = harness.create("tapestop", max_nodes=4, networks=[{"mtu": 1500, "slots": 256}])
    a = fab.attach("a")
    h = harness.worker("hold_tape_lock", fab.name)
    assert h.read()["locked"] == 0
    os.kill(h.pid, signal.SIGSTOP)
    try:
        with pytest.raises(TapeBusyError, match="held"):
            a.broadcast(b"x")
        with pytest.raises(TimeoutError):  # TapeBusyError is one too
            a._port.tape_send(0, b"\xff" * 6 + a.mac + b"\x88\xb5", 0, 0.05)
        with pytest.warns(RuntimeWarning, match="did not announce"):
            b = fab.attach("b")  # HELLO skipped: the node table still names it
        assert fab.node_id("b") == b.id and a.peers() == {"b": b.id}
        assert a.send(b.id, b"unicast is unaffected")
        assert b.recv(timeout=1)[2] == b"unicast is unaffected"
        with pytest.warns(RuntimeWarning, match="did not announce"):
            b.detach()
        assert fab.node_id("b") is None
    finally:
        os.kill(h.pid, signal.SIGCONT)
    h.kill9()  # the lock comes back EOWNERDEAD to its next taker, consistent
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = fab.attach("c")
        a.broadcast(b"after")
    assert drain(c) == [b"after"]


# -- fork ------------------------------------------------------------------------------------------

def test_a_forked_child_detaches_the_node_it_attached(fab):
    # detach compared the pid with the Fabric's creator, so in a child it only closed the port
    parent = fab.attach("parent")
    r, w = os.pipe()
    r2, w2 = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (child)
        code = 1
        try:
            os.close(r)
            os.close(w2)
            kid = fab.attach("kid")
            kid.detach()
            os.write(w, b"gone" if fab.node_id("kid") is None else b"still up")
            kid2 = fab.attach("kid2")  # left to Fabric.close in the child
            os.write(w, b" %d" % kid2.id)
            fab.close()
            os.write(w, b" closed")
            os.read(r2, 1)  # the parent has looked
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    os.close(r2)
    try:
        out = b""
        while not out.endswith(b"closed"):
            chunk = os.read(r, 100)
            if not chunk:
                break
            out += chunk
        # the child is still alive: only its detach can have freed the entries
        assert out.split()[0] == b"gone", out
        assert fab.node_id("kid") is None and fab.node_id("kid2") is None
        assert fab.node_id("parent") == parent.id
    finally:
        os.write(w2, b"x")
        _, status = os.waitpid(pid, 0)
    assert status == 0
    assert_conserved(fab)


# -- a node reclaimed while it still ran ----------------------------------------------------------

def test_a_node_reclaimed_while_stopped_finds_out_and_never_uses_its_old_slots(harness):
    # In another pid namespace only the heartbeat tells a node is alive: one stopped past
    # STALE_NS is reclaimed while it runs. Here the reclaim is done directly, as a peer's
    # watchdog would; when the node goes on, every hot-path entry must refuse.
    fab = harness.create("reclaimed", max_nodes=4, networks=[{"mtu": 1500, "slots": 256}])
    x, z = fab.attach("x"), fab.attach("z")
    assert x.send_batch(z.id, [b"warm"] * 4) == 4  # x's cache holds slots now
    drain(z)
    bt = None
    x_buf = x.alloc()
    z.send(x.id, b"to x")
    bt = x.recv_batch(8, timeout=1)
    assert len(bt) == 1
    assert fab.region.core.reclaim(x.id, native.NODE_UP, x._gen) > 0
    y = fab.attach("y")  # takes x's id and slots
    assert y.id == x.id
    y_bufs = []
    while True:
        try:
            y_bufs.append(y.alloc())
        except MemoryError:
            break
    before = fab.pool_audit()
    calls = [
        lambda: x.send(z.id, b"X"),
        lambda: x.send_batch(z.id, [b"X"] * 4),
        lambda: x.alloc(),
        lambda: x.send_buffer(z.id, x_buf, 4),
        lambda: x.forward(z.id, bt[0]),
        lambda: x.forward_batch(z.id, bt),
        lambda: x.forward_where(z.id, bt, b"\0", 0),
        lambda: x.recv_batch(8, timeout=0),
        lambda: x.wait(0),
        lambda: x.broadcast(b"X"),
        lambda: x.join(0),
    ]
    for call in calls:
        with pytest.raises(NodeReclaimedError, match="attach again"):
            call()
    with pytest.raises(ReleasedFrameError):
        memoryview(x_buf)
    assert x._port.reclaimed
    x._port.heartbeat()  # must not refresh y's entry (no error: the watchdog beats every node)
    bt.release()
    del x_buf  # neither gives a slot back: the reclaim did
    x.detach()  # leaves y alone
    assert fab.node_id("y") == y.id
    assert fab.pool_audit() == before
    assert drain(z) == []
    del y_bufs
    y.detach(), z.detach()
    assert_all_free(fab)


# -- second review: a wait that outlives its node, detach and close half-way, interrupts ------------

def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")


@pytest.mark.parametrize("mode,how", [("block", "recv"), ("poll", "recv"), ("adaptive", "recv"), ("block", "wait"),
                                      ("poll", "wait"), ("block", "notifier")])
def test_a_waiter_whose_node_is_reclaimed_while_stopped_leaves_the_next_node_alone(harness, mode, how):
    # A process waiting on node x is stopped; x is reclaimed (as a peer's watchdog does when only
    # the heartbeat tells, across pid namespaces), y attaches on the same id and z sends to y.
    # Resumed, the waiter took y's frame (y got nothing), and its count left y's `waiting` at
    # 2^32 - 1 (so every send to y rang the doorbell for ever); the notifier thread went on
    # reading y's rings.
    fab = harness.create("waitrecl", max_nodes=4, networks=[{"mtu": 1500, "slots": 256}])
    z = fab.attach("z")  # first: its hello would end the worker's wait
    w = harness.worker("wait_reclaimed", fab.name, "x", mode, how)
    info = w.read()
    if mode != "poll":  # asleep on the doorbell (a poller never counts itself)
        assert wait_until(lambda: fab.region.node_entry(info["id"])["waiting"] == 1, 5)
    time.sleep(0.2)
    os.kill(w.pid, signal.SIGSTOP)
    try:
        assert wait_until(lambda: _stopped(w.pid), 5)
        assert fab.region.core.reclaim(info["id"], native.NODE_UP, info["gen"]) >= 0
        y = fab.attach("y")
        assert y.id == info["id"]
        assert z.send(y.id, b"for y only")
    finally:
        os.kill(w.pid, signal.SIGCONT)
    if how == "notifier":
        time.sleep(0.5)  # its 0.1 s slice ends: it must leave y's entry alone
        assert fab.region.node_entry(y.id)["waiting"] == 0
        w.write("go")
    res = w.read()
    assert res == {"error": "NodeReclaimedError"} or (how == "notifier" and res.get("error") == "NodeReclaimedError"), res
    if how == "notifier":
        assert res["readable"]  # the wake-up thread left, and said so through the fd
    assert fab.region.node_entry(y.id)["waiting"] == 0
    assert y.recv(timeout=2)[2] == b"for y only"
    assert fab.region.node_entry(y.id)["waiting"] == 0
    w.kill9()
    y.detach(), z.detach()
    assert_all_free(fab)


@pytest.mark.parametrize("how", ["recv_batch", "wait"])
def test_a_thread_waiting_when_its_node_is_reclaimed_is_refused_and_detach_waits_for_it(fab, how):
    # the same in one process (the waiter wakes at the end of a slice, or at the doorbell a
    # refusal in another thread rings); the detach of the reclaimed node returns once it left
    x, z = fab.attach("x"), fab.attach("z")
    x.set_wait_mode("block")
    drain(x)
    res = {}

    def rx() -> None:
        try:
            if how == "recv_batch":
                res["got"] = [f.tobytes() for f in x._port.recv_batch(64, math.inf)]
            else:
                res["got"] = x._port.wait(math.inf)
        except FabricError as e:
            res["error"] = e

    th = threading.Thread(target=rx)
    th.start()
    assert wait_until(lambda: fab.region.node_entry(x.id)["waiting"] == 1, 5)
    assert fab.region.core.reclaim(x.id, native.NODE_UP, x._gen) >= 0
    y = fab.attach("y")
    assert y.id == x.id
    assert z.send(y.id, b"for y only")
    th.join(timeout=5)
    assert not th.is_alive()
    assert isinstance(res.get("error"), NodeReclaimedError), res
    assert fab.region.node_entry(y.id)["waiting"] == 0
    assert y.recv(timeout=2)[2] == b"for y only"
    # a second waiter, then the reclaim is found by another call: the detach waits for it
    x2, x2_gen = fab.attach("x2"), None
    x2.set_wait_mode("block")
    x2_gen = x2._gen
    drain(x2)
    th2 = threading.Thread(target=lambda: res.update(e2=pytest.raises(NodeReclaimedError, x2._port.recv_batch, 8, 30.0)))
    th2.start()
    assert wait_until(lambda: fab.region.node_entry(x2.id)["waiting"] == 1, 5)
    assert fab.region.core.reclaim(x2.id, native.NODE_UP, x2_gen) >= 0
    with pytest.raises(NodeReclaimedError):
        x2.send(z.id, b"x")
    t0 = time.monotonic()
    x2.detach()
    th2.join(timeout=5)
    assert not th2.is_alive() and time.monotonic() - t0 < 1.0
    assert fab.region.node_entry(x2.id)["waiting"] == 0
    x.detach(), y.detach(), z.detach()
    assert_all_free(fab)


def test_a_view_taken_while_detach_writes_its_bye_cannot_stop_the_detach_half_way(harness):
    # detach checked for views, left the node table and wrote BYE (waiting for the tape lock
    # without the GIL); a view taken meanwhile made the close refuse: BufferError, the node
    # half-detached, unknown to the watchdog and never reclaimed
    fab = harness.create("detrace", max_nodes=4, networks=[{"mtu": 1500, "slots": 256}])
    a, b = fab.attach("a"), fab.attach("b")
    h = harness.worker("hold_tape_lock", fab.name)
    assert h.read()["locked"] == 0  # the BYE waits ANNOUNCE_LOCK_WAIT for it
    buf = a.alloc()
    got = {}

    def grab() -> None:
        time.sleep(0.05)
        try:
            got["view"] = memoryview(buf)
        except ReleasedFrameError as e:
            got["error"] = e

    th = threading.Thread(target=grab)
    th.start()
    with pytest.warns(RuntimeWarning, match="did not announce"):
        a.detach()
    th.join()
    assert "error" in got, got  # the view is refused once the detach is under way
    assert fab.node_id("a") is None and a.id not in fab._nodes
    del buf
    h.kill9()
    b.detach()
    assert_all_free(fab)


def test_fabric_close_detaches_every_node_it_can_and_names_the_ones_left(harness):
    # close stopped at the first node with a view: the nodes after it stayed attached; now they
    # are detached, and the one left keeps its heartbeat until a second close
    fab = harness.create("closeviews", max_nodes=4, networks=[{"mtu": 1500, "slots": 256}])
    a, b, c = fab.attach("a"), fab.attach("b"), fab.attach("c")
    buf = b.alloc()
    mv = memoryview(buf)
    with pytest.raises(BufferError, match="'b'"):
        fab.close()
    assert [n["name"] for n in fab.nodes()] == ["b"]
    assert fab._watchdog._thread.is_alive()
    beat = fab.region.node_entry(b.id)["heartbeat_ns"]
    assert wait_until(lambda: fab.region.node_entry(b.id)["heartbeat_ns"] > beat, 5)
    mv.release()
    del buf
    region = fab.region
    fab.close()
    assert fab._region is None and not fab._watchdog._thread.is_alive()
    f2 = harness.create("closeviews2")  # (the first one's file is gone with the harness)
    f2.close()
    del region


def test_a_tape_lock_wait_is_interrupted_by_a_signal(harness):
    fab = harness.create("tapesig", max_nodes=4, networks=[{"mtu": 1500, "slots": 256}])
    a = fab.attach("a")
    h = harness.worker("hold_tape_lock", fab.name)
    assert h.read()["locked"] == 0

    class Interrupted(Exception):
        pass

    def handler(signum, frame):
        raise Interrupted

    old = signal.signal(signal.SIGUSR1, handler)
    try:
        timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGUSR1))
        timer.start()
        t0 = time.monotonic()
        with pytest.raises(Interrupted):
            a._port.tape_send(0, b"\xff" * 6 + a.mac + b"\x88\xb5" + b"x", 0, 10.0)
        assert time.monotonic() - t0 < 2.0  # not the 10 s of the lock timeout
        timer.join()
    finally:
        signal.signal(signal.SIGUSR1, old)
    h.kill9()
    a.broadcast(b"after")  # the lock comes back EOWNERDEAD: consistent, usable


@pytest.mark.parametrize("mode", ["poll", "block", "adaptive"])
def test_timeout_none_returns_after_one_quiet_slice_in_every_wait_mode(fab, mode):
    # in poll mode recv_batch(timeout=None) and wait(None) spun for ever (no signal was seen)
    a, b = fab.attach("a"), fab.attach("b")
    a.set_wait_mode(mode)
    drain(a)
    for call in (lambda: len(a._port.recv_batch(8, None)), lambda: a._port.wait(None)):
        res = {}
        th = threading.Thread(target=lambda: res.update(r=call()))
        t0 = time.monotonic()
        th.start()
        th.join(timeout=3)
        if th.is_alive():  # unblock it (a frame ends a poll), then fail
            b.send(a.id, b"x")
            th.join(timeout=5)
            pytest.fail(f"{mode}: a wait with timeout=None did not return")
        assert res["r"] in (0, False) and time.monotonic() - t0 < 1.5


def test_bools_are_not_ints_and_a_huge_int_timeout_is_infinite(fab):
    a, b = fab.attach("a"), fab.attach("b")
    frame = b"\xff" * 6 + a.mac + b"\x88\xb5" + b"x"
    with pytest.raises(TypeError, match="tape"):
        a._port.tape_send(True, frame)  # wrote to tape 1
    with pytest.raises(TypeError, match="flags"):
        a._port.tape_send(0, frame, True)
    with pytest.raises(TypeError, match="ethertype"):
        a.send(b.id, b"x", ethertype=True)
    with pytest.raises(TypeError, match="destination"):
        a.send(True, b"x")
    with pytest.raises(ValueError, match="3600"):
        a._port.tape_send(0, frame, 0, 10**400)
    drain(a)
    t = threading.Timer(0.3, lambda: b.send(a.id, b"late"))
    t.start()
    with a.recv_batch(16, timeout=10**400) as bt:  # OverflowError before
        assert [f.tobytes() for f in bt] == [b"late"]
    t.join()
    with a.recv_batch(16, timeout=-(10**400)) as bt:
        assert len(bt) == 0


def test_an_empty_frame_is_refused_on_a_tape_and_never_forwarded_into_a_ring(fab):
    # An empty tape frame forwarded into a ring became an entry of len 0, which a dead sender's
    # reclaim takes for "already given back": forwarded and never published, its slot leaked.
    # tape_send refuses frames shorter than their header (as a raw send does); an empty entry
    # read from a corrupt tape is dropped at the forward, its slot never taken.
    a, b, c = fab.attach("a"), fab.attach("b"), fab.attach("c")
    for n in (a, b, c):
        drain(n)
    with pytest.raises(FrameTooLargeError, match="shorter than the 14-byte header"):
        a.flood(b"")
    with pytest.raises(FrameTooLargeError, match="shorter than the 14-byte header"):
        a.flood(b"\xff" * 13)
    lay, mm = fab.region.layout, fab.region.mm
    tape = lay.off_tapes  # the broadcast tape
    head = struct.unpack_from("<Q", mm, tape + L["sf_tape.head"])[0]
    a.flood(b"\xff" * 6 + a.mac + b"\x88\xb5" + b"empty")
    stride = (L["sizeof.tape_entry"] + lay.tape_entry_size + 63) // 64 * 64
    entry = tape + L["sf_tape.entries"] + (head % lay.tape_entries) * stride
    struct.pack_into("<I", mm, entry + L["sf_tape_entry.len"], 0)  # a corrupt entry: len 0
    free = fab.pool_audit()["free"]
    drops = b.stats()["tx_drops"]
    with b.recv_batch(16, timeout=1.0) as batch:
        assert len(batch) == 1 and len(bytes(batch[0])) == 0
        assert b.forward_batch(c.id, batch) == 0
    assert b.stats()["tx_drops"] == drops + 1
    assert fab.pool_audit()["free"] == free  # no slot was taken for it
    with c.recv_batch(16, timeout=0.2) as got:  # c reads the flood off the tape itself...
        assert [f.copied for f in got] == [True]  # ...and nothing from b's ring
