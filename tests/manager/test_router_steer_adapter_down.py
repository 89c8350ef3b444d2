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
nodes where it sends."""
from __future__ import annotations

import os
import signal
import struct
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
