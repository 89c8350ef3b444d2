"""The topology schema: the shipped example, derived chains, and every error naming file, line and fix."""
from __future__ import annotations

import textwrap

import pytest

from shmfabric.manager.config import (DEFAULT_CONFIG, ConfigError, check_functions, instance_name, load_topology,
                                      parse_topology)

from tests.manager.conftest import fenced_blocks

BASE = """\
fabric:
  name: t1
nodes:
  - name: gen
    function: generator
  - name: fw
    function: firewall
  - name: a
    function: sink
  - name: b
    function: sink
chains:
  - name: main
    nodes: [gen, fw, [a, b]]
"""


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as ei:
        parse_topology(textwrap.dedent(text), "t.yaml")
    return str(ei.value)


def test_example_edge_loads_and_derives_the_chain():
    topo = load_topology(DEFAULT_CONFIG)
    assert topo.fabric.name == "edge"
    assert [n.function for n in topo.nodes] == ["generator", "firewall", "ids", "l4lb", "sink", "sink"]
    assert topo.next_of("gen") == ["fw"]
    assert topo.next_of("lb") == ["sink-a", "sink-b"]
    assert topo.next_of("sink-a") == []
    assert topo.upstream_of("sink-a") == ["lb"]
    order = topo.start_order()
    assert order.index("sink-a") < order.index("lb") < order.index("ids") < order.index("fw") < order.index("gen")


def test_example_edge_function_configs_validate():
    from shmfabric.functions.registry import load

    topo = load_topology(DEFAULT_CONFIG)
    check_functions(topo, str(DEFAULT_CONFIG), load, DEFAULT_CONFIG.read_text())


def test_defaults_and_instances():
    topo = parse_topology(BASE)
    assert topo.fabric.ring_size == 1024 and topo.fabric.networks[0].mtu == 1500
    assert topo.instances_of("fw") == 1
    assert topo.restart_of("fw").max_restarts == 5
    assert instance_name("fw", 1) == "fw" and instance_name("fw", 3) == "fw-3"
    assert topo.api == "127.0.0.1:0"


def test_node_policy_overrides_default():
    topo = parse_topology(BASE.replace("    function: firewall\n", "    function: firewall\n"
                                       "    scale: {max_instances: 3}\n    instances: 2\n"))
    assert topo.scale_of("fw").max_instances == 3
    assert topo.scale_of("gen").max_instances == 1
    assert topo.instances_of("fw") == 2


def test_unknown_key_names_its_line_and_fix():
    msg = error_of(BASE.replace("    function: firewall\n", "    function: firewall\n    confg: {}\n"))
    assert msg.startswith("t.yaml:8: field `nodes[1].confg`: Extra inputs are not permitted")
    assert "fix: remove it or fix its spelling" in msg


def test_chain_to_an_undefined_node():
    msg = error_of(BASE.replace("[gen, fw, [a, b]]", "[gen, fw, [a, c]]"))
    assert msg == ("t.yaml:14: field `chains[0].nodes[2][1]`: node 'c' is not defined under `nodes:`; "
                   "add it or fix the name")


def test_ring_size_must_be_a_power_of_two():
    msg = error_of(BASE.replace("  name: t1\n", "  name: t1\n  ring_size: 1000\n"))
    assert "t.yaml:3: field `fabric.ring_size`" in msg and "use 512 or 1024" in msg


def test_out_of_range_number_says_the_range():
    msg = error_of(BASE.replace("  name: t1\n", "  name: t1\n  networks: [{mtu: 100}]\n"))
    assert "t.yaml:3: field `fabric.networks[0].mtu`" in msg and "1490" in msg
    assert "fix: give a number in the allowed range" in msg


def test_duplicate_node_names():
    msg = error_of(BASE.replace("  - name: b\n", "  - name: a\n"))
    assert "t.yaml:10: field `nodes[3].name`: node name 'a' is used twice" in msg


def test_scale_policy_bounds():
    msg = error_of(BASE.replace("    function: firewall\n",
                                "    function: firewall\n    scale: {min_instances: 3, max_instances: 2}\n"))
    assert "t.yaml:8: field `nodes[1].scale`" in msg and "min_instances (3) is larger than max_instances (2)" in msg
    msg = error_of(BASE.replace("    function: firewall\n",
                                "    function: firewall\n    scale: {in_depth: 100, out_depth: 50}\n"))
    assert "would flap" in msg


def test_instances_outside_policy():
    msg = error_of(BASE.replace("    function: firewall\n", "    function: firewall\n    instances: 2\n"))
    assert "t.yaml:8: field `nodes[1].instances`: instances 2 is outside the scale policy's 1..1" in msg


def test_max_nodes_too_small_for_the_scale_policies():
    msg = error_of(BASE.replace("  name: t1\n", "  name: t1\n  max_nodes: 4\n"))
    assert "t.yaml:3: field `fabric.max_nodes`" in msg and "set max_nodes >= 5" in msg


def test_missing_section():
    msg = error_of("fabric: {name: x}\n")
    assert "field `nodes`: Field required; fix: add it" in msg


def test_yaml_syntax_error_has_a_line():
    msg = error_of("fabric:\n  name: x\nnodes:\n  - name: [a\n")
    assert msg.startswith("t.yaml:") and "not valid YAML" in msg and "fix:" in msg


def test_empty_file_and_wrong_top_level():
    assert "the file is empty" in error_of("")
    assert "top level must be a mapping" in error_of("- a\n- b\n")


def test_names_reserved_or_shaped_like_instances():
    assert "reserved for the manager" in error_of(BASE.replace("name: gen", "name: manager")
                                                  .replace("[gen,", "[manager,"))
    msg = error_of(BASE.replace("name: fw", "name: fw-2").replace("gen, fw,", "gen, fw-2,"))
    assert "ends in -DIGITS" in msg and "rename it, e.g. fw2" in msg


def test_group_only_as_last_step_and_one_next_per_node():
    assert "may only be the last step" in error_of(BASE.replace("[gen, fw, [a, b]]", "[gen, [fw, a], b]"))
    msg = error_of(BASE + "  - name: other\n    nodes: [fw, a]\n")
    assert "t.yaml:16: field `chains[1].nodes[0]`: node 'fw' already leads to ['a', 'b']" in msg


def test_network_by_name_and_unknown_network():
    text = BASE.replace("  name: t1\n", "  name: t1\n  networks: [{name: lan}, {name: big, mtu: 9000}]\n")
    topo = parse_topology(text.replace("    function: firewall\n", "    function: firewall\n    network: big\n"))
    assert topo.network_index("fw") == 1
    msg = error_of(text.replace("    function: firewall\n", "    function: firewall\n    network: wan\n"))
    assert "no network named 'wan'" in msg and "t.yaml:9:" in msg


def test_ports_must_name_nodes():
    msg = error_of(BASE.replace("    function: firewall\n", "    function: firewall\n    ports: [a, zz]\n"))
    assert "t.yaml:8: field `nodes[1].ports[1]`: port 1 names node 'zz'" in msg


def test_addresses_are_checked():
    assert "is not HOST:PORT" in error_of(BASE + "api: localhost\n")


def test_check_functions_unknown_function_and_bad_config_lines():
    from shmfabric.functions.registry import load

    text = BASE.replace("function: firewall", "function: firewal").replace(
        "  - name: a\n    function: sink\n", "  - name: a\n    function: sink\n    config:\n      verify: maybe\n")
    topo = parse_topology(text, "t.yaml")
    with pytest.raises(ConfigError) as ei:
        check_functions(topo, "t.yaml", load, text)
    msg = str(ei.value)
    assert "t.yaml:7: field `nodes[1].function`: no network function named 'firewal' (did you mean 'firewall'?)" in msg
    assert "t.yaml:11: field `nodes[2].config.verify`" in msg


def test_load_topology_not_utf8_names_the_line_and_the_byte(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(BASE.replace("name: t1", "name: t1 # caf\xe9").encode("latin-1"))
    with pytest.raises(ConfigError) as ei:
        load_topology(path)
    assert str(ei.value) == (f"{path}:2: not UTF-8 text (byte 0xe9 at column 17); fix: save the file as UTF-8")


def test_load_topology_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read.*fix: check the path"):
        load_topology(tmp_path / "nope.yaml")


def test_a_node_twice_in_one_chain_is_refused():
    msg = error_of(BASE.replace("[gen, fw, [a, b]]", "[gen, fw, fw]"))
    assert ("t.yaml:14: field `chains[0].nodes[2]`: node 'fw' appears twice in chain 'main' (nodes[1] and "
            "nodes[2]); a chain cannot loop back on itself") in msg
    assert "already leads to" not in msg  # the loop is the problem, not a second next step
    msg = error_of(BASE.replace("[gen, fw, [a, b]]", "[gen, fw, [a, gen]]"))
    assert "field `chains[0].nodes[2][1]`: node 'gen' appears twice in chain 'main'" in msg
    # a cycle across chains (a reply path) is still allowed
    parse_topology(BASE + "  - name: back\n    nodes: [a, gen]\n")


def test_cross_reference_errors_are_all_reported():
    text = (BASE.replace("name: b\n", "name: a\n")  # a duplicate node name
            .replace("    function: firewall\n", "    function: firewall\n    ports: [zz]\n")
            .replace("[gen, fw, [a, b]]", "[gen, fw, [a, nope]]")
            + "  - name: main\n    nodes: [a, gen]\n")
    lines = error_of(text).splitlines()
    assert any("field `nodes[3].name`: node name 'a' is used twice (also nodes[2])" in x for x in lines)
    assert any("field `nodes[1].ports[0]`: port 0 names node 'zz'" in x for x in lines)
    assert any("field `chains[0].nodes[2][1]`: node 'nope' is not defined" in x for x in lines)
    assert any("field `chains[1].name`: chain name 'main' is used twice" in x for x in lines)
    assert len(lines) == 4, lines


def test_field_cross_reference_and_function_errors_come_together(tmp_path):
    from shmfabric.functions.registry import load

    text = (BASE.replace("  name: t1\n", "  name: t1\n  ring_size: 1000\n")
            .replace("    function: generator\n", "    function: generator\n    config: {rat: 5}\n")
            .replace("    function: firewall\n", "    function: firewal\n    batch: 0\n")
            .replace("[gen, fw, [a, b]]", "[gen, fw, [a, snk]]"))
    with pytest.raises(ConfigError) as ei:
        parse_topology(text, "t.yaml", resolve=load)
    lines = str(ei.value).splitlines()
    assert [x.split(": field ")[1].split("`")[1] for x in lines] == [
        "fabric.ring_size", "nodes[1].batch",  # field errors
        "chains[0].nodes[2][1]",  # cross references of the parts that passed
        "nodes[0].config.rat", "nodes[1].function"]  # the functions and their configs
    # load_topology takes the same resolver
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as ei:
        load_topology(path, resolve=load)
    assert len(str(ei.value).splitlines()) == 5


def test_a_part_with_field_errors_is_left_out_of_the_cross_checks():
    # fw's own field is wrong: its name still counts as defined (no false "not defined" for the chain)
    msg = error_of(BASE.replace("    function: firewall\n", "    function: firewall\n    batch: 0\n"))
    assert msg.count("\n") == 0 and "nodes[1].batch" in msg


def test_the_docs_config_error_example_is_what_up_prints(tmp_path):
    """docs/manager.md's bad.yaml and its four errors, reported in one run, word for word."""
    from pathlib import Path

    from shmfabric.functions.registry import load

    docs = (Path(__file__).resolve().parents[2] / "docs" / "manager.md").read_text()
    bad, output = fenced_blocks(docs, "Every problem is reported")[:2]
    shown = output.splitlines()
    assert shown[:2] == ["$ shmfabric up bad.yaml", "shmfabric: error: invalid config:"]
    with pytest.raises(ConfigError) as ei:
        parse_topology(bad, "bad.yaml", resolve=load)
    assert str(ei.value).splitlines() == shown[2:]
    assert len(shown[2:]) == 4
