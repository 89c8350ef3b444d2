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
    queued: int = 0
    backlog: int = 0


def listener(port: int, proto: int = TCP, laddr=None, family: int = 4, queued: int = 0, backlog: int = 128) -> Sock:
    return Sock(family, proto, laddr, port, None, 0, "listen" if proto == TCP else "bound", queued,
                backlog if proto == TCP else 0)


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
    assert not t.placed
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
    assert {t.lookup(UDP, CLIENT, 5001 + i, 53, 1) for i in range(32)} == {"a", "c"}  # 3: foreign dropped


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
    # a node that holds the old connection ending (TIME_WAIT) and still listens takes the new SYN:
    # its kernel decides; one that no longer listens does not
    t.update_node("a", [listener(80), conn(80, CLIENT, 40001, state="time_wait")], 4)
    assert t.lookup(TCP, CLIENT, 40001, 80, 5) == "a"
    t.update_node("b", [listener(80), conn(80, CLIENT, 40002, state="time_wait")], 4)
    t.update_node("b", [listener(81), conn(80, CLIENT, 40002, state="time_wait")], 5)
    assert t.lookup(TCP, CLIENT, 40002, 80, 6, opening=False) == "b"  # its last segments still go there
    assert t.lookup(TCP, CLIENT, 40002, 80, 6) == "a"  # but a new connection goes to a listener


def test_a_live_connection_wins_over_another_nodes_ending_one_whatever_the_walk_order() -> None:
    t = table()
    t.update_node("b", [listener(80), conn(80, CLIENT, 7, state="time_wait")], 0)
    t.update_node("a", [listener(80), conn(80, CLIENT, 7)], 1)
    for now in range(2, 6):  # walks of b keep coming: they never take a's connection from it
        t.update_node("b", [listener(80), conn(80, CLIENT, 7, state="time_wait")], now)
        assert t.lookup(TCP, CLIENT, 7, 80, now, opening=False) == "a"
    t.update_node("a", [listener(80)], 6)  # a's connection closed: b's ending one is what is left
    assert t.lookup(TCP, CLIENT, 7, 80, 7, opening=False) == "b"


def test_a_removed_node_gets_nothing_and_its_connections_are_dropped() -> None:
    t = table()
    t.update_node("a", [listener(80), conn(80, CLIENT, 1)], 0)
    t.update_node("b", [listener(80)], 0)
    assert t.lookup(TCP, CLIENT, 40000, 80, 1) == "a"
    assert t.remove_node("a") == 2  # one held, one placed
    assert t.lookup(TCP, CLIENT, 40000, 80, 2, opening=False) is Miss.NOT_OPENING
    assert t.lookup(TCP, CLIENT, 1, 80, 2, opening=False) is Miss.NOT_OPENING
    assert {t.lookup(TCP, CLIENT, 41000 + i, 80, 2) for i in range(3)} == {"b"}
    assert t.remove_node("a") == 0


def test_a_node_away_takes_no_new_connection_but_keeps_its_own() -> None:
    t = table()
    t.update_node("a", [listener(80), conn(80, CLIENT, 1)], 0)
    t.update_node("b", [listener(80)], 0)
    t.set_placeable("a", False)  # its adapter restarting
    assert {t.lookup(TCP, CLIENT, 100 + i, 80, 1) for i in range(4)} == {"b"}
    assert t.lookup(TCP, CLIENT, 1, 80, 1, opening=False) == "a"
    t.set_placeable("a", True)
    assert {t.lookup(TCP, CLIENT, 200 + i, 80, 2) for i in range(4)} == {"a", "b"}


def test_placements_go_once_a_walk_shows_them_or_when_none_did_in_time() -> None:
    t = table(confirm_timeout=5)
    t.update_node("a", [listener(80)], 0)
    assert t.lookup(TCP, CLIENT, 1, 80, 0) == "a"  # its node accepts it
    assert t.lookup(TCP, CLIENT, 2, 80, 0) == "a"  # its node refuses it (a reset): never shown
    t.update_node("a", [listener(80), conn(80, CLIENT, 1)], 1)
    assert t.collect(1.5) == 1  # 1 is the node's socket's now
    assert t.lookup(TCP, CLIENT, 1, 80, 2, opening=False) == "a"
    assert t.collect(4) == 0
    assert t.collect(6) == 1  # 2: nobody showed it within 5 s
    assert t.lookup(TCP, CLIENT, 2, 80, 7, opening=False) is Miss.NOT_OPENING
    assert t.describe()["collected"] == 2


def test_a_syn_flood_leaves_at_most_max_placed_entries() -> None:
    t = table(max_placed=100)
    t.update_node("a", [listener(80)], 0)
    for i in range(1000):
        assert t.lookup(TCP, CLIENT + i, 1234, 80, 0) == "a"
    assert len(t.placed) == 100 and t.describe()["full"] == 900
    t.collect(10)
    assert not t.placed
    # UDP and ICMP keep nothing per flow at all
    t.update_node("a", [listener(80), listener(53, UDP)], 10)
    for i in range(1000):
        t.lookup(UDP, CLIENT + i, 1234, 53, 10)
        t.lookup(ICMP, CLIENT + i, 1, 0, 10)
    assert not t.placed and not t.held


def test_udp_flows_stay_with_their_node_across_pauses_restarts_and_other_nodes_leaving() -> None:
    def fresh() -> ConnectionTable:
        t = table()
        for n in ("a", "b", "c"):
            t.update_node(n, [listener(53, UDP)], 0)
        return t

    t = fresh()
    first = {port: t.lookup(UDP, CLIENT, port, 53, 0) for port in range(1000, 1300)}
    assert set(first.values()) == {"a", "b", "c"}
    assert {port: fresh().lookup(UDP, CLIENT, port, 53, 999) for port in first} == first  # a restart
    t.remove_node("c")
    moved = {p for p, n in first.items() if t.lookup(UDP, CLIENT, p, 53, 1) != n}
    assert moved == {p for p, n in first.items() if n == "c"}  # only c's flows move


def test_pings_are_spread_and_each_identifier_stays_with_its_node() -> None:
    t = table()
    t.update_node("a", [], 0)
    t.update_node("b", [], 0)
    first = [t.lookup(ICMP, CLIENT, ident, 0, 1) for ident in range(64)]
    assert set(first) == {"a", "b"}
    assert [t.lookup(ICMP, CLIENT, ident, 0, 2) for ident in range(64)] == first
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


def test_a_full_table_makes_room_for_the_newest_connection() -> None:
    t = table(max_placed=100)
    t.update_node("a", [listener(80)], 0)
    for i in range(500):  # a SYN flood from made-up sources
        t.lookup(TCP, OTHER + i, 1, 80, 0)
    assert t.lookup(TCP, CLIENT, 40000, 80, 0) == "a"  # a real client's SYN...
    for i in range(50):
        t.lookup(TCP, OTHER + 1000 + i, 1, 80, 0)
    assert t.lookup(TCP, CLIENT, 40000, 80, 0, opening=False) == "a"  # ...and its ACK, mid-flood
    assert len(t.placed) == 100


def test_another_nodes_ending_connection_does_not_take_a_placement_away() -> None:
    t = table()
    t.update_node("b", [listener(81), conn(80, CLIENT, 7, state="time_wait")], 0)  # b no longer serves 80
    t.update_node("a", [listener(80)], 0)
    assert t.lookup(TCP, CLIENT, 7, 80, 1) == "a"  # the reused port's SYN: placed on a
    t.collect(1.5)  # (b's TIME_WAIT on the key is not a's connection shown)
    assert t.lookup(TCP, CLIENT, 7, 80, 2, opening=False) == "a"


def test_a_syn_retried_after_its_node_went_away_is_placed_anew() -> None:
    t = table()
    t.update_node("a", [listener(80)], 0)
    t.update_node("b", [listener(80)], 0)
    assert t.lookup(TCP, CLIENT, 1, 80, 1) == "a"
    t.set_placeable("a", False)
    assert t.lookup(TCP, CLIENT, 1, 80, 2) == "b"


def test_hashed_flows_spread_evenly_whatever_the_node_names() -> None:
    for names in (("w1", "w2", "w3"), ("alpha", "beta", "gamma"), ("m1", "m2", "m3", "m4", "m5")):
        t = table()
        for n in names:
            t.update_node(n, [listener(53, UDP)], 0)
        got = [t.lookup(UDP, CLIENT + i, 1000 + i, 53, 0) for i in range(3000)]
        share = [got.count(n) / len(got) for n in names]
        assert all(abs(x - 1 / len(names)) < 0.06 for x in share), (names, share)


def test_a_view_with_its_changes_worked_out_elsewhere_gives_the_same_table() -> None:
    from shmfabric.adapters.conntable import changes, view_of

    old = view_of(VIP, 4, [listener(80), conn(80, CLIENT, 1), conn(80, CLIENT, 2)])
    new = view_of(VIP, 4, [listener(80), conn(80, CLIENT, 2), conn(80, CLIENT, 3, state="time_wait")])
    a, b = table(), table()
    for t in (a, b):
        t.set_view("n", old, 0)
    a.set_view("n", new, 1, since=old, changed=changes(old, new))
    b.set_view("n", new, 1)
    assert a.held == b.held == {(TCP, CLIENT, 2, 80): ("n", True), (TCP, CLIENT, 3, 80): ("n", False)}
    # changes worked out against another view than the table's are not trusted
    c = table()
    c.set_view("n", old, 0)
    c.set_view("n", new, 1, since=new, changed=frozenset())
    assert c.held == b.held


def test_a_node_whose_server_stopped_accepting_gets_no_new_connection_while_another_has_room() -> None:
    t = table()
    hung = [listener(80, queued=129, backlog=128)]  # accept queue full: hung or overloaded
    t.update_node("a", hung, 0)
    t.update_node("b", [listener(80, queued=3, backlog=128)], 0)
    # one walk seeing a queue full might have caught a busy server at an unlucky instant: not yet
    assert {t.lookup(TCP, CLIENT, 50 + i, 80, 0.5) for i in range(6)} == {"a", "b"}
    t.update_node("a", hung, 1)  # the second walk in a row: full
    assert {t.lookup(TCP, CLIENT, 100 + i, 80, 1) for i in range(6)} == {"b"}
    t.update_node("b", [listener(80, queued=129, backlog=128)], 2)
    t.update_node("b", [listener(80, queued=129, backlog=128)], 3)  # both full: both take their turn again
    assert {t.lookup(TCP, CLIENT, 200 + i, 80, 3) for i in range(6)} == {"a", "b"}
    t.update_node("a", [listener(80)], 4)  # a accepts again
    t.update_node("b", hung, 4)
    assert {t.lookup(TCP, CLIENT, 300 + i, 80, 5) for i in range(6)} == {"a"}


def test_one_full_listener_of_several_on_a_port_makes_the_port_full() -> None:
    # (SO_REUSEPORT: the kernel picks a listener by the connection's hash and never skips a full one)
    t = table()
    twice = [listener(80, queued=129, backlog=128), listener(80, queued=0, backlog=128)]
    for now in (0, 1):
        t.update_node("a", twice, now)
        t.update_node("b", [listener(80)], now)
    assert {t.lookup(TCP, CLIENT, 300 + i, 80, 2) for i in range(6)} == {"b"}


def test_a_syn_retried_after_its_node_stopped_accepting_is_placed_anew() -> None:
    t = table()
    t.update_node("a", [listener(80)], 0)
    t.update_node("b", [listener(80)], 0)
    assert t.lookup(TCP, CLIENT, 1, 80, 0) == "a"
    for now in (1, 2):
        t.update_node("a", [listener(80, queued=129, backlog=128)], now)
    assert t.lookup(TCP, CLIENT, 1, 80, 2.1) == "b"  # the retry goes where it can be accepted


def test_a_syn_over_time_wait_is_placed_so_its_ack_finds_the_node_before_a_walk_shows_it() -> None:
    # (the node answered with a SYN cookie: it holds nothing until the ACK comes)
    t = table()
    t.update_node("a", [listener(80), conn(80, CLIENT, 7, state="time_wait")], 0)
    t.update_node("b", [listener(80)], 0)
    assert t.lookup(TCP, CLIENT, 7, 80, 1) == "a"
    t.collect(1.2)  # (the TIME_WAIT still shown is not the new connection: the placement stays)
    t.update_node("a", [listener(80)], 1.5)  # the TIME_WAIT went, no socket yet
    assert t.lookup(TCP, CLIENT, 7, 80, 1.6, opening=False) == "a"


def test_a_syn_over_time_wait_on_a_node_that_stopped_accepting_goes_elsewhere() -> None:
    t = table()
    for now in (0, 1):
        t.update_node("a", [listener(80, queued=129, backlog=128), conn(80, CLIENT, 7, state="time_wait")], now)
        t.update_node("b", [listener(80)], now)
    assert t.lookup(TCP, CLIENT, 7, 80, 2) == "b"


def test_a_full_wildcard_listener_does_not_matter_beside_one_on_the_address_itself() -> None:
    # (the kernel gives the address's own listener the connections first)
    t = table()
    for now in (0, 1):
        t.update_node("a", [listener(80, queued=5, backlog=0), listener(80, laddr=VIP)], now)
        t.update_node("b", [listener(80)], now)
    assert {t.lookup(TCP, CLIENT, 300 + i, 80, 2) for i in range(6)} == {"a", "b"}


def test_a_queue_must_stay_full_for_full_after_seconds_however_often_walks_come() -> None:
    t = table(full_after=1.0)
    t.update_node("b", [listener(80)], 0)
    for now in (0, 0.25, 0.5, 0.75):  # walks asked for by misses, close together
        t.update_node("a", [listener(80, queued=129, backlog=128)], now)
    assert {t.lookup(TCP, CLIENT, 300 + i, 80, 0.8) for i in range(6)} == {"a", "b"}
    t.update_node("a", [listener(80, queued=129, backlog=128)], 1.0)
    assert {t.lookup(TCP, CLIENT, 400 + i, 80, 1.1) for i in range(6)} == {"b"}
