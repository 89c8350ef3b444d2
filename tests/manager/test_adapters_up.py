"""Adapter nodes in a topology: `adapter: {kind: memif | tap, ...}` validated with located errors, run
by the manager as one supervised instance (`shmfabric memif` / `shmfabric adapter`), polled, shown in
status as `adapter:memif` / `adapter:tap`, restarted after kill -9, replaced on a reload that changes
it, never scaled or steered, and stopped (device or socket gone) at `down`."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from shmfabric.adapters.memif import MemifBridge, MemifConfig
from shmfabric.core import native
from shmfabric.core.region import region_path
from shmfabric.fabric import Fabric
from shmfabric.fabric.control import node_mac
from shmfabric.manager.config import ConfigError, load_topology, parse_topology
from shmfabric.manager.supervisor import SupervisorError
from tests.manager.conftest import unique_fabric, wait_until

pytestmark = pytest.mark.timeout(150)

ROOT = Path(__file__).resolve().parents[2]
WAIT = 20.0  # seconds any one wait may take before the test fails (never reached when all is well)
SECRET = "s3cret-memif-word"


# -- validation -------------------------------------------------------------------------------------
def _errors(nodes: str, extra: str = "") -> str:
    text = "fabric: {name: x}\nnodes:\n" + textwrap.dedent(nodes) + extra
    with pytest.raises(ConfigError) as exc:
        parse_topology(text, "t.yaml")
    return str(exc.value)


def test_a_node_has_a_function_or_an_adapter_never_both_nor_neither():
    both = _errors("  - name: dp\n    function: sink\n    adapter: {kind: memif, socket: /tmp/x.sock}\n")
    assert "t.yaml:3: field `nodes[0]`: a node has either `function:` or `adapter:`, not both" in both
    neither = _errors("  - name: dp\n    batch: 8\n")
    assert "t.yaml:3: field `nodes[0]`: a node needs `function:` (a plugin name) or `adapter:`" in neither


def test_adapter_values_are_checked_by_kind_with_located_errors():
    text = _errors("""\
      - name: dp
        adapter:
          kind: memif
          socket: /tmp/x.sock
          ring_size: 1000
          role: both
          buffer_size: 100
          secret: 012345678901234567890123456789
      - name: t
        adapter:
          kind: tap
          address: [10.77.0.1]
          ifname: a-much-too-long-name
      - name: k
        adapter: {kind: vxlan}
      - name: m
        adapter: {socket: /tmp/y.sock}
    """)
    assert "t.yaml:7: field `nodes[0].adapter.ring_size`: ring_size 1000 is not a power of two; use 512 or 1024" in text
    assert "t.yaml:8: field `nodes[0].adapter.role`: Input should be 'server' or 'client'; fix: use one of" in text
    assert "t.yaml:9: field `nodes[0].adapter.buffer_size`" in text
    assert "t.yaml:10: field `nodes[0].adapter.secret`: secret is 30 bytes: give at most 23" in text
    assert "0123456789" not in text  # a secret is not repeated in the error
    assert "t.yaml:14: field `nodes[1].adapter.address`: address '10.77.0.1' has no prefix length" in text
    assert "t.yaml:15: field `nodes[1].adapter.ifname`: interface name 'a-much-too-long-name' is not valid" in text
    assert "field `nodes[2].adapter`: Input tag 'vxlan'" in text and "fix: give `kind: tap`" in text
    assert "field `nodes[3].adapter`: Unable to extract tag" in text and "fix: add `kind: tap`" in text


def test_an_adapter_runs_one_instance_and_takes_no_ports_config_or_scale():
    text = _errors("""\
      - name: dp
        adapter: {kind: memif, socket: /tmp/x.sock}
        instances: 2
        scale: {max_instances: 2}
        ports: [s]
        config: {rate: 1}
      - {name: s, function: sink}
    """)
    assert "t.yaml:5: field `nodes[0].instances`: instances 2: an adapter (memif) runs exactly one instance" in text
    assert "t.yaml:6: field `nodes[0].scale`: an adapter (memif) runs exactly one instance and is not scaled" in text
    assert "t.yaml:7: field `nodes[0].ports`: an adapter (memif) has no ports" in text
    assert "t.yaml:8: field `nodes[0].config`: an adapter (memif) takes its settings in `adapter:`" in text


def test_via_names_another_node_and_only_adapters_have_it():
    text = _errors("""\
      - {name: a, adapter: {kind: memif, socket: /tmp/a.sock}, via: nope}
      - {name: b, adapter: {kind: memif, socket: /tmp/b.sock}, via: b}
      - {name: s, function: sink, via: a}
    """)
    assert "t.yaml:3: field `nodes[0].via`: via names node 'nope', which is not defined under `nodes:`" in text
    assert "t.yaml:4: field `nodes[1].via`: node 'b' names itself in `via:`" in text
    assert "t.yaml:5: field `nodes[2].via`: `via:` applies to adapter nodes only" in text


def test_two_adapters_on_one_socket_or_one_interface_are_refused():
    text = _errors("""\
      - {name: a, adapter: {kind: memif, socket: /tmp/a.sock}}
      - {name: b, adapter: {kind: memif, socket: /tmp//a.sock}}
      - {name: c, adapter: {kind: memif, socket: /tmp/a.sock, abstract: true}}
      - {name: t1, adapter: {kind: tap, netns: x}}
      - {name: t2, adapter: {kind: tap, netns: x, ifname: sf0}}
      - {name: t3, adapter: {kind: tap, netns: y}}
      - {name: t4, adapter: {kind: tap}}
    """)
    assert "t.yaml:4: field `nodes[1].adapter.socket`: socket '/tmp//a.sock' is also memif nodes[0]'s" in text
    assert "t.yaml:7: field `nodes[4].adapter.ifname`: interface 'sf0' in netns 'x' is also nodes[3]'s" in text
    assert "nodes[2]" not in text and "nodes[5]" not in text and "nodes[6]" not in text  # other namespaces


def test_an_adapter_is_only_ever_the_end_of_a_chain():
    text = _errors("""\
      - {name: dp, adapter: {kind: memif, socket: /tmp/a.sock}}
      - {name: s, function: sink}
      - {name: g, function: generator}
    """, "chains:\n  - {name: c, nodes: [dp, s]}\n  - {name: d, nodes: [g, dp]}\n")
    assert "field `chains[0].nodes[0]`: node 'dp' is an adapter" in text
    assert "chains[1]" not in text


def test_adapters_count_one_node_each_in_the_budget_and_ignore_the_default_scale():
    topo = parse_topology(textwrap.dedent("""\
        fabric: {name: x, max_nodes: 4}
        policies: {scale: {min_instances: 2, max_instances: 2}}
        nodes:
          - {name: dp, adapter: {kind: memif, socket: /tmp/a.sock}, via: s}
          - {name: s, function: sink}
    """), "t.yaml")
    assert topo.instances_of("dp") == 1 and topo.instances_of("s") == 2
    assert topo.node("dp").function_name == "adapter:memif"
    assert topo.start_order().index("s") < topo.start_order().index("dp")  # its via first
    assert topo.upstream_of("s") == ["dp"]


def test_the_memif_example_is_valid():
    topo = load_topology(ROOT / "examples" / "memif.yaml")
    dp = [n for n in topo.nodes if n.adapter is not None]
    assert dp and dp[0].adapter.kind == "memif" and dp[0].via


# -- the supervisor, in process ----------------------------------------------------------------------
def memif_topology(sock: Path, extra: str = "", secret: str | None = SECRET) -> str:
    sec = f", secret: {secret}" if secret else ""
    return textwrap.dedent(f"""\
        fabric: {{name: "{{fabric}}", ring_size: 256, max_nodes: 8, networks: [{{mtu: 1500, slots: 1024}}]}}
        poll_interval: 0.1
        api: null
        policies:
          restart: {{backoff_initial: 0.1, backoff_max: 1}}
        nodes:
          - name: dp
            adapter: {{kind: memif, socket: "{sock}"{sec}}}
            {extra}
          - name: sink
            function: sink
    """)


@pytest.fixture
def sock_dir(tmp_path):
    # a short directory: a unix socket path holds at most 107 bytes
    d = Path("/tmp") / f"sfa-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    yield d
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


def _instance(sup, name):
    for node in sup.status()["nodes"]:
        for i in node["instances"]:
            if i["name"] == name:
                return node, i
    raise KeyError(name)


def test_supervisor_runs_a_memif_adapter_and_never_steers_or_scales_it(run_topology, sock_dir):
    sock = sock_dir / "dp.sock"
    sup = run_topology(memif_topology(sock))
    node, inst = _instance(sup, "dp")
    assert node["function"] == "adapter:memif" and inst["state"] == "running"
    assert node["config"]["secret"] == "<redacted>" and node["config"]["socket"] == str(sock)
    assert sock.exists()
    cmdline = Path(f"/proc/{inst['pid']}/cmdline").read_bytes().split(b"\0")
    assert SECRET.encode() not in b" ".join(cmdline)  # read from the config fd, not the command line
    assert b"memif" in cmdline and b"--parent-pid" in cmdline
    wait_until(lambda: _instance(sup, "dp")[1]["counters_at"] is not None, what="the adapter polled", sup=sup)
    for call in (lambda: sup.scale("dp", 2), lambda: sup.reconfigure("dp", {}), lambda: sup.replace("dp")):
        with pytest.raises(SupervisorError, match="is an adapter") as exc:
            call()
        assert exc.value.status == 409
    assert sup.redact_text(f"x {SECRET} y") == "x <redacted> y"


def test_a_reload_that_changes_an_adapter_replaces_its_instance(run_topology, sock_dir, tmp_path):
    sock = sock_dir / "dp.sock"
    sup = run_topology(memif_topology(sock))
    old_pid = sup.nodes["dp"].instances[0].pid
    body = memif_topology(sock_dir / "dp2.sock").replace("{fabric}", sup.topo.fabric.name)
    changes = sup.reload(parse_topology(body, "new.yaml"))
    assert changes["replaced"] == ["dp"]
    (inst,) = sup.nodes["dp"].instances
    assert inst.name == "dp" and inst.state == "running" and inst.pid != old_pid
    assert (sock_dir / "dp2.sock").exists() and not sock.exists()
    assert sup.reload(parse_topology(body, "new.yaml"))["replaced"] == []  # unchanged: left alone
    assert sup.nodes["dp"].instances[0].pid == inst.pid


def test_an_adapter_follows_its_via_node_when_that_is_replaced(run_topology, sock_dir):
    text = memif_topology(sock_dir / "dp.sock", extra="via: fw").replace("  - name: sink\n", textwrap.indent(
        "- name: fw\n  function: firewall\n  config: {rules: \"policy accept\"}\n- name: sink\n", "  "))
    sup = run_topology(text + "chains:\n  - {name: c, nodes: [fw, sink]}\n")
    (dp,) = sup.nodes["dp"].instances
    assert dp.via == "fw" and b"--via\0fw\0" in Path(f"/proc/{dp.pid}/cmdline").read_bytes()
    old_pid = dp.pid
    sup.replace("fw", version="2")
    (dp,) = sup.nodes["dp"].instances
    assert dp.via == "fw-2" and dp.pid != old_pid and dp.state == "running"
    assert b"--via\0fw-2\0" in Path(f"/proc/{dp.pid}/cmdline").read_bytes()
    assert not any(e["kind"] == "steer" and e["node"] == "dp" for e in sup.events)  # never set_next


# -- `shmfabric up` / `down` end to end ---------------------------------------------------------------
@pytest.fixture
def env(tmp_path):
    return dict(os.environ, SHMFABRIC_STATE_DIR=str(tmp_path / "state"), PYTHONUNBUFFERED="1")


def cli(env, *args, timeout=90, check=True):
    p = subprocess.run([sys.executable, "-m", "shmfabric", *map(str, args)], env=env, capture_output=True, check=False,
                       text=True, timeout=timeout)
    if check and p.returncode != 0:
        pytest.fail(f"shmfabric {' '.join(map(str, args))} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def status(env) -> dict:
    return json.loads(cli(env, "status", "--json").stdout)


def inst_of(st: dict, name: str) -> dict:
    return next(i for n in st["nodes"] for i in n["instances"] if i["name"] == name)


def poll(what: str, pred, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")


def send_frame(fab: Fabric, sock: Path, dst_id: int, src_id: int, payload: bytes) -> None:
    """A memif client (on a scratch node) writes one frame to the server's ring and leaves."""
    probe = fab.attach(f"probe{uuid.uuid4().hex[:6]}")
    conn = None
    try:
        conn = MemifBridge(probe, MemifConfig(str(sock), role="client", secret=SECRET.encode(),
                                              log2_ring_size=6))._dial()
        frame = node_mac(dst_id) + node_mac(src_id) + b"\x08\x00" + payload.ljust(60, b".")
        ring = conn.tx
        slot = ring.cursor & ring.mask
        offset = conn.plan.buffer_offset(True, slot)
        conn.views[0][offset:offset + len(frame)] = frame
        from shmfabric.adapters import memif_wire as w

        w.DESC.pack_into(ring.mm, ring.desc + slot * 16, 0, 0, len(frame), offset, 0)
        ring.cursor = (ring.cursor + 1) & 0xFFFF
        native.store_u16_release(ring.mm, ring.head, ring.cursor)
        ring.kick()
        time.sleep(0.3)  # the server takes it from the ring before the link goes down
    finally:
        if conn is not None:
            conn.close()
        probe.detach()


def test_up_serves_memif_restarts_it_after_kill_9_and_down_removes_its_socket(env, tmp_path, sock_dir):
    name = unique_fabric()
    sock = sock_dir / "dp.sock"
    path = tmp_path / "t.yaml"
    path.write_text(memif_topology(sock).replace("{fabric}", name).replace("api: null\n", ""))
    cli(env, "up", path, "--detach")
    pids: list[int] = []
    try:
        st = status(env)
        dp = inst_of(st, "dp")
        assert dp["function"] == "adapter:memif" and dp["state"] == "running"
        pids.append(dp["pid"])
        sink_id = inst_of(st, "sink")["node_id"]
        fab = Fabric.open(name)
        try:
            send_frame(fab, sock, sink_id, dp["node_id"], b"first frame")
            poll("the frame at the sink",
                 lambda: inst_of(status(env), "sink")["function_counters"].get("frames", 0) >= 1)
            poll("the adapter's counters in status", lambda: inst_of(status(env), "dp")["counters"])
            os.kill(dp["pid"], signal.SIGKILL)
            def restarted() -> dict | None:
                i = inst_of(status(env), "dp")
                return i if i["restarts"] == 1 and i["state"] == "running" and i["pid"] != dp["pid"] else None

            again = poll("the adapter restarted", restarted)
            pids.append(again["pid"])
            before = inst_of(status(env), "sink")["function_counters"].get("frames", 0)
            send_frame(fab, sock, sink_id, again["node_id"], b"after the restart")
            poll("a frame through the restarted adapter",
                 lambda: inst_of(status(env), "sink")["function_counters"].get("frames", 0) > before)
        finally:
            fab.close()
    finally:
        cli(env, "down", timeout=90)
    assert not any(alive(p) for p in pids)
    assert not sock.exists()
    assert not region_path(name).exists()
    Fabric.destroy(name)  # (a no-op when `down` removed it; cleans up after a failure)


# -- TAP (root) ---------------------------------------------------------------------------------------
def _run(*argv: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess:
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and p.returncode:
        pytest.fail(f"{' '.join(argv)} -> {p.returncode}: {p.stderr}")
    return p


@pytest.mark.skipif(os.geteuid() != 0, reason="TAP adapters and network namespaces need root")
def test_up_runs_two_tap_adapters_that_ping_and_down_removes_them(env, tmp_path):
    name = unique_fabric()
    tag = uuid.uuid4().hex[:6]
    spaces = [f"sfa{tag}", f"sfb{tag}"]
    path = tmp_path / "tap.yaml"
    path.write_text(textwrap.dedent(f"""\
        fabric: {{name: {name}, max_nodes: 8}}
        poll_interval: 0.2
        nodes:
          - name: ns-a
            adapter: {{kind: tap, netns: {spaces[0]}, address: [10.77.0.1/24]}}
          - name: ns-b
            adapter: {{kind: tap, netns: {spaces[1]}, address: [10.77.0.2/24], ifname: sf1}}
    """))
    for ns in spaces:
        _run("ip", "netns", "add", ns)
    up = False
    try:
        cli(env, "up", path, "--detach")
        up = True
        st = status(env)
        assert {(i["name"], i["function"], i["state"]) for n in st["nodes"] for i in n["instances"]} == {
            ("ns-a", "adapter:tap", "running"), ("ns-b", "adapter:tap", "running")}
        # "running" means the adapter answers control requests, which it does from its start: its
        # address is set a moment later (after its duplicate-address probe)
        for ns, dev, addr in ((spaces[0], "sf0", "10.77.0.1/24"), (spaces[1], "sf1", "10.77.0.2/24")):
            poll(f"{addr} on {dev} in {ns}",
                 lambda ns=ns, dev=dev, addr=addr:
                 addr in _run("ip", "-n", ns, "-o", "addr", "show", "dev", dev, check=False).stdout)
        p = _run("ip", "netns", "exec", spaces[0], "ping", "-c", "3", "-i", "0.2", "-W", "2", "10.77.0.2",
                 check=False, timeout=30)
        assert p.returncode == 0, p.stdout + p.stderr + _run("ip", "netns", "exec", spaces[0], "ip", "addr").stdout \
            + "".join(f.read_text() for f in (tmp_path / "state").glob("*/*.log"))
        assert _run("ip", "netns", "exec", spaces[1], "ip", "link", "show", "sf1").returncode == 0
        cli(env, "down", timeout=90)
        up = False
        assert _run("ip", "netns", "exec", spaces[0], "ip", "link", "show", "sf0", check=False).returncode != 0
        assert _run("ip", "netns", "exec", spaces[1], "ip", "link", "show", "sf1", check=False).returncode != 0
    finally:
        if up:
            cli(env, "down", timeout=90, check=False)
        for ns in spaces:
            _run("ip", "netns", "del", ns, check=False)
        Fabric.destroy(name)


# -- review fixes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("adapter, says", [
    ("{kind: memif, socket: rel.sock}", "socket 'rel.sock' is a relative path; give an absolute one"),
    ('{kind: memif, socket: /tmp/x.sock, secret: "abc\\n"}', "secret holds a control character"),
    ('{kind: memif, socket: /tmp/x.sock, secret: " abc"}', "spaces at its ends"),
    ('{kind: tap, ifname: "sf:0"}', "interface name 'sf:0' is not valid"),
])
def test_what_would_fail_at_start_is_refused_before(adapter, says):
    text = _errors(f"  - name: dp\n    adapter: {adapter}\n")
    assert "t.yaml:4: field `nodes[0].adapter" in text and says in text
    assert "abc" not in text or "secret" not in says  # a secret is not repeated


def test_a_tap_mtu_past_its_network_and_an_address_twice_are_refused():
    text = "fabric: {name: x, networks: [{mtu: 1500}]}\nnodes:\n" + textwrap.dedent("""\
          - name: a
            adapter: {kind: tap, netns: a, address: [10.9.0.1/24], mtu: 9000}
          - name: b
            adapter: {kind: tap, netns: b, address: [10.9.0.1/24]}
        """)
    with pytest.raises(ConfigError) as exc:
        parse_topology(text, "t.yaml")
    msg = str(exc.value)
    assert "t.yaml:4: field `nodes[0].adapter.mtu`: mtu 9000 is larger than the node's network's (1500)" in msg
    assert "t.yaml:6: field `nodes[1].adapter.address[0]`: address 10.9.0.1 is also tap nodes[0]'s" in msg


def test_a_memif_adapter_whose_peer_stops_reading_is_not_taken_for_hung(run_topology, sock_dir):
    """A peer that connects and never reads (a paused testpmd): the adapter's ring to it fills and
    it waits, still answering the manager, which must not kill it as unresponsive."""
    sock = sock_dir / "dp.sock"
    text = memif_topology(sock).replace("restart: {backoff_initial: 0.1, backoff_max: 1}",
                                        "restart: {backoff_initial: 0.1, backoff_max: 1, unresponsive_after: 1.5}")
    sup = run_topology(text)
    _, dp = _instance(sup, "dp")
    fab = Fabric.open(sup.topo.fabric.name)
    probe = fab.attach("stuck-peer")
    src = fab.attach("src")
    conn = None
    try:
        conn = MemifBridge(probe, MemifConfig(str(sock), role="client", secret=SECRET.encode(),
                                              log2_ring_size=4))._dial()  # 16 buffers, never read
        wait_until(lambda: _instance(sup, "dp")[1]["counters"].get("link_ups") == 1, what="the link", sup=sup)
        sent = 0
        for _ in range(40):
            sent += src.send_batch(dp["node_id"], [bytes(60)] * 16)
            time.sleep(0.05)
        assert sent > 16, sent  # more than the peer's ring holds: the adapter waits on it
        deadline = time.monotonic() + 4.0  # well past unresponsive_after, the manager polling all along
        while time.monotonic() < deadline:
            sup.tick()
            time.sleep(0.1)
        _, now = _instance(sup, "dp")
        assert now["pid"] == dp["pid"] and now["restarts"] == 0 and now["state"] == "running"
        assert not [e for e in sup.status()["events"] if e["kind"] == "hung"]
        assert now["counters"].get("to_device") == 16, now["counters"]  # the peer's ring, full, polled just now
    finally:
        if conn is not None:
            conn.close()
        probe.detach()
        src.detach()
        fab.close()


@pytest.mark.parametrize("adapter, where, says", [
    ('{kind: memif, socket: /tmp/x.sock, secret: ""}', "adapter.secret", "secret is empty, which would let any peer in"),
    ("{kind: memif, socket: rel.sock}", "adapter.socket", "socket 'rel.sock' is a relative path"),
    ("{kind: tap, address: [10.9.0.1/24, 10.9.0.1/32]}", "adapter.address[1]", "address 10.9.0.1 is listed twice"),
])
def test_second_review_rules(adapter, where, says):
    text = _errors(f"  - name: dp\n    adapter: {adapter}\n")
    assert f"t.yaml:4: field `nodes[0].{where}`" in text and says in text, text


def test_an_empty_secret_file_is_refused_not_taken_for_no_secret(tmp_path):
    (tmp_path / "s").write_text("\n")
    exe = Path(sys.executable).parent / "shmfabric"
    r = subprocess.run([str(exe), "memif", "nofabric", "x", "--socket", str(tmp_path / "m.sock"), "--secret-file",
                        str(tmp_path / "s")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "is empty; write the secret in it" in r.stderr, r.stderr
