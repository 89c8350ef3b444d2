"""A sender killed while it writes a ring descriptor leaves nothing that its reclaim can take for
an unpublished frame but the frame it was writing.

The reclaim of a dead sender frees the frames it wrote past the ring head and never published
(`take_unpublished`), trusting an entry whose stamp (ring lap and receiver epoch, in `flags`) is
this lap's. The stamp must therefore be the descriptor's last field written: the compiler once
emitted the `flags` store before one store of `slot` and `len`, and a sender killed between the two
left an entry with this lap's stamp and the slot of the frame written there one lap earlier, which
the receiver still held. The reclaim freed that slot, the receiver freed it again: a double free
(the free stack held a slot twice; seen once in CI as a free count one too high).

Here a hardware watchpoint (x86 debug registers, through ptrace) stops the sender right after the
store to the stamp of the next entry, in the compiled extension as it is built, and it is killed
there. Needs root (or ptrace rights over a child) and x86-64."""
from __future__ import annotations

import ctypes
import os
import platform
import signal
import struct
import threading
import time

import pytest

from shmfabric.core.region import L, region_path

from .conftest import wait_until

PTRACE_PEEKUSER, PTRACE_POKEUSER, PTRACE_CONT, PTRACE_ATTACH = 3, 6, 7, 16
DEBUGREG = 848  # offsetof(struct user, u_debugreg) on x86-64
WALL = 0x40000000
DESC_FLAGS = 10  # sf_desc: slot u32, len u32, pool u16, flags u16, meta u32

pytestmark = [
    pytest.mark.skipif(platform.machine() != "x86_64", reason="uses x86-64 debug registers"),
    pytest.mark.timeout(60),
]


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.restype = ctypes.c_long
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    return libc


def _mapped_at(pid: int, path: str) -> int:
    """Where `path` offset 0 is in process `pid`'s address space."""
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == path:
                start = int(fields[0].split("-")[0], 16)
                return start - int(fields[2], 16)
    raise AssertionError(f"{path} is not mapped in process {pid}")


def test_a_sender_killed_right_after_stamping_a_descriptor_has_written_its_slot_already(harness):
    ring_size = 1024
    fab = harness.create("dorder", max_nodes=8, ring_size=ring_size, networks=[{"mtu": 1500, "slots": 4096}])
    rx = fab.attach("rx")
    w = harness.worker("blaster", fab.name, "tx", "rx", 60.0)
    tx = w.read()["id"]
    held, count, stop = [], [0], threading.Event()

    def hold_everything() -> None:  # the receiver keeps every frame: one lap back, each slot is its own
        while not stop.is_set():
            b = rx.recv_batch(256, timeout=0.01)
            held.append(b)
            count[0] += len(b)

    t = threading.Thread(target=hold_everything)
    t.start()
    libc = _libc()
    try:
        assert wait_until(lambda: count[0] >= ring_size + 100, 10, 0.001), count
        if libc.ptrace(PTRACE_ATTACH, w.pid, None, None) != 0:
            pytest.skip(f"cannot ptrace the sender: {os.strerror(ctypes.get_errno())}")
        _, st = os.waitpid(w.pid, WALL)
        assert os.WIFSTOPPED(st), st
        # the entry the sender writes next, and what it holds now (the previous lap's frame)
        lay, mm = fab.region.layout, fab.region.mm
        ring = lay.off_rings + (tx * lay.max_nodes + rx.id) * lay.ring_stride
        head = struct.unpack_from("<I", mm, ring + L["sf_ring.head"])[0]
        desc = ring + L["sf_ring.desc"] + (head & (ring_size - 1)) * L["sizeof.desc"]
        stale_slot, stale_len = struct.unpack_from("<II", mm, desc)
        assert stale_len, "the entry was never written: the sender did not lap the ring"
        addr = _mapped_at(w.pid, str(region_path(fab.name))) + desc + DESC_FLAGS
        # DR0: the stamp's two bytes; DR7: local enable 0, break on write, length 2
        assert libc.ptrace(PTRACE_POKEUSER, w.pid, ctypes.c_void_p(DEBUGREG), ctypes.c_void_p(addr)) == 0
        dr7 = 1 | (0b01 << 16) | (0b01 << 18)
        if libc.ptrace(PTRACE_POKEUSER, w.pid, ctypes.c_void_p(DEBUGREG + 7 * 8), ctypes.c_void_p(dr7)) != 0:
            pytest.skip(f"cannot set a hardware watchpoint here: {os.strerror(ctypes.get_errno())}")
        deliver = 0
        while True:
            assert libc.ptrace(PTRACE_CONT, w.pid, None, ctypes.c_void_p(deliver)) == 0
            _, st = os.waitpid(w.pid, WALL)
            assert os.WIFSTOPPED(st), f"the sender ended before it wrote the entry ({st})"
            if os.WSTOPSIG(st) == signal.SIGTRAP:
                break
            deliver = os.WSTOPSIG(st)  # (another signal: handed on)
        # stopped right after the stamp's store: the rest of the entry must be this frame's
        slot, length = struct.unpack_from("<II", mm, desc)
        stamped = struct.unpack_from("<H", mm, desc + DESC_FLAGS)[0]
        os.kill(w.pid, signal.SIGKILL)
        w.proc.wait(timeout=10)
    finally:
        stop.set()
        t.join()
    assert slot != stale_slot, (f"the entry was stamped ({stamped:#x}) while it still named the slot of the frame "
                                f"one lap back ({stale_slot}, held by the receiver)")
    assert wait_until(lambda: fab.node_id("tx") is None and tx not in fab.pool_audit()["held"], 5.0)
    for b in held:
        b.release()
    rx.detach()
    assert wait_until(lambda: fab.sweep() >= 0, 15.0)
    a = fab.pool_audit()
    # nothing freed twice: the stack holds every slot once and counts them right
    assert a["stack_count"] == a["on_stack"] == a["free"] == a["total"] and not a["held"] and not a["orphaned"], a
