"""The function runtime with real processes on a real fabric: a whole chain, control ops, errors."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from shmfabric.fabric import Fabric
from shmfabric.functions.control import ControlClient, ControlError


@pytest.fixture
def fab():
    name = f"rt-{uuid.uuid4().hex[:8]}"
    f = Fabric.create(name, networks=[{"mtu": 1500, "slots": 8192}], ring_size=512)
    yield f
    f.close()
    Fabric.destroy(name)


class Procs:
    def __init__(self, fab: Fabric, tmp: Path):
        self.fab, self.tmp, self.p = fab, tmp, {}

    def start(self, node: str, function: str, config: dict, nxt: list[str] = (), ports: list[str] = (),
              duration: float | None = None) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "shmfabric.functions.run", "--fabric", self.fab.name, "--node", node,
               "--function", function, "--config", json.dumps(config), "--stats-json", str(self.tmp / f"{node}.json")]
        if nxt:
            cmd += ["--next", ",".join(nxt)]
        for p in ports:
            cmd += ["--port", p]
        if duration is not None:
            cmd += ["--duration", str(duration)]
        self.p[node] = subprocess.Popen(cmd, stderr=open(self.tmp / f"{node}.log", "w"))
        return self.p[node]

    def wait_attached(self, *nodes: str, timeout: float = 20) -> None:
        end = time.monotonic() + timeout
        while any(self.fab.node_id(n) is None for n in nodes):
            assert time.monotonic() < end, f"nodes {nodes} did not attach; logs: {self.logs()}"
            time.sleep(0.02)

    def stop(self, node: str) -> dict:
        self.p[node].send_signal(signal.SIGTERM)
        assert self.p[node].wait(timeout=30) == 0, self.logs()
        return json.loads((self.tmp / f"{node}.json").read_text())

    def logs(self) -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text()[-1500:]}" for f in self.tmp.glob("*.log"))

    def kill_all(self) -> None:
        for p in self.p.values():
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture
def procs(fab, tmp_path):
    ps = Procs(fab, tmp_path)
    yield ps
    ps.kill_all()


def wait_rx(fab: Fabric, node: str, want: int, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if sum(n["rx_frames"] for n in fab.nodes() if n["name"] == node) >= want:
            return
        time.sleep(0.05)
    raise AssertionError(f"{node} did not receive {want} frames")


def test_default_chain_delivers_every_frame_once(fab, procs):
    count = 20_000
    procs.start("sink1", "sink", {})
    procs.start("sink2", "sink", {})
    procs.start("lb", "l4lb", {"backends": [{"node": "sink1"}, {"node": "sink2"}]}, ports=["sink1", "sink2"])
    procs.start("ids", "ids", {"rules": 'alert udp any any -> any any (msg:"m"; content:"zzzz"; sid:1;)'}, ["lb"])
    procs.start("fw", "firewall", {"rules": "policy drop\nip saddr 10.1.0.0/16 accept"}, ["ids"])
    procs.wait_attached("sink1", "sink2", "lb", "ids", "fw")
    gen = procs.start("gen", "generator", {"count": count, "size": 128, "flows": 64}, ["fw"])
    assert gen.wait(timeout=60) == 0, procs.logs()
    total = 0
    unique = 0
    for s in ("sink1", "sink2"):
        wait_rx(fab, "lb", count)
    stats = {n: procs.stop(n) for n in ("fw", "ids", "lb", "sink1", "sink2")}
    for s in ("sink1", "sink2"):
        fc = stats[s]["function_counters"]
        assert fc["corrupt"] == 0 and fc["duplicates"] == 0
        assert fc["frames"] > 0, "the load balancer used only one backend"
        total += fc["frames"]
        unique += fc["unique"]
    assert total == unique == count
    assert stats["fw"]["counters"]["in_frames"] == count
    assert stats["ids"]["counters"]["ns_per_frame"] > 0
    audit = fab.pool_audit()
    assert audit["orphaned"] == 0 and audit["free"] + sum(audit["held"].values()) == audit["total"]


def test_control_ops_stats_reconfigure_set_next_and_stop(fab, procs):
    procs.start("a", "sink", {})
    procs.start("b", "sink", {})
    procs.start("fw", "firewall", {"rules": "policy accept"}, ["a"])
    procs.wait_attached("a", "b", "fw")
    ctl = ControlClient(fab, "manager")
    try:
        st = ctl.request("fw", {"op": "stats"})
        assert st["ok"] and st["function"] == "firewall" and st["next"] == ["a"]
        bad = ctl.request("fw", {"op": "reconfigure", "config": {"rules": "ip saddr 300.0.0.0/8 accept"}})
        assert not bad["ok"] and "rules:1" in bad["error"]
        assert ctl.request("fw", {"op": "frobnicate"})["error"].startswith("unknown op")
        gen = procs.start("gen", "generator", {"count": 1000, "size": 64}, ["fw"])
        assert gen.wait(timeout=30) == 0
        wait_rx(fab, "a", 1000)
        assert ctl.request("fw", {"op": "set_next", "next": ["b"]})["ok"]
        assert ctl.request("fw", {"op": "reconfigure", "config": {"rules": "policy drop"}})["ok"]
        # new flows (another source prefix): the established ones would still pass, as in nftables
        gen = procs.start("gen2", "generator", {"count": 500, "size": 64, "src_net": "10.5.0.0/16"}, ["fw"])
        assert gen.wait(timeout=30) == 0
        time.sleep(0.5)
        st = ctl.request("fw", {"op": "stats"})
        assert st["counters"]["in_frames"] == 1500
        assert st["function_counters"]["dropped"] == 500  # policy drop after the reconfiguration
        gen = procs.start("gen3", "generator", {"count": 0, "size": 64, "rate": 2000}, ["fw"])
        assert ctl.request("fw", {"op": "reconfigure", "config": {"rules": "policy accept"}})["ok"]
        wait_rx(fab, "b", 200)
        gen.send_signal(signal.SIGTERM)
        gen.wait(timeout=10)
        reply = ctl.request("fw", {"op": "stop"}, timeout=20)
        assert reply["ok"] and reply["processed"] >= 1700
        assert procs.p["fw"].wait(timeout=20) == 0
        with pytest.raises(ControlError, match="no node named 'fw'"):
            ctl.request("fw", {"op": "stats"})
    finally:
        ctl.close()


def test_scaled_out_next_hop_keeps_flows_on_one_instance(fab, procs):
    procs.start("s1", "sink", {})
    procs.start("s2", "sink", {})
    procs.wait_attached("s1", "s2")
    gen = procs.start("gen", "generator", {"count": 4000, "size": 64, "flows": 40}, ["s1", "s2"])
    assert gen.wait(timeout=30) == 0
    a, b = procs.stop("s1"), procs.stop("s2")
    fa, fb = a["function_counters"], b["function_counters"]
    assert fa["frames"] + fb["frames"] == 4000
    assert fa["frames"] and fb["frames"]
    # 40 flows cycled: every flow sends 100 frames, so each sink's count is a multiple of 100
    assert fa["frames"] % 100 == 0 and fb["frames"] % 100 == 0


def test_scaled_out_port_spreads_flows_and_set_next_repoints_it(fab, procs):
    for n in ("a1", "a2", "b"):
        procs.start(n, "sink", {})
    procs.wait_attached("a1", "a2", "b")
    # port "a" is a group of two instances; l4lb still names its backend "a" (ctx.ports)
    procs.start("lb", "l4lb", {"backends": [{"node": "a"}, {"node": "b"}]}, ports=["a=a1,a2", "b"])
    procs.wait_attached("lb")
    gen = procs.start("gen", "generator", {"count": 4000, "size": 64, "flows": 40}, ["lb"])
    assert gen.wait(timeout=30) == 0
    wait_rx(fab, "b", 1)
    ctl = ControlClient(fab, "manager")
    try:
        st = ctl.request("lb", {"op": "stats"})
        assert st["ports"] == ["a", "b"] and st["port_instances"] == {"a": ["a1", "a2"], "b": ["b"]}
        bad = ctl.request("lb", {"op": "set_next", "ports": {"c": ["a1"]}})
        assert not bad["ok"] and "['c'] are not ports of 'lb'" in bad["error"]
        assert ctl.request("lb", {"op": "set_next", "ports": {"a": ["a2"]}})["ok"]
        st = ctl.request("lb", {"op": "stats"})
        assert st["port_instances"] == {"a": ["a2"], "b": ["b"]}
        gen = procs.start("gen2", "generator", {"count": 2000, "size": 64, "flows": 40}, ["lb"])
        assert gen.wait(timeout=30) == 0
        time.sleep(0.5)
        assert ctl.request("lb", {"op": "stop"}, timeout=20)["ok"]
    finally:
        ctl.close()
    a1, a2, b = (procs.stop(n)["function_counters"]["frames"] for n in ("a1", "a2", "b"))
    assert a1 + a2 + b == 6000
    assert a1 and a2 and b
    # the first 4000 frames: 40 flows of 100, each flow on one instance of "a" (or on "b")
    assert a1 % 100 == 0
    # after the re-point, a1 got nothing more: every frame for "a" went to a2
    assert (a2 + b) - (4000 - a1) == 2000


@pytest.mark.parametrize("args,message", [
    (["--function", "sink", "--port", "a=" + ",".join(f"s{i}" for i in range(26))], "at most 25"),
    (["--function", "sink", "--port", "=x"], "use NAME or NAME=INSTANCE"),
    (["--function", "nope"], "no network function named 'nope'"),
    (["--function", "firewall", "--config", '{"rules": "ip sadr 1.2.3.4 accept"}'], "did you mean 'saddr'"),
    (["--function", "sink", "--config", "[1]"], "--config is not a JSON object"),
    (["--function", "sink", "--config", "@/nonexistent/x.json"],
     "--config @/nonexistent/x.json: cannot read /nonexistent/x.json: No such file or directory"),
    (["--function", "generator", "--config", '{"pcap": "/nonexistent/x.pcap"}'], "cannot start with this configuration"),
])
def test_run_errors_are_one_clear_line(fab, args, message):
    r = subprocess.run([sys.executable, "-m", "shmfabric.functions.run", "--fabric", fab.name, "--node", "x", *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


def test_config_file_that_is_not_an_object_is_named(fab, tmp_path):
    f = tmp_path / "c.json"
    f.write_text("[1]")
    r = subprocess.run([sys.executable, "-m", "shmfabric.functions.run", "--fabric", fab.name, "--node", "x",
                        "--function", "sink", "--config", f"@{f}"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"--config @{f}: {f} is not a JSON object" in r.stderr, r.stderr


@pytest.mark.parametrize("args,missing", [
    (["--function", "firewall", "--config", '{"rules": "policy accept"}', "--next", "ids"], "'ids'"),
    (["--function", "l4lb", "--config", '{"backends": [{"node": "sink1"}, {"node": "sink2"}]}',
      "--port", "sink1", "--port", "sink2"], "'sink1', 'sink2'"),
])
def test_waiting_for_missing_next_hops_ends_with_the_duration(fab, args, missing):
    # the docs' examples run alone: the next hops never attach. The wait (30 s otherwise) ends with
    # --duration; the subprocess bound is below 30 s, so the old wait fails here.
    r = subprocess.run([sys.executable, "-m", "shmfabric.functions.run", "--fabric", fab.name, "--node", "x",
                        *args, "--duration", "1"], capture_output=True, text=True, timeout=20)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"next hop node(s) {missing} not attached to fabric {fab.name!r} within the run's --duration, 1 s" \
        in r.stderr, r.stderr
    assert "start them first" in r.stderr
    assert fab.node_id("x") is None  # detached again


def test_run_against_a_missing_fabric_says_so():
    r = subprocess.run([sys.executable, "-m", "shmfabric.functions.run", "--fabric", "no-such-fabric-x", "--node", "x",
                        "--function", "sink", "--open-timeout", "0.2"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_tap_to_a_mirror_that_never_reads_drops_copies_not_traffic(fab, procs):
    procs.start("sink", "sink", {})
    procs.wait_attached("sink")
    deaf = fab.attach("deaf")  # a mirror that never reads: its ring fills up
    ctl = ControlClient(fab, "manager")
    try:
        assert ctl.request("sink", {"op": "mirror", "to": "deaf"})["ok"]
        gen = procs.start("gen", "generator", {"count": 5000, "size": 64}, ["sink"])
        assert gen.wait(timeout=30) == 0
        wait_rx(fab, "sink", 5000)
        st = ctl.request("sink", {"op": "stats"})
        c = st["counters"]
        assert c["in_frames"] == 5000  # the data path lost nothing
        assert c["mirrored"] == fab.ring_stats(fab.node_id("sink"), deaf.id)["depth"] > 0
        assert c["mirrored"] + c["mirror_dropped"] == 5000 and c["mirror_dropped"] > 0
        assert ctl.request("sink", {"op": "mirror", "to": None})["ok"]
        bad = ctl.request("sink", {"op": "mirror", "to": "nobody", "timeout": 0.2})
        assert not bad["ok"] and "nobody" in bad["error"]
    finally:
        ctl.close()
        deaf.detach()


def test_a_next_hop_follows_its_name_when_restarts_swap_node_ids(fab):
    # ids and sink restarted in the other order: sink now has the id ids had. The hop names the
    # incarnation it resolved in each send, so a send to the old id fails (no frame reaches sink
    # in place of ids) and resolving again by name finds ids where it is now.
    from shmfabric.fabric import UnknownDestinationError
    from shmfabric.functions.runtime import Hop

    a, ids, sink = fab.attach("a"), fab.attach("ids"), fab.attach("sink")
    hop = Hop(fab, ["ids"])
    hop.resolve(0, force=True)
    assert hop.ids == [ids.id] and hop.gens == [fab.node_ref("ids")[1]]
    old = ids.id
    ids.detach(), sink.detach()
    sink2, ids2 = fab.attach("sink"), fab.attach("ids")
    assert sink2.id == old
    with pytest.raises(UnknownDestinationError, match="another incarnation"):
        a.send_batch(hop.ids[0], [b"for ids"], incarnation=hop.gens[0])
    hop.resolve(0, force=True)
    assert hop.ids == [ids2.id] and a.send_batch(hop.ids[0], [b"for ids"], incarnation=hop.gens[0]) == 1
    with sink2.recv_batch(16, timeout=0) as b:
        assert [f for f in b] == []
    for n in (a, sink2, ids2):
        n.detach()


def test_a_function_answers_a_control_client_that_took_a_former_next_hop_id(fab, tmp_path):
    # The incarnation a hop resolved applies to the hop's own sends only: a control client that
    # attaches with the id the next hop had must get its answer (a per-id pin made the reply
    # raise, and the function process exited with status 1).
    import subprocess
    import sys

    b = fab.attach("b")
    proc = subprocess.Popen([sys.executable, "-m", "shmfabric.functions.run", "--fabric", fab.name, "--node", "mon",
                             "--function", "monitor", "--next", "b"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while fab.node_id("mon") is None:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else "slow"
            time.sleep(0.05)
        time.sleep(0.3)  # its hop to b is resolved
        bid = b.id
        b.detach()
        c = ControlClient(fab, "ctl")
        try:
            assert c.node.id == bid  # the lowest free id: b's
            assert "in_frames" in json.dumps(c.request("mon", {"op": "stats"}, timeout=5))
        finally:
            c.close()
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(10)
