"""The runtime's hooks for functions that make frames (see /work/notes/rewrite_proposal.md):
ctx.emit to NEXT (spread over a scaled-out group by flow hash) and to ports, Verdict.CONSUMED
counted apart from drops, timers from next_deadline, held frames released on a graceful stop,
close() called. One fabric, the runner in a thread, plain nodes around it."""
from __future__ import annotations

import threading
import time
import uuid
from typing import ClassVar

import pytest
from pydantic import BaseModel

from shmfabric.fabric import Fabric
from shmfabric.functions.api import FunctionContext, Verdict
from shmfabric.functions.runtime import FunctionRunner
from shmfabric.net import build
from shmfabric.net.flow import parse_5tuple_ip


class NoConfig(BaseModel):
    pass


class Splitter:
    """Replaces each frame by two copies: one down the chain, one to port 0."""

    name: ClassVar[str] = "splitter"
    Config = NoConfig

    def __init__(self, config, ctx: FunctionContext):
        self.ctx = ctx
        self.closed = False

    def process(self, frames, now, out):
        for i, f in enumerate(frames):
            data = bytes(f)
            self.ctx.emit(data)
            self.ctx.emit(data, Verdict.port(0))
            out[i] = Verdict.CONSUMED

    def close(self):
        self.closed = True


class Delayer:
    """Holds every frame for `delay` seconds, then emits it (a minimal shaper)."""

    name: ClassVar[str] = "delayer"
    Config = NoConfig
    delay = 0.3

    def __init__(self, config, ctx: FunctionContext):
        self.ctx = ctx
        self.held: list[tuple[float, bytes]] = []

    def process(self, frames, now, out):
        for i, f in enumerate(frames):
            self.held.append((now + self.delay, bytes(f)))
            out[i] = Verdict.CONSUMED

    def next_deadline(self, now):
        return self.held[0][0] if self.held else None

    def on_timer(self, now):
        while self.held and self.held[0][0] <= now:
            self.ctx.emit(self.held.pop(0)[1])
        return None


@pytest.fixture
def fab():
    name = f"em-{uuid.uuid4().hex[:8]}"
    f = Fabric.create(name, networks=[{"mtu": 1500, "slots": 4096}], ring_size=512)
    yield f
    f.close()
    Fabric.destroy(name)


def frames(n: int, flows: int) -> list[bytes]:
    out = []
    for i in range(n):
        src = f"10.0.0.{i % flows + 1}"
        out.append(build.ipv4(build.udp(1000 + i % flows, 53, i.to_bytes(4, "big"), src=src, dst="10.9.9.9"),
                              src=src, dst="10.9.9.9", proto=17))
    return out


def drain(node, want: int, timeout: float = 10.0) -> list[bytes]:
    got: list[bytes] = []
    end = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < end:
        with node.recv_batch(256, 0.05) as b:
            got += [f.tobytes() for f in b]
    return got


def start(runner: FunctionRunner) -> threading.Thread:
    t = threading.Thread(target=runner.run, daemon=True)
    t.start()
    return t


def test_emit_to_a_scaled_out_group_and_a_port(fab):
    a, b, p, src = fab.attach("a"), fab.attach("b"), fab.attach("p"), fab.attach("src")
    runner = FunctionRunner(fab, "split", Splitter, {}, ["a", "b"], ["p"])
    t = start(runner)
    try:
        sent = frames(300, 24)
        dst = src.wait_for_peer("split")
        i = 0
        while i < len(sent):
            i += src.send_batch(dst, sent[i:], ethertype=0x0800)
        got_p = drain(p, 300)
        got_a, got_b = [], []
        end = time.monotonic() + 10
        while len(got_a) + len(got_b) < 300 and time.monotonic() < end:
            got_a += drain(a, 1, 0.05)
            got_b += drain(b, 1, 0.05)
        assert sorted(got_p) == sorted(sent)
        assert sorted(got_a + got_b) == sorted(sent) and got_a and got_b
        keys_a = {parse_5tuple_ip(x) for x in got_a}
        assert not keys_a & {parse_5tuple_ip(x) for x in got_b}  # a flow stays on one instance
        # order within a flow is kept
        for k in keys_a:
            seq = [x for x in got_a if parse_5tuple_ip(x) == k]
            assert seq == [x for x in sent if parse_5tuple_ip(x) == k]
    finally:
        runner.stopping = True
        t.join(10)
        runner.close()
    c = runner.c
    assert c["consumed"] == 300 and c["emitted"] == 600 and c["dropped"] == 0 and c["bad_verdict"] == 0
    assert runner.fn.closed


def test_held_frames_leave_on_their_deadline_and_on_a_graceful_stop(fab):
    out, src = fab.attach("out"), fab.attach("src")
    runner = FunctionRunner(fab, "delay", Delayer, {}, ["out"])
    t = start(runner)
    try:
        dst = src.wait_for_peer("delay")
        first = frames(10, 2)
        assert src.send_batch(dst, first, ethertype=0x0800) == 10
        assert drain(out, 10, 5) == first  # released by the timer; no traffic arrives to wake the runner
        second = frames(5, 1)
        assert src.send_batch(dst, second, ethertype=0x0800) == 5
        while runner.c["in_frames"] < 15:
            time.sleep(0.01)
        runner.stopping = True  # the input is drained at once, but the delayer still holds 5 frames
        t.join(15)
        assert not t.is_alive()
        assert drain(out, 5, 2) == second and runner.fn.held == []
    finally:
        runner.stopping = True
        t.join(10)
        runner.close()
    assert runner.c["consumed"] == 15 and runner.c["emitted"] == 15 and runner.c["dropped"] == 0


class Housekeeper(Delayer):
    """Holds nothing at stop time but always has a housekeeping timer (like ratelimit's sweep)."""

    name: ClassVar[str] = "housekeeper"

    def on_timer(self, now):
        super().on_timer(now)
        return now + 0.5


def test_a_housekeeping_timer_does_not_delay_a_stop(fab):
    fab.attach("out")
    runner = FunctionRunner(fab, "hk", Housekeeper, {}, ["out"])
    t = start(runner)
    try:
        time.sleep(0.3)
        assert runner.timer_at is not None  # the housekeeping timer is armed
        runner.stopping = True
        t.join(4)  # a stop that waited for the timer would take STOP_GRACE (5 s)
        assert not t.is_alive()
    finally:
        runner.stopping = True
        t.join(10)
        runner.close()
