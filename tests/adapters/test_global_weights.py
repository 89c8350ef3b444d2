"""Member weights of a global address: the pure table's smooth weighted round robin (TCP) and weighted
rendezvous hashing (UDP, ICMP), equal weights placing exactly as without, the dispatcher's and CLI's
`--weight NODE=N` (refusals in one line, leaving nothing behind; the ready line and counters), and
end to end, 40 new connections to two members of weights 3 and 1 split 30 and 10 (root)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections import Counter

import pytest

from shmfabric.adapters.conntable import ICMP, TCP, UDP, ConnectionTable, rendezvous
from shmfabric.fabric import Fabric

from .test_conntable import listener  # (the fake sockets the table reads)

pytestmark = pytest.mark.timeout(120)

VIP = 0x0A4D0064  # 10.77.0.100
CLIENT = 0x0A4D0001


SERVES = [listener(80), listener(53, UDP)]


def table(nodes: str | list = "abc", weights: dict | None = None, **kw) -> ConnectionTable:
    t = ConnectionTable(VIP, 4, weights=weights, **kw)
    for n in nodes:
        t.update_node(n, SERVES, 0)
    return t


def syns(t: ConnectionTable, n: int, first_port: int = 10000, now: float = 1) -> list:
    return [t.lookup(TCP, CLIENT, first_port + i, 80, now) for i in range(n)]


def flows(t: ConnectionTable, n: int = 30000, proto: int = UDP) -> dict:
    """n deterministic datagram flows (many clients and ports) -> their node."""
    lport = 53 if proto == UDP else 0
    return {i: t.lookup(proto, 0x0A000000 + i * 7919 % 65536, 1024 + i % 50000, lport, 1) for i in range(n)}


# -- TCP: smooth weighted round robin ------------------------------------------------------------------
def test_weights_5_1_1_give_nginxs_sequence_cycle_after_cycle() -> None:
    t = table(weights={"a": 5})
    assert "".join(syns(t, 21)) == "aabacaa" * 3


@pytest.mark.parametrize("weights", [{"a": 3}, {"a": 3, "b": 2}, {"a": 7, "b": 4, "c": 2}, {"b": 256, "c": 5}])
def test_every_run_of_sum_weights_connections_gives_each_node_exactly_its_weight(weights: dict) -> None:
    t = table(weights=weights)
    w = {n: weights.get(n, 1) for n in "abc"}
    total = sum(w.values())
    got = syns(t, 3 * total)
    for start in range(2 * total + 1):  # every window, not only those aligned on a cycle
        assert Counter(got[start:start + total]) == w, (start, got)


def test_weighted_connections_are_interleaved_not_in_blocks() -> None:
    got = syns(table("ab", weights={"a": 4}), 10)
    assert got == ["a", "a", "b", "a", "a"] * 2  # (nginx's: never all four a's in a row)
    got = syns(table(weights={"a": 2, "b": 2}), 5)  # 2, 2, 1: c comes within the first cycle, once
    assert Counter(got) == {"a": 2, "b": 2, "c": 1} and got != sorted(got), got


def test_a_weight_change_starts_a_new_exact_cycle() -> None:
    t = table("ab", weights={"a": 3})
    syns(t, 3)  # mid-cycle
    t.set_weight("b", 2)
    assert Counter(syns(t, 5, first_port=20000)) == {"a": 3, "b": 2}
    t.set_weight("a", 1)
    t.set_weight("b", 1)  # equal again: plain round robin
    assert set(syns(t, 2, first_port=30000)) == {"a", "b"}


def test_weights_count_among_the_candidates_only() -> None:
    t = table(weights={"a": 3, "b": 2})
    t.set_placeable("a", False)  # its adapter restarting: b and c share 2:1
    assert Counter(syns(t, 30)) == {"b": 20, "c": 10}
    for now in (1, 2):  # b's accept queue full: c alone
        t.update_node("b", [listener(80, queued=129), listener(53, UDP)], now)
    assert Counter(syns(t, 4, first_port=20000, now=2.5)) == {"c": 4}
    t.set_placeable("a", True)  # a and c: 3:1
    assert Counter(syns(t, 8, first_port=30000, now=3)) == {"a": 6, "c": 2}


def test_a_retransmitted_syn_takes_no_turn() -> None:
    t = table("ab", weights={"a": 3})
    first = syns(t, 4)
    assert [t.lookup(TCP, CLIENT, 10000 + i, 80, 1.5) for i in range(4)] == first  # the retries
    assert Counter(syns(t, 4, first_port=20000)) == {"a": 3, "b": 1}


def test_a_weight_set_before_its_node_is_known_applies_when_it_comes() -> None:
    t = table("ab")
    t.set_weight("c", 2)
    t.update_node("c", SERVES, 1)
    assert Counter(syns(t, 8)) == {"a": 2, "b": 2, "c": 4}
    assert t.describe()["weights"] == {"a": 1, "b": 1, "c": 2}


# -- equal weights: exactly as without --------------------------------------------------------------
def _scenario(t: ConnectionTable) -> list:
    """Connections and flows while nodes come, go away and come back (the round robin's counter
    runs across candidate changes: equal weights must keep it)."""
    out = syns(t, 7)
    t.update_node("d", SERVES, 1)
    out += syns(t, 9, first_port=20000)
    t.set_placeable("b", False)
    out += syns(t, 5, first_port=30000)
    t.set_placeable("b", True)
    out += syns(t, 6, first_port=40000)
    out += list(flows(t, 2000).values()) + list(flows(t, 500, ICMP).values())
    t.remove_node("c")
    out += list(flows(t, 2000).values())
    return out


@pytest.mark.parametrize("weights", [{"a": 1, "b": 1, "c": 1, "d": 1}, {"a": 4, "b": 4, "c": 4, "d": 4}, {}])
def test_equal_weights_place_exactly_as_no_weights(weights: dict) -> None:
    assert _scenario(table(weights=weights)) == _scenario(table())


def test_equal_weights_hash_as_the_unweighted_rendezvous() -> None:
    for i in range(500):
        key = (UDP, CLIENT + i, 1000 + i, 53)
        assert rendezvous(key, ["a", "b", "c"], {"a": 9, "b": 9, "c": 9}) == rendezvous(key, ["a", "b", "c"])


@pytest.mark.parametrize("bad", [0, 257, -1, 2.0, True, "3", None])
def test_a_weight_outside_1_to_256_or_not_an_integer_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="from 1 to 256"):
        table().set_weight("a", bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="from 1 to 256"):
        ConnectionTable(VIP, 4, weights={"a": bad})  # type: ignore[dict-item]


# -- UDP and ICMP: weighted rendezvous hashing -----------------------------------------------------
@pytest.mark.parametrize("weights", [{"a": 3, "b": 1}, {"a": 1, "b": 2, "c": 3}, {"a": 10, "b": 1, "c": 1}])
def test_datagram_flows_are_shared_by_weight(weights: dict) -> None:
    t = table(list(weights), weights=weights)
    total = sum(weights.values())
    for proto in (UDP, ICMP):
        got = Counter(flows(t, 30000, proto).values())
        share = {n: got[n] / 30000 for n in weights}
        assert all(abs(share[n] - weights[n] / total) < 0.02 for n in weights), (proto, share)


def test_a_flow_stays_with_its_node_across_pauses_and_restarts() -> None:
    first = flows(table(weights={"a": 5, "b": 2}), 3000)
    t = table(weights={"a": 5, "b": 2})  # a dispatcher restarted
    assert flows(t, 3000) == first
    assert flows(t, 3000) == first  # and again later (from its cache or the hash: the same)


@pytest.mark.parametrize("node,weight", [("b", 6), ("b", 1), ("a", 1), ("c", 256)])
def test_a_weight_change_moves_only_flows_to_or_from_that_node(node: str, weight: int) -> None:
    weights = {"a": 4, "b": 3, "c": 2}
    t = table(weights=weights)
    before = flows(t, 20000)
    t.set_weight(node, weight)
    after = flows(t, 20000)
    moved = {i for i in before if before[i] != after[i]}
    assert moved, "a weight change moved nothing"
    if weight > weights[node]:
        assert all(after[i] == node for i in moved)  # it rose: flows only come to it
    else:
        assert all(before[i] == node for i in moved)  # it fell: only its own flows leave


def test_a_node_leaving_moves_only_its_own_flows_whatever_the_weights() -> None:
    t = table(weights={"a": 4, "b": 3, "c": 2})
    before = flows(t, 20000)
    t.remove_node("b")
    after = flows(t, 20000)
    assert {i for i in before if before[i] != after[i]} == {i for i in before if before[i] == "b"}


# -- the dispatcher and `shmfabric global --weight` ------------------------------------------------
@pytest.fixture
def fabric():
    name = f"gw{uuid.uuid4().hex[:6]}"
    fab = Fabric.create(name, ephemeral=True)
    yield name, fab
    fab.close()
    Fabric.destroy(name)


def shmfabric(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shmfabric", *argv], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("weights,says", [
    (["c=2"], "a weight is given for 'c', which is not a member (members: a, b)"),
    (["a=0"], "weight 0 of member 'a' is out of range; give one from 1 to 256"),
    (["a=257"], "weight 257 of member 'a' is out of range"),
    (["a=x"], "weight 'x' of member 'a' is not an integer"),
    (["a=2.5"], "weight '2.5' of member 'a' is not an integer"),
    (["a=-1"], "weight '-1' of member 'a' is not an integer"),
    (["a="], "weight '' of member 'a' is not an integer"),
    (["a"], "weight 'a' is not NODE=N"),
    (["=3"], "weight '=3' is not NODE=N"),
    (["a=2", "a=3"], "member 'a' is given a weight twice"),
])
def test_a_wrong_weight_is_refused_in_one_line_and_leaves_nothing_behind(fabric, weights: list, says: str) -> None:
    name, fab = fabric
    argv = ["global", name, "gw", "--address", "10.0.0.100", "--member", "a=nsa", "--member", "b=nsb"]
    for w in weights:
        argv += ["--weight", w]
    r = shmfabric(*argv)
    assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert fab.nodes() == []  # (the dispatcher never attached)
    # refused before the fabric is even opened: a missing fabric is not what it says, nor is one made
    missing = f"nofab{uuid.uuid4().hex[:6]}"
    r = shmfabric("global", missing, *argv[2:])
    assert r.returncode == 2 and says in r.stderr and "shmfabric create" not in r.stderr, r.stderr
    assert not os.path.exists(f"/dev/shm/shmfabric-{missing}")


def test_the_ready_line_and_the_counters_show_the_weights(fabric) -> None:
    name, _ = fabric
    ns = f"sfnone{uuid.uuid4().hex[:6]}"  # (missing namespaces: the dispatcher runs on without them)
    r = shmfabric("global", name, "gw", "--address", "10.0.0.100", "--member", f"a={ns}a", "--member", f"b={ns}b",
                  "--weight", "a=3", "--seconds", "1", "--json")
    assert r.returncode == 0, r.stderr
    ready, report = r.stdout.splitlines()[0], json.loads(r.stdout.splitlines()[-1])
    assert ready.endswith(f"members a (netns {ns}a, weight 3), b (netns {ns}b, weight 1)"), ready
    assert report["counters"]["weight_a"] == 3 and report["counters"]["weight_b"] == 1, report


def test_the_dispatcher_refuses_a_weight_for_a_node_that_is_not_a_member(fabric) -> None:
    from shmfabric.adapters.global_net import GlobalDispatcher, GlobalError

    _, fab = fabric
    gw = fab.attach("gw")
    try:
        with pytest.raises(GlobalError, match="'c', which is not a member"):
            GlobalDispatcher(fab, gw, "10.0.0.100", [("a", None)], weights={"c": 2})
        with pytest.raises(GlobalError, match="member 'a': weight 300 is out of range"):
            GlobalDispatcher(fab, gw, "10.0.0.100", [("a", None)], weights={"a": 300})
        d = GlobalDispatcher(fab, gw, "10.0.0.100", [("a", None), ("b", None)], weights={"b": 7})
        assert [m.weight for m in d.members] == [1, 7] and d.table.weight("b") == 7
        assert d.counters["weight_b"] == 7 and "table_weights" not in d.counters
    finally:
        gw.detach()


# -- end to end: real TCP servers in two member namespaces (root) ---------------------------------
SERVER = r"""
import socket, sys, threading
def serve(c):
    with c:
        c.sendall(sys.argv[1].encode() + b"\n")
        c.recv(1)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7100)); s.listen(128)
print("ready", flush=True)
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
"""
# 40 connections one after another (each closed before the next): the host that answered each
CLIENT_E2E = r"""
import socket, sys
out = []
for i in range(40):
    try:
        with socket.create_connection((sys.argv[1], 7100), timeout=8) as s:
            out.append(s.makefile().readline().strip() or "empty")
    except OSError as exc:
        out.append(type(exc).__name__)
print(" ".join(out), flush=True)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces and TAP devices")
def test_members_of_weights_3_and_1_get_30_and_10_of_40_new_connections_interleaved() -> None:
    from shmfabric.bench.lan import GlobalFabricLan, LanError

    class WeightedLan(GlobalFabricLan):
        def dispatcher_argv(self, name: str = "gw") -> list[str]:
            return super().dispatcher_argv(name) + ["--weight", "host1=3"]

    servers = []
    try:
        with WeightedLan(members=2, lan=9) as lan:
            for h in (1, 2):
                p = lan.popen(h, [sys.executable, "-u", "-c", SERVER, f"host{h}"], stdout=subprocess.PIPE, text=True)
                servers.append(p)
                assert p.stdout.readline().strip() == "ready"  # type: ignore[union-attr]
            ready = lan.start_dispatcher()
            assert "weight 3)" in ready and "weight 1)" in ready, ready
            r = lan.run(0, [sys.executable, "-c", CLIENT_E2E, lan.vip], capture_output=True, text=True, timeout=90)
            hosts = r.stdout.split()
            assert Counter(hosts) == {"host1": 30, "host2": 10}, r.stdout + r.stderr
            # smooth: every run of four is three and one (host1 host1 host2 host1, over and over)
            assert all(Counter(hosts[k:k + 4]) == {"host1": 3, "host2": 1} for k in range(37)), hosts
            counters = lan.stop_dispatcher()
            assert counters.get("weight_host1") == 3 and counters.get("weight_host2") == 1, counters
    except LanError as exc:
        pytest.fail(str(exc))
    finally:
        for p in servers:
            p.kill()
            p.wait()
