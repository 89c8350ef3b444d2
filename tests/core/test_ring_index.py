"""Index arithmetic of the SPSC rings: free-running uint32 head/tail, masked on access.

Two levels:
- a Python model of the C inline accessors `sf_ring_count` / `sf_ring_space` (fabric_layout.h),
  checked against a plain queue with hypothesis, including across the 2^32 wrap;
- the real ring in a real region, whose head and tail are set (while the ring is empty and idle)
  to values just below 2^32, then driven with random batch sizes so the C code itself crosses
  the wrap: every frame must come out once, in order, with its bytes, and `send_batch` must
  return exactly min(wanted, space).
"""
from __future__ import annotations

import struct
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from shmfabric.core.native import LAYOUT as L
from shmfabric.fabric import Fabric

pytestmark = pytest.mark.timeout(120)

M32 = 1 << 32


def ring_count(head: int, tail: int) -> int:
    """sf_ring_count: uint32_t head - tail."""
    return (head - tail) % M32


def ring_space(head: int, tail: int, size: int) -> int:
    """sf_ring_space: uint32_t size - (head - tail)."""
    return (size - ((head - tail) % M32)) % M32


u32 = st.integers(0, M32 - 1)
near_wrap = st.integers(M32 - 300, M32 - 1)
sizes = st.integers(1, 20).map(lambda e: 1 << e)


@given(tail=st.one_of(u32, near_wrap), size=sizes, data=st.data())
def test_count_and_space_for_any_fill_level(tail, size, data):
    n = data.draw(st.integers(0, size))
    head = (tail + n) % M32
    assert ring_count(head, tail) == n
    assert ring_space(head, tail, size) == size - n
    assert ring_count(head, tail) + ring_space(head, tail, size) == size
    # the live entries occupy distinct masked positions, so none overwrites another
    mask = size - 1
    live = {(tail + i) % M32 & mask for i in range(min(n, 4096))}
    assert len(live) == min(n, 4096)


@given(tail=st.one_of(u32, near_wrap), size=sizes, k=st.integers(0, 1 << 21))
def test_producer_never_overfills(tail, size, k):
    """The producer moves min(k, space); afterwards count <= size always."""
    head = tail
    moved = min(k, ring_space(head, tail, size))
    head = (head + moved) % M32
    assert ring_count(head, tail) == moved <= size
    assert ring_space(head, tail, size) == size - moved


def test_masking_is_consistent_across_the_wrap():
    # 2^32 is a multiple of every ring size, so position (i mod 2^32) & mask is continuous
    for size in (2, 8, 1024, 1 << 20):
        mask = size - 1
        assert ((M32 - 1) & mask) + 1 == size
        assert (M32 % M32) & mask == 0


class RingModel(RuleBasedStateMachine):
    """Random producer/consumer steps on the index model against a deque, starting near 2^32."""

    @initialize(start=st.one_of(near_wrap, u32), e=st.integers(1, 10))
    def setup(self, start, e):
        self.size = 1 << e
        self.head = self.tail = start
        self.q: deque[int] = deque()
        self.next = 0
        self.slots = [None] * self.size

    @rule(k=st.integers(0, 40))
    def produce(self, k):
        n = min(k, ring_space(self.head, self.tail, self.size))
        for _ in range(n):
            self.slots[self.head & (self.size - 1)] = self.next
            self.q.append(self.next)
            self.next += 1
            self.head = (self.head + 1) % M32

    @precondition(lambda self: hasattr(self, "q"))
    @rule(k=st.integers(0, 40))
    def consume(self, k):
        n = min(k, ring_count(self.head, self.tail))
        for _ in range(n):
            assert self.slots[self.tail & (self.size - 1)] == self.q.popleft()
            self.tail = (self.tail + 1) % M32

    @invariant()
    def agrees(self):
        if hasattr(self, "q"):
            assert ring_count(self.head, self.tail) == len(self.q) <= self.size
            assert ring_space(self.head, self.tail, self.size) == self.size - len(self.q)


TestRingModel = RingModel.TestCase
TestRingModel.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)


# -- the real ring across 2^32 -----------------------------------------------------------------------

def _ring_base(fab: Fabric, src: int, dst: int) -> int:
    lay = fab.region.layout
    return lay.off_rings + (src * lay.max_nodes + dst) * lay.ring_stride


def _set_indices(fab: Fabric, src: int, dst: int, value: int) -> None:
    """Set head = tail = value on an empty, idle ring (as if 2^32-ish frames had gone through)."""
    base = _ring_base(fab, src, dst)
    mm = fab.region.mm
    head, tail = struct.unpack_from("<I", mm, base + L["sf_ring.head"])[0], struct.unpack_from("<I", mm, base + L["sf_ring.tail"])[0]
    assert head == tail, "ring must be empty"
    struct.pack_into("<I", mm, base + L["sf_ring.tail"], value)
    struct.pack_into("<I", mm, base + L["sf_ring.head"], value)


def _raw_indices(fab: Fabric, src: int, dst: int) -> tuple[int, int]:
    base = _ring_base(fab, src, dst)
    mm = fab.region.mm
    return (struct.unpack_from("<I", mm, base + L["sf_ring.head"])[0],
            struct.unpack_from("<I", mm, base + L["sf_ring.tail"])[0])


@pytest.fixture(scope="module")
def wrap_fabric(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ring") / "wrap")
    fab = Fabric.create(path, max_nodes=2, ring_size=16, networks=[{"mtu": 1500, "slots": 1024}], n_mcast=0)
    a, b = fab.attach("a"), fab.attach("b")
    for n in (a, b, a, b):  # consume the hellos
        with n.recv_batch(64, timeout=0):
            pass
    yield fab, a, b
    fab.close()
    Fabric.destroy(path)


@settings(max_examples=60, deadline=None)
@given(start=st.one_of(st.integers(M32 - 40, M32 - 1), u32),
       ops=st.lists(st.tuples(st.sampled_from(["send", "recv"]), st.integers(1, 24)), min_size=1, max_size=40))
def test_real_ring_across_the_wrap(wrap_fabric, start, ops):
    fab, a, b = wrap_fabric
    size = 16
    _set_indices(fab, a.id, b.id, start)
    q: deque[bytes] = deque()
    seq = 0
    for op, k in ops:
        if op == "send":
            frames = [b"%08d" % (seq + i) * ((seq + i) % 5 + 1) for i in range(k)]
            sent = a.send_batch(b.id, frames)
            assert sent == min(k, size - len(q))  # exactly the free space, never more
            q.extend(frames[:sent])
            seq += sent
        else:
            with b.recv_batch(k, timeout=0) as bt:
                got = [f.tobytes() for f in bt]
            want = [q.popleft() for _ in range(min(k, len(q)))]
            assert got == want
        assert fab.ring_stats(a.id, b.id)["depth"] == len(q)
        head, tail = _raw_indices(fab, a.id, b.id)
        assert ring_count(head, tail) == len(q)
    with b.recv_batch(64, timeout=0) as bt:
        assert [f.tobytes() for f in bt] == list(q)
    head, tail = _raw_indices(fab, a.id, b.id)
    assert head == tail == (start + seq) % M32


def test_real_ring_wrap_is_actually_crossed(wrap_fabric):
    """A deterministic run that starts 5 below 2^32 and ends well past it."""
    fab, a, b = wrap_fabric
    _set_indices(fab, a.id, b.id, M32 - 5)
    out = []
    for i in range(10):
        assert a.send_batch(b.id, [b"f%d-%d" % (i, j) for j in range(7)]) == 7
        with b.recv_batch(16, timeout=0) as bt:
            out.extend(f.tobytes() for f in bt)
    assert out == [b"f%d-%d" % (i, j) for i in range(10) for j in range(7)]
    head, tail = _raw_indices(fab, a.id, b.id)
    assert head == tail == 65  # (2^32 - 5 + 70) mod 2^32
