"""The runtime's dispatch in one process: every verdict goes where it says, unknown verdicts are
counted (not sent), and the node's CPU time is counted."""
from __future__ import annotations

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
