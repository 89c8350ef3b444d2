"""Config checks that let mistakes through before: strings for numbers, two networks of one name,
a node naming itself as a port, fabric names that read as options or paths."""
from __future__ import annotations

import pytest

from shmfabric.manager.config import ConfigError, parse_topology

GOOD = """\
fabric: {name: t1, networks: [{name: lan}, {name: wan}]}
nodes:
  - {name: lb, function: l4lb, ports: [a, b], config: {backends: [{node: a}, {node: b}]}}
  - {name: a, function: sink}
  - {name: b, function: sink}
"""


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as ei:
        parse_topology(text, "t.yaml")
    return str(ei.value)


def test_the_good_file_passes():
    assert parse_topology(GOOD, "t.yaml").fabric.networks[1].name == "wan"


def test_numbers_and_booleans_are_not_read_from_strings():
    assert "field `fabric.ring_size`" in error_of(GOOD.replace("name: t1,", "name: t1, ring_size: '1024',"))
    assert "field `policies.restart.enabled`" in error_of(GOOD + "policies: {restart: {enabled: 'no'}}\n")


def test_two_networks_of_one_name_are_refused():
    msg = error_of(GOOD.replace("{name: wan}", "{name: lan}"))
    assert "field `fabric.networks[1].name`: network name 'lan' is used twice (also networks[0])" in msg


def test_a_node_naming_itself_as_a_port_is_refused():
    msg = error_of(GOOD.replace("ports: [a, b]", "ports: [a, lb]"))
    assert "field `nodes[0].ports[1]`: node 'lb' names itself as a port" in msg


@pytest.mark.parametrize("name", ["-rf", "..", ".hidden"])
def test_fabric_names_start_with_a_letter_or_digit(name):
    assert "must start with a letter or digit" in error_of(GOOD.replace("name: t1", f"name: '{name}'"))



LOOP = """\
fabric: {name: t1}
nodes:
  - {name: gen, function: generator}
  - {name: fw, function: firewall, config: {rules: "policy accept"}}
  - {name: snk, function: sink}
chains:
  - {name: main, nodes: [gen, fw, snk]}
  - {name: back, nodes: [snk, BACK]}
"""


def test_a_loop_is_refused_unless_it_leads_back_to_a_source():
    from shmfabric.functions.registry import load

    with pytest.raises(ConfigError) as ei:
        parse_topology(LOOP.replace("BACK", "fw"), "t.yaml", resolve=load)
    assert str(ei.value) == ("t.yaml:8: field `chains[1].nodes`: the chains make a loop fw -> snk -> fw through no "
                             "source: each node forwards what it receives, so frames would circle for ever; fix: "
                             "remove a step of the loop (a path back is allowed only to a source, e.g. a generator, "
                             "which forwards nothing it receives)")
    # a reply path: back to the generator, which forwards nothing it receives
    assert parse_topology(LOOP.replace("BACK", "gen"), "t.yaml", resolve=load).next_of("snk") == ["gen"]
