"""Member weights of a global address in a topology: `adapter: {kind: global, ..., weights: {w1: 3}}`
validated with located errors (a name not among the members, a weight out of range or not an
integer), passed to the dispatcher as `--weight INSTANCE=N`, and a reload that changes them
replaces the dispatcher (one that does not leaves it alone; root)."""
from __future__ import annotations

import os
import subprocess
import textwrap
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from shmfabric.manager.config import ConfigError, parse_topology
from shmfabric.manager.supervisor import Supervisor

pytestmark = pytest.mark.timeout(150)

MEMBERS = """\
  - name: w1
    adapter: {kind: tap, netns: NSA, address: [10.9.0.2/24], global: [10.9.0.100]}
  - name: w2
    adapter: {kind: tap, netns: NSB, address: [10.9.0.3/24], global: [10.9.0.100]}
"""


def _topology(weights: str, fabric: str = "x", members: str = MEMBERS) -> str:
    gw = "  - name: gw\n    adapter:\n      kind: global\n      address: 10.9.0.100\n      members: [w1, w2]\n"
    if weights:
        gw += textwrap.indent(weights, "      ")
    return f"fabric: {{name: {fabric}}}\nnodes:\n" + gw + members


def _errors(weights: str) -> str:
    with pytest.raises(ConfigError) as exc:
        parse_topology(_topology(weights), "t.yaml")
    return str(exc.value)


def test_weights_are_read_and_default_to_none() -> None:
    topo = parse_topology(_topology("weights: {w1: 3, w2: 256}\n"), "t.yaml")
    assert topo.node("gw").adapter.weights == {"w1": 3, "w2": 256}
    assert topo.node("gw").settings["weights"] == {"w1": 3, "w2": 256}
    assert parse_topology(_topology(""), "t.yaml").node("gw").adapter.weights == {}


def test_a_weight_for_a_node_not_among_the_members_is_refused_with_its_line() -> None:
    msg = _errors("weights:\n  w1: 3\n  web3: 2\n")
    assert "t.yaml:10: field `nodes[0].adapter.weights.web3`: a weight is given for 'web3', which is not among " \
           "`members:` (w1, w2); add it there or fix the name" in msg, msg


@pytest.mark.parametrize("value,says", [
    ("0", "greater than or equal to 1"), ("257", "less than or equal to 256"), ("-3", "greater than or equal to 1"),
    ("2.5", "valid integer"), ('"3"', "valid integer"), ("true", "valid integer"),
])
def test_a_weight_out_of_range_or_not_an_integer_is_refused_with_its_line(value: str, says: str) -> None:
    msg = _errors(f"weights:\n  w2: {value}\n")
    assert "t.yaml:9: field `nodes[0].adapter.weights.w2`" in msg and says in msg, msg


def test_the_dispatchers_command_line_carries_each_weight_by_instance_name() -> None:
    topo = parse_topology(_topology("weights: {w2: 5}\n"), "t.yaml")
    sup = Supervisor(topo)  # (not started: only its command lines are asked for)
    argv = sup._adapter_argv(topo, topo.node("gw"), SimpleNamespace(name="gw"), None)
    at = argv.index("global")
    assert argv[at:at + 3] == ["global", "x", "gw"]
    assert [argv[k + 1] for k, a in enumerate(argv) if a == "--weight"] == ["w2=5"]
    assert [argv[k + 1] for k, a in enumerate(argv) if a == "--member"] == ["w1=NSA", "w2=NSB"]
    # ...and the CLI takes it as it is
    from shmfabric.cli.main import build_parser

    args = build_parser().parse_args(argv[at:])
    assert args.weight == ["w2=5"] and args.member == ["w1=NSA", "w2=NSB"]
    plain = parse_topology(_topology(""), "t.yaml")
    assert "--weight" not in sup._adapter_argv(plain, plain.node("gw"), SimpleNamespace(name="gw"), None)


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=20)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: TAP adapters in network namespaces")
def test_a_reload_that_changes_the_weights_replaces_the_dispatcher_and_one_that_does_not_leaves_it(
        run_topology) -> None:
    tag = uuid.uuid4().hex[:6]
    nsa, nsb = f"sfwa{tag}", f"sfwb{tag}"
    members = MEMBERS.replace("NSA", nsa).replace("NSB", nsb)
    for ns in (nsa, nsb):
        _ip("netns", "add", ns)
    try:
        sup = run_topology(_topology("weights: {w1: 3}\n", "{fabric}", members))

        def cmdline() -> tuple[int, list[bytes]]:
            (inst,) = sup.nodes["gw"].instances
            assert inst.state == "running", inst.state
            return inst.pid, Path(f"/proc/{inst.pid}/cmdline").read_bytes().split(b"\0")

        pid, argv = cmdline()
        assert argv[argv.index(b"--weight") + 1] == b"w1=3"

        def reload(weights: str) -> dict:
            return sup.reload(parse_topology(_topology(weights, sup.topo.fabric.name, members), "new.yaml"))

        assert reload("weights: {w1: 3}\n")["replaced"] == []  # the same weights: left alone
        assert cmdline()[0] == pid
        assert reload("weights: {w1: 2, w2: 4}\n")["replaced"] == ["gw"]  # only the dispatcher
        pid2, argv = cmdline()
        assert pid2 != pid
        assert [argv[k + 1] for k, a in enumerate(argv) if a == b"--weight"] == [b"w1=2", b"w2=4"]
        assert reload("")["replaced"] == ["gw"]  # weights dropped: all 1 again
        assert b"--weight" not in cmdline()[1]
    finally:
        for ns in (nsa, nsb):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
