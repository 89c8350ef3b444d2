"""How the manager reads an instance's end: exit 0 is "finished" only for a source (a node nothing
sends to); a node mid-chain stopped from outside is restarted. Errors say what ended it (a signal,
this run's log), restarts disabled are named as such, and a node brought back is not shown degraded."""
from __future__ import annotations

import os
import signal

import pytest

from shmfabric.manager.supervisor import SupervisorError
from tests.manager.conftest import counters, wait_until
from tests.manager.test_reload_txn import BASE

pytestmark = pytest.mark.timeout(120)


def _inst(sup, name):
    return next(i for n in sup.nodes.values() for i in n.instances if i.name == name)


def test_a_node_mid_chain_that_exits_0_is_restarted(run_topology):
    sup = run_topology(BASE.replace("flows: 16}", "flows: 16, count: 3000}"))
    wait_until(lambda: counters(sup, "snk").get("in_frames", 0) > 50, what="traffic", sup=sup)
    # the runtime stops gracefully (exit 0) once its input is drained: here when gen's count is done
    os.kill(_inst(sup, "fw").pid, signal.SIGTERM)
    wait_until(lambda: _inst(sup, "fw").restarts == 1 and _inst(sup, "fw").state == "running",
               what="fw restarted", sup=sup, timeout=60)
    assert any(e["kind"] == "exited" and e["node"] == "fw" and "exit 0" in e["detail"] for e in sup.events)
    assert _inst(sup, "gen").state == "exited"  # the source finished: not restarted


def test_a_source_that_finishes_is_not_restarted(run_topology):
    sup = run_topology(BASE.replace("flows: 16}", "flows: 16, count: 2000}"))
    wait_until(lambda: _inst(sup, "gen").state == "exited", what="gen finished", sup=sup)
    assert _inst(sup, "gen").restarts == 0 and _inst(sup, "fw").state == "running"


def test_disabled_restarts_and_a_kill_are_named(run_topology):
    sup = run_topology(BASE.replace("    function: firewall\n", "    function: firewall\n    restart: {enabled: false}\n"))
    wait_until(lambda: counters(sup, "snk").get("in_frames", 0) > 20, what="traffic", sup=sup)
    os.kill(_inst(sup, "fw").pid, signal.SIGKILL)
    wait_until(lambda: _inst(sup, "fw").state == "failed", what="fw failed", sup=sup)
    assert _inst(sup, "fw").error.startswith("killed by SIGKILL")
    ev = [e for e in sup.events if e["kind"] == "failed" and e["node"] == "fw"][-1]
    assert "restarts are disabled (restart.enabled: false)" in ev["detail"] and "limit" not in ev["detail"]
    assert sup.node_status("fw")["state"] == "failed"
    # a reload brings it back: the dead instance is not listed beside the new one
    sup.reload_file()
    assert sup.node_status("fw")["state"] == "running"
    assert [i["state"] for i in sup.node_status("fw")["instances"]] == ["running"]


def test_mode_always_with_restarts_disabled_reads_exit_0_as_finished(run_topology):
    sup = run_topology(BASE.replace("  restart: {", "  restart: {mode: always, enabled: false, "))
    os.kill(_inst(sup, "gen").pid, signal.SIGTERM)  # fw drains its input while fed: stop the source first
    os.kill(_inst(sup, "fw").pid, signal.SIGTERM)
    wait_until(lambda: _inst(sup, "fw").state != "running", what="fw ended", sup=sup, timeout=60)
    assert _inst(sup, "fw").state == "exited"


def test_a_config_error_is_one_plain_line(run_topology):
    sup = run_topology(BASE)
    with pytest.raises(SupervisorError) as ei:
        sup.reconfigure("fw", {"rules": "policy maybe"})
    msg = str(ei.value)
    assert msg.startswith("invalid config: fw.config") and "Value error" not in msg and ".:" not in msg
    assert ei.value.status == 422


def test_a_generator_size_over_the_mtu_is_a_configuration_error_at_start(run_topology):
    with pytest.raises(SupervisorError) as ei:
        run_topology(BASE.replace("size: 128", "size: 1600"))
    msg = str(ei.value)
    assert "exited with status 2 at start" in msg and "size 1600 does not fit network 0's MTU 1500" in msg
    assert "lower size to 1514 or less" in msg and "Traceback" not in msg


def test_an_operator_count_outside_the_policy_stands_until_the_next_operator_action(run_topology):
    sup = run_topology(BASE.replace("    function: firewall\n", "    function: firewall\n    scale: {cooldown: 0}\n"))
    res = sup.scale("fw", 2)  # the policy says 1..1
    assert res["scale"]["operator_count"] == 2
    for _ in range(10):  # the policy, cooldown 0, would scale in at the first tick
        sup.tick()
    assert [i.name for i in sup.nodes["fw"].instances if i.active] == ["fw", "fw-2"]
    assert any("outside the scale policy's 1..1" in e["detail"] for e in sup.events)
    sup.reload_file()  # an operator action: the policy's bounds apply again
    assert [i.name for i in sup.nodes["fw"].instances if i.active] == ["fw"]
