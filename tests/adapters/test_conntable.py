"""The global address's connection table, without sockets or processes: the design's lookup
order, round robin, what a walk of a node's sockets teaches it, and collection."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from shmfabric.adapters.conntable import ICMP, TCP, UDP, ConnectionTable, Miss

VIP = 0x0A4D0064  # 10.77.0.100
CLIENT = 0x0A4D0001
OTHER = 0x0A4D0002


@dataclass(frozen=True)
class Sock:
    family: int
    proto: int
    laddr: object
    lport: int
    raddr: object
    rport: int
    state: str


def listener(port: int, proto: int = TCP, laddr=None, family: int = 4) -> Sock:
    return Sock(family, proto, laddr, port, None, 0, "listen" if proto == TCP else "bound")


def conn(lport: int, raddr: int, rport: int, laddr=VIP, proto: int = TCP, state: str = "established") -> Sock:
    return Sock(4, proto, laddr, lport, raddr, rport, state)


def table(**kw) -> ConnectionTable:
    return ConnectionTable(VIP, 4, **kw)


def test_new_connections_go_round_robin_to_the_nodes_that_listen_and_stay_there() -> None:
    t = table()
    for n in ("a", "b", "c"):
        t.update_node(n, [listener(80)] if n != "c" else [listener(22)], 0)
    placed = [t.lookup(TCP, CLIENT, 40000 + i, 80, 1) for i in range(4)]
    assert placed == ["a", "b", "a", "b"]  # c does not listen on 80
    # the rest of each connection follows its SYN, whatever the turn says now
    assert [t.lookup(TCP, CLIENT, 40000 + i, 80, 2, opening=False) for i in range(4)] == placed
    assert t.lookup(TCP, CLIENT, 50000, 22, 2) == "c"


def test_a_segment_that_is_not_a_syn_never_opens_a_connection() -> None:
    t = table()
    t.update_node("a", [listener(80)], 0)
    assert t.lookup(TCP, CLIENT, 40000, 80, 1, opening=False) is Miss.NOT_OPENING
    assert not t.exact
    # UDP has no SYN: any datagram opens an association
    t.update_node("a", [listener(53, UDP)], 0)
    assert t.lookup(UDP, CLIENT, 40000, 53, 1, opening=False) == "a"


def test_nobody_listening_is_a_miss() -> None:
    t = table()
    t.update_node("a", [listener(80)], 0)
    assert t.lookup(TCP, CLIENT, 40000, 81, 1) is Miss.NO_LISTENER
    assert t.lookup(UDP, CLIENT, 40000, 80, 1) is Miss.NO_LISTENER  # a TCP listener takes no UDP


def test_sockets_on_another_address_or_family_do_not_count() -> None:
    t = table()
    t.update_node("a", [listener(80, laddr=0x0A4D0005), listener(81, family=6), listener(82, laddr=VIP)], 0)
    assert t.lookup(TCP, CLIENT, 1, 80, 1) is Miss.NO_LISTENER  # bound to the node's own address only
    assert t.lookup(TCP, CLIENT, 1, 81, 1) is Miss.NO_LISTENER  # an IPv6-only listener
    assert t.lookup(TCP, CLIENT, 1, 82, 1) == "a"  # bound to the global address itself


def test_exact_match_comes_first_then_the_wildcarded_local_address_then_the_listener() -> None:
    t = table()
    # b: a connected UDP socket bound to any address, peer CLIENT:5000; a and c: unbound-peer sockets
    t.update_node("a", [listener(53, UDP)], 0)
    t.update_node("b", [Sock(4, UDP, None, 53, CLIENT, 5000, "connected")], 0)
    t.update_node("c", [listener(53, UDP), conn(53, OTHER, 6000, proto=UDP, state="connected")], 0)
    assert t.lookup(UDP, OTHER, 6000, 53, 1) == "c"  # 1: exact (c's connected socket on the global address)
    assert t.lookup(UDP, CLIENT, 5000, 53, 1) == "b"  # 2: local address wildcarded
    assert {t.lookup(UDP, CLIENT, 5001 + i, 53, 1) for i in range(4)} == {"a", "c"}  # 3: foreign dropped


def test_a_walk_teaches_the_table_connections_it_did_not_place() -> None:
    # a dispatcher restarted: the connections already open stay with their nodes
    t = table()
    t.update_node("a", [listener(80), conn(80, CLIENT, 40001)], 0)
    t.update_node("b", [listener(80), conn(80, CLIENT, 40002)], 0)
    assert t.lookup(TCP, CLIENT, 40002, 80, 1, opening=False) == "b"
    assert t.lookup(TCP, CLIENT, 40001, 80, 1, opening=False) == "a"


def test_a_reused_client_port_is_placed_anew_only_when_its_node_no_longer_serves_it() -> None:
    t = table()
    t.update_node("a", [listener(80)], 0)
    t.update_node("b", [listener(80)], 0)
    assert t.lookup(TCP, CLIENT, 40000, 80, 1) == "a"
    assert t.lookup(TCP, CLIENT, 40000, 80, 1.5) == "a"  # a retransmitted SYN goes where the first went
    t.update_node("a", [listener(8080)], 2)  # a stopped serving port 80
    assert t.lookup(TCP, CLIENT, 40000, 80, 3) == "b"
    # but a node that still holds the old connection (TIME_WAIT) keeps it: its kernel decides
    t.update_node("a", [conn(80, CLIENT, 40001, state="time_wait")], 4)
    assert t.lookup(TCP, CLIENT, 40001, 80, 5) == "a"


def test_a_removed_node_gets_nothing_and_its_connections_are_dropped() -> None:
    t = table()
    t.update_node("a", [listener(80)], 0)
    t.update_node("b", [listener(80)], 0)
    assert t.lookup(TCP, CLIENT, 40000, 80, 1) == "a"
    assert t.remove_node("a") == 1
    assert t.lookup(TCP, CLIENT, 40000, 80, 2, opening=False) is Miss.NOT_OPENING
    assert {t.lookup(TCP, CLIENT, 41000 + i, 80, 2) for i in range(3)} == {"b"}
    assert t.remove_node("a") == 0


def test_collect_drops_what_was_neither_used_nor_seen_within_the_idle_timeout() -> None:
    t = table(idle_timeout=10)
    t.update_node("a", [listener(80), listener(53, UDP)], 0)
    t.lookup(TCP, CLIENT, 1, 80, 0)  # placed, never seen by a walk (the node refused it)
    t.lookup(UDP, CLIENT, 2, 53, 0)
    t.lookup(UDP, CLIENT, 3, 53, 0)
    t.lookup(UDP, CLIENT, 3, 53, 8)  # still used
    t.update_node("a", [listener(80), listener(53, UDP), conn(80, CLIENT, 4)], 9)  # a long-idle connection
    assert t.collect(15) == 2
    assert set(t.exact) == {(UDP, CLIENT, 3, 53), (TCP, CLIENT, 4, 80)}
    assert t.collect(30) == 2  # neither used nor seen since
    assert t.describe()["collected"] == 4


def test_a_connection_seen_by_every_walk_is_never_collected() -> None:
    t = table(idle_timeout=5)
    for now in range(0, 60, 3):
        t.update_node("a", [listener(80), conn(80, CLIENT, 7)], now)
        assert t.collect(now + 1) == 0
    assert t.lookup(TCP, CLIENT, 7, 80, 61, opening=False) == "a"


def test_pings_are_spread_like_connections_and_each_stays_with_its_node() -> None:
    t = table()
    t.update_node("a", [], 0)
    t.update_node("b", [], 0)
    first = [t.lookup(ICMP, CLIENT, ident, 0, 1) for ident in (1, 2)]
    assert sorted(first) == ["a", "b"]
    assert [t.lookup(ICMP, CLIENT, ident, 0, 2) for ident in (1, 2)] == first
    assert ConnectionTable(VIP, 4, answers_ping=False).lookup(ICMP, CLIENT, 1, 0, 1) is Miss.NO_LISTENER


def test_ipv6_tables_take_ipv6_sockets() -> None:
    vip6 = bytes.fromhex("fd000000000000000000000000000064")
    client6 = bytes.fromhex("fd000000000000000000000000000001")
    t = ConnectionTable(vip6, 6)
    t.update_node("a", [listener(80), listener(443, family=6)], 0)
    assert t.lookup(TCP, client6, 1, 80, 1) is Miss.NO_LISTENER
    assert t.lookup(TCP, client6, 1, 443, 1) == "a"
    with pytest.raises(ValueError):
        ConnectionTable(VIP, 5)
