"""OrderedMerge: bytes leave strictly in slot order, whatever order slots complete in."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shmfabric.splicer.ordered import OrderedMerge, OrderedMergeError


def test_head_streams_and_later_slots_wait():
    m = OrderedMerge()
    a, b, c = m.open(), m.open(), m.open()
    m.append(b, b"B1")
    m.finish(c, b"C")
    assert m.pop_ready() == []
    m.append(a, b"A1")
    assert m.pop_ready() == [b"A1"]  # the head streams at once
    m.append(b, b"B2")
    m.finish(a, b"A2")
    assert m.pop_ready() == [b"A2", b"B1", b"B2"]  # b is now the head: its bytes so far follow
    m.finish(b)
    assert m.pop_ready() == [b"C"] and m.idle


def test_bounds_and_hysteresis():
    m = OrderedMerge(max_slots=4, max_bytes=100)
    seqs = [m.open() for _ in range(4)]
    assert m.full
    m.finish(seqs[0])
    assert not m.full and not m.drained  # 3 > 4 // 2
    m.finish(seqs[1])
    assert m.drained
    m.append(seqs[3], b"x" * 100)
    assert m.full and m.held_bytes == 100
    m.finish(seqs[2])
    m.finish(seqs[3])
    assert len(b"".join(m.pop_ready())) == 100 and m.held_bytes == 0 and m.drained


def test_misuse_is_reported():
    m = OrderedMerge()
    s = m.open()
    m.finish(s)
    with pytest.raises(OrderedMergeError):
        m.finish(s)
    with pytest.raises(OrderedMergeError):
        m.append(s + 5, b"x")
    with pytest.raises(ValueError):
        OrderedMerge(max_slots=0)


@settings(max_examples=200, deadline=None)
@given(st.data(), st.integers(1, 30))
def test_any_completion_order_gives_request_order(data, n):
    m = OrderedMerge()
    seqs = [m.open() for _ in range(n)]
    parts = {s: [b"%d-%d;" % (s, i) for i in range(data.draw(st.integers(0, 3)))] for s in seqs}
    # interleave appends and finishes in a random order, keeping each slot's own order
    ops = [(s, p) for s in seqs for p in parts[s]] + [(s, None) for s in seqs]
    order = data.draw(st.permutations(ops))
    pending = {s: list(parts[s]) for s in seqs}
    done_ops, out = set(), []
    queue = list(order)
    while queue:
        for op in queue:
            s, p = op
            if p is None and pending[s]:
                continue  # finish only after the slot's parts
            if p is not None and pending[s][0] != p:
                continue
            queue.remove(op)
            if p is None:
                m.finish(s)
            else:
                pending[s].pop(0)
                m.append(s, p)
            out += m.pop_ready()
            break
    assert b"".join(out) == b"".join(b"".join(parts[s]) for s in seqs)
    assert m.idle and m.held_bytes == 0
