"""`source_check:`, `allow_source:` and `dhcp_server:` on a topology's tap adapter: validated with located errors,
passed to the adapter by the manager, and enforced (a source the adapter was not given is dropped,
counted in status, while its own traffic flows)."""
from __future__ import annotations

import os
import textwrap
import uuid

import pytest

from shmfabric.fabric import Fabric
from shmfabric.manager.config import parse_topology
from tests.manager.conftest import unique_fabric
from tests.manager.test_adapters_up import _errors, _run, cli, env, inst_of, poll, status  # noqa: F401 (fixture)

pytestmark = pytest.mark.timeout(150)


def test_allow_source_values_are_checked_with_located_errors():
    text = _errors("""\
      - name: t
        adapter:
          kind: tap
          allow_source: [10.9.0.1/16, nope]
          source_check: maybe
    """)
    assert "t.yaml:6: field `nodes[0].adapter.allow_source`" in text and "give the network, 10.9.0.0/16" in text
    assert "t.yaml:7: field `nodes[0].adapter.source_check`" in text


def test_source_check_is_off_unless_asked_and_allow_source_is_kept():
    topo = parse_topology(textwrap.dedent("""\
        fabric: {name: x}
        nodes:
          - {name: a, adapter: {kind: tap, address: [10.9.0.1/24]}}
          - {name: b, adapter: {kind: tap, netns: b, address: [10.9.0.2/24], allow_source: [10.8.0.0/16]}}
    """), "t.yaml")
    assert topo.node("a").adapter.source_check is False and topo.node("a").adapter.allow_source == []
    assert topo.node("b").adapter.allow_source == ["10.8.0.0/16"]


def test_dhcp_server_reaches_the_adapters_command_line():
    from types import SimpleNamespace

    from shmfabric.cli.main import build_parser
    from shmfabric.manager.supervisor import Supervisor

    topo = parse_topology(textwrap.dedent("""\
        fabric: {name: x}
        nodes:
          - {name: a, adapter: {kind: tap, address: [10.9.0.1/24]}}
          - {name: b, adapter: {kind: tap, netns: b, address: [10.9.0.2/24], dhcp_server: true}}
    """), "t.yaml")
    sup = Supervisor(topo)  # (not started: only its command lines are asked for)
    argv = {n: sup._adapter_argv(topo, topo.node(n), SimpleNamespace(name=n), None) for n in ("a", "b")}
    assert "--dhcp-server" not in argv["a"] and "--dhcp-server" in argv["b"]
    args = build_parser().parse_args(argv["b"][argv["b"].index("adapter"):])
    assert args.dhcp_server is True


@pytest.mark.skipif(os.geteuid() != 0, reason="TAP adapters and network namespaces need root")
def test_up_runs_a_checked_adapter_whose_spoofed_source_is_dropped_and_counted(env, tmp_path):
    name = unique_fabric()
    tag = uuid.uuid4().hex[:6]
    spaces = [f"sfa{tag}", f"sfb{tag}"]
    path = tmp_path / "tap.yaml"
    path.write_text(textwrap.dedent(f"""\
        fabric: {{name: {name}, max_nodes: 8}}
        poll_interval: 0.2
        nodes:
          - name: ns-a
            adapter: {{kind: tap, netns: {spaces[0]}, address: [10.77.0.1/24], source_check: true,
                       allow_source: [10.77.9.0/24]}}
          - name: ns-b
            adapter: {{kind: tap, netns: {spaces[1]}, address: [10.77.0.2/24]}}
    """))
    for ns in spaces:
        _run("ip", "netns", "add", ns)
    up = False
    try:
        cli(env, "up", path, "--detach")
        up = True
        poll("10.77.0.1 on sf0", lambda: "10.77.0.1/24" in _run("ip", "-n", spaces[0], "-o", "addr", "show", "dev",
                                                                  "sf0", check=False).stdout)
        poll("10.77.0.2 on sf0", lambda: "10.77.0.2/24" in _run("ip", "-n", spaces[1], "-o", "addr", "show", "dev",
                                                                  "sf0", check=False).stdout)
        ping = ["ip", "netns", "exec", spaces[0], "ping", "-c", "2", "-i", "0.2", "-W", "2"]
        assert _run(*ping, "10.77.0.2", check=False, timeout=30).returncode == 0
        _run("ip", "-n", spaces[0], "addr", "add", "10.77.2.99/24", "dev", "sf0")
        _run("ip", "-n", spaces[0], "addr", "add", "10.77.9.5/32", "dev", "lo")  # a network routed behind it
        _run("ip", "-n", spaces[1], "route", "add", "10.77.9.0/24", "via", "10.77.0.1")
        assert _run(*ping, "-I", "10.77.2.99", "10.77.0.2", check=False, timeout=30).returncode != 0
        assert _run(*ping, "-I", "10.77.9.5", "10.77.0.2", check=False, timeout=30).returncode == 0
        counted = poll("drop_spoofed_ip in ns-a's counters",
                       lambda: inst_of(status(env), "ns-a")["counters"].get("drop_spoofed_ip", 0) >= 2)
        assert counted
    finally:
        if up:
            cli(env, "down", timeout=90, check=False)
        for ns in spaces:
            _run("ip", "netns", "del", ns, check=False)
        Fabric.destroy(name)
