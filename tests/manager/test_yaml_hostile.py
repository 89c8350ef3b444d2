"""Hostile or mistaken YAML is refused with one line (file, line, fix): an alias bomb, nesting that
would overflow the parser, an alias to itself, and a key given twice (YAML keeps the last silently)."""
from __future__ import annotations

import pytest

from shmfabric.manager.config import ConfigError, parse_topology

GOOD = """\
fabric: {name: t1}
nodes:
  - name: fw
    function: firewall
    config: {rules: "policy drop"}
"""


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as ei:
        parse_topology(text, "t.yaml")
    msg = str(ei.value)
    assert "\n" not in msg
    return msg


def test_an_alias_bomb_is_refused_before_it_expands():
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}]"
              for i in range(1, 10)]  # 10**10 values once expanded
    msg = error_of("\n".join(lines) + "\n" + GOOD)
    assert msg.startswith("t.yaml:") and "expand to more than 100,000 values" in msg
    # an alias or two is fine
    topo = parse_topology(GOOD.replace('config: {rules: "policy drop"}', 'config: &c {rules: "policy drop"}')
                          + "  - {name: fw2, function: firewall, config: *c}\n", "t.yaml")
    assert topo.nodes[1].config == {"rules": "policy drop"}


def test_deep_nesting_is_one_line_not_a_recursion_error():
    deep = GOOD + "extra: " + "[" * 2000 + "]" * 2000 + "\n"
    assert "nesting too deep" in error_of(deep)
    deep = GOOD + "extra: " + "[" * 100 + "]" * 100 + "\n"
    assert "nesting too deep (more than 64 levels)" in error_of(deep)


def test_a_recursive_alias_is_refused():
    assert "refers to a value that contains it" in error_of(GOOD + "extra: &a [1, *a]\n")


def test_a_key_given_twice_is_refused_naming_both_lines():
    text = GOOD + "    config: {rules: \"policy accept\"}\n"
    assert error_of(text) == ("t.yaml:6: key 'config' is given twice in one mapping (lines 5 and 6); fix: keep one "
                              "of them (YAML would silently use the last)")
    text = GOOD + "nodes:\n  - {name: b, function: sink}\n"
    assert "key 'nodes' is given twice in one mapping (lines 2 and 6)" in error_of(text)
    # a merge key is not a duplicate: `<<` fills in, a key beside it overrides by design
    from shmfabric.manager.config import _compose
    data = _compose("b: &b {x: 1, y: 2}\nc: {<<: *b, x: 3}\n", "t.yaml").data
    assert data["c"] == {"x": 3, "y": 2}
