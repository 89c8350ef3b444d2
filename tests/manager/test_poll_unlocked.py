"""The loop's control requests (its stats polls and its config pushes) do not hold the state lock
while they wait for a reply:
- status answers while a poll waits for an instance's reply (before: each round held the lock up to
  STATS_TIMEOUT per instance not answering, and status waited as long);
- a reply (or no reply) to a poll counts only for the process asked: an instance restarted while
  its poll was in flight gets neither the old process's counters nor its failure;
- a config push of the loop racing an operator's reconfigure ends with the operator's config, in
  status and in what the instance was last sent;
- end to end: a SIGSTOPped instance does not hold up status, and is still judged unresponsive and
  restarted.

Real processes on a real fabric. The requests are held by wrappers (of the control channel, or of
the supervisor's `_request`) until the test lets them go on; nothing asserts how long anything took."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from shmfabric.functions.control import ControlClient
from shmfabric.manager import supervisor as supmod
from shmfabric.manager.supervisor import SupervisorError
from tests.manager.conftest import in_thread, status_within, until_events

pytestmark = pytest.mark.timeout(240)

CHAIN = """\
fabric: {name: "{fabric}", ring_size: 256, max_nodes: 16, networks: [{mtu: 1500, slots: 2048}]}
poll_interval: 0.1
policies:
  restart: {backoff_initial: 0.1, backoff_max: 1}
nodes:
  - {name: gen, function: generator, config: {rate: 2000, size: 128, flows: 16}}
  - name: fw
    function: firewall
    config: {rules: "policy accept\\nconntrack off"}
    restart: {unresponsive_after: UNRESPONSIVE}
  - {name: snk, function: sink}
chains:
  - {name: main, nodes: [gen, fw, snk]}
"""


def chain(unresponsive: float = 0) -> str:
    return CHAIN.replace("UNRESPONSIVE", f"{unresponsive:g}")


class _Channel:
    """The manager's control channel. A request `hold(target, op)` picks (once) is answered by the
    node as usual, then waits for `gate` (bounded) before its reply (or its error) is handed back,
    holding the channel as a slow reply does; `held` is set while it waits. Every reconfigure sent
    is recorded in `sent` (target, config)."""

    def __init__(self, fabric):
        self.inner = ControlClient(fabric, node_name="manager")
        self.hold = None
        self.held, self.gate = threading.Event(), threading.Event()
        self.sent: list[tuple[str, dict]] = []

    def request(self, target, op, timeout):
        hold = self.hold is not None and not self.held.is_set() and self.hold(target, op)
        if op.get("op") == "reconfigure":
            self.sent.append((target, dict(op["config"])))
        try:
            return self.inner.request(target, op, timeout)
        finally:
            if hold:
                self.held.set()
                assert self.gate.wait(120), "the test never let the request go on"

    def close(self):
        self.inner.close()


def _channel():
    made: list[_Channel] = []

    def factory(fabric):
        made.append(_Channel(fabric))
        return made[-1]

    return made, factory


def _tick_bounded(sup, what: str) -> None:
    """One round on another thread, which must end (a round that cannot take the lock fails the test)."""
    t, out = in_thread(sup.tick)
    t.join(30)
    assert not t.is_alive(), f"a round could not run: {what}"
    if "error" in out:
        raise out["error"]


def _inst(sup, name):
    return next(i for n in sup.nodes.values() for i in n.instances if i.name == name)


# -- 1. status while a poll waits for its reply -----------------------------------------------------
def test_status_answers_while_the_loops_poll_waits_for_a_reply(run_topology):
    made, factory = _channel()
    sup = run_topology(chain(), control_factory=factory)
    chan = made[0]
    chan.hold = lambda target, op: target == "fw" and op.get("op") == "stats"
    rnd, out = in_thread(sup.tick)
    try:
        assert chan.held.wait(60), "the round never polled fw"
        # the round is inside fw's poll (its reply held): status and node_status answer meanwhile
        st = status_within(sup, 30, " while the loop's poll of fw waited for its reply")
        assert [n["name"] for n in st["nodes"]] == ["gen", "fw", "snk"]
        assert st["nodes"][1]["instances"][0]["state"] == "running"
        t, got = in_thread(sup.node_status, "fw")
        t.join(30)
        assert not t.is_alive() and got["value"]["name"] == "fw"
        assert rnd.is_alive(), "the round ended before the test let fw's reply go"
    finally:
        chan.gate.set()
    rnd.join(60)
    assert not rnd.is_alive() and "error" not in out, out.get("error")
    # the reply, handed back after status answered, was applied: fw answered
    assert _inst(sup, "fw").stats_failures == 0 and _inst(sup, "fw").last_answer > 0


# -- 2. a reply from the process asked, applied to its instance restarted meanwhile ----------------
@pytest.mark.parametrize("reply", ["answer", "no-answer"])
def test_a_poll_in_flight_when_its_instance_restarted_is_not_credited_to_the_new_process(run_topology, reply):
    # The round's poll of fw is held (its answer is the old process's: counters it cannot have now, or
    # no answer at all) while fw is killed, restarted and polled by other rounds. Once let go, the
    # old process's answer must not be taken for the new one's, nor its silence count against it.
    sup = run_topology(chain(unresponsive=2.0))
    fw = _inst(sup, "fw")
    _tick_bounded(sup, "the first round")
    held, gate = threading.Event(), threading.Event()
    real = sup._request

    def request(target, op, timeout=supmod.CONTROL_TIMEOUT):
        if (target == "fw" and op.get("op") == "stats" and threading.current_thread().name == "held-round"
                and not held.is_set()):
            held.set()
            assert gate.wait(120), "the test never let the poll go on"
            if reply == "no-answer":
                raise SupervisorError("stats to 'fw' failed: no reply (the test)", status=504)
            return {"ok": True, "counters": {"in_frames": 10 ** 9, "out_frames": 10 ** 9},
                    "function_counters": {"stale": 1}}
        return real(target, op, timeout)

    sup._request = request
    errors: list[BaseException] = []

    def run() -> None:
        try:
            sup.tick()
        except BaseException as exc:  # checked below
            errors.append(exc)

    rnd = threading.Thread(target=run, name="held-round", daemon=True)
    rnd.start()
    try:
        assert held.wait(60), "the round never polled fw"
        old = fw.proc
        os.kill(old.pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not (fw.proc is not old and fw.state == "running" and fw.counters_at is not None
                   and fw.counters_at > fw.started_at and fw.stats_failures == 0):
            assert time.monotonic() < deadline, "fw was not restarted and polled while the held round waited"
            _tick_bounded(sup, "another round while a round's poll of fw waited for its reply")
            time.sleep(0.05)
        assert held.is_set() and rnd.is_alive()
        with sup.lock:
            counters, fcounters, answered = dict(fw.counters), dict(fw.function_counters), fw.last_answer
        assert fw.restarts == 1
    finally:
        gate.set()
    rnd.join(60)
    assert not rnd.is_alive() and not errors, errors
    with sup.lock:
        # before: the old process's counters replaced the new one's, and its silence counted as a
        # failed poll of the new process (judged unresponsive on it once unresponsive_after passed)
        assert fw.counters.get("in_frames") != 10 ** 9 and "stale" not in fw.function_counters
        assert fw.counters == counters and fw.function_counters == fcounters
        assert fw.last_answer == answered
        assert fw.stats_failures == 0
    sup._request = real
    for _ in range(3):
        _tick_bounded(sup, "a round after")
    assert fw.restarts == 1 and fw.state == "running"
    assert not any(e["kind"] == "hung" for e in sup.events)


# -- 3. the loop's config push racing an operator's reconfigure --------------------------------------
class _LockSpy:
    """`_op_lock`, telling (`waiting`) when a thread has to wait for it (an operator action queued)."""

    def __init__(self, lock):
        self.lock, self.waiting = lock, threading.Event()

    def acquire(self, blocking=True, timeout=-1):
        if self.lock.acquire(False):
            return True
        if not blocking:
            return False
        self.waiting.set()
        return self.lock.acquire(True, timeout)

    def release(self):
        self.lock.release()

    def locked(self):
        return self.lock.locked()


@pytest.mark.parametrize("how", ["api", "reload"])
def test_a_config_push_of_the_loop_racing_an_operators_reconfigure_ends_with_the_operators(
        run_topology, loop, how):
    # The loop pushes gen's recorded config (flows 16: as a push that timed out leaves it, pushed
    # again once gen answers); its push is held before it is sent while an operator pushes flows 32.
    # It goes on once the operator's push was sent, or once the operator waits for the loop's round,
    # whichever the supervisor lets happen. Either way gen must end running the operator's config.
    made, factory = _channel()
    sup = run_topology(chain(), control_factory=factory)
    chan = made[0]
    gen = _inst(sup, "gen")
    sup._op_lock = spy = _LockSpy(sup._op_lock)
    loop(sup)
    until_events(lambda: gen.function_counters.get("flows") == 16, sup, 60, "gen polled")
    old = dict(gen.config)
    new = {**old, "flows": 32}
    held, go = threading.Event(), threading.Event()
    real = sup._request

    def request(target, op, timeout=supmod.CONTROL_TIMEOUT):
        if (target == "gen" and op.get("op") == "reconfigure" and getattr(sup._local, "ticking", False)
                and not held.is_set()):
            held.set()
            assert go.wait(120), "the test never let the loop's push go on"
        return real(target, op, timeout)

    sup._request = request
    with sup.lock:
        gen.push_config = True
    try:
        assert held.wait(60), "the loop never pushed gen's config"
        if how == "api":
            op, out = in_thread(sup.reconfigure, "gen", new)
        else:
            src = Path(sup.source)
            src.write_text(src.read_text().replace("flows: 16", "flows: 32"))
            op, out = in_thread(sup.reload_file)
        # status answers while the loop's push is under way (before: the push held the lock)
        st = status_within(sup, 30, " while the loop's push to gen was under way")
        assert st["nodes"][0]["name"] == "gen"
        until_events(lambda: spy.waiting.is_set() or (("gen", new) in list(chan.sent)), sup, 60,
                     "the operator's push sent, or the operator waiting for the loop's round")
    finally:
        go.set()
    op.join(120)
    assert not op.is_alive() and "error" not in out, out.get("error")
    until_events(lambda: gen.function_counters.get("flows") == 32 and not gen.push_config, sup, 60,
                 "gen running the operator's config")
    for _ in range(3):  # and it stays so: no later push of the old config
        n = sup._sampled_at
        until_events(lambda: sup._sampled_at != n, sup, 30, "another round")
    assert gen.function_counters.get("flows") == 32 and not gen.push_config
    assert gen.config == new and sup.node_status("gen")["config"]["flows"] == 32
    last = [c for t, c in list(chan.sent) if t == "gen"][-1]
    assert last == new, last


# -- 4. end to end: a SIGSTOPped instance ------------------------------------------------------------
def test_a_stopped_instance_does_not_hold_up_status_and_is_still_restarted(run_topology, loop):
    made, factory = _channel()
    sup = run_topology(chain(unresponsive=2.0), control_factory=factory)
    chan = made[0]
    fw = _inst(sup, "fw")
    loop(sup)
    until_events(lambda: fw.counters.get("in_frames", 0) > 0, sup, 60, "fw polled")
    stopped = fw.proc
    os.kill(stopped.pid, signal.SIGSTOP)
    try:
        # its first poll after the SIGSTOP (not answered) is held once its wait for a reply is over
        chan.hold = lambda target, op: target == "fw" and op.get("op") == "stats"
        assert chan.held.wait(60), "fw was never polled after its SIGSTOP"
        st = status_within(sup, 30, " while the loop's poll of the stopped fw waited")
        (fw_st,) = [i for n in st["nodes"] if n["name"] == "fw" for i in n["instances"]]
        assert fw_st["pid"] == stopped.pid and fw_st["state"] == "running"
        chan.gate.set()
        # judged unresponsive (its polls unanswered for unresponsive_after) and restarted, as before
        until_events(lambda: fw.restarts == 1 and fw.state == "running" and fw.proc is not stopped, sup, 60,
                     "fw killed and restarted")
    finally:
        chan.gate.set()
        if stopped.poll() is None:
            stopped.kill()
    assert any(e["kind"] == "hung" and e["node"] == "fw" for e in sup.events)
    st = status_within(sup, 30)
    assert [i["state"] for n in st["nodes"] for i in n["instances"]] == ["running"] * 3
    # gen, held up by fw's full input ring meanwhile, was not taken for hung
    assert not any(e["node"] == "gen" and e["kind"] in ("hung", "exited") for e in sup.events)
    until_events(lambda: fw.counters_at is not None and fw.counters_at > fw.started_at and not fw.stats_failures,
                 sup, 60, "fw's new process polled")


# -- 5. the loop's pushes and operator actions -------------------------------------------------------
def test_the_loops_push_is_named_as_the_operation_under_way_while_it_waits(run_topology):
    # While the loop's config push waits for its reply it holds `_op_lock`: an operator action waiting
    # meanwhile must be told what holds it up, and status must show it, as for any operation.
    made, factory = _channel()
    sup = run_topology(chain(), control_factory=factory)
    chan = made[0]
    _tick_bounded(sup, "the first round")
    fw = _inst(sup, "fw")
    chan.hold = lambda target, op: target == "fw" and op.get("op") == "reconfigure"
    with sup.lock:
        fw.push_config = True  # as an unconfirmed put-back leaves it
    rnd, out = in_thread(sup.tick)
    try:
        assert chan.held.wait(60), "the round never pushed fw's config"
        st = status_within(sup, 30, " while the loop's push waited")
        assert st["operation"] is not None and st["operation"]["kind"] == "reconfigure"
        assert st["operation"]["node"] == "fw"
        with pytest.raises(supmod.OperationInProgress, match="config push to fw"):
            sup.reload_file(wait=0.2)
    finally:
        chan.gate.set()
    rnd.join(60)
    assert not rnd.is_alive() and "error" not in out, out.get("error")
    assert status_within(sup, 30)["operation"] is None
    assert not fw.push_config  # the push was answered: done


def test_a_blocked_instance_is_not_pushed_until_its_output_flows_again(run_topology, loop):
    # An instance whose output ring is full answers stats but holds a reconfigure back until its
    # batch is sent: the loop leaves it flagged and pushes once the output flows.
    made, factory = _channel()
    sup = run_topology(chain(), control_factory=factory)
    chan = made[0]
    fw, snk = _inst(sup, "fw"), _inst(sup, "snk")
    loop(sup)
    until_events(lambda: fw.counters.get("in_frames", 0) > 0, sup, 60, "fw polled")
    os.kill(snk.proc.pid, signal.SIGSTOP)
    try:
        until_events(lambda: "fw" in sup._full_out, sup, 60, "fw's output ring full")
        with sup.lock:
            fw.push_config = True
        # several rounds while fw stays blocked: none sends it the push
        rounds = [0]
        real_refresh = sup._refresh

        def counting_refresh(now):
            rounds[0] += 1
            return real_refresh(now)

        sup._refresh = counting_refresh
        until_events(lambda: rounds[0] >= 5, sup, 60, "five rounds")
        assert "fw" in sup._full_out
        assert not any(t == "fw" for t, _ in chan.sent), chan.sent
        assert fw.push_config
    finally:
        os.kill(snk.proc.pid, signal.SIGCONT)
    until_events(lambda: not fw.push_config, sup, 60, "fw pushed once its output flowed")
    assert [t for t, _ in chan.sent].count("fw") >= 1


def test_one_unanswered_push_ends_the_rounds_pushes(run_topology):
    # Pushes wait CONTROL_TIMEOUT each holding `_op_lock`: after one that got no answer the round
    # pushes no more (the rest next round), so operator actions wait at most one timeout for them.
    made, factory = _channel()
    sup = run_topology(chain(), control_factory=factory)
    chan = made[0]
    _tick_bounded(sup, "the first round")
    asked: list[str] = []
    real = sup._request

    def request(target, op, timeout=supmod.CONTROL_TIMEOUT):
        if op.get("op") == "reconfigure":
            asked.append(target)
            raise SupervisorError(f"no reply from {target}")  # as a push that timed out
        return real(target, op, timeout)

    sup._request = request
    with sup.lock:
        for name in ("gen", "fw", "snk"):
            _inst(sup, name).push_config = True
    _tick_bounded(sup, "a round with three pushes due")
    assert len(asked) == 1, asked
    _tick_bounded(sup, "the next round")
    assert len(asked) == 2, asked
    assert all(_inst(sup, n).push_config for n in ("gen", "fw", "snk"))  # none answered: all still due
    assert chan.sent == []  # (the wrapper refused them before the channel)
