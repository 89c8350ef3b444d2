"""A global address in a topology: `adapter: {kind: global, address, members}` with tap members that
list it under `global:`, validated with located errors and run by `shmfabric up` (the dispatcher
and its members as supervised adapter instances) so that a client reaches both members' servers
through the one address."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid

import pytest

from shmfabric.fabric import Fabric
from shmfabric.manager.config import ConfigError, parse_topology
from tests.manager.conftest import unique_fabric
from tests.manager.test_adapters_up import _run, cli, env, inst_of, poll, status  # noqa: F401 (fixture)

pytestmark = pytest.mark.timeout(150)


def _errors(nodes: str) -> str:
    with pytest.raises(ConfigError) as exc:
        parse_topology("fabric: {name: x}\nnodes:\n" + textwrap.dedent(nodes), "t.yaml")
    return str(exc.value)


def test_members_and_their_global_lists_must_agree():
    msg = _errors("""\
          - name: gw
            adapter: {kind: global, address: 10.9.0.100, members: [w1, w2, fn, nope, w1]}
          - name: w1
            adapter: {kind: tap, netns: a, address: [10.9.0.2/24], global: [10.9.0.100]}
          - name: w2
            adapter: {kind: tap, netns: b, address: [10.9.0.3/24]}
          - name: fn
            function: sink
          - name: w3
            adapter: {kind: tap, netns: c, address: [10.9.0.4/24], global: [10.9.0.100, 10.9.0.101]}
        """)
    assert "t.yaml:4: field `nodes[0].adapter.members[1]`: member 'w2' does not list 10.9.0.100 under its " \
           "adapter's `global:`" in msg
    assert "member 'fn' is not a tap adapter" in msg
    assert "member 'nope' is not defined under `nodes:`" in msg
    assert "member 'w1' is listed twice" in msg
    assert "field `nodes[4].adapter.global[0]`: node 'w3' is not among the members of 'gw'" in msg
    assert "field `nodes[4].adapter.global[1]`: no `kind: global` node serves 10.9.0.101" in msg


def test_global_values_are_checked_with_located_errors():
    msg = _errors("""\
          - name: gw
            adapter: {kind: global, address: 224.0.0.9, members: [], walk_every: 0}
            via: x
          - name: g2
            adapter: {kind: globe}
          - name: w
            adapter: {kind: tap, global: [10.0.0.0/8]}
          - name: w4
            adapter: {kind: tap, address: [fd00::2/64], global: [10.0.0.100]}
        """)
    assert "field `nodes[3].adapter`: a member of global address 10.0.0.100 needs an IPv4 address of its own" in msg
    assert "field `nodes[0].adapter.address`: global address 224.0.0.9 cannot be shared" in msg
    assert "field `nodes[0].adapter.members`" in msg and "field `nodes[0].adapter.walk_every`" in msg
    assert "or `kind: global` (one address for several tap adapters)" in msg
    assert "global address '10.0.0.0/8' is not an IP address" in msg


def test_two_members_in_one_namespace_are_refused():
    msg = _errors("""\
          - name: gw
            adapter: {kind: global, address: 10.9.0.100, members: [w1, w2]}
          - name: w1
            adapter: {kind: tap, netns: a, address: [10.9.0.2/24], global: [10.9.0.100]}
          - name: w2
            adapter: {kind: tap, netns: a, ifname: sf1, address: [10.9.0.3/24], global: [10.9.0.100]}
        """)
    assert "field `nodes[0].adapter.members[1]`: members 'w1' and 'w2' are both in netns 'a'" in msg


def test_two_dispatchers_for_one_address_are_refused():
    msg = _errors("""\
          - name: gw
            adapter: {kind: global, address: 10.9.0.100, members: [w]}
          - name: gw2
            adapter: {kind: global, address: 10.9.0.100, members: [w]}
          - name: w
            adapter: {kind: tap, address: [10.9.0.2/24], global: [10.9.0.100]}
        """)
    assert "field `nodes[1].adapter.address`: global address 10.9.0.100 is also nodes[0]'s" in msg


def test_the_global_example_is_valid():
    from shmfabric.manager.config import load_topology

    topo = load_topology(os.path.join(os.path.dirname(__file__), "..", "..", "examples", "global.yaml"))
    assert {n.name: n.function_name for n in topo.nodes}["gw"] == "adapter:global"


SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", 8080)); s.listen(16)
print("ready", flush=True)
while True:
    c, _ = s.accept(); c.sendall(sys.argv[1].encode() + b"\n"); c.close()
"""
CLIENT = r"""
import socket, sys, time
def once():
    try:
        return socket.create_connection((sys.argv[1], 8080), timeout=3).makefile().readline().strip()
    except OSError as exc:
        return type(exc).__name__
deadline = time.monotonic() + 20
while once() not in ("w1", "w2") and time.monotonic() < deadline:
    time.sleep(0.3)
print(" ".join(once() for _ in range(4)))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="TAP adapters and network namespaces need root")
def test_up_serves_one_address_from_two_members(env, tmp_path):  # noqa: F811 (env is a fixture)
    name = unique_fabric()
    tag = uuid.uuid4().hex[:6]
    spaces = {n: f"sf{n}{tag}" for n in ("c", "w1", "w2")}
    path = tmp_path / "global.yaml"
    path.write_text(textwrap.dedent(f"""\
        fabric: {{name: {name}, max_nodes: 8}}
        poll_interval: 0.2
        nodes:
          - name: client
            adapter: {{kind: tap, netns: {spaces['c']}, address: [10.77.9.1/24]}}
          - name: w1
            adapter: {{kind: tap, netns: {spaces['w1']}, address: [10.77.9.2/24], global: [10.77.9.100]}}
          - name: w2
            adapter: {{kind: tap, netns: {spaces['w2']}, address: [10.77.9.3/24], global: [10.77.9.100]}}
          - name: gw
            adapter: {{kind: global, address: 10.77.9.100, members: [w1, w2]}}
    """))
    for ns in spaces.values():
        _run("ip", "netns", "add", ns)
        _run("ip", "-n", ns, "link", "set", "lo", "up")
    servers = []
    up = False
    try:
        for n in ("w1", "w2"):
            p = subprocess.Popen(["ip", "netns", "exec", spaces[n], sys.executable, "-u", "-c", SERVER, n],
                                 stdout=subprocess.PIPE, text=True)
            servers.append(p)
            assert p.stdout.readline().strip() == "ready"  # type: ignore[union-attr]
        def logs() -> str:  # (what a failure shows: the instances' own words, and the status)
            return "".join(f.read_text() for f in (tmp_path / "state").glob("*/*.log")) + \
                str(cli(env, "status", "--json", check=False).stdout)[-3000:]

        cli(env, "up", path, "--detach")
        up = True
        try:
            poll("the dispatcher running", lambda: inst_of(status(env), "gw")["state"] == "running")
            # (the members' adapters attach a moment after the dispatcher may have started)
            poll("both members in the dispatcher's table",
                 lambda: (inst_of(status(env), "gw").get("counters") or {}).get("table_nodes") == 2)
        except pytest.fail.Exception as exc:
            pytest.fail(f"{exc}\n{logs()}")
        assert inst_of(status(env), "gw")["function"] == "adapter:global"
        r = _run("ip", "netns", "exec", spaces["c"], sys.executable, "-c", CLIENT, "10.77.9.100", timeout=60)
        assert sorted(r.stdout.split()) == ["w1", "w1", "w2", "w2"], r.stdout + r.stderr + logs()
        cli(env, "down", timeout=90)
        up = False
    finally:
        if up:
            cli(env, "down", timeout=90, check=False)
        for p in servers:
            p.kill()
            p.wait()
        for ns in spaces.values():
            _run("ip", "netns", "del", ns, check=False)
        Fabric.destroy(name)
