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


# -- the parsers that use it give the same answers as over a list of bytes ------------------------

def _packets(seed: int, n: int) -> list[bytes]:
    import random

    from shmfabric.net import build

    rnd = random.Random(seed)
    out = []
    for i in range(n):
        src, dst = f"10.0.{rnd.randrange(3)}.1", f"10.9.0.{rnd.randrange(3)}"
        body = rnd.choice([b"", b"needle in here", b"\x00" * rnd.randrange(0, 40), b"SeCrEt" * 3])
        kind = rnd.randrange(6)
        if kind == 0:
            out.append(build.ipv4(build.udp(1000 + i % 5, 53, body, src=src, dst=dst), src=src, dst=dst, proto=17))
        elif kind == 1:
            out.append(build.ipv4(build.tcp(2000, 80, body, flags=rnd.choice(["S", "FA", "R", "PA"]), src=src, dst=dst),
                                  src=src, dst=dst, proto=6))
        elif kind == 2:
            out.append(build.ipv6(build.udp(5, 6, body, src="fd00::1", dst="fd00::2"), src="fd00::1", dst="fd00::2",
                                  next_header=17))
        elif kind == 3:
            out.append(build.ipv4(build.icmp(8, 0, body), src=src, dst=dst, proto=1))
        elif kind == 4:  # malformed: cut short, or a fragment
            p = build.ipv4(build.udp(7, 8, body, src=src, dst=dst), src=src, dst=dst, proto=17)
            out.append(p[:rnd.randrange(0, len(p))] if rnd.random() < 0.5 else p[:6] + b"\x20\x10" + p[8:])
        else:
            out.append(bytes(rnd.randrange(256) for _ in range(rnd.randrange(0, 60))))
    return out


@pytest.mark.parametrize("seed", range(12))
def test_classify_and_ids_over_a_batch_equal_a_list(fab, seed):
    from shmfabric.functions.api import FunctionContext, validate_config
    from shmfabric.functions.registry import load
    from shmfabric.net.flow import classify_batch

    frames = _packets(seed, 60)  # the test fabric's rings hold 64
    rules = "\n".join(['alert ip any any -> any any (msg:"n"; content:"needle"; sid:1;)',
                       'drop tcp any any -> any 80 (msg:"s"; content:"secret"; nocase; sid:2;)',
                       'alert udp any any -> any any (msg:"z"; content:"|00 00 00|"; sid:3;)'])
    a, b = fab.attach("a"), fab.attach("b")
    assert a.send_batch(b.id, frames, ethertype=0x0800) == len(frames)
    with b.recv_batch(256, timeout=1) as bt:
        assert len(bt) == len(frames)
        fl_batch: list[int] = []
        fl_list: list[int] = []
        assert classify_batch(bt, None, "ip", flags=fl_batch) == classify_batch(frames, None, "ip", flags=fl_list)
        assert fl_batch == fl_list
        assert classify_batch(bt, None, "ip") == classify_batch(frames, None, "ip")
        cls = load("ids")
        results = []
        for src in (bt, frames):
            fn = cls(validate_config(cls, {"rules": rules, "mode": "drop", "log_alerts": False}), FunctionContext())
            out = bytearray(len(frames))
            fn.process(src, 1.0, out)
            results.append((bytes(out), fn.counters()))
        assert results[0] == results[1]
