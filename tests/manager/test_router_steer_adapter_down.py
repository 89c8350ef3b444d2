"""Re-steering a router while one of its port adapters is down (restarting in backoff, or failed for
good). The manager's `set_next` to the router names every port's instances; the runtime refused it
while any of them was not attached, so a re-steer the manager needed then (another port adapter
back from a restart, a port function replaced) failed: an error event, or an operator's `replace`
refused and the router left on stale next hops. Now the manager names the instances it knows are
not up (`down`), the runtime takes those as given and resolves them when they attach (frames to
them meanwhile are dropped and counted, `next_down`), and still refuses any other missing node.

Real processes for the manager's part: TAP adapters in network namespaces created here (random
names, deleted after), a firewall and a router, the supervisor's loop as under `shmfabric up`;
the user's checks are the manager's events, the operator's action and a ping through the chain.
The runtime's part runs the router (and a source with a scaled-out next hop) in-process with plain
nodes where it sends.

Also a function that STARTS while a node it sends to is down: it waited (30 s) for every next hop
and port before it answered the manager, which killed it as hung after START_TIMEOUT (15 s) and
started it again, for ever; e.g. a router killed while one of its port adapters was down never came
back. Now the manager passes the instances it knows are down (`--down`: in backoff, failed for good;
to an instance the loop restarts, every one not running; nodes started together, by `up` or an
operator action, still wait for each other) and the function starts without waiting for those."""
from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import uuid
from typing import Iterator

import pytest

from shmfabric.fabric import Fabric
from shmfabric.functions import registry
from shmfabric.functions.builtin.router import Router
from shmfabric.functions.control import ControlClient
from shmfabric.functions.runtime import FunctionRunner
from shmfabric.manager.supervisor import START_TIMEOUT
from tests.manager.conftest import counters
from tests.manager.test_adapter_gaps import _until, explain, ping_within, spaces, tap, topology  # noqa: F401

pytestmark = pytest.mark.timeout(120)
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="TAP adapters and network namespaces need root")

# web2's restart policy (a field of its node, under tap()'s): held in backoff for the whole test, or
# its first exit is for good
HELD = "    restart: {backoff_initial: 60, backoff_max: 60}\n"
FAILS = "    restart: {max_restarts: 0}\n"


def _web2(ns: str, how: str) -> str:
    """The adapter `web2` (10.78.0.3), killed later: held in backoff, or failed for good."""
    return tap("web2", ns, 3) + (HELD if how == "restarting" else FAILS)


def _kill_and_wait(sup, name: str, state: str) -> None:
    os.kill(sup.nodes[name].instances[0].pid, signal.SIGKILL)
    assert _until(lambda: sup.nodes[name].instances[0].state == state), explain(sup, name)


def _router_ports(sup) -> dict:
    return sup._request("router", {"op": "stats"})["port_instances"]


def _back(sup, name: str, pid: int):
    """A predicate: `name`'s (first) instance runs again, in another process than `pid`."""
    def back() -> bool:
        inst = sup.nodes[name].instances[0]
        return inst.state == "running" and inst.pid != pid
    return back


def _hung(sup, n0: int, name: str) -> list:
    return [e for e in list(sup.events)[n0:] if e["kind"] == "hung" and e["node"] == name]


@root_only
@pytest.mark.parametrize("how", ["restarting", "failed"])
def test_a_port_adapter_back_from_a_restart_resteers_the_router_while_another_port_adapter_is_down(
        spaces, run_topology, loop, how):
    # router ports: client, web, web2. web2 is down; web is killed and restarted by the policy: once
    # it runs, the manager re-steers web's upstream (the router) with every port's instances
    a, b, c = spaces(3)
    sup = run_topology(topology(tap("client", a, 1) + tap("web", b, 2) + _web2(c, how),
                                {"client": 1, "web": 2, "web2": 3}))
    loop(sup)
    assert ping_within(a, 2) and ping_within(a, 3), "client -> web, web2 at the start\n" + explain(sup, "router")
    _kill_and_wait(sup, "web2", "backoff" if how == "restarting" else "failed")
    n0 = len(sup.events)
    pid = sup.nodes["web"].instances[0].pid
    os.kill(pid, signal.SIGKILL)

    def steered() -> list:
        return [e for e in list(sup.events)[n0:]
                if (e["kind"] == "steer" and e["node"] == "router") or e["kind"] == "error"]

    assert _until(steered), "the router was not re-steered after web's restart\n" + explain(sup, "web", "router")
    errors = [e for e in list(sup.events)[n0:] if e["kind"] == "error"]
    # before: "error web: re-steering upstream failed: set_next on 'router' refused: next hop node(s)
    # 'web2' not attached to fabric ..."
    assert not errors, "re-steering the router failed while web2 was down\n" + explain(sup, "web", "web2", "router")
    assert sup.nodes["web"].instances[0].pid != pid
    assert ping_within(a, 2), "client -> web after its restart\n" + explain(sup, "web", "router")
    assert sup.nodes["web2"].instances[0].state != "running"  # (still down: the case this test is about)


@root_only
def test_replacing_a_routers_port_function_while_a_port_adapter_restarts_steers_the_router_to_it(
        spaces, run_topology, loop):
    # router ports: client, wfw (a firewall in front of web: chain [wfw, web]), web2. web2 is in
    # backoff when the operator replaces wfw (wfw -> wfw-2): the router must be steered to wfw-2
    a, b, c = spaces(3)
    wfw = '- name: wfw\n  function: firewall\n  config: {rules: "policy accept"}\n'
    sup = run_topology(topology(tap("client", a, 1) + tap("web", b, 2) + _web2(c, "restarting"),
                                {"client": 1, "wfw": 2, "web2": 3}, fw_extra=wfw,
                                chains="  - {name: c, nodes: [fw, router]}\n  - {name: w, nodes: [wfw, web]}\n"))
    loop(sup)
    assert ping_within(a, 2) and ping_within(a, 3), "client -> web, web2 at the start\n" + explain(sup, "router")
    _kill_and_wait(sup, "web2", "backoff")
    # before: SupervisorError 502 "set_next on 'router' refused: next hop node(s) 'web2' not attached
    # to fabric ...": the replace undone, and the operator told it failed for a reason not theirs
    sup.replace("wfw", version="2")
    assert [i.name for i in sup.nodes["wfw"].instances] == ["wfw-2"], explain(sup, "wfw")
    assert _router_ports(sup)["wfw"] == ["wfw-2"], explain(sup, "router")
    assert ping_within(a, 2), "client -> web through wfw-2 after the replace\n" + explain(sup, "router", "wfw")
    # web2 comes back (its backoff's end, brought forward): the router reaches it again
    with sup.lock:
        sup.nodes["web2"].instances[0].restart_at = sup.clock()
    assert ping_within(a, 3, timeout=20), "client -> web2 once it is back\n" + explain(sup, "router", "web2")


@root_only
@pytest.mark.parametrize("how", ["restarting", "failed"])
def test_a_router_killed_while_a_port_adapter_is_down_comes_back_and_routes_to_its_other_ports(
        spaces, run_topology, loop, how):
    # router ports: client, web, web2. web2 is down (backoff, or failed for good) when the router is
    # killed: the manager restarts the router with web2 on its command line (--port web2=web2)
    a, b, c = spaces(3)
    sup = run_topology(topology(tap("client", a, 1) + tap("web", b, 2) + _web2(c, how),
                                {"client": 1, "web": 2, "web2": 3}))
    loop(sup)
    assert ping_within(a, 2) and ping_within(a, 3), "client -> web, web2 at the start\n" + explain(sup, "router")
    _kill_and_wait(sup, "web2", "backoff" if how == "restarting" else "failed")
    n0 = len(sup.events)
    pid = sup.nodes["router"].instances[0].pid
    os.kill(pid, signal.SIGKILL)
    # before: the new router waited (30 s) for web2 before it answered; the manager killed it as hung
    # after START_TIMEOUT ("hung router: attached but not answering control requests after 15s") and
    # started it again, for ever. Waited for here longer than START_TIMEOUT, to see that happen
    assert _until(_back(sup, "router", pid), timeout=START_TIMEOUT + 10), (
        "the router did not come back while web2 was down\n" + explain(sup, "router", "web2"))
    assert not _hung(sup, n0, "router"), explain(sup, "router", "web2")
    assert ping_within(a, 2), "client -> web after the router's restart\n" + explain(sup, "router", "web2")
    assert sup.nodes["web2"].instances[0].state != "running"  # (still down: the case this test is about)
    if how == "restarting":
        # web2 comes back (its backoff's end, brought forward): the router reaches it again
        with sup.lock:
            sup.nodes["web2"].instances[0].restart_at = sup.clock()
        assert ping_within(a, 3, timeout=20), "client -> web2 once it is back\n" + explain(sup, "router", "web2")


# -- the same without TAP adapters (no root): a load balancer's port, a firewall's next group -------
def _functions_topology(held: str) -> str:
    """gen -> lb (ports sink-a, sink-b) and gen2 -> fw -> sink (2 instances); `held` (sink-b or sink)
    gets a restart policy that holds it in backoff for the whole test."""
    nodes = {
        "gen": "function: generator\n    config: {rate: 2000, size: 128, flows: 64}\n",
        "lb": "function: l4lb\n    ports: [sink-a, sink-b]\n"
              "    config: {backends: [{node: sink-a}, {node: sink-b}]}\n",
        "sink-a": "function: sink\n",
        "sink-b": "function: sink\n",
        "gen2": "function: generator\n    config: {rate: 2000, size: 128, flows: 64}\n",
        "fw": 'function: firewall\n    config: {rules: "policy accept\\nconntrack off"}\n',
        "sink": "function: sink\n    instances: 2\n    scale: {min_instances: 2, max_instances: 2}\n",
    }
    body = "".join(f"  - name: {n}\n    {v}" + (HELD if n == held else "") for n, v in nodes.items())
    return ('fabric: {name: "{fabric}", ring_size: 256, max_nodes: 16, networks: [{mtu: 1500, slots: 2048}]}\n'
            "poll_interval: 0.1\napi: null\npolicies:\n  restart: {backoff_initial: 0.1, backoff_max: 1}\n"
            "nodes:\n" + body
            + "chains:\n  - {name: l, nodes: [gen, lb]}\n  - {name: f, nodes: [gen2, fw, sink]}\n")


@pytest.mark.parametrize("case", [("lb", "sink-b", "sink-a"), ("fw", "sink-2", "sink")],
                         ids=["a-port", "a-next-group-member"])
def test_a_function_killed_while_a_node_it_sends_to_is_down_comes_back_and_reaches_it_once_it_is_up(
        run_topology, loop, case):
    fn, down, other = case
    sup = run_topology(_functions_topology("sink-b" if down == "sink-b" else "sink"))
    loop(sup)

    def gets(inst: str) -> object:
        before = counters(sup, inst).get("in_frames", 0)
        return _until(lambda: counters(sup, inst).get("in_frames", 0) > before + 50)

    assert gets(down) and gets(other), "traffic at the start\n" + explain(sup, fn, "sink", "sink-b")
    victim = next(i for n in sup.nodes.values() for i in n.instances if i.name == down)
    down_node = victim.node  # (sink-2's node is sink: explain() names nodes)
    os.kill(victim.pid, signal.SIGKILL)
    assert _until(lambda: victim.state == "backoff"), explain(sup, down_node)
    n0 = len(sup.events)
    pid = sup.nodes[fn].instances[0].pid
    os.kill(pid, signal.SIGKILL)
    # before: killed as hung after START_TIMEOUT and started again, for ever
    assert _until(_back(sup, fn, pid), timeout=START_TIMEOUT + 10), (
        f"{fn} did not come back while {down} was down\n" + explain(sup, fn, down_node))
    assert not _hung(sup, n0, fn), explain(sup, fn, down_node)
    assert gets(other), f"{fn} -> {other} after its restart\n" + explain(sup, fn, down_node)
    assert _until(lambda: counters(sup, fn).get("next_down", 0) > 0), explain(sup, fn, down_node)  # dropped, counted
    with sup.lock:  # the down instance's backoff ends now
        victim.restart_at = sup.clock()
    assert _until(lambda: victim.state == "running"), explain(sup, down_node)
    assert gets(down), f"{fn} -> {down} once it is back\n" + explain(sup, fn, down_node)



def test_a_functions_command_line_names_down_what_it_must_not_wait_for(run_topology):
    # `up` (and a reload, a scale-out) starts a chain's nodes together and each waits for the next ones
    # to attach: a staged instance waits for those starting with it; not for instances in backoff,
    # failed for good, or starting again after their backoff (a restart by the loop, which may
    # crash-loop). An instance the loop restarts waits for none that is not running
    sup = run_topology(_functions_topology(""))

    def down_of(fn: str, staged: bool = False) -> list[str]:
        inst = sup.nodes[fn].instances[0]
        saved = (inst.staged, inst.steer, inst.down_at_start)
        inst.staged = staged
        try:
            argv = sup._argv(sup.nodes[fn], inst, 9)
        finally:
            inst.staged, inst.steer, inst.down_at_start = saved
        return [argv[k + 1] for k, a in enumerate(argv) if a == "--down"]

    sink_b, sink_2 = sup.nodes["sink-b"].instances[0], sup.nodes["sink"].instances[1]
    with sup.lock:
        saved = [(i, i.state, i.staged) for i in (sink_b, sink_2)]
        try:
            for staged in (False, True):
                assert down_of("lb", staged) == [] and down_of("fw", staged) == []  # all running
            sink_b.state = sink_2.state = "starting"  # restarted by the loop (after its backoff)
            for staged in (False, True):
                assert down_of("lb", staged) == ["sink-b"] and down_of("fw", staged) == ["sink-2"]
            sink_b.staged = sink_2.staged = True  # started by the same action: waited for
            assert down_of("lb", True) == [] and down_of("fw", True) == []
            sink_b.staged = sink_2.staged = False
            sink_b.state = sink_2.state = "backoff"
            for staged in (False, True):
                assert down_of("lb", staged) == ["sink-b"] and down_of("fw", staged) == ["sink-2"]
            sink_b.state = sink_2.state = "failed"  # (out of the group: sink-b's name stands in for it)
            for staged in (False, True):
                assert down_of("lb", staged) == ["sink-b"] and down_of("fw", staged) == []
            sup.nodes["sink-b"].instances.remove(sink_b)  # between an adapter's stop and its start, say
            assert down_of("lb", True) == []  # (a staged instance waits: the action is starting it)
            assert down_of("lb") == ["sink-b"]  # (a restart does not: nothing may ever start it)
        finally:
            if sink_b not in sup.nodes["sink-b"].instances:
                sup.nodes["sink-b"].instances.append(sink_b)
            for i, st, sg in saved:
                i.state, i.staged = st, sg


# -- the runtime's part: the router in-process, plain nodes at its ports --------------------------------
@pytest.fixture
def fab() -> Iterator[Fabric]:
    name = f"rsd-{uuid.uuid4().hex[:8]}"
    f = Fabric.create(name, networks=[{"mtu": 1500, "slots": 2048}], ring_size=256)
    yield f
    f.close()
    Fabric.destroy(name)


def _ipv4_to(host: int) -> bytes:
    """A minimal IPv4 header (and 20 bytes of payload) to 10.0.0.`host`: all the router reads."""
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 17, 0, bytes([10, 0, 0, 9]),
                       bytes([10, 0, 0, host])) + bytes(20)


def _received(node, want: int, timeout: float = 10.0) -> int:
    """Frames `node` received until it had `want` (or more: a batch is taken whole) or `timeout`."""
    got = 0
    end = time.monotonic() + timeout
    while got < want and time.monotonic() < end:
        with node.recv_batch(256, 0.05) as batch:
            got += len(batch)
    return got


def test_set_next_takes_a_port_named_down_as_given_and_reaches_it_once_it_attaches(fab):
    src, a, b = fab.attach("src"), fab.attach("a"), fab.attach("b")
    r = FunctionRunner(fab, "router", Router, {"routes": {"10.0.0.1/32": "a", "10.0.0.2/32": "b"}},
                       ports=["a", "b"])
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("stats", r.run(30.0)), daemon=True)
    t.start()
    ctl = ControlClient(fab, "mgr")
    try:
        assert src.wait_for_peer("router") == r.node.id
        b.detach()  # port b's node went away (its adapter restarts)
        msg = {"op": "set_next", "next": [], "ports": {"a": ["a"], "b": ["b"]}}
        bad = ctl.request("router", msg, timeout=5)
        # not named down: refused at once, as before (the manager relies on it for nodes it started)
        assert not bad["ok"] and "'b'" in bad["error"], bad
        assert not ctl.request("router", {**msg, "next": ["ghost"], "down": ["b"]}, timeout=5)["ok"]
        assert not ctl.request("router", {**msg, "down": "b"}, timeout=5)["ok"]  # not a list of names
        ok = ctl.request("router", {**msg, "down": ["b"]}, timeout=5)
        assert ok["ok"], ok
        assert src.send_batch(r.node.id, [_ipv4_to(1)] * 5 + [_ipv4_to(2)] * 5) == 10
        assert _received(a, 5) == 5  # the other port flows
        assert _until(lambda: r.c["next_down"] == 5), r.c  # b's frames: dropped and counted
        b2 = fab.attach("b")  # back: the router resolves it by name, no further set_next
        end = time.monotonic() + 10
        got = 0
        while got == 0 and time.monotonic() < end:
            assert src.send_batch(r.node.id, [_ipv4_to(2)]) == 1
            got = _received(b2, 1, 0.2)
        assert got == 1, r.c
    finally:
        ctl.close()
        r.stopping = True
        t.join(15)
        r.close()
    assert not t.is_alive()


def test_a_source_steered_to_a_group_with_an_instance_down_goes_on_and_reaches_it_once_it_attaches(fab):
    # a scaled-out next hop with one instance restarting: a source (its own send path) used to raise
    # on the instance's missing id (TypeError) and die
    x1 = fab.attach("x1")
    r = FunctionRunner(fab, "gen", registry.load("generator"), {"rate": 2000, "size": 64, "flows": 16}, ["x1"])
    out: dict = {}

    def run() -> None:
        try:
            out["stats"] = r.run(30.0)
        except BaseException as exc:  # noqa: BLE001 - reported below
            out["exc"] = repr(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    ctl = ControlClient(fab, "mgr")
    try:
        assert _received(x1, 1) >= 1
        ok = ctl.request("gen", {"op": "set_next", "next": ["x1", "x2"], "down": ["x2"]}, timeout=5)
        assert ok["ok"], ok
        assert _until(lambda: r.c["next_down"] > 0 or not t.is_alive()), r.c
        assert _received(x1, 50) >= 50 and t.is_alive(), out  # still sending to x1
        x2 = fab.attach("x2")
        assert _received(x2, 1) >= 1, r.c  # found by name once attached
    finally:
        ctl.close()
        r.stopping = True
        t.join(15)
        r.close()
    assert not t.is_alive() and "exc" not in out, out


def _fn_run(*argv: str) -> subprocess.Popen:
    """`python -m shmfabric.functions.run ARGV` as its own process (as the manager starts it)."""
    return subprocess.Popen([sys.executable, "-m", "shmfabric.functions.run", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_function_started_with_a_port_named_down_answers_at_once_and_reaches_it_once_it_attaches(fab):
    # python -m shmfabric.functions.run ... --port a --port b --down b, b not attached: it starts (it
    # answers stats), routes to a, counts b's frames as next_down, and reaches b once b attaches
    src, a = fab.attach("src"), fab.attach("a")
    cfg = json.dumps({"routes": {"10.0.0.1/32": "a", "10.0.0.2/32": "b"}})
    base = ["--fabric", fab.name, "--function", "router", "--config", cfg, "--port", "a", "--port", "b"]
    # without --down: it waits for b (here for its --duration, 1 s) and gives up, exit status 2
    p0 = _fn_run(*base, "--node", "r0", "--duration", "1")
    _, err0 = p0.communicate(timeout=30)
    assert p0.returncode == 2 and "'b'" in err0, err0
    p = _fn_run(*base, "--node", "router", "--down", "b", "--duration", "60")
    ctl = ControlClient(fab, "mgr")
    try:
        rid = src.wait_for_peer("router", timeout=20)
        st = ctl.request("router", {"op": "stats"}, timeout=10)
        assert st["ok"] and st["port_instances"] == {"a": ["a"], "b": ["b"]}, st
        assert src.send_batch(rid, [_ipv4_to(1)] * 5 + [_ipv4_to(2)] * 5) == 10
        assert _received(a, 5) == 5
        assert _until(lambda: ctl.request("router", {"op": "stats"}, timeout=5)["counters"]["next_down"] == 5)
        b = fab.attach("b")
        end = time.monotonic() + 10
        got = 0
        while got == 0 and time.monotonic() < end:
            assert src.send_batch(rid, [_ipv4_to(2)]) == 1
            got = _received(b, 1, 0.2)
        assert got == 1
        assert ctl.request("router", {"op": "stop"}, timeout=10)["ok"]
        _, err = p.communicate(timeout=20)
        assert p.returncode == 0, err
    finally:
        ctl.close()
        if p.poll() is None:
            p.kill()
            p.communicate()


def test_a_source_started_with_its_first_group_member_down_sends_to_the_others(fab):
    # --next x1,x2 --down x1: it starts without x1, sends x2's flows (frames hashed to x1 are dropped
    # and counted), and reaches x1 once it attaches
    x2 = fab.attach("x2")
    r = FunctionRunner(fab, "gen", registry.load("generator"), {"rate": 2000, "size": 64, "flows": 16},
                       ["x1", "x2"], down=["x1"])
    out: dict = {}

    def run() -> None:
        try:
            out["stats"] = r.run(30.0)
        except BaseException as exc:  # noqa: BLE001 - reported below
            out["exc"] = repr(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        assert _received(x2, 50) >= 50, (r.c, out)
        assert _until(lambda: r.c["next_down"] > 0), r.c
        x1 = fab.attach("x1")
        assert _received(x1, 1) >= 1, r.c  # found by name once attached
    finally:
        r.stopping = True
        t.join(15)
        r.close()
    assert not t.is_alive() and "exc" not in out, out
