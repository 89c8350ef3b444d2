"""Config pushes that do not land as planned, and how exits are read:
- a reload's push that times out (the process stopped) is put back, and the manager pushes the
  recorded config again once the process answers: what runs is what status shows;
- an instance that is starting when a reload (or an API push) changes its config gets the new config;
- exit 0 is "finished" for a bounded source only, by function kind (a generator with `count` on a
  reply path is not restarted), and an unbounded source stopped from outside is restarted;
- the generator keeps its rate after a live reconfigure (it stalled for sent/rate seconds);
- the function registry scans entry points once (config loading was slow with many nodes);
- an unwritable state directory is one clear line naming it and SHMFABRIC_STATE_DIR."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from shmfabric.manager.supervisor import SupervisorError
from tests.manager.conftest import counters, wait_until
from tests.manager.test_reload_concurrency import _gated
from tests.manager.test_reload_txn import BASE

pytestmark = pytest.mark.timeout(120)


def _inst(sup, name):
    return next(i for n in sup.nodes.values() for i in n.instances if i.name == name)


def _flows(sup) -> int | None:
    return counters(sup, "gen", fn=True).get("flows")


# -- 2. a push that times out --------------------------------------------------------------------
def test_a_config_push_that_times_out_is_put_back_and_what_runs_is_what_status_shows(run_topology):
    sup = run_topology(BASE)
    wait_until(lambda: _flows(sup) == 16, what="gen's counters", sup=sup)
    gen = _inst(sup, "gen")
    src = Path(sup.source)
    src.write_text(src.read_text().replace("flows: 16", "flows: 32"))
    os.kill(gen.pid, signal.SIGSTOP)
    try:
        with pytest.raises(SupervisorError) as ei:
            sup.reload_file()
    finally:
        os.kill(gen.pid, signal.SIGCONT)
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith("reload failed, the running topology is unchanged except that gen did not confirm")
    assert "pushes its config again" in msg
    assert sup.node_status("gen")["config"]["flows"] == 16
    # once it runs again it applied both pushes in order, and the manager pushed its config once more
    wait_until(lambda: not gen.push_config, what="the config pushed again", sup=sup)
    for _ in range(3):
        sup.tick()  # counters read after the push
    assert _flows(sup) == 16 and gen.pid is not None and gen.restarts == 0


# -- 3. an instance that is starting -------------------------------------------------------------
def test_an_instance_starting_during_a_reload_or_a_push_gets_the_new_config(run_topology, tmp_path):
    wrapper, flag = _gated(tmp_path, "gen")
    sup = run_topology(BASE, python=str(wrapper))
    wait_until(lambda: _flows(sup) == 16, what="gen's counters", sup=sup)
    for how, flows in (("reload", 32), ("api", 8)):
        flag.unlink()
        old = _inst(sup, "gen").pid
        os.kill(old, signal.SIGKILL)
        wait_until(lambda: _inst(sup, "gen").state == "starting" and _inst(sup, "gen").pid != old,
                   what="gen restarting", sup=sup)
        if how == "reload":
            src = Path(sup.source)
            src.write_text(src.read_text().replace("flows: 16", f"flows: {flows}"))
            assert sup.reload_file()["reconfigured"] == ["gen"]
        else:
            sup.reconfigure("gen", {"rate": 2000, "size": 128, "flows": flows})
        assert _inst(sup, "gen").state == "starting"
        flag.touch()
        wait_until(lambda: _flows(sup) == flows, what=f"gen running flows {flows} ({how})", sup=sup)
        assert sup.node_status("gen")["config"]["flows"] == flows


# -- 4. and 8. exit 0 ----------------------------------------------------------------------------
def test_a_bounded_generator_on_a_reply_path_finishes_and_is_not_restarted(run_topology):
    sup = run_topology(BASE.replace("flows: 16}", "flows: 16, count: 1000}")
                       + "  - {name: back, nodes: [snk, gen]}\n")
    assert sup.topo.upstream_of("gen") == ["snk"]  # frames are sent to it: a source by kind only
    wait_until(lambda: _inst(sup, "gen").state == "exited", what="gen finished", sup=sup)
    for _ in range(10):
        sup.tick()
    assert _inst(sup, "gen").state == "exited" and _inst(sup, "gen").restarts == 0
    assert any(e["kind"] == "exited" and e["node"] == "gen" and "finished" in e["detail"] for e in sup.events)


def test_an_unbounded_generator_stopped_from_outside_is_restarted(run_topology):
    sup = run_topology(BASE)  # no count: it never ends by itself
    wait_until(lambda: counters(sup, "snk").get("in_frames", 0) > 50, what="traffic", sup=sup)
    os.kill(_inst(sup, "gen").pid, signal.SIGTERM)  # the runtime stops gracefully: exit 0
    wait_until(lambda: _inst(sup, "gen").restarts == 1 and _inst(sup, "gen").state == "running",
               what="gen restarted", sup=sup, timeout=60)
    assert "no end" in (_inst(sup, "gen").error or "")


# -- 5. the generator after a reconfigure --------------------------------------------------------
def test_the_generator_keeps_its_rate_after_a_reconfigure():
    from shmfabric.functions.builtin.generator import Generator, GeneratorConfig

    g = Generator(GeneratorConfig(rate=1000, flows=4))
    assert len(g.produce(0.0, 10_000)) == 0
    assert len(g.produce(10.0, 100_000)) == 10_000  # 10 s at 1000/s
    g.reconfigure(GeneratorConfig(rate=500, flows=4))
    assert len(g.produce(10.0, 100_000)) == 0  # the new pacing starts now
    assert len(g.produce(11.0, 100_000)) == 500  # a second later: 500 frames, not nothing
    assert g.sent == 10_500
    d = g.next_deadline(11.0)
    assert d is not None and 11.0 < d <= 11.01


def test_the_generator_count_still_counts_every_frame_over_a_reconfigure():
    from shmfabric.functions.builtin.generator import Generator, GeneratorConfig

    g = Generator(GeneratorConfig(rate=0, flows=4, count=100))
    assert len(g.produce(0.0, 60)) == 60
    g.reconfigure(GeneratorConfig(rate=0, flows=4, count=100))
    assert len(g.produce(1.0, 1000)) == 40
    assert g.next_deadline(1.0) is None


# -- 6. the registry's entry-point scan ----------------------------------------------------------
def test_the_registry_scans_entry_points_once(monkeypatch):
    from shmfabric.functions import registry

    calls = []
    real = registry.entry_points

    def counted(**kw):
        calls.append(kw)
        return real(**kw)

    monkeypatch.setattr(registry, "entry_points", counted)
    registry.invalidate()
    for _ in range(50):
        registry.load("generator")
        registry.available()
    assert len(calls) == 1
    with pytest.raises(registry.UnknownFunctionError, match="no network function named 'nope'"):
        registry.load("nope")
    assert len(calls) == 2  # an unknown name rescans once (installed since?)
    registry.invalidate()
    registry.load("sink")
    assert len(calls) == 3


def test_a_topology_check_does_not_rescan_per_node(monkeypatch):
    from shmfabric.functions import registry
    from shmfabric.manager.config import parse_topology
    from shmfabric.manager.supervisor import _default_resolve

    calls = []
    real = registry.entry_points
    monkeypatch.setattr(registry, "entry_points", lambda **kw: calls.append(kw) or real(**kw))
    registry.invalidate()
    n = 50
    text = ("fabric: {name: x, max_nodes: 128}\nnodes:\n"
            + "".join(f"  - {{name: g{i}, function: generator}}\n  - {{name: s{i}, function: sink}}\n" for i in range(n))
            + "chains:\n" + "".join(f"  - {{name: c{i}, nodes: [g{i}, s{i}]}}\n" for i in range(n)))
    parse_topology(text, "t.yaml", _default_resolve)
    assert len(calls) == 1


# -- 7. an unwritable state directory ------------------------------------------------------------
@pytest.mark.parametrize("detach", [True, False])
def test_an_unwritable_state_directory_is_one_line_naming_it(tmp_path, detach):
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where a directory should be: not writable even for root
    cfg = tmp_path / "t.yaml"
    name = f"ro{os.getpid() % 100000}{int(detach)}"
    cfg.write_text(BASE.replace("{fabric}", name))
    env = {**os.environ, "SHMFABRIC_STATE_DIR": str(blocker / "state")}
    args = [sys.executable, "-m", "shmfabric", "up", str(cfg), "--quiet"] + (["--detach"] if detach else
                                                                             ["--duration", "1"])
    p = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    try:
        assert p.returncode != 0
        err = p.stderr.strip()
        assert "Traceback" not in err and len(err.splitlines()) == 1, err
        assert str(blocker / "state") in err and "SHMFABRIC_STATE_DIR" in err
    finally:
        from shmfabric.fabric import Fabric

        Fabric.destroy(name)
