"""A sender stopped inside a send, reclaimed meanwhile (as a node in another pid namespace is, by
its heartbeat), then resumed, publishes nothing its reclaim gave back; and a receiver reads no
ring entry that names no slot as some slot.

The reclaim frees the frames the sender wrote and had not published (`take_unpublished`) and
gives their ring entries back (slot UINT32_MAX, len 0). A resumed sender then either published
those entries (its publish CAS still matched: the receiver read them as slot 0, once per entry,
and later handed slot 0 out to several buffers at once) or, the destination restarted meanwhile,
took them back through `take_back`, which used the given-back slot number as an index (a SIGSEGV,
or a write into the slot area of a region past 16 GiB). Now the reclaim moves the ring's epoch on
(the publish fails), `take_back` skips given-back entries, and receivers skip entries naming no
slot (counted as `rx_bad`).

The sender is stopped by a hardware write watchpoint (x86 debug registers, through ptrace) on
the owner word of the slot it sends: right after it tagged the slot for the receiver, its last
store before the publish. Needs root (or ptrace rights over a child) and x86-64."""
from __future__ import annotations

import ctypes
import os
import platform
import signal
import struct

import pytest

from shmfabric.core import native
from shmfabric.core.region import L, region_path

from .conftest import assert_all_free, assert_every_slot_once, wait_until
from .test_desc_order import DEBUGREG, PTRACE_ATTACH, PTRACE_CONT, PTRACE_POKEUSER, WALL, _libc, _mapped_at

PTRACE_DETACH = 17

pytestmark = [
    pytest.mark.skipif(platform.machine() != "x86_64", reason="uses x86-64 debug registers"),
    pytest.mark.timeout(60),
]


@pytest.mark.parametrize("receiver", ["stays", "restarts"])
def test_a_sender_reclaimed_while_stopped_inside_a_send_publishes_nothing_when_it_resumes(harness, receiver):
    fab = harness.create("zombie", max_nodes=8, ring_size=64, networks=[{"mtu": 1500, "slots": 512}])
    rx = fab.attach("rx")
    w = harness.worker("send_buffer_on_go", fab.name, "tx", "rx")
    ready = w.read()
    tx, owner_off = ready["id"], ready["owner_offset"]
    gen = fab.region.node_entry(tx)["gen"]
    libc = _libc()
    if libc.ptrace(PTRACE_ATTACH, w.pid, None, None) != 0:
        pytest.skip(f"cannot ptrace the sender: {os.strerror(ctypes.get_errno())}")
    _, st = os.waitpid(w.pid, WALL)
    assert os.WIFSTOPPED(st), st
    addr = _mapped_at(w.pid, str(region_path(fab.name))) + owner_off
    # DR0: the slot's owner word; DR7: local enable 0, break on write, length 4
    assert libc.ptrace(PTRACE_POKEUSER, w.pid, ctypes.c_void_p(DEBUGREG), ctypes.c_void_p(addr)) == 0
    dr7 = 1 | (0b01 << 16) | (0b11 << 18)
    if libc.ptrace(PTRACE_POKEUSER, w.pid, ctypes.c_void_p(DEBUGREG + 7 * 8), ctypes.c_void_p(dr7)) != 0:
        pytest.skip(f"cannot set a hardware watchpoint here: {os.strerror(ctypes.get_errno())}")
    assert libc.ptrace(PTRACE_CONT, w.pid, None, None) == 0
    w.write("go")
    deliver = 0
    while True:
        _, st = os.waitpid(w.pid, WALL)
        assert os.WIFSTOPPED(st), f"the sender ended before it tagged the slot ({st})"
        if os.WSTOPSIG(st) == signal.SIGTRAP:
            break
        deliver = os.WSTOPSIG(st)
        assert libc.ptrace(PTRACE_CONT, w.pid, None, ctypes.c_void_p(deliver)) == 0
    # stopped right after tagging the slot for rx, before publishing: its watchdog (in another pid
    # namespace only the heartbeat tells) reclaims it
    assert fab.region.core.reclaim(tx, native.NODE_UP, gen) > 0
    if receiver == "restarts":  # the epoch moves on anyway: the resumed sender takes its frame back
        rx.detach()
        rx = fab.attach("rx")
    assert libc.ptrace(PTRACE_POKEUSER, w.pid, ctypes.c_void_p(DEBUGREG + 7 * 8), ctypes.c_void_p(0)) == 0
    assert libc.ptrace(PTRACE_DETACH, w.pid, None, None) == 0
    w.read()  # (send_buffer says True: a publish that fails is a drop, as to a destination that left)
    assert w.proc.poll() is None, f"the resumed sender died ({w.proc.returncode})"
    with rx.recv_batch(64, timeout=0.2) as b:
        got = [(len(f), bytes(f.payload)[:5]) for f in b if not f.copied]
    assert got == [], f"the resumed sender published entries its reclaim gave back: {got}"
    w.finish()
    rx.recv_control()
    assert fab.pool_audit()["held"].get(rx.id, 0) == 0
    assert_every_slot_once(rx, 512)
    rx.detach()
    assert_all_free(fab)


def test_ring_entries_that_name_no_slot_are_skipped_and_counted_not_read_as_slot_zero(harness):
    fab = harness.create("badent", max_nodes=4, ring_size=64, networks=[{"mtu": 1500, "slots": 256}])
    a, b = fab.attach("a"), fab.attach("b")
    b.recv_control()
    assert a.send_batch(b.id, [b"one", b"two", b"three"]) == 3
    lay, mm = fab.region.layout, fab.region.mm
    ring = lay.off_rings + (a.id * lay.max_nodes + b.id) * lay.ring_stride
    tail = struct.unpack_from("<I", mm, ring + L["sf_ring.tail"])[0]
    entry = [ring + L["sf_ring.desc"] + ((tail + k) % 64) * L["sizeof.desc"] for k in range(3)]
    lost = [struct.unpack_from("<I", mm, e)[0] for e in entry[:2]]
    struct.pack_into("<II", mm, entry[0], 0xFFFFFFFF, 0)  # a given-back entry, published
    struct.pack_into("<I", mm, entry[1], 256 + 7)  # a slot past the pool (corrupt)
    with b.recv_batch(16, timeout=1.0) as got:
        assert [bytes(f.payload)[:5] for f in got] == [b"three"]
    assert b.stats()["rx_bad"] == 2
    # the two slots those entries named stay b's (tagged for it) until b leaves: never two owners
    held = fab.pool_audit()["held"][b.id]
    owner = lay.net_offsets[0][2]
    assert held >= 2 and all(struct.unpack_from("<I", mm, owner + 4 * s)[0] == b._port.tag for s in lost)
    assert_every_slot_once(a, 256 - held)
    a.detach(), b.detach()
    assert_all_free(fab)
