"""Operator actions that overlap: a reload during a scale, two reloads, a reload during a step of the
scale policy, a SIGHUP during a scale. Each returns (the second waits its turn, or is refused with
409 naming the first when waiting is off), status answers meanwhile, and the topology is consistent
after. (A reload used to take the state lock before the operation lock; the operation it waited for
released the state lock while waiting for new instances and could never take it back.)"""
from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from shmfabric.manager.policy import ScaleAction
from shmfabric.manager.supervisor import SupervisorError
from tests.manager.conftest import in_thread, status_within, wait_until
from tests.manager.test_reload_txn import BASE as _BASE

# fw may run 1..4 instances: a reload keeps the counts a scale set (it applies the policy's bounds)
BASE = _BASE.replace('    config: {rules: "policy accept\\nconntrack off"}\n',
                     '    config: {rules: "policy accept\\nconntrack off"}\n    scale: {min_instances: 1, max_instances: 4}\n')
assert BASE != _BASE

pytestmark = pytest.mark.timeout(150)


def _gated(tmp_path, node: str) -> tuple[Path, Path]:
    """A python wrapper: instances of `node` start only while file `flag` exists (bounded, 20 s)."""
    flag = tmp_path / "go"
    wrapper = tmp_path / "gatedpy.sh"
    wrapper.write_text(f"#!/bin/sh\ncase \"$*\" in *'--node {node}'*) i=0; while [ ! -e {flag} ] && [ $i -lt 400 ]; "
                       f"do sleep 0.05; i=$((i+1)); done;; esac\nexec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    flag.touch()
    return wrapper, flag


def _status(sup, timeout: float = 10.0) -> dict:
    return status_within(sup, timeout, ": the manager is wedged")


def _operation(sup, kind: str) -> dict:
    return wait_until(lambda: (lambda s: s if (s["operation"] or {}).get("kind") == kind else None)(_status(sup)),
                      timeout=20, what=f"operation {kind} under way")


def _consistent(sup) -> None:
    """Every live process is listed, every listed instance of a node in the topology runs."""
    st = _status(sup)
    assert st["operation"] is None
    listed = {i["pid"] for n in st["nodes"] for i in n["instances"] if i["pid"]}
    live = {i.pid for n in sup.nodes.values() for i in n.instances if i.proc is not None and i.proc.poll() is None}
    assert live == listed
    assert {n["name"] for n in st["nodes"]} == {n.name for n in sup.topo.nodes}
    for n in st["nodes"]:
        assert n["instances"] and all(i["state"] == "running" for i in n["instances"]), n


def test_a_reload_during_a_scale_waits_its_turn_and_both_apply(run_topology, tmp_path, loop):
    wrapper, flag = _gated(tmp_path, "fw")
    sup = run_topology(BASE, python=str(wrapper))
    loop(sup)
    flag.unlink()
    ts, scaled = in_thread(sup.scale, "fw", 3)
    _operation(sup, "scale")  # waiting for fw-2, fw-3 (lock released)
    src = Path(sup.source)
    src.write_text(src.read_text().replace("rate: 2000", "rate: 1000"))
    tr, reloaded = in_thread(sup.reload_file)
    st = _status(sup)  # answers while both are pending
    assert st["operation"]["kind"] == "scale"
    flag.touch()
    ts.join(60)
    tr.join(60)
    assert not ts.is_alive() and not tr.is_alive(), "an operator action never returned (deadlock)"
    assert "error" not in scaled, scaled
    assert reloaded.get("value", {}).get("reconfigured") == ["gen"], reloaded
    assert len(sup.nodes["fw"].instances) == 3
    assert sup.node_status("gen")["config"]["rate"] == 1000
    _consistent(sup)


def test_two_reloads_at_once_both_return(run_topology, tmp_path, loop):
    wrapper, flag = _gated(tmp_path, "slow")
    sup = run_topology(BASE, python=str(wrapper))
    loop(sup)
    flag.unlink()
    src = Path(sup.source)
    src.write_text(src.read_text().replace("  - name: snk\n", "  - name: slow\n    function: sink\n  - name: snk\n")
                   .replace("[gen, fw, snk]", "[gen, fw, [snk, slow]]"))
    t1, r1 = in_thread(sup.reload_file)
    _operation(sup, "reload")
    t2, r2 = in_thread(sup.reload_file)
    _status(sup)
    flag.touch()
    t1.join(60)
    t2.join(60)
    assert not t1.is_alive() and not t2.is_alive(), "a reload never returned (deadlock)"
    assert r1.get("value", {}).get("added") == ["slow"], r1
    assert "value" in r2 and not any(r2["value"].values()), r2  # the second found nothing left to do
    _consistent(sup)


def test_a_second_action_is_refused_with_409_naming_the_first_when_it_does_not_wait(run_topology, tmp_path, loop):
    wrapper, flag = _gated(tmp_path, "fw")
    sup = run_topology(BASE, python=str(wrapper))
    loop(sup)
    flag.unlink()
    ts, scaled = in_thread(sup.scale, "fw", 2)
    try:
        _operation(sup, "scale")
        sup.op_wait = 0
        with pytest.raises(SupervisorError, match=r"^an operation is in progress: scale of fw to 2 ") as ei:
            sup.reload_file()
        assert ei.value.status == 409 and "\n" not in str(ei.value)
        with pytest.raises(SupervisorError, match="an operation is in progress"):
            sup.replace("gen", version="2")
    finally:
        flag.touch()
        ts.join(60)
    assert "error" not in scaled, scaled
    sup.op_wait = 30
    assert not any(sup.reload_file().values())  # now it runs
    _consistent(sup)


def test_a_reload_during_a_scale_policy_step_returns(run_topology, tmp_path, loop):
    wrapper, flag = _gated(tmp_path, "fw")
    sup = run_topology(BASE, python=str(wrapper))
    flag.unlink()
    fired = []
    decider = sup.nodes["fw"].decider

    def observe(now, depth, n):  # the policy asks for one more fw, once
        if fired:
            return None
        fired.append(now)
        return ScaleAction.OUT

    decider.observe = observe
    loop(sup)
    _operation(sup, "autoscale")  # the loop waits for fw-2
    tr, reloaded = in_thread(sup.reload_file)
    assert _status(sup)["operation"]["kind"] == "autoscale"
    flag.touch()
    tr.join(60)
    assert not tr.is_alive(), "the reload never returned (deadlock)"
    assert "value" in reloaded, reloaded
    wait_until(lambda: len([i for i in sup.nodes["fw"].instances if i.state == "running"]) == 2,
               what="fw scaled out to 2")
    _consistent(sup)


def test_sighup_during_a_scale_is_queued_and_reloads_after_it(run_topology, tmp_path, loop):
    from shmfabric.cli.manager_cmds import _reload_on_hup

    wrapper, flag = _gated(tmp_path, "fw")
    sup = run_topology(BASE, python=str(wrapper))
    loop(sup)
    flag.unlink()
    ts, scaled = in_thread(sup.scale, "fw", 2)
    _operation(sup, "scale")
    src = Path(sup.source)
    src.write_text(src.read_text().replace("rate: 2000", "rate: 1500"))
    due, stop = threading.Event(), threading.Event()
    hup = threading.Thread(target=_reload_on_hup, args=(sup, due, stop), daemon=True)
    hup.start()
    try:
        due.set()  # the signal handler's part
        _status(sup)
        flag.touch()
        ts.join(60)
        assert not ts.is_alive() and "error" not in scaled, scaled
        wait_until(lambda: sup.node_status("gen")["config"]["rate"] == 1500, what="the queued SIGHUP reload",
                   timeout=30)
    finally:
        stop.set()
        hup.join(10)
    assert len(sup.nodes["fw"].instances) == 2
    _consistent(sup)
