"""The examples in docs/manager.md and docs/functions.md say what the code really does."""
from __future__ import annotations

import re
import secrets
from pathlib import Path

import pytest

from shmfabric.cli.manager_cmds import _print_summary
from tests.manager.conftest import counters, fenced_blocks, wait_until

pytestmark = pytest.mark.timeout(120)

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _shape(line: str) -> str:
    return re.sub(r"\d[\d,.]*", "N", " ".join(line.split()))


def test_the_edge_summary_in_the_docs_has_the_printed_format(capsys):
    """The summary `up` prints (states after the drain, the chain and pool lines) as docs/manager.md shows it."""
    def inst(name, function, state):
        return {"name": name, "function": function, "state": state, "rx_frames": 10, "tx_frames": 10,
                "dropped": 0, "restarts": 0, "counters": {"in_frames": 10, "out_frames": 10}}
    st = {"fabric": "edge", "uptime": 4.7,
          "nodes": [{"name": "gen", "instances": [inst("gen", "generator", "stopped")]},
                    {"name": "fw", "instances": [inst("fw", "firewall", "drained")]}],
          "chains": [{"name": "edge", "delivered_frames": 25994, "tail": ["sink-a", "sink-b"]}],
          "pools": [{"network": 0, "free": 15769, "total": 16384, "held": 615, "orphaned": 0}]}
    _print_summary(st, as_json=False)
    printed = {_shape(x) for x in capsys.readouterr().out.splitlines()}
    doc = (DOCS / "manager.md").read_text()
    shown = fenced_blocks(doc, "A 3-second run prints")[0].splitlines()
    rows = [x for x in shown if x.startswith("│")]
    assert rows and {x.split("│")[-2].strip() for x in rows} <= {"stopped", "drained"}, rows
    others = [x for x in shown if x.startswith(("chain ", "network "))]
    assert len(others) == 2 and all(_shape(x) in printed for x in others), (others, printed)
    states = " ".join(doc[doc.index("Instance states:"):].split("\n\n")[0].split())
    assert "`drained`" in states


def test_the_tunnel_example_in_the_docs_delivers(run_topology, tmp_path):
    """docs/functions.md's compress + encrypt tunnel, run as written (the key file moved to tmp_path)."""
    key = tmp_path / "tunnel.key"
    key.write_text(secrets.token_hex(32))
    doc = (DOCS / "functions.md").read_text()
    example = fenced_blocks(doc, "## `compress` and `encrypt`")[0]
    assert "/etc/shmfabric/tunnel.key" in example
    sup = run_topology('fabric: {name: "{fabric}"}\napi: null\npoll_interval: 0.1\n'
                       + example.replace("/etc/shmfabric/tunnel.key", str(key)))
    wait_until(lambda: counters(sup, "sink").get("in_frames", 0) > 100, what="frames through the tunnel", sup=sup)
    assert counters(sup, "zip", fn=True).get("too_big", 0) == 0
