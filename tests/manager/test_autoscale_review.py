"""The scale policy, from a review of autoscale: its steps run beside the watch loop (a step that waits,
for a new instance or for a reply from a stopped node, holds up neither restarts nor status), a node
whose own output is blocked by its next hop is not scaled out (an event says why), and a count a
reload set is the policy's new starting point (not undone at the next round).

Real processes on a real fabric; the supervisor's loop runs in a thread as `up` runs it, and the
tests never tick it themselves where a second ticking thread would do the loop's work for it. No
test needs root. Waits are bounded and generous; nothing asserts how long something took."""
from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import pytest

from shmfabric.functions.control import ControlClient
from shmfabric.manager.policy import ScaleAction
from tests.manager.conftest import status_within, until_events, wait_until

pytestmark = pytest.mark.timeout(240)

# n: the node the policy scales; t: a node of another chain whose instance the tests kill
BASE = """\
fabric: {name: "{fabric}", ring_size: 256, max_nodes: 16, networks: [{mtu: 1500, slots: 4096}]}
poll_interval: 0.1
policies:
  restart: {backoff_initial: 0.1, backoff_max: 1}
nodes:
  - name: gen
    function: generator
    config: {rate: 1000, size: 128, flows: 16}
  - name: n
    function: sink
    scale: {min_instances: 1, max_instances: 2, out_depth: 100000, in_depth: 0, cooldown: 600}
  - name: gen3
    function: generator
    config: {rate: 500, size: 128, flows: 16}
  - name: t
    function: sink
chains:
  - {name: a, nodes: [gen, n]}
  - {name: c, nodes: [gen3, t]}
"""

# s: a second node upstream of n (a source), SIGSTOPped by the test; never restarted for it
WITH_S = BASE.replace("  - name: gen3\n", "  - name: s\n    function: generator\n    config: {rate: 100, size: 128, "
                      "flows: 4}\n    restart: {unresponsive_after: 0}\n  - name: gen3\n").replace(
    "  - {name: c,", "  - {name: b, nodes: [s, n]}\n  - {name: c,")
assert WITH_S != BASE


def _status(sup, timeout: float = 10.0) -> dict:
    return status_within(sup, timeout, " while the scale step waits")


def _operation(sup) -> dict | None:
    return _status(sup)["operation"]


def _out_once(sup, name: str) -> None:
    """The policy asks for one more instance of `name`, once (the queue depth is not what is tested)."""
    fired: list[float] = []

    def observe(now, depth, n):
        if fired:
            return None
        fired.append(now)
        return ScaleAction.OUT

    sup.nodes[name].decider.observe = observe


def _running(sup, name: str) -> int:
    return len([i for i in sup.nodes[name].instances if i.active and i.state == "running"])


def _kill_t(sup):
    t = sup.nodes["t"].instances[0]
    old = t.pid
    os.kill(old, signal.SIGKILL)
    return t, old


def test_the_watch_restarts_and_status_answers_while_a_policy_step_waits_for_its_new_instance(
        run_topology, tmp_path, loop):
    # n-2 may not start before the test lets it (bounded: 120 s): the step waits for it all along
    flag = tmp_path / "go"
    wrapper = tmp_path / "gatedpy.sh"
    wrapper.write_text(f"#!/bin/sh\ncase \"$*\" in *'--node n-2 '*) i=0; while [ ! -e {flag} ] && [ $i -lt 2400 ]; "
                       f"do sleep 0.05; i=$((i+1)); done;; esac\nexec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    sup = run_topology(BASE, python=str(wrapper))
    loop(sup)
    try:
        _out_once(sup, "n")
        wait_until(lambda: (_operation(sup) or {}).get("kind") == "autoscale", what="the policy's step under way")
        t, old = _kill_t(sup)
        # the watch goes on while the step waits: t is restarted and runs again, the gate still shut
        until_events(lambda: t.restarts == 1 and t.pid != old and t.state == "running", sup, timeout=30,
               what="t restarted while the scale step waits for n-2")
        st = _status(sup)
        # still the same step: t was not restarted only once the step had given up on n-2
        assert st["operation"] and st["operation"]["kind"] == "autoscale" and st["operation"]["node"] == "n", (
            "the step ended before t was restarted", st["operation"], st["events"])
        assert _running(sup, "n") == 1  # the step has not finished: n-2 is still held back
        assert any(e["kind"] == "restart" and e["node"] == "t" for e in st["events"])
    finally:
        flag.touch()
    wait_until(lambda: _running(sup, "n") == 2 and _operation(sup) is None, timeout=60, what="n scaled out to 2")
    assert any(e["kind"] == "scale" and e["node"] == "n" and "out to 2" in e["detail"] for e in sup.events)
    assert t.state == "running"


class _SlowToS:
    """The manager's control channel, with a wait for s's `set_next` reply stretched to 120 s (the
    runtime's is 2 s): a scale step of n that re-steers its upstream waits on s, SIGSTOPped, until
    the test lets s go on. `asked` is set when that request is sent."""

    def __init__(self, fabric):
        self.inner = ControlClient(fabric, node_name="manager")
        self.asked = threading.Event()

    def request(self, target, op, timeout):
        if target == "s" and op.get("op") == "set_next":
            self.asked.set()
            timeout = 120.0
        return self.inner.request(target, op, timeout)

    def close(self):
        self.inner.close()


def test_status_and_restarts_go_on_while_a_policy_step_waits_for_a_stopped_upstream(run_topology, loop):
    channels: list[_SlowToS] = []

    def factory(fabric):
        channels.append(_SlowToS(fabric))
        return channels[-1]

    sup = run_topology(WITH_S, control_factory=factory)
    loop(sup)
    s = sup.nodes["s"].instances[0]
    os.kill(s.pid, signal.SIGSTOP)
    try:
        _out_once(sup, "n")
        assert channels[0].asked.wait(60), "the scale step never re-steered s"
        # the step waits for s's reply (up to 120 s): status answers meanwhile, and says so
        st = _status(sup)
        assert st["operation"] and st["operation"]["kind"] == "autoscale", st["operation"]
        t, old = _kill_t(sup)
        # the watch restarts t meanwhile (its new process runs; its first control answer may wait
        # for the control channel the step is using)
        wait_until(lambda: t.restarts == 1 and t.pid not in (None, old) and t.proc.poll() is None, timeout=30,
                   what="t restarted while the scale step waits for s")
        st = _status(sup)
        assert st["operation"] and st["operation"]["kind"] == "autoscale", st["operation"]
        assert any(e["kind"] == "restart" and e["node"] == "t" for e in st["events"])
    finally:
        os.kill(s.pid, signal.SIGCONT)
    # s answers: the step ends (n scaled out, s steered to both), and t runs
    wait_until(lambda: _running(sup, "n") == 2 and _operation(sup) is None, timeout=60, what="n scaled out to 2")
    wait_until(lambda: t.state == "running", timeout=30, what="t running")
    assert any(e["kind"] == "scale" and e["node"] == "n" and "out to 2" in e["detail"] for e in sup.events)


BLOCKED = """\
fabric: {name: "{fabric}", ring_size: 256, max_nodes: 16, networks: [{mtu: 1500, slots: 4096}]}
poll_interval: 0.1
policies:
  restart: {backoff_initial: 0.1, backoff_max: 1}
nodes:
  - name: gen
    function: generator
    config: {rate: 0, size: 128, flows: 64}
  - name: fw
    function: firewall
    config: {rules: "policy accept\\nconntrack off"}
    scale: {min_instances: 1, max_instances: 3, out_depth: 32, out_for: 0.3, in_depth: 4, in_for: 600, cooldown: 0.3}
  - name: snk
    function: sink
    restart: {unresponsive_after: 0}
chains:
  - {name: main, nodes: [gen, fw, snk]}
"""


def test_a_node_blocked_by_its_next_hop_is_not_scaled_out_and_an_event_says_why(run_topology, loop):
    sup = run_topology(BLOCKED)
    snk = sup.nodes["snk"].instances[0]
    os.kill(snk.pid, signal.SIGSTOP)  # fw's output ring to snk fills, then fw's own input
    rounds = [0]
    decide = sup.nodes["fw"].decider.observe

    def observe(now, depth, n):  # the policy as it is, its rounds counted
        rounds[0] += 1
        return decide(now, depth, n)

    sup.nodes["fw"].decider.observe = observe
    loop(sup)
    try:
        ev = until_events(lambda: next((e for e in list(sup.events) if e["kind"] == "scale-skipped" and e["node"] == "fw"),
                                 None), sup, timeout=60, what="the skipped scale-out of fw reported")
        assert "blocked by its next hop" in ev["detail"] and ("snk" in ev["detail"] or "refused" in ev["detail"]), ev
        # more policy rounds (each waits on the stopped sink: ~0.6 s) with fw's queue deep and its
        # output blocked, many times its out_for and cooldown: still no step
        start = rounds[0]
        until_events(lambda: rounds[0] >= start + 10, sup, timeout=120, what="10 more policy rounds")
        assert sup.nodes["fw"].depth > 32
        assert [i.name for i in sup.nodes["fw"].instances] == ["fw"]
        assert not any(e["kind"] == "scale" and e["node"] == "fw" for e in sup.events)
        # told once for this episode, not at every poll
        assert len([e for e in sup.events if e["kind"] == "scale-skipped"]) == 1
    finally:
        os.kill(snk.pid, signal.SIGCONT)


RELOAD = """\
fabric: {name: "{fabric}", ring_size: 256, max_nodes: 16, networks: [{mtu: 1500, slots: 2048}]}
poll_interval: 0.1
nodes:
  - name: gen
    function: generator
    config: {rate: 500, size: 128, flows: 16}
  - name: fw
    function: firewall
    config: {rules: "policy accept\\nconntrack off"}
    instances: 1
    scale: {min_instances: 1, max_instances: 4, in_depth: 8, in_for: 1, cooldown: 300}
  - name: snk
    function: sink
chains:
  - {name: main, nodes: [gen, fw, snk]}
"""


def test_a_count_a_reload_sets_is_the_policys_new_starting_point(run_topology):
    sup = run_topology(RELOAD)
    fw = sup.nodes["fw"]
    # fw quiet for longer than in_for: at min_instances the policy has nothing to do, but its
    # scale-in window has run out
    wait_until(lambda: fw.decider.below_since is not None and sup.clock() - fw.decider.below_since > 2,
               what="fw quiet for over in_for", sup=sup)
    src = Path(sup.source)
    src.write_text(src.read_text().replace("    instances: 1\n", "    instances: 3\n"))
    changes = sup.reload_file()
    assert changes["scaled"] == ["fw=3"], changes
    # the policy rounds after the reload, until fw has been quiet for twice in_for since it: its
    # windows and cooldown started again at the reload, so the count the file set stands (before:
    # the window that had run out scaled fw in at the next round)
    since = sup.clock()
    wait_until(lambda: fw.decider.below_since is not None and fw.decider.below_since >= since - 1
               and sup.clock() - fw.decider.below_since > 2, what="fw quiet for over in_for since the reload",
               sup=sup, timeout=60)
    step = getattr(sup, "_stepper", None)  # a step the last round started runs on its own thread
    if step is not None:
        step.join(60)
    assert _running(sup, "fw") == 3, [(i.name, i.state) for i in fw.instances]
    assert not any(e["kind"] == "scale" and e["node"] == "fw" for e in sup.events)
