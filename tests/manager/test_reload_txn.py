"""A reload is transactional and diffs against what runs: a reload that fails halfway changes nothing
(the removed nodes keep running and steered, the started ones stop, a later reload works); a config
pushed through the API is put back by a reload of the unchanged file; status answers while a reload
waits for a new instance."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest

from shmfabric.manager.supervisor import SupervisorError
from tests.manager.conftest import counters, wait_until

pytestmark = pytest.mark.timeout(120)

BASE = """\
fabric: {name: "{fabric}", ring_size: 256, max_nodes: 16, networks: [{mtu: 1500, slots: 2048}]}
poll_interval: 0.1
policies:
  restart: {backoff_initial: 0.1, backoff_max: 1}
nodes:
  - name: gen
    function: generator
    config: {rate: 2000, size: 128, flows: 16}
  - name: fw
    function: firewall
    config: {rules: "policy accept\\nconntrack off"}
  - name: snk
    function: sink
chains:
  - {name: main, nodes: [gen, fw, snk]}
"""


FW = """  - name: fw
    function: firewall
    config: {rules: "policy accept\\nconntrack off"}
"""


def _procs(sup) -> set[int]:
    return {i.pid for n in sup.nodes.values() for i in n.instances if i.proc is not None and i.proc.poll() is None}


def test_a_reload_that_fails_halfway_changes_nothing_and_a_later_reload_works(run_topology, tmp_path):
    sup = run_topology(BASE)
    wait_until(lambda: counters(sup, "snk").get("in_frames", 0) > 50, what="traffic", sup=sup)
    src = Path(sup.source)
    text = src.read_text()
    before_topo = sup.topo
    # fw removed (gen straight to snk) and gen2 added, whose pcap does not exist: gen2 fails at start
    bad = (text.replace(FW, "").replace("[gen, fw, snk]}", "[gen, snk]}\n  - {name: two, nodes: [gen2, snk]}")
           .replace("  - name: snk\n", f"  - name: gen2\n    function: generator\n    config: {{rate: 10, pcap: '"
                                       f"{tmp_path / 'none.pcap'}'}}\n  - name: snk\n"))
    src.write_text(bad)
    with pytest.raises(SupervisorError, match="reload failed, the running topology is unchanged.*gen2"):
        sup.reload_file()
    assert sup.topo is before_topo
    assert set(sup.nodes) == {"gen", "fw", "snk"}
    assert [(i.name, i.state) for i in sup.nodes["fw"].instances] == [("fw", "running")]
    # every live process is one the status lists; fw still carries the traffic
    listed = {i["pid"] for n in sup.status()["nodes"] for i in n["instances"] if i["pid"]}
    assert _procs(sup) == listed
    before = counters(sup, "fw").get("in_frames", 0)
    wait_until(lambda: counters(sup, "fw").get("in_frames", 0) > before + 50, what="traffic still through fw", sup=sup)
    # the original file: nothing to do
    src.write_text(text)
    changes = sup.reload_file()
    assert not any(changes.values())
    # the edit without the broken node applies fully: fw leaves, gen sends to snk
    src.write_text(text.replace("[gen, fw, snk]", "[gen, snk]").replace(FW, ""))
    changes = sup.reload_file()
    assert changes["removed"] == ["fw"] and "gen" in changes["resteered"]
    before = counters(sup, "snk").get("in_frames", 0)
    wait_until(lambda: counters(sup, "snk").get("in_frames", 0) > before + 50, what="gen -> snk", sup=sup)
    assert counters(sup, "gen").get("next_down", 0) == 0


def test_a_reload_compares_with_what_runs_not_with_the_file_before(run_topology):
    sup = run_topology(BASE)
    sup.reconfigure("gen", {"rate": 50, "size": 128, "flows": 16})
    changes = sup.reload_file()  # the file (unchanged) says rate 2000: that is put back
    assert changes["reconfigured"] == ["gen"]
    assert sup.node_status("gen")["config"]["rate"] == 2000
    sup.replace("fw", version="v2")
    changes = sup.reload_file()  # the file has no version: the node is replaced back
    assert changes["replaced"] == ["fw"] and sup.node_status("fw")["version"] is None
    assert not any(sup.reload_file().values())


def test_status_answers_while_a_reload_waits_for_a_new_instance(run_topology, tmp_path):
    flag = tmp_path / "go"
    wrapper = tmp_path / "slowpy.sh"
    import sys
    # instances of node `slow` start only once `flag` exists (bounded): the reload waits for them
    wrapper.write_text(f"#!/bin/sh\ncase \"$*\" in *'--node slow'*) i=0; while [ ! -e {flag} ] && [ $i -lt 200 ]; "
                       f"do sleep 0.05; i=$((i+1)); done;; esac\nexec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    sup = run_topology(BASE, python=str(wrapper))
    src = Path(sup.source)
    src.write_text(src.read_text().replace("  - name: snk\n", "  - name: slow\n    function: sink\n  - name: snk\n")
                   .replace("[gen, fw, snk]", "[gen, fw, [snk, slow]]"))
    result: dict = {}

    def reload() -> None:
        try:
            result["changes"] = sup.reload_file()
        except Exception as exc:  # reported by the assertions below
            result["error"] = exc

    t = threading.Thread(target=reload)
    t.start()
    try:
        st = wait_until(lambda: (lambda s: s if s["operation"] else None)(sup.status()), timeout=10,
                        what="status during the reload")
        assert st["operation"]["kind"] == "reload"
        assert any(n["name"] == "slow" and n["instances"][0]["state"] == "starting" for n in st["nodes"])
        assert t.is_alive()
    finally:
        flag.touch()
        t.join(30)
    assert result.get("changes", {}).get("added") == ["slow"], result
    assert sup.status()["operation"] is None


def test_a_replace_the_node_table_cannot_hold_says_which_max_nodes_is_needed(run_topology):
    # gen, fw, snk and the manager fill max_nodes 4 exactly: the config is valid, a replacement is not
    sup = run_topology(BASE.replace("max_nodes: 16", "max_nodes: 4"))
    with pytest.raises(SupervisorError, match=r"replacing fw needs 1 more node.*set fabric.max_nodes >= 5") as ei:
        sup.replace("fw", version="2")
    assert ei.value.status == 409
    assert [(i.name, i.state) for i in sup.nodes["fw"].instances] == [("fw", "running")]
    src = Path(sup.source)
    src.write_text(src.read_text().replace("function: firewall", "function: firewall\n    version: '2'"))
    with pytest.raises(SupervisorError, match=r"this reload needs 1 more node.*max_nodes >= 5"):
        sup.reload_file()


def test_a_reply_path_is_wired_on_a_fresh_up(run_topology):
    # snk -> gen, a reply path back to the source, closes a cycle across chains: snk starts before gen
    # exists (downstream first), so its --next could not name it; once all are up it is told
    sup = run_topology(BASE.replace("[gen, fw, snk]}", "[gen, fw, snk]}\n  - {name: reply, nodes: [snk, gen]}"))
    assert any(e["kind"] == "steer" and e["node"] == "snk" and "'gen'" in e["detail"] for e in sup.events)
    assert sup._next_instances("snk") == ["gen"]


def test_a_loop_through_no_source_is_refused_by_reload_and_the_topology_stays(run_topology):
    sup = run_topology(BASE)
    src = Path(sup.source)
    src.write_text(src.read_text().replace("[gen, fw, snk]}", "[gen, fw, snk]}\n  - {name: reply, nodes: [snk, fw]}"))
    with pytest.raises(SupervisorError, match="the chains make a loop fw -> snk -> fw through no source") as ei:
        sup.reload_file()
    assert ei.value.status == 422
    assert sup._next_instances("snk") == [] and [c.name for c in sup.topo.chains] == ["main"]
