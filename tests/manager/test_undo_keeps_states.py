"""An operator action that is undone (its re-steer of upstream refused) puts the instances it had
marked "stopping" back in the state each had, not all to "running": one in backoff is restarted
when due, one starting is probed before it counts as running.

Real function processes on a real fabric, the supervisor's loop as under `shmfabric up`; the
refusal is forced by wrapping the supervisor's own re-steer, so the undo happens every run."""
from __future__ import annotations

import os
import signal

import pytest

from shmfabric.manager.supervisor import SupervisorError
from tests.manager.test_adapter_gaps import _until, explain
from tests.manager.test_router_steer_adapter_down import _functions_topology

pytestmark = pytest.mark.timeout(150)


def _refuse_resteer(sup) -> None:
    def refused(name):
        raise SupervisorError(f"set_next on the nodes before {name!r} refused (forced by the test)", status=502)
    sup._resteer_upstream = refused


@pytest.mark.parametrize("action", ["replace", "scale-in"])
def test_an_undone_action_puts_an_instance_in_backoff_back_in_backoff(run_topology, loop, action):
    # sink runs 2 instances; sink-2 is killed and held in backoff (60 s) when the operator replaces
    # sink (both instances leave) or scales it in to 1 (sink-2 leaves), and the re-steer is refused
    sup = run_topology(_functions_topology("sink"))
    loop(sup)
    sink1, sink2 = sup.nodes["sink"].instances
    os.kill(sink2.pid, signal.SIGKILL)
    assert _until(lambda: sink2.state == "backoff"), explain(sup, "sink")
    exits = len([e for e in sup.events if e["kind"] == "exited" and e["node"] == "sink-2"])
    _refuse_resteer(sup)
    with pytest.raises(SupervisorError, match="forced by the test"):
        if action == "replace":
            sup.replace("sink", version="2")
        else:
            sup.scale("sink", 1)
    # before: both "running", sink-2 without a process; the loop then judged its old exit again
    # (a second "exited" event, one more restart counted against its policy, its backoff restarted)
    assert (sink1.state, sink2.state) == ("running", "backoff"), explain(sup, "sink")
    looked = {"n": 0}
    real_watch = sup._watch

    def watch(node, inst, now):
        real_watch(node, inst, now)
        if inst is sink2:
            looked["n"] += 1
    sup._watch = watch
    assert _until(lambda: looked["n"] >= 3), explain(sup, "sink")  # the loop looked at it since
    assert len([e for e in sup.events if e["kind"] == "exited" and e["node"] == "sink-2"]) == exits, \
        explain(sup, "sink")
    assert [i.name for i in sup.nodes["sink"].instances] == ["sink", "sink-2"], explain(sup, "sink")
    # and it comes back once its backoff is over, through a start the loop watches
    with sup.lock:
        sink2.restart_at = sup.clock()
    assert _until(lambda: sink2.state == "running" and sup.fabric.node_id("sink-2") is not None), \
        explain(sup, "sink")


def test_an_undone_replace_puts_a_starting_instance_back_to_starting(run_topology, loop):
    # sink-2 is starting (as the loop leaves it between a restart and its readiness probe; the
    # probe is held) when the replace is undone: it stays "starting" until its probe answers
    sup = run_topology(_functions_topology(""))
    loop(sup)
    sink1, sink2 = sup.nodes["sink"].instances
    held = {"on": True}
    real_ready = sup._ready

    def ready(inst):
        if inst is sink2 and held["on"]:
            return None  # not asked yet: the loop judges it at a later round
        return real_ready(inst)
    sup._ready = ready
    with sup.lock:
        sink2.state = "starting"
    _refuse_resteer(sup)
    with pytest.raises(SupervisorError, match="forced by the test"):
        sup.replace("sink", version="2")
    # before: "running", without the probe that says it is
    assert (sink1.state, sink2.state) == ("running", "starting"), explain(sup, "sink")
    held["on"] = False
    assert _until(lambda: sink2.state == "running"), explain(sup, "sink")


def test_a_steer_refused_half_way_says_which_instances_have_the_new_group(run_topology, loop):
    # fw runs 2 instances; when sink is replaced, fw-2 refuses its set_next after fw took it: the
    # events say so (before, only the action's error was recorded, not who had the new group)
    sup = run_topology(_functions_topology(""))
    loop(sup)
    sup.scale("fw", 2)
    real_request = sup._request

    def request(target, op, *args, **kw):
        if target == "fw-2" and op.get("op") == "set_next":
            return {"ok": False, "error": "refused (forced by the test)"}
        return real_request(target, op, *args, **kw)
    sup._request = request
    with pytest.raises(SupervisorError, match="forced by the test"):
        sup.replace("sink", version="2")
    refused = [e["detail"] for e in sup.events if e["kind"] == "steer-refused" and e["node"] == "fw"]
    assert refused and "fw-2" in refused[-1] and "told fw before it" in refused[-1], explain(sup, "fw")
