"""The runtime's dispatch in one process: every verdict goes where it says, unknown verdicts are
counted (not sent), and the node's CPU time is counted."""
from __future__ import annotations

import contextlib
import threading
import time
import uuid

import pytest
from pydantic import BaseModel

from shmfabric.fabric import Fabric
from shmfabric.functions.api import Verdict
from shmfabric.functions.runtime import FunctionRunner, backoff


class MixedConfig(BaseModel):
    pass


class Mixed:
    """Gives frame i the verdict in its first payload byte."""

    name = "mixed"
    Config = MixedConfig

    def __init__(self, config, ctx) -> None:
        pass

    def process(self, frames, now, out) -> None:
        for i, f in enumerate(frames):
            out[i] = f[0]


@pytest.fixture
def fab():
    name = f"rd-{uuid.uuid4().hex[:8]}"
    f = Fabric.create(name, networks=[{"mtu": 1500, "slots": 1024}], ring_size=256)
    yield f
    f.close()
    Fabric.destroy(name)


def test_dispatch_by_verdict_and_unknown_verdicts_counted(fab):
    src, nxt, port = fab.attach("src"), fab.attach("nxt"), fab.attach("port")
    r = FunctionRunner(fab, "mid", Mixed, {}, ["nxt"], ["port"])
    try:
        r.next.resolve(0, force=True)
        r.ports[0].resolve(0, force=True)
        codes = [Verdict.NEXT] * 5 + [Verdict.DROP] * 3 + [Verdict.port(0)] * 4 + [Verdict.CONSUMED] * 2 + [150, 231, 7]
        assert src.send_batch(r.node.id, [bytes([c]) + b"x" * 40 for c in codes]) == len(codes)
        batch = r.node.recv_batch(64, 1.0)
        out = bytearray(len(batch))
        r.fn.process(batch, 0.0, out)
        r.dispatch(batch, out)
        batch.release()
        with nxt.recv_batch(64, 1.0) as got:
            assert [f[0] for f in got] == [0] * 5
        with port.recv_batch(64, 1.0) as got:
            assert [f[0] for f in got] == [3] * 4
        c = r.c
        assert (c["out_frames"], c["dropped"], c["consumed"], c["bad_verdict"]) == (9, 3, 2, 3)
    finally:
        r.close()


def test_backoff_grows_and_is_bounded():
    assert backoff(0) == pytest.approx(20e-6)
    assert [backoff(k) for k in range(6)] == sorted(backoff(k) for k in range(6))
    assert backoff(100) == backoff(4) == pytest.approx(320e-6)


@contextlib.contextmanager
def running(r: FunctionRunner, seconds: float):
    """`r.run(duration=seconds)` in a thread for the block; stopped, joined and closed after."""
    t = threading.Thread(target=lambda: r.run(duration=seconds))
    t.start()
    try:
        yield t
    finally:
        r.stopping = True
        t.join(10)
        r.close()


class Fragile:
    """Raises on a frame whose first payload byte is 0xEE (a packet of death), after writing a
    NEXT verdict for the frames before it; passes every other frame on."""

    name = "fragile"
    Config = MixedConfig

    def __init__(self, config, ctx) -> None:
        self.ctx = ctx

    def process(self, frames, now, out) -> None:
        for i, f in enumerate(frames):
            if f[0] == 0xEE:
                self.ctx.emit(b"\x00" * 60)  # emitted before the bug: must not go out either
                raise ValueError("cannot parse this one")
            out[i] = Verdict.NEXT


def test_a_batch_whose_process_raises_is_dropped_and_the_node_goes_on(fab, capfd):
    # An exception out of a function's process() used to end the runtime's loop: the node died
    # (and with a packet of death, crash-looped under the manager). Now that batch is dropped
    # whole (its verdicts were half written, and NEXT is 0: unchecked frames would pass), the
    # error is counted and logged once, and the next batches are processed.
    src, nxt = fab.attach("src"), fab.attach("nxt")
    r = FunctionRunner(fab, "mid", Fragile, {}, ["nxt"], [])
    with running(r, 3.0) as t:
        assert src.wait_for_peer("mid", timeout=5) == r.node.id
        assert src.send_batch(r.node.id, [b"\x01" * 60] * 10) == 10
        with nxt.recv_batch(64, 2.0) as got:
            assert len(got) == 10
        for k in range(1, 4):  # one batch each: the next is sent once this one failed
            assert src.send_batch(r.node.id, [b"\x01" * 60] * 5 + [b"\xee" * 60] + [b"\x01" * 60] * 4) == 10
            deadline = time.monotonic() + 5
            while r.c["process_errors"] < k and time.monotonic() < deadline:
                time.sleep(0.005)
        assert src.send_batch(r.node.id, [b"\x02" * 60] * 7) == 7
        with nxt.recv_batch(64, 2.0) as got:
            assert [f[0] for f in got] == [2] * 7  # nothing of the failed batches, and it goes on
        r.stopping = True
        t.join(10)
        assert not t.is_alive()
        assert r.c["process_errors"] == 3 and r.c["error_frames"] == 30, r.c
        assert r.c["dropped"] >= 30 and r.c["emitted"] == 0
        err = capfd.readouterr().err
        assert err.count('"process_error"') == 1 and "cannot parse this one" in err


class Timed:
    """Passes frames on; counts its on_timer calls, due every 10 ms."""

    name = "timed"
    Config = MixedConfig

    def __init__(self, config, ctx) -> None:
        self.calls = 0

    def process(self, frames, now, out) -> None:
        pass  # out is all NEXT

    def on_timer(self, now):
        self.calls += 1
        return now + 0.01


def test_on_timer_runs_under_traffic_from_the_start(fab):
    # on_timer was first called at the first poll that found no input: under traffic from the
    # start a function's housekeeping (expiring its flow tables) never ran.
    src, nxt = fab.attach("src"), fab.attach("nxt")
    r = FunctionRunner(fab, "mid", Timed, {}, ["nxt"], [])
    # the input is queued before the node runs, and kept from running dry while we look
    assert src.send_batch(r.node.id, [b"\x01" * 60] * 200) == 200
    with running(r, 5.0):
        deadline = time.monotonic() + 0.5
        calls_during_traffic = 0
        while time.monotonic() < deadline:
            src.send_batch(r.node.id, [b"\x01" * 60] * 64)
            nxt.recv_batch(1024, timeout=0).release()
            calls_during_traffic = r.fn.calls
        assert r.c["in_frames"] > 0
        assert calls_during_traffic >= 2, calls_during_traffic


class Both:
    """A source making IPv4 and IPv6 packets, alternately."""

    name = "both"
    Config = MixedConfig

    def __init__(self, config, ctx) -> None:
        self.made = 0

    def produce(self, now, max_frames):
        if self.made >= 20:
            return []
        self.made += 20
        v4 = bytes([0x45]) + bytes(39)
        v6 = bytes([0x60]) + bytes(59)
        return [v4 if k % 2 == 0 else v6 for k in range(20)]


def test_frames_a_function_makes_carry_the_ethernet_type_of_their_ip_version(fab):
    # Every frame a source made (or a function emitted) went out as 0x0800, IPv6 too: a capture
    # showed IPv6 as bogus IPv4, and so would anything reading the Ethernet type.
    from shmfabric.functions.runtime import ip_ethertype_groups

    v4, v6 = bytes([0x45]) + bytes(19), bytes([0x60]) + bytes(39)
    assert ip_ethertype_groups([v4, v6, v4]) == [(0x0800, [v4, v4]), (0x86DD, [v6])]
    assert ip_ethertype_groups([v6, v6]) == [(0x86DD, [v6, v6])]
    assert ip_ethertype_groups([]) == []
    nxt = fab.attach("nxt")
    r = FunctionRunner(fab, "src", Both, {}, ["nxt"], [])
    try:
        r.run(duration=1.0)
        with nxt.recv_batch(64, 1.0) as got:
            kinds = sorted((f.ethertype, f[0] >> 4) for f in got)
        assert kinds == [(0x0800, 4)] * 10 + [(0x86DD, 6)] * 10, kinds
    finally:
        r.close()
