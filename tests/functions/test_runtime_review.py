"""The function runtime against what a review found could take a node down or stall it: replies
longer than one frame, malformed control messages and misbehaving function hooks, views of frames
kept past their batch, `out` resized, waits a sender chooses, backpressure, timer returns; plugin
loading; the firewall's rule index and rule-language edges. In one process: the runner in a
thread, plain nodes around it. Bounded in time; nothing asserts a duration."""
from __future__ import annotations

import contextlib

import json
import math
import os
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
import uuid
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel

from shmfabric.fabric import Fabric
from shmfabric.functions.api import FunctionContext, Verdict
from shmfabric.functions.control import ControlClient, ControlError
from shmfabric.functions.runtime import FunctionRunner

IP = b"\x45" + b"x" * 59  # 60 bytes that start like IPv4


class NoConfig(BaseModel):
    pass


@pytest.fixture
def fab():
    name = f"rv-{uuid.uuid4().hex[:8]}"
    f = Fabric.create(name, networks=[{"mtu": 1500, "slots": 2048}], ring_size=256)
    yield f
    f.close()
    Fabric.destroy(name)


class Running:
    """`runner.run(duration)` in a daemon thread; what it returned or raised."""

    def __init__(self, runner: FunctionRunner, duration: float | None = 20.0):
        self.r = runner
        self.result: dict[str, Any] = {}
        self.t = threading.Thread(target=self._go, args=(duration,), daemon=True)
        self.t.start()

    def _go(self, duration: float | None) -> None:
        try:
            self.result["stats"] = self.r.run(duration)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.result["exc"] = repr(e)

    def alive(self) -> bool:
        return self.t.is_alive()

    def stop(self, timeout: float = 15.0) -> None:
        self.r.stopping = True
        self.t.join(timeout)
        assert not self.t.is_alive(), "the node's loop did not end"
        assert "exc" not in self.result, self.result["exc"]

@contextlib.contextmanager
def controlled(fab, *args, **kwargs):
    """A FunctionRunner(fab, *args) running in a thread, and a ControlClient "mgr": (runner,
    Running, client), all stopped and closed afterwards."""
    r = FunctionRunner(fab, *args, **kwargs)
    run = Running(r)
    ctl = ControlClient(fab, "mgr")
    try:
        yield r, run, ctl
    finally:
        ctl.close()
        run.stop()
        r.close()


def wait_for(cond, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def drain(node, timeout: float = 2.0) -> int:
    got = 0
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with node.recv_batch(256, 0.05) as b:
            got += len(b)
            if not len(b) and got:
                break
    return got


# -- 1. replies longer than one frame ---------------------------------------------------------------
def test_split_reply_keeps_short_replies_as_they_were_and_reassembles_long_ones():
    from shmfabric.functions.control import PART_OVERHEAD, Reassembler, split_reply

    short = json.dumps({"ok": True, "id": 3}).encode()
    assert split_reply(short, 1500, 1) == [short]  # on the wire as before
    long = json.dumps({"ok": True, "id": 4, "c": {f"rule{i}_packets": i for i in range(400)}}).encode()
    parts = split_reply(long, 1500, 7)
    assert len(parts) > 1 and all(len(p) <= 1500 for p in parts)
    assert all(not p.startswith(b"{") for p in parts) and len(parts[0]) == 1500
    asm = Reassembler()
    got = [asm.add(5, p) for p in parts]
    assert got[:-1] == [None] * (len(parts) - 1) and got[-1] == long
    assert asm.add(5, short) == short
    # parts of two senders interleaved, and a lost part: the reply it belongs to is dropped
    other = split_reply(long, 1500, 7)
    asm = Reassembler()
    out = []
    for a, b in zip(parts, other):
        out += [asm.add(1, a), asm.add(2, b)]
    assert [x for x in out if x is not None] == [long, long]
    assert [asm.add(1, p) for p in parts[:1] + parts[2:]] == [None] * (len(parts) - 1)
    assert not list(asm.pending()) and PART_OVERHEAD < 20


class ManyCounters:
    """A function with one counter per rule, like a firewall with many rules."""

    name: ClassVar[str] = "many"
    Config = NoConfig
    n = 2000

    def __init__(self, config, ctx):
        pass

    def process(self, frames, now, out):
        pass

    def counters(self):
        return {f"rule{i}_packets": i for i in range(self.n)}


def test_a_stats_reply_longer_than_the_mtu_arrives_whole_and_the_node_lives(fab):
    # was: send_control raised FrameSizeError above the MTU, uncaught: the node died on the
    # manager's readiness probe (a firewall of ~40 rules at MTU 1500)
    fab.attach("nxt")
    with controlled(fab, "mid", ManyCounters, {}, ["nxt"]) as (r, run, ctl):
        st = ctl.request("mid", {"op": "stats"}, timeout=10)
        assert st["ok"] and st["function_counters"] == r.fn.counters()
        assert len(json.dumps(st)) > 20 * fab.networks[0].mtu
        assert ctl.request("mid", {"op": "stats"}, timeout=10)["ok"] and run.alive()
        small = ctl.request("mid", {"op": "frobnicate"}, timeout=10)  # short replies unchanged
        assert small["ok"] is False and small["id"] == 3


def test_a_firewall_with_a_hundred_rules_answers_stats_and_stop(fab):
    from shmfabric.functions.registry import load

    rules = "policy drop\n" + "\n".join(f"ip saddr 10.{i}.0.0/16 accept" for i in range(100))
    fab.attach("nxt")
    r = FunctionRunner(fab, "fw", load("firewall"), {"rules": rules}, ["nxt"])
    run = Running(r, None)
    ctl = ControlClient(fab, "mgr")
    try:
        st = ctl.request("fw", {"op": "stats"}, timeout=10)
        assert st["ok"] and len(st["function_counters"]) > 100
        reply = ctl.request("fw", {"op": "stop"}, timeout=20)  # the stop reply carries the stats too
        assert reply["ok"] and len(reply["stats"]["function_counters"]) > 100
        run.t.join(15)
        assert not run.alive() and "exc" not in run.result
    finally:
        ctl.close()
        r.stopping = True
        run.t.join(15)
        r.close()


# -- 2. nothing a control message holds, and no hook of the function, takes the node down -----------
class Quirky:
    """counters() and on_timer() do what `mode` says."""

    name: ClassVar[str] = "quirky"
    Config = NoConfig
    mode = "ok"

    def __init__(self, config, ctx):
        self.ctx = ctx
        self.timer_calls = 0

    def process(self, frames, now, out):
        pass

    def counters(self):
        m = self.mode
        if m == "raise":
            raise KeyError("x")
        if m == "set":
            return {"seen": {3, 1, 2}, "raw": b"\x00\xff"}
        if m == "list":
            return [1, 2]
        return {"ok": 1}


@pytest.mark.parametrize("op,error", [
    ({"op": "set_next", "next": 5}, "'next' must be a list of node names"),
    ({"op": "set_next", "next": "nxt"}, "'next' must be a list of node names"),
    ({"op": "set_next", "next": ["nxt"], "ports": ["a"]}, "'ports' must be an object"),
    ({"op": "set_next", "next": ["nxt"], "ports": {"p": 7}}, "port 'p' must be a list of node names"),
    ({"op": "set_next", "next": ["nxt"], "timeout": "soon"}, "'timeout' must be a number"),
    ({"op": "mirror", "to": "nxt", "timeout": [1]}, "'timeout' must be a number"),
    ({"op": "mirror", "to": 5}, "'to' must be a node name"),
    ({"op": "reconfigure", "config": [1]}, "'config' must be an object"),
    ({"op": ["stats"]}, "unknown op"),
])
def test_malformed_control_messages_are_refused_and_the_node_goes_on(fab, op, error):
    fab.attach("nxt")
    fab.attach("p")
    with controlled(fab, "mid", Quirky, {}, ["nxt"], ["p"]) as (r, run, ctl):
        reply = ctl.request("mid", op, timeout=5)
        assert reply["ok"] is False and error in reply["error"], reply
        assert ctl.request("mid", {"op": "stats"}, timeout=5)["ok"] and run.alive()


def test_control_messages_that_are_not_json_objects_are_answered(fab):
    fab.attach("nxt")
    with controlled(fab, "mid", Quirky, {}, ["nxt"]) as (r, run, ctl):
        for payload in (b"[1, 2]", b"\xff\xfe", b"5", b"null"):
            assert ctl.node.send_control(r.node.id, payload)

        def four_replies() -> bool:
            ctl.node.recv_batch(16, 0.05).release()
            return len(ctl._replies) >= 4 or not run.alive()

        assert wait_for(four_replies)
        assert [rep["ok"] for _, rep in ctl._replies[:4]] == [False] * 4
        ctl._replies.clear()
        assert ctl.request("mid", {"op": "stats"}, timeout=5)["counters"]["control_errors"] == 4


@pytest.mark.parametrize("mode", ["raise", "set", "list"])
def test_counters_that_raise_or_are_not_json_still_answer_stats(fab, mode, monkeypatch):
    monkeypatch.setattr(Quirky, "mode", mode)
    fab.attach("nxt")
    with controlled(fab, "mid", Quirky, {}, ["nxt"]) as (r, run, ctl):
        st = ctl.request("mid", {"op": "stats"}, timeout=5)
        assert st["ok"] and run.alive()
        if mode == "set":
            assert st["function_counters"] == {"seen": [1, 2, 3], "raw": "00ff"}
        else:
            assert st["function_counters"] == {} and st["function_counters_error"]


class TimerQuirks:
    """on_timer returns or raises what `mode` says; counts its calls."""

    name: ClassVar[str] = "timerq"
    Config = NoConfig
    mode = "later10"

    def __init__(self, config, ctx):
        self.calls = 0

    def process(self, frames, now, out):
        pass

    def on_timer(self, now):
        self.calls += 1
        m = self.mode
        if m == "raise" and self.calls > 1:
            raise ZeroDivisionError("bug in housekeeping")
        return {"later10": now + 10, "nan": math.nan, "neg": -1.0, "str": "soon", "raise": now + 0.01}[m]


@pytest.mark.parametrize("mode,max_calls", [("later10", 1), ("nan", 4), ("neg", 4), ("str", 4), ("raise", 5)])
def test_on_timer_fires_when_due_and_bad_returns_are_errors_not_a_spin_or_a_crash(fab, mode, max_calls, monkeypatch):
    # was: on_timer at every empty poll whatever it asked for (13 calls in 2 s for now + 10), a
    # NaN or negative return called it in a tight loop (millions of calls), a str or an
    # exception ended the node
    monkeypatch.setattr(TimerQuirks, "mode", mode)
    fab.attach("nxt")
    r = FunctionRunner(fab, "mid", TimerQuirks, {}, ["nxt"], wait_mode="block")
    run = Running(r, 1.5)
    run.t.join(20)
    assert not run.alive() and "exc" not in run.result, run.result
    assert 1 <= r.fn.calls <= max_calls, r.fn.calls
    assert (r.c["timer_errors"] >= 1) == (mode != "later10")
    r.close()


def test_emit_refuses_what_is_not_a_buffer_in_the_functions_own_frame():
    ctx = FunctionContext()
    for bad in ("hello", None, 5, [1, 2]):
        with pytest.raises(TypeError, match=r"ctx.emit\(\) takes a buffer"):
            ctx.emit(bad)
    with pytest.raises(TypeError, match="verdict must be an int"):
        ctx.emit(b"x", "next")
    with pytest.raises(ValueError, match="not a verdict code"):
        ctx.emit(b"x", 300)
    ctx.emit(b"")
    ctx.emit(bytearray(b"ab"), Verdict.port(1))
    ctx.emit(memoryview(b"abc"))
    assert [v for v, _ in ctx.emitted] == [0, 4, 0]


class EmitsStr:
    name: ClassVar[str] = "emitstr"
    Config = NoConfig

    def __init__(self, config, ctx):
        self.ctx = ctx

    def process(self, frames, now, out):
        self.ctx.emit("hello")


def test_an_emit_of_a_str_costs_its_batch_not_the_node(fab):
    src, nxt = fab.attach("src"), fab.attach("nxt")
    r = FunctionRunner(fab, "mid", EmitsStr, {}, ["nxt"])
    run = Running(r)
    try:
        assert src.wait_for_peer("mid") == r.node.id
        assert src.send_batch(r.node.id, [IP] * 10) == 10
        assert wait_for(lambda: r.c["process_errors"] == 1 or not run.alive())
        assert run.alive() and r.c["error_frames"] == 10 and r.c["emitted"] == 0
    finally:
        run.stop()
        r.close()


# -- 3. views of frames kept past their batch; `out` resized --------------------------------------
class Keeper:
    """Keeps a memoryview of the first frame of its last batch (a "last packet" cache)."""

    name: ClassVar[str] = "keeper"
    Config = NoConfig

    def __init__(self, config, ctx):
        self.kept = None

    def process(self, frames, now, out):
        self.kept = memoryview(frames[0])


def test_a_view_kept_past_its_batch_is_an_error_not_a_dead_node_that_holds_its_slots(fab):
    src, nxt = fab.attach("src"), fab.attach("nxt")
    r = FunctionRunner(fab, "mid", Keeper, {}, ["nxt"])
    run = Running(r)
    try:
        assert src.wait_for_peer("mid") == r.node.id
        for k in (1, 2):
            assert src.send_batch(r.node.id, [IP] * 10) == 10
            assert wait_for(lambda: r.c["in_frames"] == 10 * k or not run.alive())
        assert run.alive()
        assert r.c["kept_views"] >= 2 and r.c["error_frames"] == 20  # every batch: each had a view kept
        assert drain(nxt, 0.3) == 0  # not forwarded: the core refuses while a view exists
        run.stop()
        r.close()  # the closed function is let go, and its view with it: the node detaches
        assert fab.node_id("mid") is None
        audit = fab.pool_audit()
        assert audit["orphaned"] == 0 and audit["free"] + sum(audit["held"].values()) == audit["total"]
        assert r.node.id not in audit["held"]
    finally:
        r.stopping = True
        run.t.join(10)


_GLOBAL_VIEWS: list = []


class GlobalKeeper(Keeper):
    name: ClassVar[str] = "gkeeper"

    def process(self, frames, now, out):
        _GLOBAL_VIEWS.append(memoryview(frames[0]))


def test_a_view_kept_where_close_cannot_reach_it_is_one_clear_error(fab):
    src, nxt = fab.attach("src"), fab.attach("nxt")
    r = FunctionRunner(fab, "mid", GlobalKeeper, {}, ["nxt"])
    run = Running(r)
    try:
        assert src.wait_for_peer("mid") == r.node.id
        assert src.send_batch(r.node.id, [IP] * 5) == 5
        assert wait_for(lambda: r.c["in_frames"] == 5 or not run.alive())
        run.stop()
        with pytest.raises(BufferError, match="still holds a view of a frame") as ei:
            r.close()
        assert "\n" not in str(ei.value)
        assert fab.node_id("mid") == r.node.id  # still attached: its slots are under the view
    finally:
        r.stopping = True
        run.t.join(10)
        _GLOBAL_VIEWS.clear()
        r._release_held()
        if fab.node_id("mid") is not None:
            r.node.detach()


class Resizer:
    name: ClassVar[str] = "resizer"
    Config = NoConfig
    mode = "shrink"

    def __init__(self, config, ctx):
        pass

    def process(self, frames, now, out):
        if self.mode == "shrink":
            del out[5:]
        elif self.mode == "grow":
            out.extend(b"\x01" * 20)
        else:
            out.clear()


@pytest.mark.parametrize("mode", ["shrink", "grow", "clear"])
def test_a_process_that_resizes_out_has_its_batch_dropped_and_counted(fab, mode, monkeypatch):
    # was: del killed the node, extend counted 20 drops that never happened, clear lost 10
    # frames uncounted
    monkeypatch.setattr(Resizer, "mode", mode)
    src, nxt = fab.attach("src"), fab.attach("nxt")
    r = FunctionRunner(fab, "mid", Resizer, {}, ["nxt"])
    run = Running(r)
    try:
        assert src.wait_for_peer("mid") == r.node.id
        assert src.send_batch(r.node.id, [IP] * 10) == 10
        assert wait_for(lambda: r.c["process_errors"] == 1 or not run.alive())
        assert run.alive()
        c = r.c
        assert (c["in_frames"], c["error_frames"], c["dropped"], c["out_frames"]) == (10, 10, 10, 0), c
        assert drain(nxt, 0.3) == 0
    finally:
        run.stop()
        r.close()
    audit = fab.pool_audit()
    assert audit["free"] + sum(audit["held"].values()) == audit["total"] and r.node.id not in audit["held"]


# -- 4. waits a sender chooses -----------------------------------------------------------------------
def test_set_next_to_a_missing_node_fails_at_once_and_a_nan_timeout_is_refused(fab):
    # was: the data path froze for the sender's timeout (5 s by default), and NaN never ended
    src, nxt = fab.attach("src"), fab.attach("nxt")
    r = FunctionRunner(fab, "mid", Quirky, {}, ["nxt"])
    run = Running(r, None)
    ctl = ControlClient(fab, "mgr")
    try:
        bad = ctl.request("mid", {"op": "set_next", "next": ["ghost"]}, timeout=2)
        assert not bad["ok"] and "'ghost'" in bad["error"]
        bad = ctl.request("mid", {"op": "set_next", "next": ["ghost"], "timeout": math.nan}, timeout=2)
        assert not bad["ok"] and "'timeout' must be a number" in bad["error"]
        bad = ctl.request("mid", {"op": "mirror", "to": "ghost"}, timeout=2)
        assert not bad["ok"] and "'ghost'" in bad["error"]
        assert src.send_batch(r.node.id, [IP] * 5) == 5
        assert drain(nxt, 5.0) == 5  # still forwarding, to the old next hop
        assert ctl.request("mid", {"op": "stats"}, timeout=5)["next"] == ["nxt"]
    finally:
        ctl.close()
        run.stop()
        r.close()


def test_a_long_set_next_wait_ends_when_the_node_is_told_to_stop(fab):
    fab.attach("nxt")
    r = FunctionRunner(fab, "mid", Quirky, {}, ["nxt"])
    run = Running(r, None)
    ctl = ControlClient(fab, "mgr")
    try:
        assert ctl.request("mid", {"op": "stats"}, timeout=5)["ok"]  # the loop is receiving
        assert ctl.node.send_control(r.node.id, json.dumps(
            {"op": "set_next", "next": ["ghost"], "timeout": 1e9, "id": 1}).encode())
        time.sleep(0.3)  # the op is waiting (at most 30 s: clamped)
        r.stopping = True  # what SIGTERM does
        run.t.join(15)
        assert not run.alive() and "exc" not in run.result
    finally:
        ctl.close()
        r.stopping = True
        run.t.join(15)
        r.close()


# -- 6. backpressure ------------------------------------------------------------------------------
def test_a_node_blocked_by_a_full_next_hop_still_answers_stats_and_stop(fab):
    src, nxt = fab.attach("src"), fab.attach("nxt")  # nxt never reads: its ring fills
    r = FunctionRunner(fab, "mid", Quirky, {}, ["nxt"])
    run = Running(r, None)
    ctl = ControlClient(fab, "mgr")
    try:
        assert src.wait_for_peer("mid") == r.node.id
        sent = 0
        for _ in range(40):
            sent += src.send_batch(r.node.id, [IP] * 50)
            time.sleep(0.01)
        assert wait_for(lambda: r.c["ring_full_waits"] > 0)
        st = ctl.request("mid", {"op": "stats"}, timeout=10)
        assert st["ok"] and st["counters"]["ring_full_waits"] > 0 and run.alive()
        reply = ctl.request("mid", {"op": "stop"}, timeout=20)
        assert reply["ok"]
        run.t.join(15)
        assert not run.alive() and "exc" not in run.result
        c = r.c  # the input was drained: every frame forwarded, or dropped once the stop gave up
        assert c["in_frames"] == sent and c["out_frames"] + c["dropped"] == sent, (c, sent)
    finally:
        ctl.close()
        r.stopping = True
        run.t.join(15)
        r.close()
        nxt.recv_batch(4096, 0).release()


def test_a_node_blocked_for_long_answers_stats_without_taking_data_frames(fab, monkeypatch):
    # was: each poll took one data frame into a stash, and after 256 of them (about 5 s of a
    # stuck next hop fed all the while) control messages waited for the ring again
    from shmfabric.functions import runtime

    monkeypatch.setattr(runtime, "POLL_EVERY", 0.001)  # many polls in little time
    src, nxt = fab.attach("src"), fab.attach("nxt")  # nxt never reads: its ring fills
    try:
        with controlled(fab, "mid", Quirky, {}, ["nxt"]) as (r, run, ctl):
            assert src.wait_for_peer("mid") == r.node.id
            assert wait_for(lambda: src.send_batch(r.node.id, [IP] * 64) == 0 and r.c["ring_full_waits"] > 0)
            assert wait_for(lambda: not src.send(r.node.id, IP))  # mid's input ring is full too
            for _ in range(300):  # more answers than the old stash held frames
                st = ctl.request("mid", {"op": "stats"}, timeout=10)
                assert st["ok"] and run.alive()
                assert not src.send(r.node.id, IP)  # still full: no answer took a data frame
            assert ctl.request("mid", {"op": "stop"}, timeout=20)["ok"]
            run.t.join(15)
            assert not run.alive() and "exc" not in run.result
    finally:
        nxt.recv_batch(4096, 0).release()
        src.recv_batch(4096, 0).release()


class Recorder:
    """Remembers the first byte of every frame, in order; reconfigure is recorded too."""

    name: ClassVar[str] = "recorder"
    Config = NoConfig

    def __init__(self, config, ctx):
        self.seen: list[int] = []
        self.reconfigured = 0

    def process(self, frames, now, out):
        self.seen += [f[1] for f in frames]

    def reconfigure(self, config):
        self.reconfigured += 1


def test_frames_taken_while_blocked_keep_their_order_and_other_ops_wait_for_the_batch(fab):
    src, nxt = fab.attach("src"), fab.attach("nxt")
    r = FunctionRunner(fab, "mid", Recorder, {}, ["nxt"], batch=64)
    run = Running(r, None)
    ctl = ControlClient(fab, "mgr")
    try:
        assert src.wait_for_peer("mid") == r.node.id
        frames = [b"\x45" + bytes([k % 256]) + b"x" * 58 for k in range(600)]
        i = 0
        end = time.monotonic() + 10
        while i < len(frames) and time.monotonic() < end:  # until mid's input ring is full too
            n = src.send_batch(r.node.id, frames[i:i + 50])
            i += n
            if not n and r.c["ring_full_waits"]:
                break
            time.sleep(0.005)
        assert wait_for(lambda: r.c["ring_full_waits"] > 0)
        assert ctl.request("mid", {"op": "stats"}, timeout=10)["ok"]
        # a reconfigure while blocked waits for the batch; the nxt ring is drained meanwhile
        assert ctl.node.send_control(r.node.id, json.dumps({"op": "reconfigure", "config": {}, "id": 99}).encode())
        got = 0
        end = time.monotonic() + 15
        while got < i and time.monotonic() < end:
            with nxt.recv_batch(256, 0.05) as b:
                got += len(b)
        assert got == i
        assert wait_for(lambda: r.fn.reconfigured == 1)
        assert r.fn.seen == [k % 256 for k in range(i)]  # in order, none twice, none lost
    finally:
        ctl.close()
        run.stop()
        r.close()


# -- 5. the firewall's rule index --------------------------------------------------------------------
def _narrow_wide(n: int) -> str:
    narrow = [f"th dport {1000 + 256 * i}-{1000 + 256 * i + 255} accept" for i in range(n)]
    wide = [f"ip saddr 10.{i // 256}.{i % 256}.0/24 accept" for i in range(n)]
    return "policy drop\n" + "\n".join(wide + narrow)


def test_the_rule_index_of_narrow_and_wide_rules_is_not_quadratic():
    # was: every indexed port got its own tuple of the wide rules: 200 + 200 rules took 4.9 s
    # and 519 MB; 100 + 100 over 100 MB
    from shmfabric.functions.rules import RuleSet

    tracemalloc.start()
    try:
        rs = RuleSet.parse(_narrow_wide(100))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40e6, peak
    r = rs.candidates(6, 1000 + 256 * 7 + 3)
    assert len(r) == 101 and r[-1].line == 2 + 100 + 7 and r[0].line == 2


def _reference_candidates(rules, proto: int, port: int) -> list:
    from shmfabric.functions.rules import INDEX_MAX_PORTS

    out = []
    for r in rules:
        if r.protos is not None and proto not in r.protos:
            continue
        dp = r.dport
        narrow = dp is not None and not dp.negate and sum(hi - lo + 1 for lo, hi in dp.ranges) <= INDEX_MAX_PORTS
        if narrow and not any(lo <= port <= hi for lo, hi in dp.ranges):
            continue
        out.append(r)
    return out


@pytest.mark.parametrize("budget", [None, 0])
def test_candidates_are_the_rules_that_may_match_in_order(budget, monkeypatch):
    import random

    from shmfabric.functions import rules as rules_mod

    if budget is not None:  # the index over its budget: narrow and wide merged at lookup
        monkeypatch.setattr(rules_mod, "MERGE_BUDGET", budget)
    rnd = random.Random(5)
    words = ["tcp", "udp", "th", "sctp"]
    for _ in range(40):
        lines = ["policy drop"]
        for _ in range(rnd.randint(1, 25)):
            kind = rnd.random()
            if kind < 0.5:
                lo = rnd.choice([0, 20, 22, 80, 100, 443, 1000, 65400])
                hi = min(65535, lo + rnd.choice([0, 0, 3, 50, 255, 256, 3000]))
                neg = "!= " if rnd.random() < 0.1 else ""
                ports = f"{lo}-{hi}" if rnd.random() < 0.7 else f"{{ {lo}, {hi}, {lo}-{hi} }}"
                lines.append(f"{rnd.choice(words)} dport {neg}{ports} accept")
            elif kind < 0.8:
                lines.append(f"ip saddr 10.{rnd.randint(0, 3)}.0.0/16 drop")
            else:
                lines.append(f"meta l4proto {rnd.choice(['tcp', 'udp', 'icmp'])} accept")
        rs = rules_mod.RuleSet.parse("\n".join(lines))
        assert (rs._merge_pos is not None) == (budget == 0 and any(a is not None for a in rs._ports))
        for proto in (6, 17, 132, 1, 33):
            for port in (0, 20, 21, 22, 80, 81, 100, 443, 999, 1000, 1255, 1256, 4000, 65400, 65535):
                got = list(rs.candidates(proto, port))
                assert got == _reference_candidates(rs.rules, proto, port), (lines, proto, port)


# -- 8. plugins ------------------------------------------------------------------------------------
@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """Two fake distributions on sys.path: fakeplug (a module that raises at import, a missing
    class, a class that shadows `firewall`, one whose constructor fails, a name it shares with
    fakeplug2) and fakeplug2."""
    from shmfabric.functions import registry

    (tmp_path / "fakeplug_boom.py").write_text('raise RuntimeError("plugin needs libfoo 2.0")\n')
    (tmp_path / "fakeplug_ok.py").write_text(textwrap.dedent('''
        from pydantic import BaseModel
        class _C(BaseModel):
            pass
        class Evil:
            name = "firewall"; Config = _C
            def __init__(self, c, ctx): pass
            def process(self, f, n, o): pass
        class Fails:
            name = "fails"; Config = _C
            def __init__(self, c, ctx): raise RuntimeError("cannot open /dev/foo")
            def process(self, f, n, o): pass
        class Dup(Evil):
            name = "dup"
        class NotAFunction:
            pass
    '''))
    (tmp_path / "fakeplug2.py").write_text("from fakeplug_ok import Dup as Dup2\n")
    for dist, eps in (("fakeplug", ["boom = fakeplug_boom:Boom", "noattr = fakeplug_ok:Missing",
                                    "firewall = fakeplug_ok:Evil", "fails = fakeplug_ok:Fails",
                                    "dup = fakeplug_ok:Dup", "notfn = fakeplug_ok:NotAFunction"]),
                      ("fakeplug2", ["dup = fakeplug2:Dup2"])):
        info = tmp_path / f"{dist}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text("[shmfabric.functions]\n" + "\n".join(eps) + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.invalidate()
    yield tmp_path
    monkeypatch.undo()
    registry.invalidate()
    for m in ("fakeplug_boom", "fakeplug_ok", "fakeplug2"):
        sys.modules.pop(m, None)


def test_plugins_that_cannot_load_are_one_error_naming_distribution_and_entry_point(plugins):
    from shmfabric.functions.registry import PluginError, UnknownFunctionError, load

    with pytest.raises(PluginError, match=r"entry point boom = fakeplug_boom:Boom of distribution fakeplug 1\.0\) "
                                          r"cannot be imported: RuntimeError: plugin needs libfoo 2\.0"):
        load("boom")
    with pytest.raises(PluginError, match=r"fakeplug 1\.0\): module 'fakeplug_ok' has no 'Missing'"):
        load("noattr")
    with pytest.raises(PluginError, match="no pydantic `Config` model"):
        load("notfn")
    assert issubclass(PluginError, UnknownFunctionError)  # `run` answers it with exit status 2


def test_a_plugin_cannot_shadow_a_built_in_and_duplicates_name_both_owners(plugins):
    from shmfabric.functions import registry
    from shmfabric.functions.builtin.firewall import FirewallFunction

    with pytest.warns(RuntimeWarning, match=r"entry point firewall = fakeplug_ok:Evil of distribution fakeplug 1\.0 "
                                            r"is ignored: 'firewall' is a built-in"):
        assert registry.load("firewall") is FirewallFunction
    assert registry.available()["firewall"] == "shmfabric.functions.builtin.firewall:FirewallFunction"
    with pytest.raises(registry.PluginError, match=r"declared by more than one distribution \(dup = fakeplug2:Dup2 "
                                                   r"of distribution fakeplug2 1\.0, dup = fakeplug_ok:Dup of "
                                                   r"distribution fakeplug 1\.0\)"):
        registry.load("dup")
    assert len(registry.problems()) == 2


@pytest.mark.parametrize("function,message", [
    ("boom", "(entry point boom = fakeplug_boom:Boom of distribution fakeplug 1.0) cannot be imported"),
    ("noattr", "module 'fakeplug_ok' has no 'Missing'"),
    ("fails", "function 'fails' (entry point fails = fakeplug_ok:Fails of distribution fakeplug 1.0) cannot start "
              "with this configuration: RuntimeError: cannot open /dev/foo"),
])
def test_run_with_a_broken_plugin_exits_2_with_one_line(fab, plugins, function, message):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugins), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "shmfabric.functions.run", "--fabric", fab.name, "--node", "x",
                        "--function", function, "--duration", "0.5"], capture_output=True, text=True, timeout=60,
                       env=env)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert message in r.stderr, r.stderr
    assert fab.node_id("x") is None


# -- 9. rule-language edges ----------------------------------------------------------------------------
@pytest.mark.parametrize("text,message,hint", [
    ("ip saddr 10.0.0.0/33 accept", "an IPv4 prefix length must be 0..32", ""),
    ("ip6 saddr ::/129 accept", "an IPv6 prefix length must be 0..128", ""),
    ("ip saddr 10.0.0.1/8 accept", "'10.0.0.1/8' has host bits set", "write 10.0.0.0/8 for the network, or 10.0.0.1"),
    ("ip6 daddr fd00::1/64 accept", "has host bits set", "write fd00::/64 for the network"),
    ("tcp dport { 80 443 } accept", "'80 443' in a set: its items are separated by commas", "{ 80, 443 }"),
    ("tcp dport { 80,, 443 } accept", "',' where a port was expected", ""),
    ('accept comment "a" comment "b"', "a rule can have one 'comment'", ""),
])
def test_rule_language_edges_are_refused_with_the_reason(text, message, hint):
    from shmfabric.functions.rules import RuleSet, RuleSyntaxError

    with pytest.raises(RuleSyntaxError) as ei:
        RuleSet.parse(text, "t.rules")
    assert message in str(ei.value) and hint in str(ei.value), str(ei.value)


def test_rule_language_forms_that_stay_accepted():
    from shmfabric.functions.rules import RuleSet

    rs = RuleSet.parse('ip saddr 10.0.0.0/8 accept\nip6 saddr ::/0 drop\ntcp dport { 80, } accept\n'
                       'tcp dport {80,443} accept\nip saddr 10.0.0.1/32 accept comment "one"\n'
                       'ip saddr 10.0.0.0/255.0.0.0 accept')
    assert [r.comment for r in rs.rules] == ["", "", "", "", "one", ""]
    assert [(lo, hi) for lo, hi in rs.rules[3].dport.ranges] == [(80, 80), (443, 443)]


# -- second review of the changes above ------------------------------------------------------------
def test_one_sender_cannot_push_another_senders_long_reply_out():
    """The pending replies were shared by all senders (16): a node sending 16 first parts of
    never-finished replies evicted the manager's stats reply being reassembled."""
    from shmfabric.functions.control import PART_HEADER, PART_MAGIC, Reassembler, split_reply

    asm = Reassembler()
    legit = json.dumps({"ok": True, "id": 1, "c": {f"rule{i}_packets": i for i in range(400)}}).encode()
    parts = split_reply(legit, 1500, 1)
    asm.add(7, parts[0])
    for s in range(64):
        asm.add(9, PART_MAGIC + PART_HEADER.pack(s, 0, 10**9) + b"x")
    assert [asm.add(7, p) for p in parts[1:]][-1] == legit
    assert len([k for k in asm.pending() if k[0] == 9]) == 1  # one pending reply per sender


class BigTimer:
    name: ClassVar[str] = "bigtimer"
    Config = NoConfig

    def __init__(self, config, ctx):
        pass

    def process(self, frames, now, out):
        pass

    def on_timer(self, now):
        return 10 ** 400  # finite, but no float: `timer_at - now` raised OverflowError


def test_a_huge_int_from_on_timer_is_a_timer_error_not_the_end(fab):
    fab.attach("nxt")
    r = FunctionRunner(fab, "big", BigTimer, {}, ["nxt"])
    run = Running(r, 2.0)
    run.t.join(20)
    r.close()
    assert "exc" not in run.result, run.result
    assert r.c["timer_errors"] >= 1


class Ticker:
    name: ClassVar[str] = "ticker"

    class Config(BaseModel):
        interval: float = 3600.0

    def __init__(self, config, ctx):
        self.cfg, self.calls = config, 0

    def process(self, frames, now, out):
        pass

    def reconfigure(self, config):
        self.cfg = config

    def on_timer(self, now):
        self.calls += 1
        return now + self.cfg.interval


def test_a_reconfigure_asks_on_timer_again(fab):
    """on_timer ran only when its time came: a function that asked for an hour and was then
    reconfigured to tick every 0.1 s was not called for that hour."""
    fab.attach("nxt")
    with controlled(fab, "tick", Ticker, {}, ["nxt"]) as (r, run, ctl):
        assert wait_for(lambda: r.fn.calls >= 1)
        assert ctl.request("tick", {"op": "reconfigure", "config": {"interval": 0.1}}, timeout=10)["ok"]
        c0 = r.fn.calls
        assert wait_for(lambda: r.fn.calls - c0 >= 5), "on_timer was not asked again after the reconfigure"


def test_an_idle_firewall_reaps_a_connection_that_expires_before_the_time_on_timer_gave(fab):
    """A SYN made on_timer answer ~120 s (its SYN_SENT timeout); a UDP entry added later with a
    0.5 s timeout then stayed on an idle node until those 120 s were up."""
    import dataclasses

    from shmfabric.functions.builtin.firewall import FirewallFunction
    from shmfabric.net.build import tcp_frame, udp_frame

    src = fab.attach("src")
    fab.attach("nxt")
    r = FunctionRunner(fab, "fw", FirewallFunction, {"rules": "policy accept"}, ["nxt"])
    ct = r.fn.fw.conntrack
    ct.timeouts = dataclasses.replace(ct.timeouts, udp_unreplied=0.5)
    run = Running(r)
    try:
        src.wait_for_peer("fw")
        src.send_batch(r.node.id, [tcp_frame("10.0.0.1", "10.0.0.2", 40000, 80)[14:]])
        assert wait_for(lambda: len(ct) == 1)
        assert wait_for(lambda: r.timer_at is not None and r.timer_at - time.monotonic() > 60)
        src.send_batch(r.node.id, [udp_frame("10.0.0.1", "10.0.0.3", 5000, 53)[14:]])
        assert wait_for(lambda: len(ct) == 2)
        assert wait_for(lambda: len(ct) == 1, timeout=15), "the expired UDP entry stayed"
    finally:
        run.stop()
        r.close()


class HoldThenRelease:
    """Holds every frame (CONSUMED) until reconfigured, then emits them all."""

    name: ClassVar[str] = "holdrelease"
    Config = NoConfig

    def __init__(self, config, ctx):
        self.ctx, self.hold, self.held, self.seen = ctx, True, [], []

    def process(self, frames, now, out):
        for i, f in enumerate(frames):
            self.seen.append(f[1] * 256 + f[2])
            if self.hold:
                self.held.append(bytes(f))
                out[i] = Verdict.CONSUMED

    def reconfigure(self, config):
        self.hold = False
        for d in self.held:
            self.ctx.emit(d)
        self.held = []


def test_frames_taken_while_a_reconfigure_waits_for_a_full_ring_keep_their_order(fab):
    """A reconfigure handled inside the idle loop's receive emitted more than the next hop's ring
    holds: the blocked send's polls took frames, then that receive returned newer ones, which were
    processed first."""
    def frame(tag: int) -> bytes:
        return b"\x45" + tag.to_bytes(2, "big") + b"x" * 57

    src, nxt = fab.attach("src"), fab.attach("nxt")
    with controlled(fab, "mid", HoldThenRelease, {}, ["nxt"], batch=64) as (r, run, ctl):
        src.wait_for_peer("mid")
        for k in range(0, 600, 50):
            src.send_batch(r.node.id, [frame(t) for t in range(k, k + 50)])
            assert wait_for(lambda: len(r.fn.held) >= k + 50)
        time.sleep(0.3)  # idle: the loop waits in its receive
        ctl.node.send_control(r.node.id, json.dumps({"op": "reconfigure", "config": {}, "id": 7}).encode())
        assert wait_for(lambda: r.c["ring_full_waits"] > 0)
        tag, t0 = 1000, time.monotonic()
        while time.monotonic() - t0 < 0.08:  # frames arrive while the send is blocked
            src.send_batch(r.node.id, [frame(tag)])
            tag += 1
            time.sleep(0.004)
        got: list[int] = []
        end = time.monotonic() + 15
        while time.monotonic() < end and len(got) < 600 + (tag - 1000):
            with nxt.recv_batch(256, 0.02) as b:
                got += [f[1] * 256 + f[2] for f in b]
        later = [t for t in r.fn.seen if t >= 1000]
        assert len(got) == 600 + (tag - 1000) and later == sorted(later) == list(range(1000, tag)), later[:12]



def test_a_control_client_gets_a_reply_queued_behind_a_data_frame(fab):
    # The client waits for anything and takes the control messages at the front of its rings;
    # a data frame ahead of a reply in the same ring is dropped, and the reply behind it read.
    ctl = ControlClient(fab, "mgr")
    fake = fab.attach("fake")
    stop = threading.Event()

    def answer(src: int, payload: bytes) -> None:
        req = json.loads(payload)
        assert fake.send(src, IP)  # first a data frame, then the reply, in one ring
        assert fake.send_control(src, json.dumps({"ok": True, "id": req["id"], "n": 7}).encode())

    def serve() -> None:
        while not stop.is_set():
            fake.recv_batch(16, 0.05).release()

    fake.on_message = answer
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        for _ in range(3):
            reply = ctl.request("fake", {"op": "stats"}, timeout=10)
            assert reply["ok"] and reply["n"] == 7
        with ctl.node.recv_batch(16, 0) as b:
            assert len(b) == 0  # the data frames were taken (and dropped) on the way
    finally:
        stop.set()
        t.join(5)
        ctl.close()
