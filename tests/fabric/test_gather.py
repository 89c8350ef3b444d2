"""FrameBatch.gather: every frame's length and first payload bytes in one bytes object (the
batch primitive that header parsing runs struct.iter_unpack over)."""
from __future__ import annotations

import struct

import pytest

from shmfabric.fabric import ReleasedFrameError

pytestmark = pytest.mark.timeout(20)


def _records(buf: bytes, n: int) -> list[tuple[int, bytes]]:
    size = len(buf) // n
    assert size * n == len(buf)
    return [(struct.unpack_from("!I", buf, i * size)[0], buf[i * size + 4:(i + 1) * size]) for i in range(n)]


def test_gather_lengths_prefixes_and_padding(fab):
    a, b = fab.attach("a"), fab.attach("b")
    frames = [bytes(range(40)), b"short", b"", bytes(range(200, 256)) * 20]
    assert a.send_batch(b.id, frames) == 4
    with b.recv_batch(16, timeout=1) as bt:
        assert len(bt) == 4
        recs = _records(bt.gather(8), 4)
        assert [n for n, _ in recs] == [len(f) for f in frames]
        assert [d for _, d in recs] == [(f[:8] + bytes(8))[:8] for f in frames]
        full = _records(bt.gather(), 4)  # None: as wide as the longest payload
        assert [d for _, d in full] == [f + bytes(max(map(len, frames)) - len(f)) for f in frames]
        assert bt.gather(0) == b"".join(struct.pack("!I", len(f)) for f in frames)
        with pytest.raises(ValueError):
            bt.gather(-1)
        with pytest.raises(ValueError):
            bt.gather(65537)


def test_gather_of_a_broadcast_copy_and_an_empty_batch(fab):
    a, b = fab.attach("a"), fab.attach("b")
    a.broadcast(b"to everyone")
    with b.recv_batch(16, timeout=1) as bt:
        assert len(bt) == 1 and bt[0].copied
        assert _records(bt.gather(11), 1) == [(11, b"to everyone")]
    with b.recv_batch(16, timeout=0) as bt:
        assert len(bt) == 0 and bt.gather(4) == b"" and bt.gather() == b""


def test_gather_refuses_released_or_forwarded_frames(fab):
    a, b, c = fab.attach("a"), fab.attach("b"), fab.attach("c")
    a.send_batch(b.id, [b"x" * 30, b"y" * 30])
    bt = b.recv_batch(16, timeout=1)
    assert b.forward(c.id, bt[0])
    with pytest.raises(ReleasedFrameError):
        bt.gather(4)
    bt.release()
    with pytest.raises(ReleasedFrameError):
        bt.gather(4)
    with c.recv_batch(16, timeout=1):
        pass
