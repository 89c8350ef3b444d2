"""What the manager tells a function about the nodes it sends to, when they are down or changing
(review of `--down` and `set_next`'s "down"):

- a function the loop restarts (after an exit and its backoff) gets every node it sends to that is not
  running as `--down`, one merely starting too: a port crash-looping before it attaches held a
  restarted load balancer in its start-up wait, and the manager killed it as hung, at each restart;
- an instance that was starting (restarted by the loop) while an operator replaced the node it sends
  to carried the old node on its command line: the replace's re-steer skipped it, it kept sending to
  the replaced instance, which never drained and was killed, and it kept that next hop for good;
- a replace re-steers the upstream with the instances that died since the loop last looked named
  down (it was refused, 502, and undone, for a port instance that had nothing to do with it);
- a staged instance (a scale-out) does not wait for a node restarting after its backoff (it waited
  for it, and the scale-out failed after START_TIMEOUT while that node crash-looped);
- a hop resolves all its names in one pass over the node table.

Real function processes on a real fabric, the supervisor's loop as under `shmfabric up`; the moments
that matter are held (a readiness probe, a restart, the loop's look at one instance) by wrapping the
supervisor's own methods, so each case happens every run, not by chance."""
from __future__ import annotations

import os
import signal
import sys
import threading
import uuid

import pytest

from shmfabric.fabric import Fabric
from shmfabric.functions.runtime import Hop
from shmfabric.manager.supervisor import START_TIMEOUT, SupervisorError
from tests.manager.conftest import counters
from tests.manager.test_adapter_gaps import _until, explain
from tests.manager.test_router_steer_adapter_down import _functions_topology

# the topology's sink as one instance (its default scales it to two)
ONE_SINK = ("instances: 2\n    scale: {min_instances: 2, max_instances: 2}\n", "instances: 1\n")

pytestmark = pytest.mark.timeout(150)

# sink-b's restart policy: restarted at once, again and again (a crash loop is not given up on)
LENIENT = "    restart: {backoff_initial: 0.2, backoff_max: 0.2, max_restarts: 1000, window: 1}\n"


def _with_sink_b_policy(text: str) -> str:
    return text.replace("  - name: sink-b\n    function: sink\n", "  - name: sink-b\n    function: sink\n" + LENIENT)


def _fake_sink_b(sup, program: str) -> dict:
    """From `armed["on"]` on, sink-b's restarts run `program` (a process that never attaches)."""
    armed = {"on": False}
    real = sup._argv

    def argv(node, inst, fd):
        if armed["on"] and inst.name == "sink-b":
            return [sys.executable, "-c", program]
        return real(node, inst, fd)
    sup._argv = argv
    return armed


def _gets(sup, inst: str, more: int = 50) -> object:
    before = counters(sup, inst).get("in_frames", 0)
    return _until(lambda: counters(sup, inst).get("in_frames", 0) > before + more)


def _hung(sup, n0: int, name: str) -> list:
    return [e for e in list(sup.events)[n0:] if e["kind"] == "hung" and e["node"] == name]


def test_a_function_restarted_while_a_port_crash_loops_before_attaching_comes_back_without_a_hung_kill(
        run_topology, loop):
    # lb (ports sink-a, sink-b) is killed while sink-b crash-loops (each run exits 1 after 2 s, before it
    # attaches). lb's restart is held until sink-b is starting again: the restart must not wait for it
    sup = run_topology(_with_sink_b_policy(_functions_topology("")))
    armed = _fake_sink_b(sup, "import time; time.sleep(2); raise SystemExit(1)")
    sink_b = sup.nodes["sink-b"].instances[0]
    real_respawn = sup._respawn

    def respawn(node, inst, now):
        if inst.name == "lb" and sink_b.state != "starting":
            return  # (still due: the next round tries again)
        real_respawn(node, inst, now)
    sup._respawn = respawn
    loop(sup)
    assert _gets(sup, "sink-a"), explain(sup, "lb", "sink-a")
    armed["on"] = True
    os.kill(sink_b.pid, signal.SIGKILL)
    assert _until(lambda: sink_b.state == "starting" and sink_b.restarts >= 1), explain(sup, "sink-b")
    n0 = len(sup.events)
    lb = sup.nodes["lb"].instances[0]
    pid = lb.pid
    os.kill(pid, signal.SIGKILL)
    # before: lb waited for sink-b (30 s) answering nothing, and was killed as hung after START_TIMEOUT
    # ("hung lb: attached but not answering control requests after 15s"), at each restart again
    assert _until(lambda: lb.state == "running" and lb.pid != pid, timeout=START_TIMEOUT + 5), (
        "lb did not come back while sink-b crash-looped\n" + explain(sup, "lb", "sink-b"))
    assert "sink-b" in lb.down_at_start, (lb.down_at_start, explain(sup, "lb", "sink-b"))
    assert not _hung(sup, n0, "lb"), explain(sup, "lb", "sink-b")
    assert _gets(sup, "sink-a"), "lb -> sink-a after its restart\n" + explain(sup, "lb", "sink-a")


def test_a_function_starting_while_the_node_it_sends_to_is_replaced_is_steered_to_the_new_one(
        run_topology, loop):
    # gen2 -> fw -> sink (one instance). fw is restarted by the loop and is still starting (its first
    # readiness probe is held) when the operator replaces sink: fw's command line names the old sink
    text = _functions_topology("").replace(*ONE_SINK)
    sup = run_topology(text)
    hold = threading.Event()
    real_ready = sup._ready

    def ready(inst):
        if hold.is_set() and inst.name == "fw":
            return False  # slow to answer its first probe (busy importing, say)
        return real_ready(inst)
    sup._ready = ready
    real_set_next = sup._set_next

    def set_next(node, *args, **kw):
        if node.cfg.name == "fw":
            hold.clear()  # fw answers from the replace's re-steer on
        return real_set_next(node, *args, **kw)
    sup._set_next = set_next
    loop(sup)
    assert _gets(sup, "sink"), explain(sup, "fw", "sink")
    fw = sup.nodes["fw"].instances[0]
    old = sup.nodes["sink"].instances[0]
    hold.set()
    pid = fw.pid
    os.kill(pid, signal.SIGKILL)
    assert _until(lambda: fw.state == "starting" and fw.pid != pid and sup.fabric.node_id("fw") is not None), (
        explain(sup, "fw"))
    with open(f"/proc/{fw.pid}/cmdline", "rb") as f:
        cmdline = f.read().split(b"\0")
    assert cmdline[cmdline.index(b"--next") + 1] == b"sink", cmdline  # (the case this test is about)
    n0 = len(sup.events)
    out = sup.replace("sink", version="2")
    new = [i["name"] for i in out["instances"]]
    assert new == ["sink-2"], out
    # before: the replace's re-steer skipped fw (starting); fw ran on with --next sink, the old sink
    # got its frames while it was to drain ("no reply to stop", SIGTERM, SIGKILL) and fw kept its
    # next hop for good (frames dropped as next_down)
    stops = [e["detail"] for e in list(sup.events)[n0:] if e["kind"] == "stop" and e["node"] == "sink"]
    assert old.exit_code == 0 and not [d for d in stops if "no reply" in d], (stops, explain(sup, "fw", "sink"))
    assert _until(lambda: sup._request("fw", {"op": "stats"})["next"] == ["sink-2"]), explain(sup, "fw", "sink")
    assert _gets(sup, "sink-2"), "fw -> sink-2 after the replace\n" + explain(sup, "fw", "sink")


def test_an_instance_that_comes_up_after_an_operation_changed_its_group_is_told_by_the_loop(run_topology, loop):
    # as above, but the operation (a scale-out of sink) does not wait for fw to come up (it gave up:
    # fw was slow): once fw runs, the loop finds its command line's group stale and tells it
    text = _functions_topology("").replace(*ONE_SINK)
    sup = run_topology(text)
    hold = threading.Event()
    real_ready = sup._ready

    def ready(inst):
        return False if hold.is_set() and inst.name == "fw" else real_ready(inst)
    sup._ready = ready
    sup._await_start = lambda inst: None  # (no such wait before the fix: the same)
    loop(sup)
    fw = sup.nodes["fw"].instances[0]
    hold.set()
    pid = fw.pid
    os.kill(pid, signal.SIGKILL)
    assert _until(lambda: fw.state == "starting" and fw.pid != pid and sup.fabric.node_id("fw") is not None), (
        explain(sup, "fw"))
    sup.scale("sink", 2)
    assert fw.state == "starting"  # (skipped by the scale-out's re-steer: the case this test is about)
    hold.clear()
    # before: fw ran on with --next sink for good; sink-2 got nothing from it
    def told() -> bool:
        return fw.state == "running" and sup._request("fw", {"op": "stats"})["next"] == ["sink", "sink-2"]
    assert _until(told), explain(sup, "fw", "sink")
    assert _gets(sup, "sink-2"), explain(sup, "fw", "sink")


def test_a_replace_while_an_unrelated_port_instance_died_unseen_is_not_refused(run_topology, loop):
    # lb's ports: sink-a, sink-b. sink-b dies and the loop has not looked at it yet (held: it is still
    # "running" to the manager) when the operator replaces sink-a: lb's re-steer names sink-b down
    sup = run_topology(_functions_topology(""))
    sink_b = sup.nodes["sink-b"].instances[0]
    real_watch = sup._watch

    def watch(node, inst, now):
        if inst is sink_b:
            return  # not looked at: its death goes unseen
        real_watch(node, inst, now)
    sup._watch = watch
    loop(sup)
    assert _gets(sup, "sink-a"), explain(sup, "lb", "sink-a")
    os.kill(sink_b.pid, signal.SIGKILL)
    assert _until(lambda: sup.fabric.node_id("sink-b") is None), explain(sup, "sink-b")
    assert sink_b.state == "running"  # (unseen: the case this test is about)
    # before: SupervisorError 502 "set_next on 'lb' refused: next hop node(s) 'sink-b' not attached ...",
    # the replace undone
    try:
        out = sup.replace("sink-a", version="2")
    except SupervisorError as exc:
        pytest.fail(f"the replace was refused while sink-b was dead: {exc}\n" + explain(sup, "lb", "sink-b"))
    new = [i["name"] for i in out["instances"]]
    assert sup._request("lb", {"op": "stats"})["port_instances"]["sink-a"] == new, explain(sup, "lb", "sink-a")
    steer = [e["detail"] for e in sup.events if e["kind"] == "steer" and e["node"] == "lb"]
    assert steer and "sink-b down" in steer[-1], steer
    assert _gets(sup, new[0]), explain(sup, "lb", "sink-a")

    # an instance the operation under way started is named down only by its state: one that died is
    # a refusal, which the operation undoes itself on
    with sup.lock:
        mine = sup.nodes["sink-a"].instances[0]
        saved = (sup._op_thread, sup._op_new)
        try:
            sup._op_thread, sup._op_new = threading.get_ident(), [mine]
            assert sup._not_up([mine.name, "sink-b"]) == ["sink-b"]
            os.kill(mine.pid, signal.SIGKILL)
            mine.proc.wait(10)
            assert sup._not_up([mine.name, "sink-b"]) == ["sink-b"]
            sup._op_new = []
            assert sup._not_up([mine.name, "sink-b"]) == sorted([mine.name, "sink-b"])
        finally:
            sup._op_thread, sup._op_new = saved


def test_a_scale_out_while_a_node_it_sends_to_restarts_after_its_backoff_does_not_wait_for_it(
        run_topology, loop):
    # sink-b is restarting (starting again after its backoff; the restart never attaches) when the
    # operator scales lb out: the new lb-2 (staged) starts without waiting for sink-b
    sup = run_topology(_with_sink_b_policy(_functions_topology("")))
    armed = _fake_sink_b(sup, "import time; time.sleep(60)")
    sink_b = sup.nodes["sink-b"].instances[0]
    loop(sup)
    armed["on"] = True
    os.kill(sink_b.pid, signal.SIGKILL)
    assert _until(lambda: sink_b.state == "starting" and sink_b.restarts >= 1), explain(sup, "sink-b")
    # before: lb-2 waited for sink-b, answered nothing, and the scale-out failed after START_TIMEOUT
    # ("node(s) lb-2 attached but did not answer a control request as ready within 15s"), undone
    try:
        sup.scale("lb", 2)
    except SupervisorError as exc:
        pytest.fail(f"the scale-out failed while sink-b restarted: {exc}\n" + explain(sup, "lb", "sink-b"))
    lb2 = next(i for i in sup.nodes["lb"].instances if i.name == "lb-2")
    assert lb2.state == "running" and lb2.down_at_start == ("sink-b",), (lb2.state, lb2.down_at_start)
    assert sink_b.state != "running"  # (still restarting: the case this test is about)


def test_a_hop_resolves_all_its_names_in_one_pass_over_the_node_table():
    name = f"ssr-{uuid.uuid4().hex[:8]}"
    fab = Fabric.create(name, networks=[{"mtu": 1500, "slots": 256}], ring_size=64)
    try:
        a, b = fab.attach("a"), fab.attach("b")
        want = [fab.node_ref("a"), None, fab.node_ref("b")]
        calls = []
        real = fab.node_refs

        def node_refs(names):
            calls.append(list(names))
            return real(names)
        fab.node_refs = node_refs

        def node_ref(name):
            raise AssertionError("a pass over the node table per name")
        fab.node_ref = node_ref
        hop = Hop(fab, ["a", "gone", "b"])
        hop.resolve(0, force=True)
        assert calls == [["a", "gone", "b"]]
        assert hop.ids == [want[0][0], None, want[2][0]] and hop.gens == [want[0][1], 0, want[2][1]]
        assert hop.missing() == ["gone"]
        a.detach()
        b.detach()
    finally:
        fab.close()
        Fabric.destroy(name)


# -- second review --------------------------------------------------------------------------------


def test_a_late_steer_that_fails_once_is_tried_again(run_topology, loop):
    # an instance comes up with a stale group (started before a scale-out) and the loop's first
    # set_next to it fails (a control timeout: its set_next deferred behind a full ring): it was
    # never asked again and kept the old group for good
    sup = run_topology(_functions_topology("").replace(*ONE_SINK))
    hold = threading.Event()
    real_ready = sup._ready
    sup._ready = lambda inst: False if hold.is_set() and inst.name == "fw" else real_ready(inst)
    sup._await_start = lambda inst: None  # (the operation does not wait for it: the loop tells it)
    real_request = sup._request
    failed = []

    def request(target, op, timeout=2.0):
        if target == "fw" and op.get("op") == "set_next" and (sup._op or {}).get("kind") == "resteer" and not failed:
            failed.append(op)
            raise SupervisorError("set_next to 'fw' failed: timed out (injected)", status=504)
        return real_request(target, op, timeout)

    sup._request = request
    loop(sup)
    fw = sup.nodes["fw"].instances[0]
    hold.set()
    pid = fw.pid
    os.kill(pid, signal.SIGKILL)
    assert _until(lambda: fw.state == "starting" and fw.pid != pid and sup.fabric.node_id("fw") is not None)
    sup.scale("sink", 2)
    hold.clear()
    assert _until(lambda: failed), explain(sup, "fw")
    assert _until(lambda: real_request("fw", {"op": "stats"})["next"] == ["sink", "sink-2"], timeout=20), (
        "fw was never told the scaled-out group after one failed late steer\n" + explain(sup, "fw"))


def test_a_reload_whose_new_instance_dies_before_the_commit_still_steers_upstream_and_drains_the_old(
        run_topology, loop):
    # a reload replaces sink (a new version); the new one dies after it answered, before the commit's
    # re-steer: named down past the commit (nothing is undone there), so fw is steered off the old
    # sink, which drains, instead of a refused steer leaving fw on it and the old sink killed
    from shmfabric.manager.config import parse_topology

    sup = run_topology(_functions_topology("").replace(*ONE_SINK))
    loop(sup)
    real_wait_up = sup._wait_up
    killed: list = []

    def wait_up(insts, timeout, judge=False):
        real_wait_up(insts, timeout, judge)
        for i in insts:
            if i.node == "sink" and i.staged and not killed:
                os.kill(i.pid, signal.SIGKILL)
                i.proc.wait(10)
                killed.append(bool(_until(lambda: sup.fabric.node_id(i.name) is None, timeout=15)))

    sup._wait_up = wait_up
    with open(sup.source) as f:
        body = f.read().replace("  - name: sink\n    function: sink\n",
                                "  - name: sink\n    function: sink\n    version: \"2\"\n")
    out = sup.reload(parse_topology(body, sup.source))
    assert killed == [True]
    assert not out.get("warnings"), out
    assert not [e for e in sup.events if e["kind"] == "stop" and "no reply to stop" in e["detail"]], explain(
        sup, "sink", "fw")
